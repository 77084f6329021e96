"""Circuit breakers and resume seen from outside (issue 14, defects 10-12), on the real broker,
Postgres, Redis and an SMTP server scripted per address.

- 10: replies about one mailbox (450 4.2.1 Mailbox busy) never open a breaker; replies about
  the server (451 4.3.0, 421, 4.7.x) still do.
- 11: resume releases what the pause held, not retries still inside the server's
  "try again in N seconds".
- 12: cancel clears what only that campaign held (its breaker, the account breaker its errors
  opened, its parked rows); an account breaker closes by a half-open probe after a cool-down or
  by `mailer ops breaker reset ACCOUNT` (audited).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime

import psycopg
import pytest

from services.pipeline import circuit_breaker
from services.pipeline.circuit_breaker import Trip
from services.pipeline.ids import send_id
from services.pipeline.settings import Settings
from tests.integration.test_delivery_guarantees import (
    command,
    start_campaign,
    states,
    view,
    wait_until,
)
from tests.support.campaigns import outcome, recipients
from tests.support.processes import ROOT, ServiceRunner
from tests.support.smtp_server import SmtpServer

pytestmark = pytest.mark.integration

SQL = Callable[..., list[tuple]]
BUSY = "450 4.2.1 Mailbox busy"
SYSTEM_TROUBLE = "451 4.3.0 Temporary system problem, try again later"


def breaker_rows(sql: SQL) -> dict[tuple[str, str], tuple[int, bool]]:
    rows = sql("SELECT scope, key, consecutive, opened_at IS NOT NULL FROM circuit_breakers")
    return {(s, k): (n, is_open) for s, k, n, is_open in rows}


def breaker_pauses(sql: SQL, campaign_id: str) -> int:
    return int(sql("SELECT count(*) FROM audit_log WHERE campaign_id = %s AND action = 'circuit_open'",
                   campaign_id)[0][0])


def waiting(sql: SQL, campaign_id: str) -> int:
    return int(sql("SELECT count(*) FROM parked_sends WHERE campaign_id = %s AND released_at IS NULL",
                   campaign_id)[0][0])


def status(sql: SQL, campaign_id: str) -> str:
    """The campaign's status in Postgres (the poll endpoint says `deferred` for a sending one)."""
    rows = sql("SELECT status FROM campaigns WHERE campaign_id = %s", campaign_id)
    return str(rows[0][0]) if rows else ""


def ops(services: ServiceRunner, *args: str) -> subprocess.CompletedProcess[str]:
    """`mailer ops …` as the on-call engineer runs it."""
    return subprocess.run([sys.executable, "-m", "services.pipeline.cli", "ops", *args], cwd=ROOT,
                          env=services.env(), capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)


# --- 10: the breaker counts the server's trouble, not a mailbox's ------------------------------


def test_d10_mailbox_busy_recipients_never_open_a_breaker_nor_pause_the_account(
    settings: Settings, services: ServiceRunner, smtp_server: SmtpServer, sql: SQL,
) -> None:
    settings = replace(settings, transient_retry_seconds=1.0, transient_max_attempts=3)
    services.settings = settings
    people = recipients(60, domain="busy.example.com")
    busy = [p["email"] for p in people[::3]]  # 20 of 60, spread through the list
    for address in busy:
        smtp_server.reject(address, BUSY)
    for name in ("planner", "sender", "reconciler"):
        services.start(name)
    start_campaign(settings, "busy", 60)
    start_campaign(settings, "bystander", 30)
    # the retry waves send only the busy ones: 20 transient errors in a row, twice
    wait_until("the busy campaign to end or pause",
               lambda: status(sql, "busy") in ("completed", "paused"), services, timeout=90)
    assert status(sql, "busy") == "completed", breaker_rows(sql)
    wait_until("the bystander", lambda: status(sql, "bystander") == "completed", services)
    assert states(sql, "busy") == {"sent": 40, "failed": 20}
    assert states(sql, "bystander") == {"sent": 30}
    assert {smtp_server.handler.rcpt_attempts[a.lower()] for a in busy} == {3}  # every retry made
    assert not any(is_open for _, is_open in breaker_rows(sql).values())
    assert breaker_pauses(sql, "busy") == breaker_pauses(sql, "bystander") == 0


