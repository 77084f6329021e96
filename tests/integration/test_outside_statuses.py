"""Status events as the CRM reads them (issue 14, defects 3, 4 and 17), on the real broker,
Postgres, Redis and SMTP server.

The CRM keeps a campaign's last `campaign.status` event (the highest `sequence`).
That event must hold the final truth: corrected when in-flight sends land after
a pause or a cancel (3); a resumed campaign never reads `deferred /
campaign_paused` again (4); deferrals carry the manager's texts, their end is
announced, and a quota deferral has no `deferred_until` (17). Every campaign's
events form one chain: each event's `previous_status` is the status of the one
before it.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka import KafkaError

from services.pipeline.accounts import load_accounts
from services.pipeline.contract import validate
from services.pipeline.defer_reasons import DeferReason
from services.pipeline.settings import Settings
from services.pipeline.topics import Topic, topic_name
from services.reconciler import deferrals, projections, status_events
from tests.integration import test_deferrals as deferral_rig
from tests.integration.test_delivery_guarantees import command, start_campaign, states, view, wait_until
from tests.integration.test_sending_discipline import QuotaProvider
from tests.support.campaigns import outcome
from tests.support.events import StatusEvents
from tests.support.limits import with_account
from tests.support.processes import ROOT, ServiceRunner, run_services
from tests.support.smtp_server import SmtpServer

pytestmark = pytest.mark.integration

SQL = Callable[..., list[tuple]]
COUNTS = ("total", "pending", "sent", "failed", "skipped", "unknown", "cancelled")


class Crm(StatusEvents):
    """The CRM's reader of the status topic: every event, in topic order, checked by its schema."""

    def drain(self, seconds: float = 1.0) -> None:
        """Read what arrives within `seconds`."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            msg = self.consumer.poll(0.1)
            if msg is None:
                continue
            error = msg.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    continue
                raise AssertionError(f"consumer error: {error}")
            event = validate(orjson.loads(msg.value() or b"null"), Topic.CAMPAIGN_STATUS)
            self.seen.append((time.time(), event))

    def of(self, campaign_id: str) -> list[dict[str, Any]]:
        """The campaign's events, in the order the CRM read them (one partition per campaign)."""
        return [e for _, e in self.seen if e["campaign_id"] == campaign_id]

    def last(self, campaign_id: str) -> dict[str, Any]:
        """The event the CRM keeps: the highest sequence (without sequences: the last read)."""
        events = self.of(campaign_id)
        if all("sequence" in e for e in events):
            return max(events, key=lambda e: int(e["sequence"]))
        return events[-1]


@pytest.fixture
def crm(settings: Settings) -> Iterator[Crm]:
    reader = Crm(settings.kafka_bootstrap_servers, topic_name(Topic.CAMPAIGN_STATUS, settings))
    yield reader
    reader.close()


def db_counts(sql: SQL, campaign_id: str) -> dict[str, int]:
    row = sql(f"SELECT {', '.join(COUNTS)} FROM campaigns WHERE campaign_id = %s", campaign_id)[0]
    return dict(zip(COUNTS, row, strict=True))


def delivered_to(smtp: SmtpServer, campaign_id: str) -> int:
    suffix = f"@{campaign_id}.example.com"
    return sum(1 for address in smtp.delivered() if address.endswith(suffix))


def assert_one_chain(events: list[dict[str, Any]]) -> None:
    """Each previous_status is the status of the event before; sequences 1, 2, 3 … in topic order."""
    for before, event in itertools.pairwise(events):
        assert event["previous_status"] == before["status"], (before, event)
    assert [e.get("sequence") for e in events] == list(range(1, len(events) + 1)), events


def settle(crm: Crm, sql: SQL, campaign_id: str, services: ServiceRunner, timeout: float = 30.0) -> None:
    """Wait until the CRM's last event of the campaign holds the projections' counts."""
    def holds() -> bool:
        crm.drain(0.3)
        return bool(crm.of(campaign_id)) and crm.last(campaign_id)["counts"] == db_counts(sql, campaign_id)

    try:
        wait_until(f"the last event of {campaign_id} to hold its counts", holds, services, timeout)
    except AssertionError:
        last = crm.last(campaign_id)
        raise AssertionError(
            f"{campaign_id}: the CRM's last event ({last['status']}) says {last['counts']}, "
            f"the projections say {db_counts(sql, campaign_id)}") from None


