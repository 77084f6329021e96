"""Parked sends, campaign queue state and the release of due sends (R5, R9, R20).

Real Postgres for every test; the Releaser also talks to a real Redis under a
key prefix of its own (deleted afterwards). The Releaser's producer is a fake
that records what it was asked to produce: the Releaser only calls
`produce_all`.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import orjson
import psycopg
import pytest
import redis.asyncio as aioredis

from services.pipeline.accounts import Accounts, load_accounts
from services.pipeline.clock import SystemClock
from services.pipeline.contract import Message, iso, validate
from services.pipeline.db import open_pool
from services.pipeline.defer_reasons import DeferReason, UnknownDeferReason
from services.pipeline.producer import AsyncProducer
from services.pipeline.publish import campaign_messages, lifecycle_message
from services.pipeline.settings import Settings
from services.pipeline.topics import Topic
from services.reconciler import deferrals, projections, status_events
from services.reconciler.projections import StatusChange
from services.reconciler.release import Releaser
from services.sender.deferral import parked_outcome
from services.sender.rate_limit import Limiter
from services.sender.send_gate import limit_request
from tests.support.campaigns import campaign, outcome, recipients, send_email

pytestmark = pytest.mark.integration

SQL = Callable[..., list[tuple]]
STATUS_TOPIC = "status-topic"
SEND_TOPIC = "send-topic"
SETTINGS = Settings()
ACCOUNTS = load_accounts(SETTINGS)
T = datetime(2026, 3, 2, 10, 0, tzinfo=UTC)  # a fixed clock time for the pure-Postgres tests


def minutes(n: float) -> timedelta:
    return timedelta(minutes=n)


# --- building campaigns, outcomes and transactions ----------------------------------------


@contextlib.asynccontextmanager
async def transaction(url: str) -> AsyncIterator[psycopg.AsyncConnection]:
    async with await psycopg.AsyncConnection.connect(url) as conn, conn.transaction():
        yield conn


async def start_campaign(url: str, campaign_id: str, n: int, *, priority: int = 5) -> list[dict[str, Any]]:
    """A sending campaign with `n` pending recipients in the projections."""
    people = recipients(n, domain=f"{campaign_id}.example.com")
    async with transaction(url) as conn:
        messages = campaign_messages(campaign(campaign_id, priority=priority), people)
        changes, touched = await projections.apply_commands(conn, messages, ACCOUNTS)
        changes += await projections.refresh_campaigns(conn, touched)
        await status_events.record(conn, changes, STATUS_TOPIC)
    return people


async def lifecycle(url: str, kind: str, campaign_id: str) -> list[StatusChange]:
    async with transaction(url) as conn:
        command = lifecycle_message(kind, campaign_id, "manager-7", None)
        changes, touched = await projections.apply_commands(conn, [command], ACCOUNTS)
        changes += await projections.refresh_campaigns(conn, touched)
        changes += await deferrals.refresh_queue_state(conn, touched)
        await status_events.record(conn, changes, STATUS_TOPIC)
    return changes


def deferred(
    campaign_id: str, person: dict[str, Any], reason: DeferReason, until: datetime, *,
    at: datetime | None = None, priority: int = 5, queued_at: datetime | None = None,
) -> Message:
    """The sender's `outcome.deferred` for one recipient (`at`: its occurred_at)."""
    extra: dict[str, Any] = {"priority": priority}
    if queued_at is not None:
        extra["queued_at"] = iso(queued_at)
    command = send_email(person, campaign_id=campaign_id, **extra)
    message = parked_outcome(command, SETTINGS, reason, until, time.monotonic())
    if at is not None:
        message["occurred_at"] = iso(at)
    return validate(message, Topic.SEND_OUTCOMES)


async def park(url: str, outcomes: list[Message]) -> set[str]:
    """What the reconciler does with a batch of outcomes, without the queue state."""
    async with transaction(url) as conn:
        await projections.apply_outcomes(conn, outcomes)
        return await deferrals.park(conn, outcomes)


async def refresh(url: str, campaign_ids: Iterable[str], *, record: bool = True) -> list[StatusChange]:
    async with transaction(url) as conn:
        changes = await deferrals.refresh_queue_state(conn, campaign_ids)
        if record:
            await status_events.record(conn, changes, STATUS_TOPIC)
    return changes


