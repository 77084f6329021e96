"""The sender's per-send truth, tried from outside (issue 14, defects 5, 6 and 13).

Real broker, Postgres, Redis and SMTP server; the services run as processes.

- 5: Postgres cut while sends are in DATA: every send has exactly one terminal
  outcome on the outcomes topic, ever (no late `outcome.unknown` from the
  stale-claim sweep after an `outcome.sent`), and one row in send_log.
- 6: an ASCII local part at a Unicode domain goes out with the domain as IDNA
  A-labels to a server without SMTPUTF8; a non-ASCII local part fails there
  with a reason that says so, and is delivered by a server that offers SMTPUTF8.
- 13: a redelivered `send.email` never moves the limiter (no refund of the
  delivered send's token), and a SIGKILLed sender with sends in flight never
  lets more than the hourly limit through, counted at the SMTP server.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest

from services.pipeline.publish import publish_campaign
from services.pipeline.settings import Settings
from services.pipeline.topics import Topic, topic_name
from services.reconciler.stale_claims import expire_claims
from tests.integration.test_delivery_guarantees import states, view, wait_until
from tests.support.campaigns import campaign, recipients
from tests.support.kafka import produce_raw, read_topic
from tests.support.limits import with_account
from tests.support.processes import ServiceRunner, run_services
from tests.support.smtp_server import SmtpServer

pytestmark = pytest.mark.integration

SQL = Callable[..., list[tuple]]
TERMINAL_KINDS = ("outcome.sent", "outcome.failed", "outcome.unknown")


def outcomes(settings: Settings) -> list[dict[str, Any]]:
    """Every message on the outcomes topic so far."""
    return [orjson.loads(m.value()) for m in read_topic(
        settings, topic_name(Topic.SEND_OUTCOMES, settings), idle=3.0)]


def publish(settings: Settings, campaign_id: str, people: list[dict[str, Any]], **fields: Any) -> None:
    asyncio.run(publish_campaign(settings, campaign(campaign_id, **fields), people))


# --- defect 13: redelivery never moves the limiter -------------------------------------------

def test_d13_redelivered_send_command_does_not_refund_the_delivered_sends_token(
    settings: Settings, tmp_path: Path, smtp_server: SmtpServer, sql: SQL,
) -> None:
    settings = with_account(settings, tmp_path, hourly_rate=5)
    with run_services(settings, tmp_path / "logs") as services:
        for name in ("planner", "sender", "reconciler"):
            services.start(name)
        publish(settings, "first", recipients(5, domain="first.example.com"))
        wait_until("the first campaign delivered", lambda: view(settings, "first").get(
            "status") == "completed", services)
        assert len(smtp_server.messages()) == 5  # the window is full: 5/5
        # one of A's commands, produced again unchanged (Kafka redelivers after a crash)
        commands = read_topic(settings, topic_name(Topic.SEND_COMMANDS, settings), expect=5)
        again = commands[0]
        send_id = orjson.loads(again.value())["send_id"]
        produce_raw(settings, topic_name(Topic.SEND_COMMANDS, settings), [(again.key(), again.value())])
        wait_until("the redelivered command's repeated outcome", lambda: sum(
            1 for o in outcomes(settings) if o["send_id"] == send_id) >= 2, services)
        publish(settings, "second", recipients(5, domain="second.example.com"))
        wait_until("the second campaign deferred by the hourly limit", lambda: view(
            settings, "second").get("defer_reason") == "rate_per_hour", services)
        time.sleep(3)
        delivered = smtp_server.delivered()
    second = [a for a in delivered if a.endswith("@second.example.com")]
    assert len(smtp_server.messages()) == 5, f"{len(smtp_server.messages())} delivered in a 5/h window"
    assert second == []
    # the parked sends gave their claims back (nothing went to SMTP): they can come back
    assert sql("SELECT count(*) FROM send_claims WHERE campaign_id = 'second'") == [(0,)]
    repeats = [o for o in outcomes(settings) if o["send_id"] == send_id]
    assert {o["kind"] for o in repeats} == {"outcome.sent"}  # the repeat says what happened


@pytest.mark.fault
def test_d13_sigkilled_sender_with_sends_in_flight_never_exceeds_the_hourly_limit(
    settings: Settings, tmp_path: Path, smtp_server: SmtpServer, sql: SQL,
) -> None:
    limit = 120
    settings = with_account(settings, tmp_path, hourly_rate=limit)
    # offsets committed every 5 s: a killed sender's last seconds of commands come back
    settings = replace(settings, broker_commit_interval=5.0)
    smtp_server.handler.data_delay = 0.05  # sends stay in flight long enough to be cut
    with run_services(settings, tmp_path / "logs") as services:
        for name in ("planner", "reconciler"):
            services.start(name)
        senders = [services.start("sender") for _ in range(3)]
        publish(settings, "burst", recipients(400, domain="burst.example.com"))
        wait_until("40 deliveries", lambda: len(smtp_server.messages()) >= 40, services)
        busiest = sql("SELECT split_part(claimed_by, '/', 2)::int FROM send_claims"
                      " GROUP BY 1 ORDER BY count(*) DESC LIMIT 1")[0][0]
        victim = next(p for p in senders if p.pid == busiest)
        victim.kill()  # SIGKILL, with sends in flight and offsets not yet committed
        victim.wait()
        services.forget(victim)
        services.start("sender")
        wait_until("the window full and the campaign deferred", lambda: view(
            settings, "burst").get("defer_reason") == "rate_per_hour", services)
        # the killed sender's commands are redelivered once its partitions move (session 6 s)
        time.sleep(settings.broker_session_timeout + 6)
        delivered = len(smtp_server.messages())
    duplicates = sum(1 for o in outcomes(settings) if o.get("error_class") == "duplicate")
    print(f"\n{delivered} delivered within the hour at {limit}/h after a SIGKILL at 40; "
          f"{duplicates} redelivered commands refused as duplicates")
    assert duplicates > 0  # the killed sender's commands did come back
    assert delivered <= limit
    assert delivered >= limit - 3 * settings.sender_concurrency  # the window is used


# --- defect 5: one terminal outcome per send, even when Postgres is cut mid-send -------------

@pytest.mark.fault
def test_d5_postgres_cut_mid_send_gives_each_send_exactly_one_terminal_outcome(
    settings: Settings, services: ServiceRunner, smtp_server: SmtpServer, postgres_server: str,
) -> None:
    settings = replace(settings, claim_timeout=15.0)
    services.settings = settings
    smtp_server.handler.data_delay = 1.0  # every send sits in DATA for a second
    for name in ("planner", "sender", "reconciler"):
        services.start(name)
    publish(settings, "pgcut", recipients(100, domain="pgcut.example.com"))
    wait_until("the first sends", lambda: len(smtp_server.messages()) >= 20, services)
    database = psycopg.conninfo.conninfo_to_dict(settings.database_url)["dbname"]
    with psycopg.connect(postgres_server, autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                      (database,))
        time.sleep(3)
        admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')

    def query(statement: str) -> list[tuple]:
        with psycopg.connect(settings.database_url) as conn:
            return list(conn.execute(statement).fetchall())

    wait_until("completion", lambda: view(settings, "pgcut").get("status") == "completed", services,
               timeout=240)
    # every claim settled (by its sender, or by the sweep once MAILER_CLAIM_TIMEOUT passed)
    wait_until("no open claim", lambda: query(
        "SELECT count(*) FROM send_claims WHERE result IS NULL") == [(0,)], services, timeout=120)
    time.sleep(2)  # a pass of the sweep after the last claim settled
    wait_until("the outbox published", lambda: query("SELECT count(*) FROM outbox") == [(0,)],
               services)
    kinds: dict[tuple[str, int], set[str]] = defaultdict(set)
    ids: dict[tuple[str, int, str], set[str]] = defaultdict(set)
    for o in outcomes(settings):
        if o["kind"] in TERMINAL_KINDS:
            kinds[(o["send_id"], o["attempt"])].add(o["kind"])
            ids[(o["send_id"], o["attempt"], o["kind"])].add(o["message_id"])
    doubled = {k: v for k, v in kinds.items() if len(v) > 1}
    assert doubled == {}, f"{len(doubled)} sends with two terminal outcomes: {list(doubled.items())[:3]}"
    assert len(kinds) == 100
    assert all(len(v) == 1 for v in ids.values())  # a repeat is the same message
    assert query("SELECT send_id, attempt FROM send_log WHERE outcome IN ('sent', 'failed', 'unknown')"
                 " GROUP BY 1, 2 HAVING count(*) > 1") == []
    final = dict(query("SELECT status, count(*) FROM recipients GROUP BY status"))
    delivered = smtp_server.delivered()
    assert len(delivered) == 100 and max(delivered.values()) == 1
    assert final == {"sent": 100}  # every send reached SMTP and got its reply: no unknown
    unrecorded = sum(log.read_text(errors="replace").count("could not record the result of claim")
                     for log in services.log_dir.glob("sender-*.log"))
    assert unrecorded > 0  # the cut did hit sends between SMTP and their record
    print(f"\nPostgres cut with sends in DATA: {unrecorded} results recorded late, "
          f"{final}, one terminal outcome each")


async def test_d5_sweep_settles_a_claim_send_log_already_has_an_outcome_for(
    settings: Settings, database_url: str,
) -> None:
    """A claim whose result was lost (a Postgres crash loses the last asynchronous commits)
    but whose outcome the reconciler recorded: the sweep settles it without a second outcome;
    a claim nothing was heard of becomes unknown, and the claim keeps that outcome."""
    settings = replace(settings, claim_timeout=1.0)
    told, silent, parked = str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4())
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await conn.execute(
            "INSERT INTO send_claims (send_id, attempt, campaign_id, account, recipient, claimed_by,"
            " claimed_at) SELECT s::uuid, 1, 'c', 'default', 'a@example.com', 'sender/1',"
            " now() - interval '1 minute' FROM unnest(%s::text[]) s", ([told, silent, parked],))
        # the sent outcome, recorded after the claim; the park of `parked`, recorded before it
        await conn.execute(
            "INSERT INTO send_log (send_id, attempt, campaign_id, outcome, recipient, account,"
            " occurred_at, recorded_at) VALUES (%s, 1, 'c', 'sent', 'a@example.com', 'default',"
            " now(), now()), (%s, 1, 'c', 'deferred', 'a@example.com', 'default', now(),"
            " now() - interval '2 minutes')", (told, parked))
        async with conn.transaction():
            expired = await expire_claims(conn, settings, "outcomes")
        cur = await conn.execute("SELECT send_id::text, result, outcome IS NOT NULL FROM send_claims")
        claims = {row[0]: row[1:] for row in await cur.fetchall()}
        cur = await conn.execute("SELECT key FROM outbox")
        queued = sorted(row[0] for row in await cur.fetchall())
    assert expired == 2
    assert claims[told] == ("sent", False)  # settled by the outcome already out; none queued
    assert claims[silent] == ("unknown", True) and claims[parked] == ("unknown", True)
    assert queued == sorted([silent, parked])


# --- defect 6: internationalised addresses ---------------------------------------------------

IDN_PEOPLE = [
    {"email": "ivan@пример.рф", "name": "Иван", "variables": {"code": "A"}},
    {"email": "hans@münchen.de", "name": "Hans", "variables": {"code": "B"}},
    {"email": "иван@пример.рф", "name": "Иван", "variables": {"code": "C"}},
]


def test_d6_unicode_domain_goes_out_as_a_labels_without_smtputf8(
    settings: Settings, tmp_path: Path, sql: SQL,
) -> None:
    server = SmtpServer(smtputf8=False)  # as postfix with smtputf8_enable = no
    server.start()
    try:
        settings = replace(settings, smtp_port=server.port)
        with run_services(settings, tmp_path / "logs") as services:
            for name in ("planner", "sender", "reconciler"):
                services.start(name)
            publish(settings, "idn", IDN_PEOPLE)
            wait_until("completion", lambda: view(settings, "idn").get("status") == "completed",
                       services)
            failed = view(settings, "idn")["failed_recipients"]
    finally:
        server.stop()
    assert set(server.delivered()) == {"ivan@xn--e1afmkfd.xn--p1ai", "hans@xn--mnchen-3ya.de"}
    to = sorted(str(m.message["To"]) for m in server.messages())
    assert to == ["=?utf-8?b?0JjQstCw0L0=?= <ivan@xn--e1afmkfd.xn--p1ai>",
                  "Hans <hans@xn--mnchen-3ya.de>"]
    assert states(sql, "idn") == {"sent": 2, "failed": 1}
    rows = sql("SELECT recipient, error_class, reason FROM send_log WHERE outcome = 'failed'")
    assert len(rows) == 1 and rows[0][:2] == ("иван@пример.рф", "not_supported")
    assert "SMTPUTF8" in rows[0][2] and "not ASCII" in rows[0][2]
    assert [f["email"] for f in failed] == ["иван@пример.рф"]
    assert "SMTPUTF8" in failed[0]["reason"]  # the manager reads why, not an empty reply
    print(f"\nthe manager sees: {failed[0]}")


def test_d6_non_ascii_local_part_is_delivered_by_a_server_offering_smtputf8(
    settings: Settings, services: ServiceRunner, smtp_server: SmtpServer, sql: SQL,
) -> None:
    for name in ("planner", "sender", "reconciler"):
        services.start(name)
    publish(settings, "utf8", IDN_PEOPLE)
    wait_until("completion", lambda: view(settings, "utf8").get("status") == "completed", services)
    assert states(sql, "utf8") == {"sent": 3}
    assert set(smtp_server.delivered()) == {
        "ivan@xn--e1afmkfd.xn--p1ai", "hans@xn--mnchen-3ya.de", "иван@xn--e1afmkfd.xn--p1ai"}
