"""Circuit breakers over consecutive transient SMTP errors (R10), on a real Postgres.

Outcomes are built as the sender would publish them; the breaker functions
run in one transaction per batch, as the reconciler runs them.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from services.pipeline import circuit_breaker
from services.pipeline.circuit_breaker import Trip
from services.pipeline.contract import Message, iso
from tests.support.campaigns import outcome

pytestmark = pytest.mark.integration

SQL = Callable[..., list[tuple]]
THRESHOLD = 10
REPLY = "4.7.0 Try again later"


@contextlib.asynccontextmanager
async def transaction(url: str) -> AsyncIterator[psycopg.AsyncConnection]:
    async with await psycopg.AsyncConnection.connect(url) as conn, conn.transaction():
        yield conn


def add_campaign(sql: SQL, campaign_id: str, *, account: str = "default", status: str = "sending") -> None:
    sql(
        "INSERT INTO campaigns (campaign_id, account, status) VALUES (%s, %s, %s) RETURNING 1",
        campaign_id, account, status,
    )


_counter = iter(range(10**9))


def _email() -> str:
    return f"user{next(_counter)}@example.com"


def transient(campaign_id: str, *, account: str = "default", **extra: Any) -> Message:
    """A 4xx-failed send."""
    return outcome("outcome.failed", campaign_id, _email(), 421, REPLY, error_class="transient",
                   account=account, **extra)


def sent(campaign_id: str, *, account: str = "default", **extra: Any) -> Message:
    return outcome("outcome.sent", campaign_id, _email(), 250, "2.0.0 OK", account=account, **extra)


def permanent(campaign_id: str, *, account: str = "default") -> Message:
    return outcome("outcome.failed", campaign_id, _email(), 550, "5.1.1 No such user", account=account)


def no_reply(campaign_id: str) -> Message:
    """No reply after DATA: a timeout, yet not a transient error (the mail may have gone)."""
    return outcome("outcome.unknown", campaign_id, _email(), None, "", error_class="timeout",
                   reason="no_reply_after_data")


def deferred(campaign_id: str, reason: str, *, account: str = "default") -> Message:
    """An `outcome.deferred` (built by hand: these functions read only a few fields)."""
    message = transient(campaign_id, account=account)
    message.update(
        kind="outcome.deferred", defer_reason=reason,
        deferred_until=iso(datetime.now(UTC) + timedelta(minutes=5)), command={},
    )
    return message


async def update(url: str, outcomes: list[Message], threshold: int = THRESHOLD) -> list[Trip]:
    async with transaction(url) as conn:
        return await circuit_breaker.update_breakers(conn, outcomes, threshold)


async def to_pause(url: str, trips: list[Trip]) -> list[tuple[str, str]]:
    async with transaction(url) as conn:
        return await circuit_breaker.campaigns_to_pause(conn, trips)


async def state(url: str, campaign_id: str) -> dict[str, dict[str, Any]]:
    async with transaction(url) as conn:
        return await circuit_breaker.breaker_state(conn, campaign_id)


def counters(sql: SQL) -> dict[tuple[str, str], tuple[int, bool]]:
    rows = sql("SELECT scope, key, consecutive, opened_at IS NOT NULL FROM circuit_breakers")
    return {(s, k): (n, is_open) for s, k, n, is_open in rows}


# --- classification ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (transient("c"), True),
        (outcome("outcome.failed", "c", "a@x.com", None, "", error_class="connection"), True),
        (outcome("outcome.failed", "c", "a@x.com", None, "", error_class="timeout"), True),
        (outcome("outcome.failed", "c", "a@x.com", None, "", error_class="tls"), True),
        (deferred("c", "transient_error"), True),
        (sent("c"), False),
        (permanent("c"), None),
        (outcome("outcome.failed", "c", "a@x.com", None, "", error_class="auth"), None),
        (outcome("outcome.failed", "c", "a@x.com", None, "", error_class="internal"), None),
        (deferred("c", "rate_per_hour"), None),
        (deferred("c", "outside_hours"), None),
        (outcome("outcome.skipped", "c", "a@x.com", None, "", error_class=None, reason="suppressed"),
         None),
        (no_reply("c"), None),
    ],
)
def test_is_transient(message: Message, expected: bool | None) -> None:
    assert circuit_breaker.is_transient(message) is expected


# --- counting and tripping --------------------------------------------------------------------


async def test_a_success_resets_the_count(database_url: str, sql: SQL) -> None:
    add_campaign(sql, "camp-1")
    batch = [transient("camp-1") for _ in range(9)] + [sent("camp-1")]
    batch += [transient("camp-1") for _ in range(9)]
    assert await update(database_url, batch) == []
    assert counters(sql) == {("campaign", "camp-1"): (9, False), ("account", "default"): (9, False)}


async def test_ten_in_a_row_trip_once(database_url: str, sql: SQL) -> None:
    add_campaign(sql, "camp-1")
    # spread over batches: the count lives in Postgres, not in one batch
    assert await update(database_url, [transient("camp-1") for _ in range(6)]) == []
    trips = await update(database_url, [transient("camp-1") for _ in range(4)])
    assert trips == [
        Trip("campaign", "camp-1", 10, f"421 {REPLY}"),
        Trip("account", "default", 10, f"421 {REPLY}"),
    ]
    assert counters(sql) == {("campaign", "camp-1"): (10, True), ("account", "default"): (10, True)}
    (opened_at,) = sql("SELECT opened_at FROM circuit_breakers WHERE scope = 'campaign'")[0]

    assert await update(database_url, [transient("camp-1")]) == []  # the 11th: already open
    assert counters(sql) == {("campaign", "camp-1"): (11, True), ("account", "default"): (11, True)}
    assert sql("SELECT opened_at FROM circuit_breakers WHERE scope = 'campaign'")[0][0] == opened_at

    pauses = await to_pause(database_url, trips)
    assert pauses == [(
        "camp-1",
        f"circuit_open: 10 consecutive transient SMTP errors in campaign camp-1 (last: 421 {REPLY})",
    )]


async def test_threshold_is_configurable(database_url: str, sql: SQL) -> None:
    add_campaign(sql, "camp-1")
    trips = await update(database_url, [transient("camp-1") for _ in range(3)], threshold=3)
    assert [(t.scope, t.consecutive) for t in trips] == [("campaign", 3), ("account", 3)]


async def test_a_trip_in_a_batch_stands_when_a_later_success_closes_it(
    database_url: str, sql: SQL
) -> None:
    add_campaign(sql, "camp-1")
    batch = [transient("camp-1") for _ in range(10)] + [sent("camp-1")]
    trips = await update(database_url, batch)
    assert [t.scope for t in trips] == ["campaign", "account"]
    assert counters(sql) == {("campaign", "camp-1"): (0, False), ("account", "default"): (0, False)}


async def test_connection_errors_name_their_reason(database_url: str, sql: SQL) -> None:
    add_campaign(sql, "camp-1")
    batch = [
        outcome("outcome.failed", "camp-1", _email(), None, "", error_class="connection",
                reason="connection error before DATA: refused")
        for _ in range(THRESHOLD)
    ]
    trips = await update(database_url, batch)
    assert trips[0].last_reply == "connection error before DATA: refused"


async def test_an_account_trip_pauses_every_sending_campaign_on_it(database_url: str, sql: SQL) -> None:
    for campaign_id in ("camp-a", "camp-b"):
        add_campaign(sql, campaign_id, account="acct-1")
    add_campaign(sql, "camp-paused", account="acct-1", status="paused")
    add_campaign(sql, "camp-done", account="acct-1", status="completed")
    add_campaign(sql, "camp-other", account="acct-2")

    batch = [transient(c, account="acct-1") for _ in range(5) for c in ("camp-a", "camp-b")]
    trips = await update(database_url, batch)
    assert trips == [Trip("account", "acct-1", 10, f"421 {REPLY}")]
    assert counters(sql) == {
        ("campaign", "camp-a"): (5, False),
        ("campaign", "camp-b"): (5, False),
        ("account", "acct-1"): (10, True),
    }

    reason = f"circuit_open: 10 consecutive transient SMTP errors on account acct-1 (last: 421 {REPLY})"
    assert await to_pause(database_url, trips) == [("camp-a", reason), ("camp-b", reason)]


async def test_campaign_and_account_trips_pause_a_campaign_once(database_url: str, sql: SQL) -> None:
    add_campaign(sql, "camp-1")
    add_campaign(sql, "camp-2")
    trips = await update(database_url, [transient("camp-1") for _ in range(THRESHOLD)])
    pauses = await to_pause(database_url, trips)
    assert [c for c, _ in pauses] == ["camp-1", "camp-2"]
    assert "in campaign camp-1" in pauses[0][1]
    assert "on account default" in pauses[1][1]


async def test_test_emails_count_for_the_account_only(database_url: str, sql: SQL) -> None:
    add_campaign(sql, "camp-1")
    trips = await update(database_url, [transient("camp-1", is_test=True) for _ in range(THRESHOLD)])
    assert [t.scope for t in trips] == ["account"]
    assert counters(sql) == {("account", "default"): (10, True)}


async def test_permanent_failures_and_limit_deferrals_neither_count_nor_reset(
    database_url: str, sql: SQL
) -> None:
    add_campaign(sql, "camp-1")
    neutral = [
        permanent("camp-1"),
        deferred("camp-1", "rate_per_hour"),
        deferred("camp-1", "daily_limit"),
        outcome("outcome.skipped", "camp-1", _email(), None, "", error_class=None, reason="suppressed"),
        no_reply("camp-1"),
    ]
    assert await update(database_url, neutral) == []
    assert counters(sql) == {}  # nothing counted: no row written

    batch: list[Message] = []
    for _ in range(THRESHOLD - 1):
        batch += [transient("camp-1"), *neutral]
    assert await update(database_url, batch) == []
    assert counters(sql)[("campaign", "camp-1")] == (9, False)
    trips = await update(database_url, [*neutral, deferred("camp-1", "transient_error")])
    assert [(t.scope, t.consecutive) for t in trips] == [("campaign", 10), ("account", 10)]


# --- resume and the poll endpoint -------------------------------------------------------------


async def test_reset_on_resume(database_url: str, sql: SQL) -> None:
    add_campaign(sql, "camp-1", account="acct-1")
    add_campaign(sql, "camp-2", account="acct-1")
    add_campaign(sql, "camp-3", account="acct-2")
    await update(database_url, [transient("camp-1", account="acct-1") for _ in range(THRESHOLD)])
    await update(database_url, [transient("camp-2", account="acct-1") for _ in range(3)])
    await update(database_url, [transient("camp-3", account="acct-2") for _ in range(4)])

    async with transaction(database_url) as conn:
        await circuit_breaker.reset(conn, "camp-1")
    assert counters(sql) == {
        ("campaign", "camp-1"): (0, False),
        ("account", "acct-1"): (0, False),
        ("campaign", "camp-2"): (3, False),  # another campaign's own count stands
        ("campaign", "camp-3"): (4, False),
        ("account", "acct-2"): (4, False),
    }
    # counting starts over: it takes a full threshold again to trip
    assert await update(database_url, [transient("camp-1", account="acct-1") for _ in range(9)]) == []


async def test_reset_of_an_unseen_campaign_changes_nothing(database_url: str, sql: SQL) -> None:
    async with transaction(database_url) as conn:
        await circuit_breaker.reset(conn, "nobody")
    assert counters(sql) == {}


async def test_breaker_state(database_url: str, sql: SQL) -> None:
    add_campaign(sql, "camp-1", account="acct-1")
    add_campaign(sql, "camp-2", account="acct-1")
    closed = {"consecutive": 0, "open": False, "opened_at": None}
    assert await state(database_url, "camp-1") == {"campaign": closed, "account": closed}
    assert await state(database_url, "nobody") == {"campaign": closed, "account": closed}

    await update(database_url, [transient("camp-1", account="acct-1") for _ in range(4)])
    await update(database_url, [transient("camp-2", account="acct-1") for _ in range(6)])
    one = await state(database_url, "camp-1")
    assert one["campaign"] == {"consecutive": 4, "open": False, "opened_at": None}
    assert one["account"]["consecutive"] == 10
    assert one["account"]["open"] is True
    (opened_at,) = sql("SELECT opened_at FROM circuit_breakers WHERE scope = 'account'")[0]
    assert one["account"]["opened_at"] == iso(opened_at)
    assert (await state(database_url, "camp-2"))["campaign"]["consecutive"] == 6

    async with transaction(database_url) as conn:
        await circuit_breaker.reset(conn, "camp-2")
    assert await state(database_url, "camp-2") == {"campaign": closed, "account": closed}
    assert (await state(database_url, "camp-1"))["campaign"]["consecutive"] == 4
