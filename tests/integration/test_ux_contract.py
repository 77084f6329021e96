"""The managers' contract (docs/UX_CONTRACT.md, R21): the guarantees no other test covers whole.

Every start gets an answer within seconds; a campaign never disappears and cannot be deleted,
only paused or cancelled.
"""

from __future__ import annotations

import asyncio
import re
import time
import urllib.error
import urllib.request

import orjson
import pytest

from services.pipeline.contract import envelope
from services.pipeline.publish import publish_campaign
from services.pipeline.settings import Settings
from services.pipeline.topics import Topic, topic_name
from tests.support.campaigns import campaign, recipients
from tests.support.events import StatusEvents
from tests.support.kafka import produce_raw, read_topic
from tests.support.poll import auth_headers, get_json, wait_for_status
from tests.support.processes import ROOT, ServiceRunner

pytestmark = pytest.mark.integration

#: Seconds within which a manager hears back about a start.
ANSWER_WITHIN = 10.0


def test_every_start_is_answered_within_seconds(settings: Settings, services: ServiceRunner) -> None:
    for name in ("planner", "sender", "reconciler"):
        services.start(name)
    events = StatusEvents(settings.kafka_bootstrap_servers, topic_name(Topic.CAMPAIGN_STATUS, settings))
    try:
        cases = {
            "accepted": ({}, 3, "sending"),
            "large": ({}, 1_001, "needs_confirmation"),
            "stranger": ({"actor_id": "manager-8"}, 3, "forbidden"),
        }
        for campaign_id, (fields, n, answer) in cases.items():
            published = time.time()
            people = recipients(n, domain=f"{campaign_id}.example.com")
            asyncio.run(publish_campaign(settings, campaign(campaign_id, **fields), people))
            seen, event = events.wait_for(campaign_id, answer, timeout=ANSWER_WITHIN * 3)
            assert seen - published <= ANSWER_WITHIN, (campaign_id, seen - published)
            assert event["reason"], event  # every answer says why
            print(f"\n{campaign_id}: {answer} {seen - published:.2f}s after the start was published")
    finally:
        events.close()


def test_a_campaign_cannot_be_deleted_only_paused_or_cancelled(
    settings: Settings, services: ServiceRunner,
) -> None:
    services.start("planner")
    services.start("reconciler")
    asyncio.run(publish_campaign(settings, campaign("kept"), recipients(2, domain="kept.example.com")))
    url = f"http://127.0.0.1:{settings.http_port}/campaigns/kept"
    wait_for_status(settings, services, "kept", "sending")
    # the API has no DELETE
    request = urllib.request.Request(url, method="DELETE", headers=auth_headers())
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=5)
    assert refused.value.code == 405
    # the contract has no delete command: it is a dead letter, and the campaign stays
    delete = envelope("campaign.delete", campaign_id="kept", actor_id="manager-7", actor_role="manager")
    produce_raw(settings.kafka_bootstrap_servers, topic_name(Topic.CAMPAIGN_COMMANDS, settings),
                [(b"kept", orjson.dumps(delete))])
    dead = read_topic(settings.kafka_bootstrap_servers, topic_name(Topic.DEAD_LETTERS, settings), expect=2)
    reasons = [orjson.loads(d.value())["reason"] for d in dead]
    assert all("campaign.delete" in r for r in reasons), reasons
    assert get_json(url)[0] == 200
    # and no code removes a campaign or its recipients
    code = "\n".join(p.read_text() for p in (ROOT / "services").rglob("*.py"))
    assert not re.search(r"DELETE\s+FROM\s+(campaigns|recipients|audit_log)\b", code, re.I)
