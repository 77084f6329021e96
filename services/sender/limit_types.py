"""What one send asks of the limiter and what it answers, and where the limiter keeps it in Redis.

Contract: plain frozen values, no I/O. Times are clock seconds of the caller
(`LimitRequest.now`), never Redis TIME; a rate or limit of 0 means none applies.
Every key helper returns a key in the hash slot of `keys.prefix`, so one Lua
call can touch them all.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.pipeline.defer_reasons import DeferReason
from services.pipeline.limiter_keys import LimiterKeys

UNLIMITED = 1_000_000  # `Capacity.available` when no limit applies


@dataclass(frozen=True)
class LimitRequest:
    """Everything the limits of one send depend on; `token_id` is unique per reservation."""

    token_id: str
    account: str
    account_rate: int  # sends per sliding window (3600 s); 0: unlimited
    manager_id: str
    daily_limit: int  # per manager per local day; 0: unlimited
    day: str  # the account's local calendar day, YYYY-MM-DD
    next_day_at: float  # clock time of the next local midnight
    campaign_id: str
    campaign_rate: int = 0  # the campaign's own hourly rate; 0: none
    domain_group: str | None = None
    domain_rate: int = 0  # hourly throttle of (account, domain_group); 0: none
    warmup_cap: int = 0  # daily cap while warming up when the warm-up job set none; 0: no warm-up
    quota_enforced: bool = False  # the account has a provider quota
    now: float = 0.0  # clock time of the decision
    priority: int | None = None  # the campaign's priority: admission by priority and fair share


@dataclass(frozen=True)
class Decision:
    """Whether a send may go now; when not, the binding limit and when all refusing limits allow it."""

    granted: bool
    reason: DeferReason | None
    retry_at: float | None
    factor: float = 1.0  # the account's adaptive factor
    degraded: bool = False  # decided without Redis


@dataclass(frozen=True)
class Capacity:
    """How many sends could be granted now (domain throttles aside), and what binds at 0."""

    available: int
    reason: DeferReason | None
    retry_at: float | None


@dataclass(frozen=True)
class RestoredSend:
    """One send the reconciler knows was made, to rebuild the limiter's state after Redis lost it."""

    token_id: str
    account: str
    campaign_id: str
    manager_id: str
    day: str
    at: float  # clock time of the send
    domain_group: str | None
    counts_warmup: bool
    next_day_at: float


def token_key(keys: LimiterKeys, token_id: str) -> str:
    """Hash recording what one granted reservation took (what `refund` gives back)."""
    return "{" + keys.prefix + "}:tok:" + token_id


def restore_lock_key(keys: LimiterKeys) -> str:
    """Held (SET NX) by the one process restoring the limiter's state."""
    return "{" + keys.prefix + "}:restore_lock"


def placeholder_key(keys: LimiterKeys) -> str:
    """Stands for a limit that does not apply (keeps every key in the prefix's slot)."""
    return "{" + keys.prefix + "}:none"