def write(sql: SQL, statement: str, *params: object) -> int:
    """Run a statement that returns no rows (the `sql` fixture fetches); how many it touched."""
    return len(sql(f"{statement} RETURNING 1", *params))


def queue_state(sql: SQL, campaign_id: str) -> tuple[str, datetime | None]:
    rows = sql("SELECT defer_reason, deferred_until FROM campaigns WHERE campaign_id = %s", campaign_id)
    return rows[0][0], rows[0][1]


def parked(sql: SQL, send_id: str) -> tuple:
    return sql(
        "SELECT reason, due_at, priority, queued_at, parked_at, released_at, command"
        " FROM parked_sends WHERE send_id = %s", send_id,
    )[0]


# --- 1. constraints ----------------------------------------------------------------------


def test_deferral_columns_only_take_known_reasons(sql: SQL) -> None:
    write(sql, "INSERT INTO campaigns (campaign_id, status) VALUES ('k1', 'sending')")
    with pytest.raises(psycopg.errors.CheckViolation) as no_reason:
        write(sql, "UPDATE campaigns SET deferred_until = now() WHERE campaign_id = 'k1'")
    assert no_reason.value.diag.constraint_name == "campaigns_deferral_has_reason"
    with pytest.raises(psycopg.errors.CheckViolation) as bogus:
        write(sql, "UPDATE campaigns SET defer_reason = 'bogus', deferred_until = now()"
            " WHERE campaign_id = 'k1'")
    assert bogus.value.diag.constraint_name == "campaigns_defer_reason_known"
    with pytest.raises(psycopg.errors.CheckViolation):
        write(sql, "INSERT INTO parked_sends (send_id, campaign_id, account, priority, queued_at, reason,"
            " due_at, command, parked_at) VALUES (%s, 'k1', 'default', 5, now(), 'bogus', now(),"
            " '\\x7b7d', now())", str(uuid.uuid4()))
    # every known reason is accepted by both tables
    for reason in DeferReason:
        write(sql, "UPDATE campaigns SET defer_reason = %s, deferred_until = now() WHERE campaign_id = 'k1'",
            reason.value)
        write(sql, "INSERT INTO parked_sends (send_id, campaign_id, account, priority, queued_at, reason,"
            " due_at, command, parked_at) VALUES (%s, 'k1', 'default', 5, now(), %s, now(),"
            " '\\x7b7d', now())", str(uuid.uuid4()), reason.value)
    assert sql("SELECT count(*) FROM parked_sends") == [(len(DeferReason),)]


# --- 2. park() ---------------------------------------------------------------------------


async def test_park_keeps_the_newest_deferral_of_each_send(database_url: str, sql: SQL) -> None:
    people = await start_campaign(database_url, "p1", 2)
    queued = T - minutes(30)
    first = deferred("p1", people[0], DeferReason.RATE_PER_HOUR, T + minutes(10), at=T,
                     priority=7, queued_at=queued)
    sid = first["send_id"]
    assert await park(database_url, [first]) == {"p1"}
    row = parked(sql, sid)
    assert row[:6] == ("rate_per_hour", T + minutes(10), 7, queued, T, None)
    assert orjson.loads(bytes(row[6])) == first["command"]

    await park(database_url, [first])  # a replay changes nothing
    assert parked(sql, sid) == row

    older = deferred("p1", people[0], DeferReason.OUTSIDE_HOURS, T + minutes(90), at=T - minutes(1),
                     priority=7, queued_at=queued)
    await park(database_url, [older])  # an older deferral arriving late changes nothing
    assert parked(sql, sid) == row

    newer = deferred("p1", people[0], DeferReason.DAILY_LIMIT, T + minutes(60), at=T + minutes(1),
                     priority=7, queued_at=queued)
    await park(database_url, [newer])
    assert parked(sql, sid)[:6] == ("daily_limit", T + minutes(60), 7, queued, T + minutes(1), None)

    # released: a replay of the deferral it was parked for does not bring it back ...
    write(sql, "UPDATE parked_sends SET released_at = %s WHERE send_id = %s", T + minutes(60), sid)
    await park(database_url, [newer, first])
    assert parked(sql, sid)[4:6] == (T + minutes(1), T + minutes(60))
    # ... a newer deferral (the released send was refused again) parks it again
    again = deferred("p1", people[0], DeferReason.TRANSIENT_ERROR, T + minutes(75), at=T + minutes(61),
                     priority=7, queued_at=queued)
    await park(database_url, [again])
    assert parked(sql, sid)[:6] == ("transient_error", T + minutes(75), 7, queued, T + minutes(61), None)
    assert sql("SELECT count(*) FROM parked_sends") == [(1,)]


