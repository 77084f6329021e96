"""The reconcile job against a real Postgres: each check finds its anomaly, repairs hold, a second
run finds nothing left to repair, a dry run changes nothing, `mailer reconcile` prints its report.

States are built the way the reconciler builds them (`projections`), then broken with plain SQL:
an update lost, a refresh that never ran, a queue state left behind.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from services.pipeline.accounts import load_accounts
from services.pipeline.cli import main
from services.pipeline.ids import send_id
from services.pipeline.kafka_admin import ensure_topics
from services.pipeline.publish import campaign_messages, lifecycle_message
from services.pipeline.settings import Settings
from services.reconciler import projections, status_events
from services.reconciler.reconcile_job import Report, reconcile
from tests.support.campaigns import campaign, outcome, recipients

pytestmark = pytest.mark.integration

SQL = Callable[..., list[tuple]]
STATUS_TOPIC = "status-topic"
ACCOUNTS = load_accounts(Settings())


# --- building and breaking states ----------------------------------------------------------


@contextlib.asynccontextmanager
async def transaction(url: str) -> AsyncIterator[psycopg.AsyncConnection]:
    async with await psycopg.AsyncConnection.connect(url) as conn, conn.transaction():
        yield conn


async def start_campaign(url: str, campaign_id: str, n: int) -> list[dict[str, Any]]:
    """A sending campaign with `n` pending recipients in the projections."""
    people = recipients(n, domain=f"{campaign_id}.example.com")
    async with transaction(url) as conn:
        messages = campaign_messages(campaign(campaign_id), people)
        changes, touched = await projections.apply_commands(conn, messages, ACCOUNTS)
        changes += await projections.refresh_campaigns(conn, touched)
        await status_events.record(conn, changes, STATUS_TOPIC)
    return people


async def lifecycle(url: str, kind: str, campaign_id: str) -> None:
    async with transaction(url) as conn:
        command = lifecycle_message(kind, campaign_id, "manager-7", None)
        changes, touched = await projections.apply_commands(conn, [command], ACCOUNTS)
        changes += await projections.refresh_campaigns(conn, touched)
        await status_events.record(conn, changes, STATUS_TOPIC)


async def land(url: str, outcomes: list[dict[str, Any]], *, refresh: bool = True) -> None:
    """Outcomes as the reconciler applies them; without `refresh`, the counts update is lost."""
    async with transaction(url) as conn:
        touched = await projections.apply_outcomes(conn, outcomes)
        if refresh:
            await status_events.record(conn, await projections.refresh_campaigns(conn, touched),
                                       STATUS_TOPIC)


async def run(url: str, **options: Any) -> Report:
    async with transaction(url) as conn:
        return await reconcile(conn, STATUS_TOPIC, **options)


def write(sql: SQL, statement: str, *params: object) -> int:
    """Run a statement that returns no rows; how many it touched."""
    return len(sql(f"{statement} RETURNING 1", *params))


def log(sql: SQL, campaign_id: str, email: str, result: str, *, attempt: int = 1,
        code: int | None = None, reply: str = "", at: datetime | None = None) -> None:
    """A send_log row whose recipient update was lost (nothing else changes)."""
    write(sql, "INSERT INTO send_log (send_id, attempt, campaign_id, outcome, recipient, account,"
          " smtp_code, smtp_reply, error_class, occurred_at)"
          " VALUES (%s, %s, %s, %s, %s, 'default', %s, %s, %s, %s)",
          send_id(campaign_id, email), attempt, campaign_id, result, email, code, reply,
          None if result == "sent" else "permanent", at or datetime.now(UTC))


def park_row(sql: SQL, campaign_id: str, email: str, reason: str, due_at: datetime, *,
             released: bool = False) -> None:
    write(sql, "INSERT INTO parked_sends (send_id, campaign_id, account, priority, queued_at, reason,"
          " due_at, command, parked_at, released_at) VALUES (%s, %s, 'default', 5, now(), %s, %s,"
          " '\\x7b7d', now(), CASE WHEN %s THEN now() END)",
          send_id(campaign_id, email), campaign_id, reason, due_at, released)


def found(report: Report) -> list[tuple[str, str | None, bool]]:
    return [(f.check, f.campaign_id, f.repaired) for f in report.findings]


def statuses(sql: SQL, campaign_id: str) -> list[tuple[str, str]]:
    return sql("SELECT email, status FROM recipients WHERE campaign_id = %s ORDER BY email", campaign_id)


def counts(sql: SQL, campaign_id: str) -> tuple:
    return sql("SELECT status, total, pending, sent, failed, skipped, unknown, cancelled FROM campaigns"
               " WHERE campaign_id = %s", campaign_id)[0]


def snapshot(sql: SQL) -> dict[str, list[tuple]]:
    return {table: sql(f"SELECT * FROM {table} ORDER BY 1, 2")
            for table in ("campaigns", "recipients", "send_log", "parked_sends", "outbox", "audit_log",
                          "status_notifications")}


# --- a healthy state -----------------------------------------------------------------------


async def test_a_healthy_state_has_nothing_to_report(database_url: str) -> None:
    done = await start_campaign(database_url, "h1", 3)
    await land(database_url, [
        outcome("outcome.sent", "h1", done[0]["email"], 250, "Ok"),
        outcome("outcome.sent", "h1", done[1]["email"], 250, "Ok"),
        outcome("outcome.failed", "h1", done[2]["email"], 550, "5.1.1 User unknown"),
    ])
    await start_campaign(database_url, "h2", 2)
    await start_campaign(database_url, "h3", 2)
    await lifecycle(database_url, "pause", "h3")
    await start_campaign(database_url, "h4", 2)
    await lifecycle(database_url, "cancel", "h4")

    report = await run(database_url)
    assert report.findings == [] and report.changes == []
    assert report.lines() == ["no anomalies found"]


# --- each check ----------------------------------------------------------------------------


async def test_counts_are_recomputed_from_the_recipients(database_url: str, sql: SQL) -> None:
    await start_campaign(database_url, "c1", 3)
    write(sql, "UPDATE campaigns SET pending = 0, sent = 5 WHERE campaign_id = 'c1'")
    # a campaign without a single recipient row counts nothing
    write(sql, "INSERT INTO campaigns (campaign_id, status, total, pending) VALUES ('c0', 'paused', 4, 4)")

    report = await run(database_url)
    assert found(report) == [("counts", "c0", True), ("counts", "c1", True)]
    assert report.findings[1].detail == "counts say pending=0 sent=5, recipients say pending=3 sent=0"
    assert report.changes == []
    assert counts(sql, "c1") == ("sending", 3, 3, 0, 0, 0, 0, 0)
    assert counts(sql, "c0") == ("paused", 0, 0, 0, 0, 0, 0, 0)
    assert (await run(database_url)).findings == []


async def test_a_finished_campaign_is_completed_and_announced(database_url: str, sql: SQL) -> None:
    people = await start_campaign(database_url, "d1", 2)
    await land(database_url, [outcome("outcome.sent", "d1", p["email"], 250, "Ok") for p in people],
               refresh=False)  # the outcomes landed (and moved the counts), the completion never ran
    outbox = sql("SELECT count(*) FROM outbox")[0][0]

    report = await run(database_url)
    assert found(report) == [("completion", "d1", True)]
    assert [(c.campaign_id, c.before, c.after, c.action) for c in report.changes] == [
        ("d1", "sending", "completed", "complete")]
    assert counts(sql, "d1") == ("completed", 2, 0, 2, 0, 0, 0, 0)
    assert sql("SELECT actor, action, after_status FROM audit_log ORDER BY id DESC LIMIT 1") == [
        ("system", "complete", "completed")]
    assert sql("SELECT count(*) FROM outbox")[0][0] == outbox + 1  # its campaign.status event

    again = await run(database_url)
    assert again.findings == [] and again.changes == []
    assert sql("SELECT count(*) FROM outbox")[0][0] == outbox + 1


async def test_a_completed_campaign_with_waiting_recipients_is_only_reported(
    database_url: str, sql: SQL
) -> None:
    await start_campaign(database_url, "d2", 2)
    write(sql, "UPDATE campaigns SET status = 'completed' WHERE campaign_id = 'd2'")
    before = snapshot(sql)

    report = await run(database_url)
    assert found(report) == [("completion", "d2", False)]
    assert "completed with 2 recipients still pending" in report.findings[0].detail
    assert report.unrepaired == report.findings
    assert snapshot(sql) == before
    assert found(await run(database_url)) == [("completion", "d2", False)]


async def test_queue_state_follows_the_parked_sends(database_url: str, sql: SQL) -> None:
    later = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=1)
    await start_campaign(database_url, "q1", 1)  # deferred, but nothing waits
    write(sql, "UPDATE campaigns SET defer_reason = 'rate_per_hour', deferred_until = %s"
          " WHERE campaign_id = 'q1'", later)
    await start_campaign(database_url, "q2", 1)  # paused, and still showing a deferral
    await lifecycle(database_url, "pause", "q2")
    write(sql, "UPDATE campaigns SET defer_reason = 'daily_limit', deferred_until = %s"
          " WHERE campaign_id = 'q2'", later)
    q3 = await start_campaign(database_url, "q3", 2)  # a send parked, the campaign unaware
    park_row(sql, "q3", q3[0]["email"], "outside_hours", later)
    q4 = await start_campaign(database_url, "q4", 1)  # released, on its way back: the deferral stands
    park_row(sql, "q4", q4[0]["email"], "rate_per_hour", later, released=True)
    write(sql, "UPDATE recipients SET status = 'deferred' WHERE campaign_id = 'q4'")
    write(sql, "UPDATE campaigns SET defer_reason = 'rate_per_hour', deferred_until = %s"
          " WHERE campaign_id = 'q4'", later)

    report = await run(database_url)
    assert found(report) == [("queue_state", "q1", True), ("queue_state", "q2", True),
                             ("queue_state", "q3", True)]
    assert "nothing is parked" in report.findings[0].detail
    assert "paused but still shows a deferral: daily_limit" in report.findings[1].detail
    assert "earliest parked send waits for outside_hours" in report.findings[2].detail
    rows = sql("SELECT campaign_id, defer_reason, deferred_until FROM campaigns ORDER BY campaign_id")
    assert rows == [("q1", "", None), ("q2", "", None), ("q3", "outside_hours", later),
                    ("q4", "rate_per_hour", later)]
    assert [(c.campaign_id, c.action) for c in report.changes] == [
        ("q1", "deferral_over"), ("q2", "deferral_over"), ("q3", "defer")]
    assert sql("SELECT count(*) FROM audit_log WHERE action IN ('defer', 'deferral_over')") == [(3,)]
    assert (await run(database_url)).findings == []


async def test_a_logged_outcome_whose_recipient_update_was_lost_is_taken(
    database_url: str, sql: SQL
) -> None:
    people = await start_campaign(database_url, "s1", 4)
    emails = [p["email"] for p in people]
    now = datetime.now(UTC)
    # resent: failed, then put back to pending for a new attempt; its failure stays in send_log
    await land(database_url, [outcome("outcome.failed", "s1", emails[2], 550, "5.7.1 Blocked")])
    write(sql, "UPDATE recipients SET status = 'pending', updated_at = now() WHERE email = %s", emails[2])
    async with transaction(database_url) as conn:
        await projections.refresh_campaigns(conn, {"s1"})
    # lost updates: the outcome is in send_log, the recipient never heard of it
    log(sql, "s1", emails[0], "sent", code=250, reply="Ok")
    log(sql, "s1", emails[1], "deferred", at=now - timedelta(minutes=5))
    log(sql, "s1", emails[1], "failed", code=550, reply="5.1.1 User unknown", at=now)

    report = await run(database_url)
    assert found(report) == [("send_log", "s1", True)]
    assert report.findings[0].detail.startswith(
        "2 recipients pending, deferred or cancelled though send_log holds a later outcome"
        " (failed 1, sent 1)")
    assert statuses(sql, "s1") == [(emails[0], "sent"), (emails[1], "failed"), (emails[2], "pending"),
                                   (emails[3], "pending")]
    assert sql("SELECT last_code, last_reply, error_class FROM recipients WHERE email = %s", emails[1]) == [
        (550, "5.1.1 User unknown", "permanent")]
    assert counts(sql, "s1") == ("sending", 4, 2, 1, 1, 0, 0, 0)
    assert (await run(database_url)).findings == []


async def test_the_latest_logged_outcome_wins(database_url: str, sql: SQL) -> None:
    people = await start_campaign(database_url, "s2", 1)
    now = datetime.now(UTC)
    log(sql, "s2", people[0]["email"], "unknown", attempt=1, at=now - timedelta(minutes=9))
    log(sql, "s2", people[0]["email"], "sent", attempt=2, at=now)
    report = await run(database_url)
    assert found(report) == [("send_log", "s2", True)]
    assert statuses(sql, "s2") == [(people[0]["email"], "sent")]
    # its last recipient done, the campaign completes as a consequence, announced like any completion
    assert [(c.campaign_id, c.action) for c in report.changes] == [("s2", "complete")]
    assert counts(sql, "s2") == ("completed", 1, 0, 1, 0, 0, 0, 0)


async def test_a_recipient_marked_without_its_send_log_row_is_only_reported(
    database_url: str, sql: SQL
) -> None:
    people = await start_campaign(database_url, "u1", 3)
    write(sql, "UPDATE recipients SET status = 'sent' WHERE email = %s", people[1]["email"])

    report = await run(database_url)
    assert found(report) == [("send_log", "u1", False), ("counts", "u1", True)]
    assert report.findings[0].detail == (
        f"1 recipients sent with no sent row in send_log: {people[1]['email']}")
    assert statuses(sql, "u1")[1] == (people[1]["email"], "sent")
    assert found(await run(database_url)) == [("send_log", "u1", False)]


async def test_a_stuck_campaign_is_reported_and_left_alone(database_url: str, sql: SQL) -> None:
    later = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=1)
    for campaign_id in ("k1", "k2", "k3", "k4"):
        await start_campaign(database_url, campaign_id, 2)
    k3 = statuses(sql, "k3")[0][0]
    await land(database_url, [outcome("outcome.sent", "k3", k3, 250, "Ok")])  # k3 progresses
    await lifecycle(database_url, "pause", "k4")  # paused: waiting on purpose
    k2 = statuses(sql, "k2")[0][0]  # deferred to a time still ahead: waiting on purpose
    park_row(sql, "k2", k2, "daily_limit", later)
    write(sql, "UPDATE campaigns SET defer_reason = 'daily_limit', deferred_until = %s"
          " WHERE campaign_id = 'k2'", later)
    write(sql, "UPDATE campaigns SET updated_at = now() - interval '2 hours',"
          " first_sent_at = CASE WHEN first_sent_at IS NULL THEN NULL ELSE now() - interval '2 hours' END")
    before = snapshot(sql)

    report = await run(database_url)
    assert found(report) == [("stuck", "k1", False)]
    assert report.findings[0].detail.startswith("2 recipients waiting, no progress for 120 min")
    assert report.lines()[0].startswith("open      stuck        k1  2 recipients waiting")
    assert snapshot(sql) == before  # reported, not touched
    assert found(await run(database_url)) == [("stuck", "k1", False)]
    assert (await run(database_url, stuck_after=timedelta(hours=3))).findings == []
    # once its deferral is over, a waiting campaign with no progress is stuck too
    over = await run(database_url, now=later + timedelta(minutes=1), stuck_after=timedelta(minutes=90))
    assert found(over) == [
        ("stuck", "k1", False), ("stuck", "k2", False)]


async def test_recipients_of_a_cancelled_campaign_end_cancelled(database_url: str, sql: SQL) -> None:
    t1 = await start_campaign(database_url, "t1", 3)
    write(sql, "UPDATE campaigns SET status = 'cancelled' WHERE campaign_id = 't1'")  # recipients lost it
    log(sql, "t1", t1[0]["email"], "sent", code=250, reply="Ok")  # sent before the cancel took hold
    t2 = await start_campaign(database_url, "t2", 2)
    await lifecycle(database_url, "cancel", "t2")
    log(sql, "t2", t2[0]["email"], "sent", code=250, reply="Ok")  # it was in flight; its update lost

    report = await run(database_url)
    assert found(report) == [("send_log", "t1", True), ("send_log", "t2", True), ("terminal", "t1", True),
                             ("announced", "t1", True)]  # its last event said sending (issue 14)
    assert [s for _, s in statuses(sql, "t1")] == ["sent", "cancelled", "cancelled"]
    assert [s for _, s in statuses(sql, "t2")] == ["sent", "cancelled"]
    assert counts(sql, "t1") == ("cancelled", 3, 0, 1, 0, 0, 0, 2)
    assert counts(sql, "t2") == ("cancelled", 2, 0, 1, 0, 0, 0, 1)
    # the CRM is told: t1's cancel it never heard of, t2's counts corrected (issue 14)
    assert [(c.campaign_id, c.action, c.before, c.after, c.correction) for c in report.changes] == [
        ("t1", "correct", "sending", "cancelled", False), ("t2", "correct", "cancelled", "cancelled", True)]
    assert (await run(database_url)).findings == []


# --- a dry run, and running twice ----------------------------------------------------------


async def break_everything(url: str, sql: SQL) -> None:
    await start_campaign(url, "a1", 2)
    write(sql, "UPDATE campaigns SET pending = 9 WHERE campaign_id = 'a1'")
    a2 = await start_campaign(url, "a2", 1)
    await land(url, [outcome("outcome.sent", "a2", a2[0]["email"], 250, "Ok")], refresh=False)
    await start_campaign(url, "a3", 1)
    write(sql, "UPDATE campaigns SET defer_reason = 'warmup_cap' WHERE campaign_id = 'a3'")
    a4 = await start_campaign(url, "a4", 2)
    log(sql, "a4", a4[0]["email"], "failed", code=550, reply="no")
    await start_campaign(url, "a5", 2)
    write(sql, "UPDATE campaigns SET status = 'cancelled' WHERE campaign_id = 'a5'")
    await start_campaign(url, "a6", 2)
    write(sql, "UPDATE campaigns SET updated_at = now() - interval '1 hour' WHERE campaign_id = 'a6'")


async def test_a_dry_run_changes_nothing_and_reports_what_a_repair_does(
    database_url: str, sql: SQL
) -> None:
    await break_everything(database_url, sql)
    before = snapshot(sql)

    dry = await run(database_url, repair=False)
    assert snapshot(sql) == before
    assert dry.changes == [] and dry.unrepaired == dry.findings
    assert found(dry) == [
        ("stuck", "a6", False), ("send_log", "a4", False), ("terminal", "a5", False),
        ("counts", "a1", False), ("completion", "a2", False),
        ("queue_state", "a3", False), ("announced", "a5", False),
    ]

    fixed = await run(database_url)
    assert [(f.check, f.campaign_id, f.detail) for f in fixed.findings] == [
        (f.check, f.campaign_id, f.detail) for f in dry.findings]
    assert fixed.unrepaired == [fixed.findings[0]]  # only the stuck campaign is left as it was
    assert json.loads(fixed.to_json())["repaired"] == 6

    again = await run(database_url)
    assert found(again) == [("stuck", "a6", False)] and again.changes == []
    after = snapshot(sql)
    assert found(await run(database_url)) == [("stuck", "a6", False)]
    assert snapshot(sql) == after  # running it twice changes nothing


# --- mailer reconcile ----------------------------------------------------------------------


def test_mailer_reconcile_dry_run_prints_json(
    database_url: str, sql: SQL, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DATABASE_URL", database_url)
    write(sql, "INSERT INTO campaigns (campaign_id, status, total, pending) VALUES ('x1', 'paused', 2, 2)")
    before = snapshot(sql)

    assert main(["reconcile", "--dry-run", "--json"]) == 1  # something is left unrepaired
    report = json.loads(capsys.readouterr().out)
    assert report["findings"] == [{
        "check": "counts", "campaign_id": "x1", "repaired": False,
        "detail": "counts say total=2 pending=2, recipients say total=0 pending=0",
    }]
    assert (report["repaired"], report["unrepaired"], report["status_changes"]) == (0, 1, [])
    assert snapshot(sql) == before


def test_mailer_reconcile_repairs_and_exits_zero(
    database_url: str, sql: SQL, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DATABASE_URL", database_url)
    write(sql, "INSERT INTO campaigns (campaign_id, status, total, pending) VALUES ('x2', 'paused', 2, 2)")
    write(sql, "INSERT INTO recipients (send_id, campaign_id, email) VALUES (%s, 'x2', 'a@x.example.com')",
          uuid.uuid4())

    assert main(["reconcile", "--stuck-minutes", "5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("repaired  counts       x2  counts say total=2 pending=2")
    assert lines[-1] == "1 findings: 1 repaired, 0 open"
    assert sql("SELECT total, pending FROM campaigns") == [(1, 1)]

    assert main(["reconcile", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["findings"] == []


def test_mailer_reconcile_publishes_the_status_events_of_its_repairs(
    kafka_bootstrap: str, database_url: str, sql: SQL, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}."
    for name, value in (("DATABASE_URL", database_url), ("KAFKA_BOOTSTRAP_SERVERS", kafka_bootstrap),
                        ("MAILER_TOPIC_PREFIX", prefix)):
        monkeypatch.setenv(name, value)
    ensure_topics(Settings.from_env())
    write(sql, "INSERT INTO campaigns (campaign_id, status, chunks_declared, chunks_received)"
          " VALUES ('x3', 'sending', 1, 1)")
    write(sql, "INSERT INTO recipients (send_id, campaign_id, email, status)"
          " VALUES (%s, 'x3', 'b@x.example.com', 'skipped')", uuid.uuid4())

    assert main(["reconcile", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [(f["check"], f["repaired"]) for f in report["findings"]] == [
        ("counts", True), ("completion", True)]
    assert [c["after"] for c in report["status_changes"]] == ["completed"]
    assert sql("SELECT status FROM campaigns") == [("completed",)]
    assert sql("SELECT count(*) FROM outbox") == [(0,)]  # published after the commit
