"""The planner against the real broker and Postgres: one command per recipient, replays add none."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable

import orjson
import pytest

from services.pipeline.contract import encode, envelope, validate
from services.pipeline.ids import send_id
from services.pipeline.publish import campaign_messages, publish
from services.pipeline.settings import Settings
from services.pipeline.topics import Topic, topic_name
from tests.support.campaigns import campaign, recipients
from tests.support.kafka import produce_raw, read_topic
from tests.support.processes import ServiceRunner

pytestmark = pytest.mark.integration


def test_replayed_start_and_chunks_produce_no_second_command(
    settings: Settings, services: ServiceRunner
) -> None:
    services.start("planner")
    people = recipients(250)
    first = list(campaign_messages(campaign("replay-1"), people, chunk_size=100))
    # The CRM publishes everything twice (a retry after a timeout, say) ...
    asyncio.run(publish(settings, first + first))
    # ... and a chunk repeats one address of another chunk, in other case.
    repeat = envelope("campaign.recipients", campaign_id="replay-1", chunk_index=3,
                      recipients=[{"email": people[5]["email"].upper()}])
    asyncio.run(publish(settings, [repeat]))

    commands = read_topic(settings.kafka_bootstrap_servers,
                          topic_name(Topic.SEND_COMMANDS, settings), idle=6.0, timeout=90)
    services.check_alive()
    decoded = [validate(orjson.loads(m.value()), Topic.SEND_COMMANDS) for m in commands]
    assert len(decoded) == 250
    ids = Counter(c["send_id"] for c in decoded)
    assert set(ids.values()) == {1}
    assert set(ids) == {send_id("replay-1", p["email"]) for p in people}
    # keyed by send id: every attempt of a recipient lands on one partition
    assert all(m.key().decode() == orjson.loads(m.value())["send_id"] for m in commands)
    assert len({m.partition() for m in commands}) == settings.send_commands_partitions
    by_email = {c["recipient"]["email"]: c for c in decoded}
    assert by_email["user00007@example.com"]["recipient"]["variables"] == {"code": "C7"}
    assert by_email["user00007@example.com"]["template"]["subject"].startswith("Hello")


def test_chunk_of_unknown_campaign_is_dead_lettered(
    settings: Settings, services: ServiceRunner
) -> None:
    services.start("planner")
    orphan = envelope("campaign.recipients", campaign_id="never-started", chunk_index=0,
                      recipients=[{"email": "a@example.com"}])
    produce_raw(settings.kafka_bootstrap_servers, topic_name(Topic.CAMPAIGN_COMMANDS, settings),
                [(b"never-started", encode(orphan))])
    dead = read_topic(settings.kafka_bootstrap_servers,
                      topic_name(Topic.DEAD_LETTERS, settings), expect=1, timeout=60)
    services.check_alive()
    letter = orjson.loads(dead[0].value())
    assert letter["error_type"] == "unknown_campaign"
    assert "never started" in letter["reason"]
    assert letter["campaign_id"] == "never-started"


def test_start_routed_to_an_unconfigured_account_is_refused_by_planner_and_reconciler(
    settings: Settings, services: ServiceRunner, sql: Callable[..., list[tuple]]
) -> None:
    services.start("planner")
    services.start("reconciler")
    bad = campaign("nowhere", account="no-such-account")
    asyncio.run(publish(settings, list(campaign_messages(bad, recipients(3)))))
    dead = read_topic(settings.kafka_bootstrap_servers,
                      topic_name(Topic.DEAD_LETTERS, settings), expect=4, idle=3.0, timeout=60)
    services.check_alive()
    letters = [orjson.loads(m.value()) for m in dead]
    starts = [d for d in letters if d["error_type"] == "invalid_campaign"]
    assert {d["service"] for d in starts} == {"planner", "reconciler"}
    assert all("'no-such-account', which is not configured (default)" in d["reason"] for d in starts)
    # its chunk has no campaign to join: the planner says so, nothing is sent
    orphans = [d["service"] for d in letters if d["error_type"] == "unknown_campaign"]
    assert sorted(orphans) == ["planner", "reconciler"]
    # the CRM is answered (issue 14, defect 7): the start is kept as a rejected campaign
    assert sql("SELECT status FROM campaigns") == [("rejected",)]
    assert read_topic(settings.kafka_bootstrap_servers, topic_name(Topic.SEND_COMMANDS, settings),
                      idle=1.0, timeout=5) == []