async def test_park_ignores_other_outcomes_and_rejects_unknown_reasons(
    database_url: str, sql: SQL
) -> None:
    people = await start_campaign(database_url, "p2", 2)
    sent = outcome("outcome.sent", "p2", people[1]["email"], 250, "2.0.0 Ok")
    assert await park(database_url, [sent]) == set()
    good = deferred("p2", people[0], DeferReason.RATE_PER_HOUR, T + minutes(5), at=T)
    bogus = {**good, "defer_reason": "bogus"}  # built by hand: no schema would let it through
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        with pytest.raises(UnknownDeferReason, match="bogus"):
            async with conn.transaction():
                await deferrals.park(conn, [good, bogus])
    assert sql("SELECT count(*) FROM parked_sends") == [(0,)]  # nothing of the batch stored


# --- 3. refresh_queue_state() ------------------------------------------------------------


async def test_queue_state_follows_the_earliest_parked_send(database_url: str, sql: SQL) -> None:
    people = await start_campaign(database_url, "q1", 3)
    await park(database_url, [
        deferred("q1", people[0], DeferReason.RATE_PER_HOUR, T + minutes(10), at=T),
        deferred("q1", people[1], DeferReason.RATE_PER_HOUR, T + minutes(20), at=T),
    ])
    [change] = await refresh(database_url, ["q1"])
    assert (change.campaign_id, change.before, change.after, change.actor, change.action) == (
        "q1", "sending", "deferred", "system", "defer")
    assert change.announce
    assert (change.defer_reason, change.deferred_until) == ("rate_per_hour", T + minutes(10))
    assert change.reason.startswith("Reached the hourly sending limit.")  # the manager's texts (D17)
    assert change.reason_ru.startswith("Достигнут часовой лимит отправки.")
    assert queue_state(sql, "q1") == ("rate_per_hour", T + minutes(10))
    [(entered,)] = sql("SELECT deferred_at FROM campaigns")
    assert entered is not None

    assert await refresh(database_url, ["q1"]) == []  # nothing new: nothing to say

    # the earliest row moves later under the same reason: the time follows, no announcement
    await park(database_url, [
        deferred("q1", people[0], DeferReason.RATE_PER_HOUR, T + minutes(30), at=T + minutes(1))])
    assert await refresh(database_url, ["q1"]) == []
    assert queue_state(sql, "q1") == ("rate_per_hour", T + minutes(20))

    # another reason becomes the earliest: a new deferral to announce
    await park(database_url, [
        deferred("q1", people[1], DeferReason.OUTSIDE_HOURS, T + minutes(15), at=T + minutes(2))])
    [change] = await refresh(database_url, ["q1"])
    assert (change.before, change.after, change.defer_reason, change.deferred_until, change.announce) == (
        "deferred", "deferred", "outside_hours", T + minutes(15), True)
    assert queue_state(sql, "q1") == ("outside_hours", T + minutes(15))
    assert sql("SELECT deferred_at FROM campaigns") == [(entered,)]  # still the same deferral

    # back to the first reason: the CRM last read outside_hours, so it is told (issue 14)
    await park(database_url, [
        deferred("q1", people[1], DeferReason.RATE_PER_HOUR, T + minutes(10), at=T + minutes(3))])
    [change] = await refresh(database_url, ["q1"])
    assert (change.before, change.after, change.defer_reason, change.deferred_until, change.announce) == (
        "deferred", "deferred", "rate_per_hour", T + minutes(10), True)
    assert queue_state(sql, "q1") == ("rate_per_hour", T + minutes(10))
    assert sql("SELECT action, before_status, after_status FROM audit_log ORDER BY id") == [
        ("start", None, "sending"), ("defer", "sending", "deferred"),
        ("defer", "deferred", "deferred"), ("defer", "deferred", "deferred")]
    assert sql("SELECT count(*) FROM outbox") == [(4,)]  # start and the three deferrals
    # the same deferral once more (as a replay would decide it): announced once only
    async with transaction(database_url) as conn:
        await status_events.record(conn, [change], STATUS_TOPIC)
    assert sql("SELECT count(*) FROM outbox") == [(4,)]

    # released: the sends are on their way, the recipients still wait; the state stands
    write(sql, "UPDATE parked_sends SET released_at = %s", T + minutes(30))
    assert await refresh(database_url, ["q1"]) == []
    assert queue_state(sql, "q1") == ("rate_per_hour", T + minutes(10))

    # they landed: nobody waits any more, the deferral is over: announced, deferred -> sending (D17)
    async with transaction(database_url) as conn:
        await projections.apply_outcomes(conn, [
            outcome("outcome.sent", "q1", p["email"], 250, "Ok", attempt=1) for p in people[:2]])
    [change] = await refresh(database_url, ["q1"])
    assert (change.before, change.after, change.action, change.announce) == (
        "deferred", "sending", "deferral_over", True)
    assert (change.defer_reason, change.deferred_until) == ("", None)
    assert change.reason and change.reason_ru
    assert sql("SELECT defer_reason, deferred_until, deferred_at, status FROM campaigns") == [
        ("", None, None, "sending")]
    assert await refresh(database_url, ["q1"]) == []
    assert sql("SELECT count(*) FROM outbox") == [(5,)]
    [(payload,)] = sql("SELECT payload FROM outbox ORDER BY id DESC LIMIT 1")
    event = validate(orjson.loads(bytes(payload)), Topic.CAMPAIGN_STATUS)
    assert (event["previous_status"], event["status"], event["sequence"]) == ("deferred", "sending", 5)


