"""Every service logs JSON lines naming the service, the event and the ids, addresses masked (R22)."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from services.pipeline.publish import publish_campaign
from services.pipeline.settings import Settings
from tests.support.campaigns import campaign, recipients
from tests.support.poll import wait_for_status
from tests.support.processes import ServiceRunner
from tests.support.smtp_server import SmtpServer

pytestmark = pytest.mark.integration


def test_services_log_json_events_with_ids_and_masked_addresses(
    settings: Settings, services: ServiceRunner, smtp_server: SmtpServer,
) -> None:
    for name in ("planner", "sender", "reconciler"):
        services.start(name)
    people = recipients(20, domain="logs.example.com")
    smtp_server.reject(people[3]["email"])
    asyncio.run(publish_campaign(settings, campaign("logged"), people))
    wait_for_status(settings, services, "logged", "completed")
    services.stop_all()

    for name, _, path in services.procs:
        lines = [line for line in path.read_text().splitlines() if line.startswith("{")]
        assert lines, f"{name} wrote no JSON log line"
        for line in lines:
            record = orjson.loads(line)  # every line a JSON object
            assert record["service"] == name and {"ts", "level", "logger", "event"} <= set(record)
    sender_log = next(p for n, _, p in services.procs if n == "sender").read_text()
    events = [orjson.loads(line) for line in sender_log.splitlines() if line.startswith("{")]
    sent = [e for e in events if e["event"] == "send.sent"]
    failed = [e for e in events if e["event"] == "send.failed"]
    assert len(sent) == 19 and len(failed) == 1
    assert {e["campaign_id"] for e in sent} == {"logged"}
    assert all(e["send_id"] and e["account"] == "default" and e["smtp_code"] == 250 for e in sent)
    assert failed[0]["smtp_code"] == 550 and failed[0]["error_type"] == "permanent"
    assert failed[0]["recipient"] == "u***@logs.example.com"  # masked
    assert "user00003@logs.example.com" not in sender_log
