"""The `local_share` outage policy: 1/N of every limit, kept in this process while Redis is unreachable.

Contract: `LocalShare` checks the same limits as the Lua script, each cut to
1/N (N sender processes), in memory and without I/O; a refusal names the limit
that frees up last. Factors, quotas and warm-up caps are the last values Redis
answered (`observe`); an enforced quota never seen is refused as unknown.
`drain()` hands over the grants made here (to be recorded in Redis) and forgets
every local window and counter. Priorities and fair shares are not applied
here (they need the shared registry): only the limits are.
"""

from __future__ import annotations

import math
from bisect import bisect_right, insort
from collections.abc import Iterator
from typing import NamedTuple

from services.pipeline.defer_reasons import DeferReason
from services.pipeline.limiter_keys import LimiterKeys
from services.sender.limit_types import UNLIMITED, Capacity, Decision, LimitRequest


def _scaled(rate: int, factor: float) -> int:
    return max(1, math.floor(rate * factor + 1e-9))


class _Room(NamedTuple):
    left: int  # sends this limit still allows
    reason: DeferReason
    retry_at: float | None  # set when left <= 0
    key: str  # the local window or counter to take from ("" for none)
    window: bool


class LocalShare:
    """1/N of every limit, kept in this process while Redis is unreachable (`local_share`).

    Factors, quotas and warm-up caps are the last values this process saw from Redis.
    """

    def __init__(self, keys: LimiterKeys, *, instances: int, window: float, retry_seconds: float) -> None:
        self.keys = keys
        self.instances = instances
        self.window = window
        self.retry_seconds = retry_seconds
        self._windows: dict[str, list[float]] = {}
        self._counts: dict[str, int] = {}
        self._granted: dict[str, tuple[LimitRequest, list[_Room]]] = {}
        self._factors: dict[str, float] = {}
        self._quotas: dict[str, float] = {}
        self._caps: dict[str, float] = {}

    def observe_factor(self, key: str, factor: float) -> None:
        self._factors[key] = factor

    def observe(self, req: LimitRequest, *, factor: float, domain_factor: float,
                quota: float | None, cap: float | None) -> None:
        """Remember what Redis answered for `req`."""
        self._factors[self.keys.adaptive(req.account)] = factor
        if req.domain_group:
            self._factors[self.keys.adaptive(req.account, req.domain_group)] = domain_factor
        if quota is not None:
            self._quotas[req.account] = quota
        if cap is not None and req.warmup_cap > 0:
            self._caps[req.account] = cap

    def factor(self, account: str) -> float:
        return self._factors.get(self.keys.adaptive(account), 1.0)

    def reserve(self, req: LimitRequest) -> Decision:
        factor = self.factor(req.account)
        if req.token_id in self._granted:
            return Decision(True, None, None, factor, degraded=True)
        rooms = list(self._rooms(req))
        refusing = [room for room in rooms if room.retry_at is not None]
        if refusing:
            worst = max(refusing, key=lambda room: room.retry_at or 0.0)
            return Decision(False, worst.reason, worst.retry_at, factor, degraded=True)
        for room in rooms:
            if room.window:
                insort(self._windows.setdefault(room.key, []), req.now)
            else:
                self._counts[room.key] = self._counts.get(room.key, 0) + 1
        self._granted[req.token_id] = (req, rooms)
        return Decision(True, None, None, factor, degraded=True)

    def capacity(self, req: LimitRequest) -> Capacity:
        rooms = [room for room in self._rooms(req) if room.reason is not DeferReason.DOMAIN_THROTTLE]
        available = min([UNLIMITED, *(max(0, room.left) for room in rooms)])
        refusing = [room for room in rooms if room.retry_at is not None]
        if available > 0 or not refusing:
            return Capacity(available, None, None)
        worst = max(refusing, key=lambda room: room.retry_at or 0.0)
        return Capacity(0, worst.reason, worst.retry_at)

    def refund(self, token_id: str) -> bool:
        """Give back a local grant; False when `token_id` was not granted here."""
        granted = self._granted.pop(token_id, None)
        if granted is None:
            return False
        req, rooms = granted
        for room in rooms:
            if room.window:
                entries = self._windows.get(room.key, [])
                if req.now in entries:
                    entries.remove(req.now)
            elif self._counts.get(room.key, 0) > 0:
                self._counts[room.key] -= 1
        return True

    def drain(self) -> list[LimitRequest]:
        """The requests granted here since the last drain; forgets every local window and counter."""
        granted = [req for req, _ in self._granted.values()]
        self._granted.clear()
        self._windows.clear()
        self._counts.clear()
        return granted

    def _rooms(self, req: LimitRequest) -> Iterator[_Room]:
        k, n = self.keys, self.instances
        if req.account_rate > 0:
            limit = _scaled(req.account_rate, self.factor(req.account))
            yield self._window(k.account_rate(req.account), limit // n, req, DeferReason.RATE_PER_HOUR)
        if req.campaign_rate > 0:
            yield self._window(k.campaign_rate(req.campaign_id), req.campaign_rate // n, req,
                               DeferReason.CAMPAIGN_RATE)
        if req.domain_group and req.domain_rate > 0:
            factor = self._factors.get(k.adaptive(req.account, req.domain_group), 1.0)
            yield self._window(k.domain_rate(req.account, req.domain_group),
                               _scaled(req.domain_rate, factor) // n, req, DeferReason.DOMAIN_THROTTLE)
        if req.daily_limit > 0:
            yield self._counter(k.daily(req.account, req.manager_id, req.day), req.daily_limit // n, req,
                                DeferReason.DAILY_LIMIT, req.next_day_at)
        if req.warmup_cap > 0:
            cap = int(self._caps.get(req.account, req.warmup_cap))
            yield self._counter(k.warmup_daily(req.account, req.day), cap // n, req,
                                DeferReason.WARMUP_CAP, req.next_day_at)
        if req.quota_enforced:
            retry_at = req.now + self.retry_seconds
            quota = self._quotas.get(req.account)
            if quota is None:
                yield _Room(0, DeferReason.QUOTA_UNKNOWN, retry_at, "", False)
            else:
                yield self._counter(k.quota(req.account), math.floor(quota) // n, req,
                                    DeferReason.QUOTA_EXHAUSTED, retry_at)

    def _window(self, key: str, share: int, req: LimitRequest, reason: DeferReason) -> _Room:
        entries = self._windows.get(key, [])
        del entries[:bisect_right(entries, req.now - self.window)]
        left = share - len(entries)
        if left > 0:
            return _Room(left, reason, None, key, True)
        retry_at = entries[-left] + self.window if share > 0 else req.now + self.retry_seconds
        return _Room(left, reason, retry_at, key, True)

    def _counter(self, key: str, share: int, req: LimitRequest, reason: DeferReason,
                 retry_at: float) -> _Room:
        left = share - self._counts.get(key, 0)
        if left > 0:
            return _Room(left, reason, None, key, False)
        return _Room(left, reason, retry_at if share > 0 else req.now + self.retry_seconds, key, False)