async def test_queue_state_ignores_unknown_and_untouched_campaigns(database_url: str, sql: SQL) -> None:
    await start_campaign(database_url, "q2", 1)
    assert await refresh(database_url, []) == []
    assert await refresh(database_url, ["q2", "no-such-campaign"]) == []
    assert queue_state(sql, "q2") == ("", None)


async def test_a_paused_campaign_has_no_queue_state(database_url: str, sql: SQL) -> None:
    people = await start_campaign(database_url, "q3", 2)
    await park(database_url, [deferred("q3", p, DeferReason.DAILY_LIMIT, T + minutes(5), at=T)
                              for p in people])
    await refresh(database_url, ["q3"])
    assert queue_state(sql, "q3") == ("daily_limit", T + minutes(5))

    changes = await lifecycle(database_url, "pause", "q3")
    assert [(c.action, c.after, c.announce) for c in changes] == [
        ("pause", "paused", True), ("deferral_over", "paused", False)]
    assert sql("SELECT status, defer_reason, deferred_until, deferred_at FROM campaigns") == [
        ("paused", "", None, None)]
    assert sql("SELECT count(*) FROM parked_sends WHERE released_at IS NULL") == [(2,)]  # kept

    # resumed: the parked sends still wait for the daily limit, so the deferral is back; the
    # CRM last read `sending` (the resume), so it is told again
    changes = await lifecycle(database_url, "resume", "q3")
    assert [(c.action, c.after, c.announce) for c in changes] == [
        ("resume", "sending", True), ("defer", "deferred", True)]
    assert queue_state(sql, "q3") == ("daily_limit", T + minutes(5))


async def test_clearing_a_paused_campaigns_deferral_does_not_audit_it_as_sending(
    database_url: str, sql: SQL
) -> None:
    people = await start_campaign(database_url, "q4", 1)
    await park(database_url, [deferred("q4", people[0], DeferReason.RATE_PER_HOUR, T, at=T)])
    await refresh(database_url, ["q4"])
    await lifecycle(database_url, "pause", "q4")
    [(status,)] = sql("SELECT status FROM campaigns")
    assert status == "paused"
    # the last audited status of the campaign is the one it is in
    assert sql("SELECT after_status FROM audit_log ORDER BY id DESC LIMIT 1") == [(status,)]


