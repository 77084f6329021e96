"""Guards at start, throttles and permissions on a live pipeline (R13-R16), with the default limits.

Each case publishes as the CRM does and reads what a manager reads: the campaign-status
events and the poll endpoint. Nothing refused is ever sent; every refusal says why with its
numbers, in English and Russian.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
import redis

from services.pipeline.embedded import free_port
from services.pipeline.limiter_keys import LimiterKeys
from services.pipeline.publish import lifecycle_message, publish, publish_campaign
from services.pipeline.publish import test_email_message as build_test_email
from services.pipeline.settings import Settings
from services.pipeline.topics import Topic, topic_name
from tests.support.campaigns import campaign, recipients
from tests.support.events import StatusEvents
from tests.support.kafka import read_topic
from tests.support.poll import get_json, wait_for_status
from tests.support.processes import ServiceRunner
from tests.support.smtp_server import SmtpServer

pytestmark = pytest.mark.integration

#: A campaign window that is closed today, so its campaign stays active (sending, deferred).
CLOSED_TODAY = {"hours": "09:00-18:00", "days": str((datetime.now(UTC).isoweekday() % 7) + 1),
                "time_zone": "UTC"}


@pytest.fixture
def pipeline(settings: Settings, services: ServiceRunner) -> StatusEvents:
    for name in ("planner", "sender", "reconciler"):
        services.start(name)
    events = StatusEvents(settings.kafka_bootstrap_servers, topic_name(Topic.CAMPAIGN_STATUS, settings))
    yield events  # type: ignore[misc]
    events.close()


def start(settings: Settings, campaign_id: str, n: int, **fields: Any) -> None:
    people = recipients(n, domain=f"{campaign_id}.example.com")
    asyncio.run(publish_campaign(settings, campaign(campaign_id, **fields), people))


def poll(settings: Settings, campaign_id: str, lang: str = "en") -> dict[str, Any]:
    code, body = get_json(f"http://127.0.0.1:{settings.http_port}/campaigns/{campaign_id}",
                          headers={"Accept-Language": lang})
    assert code == 200, body
    return body


def test_a_campaign_above_the_maximum_is_refused_with_a_text_to_split_it(
    settings: Settings, services: ServiceRunner, pipeline: StatusEvents, smtp_server: SmtpServer,
) -> None:
    start(settings, "huge", 11_000)
    _, event = pipeline.wait_for("huge", "refused")
    assert event["reason_code"] == "too_many_recipients"
    assert "11,000 recipients; at most 10,000" in event["reason"] and "Split it" in event["reason"]
    assert "11\u00a0000 получателей" in event["reason_ru"] and "Разделите её" in event["reason_ru"]
    body = wait_for_status(settings, services, "huge", "refused")
    assert "10\u00a0000" in poll(settings, "huge", "ru")["reason"] and body["counts"]["total"] == 0
    dead = read_topic(settings.kafka_bootstrap_servers, topic_name(Topic.DEAD_LETTERS, settings), expect=11)
    assert [orjson.loads(d.value())["error_type"] for d in dead] == ["campaign_refused"] * 11  # planner
    assert not smtp_server.messages()


def test_a_large_campaign_waits_for_confirmation_then_sends(
    settings: Settings, services: ServiceRunner, pipeline: StatusEvents, smtp_server: SmtpServer, sql: Any,
) -> None:
    start(settings, "big", 2_000)
    _, event = pipeline.wait_for("big", "needs_confirmation")
    assert event["reason_code"] == "needs_confirmation"
    assert "2,000 recipients, more than 1,000" in event["reason"]
    body = wait_for_status(settings, services, "big", "needs_confirmation")
    assert "подтвердите" in poll(settings, "big", "ru")["reason"].lower()
    time.sleep(3)  # the planner holds the chunks: nothing goes out while it waits
    assert not smtp_server.messages() and poll(settings, "big")["counts"]["sent"] == 0, body
    stranger = lifecycle_message("confirm", "big", "manager-8", None)
    asyncio.run(publish(settings, [stranger]))
    _, refused = pipeline.wait_for("big", "forbidden")
    assert refused["command"] == "campaign.confirm" and "manager-8 may not confirm" in refused["reason"]
    asyncio.run(publish(settings, [lifecycle_message("confirm", "big", "manager-7", "list checked")]))
    pipeline.wait_for("big", "sending")
    # every held chunk is planned once: 2,000 send commands, and sending has begun
    deadline = time.monotonic() + 60
    while sql("SELECT count(*) FROM planned_sends WHERE campaign_id = 'big'") != [(2_000,)]:
        assert time.monotonic() < deadline, sql("SELECT count(*) FROM planned_sends")
        time.sleep(0.3)
    while not smtp_server.messages():
        assert time.monotonic() < deadline, "nothing sent after the confirmation"
        time.sleep(0.2)
    assert sql("SELECT count(*) FROM planner_chunks WHERE campaign_id = 'big' AND held IS NOT NULL") == [(0,)]


def test_the_sixth_active_campaign_is_refused_and_starts_outside_hours_are_warned(
    settings: Settings, services: ServiceRunner, pipeline: StatusEvents,
) -> None:
    for i in range(5):
        start(settings, f"active-{i}", 2, working_hours=CLOSED_TODAY)
    _, first = pipeline.wait_for("active-0", "sending")
    [warning] = first["warnings"]
    assert warning["code"] == "outside_hours" and warning["starts_at"].endswith("T09:00:00.000000Z")
    assert re.fullmatch(r"Started outside working hours \(9:00-18:00 UTC\): sending begins "
                        r"(today|tomorrow) at 12:00 MSK\.", warning["text"]), warning  # the account's zone
    assert poll(settings, "active-0")["warnings"][0]["code"] == "outside_hours"
    start(settings, "active-5", 2)
    _, event = pipeline.wait_for("active-5", "refused")
    assert event["reason_code"] == "active_campaigns"
    assert "You already have 5 active campaigns; at most 5 may run at once" in event["reason"]
    asyncio.run(publish(settings, [lifecycle_message("cancel", "active-0", "manager-7", None)]))
    pipeline.wait_for("active-0", "cancelled")
    start(settings, "active-6", 2)  # a slot is free again
    pipeline.wait_for("active-6", "sending")


def test_the_eleventh_start_within_an_hour_is_refused_with_the_time_to_try_again(
    settings: Settings, services: ServiceRunner, pipeline: StatusEvents,
) -> None:
    for i in range(10):
        start(settings, f"burst-{i}", 1, working_hours=CLOSED_TODAY)
        pipeline.wait_for(f"burst-{i}", "sending")
        asyncio.run(publish(settings, [lifecycle_message("cancel", f"burst-{i}", "manager-7", None)]))
        pipeline.wait_for(f"burst-{i}", "cancelled")
    start(settings, "burst-10", 1)
    _, event = pipeline.wait_for("burst-10", "refused")
    assert event["reason_code"] == "starts_per_hour"
    assert event["reason"].startswith("At most 10 campaign starts per hour. Try again today at ") or \
        event["reason"].startswith("At most 10 campaign starts per hour. Try again tomorrow at ")
    assert "Попробуйте снова" in event["reason_ru"]


def test_the_sixth_test_email_within_an_hour_is_refused(
    settings: Settings, services: ServiceRunner, pipeline: StatusEvents, smtp_server: SmtpServer,
) -> None:
    definition = campaign("tested")
    for i in range(6):
        asyncio.run(publish(settings, [build_test_email(definition, f"qa{i}@example.com", "manager-7")]))
    _, event = pipeline.wait_for("tested", "refused")
    assert event["command"] == "campaign.test_email" and event["reason_code"] == "test_emails_per_hour"
    assert "At most 5 test emails per hour" in event["reason"]
    deadline = time.monotonic() + 30
    while len(smtp_server.messages()) < 5 and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1)
    assert len(smtp_server.messages()) == 5  # the refused one never went out


def test_a_manager_acts_on_own_campaigns_only(
    settings: Settings, services: ServiceRunner, pipeline: StatusEvents, sql: Any,
) -> None:
    start(settings, "mine", 2, working_hours=CLOSED_TODAY)
    wait_for_status(settings, services, "mine", "deferred")  # outside its hours
    asyncio.run(publish(settings, [lifecycle_message("pause", "mine", "manager-8", "not yours")]))
    _, event = pipeline.wait_for("mine", "forbidden")
    # previous_status: what the CRM last read of the campaign, deferred (issue 14, defect 17)
    assert event["command"] == "campaign.pause" and event["previous_status"] == "deferred"
    assert "manager-8 may not pause a campaign of manager-7" in event["reason"]
    assert sql("SELECT actor, action, before_status, after_status FROM audit_log"
               " WHERE campaign_id = 'mine' AND action = 'forbidden_pause'") == [
        ("manager-8", "forbidden_pause", "sending", "sending")]
    assert poll(settings, "mine")["status"] == "deferred"  # unchanged
    asyncio.run(publish(settings, [lifecycle_message("pause", "mine", "oncall", "checking", role="ops")]))
    pipeline.wait_for("mine", "paused")
    start(settings, "theirs", 2, actor_id="manager-8")  # manager-8 starts a campaign of manager-7
    _, refused = pipeline.wait_for("theirs", "forbidden")
    assert refused["reason_code"] == "forbidden" and "manager-8 may not start" in refused["reason"]
    assert poll(settings, "theirs")["status"] == "refused"


@pytest.fixture
def quota_settings(settings: Settings) -> Settings:
    """The default account has a provider quota (its endpoint does not answer: the quota stays as set)."""
    return dataclasses.replace(settings, quota_url=f"http://127.0.0.1:{free_port()}/v1/user")


def test_a_start_on_an_empty_quota_is_warned(quota_settings: Settings, tmp_path: Any) -> None:
    from tests.support.processes import run_services

    keys = LimiterKeys(quota_settings.redis_key_prefix)
    redis.Redis.from_url(quota_settings.redis_url).set(keys.quota("default"), 0)
    with run_services(quota_settings, tmp_path / "logs") as services:
        services.start("planner")
        services.start("reconciler")
        events = StatusEvents(quota_settings.kafka_bootstrap_servers,
                              topic_name(Topic.CAMPAIGN_STATUS, quota_settings))
        try:
            start(quota_settings, "dry", 2)
            _, event = events.wait_for("dry", "sending")
        finally:
            events.close()
        assert [w["code"] for w in event["warnings"]] == ["quota_empty"]
        assert "The provider quota of account default is 0" in event["warnings"][0]["text"]
        assert "Квота провайдера" in poll(quota_settings, "dry", "ru")["warnings"][0]["text"]
