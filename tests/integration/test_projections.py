"""Reconciler projections against a real Postgres: idempotent, honest, complete."""

from __future__ import annotations

from collections.abc import Callable

import psycopg
import pytest

from services.pipeline.accounts import load_accounts
from services.pipeline.publish import campaign_messages, lifecycle_message
from services.pipeline.settings import Settings
from services.reconciler import projections, status_events
from tests.support.campaigns import campaign, outcome, recipients

pytestmark = pytest.mark.integration


async def apply(url: str, *, commands: list[dict] = (), outcomes: list[dict] = ()) -> list:
    async with await psycopg.AsyncConnection.connect(url) as conn, conn.transaction():
        changes, touched = await projections.apply_commands(conn, commands, load_accounts(Settings()))
        touched |= await projections.apply_outcomes(conn, list(outcomes))
        changes += await projections.refresh_campaigns(conn, touched)
        await status_events.record(conn, changes, "status-topic")
    return changes


async def test_outcomes_are_idempotent_and_5xx_is_never_sent(
    database_url: str, sql: Callable[..., list[tuple]]
) -> None:
    people = recipients(3)
    commands = list(campaign_messages(campaign("c1"), people, chunk_size=2))
    first = await apply(database_url, commands=commands)
    assert [(c.action, c.after) for c in first] == [("start", "sending")]
    assert await apply(database_url, commands=commands) == []  # replay: nothing new

    results = [
        outcome("outcome.sent", "c1", people[0]["email"], 250, "2.0.0 Ok"),
        outcome("outcome.failed", "c1", people[1]["email"], 550, "5.1.1 User unknown"),
    ]
    assert await apply(database_url, outcomes=results) == []
    # a late, contradictory "sent" for the failed recipient must not mask the failure
    late = outcome("outcome.sent", "c1", people[1]["email"], 250, "Ok", attempt=2)
    await apply(database_url, outcomes=[*results, late])
    assert sql("SELECT pending, sent, failed, status FROM campaigns") == [(1, 1, 1, "sending")]
    assert sql("SELECT last_code, last_reply FROM recipients WHERE status = 'failed'") == [
        (550, "5.1.1 User unknown")]

    done = await apply(database_url, outcomes=[
        outcome("outcome.sent", "c1", people[2]["email"], 250, "Ok")])
    assert [(c.before, c.after, c.actor) for c in done] == [("sending", "completed", "system")]
    assert sql("SELECT total, sent, failed, status FROM campaigns") == [(3, 2, 1, "completed")]
    assert sql("SELECT count(*) FROM send_log") == [(4,)]
    assert sql("SELECT count(*) FROM outbox") == [(2,)]  # sending, completed


async def test_campaign_is_not_completed_before_every_chunk_arrived(
    database_url: str, sql: Callable[..., list[tuple]]
) -> None:
    people = recipients(4)
    start, chunk0, chunk1 = campaign_messages(campaign("c2"), people, chunk_size=2)
    await apply(database_url, commands=[start, chunk0])
    await apply(database_url, outcomes=[
        outcome("outcome.sent", "c2", p["email"], 250, "Ok") for p in people[:2]])
    assert sql("SELECT status, pending FROM campaigns") == [("sending", 0)]
    await apply(database_url, commands=[chunk1])
    await apply(database_url, outcomes=[
        outcome("outcome.sent", "c2", p["email"], 250, "Ok") for p in people[2:]])
    assert sql("SELECT status, sent FROM campaigns") == [("completed", 4)]


async def test_lifecycle_commands_change_status_with_audit(
    database_url: str, sql: Callable[..., list[tuple]]
) -> None:
    start, chunk = campaign_messages(campaign("c3"), recipients(2))
    await apply(database_url, commands=[start, chunk])
    await apply(database_url, commands=[
        lifecycle_message("pause", "c3", "manager-7", "checking the template"),
        lifecycle_message("pause", "c3", "manager-7", None),  # already paused: no change
        lifecycle_message("resume", "c3", "ops-1", None, role="ops"),
        lifecycle_message("cancel", "c3", "manager-7", "wrong list"),
        lifecycle_message("resume", "c3", "manager-7", None),  # cancelled is final
    ])
    assert sql("SELECT actor, action, before_status, after_status, reason FROM audit_log"
               " ORDER BY id") == [
        ("manager-7", "start", None, "sending", "campaign started"),
        ("manager-7", "pause", "sending", "paused", "checking the template"),
        ("ops-1", "resume", "paused", "sending", "resume requested"),
        ("manager-7", "cancel", "sending", "cancelled", "wrong list"),
    ]
    assert sql("SELECT status FROM campaigns") == [("cancelled",)]