# --- 4. status_events.record() -----------------------------------------------------------


async def test_unannounced_changes_are_audited_only(database_url: str, sql: SQL) -> None:
    await start_campaign(database_url, "s1", 1)
    write(sql, "DELETE FROM outbox")
    quiet = StatusChange(campaign_id="s1", before="deferred", after="sending", actor="system",
                         action="deferral_over", reason="rate_per_hour deferral over", announce=False)
    async with transaction(database_url) as conn:
        await status_events.record(conn, [quiet, replace(quiet, action="defer", after="deferred")],
                                   STATUS_TOPIC)
    assert sql("SELECT action, before_status, after_status, actor, reason FROM audit_log"
               " WHERE action <> 'start' ORDER BY id") == [
        ("deferral_over", "deferred", "sending", "system", "rate_per_hour deferral over"),
        ("defer", "deferred", "deferred", "system", "rate_per_hour deferral over")]
    assert sql("SELECT count(*) FROM outbox") == [(0,)]


async def test_deferred_events_carry_reason_and_until(database_url: str, sql: SQL) -> None:
    people = await start_campaign(database_url, "s2", 2)
    write(sql, "DELETE FROM outbox")
    outcomes = [deferred("s2", people[0], DeferReason.WARMUP_CAP, T + minutes(45), at=T)]
    async with transaction(database_url) as conn:
        touched = await projections.apply_outcomes(conn, outcomes)
        touched |= await deferrals.park(conn, outcomes)
        changes = await projections.refresh_campaigns(conn, touched)
        changes += await deferrals.refresh_queue_state(conn, touched)
        # a quota that waits for a top-up has no time: null
        changes.append(StatusChange(
            campaign_id="s2", before="deferred", after="deferred", actor="system", action="defer",
            reason="quota_exhausted", defer_reason="quota_exhausted", deferred_until=None))
        changes.append(replace(changes[-1], action="deferral_over", after="sending", defer_reason="",
                               announce=False))
        await status_events.record(conn, changes, STATUS_TOPIC)
    rows = sql("SELECT topic, key, payload FROM outbox ORDER BY id")
    assert [(topic, key) for topic, key, _ in rows] == [(STATUS_TOPIC, "s2")] * 2
    events = [validate(orjson.loads(bytes(payload)), Topic.CAMPAIGN_STATUS) for _, _, payload in rows]
    assert [(e["status"], e["previous_status"], e["defer_reason"], e["deferred_until"]) for e in events] == [
        ("deferred", "sending", "warmup_cap", iso(T + minutes(45))),
        ("deferred", "deferred", "quota_exhausted", None)]
    assert events[0]["counts"] == {"total": 2, "pending": 2, "sent": 0, "failed": 0, "skipped": 0,
                                   "unknown": 0, "cancelled": 0}
    assert events[0]["actor_id"] == "system"
    assert len({e["message_id"] for e in events}) == 2
    assert sql("SELECT count(*) FROM audit_log WHERE campaign_id = 's2'") == [(4,)]  # start + 3


# --- 5. the Releaser ---------------------------------------------------------------------


class FakeProducer:
    """Records what it is asked to produce, as (topic, key, value)."""

    def __init__(self) -> None:
        self.produced: list[tuple[str, str, bytes]] = []

    async def produce_all(self, messages: list[tuple[str, bytes | str | None, bytes]]) -> None:
        for topic, key, value in messages:
            assert isinstance(key, str)
            self.produced.append((topic, key, value))

    def take(self) -> list[dict[str, Any]]:
        """The commands produced since the last call, checked, in order."""
        produced, self.produced = self.produced, []
        commands = []
        for topic, key, value in produced:
            assert topic == SEND_TOPIC
            command = validate(orjson.loads(value), Topic.SEND_COMMANDS)
            assert command["kind"] == "send.email" and key == command["send_id"]
            commands.append(command)
        return commands