def test_d3_pause_and_cancel_events_are_corrected_to_the_final_counts(
    settings: Settings, services: ServiceRunner, smtp_server: SmtpServer, sql: SQL, crm: Crm,
) -> None:
    smtp_server.handler.data_delay = 0.02
    for name in ("planner", "sender", "reconciler"):
        services.start(name)

    start_campaign(settings, "halt", 800)
    wait_until("the first sends", lambda: delivered_to(smtp_server, "halt") >= 100, services)
    command(settings, "pause", "halt")
    crm.wait_for("halt", "paused")
    # every send that reached SMTP before the pause is projected as sent
    wait_until("the sends before the pause to land", lambda: states(sql, "halt").get("sent", 0)
               == delivered_to(smtp_server, "halt"), services, timeout=60)
    settle(crm, sql, "halt", services)
    paused = crm.last("halt")
    assert paused["status"] == "paused" and paused["counts"]["sent"] == delivered_to(smtp_server, "halt")

    start_campaign(settings, "stop", 800)
    wait_until("the first sends of 'stop'", lambda: delivered_to(smtp_server, "stop") >= 100, services)
    command(settings, "cancel", "stop")
    _, cancel_event = crm.wait_for("stop", "cancelled")
    wait_until("the sends before the cancel to land", lambda: states(sql, "stop").get("sent", 0)
               == delivered_to(smtp_server, "stop"), services, timeout=60)
    settle(crm, sql, "stop", services)
    final = crm.last("stop")
    sent = delivered_to(smtp_server, "stop")
    assert final["status"] == "cancelled"
    assert (final["counts"]["sent"], final["counts"]["cancelled"]) == (sent, 800 - sent)
    if final is not cancel_event:  # in-flight sends landed after the cancel: a correction
        assert final["correction"] is True and final["previous_status"] == "cancelled"
        assert final["reason_ru"] and final["actor_id"] == "system"
    for campaign_id in ("halt", "stop"):
        assert_one_chain(crm.of(campaign_id))

    # `mailer reconcile` compares the last event with the projections
    reconcile = [sys.executable, "-m", "services.pipeline.cli", "reconcile", "--json"]
    env = services.env()
    clean = subprocess.run([*reconcile, "--dry-run"], cwd=ROOT, env=env, capture_output=True, timeout=120)
    assert not [f for f in json.loads(clean.stdout)["findings"] if f["check"] == "announced"]
    services.stop_all()
    # the CRM's last event of 'stop' as it was before corrections existed: the cancel's counts
    sql("UPDATE status_announcements SET counts = %s::jsonb WHERE campaign_id = 'stop' RETURNING 1",
        json.dumps(cancel_event["counts"]))
    if cancel_event["counts"] != final["counts"]:
        dry = subprocess.run([*reconcile, "--dry-run"], cwd=ROOT, env=env, capture_output=True, timeout=120)
        [found] = [f for f in json.loads(dry.stdout)["findings"] if f["check"] == "announced"]
        assert found["campaign_id"] == "stop" and not found["repaired"] and dry.returncode == 1
        assert f"sent={cancel_event['counts']['sent']}" in found["detail"]
        fixed = subprocess.run(reconcile, cwd=ROOT, env=env, capture_output=True, timeout=120)
        [found] = [f for f in json.loads(fixed.stdout)["findings"] if f["check"] == "announced"]
        assert found["repaired"], fixed.stderr.decode()
        crm.drain(3.0)
        repaired = crm.last("stop")
        assert repaired["correction"] is True and repaired["counts"] == db_counts(sql, "stop")
        assert repaired["sequence"] == final["sequence"] + 1
    print(f"\npause: last event sent={paused['counts']['sent']}; cancel event sent="
          f"{cancel_event['counts']['sent']}, corrected to sent={final['counts']['sent']}")


