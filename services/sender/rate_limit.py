"""The shared sending limiter: one Lua script in Redis decides for every sender process.

Contract: `Limiter.reserve(req)` checks every limit of one send (account hourly
rate scaled by the adaptive factor, the campaign's share of it by priority and
fair share when `req.priority` is set (the registry of
services/pipeline/limiter_demand.py), campaign override, domain throttle,
manager's daily limit, warm-up cap, provider quota) in one atomic EVALSHA and
takes from all of them or from none. A refusal names the limit that frees up
last and when (`Decision.retry_at`, clock seconds). Times are always the
caller's clock (`req.now`), never Redis TIME. `refund(req)` gives back exactly
what `reserve` took for `req.token_id`, once; reserving a token that was
granted already grants again and takes nothing more (a retried call), except a
token `restore()` wrote (a placeholder for a claimed send): that one is given
back and decided afresh.

While the epoch key is missing (Redis lost its state) every send is refused
with `limiter_unavailable` until `restore()` rebuilt the windows and counters.
When Redis cannot be reached the outage policy decides without it:
`fail_closed` refuses everything (never fails open); `local_share` grants
from 1/N of every limit in this process (`LocalShare`). Grants made locally
are written to Redis when it answers again with the same epoch. Every
decision is counted in `mailer_limiter_decisions_total`, every Redis error in
`mailer_redis_errors_total`; logs never hold the Redis URL.

The request and answer types and the key helpers live in `limit_types`, the
in-process share in `local_share`; both are re-exported here.
"""

from __future__ import annotations

import logging
import math
import re
import time
import uuid
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from prometheus_client import Counter
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ReadOnlyError
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.pipeline.defer_reasons import DeferReason
from services.pipeline.limiter_keys import LimiterKeys
from services.pipeline.settings import Settings
from services.sender.limit_types import (
    UNLIMITED,
    Capacity,
    Decision,
    LimitRequest,
    RestoredSend,
    placeholder_key,
    restore_lock_key,
    token_key,
)
from services.sender.local_share import LocalShare

# Callers import the limiter's value types and keys from here, as before the split.
__all__ = [
    "DECISIONS",
    "REDIS_ERRORS",
    "UNLIMITED",
    "Capacity",
    "Decision",
    "LimitRequest",
    "Limiter",
    "LocalShare",
    "RestoredSend",
    "placeholder_key",
    "restore_lock_key",
    "token_key",
]

log = logging.getLogger(__name__)

SCRIPT = Path(__file__).with_name("rate_limit.lua").read_text(encoding="utf-8")
POLICIES = ("fail_closed", "local_share")
LOCK_MS = 30_000  # a restorer that stops refreshing its lock for this long has lost it
RESTORE_BATCH = 500
# BusyLoadingError is a ConnectionError; ReadOnlyError: we talk to a replica after a failover
OUTAGE_ERRORS: tuple[type[BaseException], ...] = (
    RedisConnectionError, RedisTimeoutError, ReadOnlyError, OSError,
)

DECISIONS = Counter(
    "mailer_limiter_decisions_total", "Limiter decisions on sends, by decision and binding reason.",
    ["decision", "reason"],
)
REDIS_ERRORS = Counter(
    "mailer_redis_errors_total", "Redis calls of the limiter that failed, by operation.", ["operation"]
)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _float(value: Any) -> float | None:
    text = _text(value)
    return float(text) if text else None


def _reason(value: Any) -> DeferReason | None:
    text = _text(value)
    return DeferReason(text) if text else None


_CREDENTIALS = re.compile(r"//[^/@\s]*@")


def _describe(exc: BaseException) -> str:
    text = _CREDENTIALS.sub("//***@", str(exc).splitlines()[0] if str(exc) else "")
    return f"{type(exc).__name__}: {text[:200]}"