@dataclass
class Rig:
    releaser: Releaser
    producer: FakeProducer
    limiter: Limiter
    accounts: Accounts


@pytest.fixture
async def redis_prefix(redis_url: str) -> AsyncIterator[str]:
    prefix = f"tdefer{uuid.uuid4().hex[:10]}"
    yield prefix
    client = aioredis.Redis.from_url(redis_url)
    try:
        async for key in client.scan_iter(match="{" + prefix + "}:*", count=1000):
            await client.delete(key)
    finally:
        await client.aclose()


@pytest.fixture
def rig_factory(
    database_url: str, redis_url: str, redis_prefix: str
) -> Callable[[int], contextlib.AbstractAsyncContextManager[Rig]]:
    @contextlib.asynccontextmanager
    async def rig(hourly_rate: int) -> AsyncIterator[Rig]:
        settings = replace(
            Settings(), database_url=database_url, redis_url=redis_url, hourly_rate=hourly_rate,
            working_hours="00:00-24:00", working_days="1-7", daily_limit_per_manager=0,
            redis_key_prefix=redis_prefix,
        )
        accounts = load_accounts(settings)
        limiter = Limiter.from_settings(settings)
        pool = await open_pool(settings)
        try:
            await limiter.init_epoch()
            producer = FakeProducer()
            releaser = Releaser(pool, cast(AsyncProducer, producer), limiter, accounts, SystemClock(),
                                SEND_TOPIC, STATUS_TOPIC)
            yield Rig(releaser, producer, limiter, accounts)
        finally:
            await pool.close()
            await limiter.close()

    return rig


async def park_due(url: str, campaign_id: str, people: list[dict[str, Any]], *, priority: int = 5,
                   queued_at: datetime | None = None,
                   reason: DeferReason = DeferReason.RATE_PER_HOUR) -> list[Message]:
    """Park one send per person, due a minute ago, and bring the queue state up to date."""
    now = datetime.now(UTC)
    outcomes = [deferred(campaign_id, p, reason, now - minutes(1), at=now - minutes(2),
                         priority=priority, queued_at=queued_at) for p in people]
    await park(url, outcomes)
    await refresh(url, [campaign_id])
    return outcomes


def released(sql: SQL) -> dict[str, int]:
    return dict(sql("SELECT campaign_id, count(*)::int FROM parked_sends WHERE released_at IS NOT NULL"
                    " GROUP BY campaign_id"))


def land(sql: SQL) -> None:
    """The outcomes of every released send arrive: their recipients are no longer deferred."""
    write(sql, "UPDATE recipients r SET status = 'sent' FROM parked_sends p"
               " WHERE p.send_id = r.send_id AND p.released_at IS NOT NULL AND r.status = 'deferred'")


async def test_release_by_priority_within_capacity(
    database_url: str, sql: SQL, rig_factory: Callable[[int], Any]
) -> None:
    high = await start_campaign(database_url, "hi", 4, priority=9)
    low = await start_campaign(database_url, "lo", 4, priority=5)
    high_outcomes = await park_due(database_url, "hi", high, priority=9)
    await park_due(database_url, "lo", low, priority=5)
    parked_commands = {o["send_id"]: o["command"] for o in high_outcomes}
    async with rig_factory(3) as rig:
        before = datetime.now(UTC)
        assert await rig.releaser.release_due() == 3  # the account's capacity
        commands = rig.producer.take()
        assert {c["campaign_id"] for c in commands} == {"hi"}
        for command in commands:  # the parked command, under a fresh message id
            original = parked_commands[command["send_id"]]
            assert command["message_id"] != original["message_id"]
            assert {**command, "message_id": original["message_id"]} == original
        assert released(sql) == {"hi": 3}
        stamps = sql("SELECT send_id::text, released_at FROM parked_sends WHERE released_at IS NOT NULL")
        assert {sid for sid, _ in stamps} == {c["send_id"] for c in commands}
        assert all(before <= at <= datetime.now(UTC) for _, at in stamps)

        # released sends whose outcome has not come back count as in flight: nothing more
        assert await rig.releaser.release_due() == 0
        land(sql)  # their outcomes arrive (the releaser itself took nothing from the limiter)
        assert await rig.releaser.release_due() == 3
        assert sorted(c["campaign_id"] for c in rig.producer.take()) == ["hi", "lo", "lo"]
        assert released(sql) == {"hi": 4, "lo": 2}