def test_d4_a_resumed_campaign_never_reads_deferred_campaign_paused(
    settings: Settings, services: ServiceRunner, smtp_server: SmtpServer, sql: SQL, crm: Crm,
) -> None:
    smtp_server.handler.data_delay = 0.01
    for name in ("planner", "sender", "reconciler"):
        services.start(name)
    start_campaign(settings, "again", 800)
    wait_until("the first sends", lambda: delivered_to(smtp_server, "again") >= 100, services)
    command(settings, "pause", "again")
    crm.wait_for("again", "paused")
    # the sender refuses what it reads after the pause: parked as campaign_paused
    wait_until("sends parked by the pause", lambda: sql(
        "SELECT count(*) FROM parked_sends WHERE campaign_id = 'again' AND reason = 'campaign_paused'"
    )[0][0] > 0, services, timeout=60)
    command(settings, "resume", "again")
    seen: list[tuple[str, str | None, int]] = []

    def done() -> bool:
        body = view(settings, "again")
        if body:
            seen.append((body["status"], body["defer_reason"], body["counts"]["sent"]))
        return body.get("status") == "completed"

    wait_until("completion", done, services)
    assert len(smtp_server.delivered()) == 800
    crm.drain(2.0)
    events = crm.of("again")
    paused_again = [e for e in events if e.get("defer_reason") == "campaign_paused"]
    assert paused_again == [], paused_again
    assert [s for s in seen if s[1] == "campaign_paused"] == []
    resumed = events.index(next(e for e in events if e["status"] == "sending" and e["previous_status"]
                                == "paused"))
    assert [e["status"] for e in events[resumed:] if not e.get("correction")][-1] == "completed"
    assert_one_chain(events)


def test_d17_deferral_events_carry_texts_announce_their_end_and_a_quota_has_no_until(
    settings: Settings, tmp_path: Path, smtp_server: SmtpServer, sql: SQL,
) -> None:
    provider = QuotaProvider(smtp_server, bought=30)
    provider.start()
    try:
        settings = with_account(settings, tmp_path, quota={"url": provider.url, "interval": 0.3,
                                                           "api_key_env": "NO_SUCH_KEY"})
        with run_services(settings, tmp_path / "logs") as services:  # creates the topics
            crm = Crm(settings.kafka_bootstrap_servers, topic_name(Topic.CAMPAIGN_STATUS, settings))
            for name in ("planner", "sender", "reconciler"):
                services.start(name)
            start_campaign(settings, "quota", 50)
            wait_until("the quota to run out", lambda: view(settings, "quota").get("defer_reason")
                       == "quota_exhausted", services)
            first = view(settings, "quota")
            time.sleep(settings.limiter_retry_seconds + 1.0)  # past the limiter's next check
            second = view(settings, "quota")
            assert len(smtp_server.messages()) == 30
            provider.bought = 100  # the administrator tops the quota up
            wait_until("completion", lambda: view(settings, "quota").get("status") == "completed",
                       services)
            crm.drain(3.0)
        events = crm.of("quota")
        crm.close()
    finally:
        provider.stop()
    # the poll endpoint: no moving "next check" time while the quota is exhausted
    for body in (first, second):
        assert (body["status"], body["deferred_until"], body["next_run_at"]) == ("deferred", None, None)
    # the deferral events: the manager's texts in both languages; a quota one has no until
    deferrals = [e for e in events if e["status"] == "deferred"]
    assert [e["defer_reason"] for e in deferrals].count("quota_exhausted") == 1, deferrals
    for deferral in deferrals:
        assert not deferral["reason"].startswith(deferral["defer_reason"]), deferral["reason"]
        assert deferral.get("reason_ru") and "квот" in deferral["reason_ru"], deferral
        assert deferral["deferred_until"] is None, deferral
    # one chain: completed follows what the CRM last read. The top-up's released sends may
    # land and complete the campaign in one batch (deferred -> completed); when the deferral
    # ends first, that is announced (deferred -> sending), with its texts
    statuses = [(e["previous_status"], e["status"], e.get("defer_reason")) for e in events]
    assert statuses[0] == (None, "sending", None) and statuses[-1][1] == "completed", statuses
    for back in [e for e in events if (e["previous_status"], e["status"]) == ("deferred", "sending")]:
        assert back["reason"] and back.get("reason_ru"), back
    assert_one_chain(events)
    print(f"\nevents: {statuses}")