def test_d10_a_server_in_trouble_still_opens_the_breakers(
    settings: Settings, services: ServiceRunner, smtp_server: SmtpServer, sql: SQL,
) -> None:
    settings = replace(settings, transient_retry_seconds=600.0, breaker_threshold=5)
    services.settings = settings
    smtp_server.handler.rcpt_reply = SYSTEM_TROUBLE
    for name in ("planner", "sender", "reconciler"):
        services.start(name)
    start_campaign(settings, "trouble", 20)
    wait_until("the breaker", lambda: status(sql, "trouble") == "paused", services)
    body = view(settings, "trouble")
    assert body["status_reason"].startswith("circuit_open")
    assert body["circuit_breaker"]["account"]["open"] is True


# --- 11: resume keeps each retry's own due time -----------------------------------------------


def test_d11_resume_keeps_the_servers_try_again_in_30_seconds(
    settings: Settings, services: ServiceRunner, smtp_server: SmtpServer, sql: SQL,
) -> None:
    settings = replace(settings, transient_max_attempts=3)
    services.settings = settings
    people = recipients(10, domain="wait.example.com")
    late = people[0]["email"]
    smtp_server.reject(late, "450 4.2.1 Mailbox busy, try again in 30 seconds")
    for name in ("planner", "sender", "reconciler"):
        services.start(name)
    start_campaign(settings, "wait", 10)
    wait_until("the retry parked", lambda: bool(sql(
        "SELECT 1 FROM parked_sends WHERE campaign_id = 'wait' AND reason = 'transient_error'"
        " AND released_at IS NULL")), services)
    wait_until("the others sent", lambda: states(sql, "wait").get("sent") == 9, services)
    ((due_before,),) = sql("SELECT due_at FROM parked_sends WHERE campaign_id = 'wait'")
    command(settings, "pause", "wait")
    wait_until("the pause", lambda: status(sql, "wait") == "paused", services)
    command(settings, "resume", "wait")
    wait_until("the resume", lambda: status(sql, "wait") == "sending", services)
    time.sleep(3)  # three release passes: a retry made due by the resume would have gone
    ((due_after, released),) = sql(
        "SELECT due_at, released_at FROM parked_sends WHERE campaign_id = 'wait'")
    assert isinstance(due_before, datetime)
    assert (due_after, released) == (due_before, None)
    assert smtp_server.handler.rcpt_attempts[late.lower()] == 1
    smtp_server.accept(late)
    wait_until("completion", lambda: status(sql, "wait") == "completed", services, timeout=90)
    assert smtp_server.handler.rcpt_attempts[late.lower()] == 2
    assert states(sql, "wait") == {"sent": 10}


# --- 12: what a cancelled campaign held; how an account breaker closes ---------------------------


def test_d12_cancel_closes_the_breakers_only_its_errors_opened_and_ends_its_parked_rows(
    settings: Settings, services: ServiceRunner, smtp_server: SmtpServer, sql: SQL,
) -> None:
    settings = replace(settings, transient_retry_seconds=600.0, breaker_threshold=5)
    services.settings = settings
    smtp_server.handler.rcpt_reply = SYSTEM_TROUBLE  # every soft bounce is about the server
    for name in ("planner", "sender", "reconciler"):
        services.start(name)
    start_campaign(settings, "soft", 12)
    wait_until("the breakers", lambda: status(sql, "soft") == "paused", services)
    wait_until("every send parked", lambda: waiting(sql, "soft") == 12, services)
    assert breaker_rows(sql)[("account", "default")][1] is True
    smtp_server.handler.rcpt_reply = None
    command(settings, "cancel", "soft")
    wait_until("the cancel", lambda: status(sql, "soft") == "cancelled", services)
    assert waiting(sql, "soft") == 0  # its parked rows ended with it
    assert not any(is_open for _, is_open in breaker_rows(sql).values())
    limiter = ops(services, "limiter", "--account", "default")
    assert "transient_error" not in limiter.stdout and "breaker      closed" in limiter.stdout
    start_campaign(settings, "next", 10)
    wait_until("the next campaign", lambda: status(sql, "next") in ("completed", "paused"),
               services)
    assert status(sql, "next") == "completed"
    assert breaker_pauses(sql, "next") == 0
    assert states(sql, "soft") == {"cancelled": 12}