async def test_equal_priorities_share_the_capacity(
    database_url: str, sql: SQL, rig_factory: Callable[[int], Any]
) -> None:
    for campaign_id in ("a1", "b1"):
        people = await start_campaign(database_url, campaign_id, 3)
        await park_due(database_url, campaign_id, people)
    async with rig_factory(4) as rig:
        assert await rig.releaser.release_due() == 4
        assert sorted(c["campaign_id"] for c in rig.producer.take()) == ["a1", "a1", "b1", "b1"]
        assert released(sql) == {"a1": 2, "b1": 2}


async def test_equal_priorities_take_turns_across_passes(
    database_url: str, sql: SQL, rig_factory: Callable[[int], Any]
) -> None:
    first = datetime.now(UTC) - minutes(60)
    for campaign_id, queued in (("y2", first + minutes(1)), ("x2", first)):
        people = await start_campaign(database_url, campaign_id, 3)
        await park_due(database_url, campaign_id, people, queued_at=queued)
    async with rig_factory(1) as rig:
        order = []
        for _ in range(6):
            assert await rig.releaser.release_due() == 1
            [command] = rig.producer.take()
            order.append(command["campaign_id"])
            land(sql)
        assert order == ["x2", "y2", "x2", "y2", "x2", "y2"]  # the earlier queued goes first
        assert await rig.releaser.release_due() == 0  # nothing left to release
        assert released(sql) == {"x2": 3, "y2": 3}


async def test_a_paused_campaign_is_not_released(
    database_url: str, sql: SQL, rig_factory: Callable[[int], Any]
) -> None:
    for campaign_id in ("run", "held"):
        people = await start_campaign(database_url, campaign_id, 2)
        await park_due(database_url, campaign_id, people, priority=9 if campaign_id == "held" else 5)
    await lifecycle(database_url, "pause", "held")
    async with rig_factory(10) as rig:
        assert await rig.releaser.release_due() == 2
        assert sorted(c["campaign_id"] for c in rig.producer.take()) == ["run", "run"]
    assert released(sql) == {"run": 2}
    assert sql("SELECT count(*) FROM parked_sends WHERE campaign_id = 'held' AND released_at IS NULL"
               ) == [(2,)]


async def test_no_capacity_redates_due_sends_to_the_limiters_retry_time(
    database_url: str, sql: SQL, rig_factory: Callable[[int], Any]
) -> None:
    people = await start_campaign(database_url, "full", 2)
    outcomes = await park_due(database_url, "full", people, reason=DeferReason.TRANSIENT_ERROR)
    assert queue_state(sql, "full")[0] == "transient_error"
    write(sql, "DELETE FROM outbox")
    async with rig_factory(3) as rig:
        account = rig.accounts.get("default")
        assert account is not None
        reserved_at = time.time()
        for i in range(3):  # another sender used the hour's 3 sends
            request = limit_request(account, outcomes[0]["command"], reserved_at + i * 0.001)
            decision = await rig.limiter.reserve(replace(request, token_id=f"earlier-{i}"))
            assert decision.granted
        assert await rig.releaser.release_due() == 0
        assert rig.producer.take() == []
    retry = datetime.fromtimestamp(reserved_at + 3600, UTC)  # the oldest grant leaves the window
    rows = sql("SELECT reason, due_at, released_at FROM parked_sends")
    assert len(rows) == 2
    for reason, due_at, released_at in rows:
        assert (reason, released_at) == ("rate_per_hour", None)
        assert abs((due_at - retry).total_seconds()) < 1
    reason, until = queue_state(sql, "full")
    assert reason == "rate_per_hour" and until == rows[0][1]
    [(payload,)] = sql("SELECT payload FROM outbox")
    event = validate(orjson.loads(bytes(payload)), Topic.CAMPAIGN_STATUS)
    assert (event["previous_status"], event["status"], event["defer_reason"]) == (
        "deferred", "deferred", "rate_per_hour")
    assert event["deferred_until"] == iso(until)