async def test_d17_a_deferral_and_its_end_are_announced_with_the_managers_texts(
    database_url: str, sql: SQL,
) -> None:
    accounts = load_accounts(replace(Settings(), hourly_rate=100, time_zone="Europe/Moscow",
                                     working_hours="00:00-24:00", working_days="1-7"))
    people = await deferral_rig.start_campaign(database_url, "texts", 2)
    now = datetime(2026, 12, 7, 8, 0, tzinfo=UTC)  # 11:00 MSK
    parked = deferral_rig.deferred("texts", people[0], DeferReason.RATE_PER_HOUR, now + timedelta(minutes=1),
                                   at=now)

    async def reconcile(outcomes: list[dict[str, Any]]) -> None:
        async with deferral_rig.transaction(database_url) as conn:  # what the reconciler does
            touched = await projections.apply_outcomes(conn, outcomes)
            touched |= await deferrals.park(conn, outcomes)
            changes = await projections.refresh_campaigns(conn, touched, recount=False)
            changes += await deferrals.refresh_queue_state(conn, touched, accounts, now)
            await status_events.record(conn, changes, deferral_rig.STATUS_TOPIC, recheck=touched)

    await reconcile([parked])
    sql("UPDATE parked_sends SET released_at = %s RETURNING 1", now)  # released: on its way
    await reconcile([outcome("outcome.sent", "texts", people[0]["email"], 250, "Ok", attempt=1)])
    await reconcile([outcome("outcome.sent", "texts", people[1]["email"], 250, "Ok", attempt=1)])
    events = [validate(orjson.loads(bytes(p)), Topic.CAMPAIGN_STATUS)
              for (p,) in sql("SELECT payload FROM outbox WHERE key = 'texts' ORDER BY id")]
    assert [(e["previous_status"], e["status"]) for e in events] == [
        (None, "sending"), ("sending", "deferred"), ("deferred", "sending"), ("sending", "completed")]
    deferral, back = events[1], events[2]
    assert deferral["reason"] == (
        "Reached the limit of 100 emails per hour. We will resume today at 11:01 MSK.")
    assert deferral["reason_ru"] == "Достигнут лимит 100 писем/час. Продолжим сегодня в 11:01 МСК."
    assert (deferral["defer_reason"], deferral["deferred_until"]) == (
        "rate_per_hour", "2026-12-07T08:01:00.000000Z")
    assert back["reason"] == "The wait is over (hourly limit): sending again."
    assert back["reason_ru"] == "Ожидание окончено (часовой лимит): рассылка снова идёт."
    assert "defer_reason" not in back
    assert_one_chain(events)


async def test_d4_a_late_campaign_paused_deferral_parks_its_send_without_deferring_the_campaign(
    database_url: str, sql: SQL,
) -> None:
    people = await deferral_rig.start_campaign(database_url, "late", 2)
    now = datetime.now(UTC)
    await deferral_rig.lifecycle(database_url, "pause", "late")
    # a send the sender refused during the pause
    await deferral_rig.park(database_url, [
        deferral_rig.deferred("late", people[0], DeferReason.CAMPAIGN_PAUSED, now, at=now)])
    changes = await deferral_rig.lifecycle(database_url, "resume", "late")
    assert [(c.action, c.after, c.announce) for c in changes] == [("resume", "sending", True)]
    # another one's outcome.deferred arrives after the resume (the sender read it paused)
    late = deferral_rig.deferred("late", people[1], DeferReason.CAMPAIGN_PAUSED, now, at=now)
    await deferral_rig.park(database_url, [late])
    assert await deferral_rig.refresh(database_url, ["late"]) == []
    assert deferral_rig.queue_state(sql, "late") == ("", None)
    # both wait, due, for the releaser: they go out, the campaign never reads deferred
    assert sql("SELECT count(*) FROM parked_sends WHERE campaign_id = 'late' AND released_at IS NULL"
               " AND reason = 'campaign_paused' AND due_at <= now()") == [(2,)]
    events = [validate(orjson.loads(bytes(p)), Topic.CAMPAIGN_STATUS)
              for (p,) in sql("SELECT payload FROM outbox WHERE key = 'late' ORDER BY id")]
    assert [e["status"] for e in events] == ["sending", "paused", "sending"]
    assert_one_chain(events)