def test_d12_an_account_breaker_half_opens_after_its_cool_down_and_one_probe_closes_it(
    settings: Settings, services: ServiceRunner, smtp_server: SmtpServer, sql: SQL,
) -> None:
    settings = replace(settings, transient_retry_seconds=600.0, breaker_threshold=5,
                       breaker_cooldown=8.0)
    services.settings = settings
    people = recipients(5, domain="broken.example.com")
    for p in people:  # one campaign's recipients meet a server in trouble
        smtp_server.reject(p["email"], SYSTEM_TROUBLE)
    for name in ("planner", "sender", "reconciler"):
        services.start(name)
    start_campaign(settings, "broken", 5)
    wait_until("the breakers", lambda: status(sql, "broken") == "paused", services)
    start_campaign(settings, "later", 20)  # the account breaker holds it: paused by the system
    wait_until("the later campaign held", lambda: breaker_pauses(sql, "later") >= 1, services)
    # after the cool-down one probe goes out; it is delivered, the breaker closes, all follows
    wait_until("the later campaign", lambda: status(sql, "later") == "completed", services,
               timeout=90)
    assert states(sql, "later") == {"sent": 20}
    assert breaker_rows(sql)[("account", "default")] == (0, False)
    assert status(sql, "broken") == "paused"  # its own breaker waits for a manager's resume
    assert breaker_rows(sql)[("campaign", "broken")][1] is True
    actions = [a for (a,) in sql("SELECT action FROM audit_log WHERE campaign_id = 'later' ORDER BY id")]
    assert "circuit_open" in actions and "breaker_probe" in actions


def test_d12_ops_breaker_reset_closes_an_account_breaker_and_is_audited(
    settings: Settings, services: ServiceRunner, smtp_server: SmtpServer, sql: SQL,
) -> None:
    settings = replace(settings, transient_retry_seconds=600.0, breaker_threshold=5)
    services.settings = settings
    for p in recipients(5, domain="broken.example.com"):
        smtp_server.reject(p["email"], SYSTEM_TROUBLE)
    for name in ("planner", "sender", "reconciler"):
        services.start(name)
    start_campaign(settings, "broken", 5)
    wait_until("the breakers", lambda: status(sql, "broken") == "paused", services)
    start_campaign(settings, "later", 10)
    wait_until("the later campaign held", lambda: status(sql, "later") == "paused", services)
    limiter = ops(services, "limiter")
    assert "breaker      OPEN since" in limiter.stdout and ", probe after " in limiter.stdout
    unknown = ops(services, "breaker", "reset", "nosuch", "--actor", "oncall-1")
    assert unknown.returncode == 2 and "no account" in unknown.stderr
    reset = ops(services, "breaker", "reset", "default", "--actor", "oncall-1", "--reason", "relay fixed")
    assert reset.returncode == 0, reset.stderr
    assert "closed the account breaker of default" in reset.stdout
    wait_until("the later campaign", lambda: status(sql, "later") == "completed", services)
    assert states(sql, "later") == {"sent": 10}
    ((actor, action, reason),) = sql(
        "SELECT actor, action, reason FROM breaker_audit WHERE scope = 'account' AND key = 'default'"
        " AND action = 'reset'")
    assert (actor, action) == ("oncall-1", "reset") and "relay fixed" in reason
    again = ops(services, "breaker", "reset", "default", "--actor", "oncall-1")
    assert again.returncode == 0 and "already closed" in again.stdout


# --- 12: the half-open state machine on a real Postgres (claim_send, update_breakers) -----------


def _failed(campaign_id: str, email: str, code: int, reply: str) -> dict:
    return outcome("outcome.failed", campaign_id, email, code, reply, error_class="transient")


def half_open_now(sql: SQL) -> None:
    """The account breaker's cool-down has passed (as if its time had come)."""
    sql("UPDATE circuit_breakers SET probe_after = now() - interval '1 second'"
        " WHERE scope = 'account' RETURNING 1")


async def _update(url: str, outcomes: list[dict], threshold: int = 3, cooldown: float = 60.0) -> list[Trip]:
    async with await psycopg.AsyncConnection.connect(url) as conn, conn.transaction():
        return await circuit_breaker.update_breakers(conn, outcomes, threshold, cooldown=cooldown)


def _claim(sql: SQL, campaign_id: str, email: str) -> str:
    ((verdict,),) = sql(
        "SELECT verdict FROM claim_send(%s, 'default', %s::uuid, 1, %s, %s, false, 'test')",
        campaign_id, send_id(campaign_id, email), email, email)
    return str(verdict)


