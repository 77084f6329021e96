"""The shared limiter seen from outside (issue 14, defects 9, 14, 15, 16).

Real broker, Postgres, Redis and SMTP server. Deliveries are counted at the
SMTP server; the limiter's state is changed only the way production changes it
(its own script, the quota sync, FLUSHDB of a Redis that lost its data).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
import redis
import redis.asyncio as aioredis

from services.ops.arguments import add_ops_arguments
from services.ops.commands import ops_command
from services.pipeline import limiter_demand
from services.pipeline.accounts import load_accounts
from services.pipeline.clock import SystemClock
from services.pipeline.defer_reasons import DeferReason
from services.pipeline.embedded import free_port
from services.pipeline.limiter_keys import LimiterKeys
from services.pipeline.settings import Settings
from services.reconciler.quota_sync import QuotaSync
from services.sender.rate_limit import Limiter, LimitRequest, RestoredSend
from services.sender.send_gate import limit_request
from tests.integration.test_sending_discipline import QuotaProvider, publish, sent_to, start, view
from tests.support.limits import PrivateRedis, with_account
from tests.support.processes import ServiceRunner, run_services
from tests.support.smtp_server import SmtpServer

pytestmark = pytest.mark.integration

SQL = Callable[..., list[tuple]]


def wait_until(what: str, check: Callable[[], bool], services: ServiceRunner | None,
               timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if services is not None:
            services.check_alive()
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}\n{services.logs() if services else ''}")


# --- defect 14: every ops command in every state of the limiter ------------------------------

def _ops(settings: Settings, *argv: str) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="mailer ops")
    add_ops_arguments(parser)
    args = parser.parse_args(list(argv))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = ops_command(args, settings)
    return status, out.getvalue(), err.getvalue()


def _command(campaign_id: str, n: int) -> dict[str, Any]:
    return {"send_id": f"00000000-0000-0000-0000-{n:012d}", "attempt": 1, "account": "default",
            "manager_id": "m1", "campaign_id": campaign_id, "priority": 5,
            "recipient": {"email": f"r{n}@example.com"}}


async def _reserve(settings: Settings, count: int, start_at: int = 0) -> list[bool]:
    limiter = Limiter.from_settings(settings)
    account = load_accounts(settings).get("default")
    assert account is not None
    try:
        granted = []
        for n in range(start_at, start_at + count):
            request = limit_request(account, _command("ops", n), time.time())
            granted.append((await limiter.reserve(request)).granted)
        return granted
    finally:
        await limiter.close()


async def _init_epoch(settings: Settings) -> None:
    limiter = Limiter.from_settings(settings)
    try:
        await limiter.init_epoch()
    finally:
        await limiter.close()


async def _sync_quota(settings: Settings) -> None:
    account = load_accounts(settings).get("default")
    assert account is not None and account.quota is not None
    client = redis.asyncio.Redis.from_url(settings.redis_url)
    try:
        await QuotaSync([account.quota], client, LimiterKeys(settings.redis_key_prefix),
                        SystemClock()).sync_once(account.quota)
    finally:
        await client.aclose()


def test_d14_every_ops_command_answers_in_every_limiter_state(
    settings: Settings, tmp_path: Path, smtp_server: SmtpServer, sql: SQL,
) -> None:
    provider = QuotaProvider(smtp_server, bought=0)
    provider.start()
    settings = with_account(
        settings, tmp_path, hourly_rate=3, daily_limit_per_manager=50,
        quota={"url": provider.url, "interval": 3600, "api_key_env": "NO_SUCH_KEY"},
        warmup={"daily_caps": [4, 8]},
    )
    keys = LimiterKeys(settings.redis_key_prefix)
    plain = redis.Redis.from_url(settings.redis_url)
    sql("INSERT INTO campaigns (campaign_id, manager_id, status, total, pending, started)"
        " VALUES ('ops', 'm1', 'sending', 10, 10, true) RETURNING 1")
    unreachable = replace(settings, redis_url=f"redis://127.0.0.1:{free_port()}/0")

    def _quota(bought: int) -> None:
        provider.bought = bought
        asyncio.run(_sync_quota(settings))

    def lost() -> None:
        for key in plain.scan_iter(match="{" + keys.prefix + "}:*"):
            plain.delete(key)

    steps: list[tuple[str, Callable[[], Any], Settings]] = [
        ("Redis lost (no epoch: rebuilding)", lost, settings),
        ("empty", lambda: asyncio.run(_init_epoch(settings)), settings),
        ("quota synced", lambda: _quota(100), settings),
        ("counting", lambda: asyncio.run(_reserve(settings, 2)), settings),
        ("full window", lambda: asyncio.run(_reserve(settings, 3, 2)), settings),
        ("quota exhausted", lambda: _quota(0), settings),
        ("warm-up cap reached", lambda: plain.set(keys.warmup_cap("default"), 2), settings),
        ("breaker open", lambda: sql(
            "INSERT INTO circuit_breakers (scope, key, consecutive, opened_at)"
            " VALUES ('account', 'default', 10, now()) RETURNING 1"), settings),
        ("Redis unreachable", lambda: None, unreachable),
    ]
    commands = [
        ("campaign", "ops"), ("audit", "ops"), ("stuck",), ("deferred",), ("limiter",),
        ("limiter", "--account", "default"), ("lag",), ("dead-letters",), ("reconcile", "--dry-run"),
        ("pause", "ops", "--actor", "oncall", "--no-wait"),
        ("resume", "ops", "--actor", "oncall", "--no-wait"),
    ]
    # they read no limiter state (Kafka only; pause/resume publish a command): first and last state
    kafka_only = {("lag",), ("dead-letters",), commands[-2], commands[-1]}
    answers: dict[str, dict[str, Any]] = {}
    took: dict[str, float] = {}
    try:
        for i, (state, enter, used) in enumerate(steps):
            enter()
            for command in commands:
                if command in kafka_only and 0 < i < len(steps) - 1:
                    continue
                for as_json in (False, True):
                    began = time.monotonic()
                    argv = [*command, "--json"] if as_json else list(command)
                    try:
                        status, out, err = _ops(used, *argv)
                    except Exception as exc:  # the defect: a traceback instead of an answer
                        raise AssertionError(f"`mailer ops {' '.join(argv)}` crashed in state "
                                             f"{state!r}: {type(exc).__name__}: {exc}") from exc
                    took[" ".join(argv)] = max(took.get(" ".join(argv), 0.0), time.monotonic() - began)
                    assert status in (0, 1), (state, argv, status, err)
                    assert "Traceback" not in out + err, (state, argv, err)
                    if as_json and command[0] in ("limiter", "campaign", "deferred", "stuck"):
                        parsed = orjson.loads(out)
                        if command == ("limiter",):
                            answers[state] = parsed
            sql("UPDATE campaigns SET status = 'sending' WHERE campaign_id = 'ops' RETURNING 1")
    finally:
        provider.stop()
        plain.close()

    print("\nslowest answers:", sorted(took.items(), key=lambda kv: -kv[1])[:4])

    def account(state: str) -> dict[str, Any]:
        return dict(answers[state]["accounts"][0])

    assert answers["Redis lost (no epoch: rebuilding)"]["limiter_state"].startswith("missing")
    assert account("empty")["hour"]["sent"] == 0
    synced = account("quota synced")["quota"]
    assert synced["remaining"] == 100 and synced["synced_at"] is not None
    assert synced["provider"]["emails_available"] == "100"
    assert account("counting")["hour"]["sent"] == 2 and account("counting")["quota"]["remaining"] == 98
    full = account("full window")["hour"]
    assert full["sent"] == 3 and full["limit"] == 3 and full["next_slot_at"] is not None
    assert account("quota exhausted")["quota"]["remaining"] == 0
    assert account("warm-up cap reached")["warmup"] == {"cap": 2, "sent_today": 3}
    assert account("breaker open")["breaker"]["open"] is True
    assert answers["Redis unreachable"]["redis"].startswith("unreachable")
    assert "hour" not in account("Redis unreachable")


@pytest.fixture
def flushable(tmp_path: Path) -> Iterator[PrivateRedis]:
    private = PrivateRedis(tmp_path)
    private.start()
    yield private
    private.stop()


# --- defect 9: Redis returning empty never reopens the hour -----------------------------------

def test_d9_redis_flushed_at_several_moments_of_a_burst_never_reopens_the_hour(
    settings: Settings, tmp_path: Path, smtp_server: SmtpServer, sql: SQL, flushable: PrivateRedis,
) -> None:
    smtp_server.handler.data_delay = 0.01  # a burst of some seconds: flushes land inside it
    settings = replace(settings, redis_url=flushable.url, sender_concurrency=4,
                       limiter_outage_policy="fail_closed")
    settings = with_account(settings, tmp_path, hourly_rate=300)
    client = redis.Redis.from_url(flushable.url)
    epoch = LimiterKeys(settings.redis_key_prefix).epoch()
    flushed_at: list[int] = []
    with run_services(settings, tmp_path / "logs") as services:
        start(services, "planner", "sender", "sender", "reconciler")
        publish(settings, "burst", 1000)
        for moment in (30, 110, 200, 280):
            wait_until(f"{moment} delivered", lambda: len(smtp_server.messages()) >= moment,  # noqa: B023
                       services)
            client.flushdb()  # Redis came back empty: every key gone, the epoch too
            flushed_at.append(len(smtp_server.messages()))
            wait_until("the limiter rebuilt", lambda: bool(client.exists(epoch)), services)
        settled = "SELECT status, count(*) FROM recipients GROUP BY status ORDER BY 1"
        with contextlib.suppress(AssertionError):  # a reopened hour never settles: counted below
            wait_until("every recipient sent or waiting for the hour", lambda: view(
                settings, "burst").get("defer_reason") == "rate_per_hour" and dict(sql(settled)).get(
                "pending", 0) == 0, services, timeout=60)
        time.sleep(3)  # release passes and sender retries: nothing more may get through
        delivered = len(smtp_server.messages())
        parked = view(settings, "burst")
        statuses = sql(settled)
    client.close()
    print(f"\nflushed at {flushed_at} delivered; {delivered} delivered in the hour; {statuses}")
    # never more than the hour's 300; at most the sends in flight at each flush (claimed, not yet
    # granted, counted as placeholders until they come back) less: 2 senders x 4 at a time
    assert 300 - 8 * len(flushed_at) <= delivered <= 300, (flushed_at, delivered)
    assert parked["status"] == "deferred" and parked["defer_reason"] == "rate_per_hour", parked




# --- defect 16: admission into an open window by priority and fair share ----------------------

T0 = 1_760_000_000.0


def _req(campaign: str, priority: int | None, n: int, now: float = T0, rate: int = 60) -> LimitRequest:
    return LimitRequest(token_id=f"{campaign}-{n}:1", account="acc", account_rate=rate, manager_id="m",
                        daily_limit=0, day="2025-10-09", next_day_at=T0 + 40_000, campaign_id=campaign,
                        now=now, priority=priority)


async def _take_all(limiter: Limiter, campaign: str, priority: int, count: int, start_at: int = 0) -> int:
    granted = 0
    for n in range(start_at, start_at + count):
        granted += (await limiter.reserve(_req(campaign, priority, n))).granted
    return granted


async def _register(client: aioredis.Redis, keys: LimiterKeys, *campaigns: tuple[str, int, int]) -> None:
    for campaign, priority, demand in campaigns:
        await limiter_demand.announce(client, keys, "acc", campaign, priority, demand, T0)


async def test_d16_lua_equal_priorities_share_the_open_window_whoever_asks_first(
    redis_client: aioredis.Redis, keys: LimiterKeys,
) -> None:
    limiter = Limiter(redis_client, keys=keys)
    assert await limiter.init_epoch()
    await _register(redis_client, keys, ("a", 5, 100), ("b", 5, 100))
    first = await _take_all(limiter, "a", 5, 100)  # a asks for all of it first
    refused = await limiter.reserve(_req("a", 5, 500))
    second = await _take_all(limiter, "b", 5, 100)
    assert (first, second) == (30, 30)
    assert not refused.granted and refused.reason is DeferReason.RATE_PER_HOUR
    assert refused.retry_at == T0 + limiter.retry_seconds  # re-asked soon: shares move


async def test_d16_lua_higher_priority_takes_the_window_first_and_unused_share_flows(
    redis_client: aioredis.Redis, keys: LimiterKeys,
) -> None:
    limiter = Limiter(redis_client, keys=keys)
    assert await limiter.init_epoch()
    await _register(redis_client, keys, ("low", 5, 100), ("high", 9, 20), ("peer", 5, 10))
    assert await _take_all(limiter, "low", 5, 10) == 0  # high still wants 20
    capacity = await limiter.capacity(_req("low", 5, 999))
    assert capacity.available == 0 and capacity.reason is DeferReason.RATE_PER_HOUR
    assert await _take_all(limiter, "high", 9, 20) == 20  # its demand is spent: it stops competing
    assert await redis_client.hget(keys.demand("acc"), "high") is None
    # low and peer share the 40 left; peer wants only 10, so low gets the other 30
    assert (await limiter.capacity(_req("low", 5, 999))).available == 30
    assert await _take_all(limiter, "low", 5, 100, 100) == 30
    assert await _take_all(limiter, "peer", 5, 100) == 10
    assert (await limiter.capacity(_req("x", None, 0))).available == 0  # the window: 60/60


async def test_d16_lua_a_stale_or_unknown_competitor_blocks_nobody(
    redis_client: aioredis.Redis, keys: LimiterKeys,
) -> None:
    limiter = Limiter(redis_client, keys=keys)
    assert await limiter.init_epoch()
    await redis_client.hset(keys.demand("acc"), "gone", limiter_demand.entry(9, 50, T0 - 1))
    assert await _take_all(limiter, "alone", 5, 70) == 60  # alone in the window: all of it
    assert await _take_all(limiter, "nopriority", 5, 1) == 0  # and no more than the window


async def test_d9_lua_a_restored_placeholder_is_decided_afresh_not_taken_as_a_grant(
    redis_client: aioredis.Redis, keys: LimiterKeys,
) -> None:
    limiter = Limiter(redis_client, keys=keys)
    placeholders = [RestoredSend(token_id=f"c-{n}:1", account="acc", campaign_id="c", manager_id="m",
                                 day="2025-10-09", at=T0 - 10, domain_group=None, counts_warmup=False,
                                 next_day_at=T0 + 40_000) for n in range(60)]
    assert await limiter.restore(placeholders, now=T0)
    assert (await limiter.capacity(_req("c", None, 0))).available == 0
    # a claimed send that had not been granted when Redis lost its state asks now: the window
    # holds its placeholder; it is given back and the send decided afresh (59 others: room for it)
    assert (await limiter.reserve(_req("c", None, 0))).granted
    assert not (await limiter.reserve(_req("c", None, 999))).granted  # 60/60 again
    # a placeholder whose claim was given up is given back; a real grant never is
    assert await limiter.drop_placeholder("c-1:1")
    assert not await limiter.drop_placeholder("c-0:1")  # granted afresh above
    assert not await limiter.drop_placeholder("c-1:1")  # once
    assert (await limiter.capacity(_req("c", None, 0))).available == 1


@pytest.mark.parametrize(("first", "second", "a_moment_later"),
                         [(5, 9, True), (5, 5, True), (5, 5, False)])
def test_d16_two_campaigns_on_one_account_share_the_open_window_by_priority(
    settings: Settings, tmp_path: Path, smtp_server: SmtpServer, first: int, second: int,
    a_moment_later: bool,
) -> None:
    smtp_server.handler.data_delay = 0.05  # about 40 sends a second: the window fills in ~2 s
    settings = replace(settings, sender_concurrency=2)
    settings = with_account(settings, tmp_path, hourly_rate=60)
    with run_services(settings, tmp_path / "logs") as services:
        start(services, "planner", "sender", "reconciler")
        publish(settings, "one", 100, priority=first)
        if a_moment_later:  # the second manager starts while the first campaign is sending
            wait_until("one's first sends", lambda: sent_to(smtp_server, "one") >= 1, services)
        publish(settings, "two", 100, priority=second)
        registry = redis.Redis.from_url(settings.redis_url)
        demand = LimiterKeys(settings.redis_key_prefix).demand("default")
        wait_until("two known to the limiter", lambda: registry.hexists(demand, "two"), services)
        head_start = sent_to(smtp_server, "one")  # what one had when the limiter learnt of two
        registry.close()
        wait_until("the window's 60", lambda: len(smtp_server.messages()) >= 60, services)
        wait_until("both parked", lambda: view(settings, "one").get("status") == "deferred"
                   and view(settings, "two").get("status") == "deferred", services)
        time.sleep(2)  # release passes and retries: the window stays at 60
        got = {c: sent_to(smtp_server, c) for c in ("one", "two")}
        polls = []
        for _ in range(2):  # defect 15: the same state, polled twice, gives the same finish
            polls.append({c: view(settings, c) for c in ("one", "two")})
            time.sleep(1.5)
    finish = {c: datetime.fromisoformat(polls[0][c]["eta"]["finish_at"].replace("Z", "+00:00"))
              for c in ("one", "two")}
    for c in ("one", "two"):
        assert polls[0][c]["eta"] == polls[1][c]["eta"], (c, polls[0][c]["eta"], polls[1][c]["eta"])
        assert polls[0][c]["next_run_at"] is not None
        assert finish[c] >= datetime.fromisoformat(polls[0][c]["next_run_at"].replace("Z", "+00:00"))
    if second > first:  # one waits behind two's 40-odd: its last sends go an hour after two's
        assert finish["one"] - finish["two"] >= timedelta(minutes=59), finish
    print(f"\npriorities {first}/{second}, one had {head_start} when the limiter learnt of two: "
          f"first hour {got}")
    assert got["one"] + got["two"] == 60
    in_flight = 4  # sends of one granted but not yet delivered then (2 at a time) and polling
    if second > first:  # the priority-9 campaign gets what was left of the window
        assert got["two"] >= 60 - head_start - in_flight, got
    else:  # equal priorities: the window's 60 about half each
        assert abs(got["one"] - got["two"]) <= 6, got


async def test_d16_the_reconciler_registry_counts_what_needs_the_window_and_drops_who_stopped(
    database_url: str, redis_client: aioredis.Redis, keys: LimiterKeys,
) -> None:
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await conn.execute(
            "INSERT INTO campaigns (campaign_id, account, priority, status, pending) VALUES"
            " ('high', 'acc', 9, 'sending', 20), ('low', 'acc', 5, 'sending', 100),"
            " ('paused', 'acc', 7, 'paused', 50), ('done', 'acc', 5, 'completed', 0)")
        for n, reason in enumerate(["rate_per_hour"] * 3 + ["campaign_rate"] * 5 + ["transient_error"]):
            await conn.execute(
                "INSERT INTO parked_sends (send_id, campaign_id, account, priority, queued_at, reason,"
                " due_at, command, parked_at) VALUES (%s, 'low', 'acc', 5, now(), %s, now(), '\\x00',"
                " now())", (f"00000000-0000-0000-0000-{n:012d}", reason))
        await limiter_demand.announce(redis_client, keys, "acc", "done", 5, 10, T0)  # it finished
        await limiter_demand.announce(redis_client, keys, "acc", "new", 5, 30, T0)  # not projected yet
        await limiter_demand.refresh(conn, redis_client, keys, ["acc"], T0)
    registry = await redis_client.hgetall(keys.demand("acc"))
    until = T0 + limiter_demand.HOLD_SECONDS
    assert registry == {
        "high": limiter_demand.entry(9, 20, until),
        "low": limiter_demand.entry(5, 100 - 6, until),  # its own rate and a retry hold 6 back
        "new": limiter_demand.entry(5, 30, until),
    }
