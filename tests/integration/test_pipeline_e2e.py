"""End to end: CRM commands in, SMTP deliveries and Postgres projections out.

Runs the real services as processes against the real broker, Postgres and an
SMTP server: a 1,000-recipient campaign in two chunks, one recipient refused
with 550, and malformed commands on the same topic.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Callable

import orjson
import pytest

from services.pipeline.contract import validate
from services.pipeline.publish import publish_campaign
from services.pipeline.settings import Settings
from services.pipeline.topics import Topic, topic_name
from tests.support.campaigns import campaign, recipients
from tests.support.kafka import produce_raw, read_topic
from tests.support.poll import get_json, wait_for_status
from tests.support.processes import ServiceRunner
from tests.support.smtp_server import SmtpServer

pytestmark = pytest.mark.integration


@pytest.mark.tansu_smoke
def test_campaign_goes_from_crm_command_to_smtp_and_projections(
    settings: Settings, services: ServiceRunner, smtp_server: SmtpServer,
    sql: Callable[..., list[tuple]],
) -> None:
    started = time.monotonic()
    for name in ("planner", "sender", "reconciler"):
        services.start(name)
    people = recipients(1000)
    bounced = people[417]["email"]
    smtp_server.reject(bounced)
    commands_topic = topic_name(Topic.CAMPAIGN_COMMANDS, settings)

    asyncio.run(publish_campaign(settings, campaign("spring-e2e"), people, chunk_size=500))
    # Malformed input on the same topic, between and after the campaign's commands.
    produce_raw(settings.kafka_bootstrap_servers, commands_topic, [
        (b"spring-e2e", b"{not json"),
        (b"spring-e2e", orjson.dumps({"kind": "campaign.pause", "schema_version": 1})),
    ])

    view = wait_for_status(settings, services, "spring-e2e", "completed")
    elapsed = time.monotonic() - started

    # Each recipient received exactly once; the refused one never.
    delivered = smtp_server.delivered()
    assert bounced not in delivered
    assert len(delivered) == 999
    assert set(delivered.values()) == {1}
    message_ids = [m.message["Message-ID"] for m in smtp_server.messages()]
    assert len(set(message_ids)) == 999

    # The projections tell the truth: 999 sent, 1 failed with the server's reply.
    assert view["counts"] == {"total": 1000, "pending": 0, "sent": 999, "failed": 1,
                              "skipped": 0, "unknown": 0, "cancelled": 0}
    assert [f["email"] for f in view["failed_recipients"]] == [bounced]
    failure = view["failed_recipients"][0]
    assert failure["smtp_code"] == 550
    assert "User unknown" in failure["smtp_reply"]
    assert sql("SELECT status, count(*) FROM recipients GROUP BY status ORDER BY status") == [
        ("failed", 1), ("sent", 999)]
    assert sql("SELECT count(*), count(DISTINCT send_id) FROM send_log") == [(1000, 1000)]
    assert sql("SELECT smtp_code FROM send_log WHERE recipient = %s", bounced) == [(550,)]
    assert sql("SELECT action, before_status, after_status FROM audit_log ORDER BY id") == [
        ("start", None, "sending"), ("complete", "sending", "completed")]

    # The malformed commands are dead letters with their reason and original bytes.
    dead = [orjson.loads(m.value()) for m in read_topic(
        settings.kafka_bootstrap_servers, topic_name(Topic.DEAD_LETTERS, settings), expect=4)]
    # both services that read the commands topic (planner, reconciler) reject both
    assert len(dead) == 4
    for letter in dead:
        validate(letter, Topic.DEAD_LETTERS)
    originals = {base64.b64decode(d["original_value_b64"]) for d in dead}
    assert originals == {b"{not json", orjson.dumps({"kind": "campaign.pause", "schema_version": 1})}
    reasons = " | ".join(d["reason"] for d in dead)
    assert "not valid JSON" in reasons
    assert "campaign.pause" in reasons
    assert {d["service"] for d in dead} == {"planner", "reconciler"}

    # The CRM hears about the status changes; an unknown campaign is a JSON 404.
    statuses = [orjson.loads(m.value()) for m in read_topic(
        settings.kafka_bootstrap_servers, topic_name(Topic.CAMPAIGN_STATUS, settings), expect=2)]
    assert [s["status"] for s in statuses] == ["sending", "completed"]
    # the start's event counts what was projected by then: on Apache Kafka the first
    # outcomes can be applied in the same pass as the start
    assert 0 <= statuses[0]["counts"]["sent"] < 999 and statuses[1]["counts"]["sent"] == 999
    code, body = get_json(f"http://127.0.0.1:{settings.http_port}/campaigns/nope")
    assert code == 404
    assert body["error"] == "campaign_not_found"
    print(f"\nend-to-end: 1,000 recipients completed in {elapsed:.1f}s (including start-up)")