def test_d12_a_failed_probe_reopens_with_twice_the_cool_down_and_one_delivered_closes(
    database_url: str, sql: SQL,
) -> None:
    for campaign_id in ("camp-a", "camp-b"):
        sql("INSERT INTO campaigns (campaign_id, account, status) VALUES (%s, 'default', 'sending')"
            " RETURNING 1", campaign_id)
    trips = asyncio.run(_update(database_url, [
        _failed("camp-a", f"a{i}@x.example.com", 421, "4.7.0 Try again later") for i in range(3)]))
    assert [(t.scope, t.key) for t in trips] == [("campaign", "camp-a"), ("account", "default")]
    ((cooldown, campaigns, waits),) = sql(
        "SELECT cooldown_seconds, campaigns, probe_after > now() + interval '50 seconds'"
        " FROM circuit_breakers WHERE scope = 'account'")
    assert (cooldown, campaigns, waits) == (60.0, ["camp-a"], True)
    assert _claim(sql, "camp-b", "b1@x.example.com") == "breaker"  # open: nothing goes

    half_open_now(sql)
    assert [key for key, _ in asyncio.run(_held(database_url))] == ["default"]
    assert _claim(sql, "camp-b", "b1@x.example.com") == "claimed"  # the probe
    assert _claim(sql, "camp-b", "b2@x.example.com") == "breaker"  # one probe at a time
    assert _claim(sql, "camp-a", "a9@x.example.com") == "breaker"  # its own breaker stays open

    reopened = asyncio.run(_update(database_url, [
        _failed("camp-b", "b1@x.example.com", 451, "4.3.0 Temporary system problem")]))
    assert [(t.scope, t.key) for t in reopened] == [("account", "default")]
    ((cooldown, probe, waits),) = sql(
        "SELECT cooldown_seconds, probe_send, probe_after > now() + interval '110 seconds'"
        " FROM circuit_breakers WHERE scope = 'account'")
    assert (cooldown, probe, waits) == (120.0, None, True)
    assert sql("SELECT action, actor FROM breaker_audit") == [("probe_reopened", "system")]

    half_open_now(sql)
    assert _claim(sql, "camp-b", "b2@x.example.com") == "claimed"
    asyncio.run(_update(database_url, [
        outcome("outcome.sent", "camp-b", "b2@x.example.com", 250, "2.0.0 Ok")]))
    assert sql("SELECT consecutive, opened_at, campaigns, cooldown_seconds FROM circuit_breakers"
               " WHERE scope = 'account'") == [(0, None, [], None)]
    assert _claim(sql, "camp-b", "b3@x.example.com") == "claimed"


async def _held(url: str) -> list[tuple[str, bool]]:
    async with await psycopg.AsyncConnection.connect(url) as conn:
        accounts, _ = await circuit_breaker.held_back(conn)
        return sorted(accounts.items())


def test_d12_cancel_of_one_of_two_campaigns_hands_the_account_breaker_to_a_probe(
    database_url: str, sql: SQL,
) -> None:
    for campaign_id in ("camp-a", "camp-b"):
        sql("INSERT INTO campaigns (campaign_id, account, status) VALUES (%s, 'default', 'sending')"
            " RETURNING 1", campaign_id)
    asyncio.run(_update(database_url, [
        _failed(c, f"{c}{i}@x.example.com", 421, "4.7.0 Try again later")
        for i in range(2) for c in ("camp-a", "camp-b")]))
    assert sql("SELECT campaigns FROM circuit_breakers WHERE scope = 'account'") == [(["camp-a", "camp-b"],)]

    async def cancel(campaign_id: str) -> None:
        async with await psycopg.AsyncConnection.connect(database_url) as conn, conn.transaction():
            await circuit_breaker.release_campaign(conn, campaign_id, "manager-7")

    asyncio.run(cancel("camp-a"))
    ((opened, campaigns, half_open),) = sql(
        "SELECT opened_at IS NOT NULL, campaigns, probe_after <= now() FROM circuit_breakers"
        " WHERE scope = 'account'")
    assert (opened, campaigns, half_open) == (True, ["camp-b"], True)
    assert ("campaign", "camp-a") not in breaker_rows(sql)
    assert [a for (a,) in sql("SELECT action FROM breaker_audit")] == ["half_open_by_cancel"]
    assert _claim(sql, "camp-b", "probe@x.example.com") == "claimed"

    asyncio.run(cancel("camp-b"))  # now only its errors count: closed
    assert breaker_rows(sql)[("account", "default")] == (0, False)
    assert [a for (a,) in sql("SELECT action FROM breaker_audit ORDER BY id")] == [
        "half_open_by_cancel", "closed_by_cancel"]
