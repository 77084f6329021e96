"""The reconciler process: a message Postgres cannot store is dead-lettered, the rest applied."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import orjson
import pytest

from services.pipeline.contract import encode
from services.pipeline.publish import campaign_messages, publish
from services.pipeline.settings import Settings
from services.pipeline.topics import Topic, topic_name
from tests.support.campaigns import campaign, outcome, recipients
from tests.support.kafka import produce_raw, read_topic
from tests.support.poll import wait_for_status
from tests.support.processes import ServiceRunner

pytestmark = pytest.mark.integration


def test_poison_outcome_is_dead_lettered_and_the_batch_still_applies(
    settings: Settings, services: ServiceRunner, sql: Callable[..., list[tuple]]
) -> None:
    services.start("reconciler")
    people = recipients(3)
    asyncio.run(publish(settings, list(campaign_messages(campaign("poison"), people))))
    good = [outcome("outcome.sent", "poison", p["email"], 250, "Ok") for p in people[:2]]
    # valid JSON, schema and input checks, but Postgres knows no 30 February
    poison = outcome("outcome.failed", "poison", people[2]["email"], 550, "5.1.1 unknown user",
                     occurred_at="2026-02-30T10:00:00.000Z")
    produce_raw(settings.kafka_bootstrap_servers, topic_name(Topic.SEND_OUTCOMES, settings),
                [(o["send_id"].encode(), encode(o)) for o in (good[0], poison, good[1])])

    dead = read_topic(settings.kafka_bootstrap_servers,
                      topic_name(Topic.DEAD_LETTERS, settings), expect=1, timeout=90)
    letter = orjson.loads(dead[0].value())
    assert letter["error_type"] == "projection_error"
    assert letter["service"] == "reconciler"
    # the letter goes out while the rest of the batch is still being written one by one
    expected = [(people[0]["email"], "sent"), (people[1]["email"], "sent"),
                (people[2]["email"], "pending")]
    deadline = time.monotonic() + 30
    while sql("SELECT email, status FROM recipients ORDER BY email") != expected:
        assert time.monotonic() < deadline, sql("SELECT email, status FROM recipients ORDER BY email")
        time.sleep(0.2)

    # the service goes on: a later, clean outcome completes the campaign
    fixed = outcome("outcome.failed", "poison", people[2]["email"], 550, "5.1.1 unknown user")
    produce_raw(settings.kafka_bootstrap_servers, topic_name(Topic.SEND_OUTCOMES, settings),
                [(fixed["send_id"].encode(), encode(fixed))])
    view = wait_for_status(settings, services, "poison", "completed", timeout=60)
    assert (view["counts"]["sent"], view["counts"]["failed"]) == (2, 1)
