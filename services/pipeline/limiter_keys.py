"""Names of every Redis key the limiter, the quota sync and the warm-up job share.

Contract: all keys of one pipeline start with ``{prefix}:`` where the braces
are a Redis Cluster hash tag, so one Lua script may touch any of them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LimiterKeys:
    """Key names under one prefix (`MAILER_REDIS_KEY_PREFIX`)."""

    prefix: str = "mailer"

    def _k(self, *parts: str) -> str:
        return "{" + self.prefix + "}:" + ":".join(parts)

    def epoch(self) -> str:
        """Set once the limiter's state has been restored after Redis (re)started."""
        return self._k("epoch")

    def account_rate(self, account: str) -> str:
        """Sliding-window ZSET of the account's sends (member token id, score clock time)."""
        return self._k("rate", account)

    def campaign_rate(self, campaign_id: str) -> str:
        """Sliding-window ZSET of one campaign's sends (its rate override, its fair share)."""
        return self._k("crate", campaign_id)

    def domain_rate(self, account: str, group: str) -> str:
        """Sliding-window ZSET of the account's sends to one destination provider group."""
        return self._k("drate", account, group)

    def daily(self, account: str, manager_id: str, day: str) -> str:
        """Counter of a manager's sends on one calendar day (account time zone, YYYY-MM-DD)."""
        return self._k("daily", account, manager_id, day)

    def warmup_daily(self, account: str, day: str) -> str:
        """Counter of the account's sends on one calendar day, checked against the warm-up cap."""
        return self._k("warm", account, day)

    def warmup_cap(self, account: str) -> str:
        """The account's current warm-up daily cap (written by the warm-up job)."""
        return self._k("warmcap", account)

    def quota(self, account: str) -> str:
        """The provider's `emails_available` for the account (absent: not synced yet)."""
        return self._k("quota", account)

    def quota_info(self, account: str) -> str:
        """Hash: the provider's last quota answer and when it was synced."""
        return self._k("quota_info", account)

    def demand(self, account: str) -> str:
        """Hash: campaign id -> "priority|demand|until" of the campaigns competing for the
        account's window (services/pipeline/limiter_demand.py; the limiter shares by it)."""
        return self._k("demand", account)

    def campaign_windows(self) -> str:
        """The prefix of every campaign's window ZSET (`campaign_rate(id)` = this + id)."""
        return self._k("crate", "")

    def adaptive(self, account: str, group: str | None = None) -> str:
        """Adaptive-throttle factor (0 < f <= 1) of the account, or of one domain group."""
        return self._k("adapt", account) if group is None else self._k("adapt", account, group)

    def starts(self, manager_id: str) -> str:
        """Sliding-window ZSET of a manager's admitted campaign starts (member: the start's key)."""
        return self._k("starts", manager_id)

    def test_emails(self, manager_id: str) -> str:
        """Sliding-window ZSET of a manager's admitted test emails (member: the message's key)."""
        return self._k("tests", manager_id)