class Limiter:
    """Every sender process's view of the shared limits (see the module docstring)."""

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        keys: LimiterKeys,
        outage_policy: str = "fail_closed",
        instances: int = 1,
        retry_seconds: float = 5.0,
        window: float = 3600.0,
        slow_down_factor: float = 0.5,
        min_factor: float = 0.1,
        recover_step: float = 0.05,
        probe_interval: float = 1.0,
    ) -> None:
        if outage_policy not in POLICIES:
            raise ValueError(f"outage policy must be one of {POLICIES}, not {outage_policy!r}")
        if instances < 1:
            raise ValueError("instances must be at least 1")
        self.redis = redis
        self.keys = keys
        self.outage_policy = outage_policy
        self.retry_seconds = retry_seconds
        self.window = window
        self.slow_down_factor = slow_down_factor
        self.min_factor = min_factor
        self.recover_step = recover_step
        self.probe_interval = probe_interval  # wall seconds between two tries of an unreachable Redis
        self.local = LocalShare(keys, instances=instances, window=window, retry_seconds=retry_seconds)
        self._ttl = math.ceil(window + 60)
        self._sha: str | None = None
        self._outage_since: float | None = None
        self._probe_after = 0.0
        self._epoch = ""  # the epoch Redis last showed us
        #: placeholders this process restored for unfinished claims -> wall deadline to watch them
        self.unconfirmed: dict[str, float] = {}
        for operation in ("reserve", "capacity", "refund", "feedback"):
            REDIS_ERRORS.labels(operation)  # at 0 from the start: the first error shows in increase()

    @classmethod
    def from_settings(cls, settings: Settings) -> Limiter:
        client = aioredis.Redis.from_url(
            settings.redis_url,
            socket_timeout=2.0,
            socket_connect_timeout=2.0,
            retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), retries=2),
        )
        return cls(
            client,
            keys=LimiterKeys(settings.redis_key_prefix),
            outage_policy=settings.limiter_outage_policy,
            instances=settings.sender_instances,
            retry_seconds=settings.limiter_retry_seconds,
        )

    # --- decisions ----------------------------------------------------------------

    async def reserve(self, req: LimitRequest) -> Decision:
        """Take one send from every limit of `req`, or from none and say why and until when."""
        decision: Decision | None = None
        if not self._skip_redis():
            try:
                reply = await self._eval(self._request_keys(req), self._request_args("reserve", req))
            except OUTAGE_ERRORS as exc:
                self._failed("reserve", exc)
            else:
                decision = self._decision(req, reply)
                await self._answered()
        if decision is None:
            decision = self._degraded(req)
        reason = decision.reason.value if decision.reason else "none"
        DECISIONS.labels("granted" if decision.granted else "refused", reason).inc()
        return decision

    async def capacity(self, req: LimitRequest) -> Capacity:
        """How many sends `req`'s account, campaign and manager allow now; takes nothing."""
        if not self._skip_redis():
            try:
                reply = await self._eval(self._request_keys(req), self._request_args("capacity", req))
            except OUTAGE_ERRORS as exc:
                self._failed("capacity", exc)
            else:
                await self._answered()
                return Capacity(int(reply[0]), _reason(reply[1]), _float(reply[2]))
        if self.outage_policy == "local_share":
            return self.local.capacity(req)
        return Capacity(0, DeferReason.LIMITER_UNAVAILABLE, req.now + self.retry_seconds)

    async def refund(self, req: LimitRequest) -> None:
        """Give back what `reserve` took for `req.token_id`; a second refund does nothing."""
        if self.local.refund(req.token_id):
            return
        keys = [token_key(self.keys, req.token_id), *self._request_keys(req)[:-2]]
        try:
            if self._skip_redis():
                raise RedisConnectionError("Redis unreachable (waiting to try again)")
            await self._eval(keys, ["refund", req.token_id])
        except OUTAGE_ERRORS as exc:
            self._failed("refund", exc)
            log.info("limiter: refund of %s lost, Redis unreachable", req.token_id)

    async def drop_placeholder(self, token_id: str) -> bool:
        """Give back a token `restore()` wrote that no send took over (its claim was given up);
        a token granted since is left alone. True when something was given back."""
        return int(await self._eval([token_key(self.keys, token_id)], ["unplace", token_id])) == 1

    async def feedback(self, account: str, domain_group: str | None, *, slow_down: bool) -> float:
        """Slow the account (and domain group) down, or let it recover; the account's new factor."""
        keys = [self.keys.adaptive(account)]
        if domain_group:
            keys.append(self.keys.adaptive(account, domain_group))
        args = ["feedback", 1 if slow_down else 0, self.slow_down_factor, self.min_factor, self.recover_step]
        try:
            if self._skip_redis():
                raise RedisConnectionError("Redis unreachable (waiting to try again)")
            factor = float(_text(await self._eval(keys, args)))
        except OUTAGE_ERRORS as exc:
            self._failed("feedback", exc)
            log.info("limiter: feedback for account %s lost, Redis unreachable", account)
            return self.local.factor(account)
        self.local.observe_factor(keys[0], factor)
        return factor

    # --- restoring state after Redis lost it -----------------------------------------

    async def needs_restore(self) -> bool:
        """Whether the epoch key is missing (Redis started empty or lost its data)."""
        return not await self.redis.exists(self.keys.epoch())

    async def init_epoch(self) -> bool:
        """Mark an empty limiter as restored (first start); True when this call set the epoch."""
        return await self.restore((), now=time.time())

    async def restore(self, entries: Iterable[RestoredSend], *, now: float,
                      batch_size: int = RESTORE_BATCH) -> bool:
        """Rebuild windows and day counters from `entries`, then set the epoch; True if this call did.

        False when the epoch exists already, another process holds the restore lock or
        this one lost it. Each entry is restored at most once (its token record), so a
        restore that starts over after a crash does not count twice.
        """
        epoch, lock = self.keys.epoch(), restore_lock_key(self.keys)
        lock_token = uuid.uuid4().hex
        try:
            if await self.redis.exists(epoch):
                return False
            if not await self.redis.set(lock, lock_token, nx=True, px=LOCK_MS):
                return False
            try:
                for batch in _batches(entries, batch_size):
                    keys, args = self._restore_batch(batch, lock_token, now)
                    if int(await self._eval(keys, args)) < 0:
                        return False
                value = f"{now!r}/{lock_token}"
                return int(await self._eval([epoch, lock], ["finish", lock_token, value])) == 1
            finally:
                await self._eval([lock], ["unlock", lock_token])
        except OUTAGE_ERRORS:
            REDIS_ERRORS.labels("restore").inc()
            raise

    def _restore_batch(self, batch: list[RestoredSend], lock_token: str,
                       now: float) -> tuple[list[str], list[Any]]:
        k, none = self.keys, placeholder_key(self.keys)
        keys: list[str] = [k.epoch(), restore_lock_key(k)]
        args: list[Any] = ["restore", lock_token, now, self.window, self._ttl, LOCK_MS, none]
        for e in batch:
            keys += [
                token_key(k, e.token_id),
                k.account_rate(e.account),
                k.campaign_rate(e.campaign_id),
                k.domain_rate(e.account, e.domain_group) if e.domain_group else none,
                k.daily(e.account, e.manager_id, e.day),
                k.warmup_daily(e.account, e.day) if e.counts_warmup else none,
            ]
            day_ttl = math.ceil(e.next_day_at - now + 86400) if e.next_day_at > now else 0
            args += [e.token_id, e.at, day_ttl]
        return keys, args

    async def close(self) -> None:
        await self.redis.aclose()

    # --- Redis --------------------------------------------------------------------

    async def _eval(self, keys: list[str], args: list[Any]) -> Any:
        if self._sha is None:
            await self._load()
        assert self._sha is not None
        try:
            return await self.redis.evalsha(self._sha, len(keys), *keys, *args)
        except NoScriptError:  # SCRIPT FLUSH or a restarted Redis
            await self._load()
            return await self.redis.evalsha(self._sha, len(keys), *keys, *args)

    async def _load(self) -> None:
        self._sha = _text(await self.redis.script_load(SCRIPT))

    def _request_keys(self, req: LimitRequest) -> list[str]:
        k, group = self.keys, req.domain_group or ""
        return [
            k.epoch(),
            k.account_rate(req.account),
            k.adaptive(req.account),
            k.campaign_rate(req.campaign_id),
            k.domain_rate(req.account, group),
            k.adaptive(req.account, group),
            k.daily(req.account, req.manager_id, req.day),
            k.warmup_daily(req.account, req.day),
            k.warmup_cap(req.account),
            k.quota(req.account),
            token_key(k, req.token_id),
            k.demand(req.account),
        ]

    def _request_args(self, mode: str, req: LimitRequest) -> list[Any]:
        return [
            mode, req.token_id, req.now, self.window, req.account_rate, req.campaign_rate,
            req.domain_rate if req.domain_group else 0, req.daily_limit, req.warmup_cap,
            1 if req.quota_enforced else 0, req.next_day_at, self.retry_seconds, self._ttl, self._epoch,
            "" if req.priority is None else int(req.priority), req.campaign_id,
            self.keys.campaign_windows(),
        ]

    def _decision(self, req: LimitRequest, reply: list[Any]) -> Decision:
        factor = _float(reply[3]) or 1.0
        self.local.observe(req, factor=factor, domain_factor=_float(reply[6]) or 1.0,
                           quota=_float(reply[4]), cap=_float(reply[5]))
        if epoch := _text(reply[7]):
            self._epoch = epoch
        return Decision(int(reply[0]) == 1, _reason(reply[1]), _float(reply[2]), factor)

    # --- outages ------------------------------------------------------------------

    def _degraded(self, req: LimitRequest) -> Decision:
        if self.outage_policy == "local_share":
            return self.local.reserve(req)
        factor = self.local.factor(req.account)
        return Decision(False, DeferReason.LIMITER_UNAVAILABLE, req.now + self.retry_seconds, factor,
                        degraded=True)

    def _skip_redis(self) -> bool:
        return self._outage_since is not None and time.monotonic() < self._probe_after

    def _failed(self, operation: str, exc: BaseException) -> None:
        REDIS_ERRORS.labels(operation).inc()
        now = time.monotonic()
        self._probe_after = now + self.probe_interval
        if self._outage_since is None:
            self._outage_since = now
            log.warning("limiter: Redis unreachable (%s); deciding %s until it answers",
                        _describe(exc), self.outage_policy)

    async def _answered(self) -> None:
        if self._outage_since is None:
            return
        seconds = time.monotonic() - self._outage_since
        self._outage_since = None
        granted = self.local.drain()
        log.warning("limiter: Redis answers again after %.1fs; %d local grants to record",
                    seconds, len(granted))
        if granted and self._epoch:
            await self._record(granted)

    async def _record(self, granted: list[LimitRequest]) -> None:
        """Write grants made during an outage into Redis, unless Redis lost its state meanwhile."""
        try:
            for req in granted:
                await self._eval(self._request_keys(req), self._request_args("record", req))
        except OUTAGE_ERRORS as exc:
            REDIS_ERRORS.labels("record").inc()
            log.warning("limiter: could not record local grants (%s)", _describe(exc))


def _batches(entries: Iterable[RestoredSend], size: int) -> Iterator[list[RestoredSend]]:
    it = iter(entries)
    while batch := list(islice(it, size)):
        yield batch

