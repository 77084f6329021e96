"""The shared limiter against a real Redis: exact windows, every limit, refunds, restore, outages.

Every test works under its own key prefix and deletes its keys afterwards. Times
are fake clock values passed in `now`; nothing sleeps for the windows.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import os
from collections.abc import Iterator
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from services.pipeline.defer_reasons import DeferReason
from services.pipeline.limiter_keys import LimiterKeys
from services.pipeline.settings import Settings
from services.sender.rate_limit import (
    UNLIMITED,
    Capacity,
    Decision,
    Limiter,
    LimitRequest,
    RestoredSend,
    token_key,
)

pytestmark = pytest.mark.integration

T0 = 1_760_000_000.25  # clock time the tests start at
DAY = "2025-10-09"
NEXT_DAY = T0 + 40_000.0  # the next local midnight
UNREACHABLE = "redis://:s3cret-pass@127.0.0.1:1/0"

_tokens = itertools.count()


def request(**fields: Any) -> LimitRequest:
    """A request of account `acc`, 100/h, no daily limit, at T0; `fields` override."""
    base: dict[str, Any] = {
        "token_id": f"send-{next(_tokens)}:1", "account": "acc", "account_rate": 100, "manager_id": "m1",
        "daily_limit": 0, "day": DAY, "next_day_at": NEXT_DAY, "campaign_id": "c1", "now": T0,
    }
    base.update(fields)
    return LimitRequest(**base)


@pytest.fixture
def client(redis_client: aioredis.Redis) -> aioredis.Redis:
    """The test Redis (strings decoded)."""
    return redis_client


@pytest.fixture
async def limiter(client: aioredis.Redis, keys: LimiterKeys) -> Limiter:
    """A limiter whose state is initialised (epoch set)."""
    lim = Limiter(client, keys=keys)
    assert await lim.init_epoch()
    return lim


async def grant_all(limiter: Limiter, reqs: list[LimitRequest]) -> None:
    for req in reqs:
        decision = await limiter.reserve(req)
        assert decision.granted, (req, decision)


# --- the sliding window ---------------------------------------------------------------------


async def test_sliding_window_is_exact_at_its_boundaries(limiter: Limiter) -> None:
    times = [T0 + i * 0.37 for i in range(100)]
    await grant_all(limiter, [request(now=t) for t in times])

    refused = await limiter.reserve(request(now=T0 + 100.0))
    assert (refused.granted, refused.reason) == (False, DeferReason.RATE_PER_HOUR)
    assert refused.retry_at == times[0] + 3600.0
    assert not refused.degraded

    almost = await limiter.reserve(request(now=times[0] + 3600.0 - 0.001))
    assert not almost.granted
    assert (await limiter.reserve(request(now=times[0] + 3600.0))).granted
    again = await limiter.reserve(request(now=times[0] + 3600.0))
    assert (again.granted, again.retry_at) == (False, times[1] + 3600.0)


def _hammer(url: str, prefix: str, attempts: int, start: Any, results: Any) -> None:
    results.put(asyncio.run(_hammer_async(url, prefix, attempts, start)))


async def _hammer_async(url: str, prefix: str, attempts: int, start: Any) -> int:
    client = aioredis.Redis.from_url(url)
    limiter = Limiter(client, keys=LimiterKeys(prefix))
    gate = asyncio.Semaphore(32)
    pid = os.getpid()

    async def one(i: int) -> bool:
        async with gate:
            return (await limiter.reserve(request(token_id=f"{pid}:{i}", now=T0 + i * 0.001))).granted

    await limiter.reserve(request(token_id=f"{pid}:warm", now=T0 - 7200.0))  # out of the race's window
    await asyncio.to_thread(start.wait)
    granted = sum(await asyncio.gather(*(one(i) for i in range(attempts))))
    await limiter.close()
    return granted


async def test_three_processes_share_one_limit_exactly(
    redis_url: str, client: aioredis.Redis, keys: LimiterKeys, limiter: Limiter
) -> None:
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Barrier(3), ctx.Queue()
    args = (redis_url, keys.prefix, 150, start, results)
    procs = [ctx.Process(target=_hammer, args=args) for _ in range(3)]
    for proc in procs:
        proc.start()
    granted = [await asyncio.to_thread(results.get, True, 120) for _ in procs]
    for proc in procs:
        proc.join(10)
        assert proc.exitcode == 0
    assert sum(granted) == 100
    assert await client.zcard(keys.account_rate("acc")) == 100


# --- every limit ----------------------------------------------------------------------------


async def test_daily_limit_and_day_rollover(limiter: Limiter, client: aioredis.Redis,
                                            keys: LimiterKeys) -> None:
    base = request(account_rate=0, daily_limit=3)
    await grant_all(limiter, [replace(base, token_id=f"d{i}", now=T0 + i) for i in range(3)])
    refused = await limiter.reserve(replace(base, token_id="d3", now=T0 + 10))
    assert (refused.reason, refused.retry_at) == (DeferReason.DAILY_LIMIT, NEXT_DAY)
    other = await limiter.reserve(replace(base, token_id="o1", manager_id="m2"))
    assert other.granted

    ttl = await client.ttl(keys.daily("acc", "m1", DAY))
    assert NEXT_DAY - T0 + 86400 - 5 <= ttl <= NEXT_DAY - T0 + 86400 + 1
    tomorrow = replace(base, token_id="d4", day="2025-10-10", now=NEXT_DAY,
                       next_day_at=NEXT_DAY + 86400)
    assert (await limiter.reserve(tomorrow)).granted


async def test_quota_decrements_and_refund_gives_back_once(
    limiter: Limiter, client: aioredis.Redis, keys: LimiterKeys
) -> None:
    unknown = await limiter.reserve(request(quota_enforced=True))
    assert (unknown.reason, unknown.retry_at) == (DeferReason.QUOTA_UNKNOWN, T0 + 5.0)

    await client.set(keys.quota("acc"), 2)
    first, second = request(quota_enforced=True), request(quota_enforced=True, now=T0 + 1)
    await grant_all(limiter, [first, second])
    assert await client.get(keys.quota("acc")) == "0"
    exhausted = await limiter.reserve(request(quota_enforced=True, now=T0 + 2))
    assert (exhausted.reason, exhausted.retry_at) == (DeferReason.QUOTA_EXHAUSTED, T0 + 7.0)

    await limiter.refund(second)
    assert await client.get(keys.quota("acc")) == "1"
    assert await client.zcard(keys.account_rate("acc")) == 1
    assert not await client.exists(token_key(keys, second.token_id))
    await limiter.refund(second)
    await limiter.refund(request(quota_enforced=True))  # never reserved
    assert await client.get(keys.quota("acc")) == "1"
    assert await client.zcard(keys.account_rate("acc")) == 1


async def test_refund_gives_back_rate_and_day_counters(limiter: Limiter) -> None:
    reqs = [request(account_rate=2, daily_limit=2, now=T0 + i) for i in range(2)]
    await grant_all(limiter, reqs)
    assert not (await limiter.reserve(request(account_rate=2, daily_limit=2, now=T0 + 5))).granted
    await limiter.refund(reqs[0])
    await limiter.refund(reqs[0])
    assert (await limiter.reserve(request(account_rate=2, daily_limit=2, now=T0 + 6))).granted
    assert not (await limiter.reserve(request(account_rate=2, daily_limit=2, now=T0 + 7))).granted


async def test_a_retried_reserve_takes_nothing_more(limiter: Limiter, client: aioredis.Redis,
                                                    keys: LimiterKeys) -> None:
    req = request(account_rate=5)
    assert (await limiter.reserve(req)).granted
    assert (await limiter.reserve(req)).granted
    assert await client.zcard(keys.account_rate("acc")) == 1


async def test_campaign_override(limiter: Limiter) -> None:
    await grant_all(limiter, [request(campaign_rate=3, now=T0 + i) for i in range(3)])
    refused = await limiter.reserve(request(campaign_rate=3, now=T0 + 9))
    assert (refused.reason, refused.retry_at) == (DeferReason.CAMPAIGN_RATE, T0 + 3600)
    assert (await limiter.reserve(request(campaign_id="c2", campaign_rate=3, now=T0 + 9))).granted


async def test_domain_group_throttle(limiter: Limiter) -> None:
    gmail = {"domain_group": "gmail", "domain_rate": 2}
    await grant_all(limiter, [request(**gmail, now=T0 + i) for i in range(2)])
    refused = await limiter.reserve(request(**gmail, now=T0 + 5))
    assert (refused.reason, refused.retry_at) == (DeferReason.DOMAIN_THROTTLE, T0 + 3600)
    assert (await limiter.reserve(request(domain_group="yahoo", domain_rate=2, now=T0 + 5))).granted
    assert (await limiter.reserve(request(now=T0 + 5))).granted
    capacity = await limiter.capacity(request(**gmail, now=T0 + 6))
    assert capacity == Capacity(100 - 4, None, None)  # domain throttles are not counted


async def test_warmup_cap_default_and_from_the_warmcap_key(
    limiter: Limiter, client: aioredis.Redis, keys: LimiterKeys
) -> None:
    await grant_all(limiter, [request(warmup_cap=2, manager_id=f"m{i}") for i in range(2)])
    refused = await limiter.reserve(request(warmup_cap=2, manager_id="m9"))
    assert (refused.reason, refused.retry_at) == (DeferReason.WARMUP_CAP, NEXT_DAY)
    await client.set(keys.warmup_cap("acc"), 3)
    assert (await limiter.reserve(request(warmup_cap=2))).granted
    assert (await limiter.reserve(request(warmup_cap=2))).reason == DeferReason.WARMUP_CAP
    assert (await limiter.reserve(request(warmup_cap=2, day="2025-10-10"))).granted


async def test_the_latest_retry_wins_when_two_limits_refuse(limiter: Limiter) -> None:
    await grant_all(limiter, [request(account_rate=1, daily_limit=1)])
    both = await limiter.reserve(request(account_rate=1, daily_limit=1, now=T0 + 1))
    assert (both.reason, both.retry_at) == (DeferReason.DAILY_LIMIT, NEXT_DAY)
    soon = await limiter.reserve(request(account_rate=1, daily_limit=1, now=T0 + 1, next_day_at=T0 + 100))
    assert (soon.reason, soon.retry_at) == (DeferReason.RATE_PER_HOUR, T0 + 3600)


async def test_adaptive_factor_halves_the_limit_and_recovers_to_one(
    limiter: Limiter, client: aioredis.Redis, keys: LimiterKeys
) -> None:
    assert await limiter.feedback("acc", "gmail", slow_down=True) == 0.5
    assert await client.get(keys.adaptive("acc", "gmail")) is not None
    await grant_all(limiter, [request(account_rate=10, now=T0 + i) for i in range(5)])
    refused = await limiter.reserve(request(account_rate=10, now=T0 + 9))
    assert (refused.reason, refused.factor) == (DeferReason.RATE_PER_HOUR, 0.5)

    factors = [await limiter.feedback("acc", "gmail", slow_down=False) for _ in range(10)]
    assert factors[-1] == 1.0 and factors[-2] < 1.0
    assert not await client.exists(keys.adaptive("acc"), keys.adaptive("acc", "gmail"))
    assert (await limiter.reserve(request(account_rate=10, now=T0 + 10))).factor == 1.0
    for _ in range(10):
        factor = await limiter.feedback("acc", None, slow_down=True)
    assert factor == 0.1


async def test_capacity(limiter: Limiter, client: aioredis.Redis, keys: LimiterKeys) -> None:
    await client.set(keys.quota("acc"), 7)
    req = request(account_rate=10, daily_limit=4, quota_enforced=True)
    assert await limiter.capacity(req) == Capacity(4, None, None)
    await grant_all(limiter, [replace(req, token_id=f"k{i}", now=T0 + i) for i in range(4)])
    assert await limiter.capacity(replace(req, now=T0 + 5)) == Capacity(0, DeferReason.DAILY_LIMIT, NEXT_DAY)
    assert (await limiter.capacity(request(account_rate=0))).available == UNLIMITED
    assert (await limiter.capacity(request(account_rate=6, now=T0 + 5))).available == 2
    full = await limiter.capacity(request(account_rate=4, now=T0 + 5))
    assert full == Capacity(0, DeferReason.RATE_PER_HOUR, T0 + 3600)
    await client.delete(keys.epoch())
    assert await limiter.capacity(req) == Capacity(0, DeferReason.LIMITER_UNAVAILABLE, T0 + 5.0)


async def test_noscript_after_script_flush_reloads(limiter: Limiter, client: aioredis.Redis) -> None:
    assert (await limiter.reserve(request())).granted
    await client.script_flush()
    assert (await limiter.reserve(request())).granted
    assert (await limiter.capacity(request())).available == 98


# --- restore --------------------------------------------------------------------------------


def _restored(n: int, at: float, **fields: Any) -> RestoredSend:
    base: dict[str, Any] = {
        "token_id": f"r{n}:1", "account": "acc", "campaign_id": "c1", "manager_id": "m1", "day": DAY,
        "at": at, "domain_group": None, "counts_warmup": False, "next_day_at": NEXT_DAY,
    }
    base.update(fields)
    return RestoredSend(**base)


async def test_missing_epoch_refuses_until_restored(client: aioredis.Redis, keys: LimiterKeys) -> None:
    limiter = Limiter(client, keys=keys)
    assert await limiter.needs_restore()
    lost = await limiter.reserve(request())
    assert (lost.granted, lost.reason, lost.retry_at) == (False, DeferReason.LIMITER_UNAVAILABLE, T0 + 5.0)

    entries = [
        _restored(0, T0 - 100, domain_group="gmail", counts_warmup=True),
        _restored(1, T0 - 200),
        _restored(2, T0 - 3000, counts_warmup=True),
        _restored(3, T0 - 4000),  # out of the window: counts for the day only
        _restored(4, T0 - 90000, day="2025-10-08", next_day_at=T0 - 50000),  # a day that is over
    ]
    assert await limiter.restore(entries, now=T0)
    assert not await limiter.needs_restore()
    assert not await limiter.restore(entries, now=T0)

    assert await client.zcard(keys.account_rate("acc")) == 3
    assert await client.zcard(keys.domain_rate("acc", "gmail")) == 1
    assert await client.get(keys.daily("acc", "m1", DAY)) == "4"
    assert await client.get(keys.warmup_daily("acc", DAY)) == "2"
    assert not await client.exists(keys.daily("acc", "m1", "2025-10-08"))
    assert (await limiter.reserve(request(account_rate=4))).granted
    refused = await limiter.reserve(request(account_rate=4, now=T0 + 1))
    assert (refused.reason, refused.retry_at) == (DeferReason.RATE_PER_HOUR, T0 - 3000 + 3600)


async def test_racing_and_restarted_restores_count_each_send_once(
    client: aioredis.Redis, keys: LimiterKeys
) -> None:
    entries = [_restored(i, T0 - i) for i in range(1200)]

    def broken() -> Iterator[RestoredSend]:
        yield from entries[:700]
        raise RuntimeError("reconciler died")

    crashed = Limiter(client, keys=keys)
    with pytest.raises(RuntimeError):
        await crashed.restore(broken(), now=T0)
    assert await crashed.needs_restore()
    assert await client.zcard(keys.account_rate("acc")) == 500  # the first batch made it

    one, two = Limiter(client, keys=keys), Limiter(client, keys=keys)
    done = await asyncio.gather(one.restore(entries, now=T0), two.restore(entries, now=T0))
    assert sorted(done) == [False, True]
    assert await client.zcard(keys.account_rate("acc")) == 1200
    assert await client.get(keys.daily("acc", "m1", DAY)) == "1200"


# --- outages --------------------------------------------------------------------------------


def _errors(operation: str) -> float:
    return REGISTRY.get_sample_value("mailer_redis_errors_total", {"operation": operation}) or 0.0


async def test_fail_closed_when_redis_is_unreachable(caplog: pytest.LogCaptureFixture) -> None:
    settings = replace(Settings(), redis_url=UNREACHABLE, redis_key_prefix="rltest-down")
    limiter = Limiter.from_settings(settings)
    limiter.probe_interval = 0.0  # try Redis again at every call
    before = _errors("reserve")
    with caplog.at_level(logging.INFO, logger="services.sender.rate_limit"):
        decision = await limiter.reserve(request())
        again = await limiter.reserve(request(now=T0 + 1))
        await limiter.refund(request())
        assert await limiter.feedback("acc", None, slow_down=True) == 1.0
        capacity = await limiter.capacity(request())
    assert decision == Decision(False, DeferReason.LIMITER_UNAVAILABLE, T0 + 5.0, degraded=True)
    assert (again.granted, again.reason, again.degraded) == (False, DeferReason.LIMITER_UNAVAILABLE, True)
    assert capacity == Capacity(0, DeferReason.LIMITER_UNAVAILABLE, T0 + 5.0)
    assert _errors("reserve") == before + 2
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "unreachable" in warnings[0].getMessage()
    assert "s3cret" not in caplog.text
    await limiter.close()


async def test_local_share_grants_one_nth_of_each_limit() -> None:
    settings = replace(Settings(), redis_url=UNREACHABLE, limiter_outage_policy="local_share",
                       sender_instances=3)
    limiter = Limiter.from_settings(settings)
    decisions = [await limiter.reserve(request(now=T0 + i)) for i in range(40)]
    assert [d.granted for d in decisions] == [True] * 33 + [False] * 7
    assert all(d.degraded for d in decisions)
    assert (decisions[33].reason, decisions[33].retry_at) == (DeferReason.RATE_PER_HOUR, T0 + 3600)
    assert (await limiter.reserve(request(now=T0 + 3600))).granted
    daily = [(await limiter.reserve(request(account="b", daily_limit=7))).granted for _ in range(3)]
    assert daily == [True, True, False]
    assert (await limiter.reserve(request(account="c", daily_limit=2))).reason == DeferReason.DAILY_LIMIT
    assert (await limiter.reserve(request(account="d", quota_enforced=True))).reason \
        == DeferReason.QUOTA_UNKNOWN
    assert (await limiter.capacity(request(account="b", daily_limit=7))).available == 0
    await limiter.close()


class _Proxy:
    """A TCP proxy in front of Redis that a test cuts and restores: a real outage."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        self._writers.clear()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self._writers += [writer, up_writer]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


