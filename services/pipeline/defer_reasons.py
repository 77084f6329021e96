"""The closed set of reasons a send or a campaign may be deferred for.

Contract: `DeferReason` lists every reason; `defer_reason(value)` returns the
member for a string and raises `UnknownDeferReason` for anything else, so an
unknown reason can never be stored (Postgres has the same CHECK).
"""

from __future__ import annotations

from enum import StrEnum


class UnknownDeferReason(ValueError):
    """A deferral reason outside the closed set."""


class DeferReason(StrEnum):
    """Why a send (and so its campaign) waits; the value is stored and published."""

    RATE_PER_HOUR = "rate_per_hour"  # the SMTP account's hourly rate is used up
    CAMPAIGN_RATE = "campaign_rate"  # the campaign's own hourly rate override is used up
    DOMAIN_THROTTLE = "domain_throttle"  # the destination provider's hourly throttle is used up
    DAILY_LIMIT = "daily_limit"  # the manager's daily limit (account's calendar day) is used up
    WARMUP_CAP = "warmup_cap"  # the account's warm-up daily cap is used up
    QUOTA_EXHAUSTED = "quota_exhausted"  # the provider's paid quota (emails_available) is 0
    QUOTA_UNKNOWN = "quota_unknown"  # the provider's quota has not been synced yet
    OUTSIDE_HOURS = "outside_hours"  # outside the account's or campaign's working hours
    LIMITER_UNAVAILABLE = "limiter_unavailable"  # Redis is down and the policy is fail_closed
    TRANSIENT_ERROR = "transient_error"  # the SMTP server asked to retry later (4xx)
    CIRCUIT_OPEN = "circuit_open"  # too many consecutive transient errors
    CAMPAIGN_PAUSED = "campaign_paused"  # the campaign is paused: back when it resumes


def defer_reason(value: str) -> DeferReason:
    """The `DeferReason` named `value`; `UnknownDeferReason` when there is none."""
    try:
        return DeferReason(value)
    except ValueError:
        known = ", ".join(r.value for r in DeferReason)
        raise UnknownDeferReason(f"unknown defer reason {value!r} (known: {known})") from None