async def test_local_share_uses_the_last_quota_seen_and_records_grants_on_recovery(
    redis_url: str, client: aioredis.Redis, keys: LimiterKeys, caplog: pytest.LogCaptureFixture
) -> None:
    url = urlsplit(redis_url)
    proxy = _Proxy(url.hostname or "127.0.0.1", url.port or 6379)
    await proxy.start()
    netloc = url.netloc.rpartition("@")[0]
    proxied = urlunsplit(url._replace(netloc=(netloc + "@" if netloc else "") + f"127.0.0.1:{proxy.port}"))
    limiter = Limiter(aioredis.Redis.from_url(proxied, socket_timeout=2, retry=None), keys=keys,
                      outage_policy="local_share", instances=3, probe_interval=0.0)
    assert await limiter.init_epoch()
    await client.set(keys.quota("acc"), 30)
    with caplog.at_level(logging.WARNING, logger="services.sender.rate_limit"):
        assert (await limiter.reserve(request(quota_enforced=True))).granted  # sees 29 left

        await proxy.stop()
        reqs = [request(quota_enforced=True, now=T0 + 1 + i) for i in range(12)]
        local = [await limiter.reserve(req) for req in reqs]
        assert [d.granted for d in local] == [True] * 9 + [False] * 3  # floor(29 / 3)
        assert local[-1].reason == DeferReason.QUOTA_EXHAUSTED and local[-1].degraded
        await limiter.refund(reqs[0])  # a local grant is given back locally
        assert (await limiter.reserve(request(quota_enforced=True, now=T0 + 15))).granted

        await proxy.start()
        back = await limiter.reserve(request(quota_enforced=True, now=T0 + 20))
    assert back.granted and not back.degraded
    assert await client.get(keys.quota("acc")) == str(30 - 1 - 9 - 1)
    assert await client.zcard(keys.account_rate("acc")) == 11
    messages = [r.getMessage() for r in caplog.records]
    assert sum("unreachable" in m for m in messages) == 1
    assert sum("answers again" in m for m in messages) == 1
    await limiter.close()
    await proxy.stop()
