"""Issue 14, defects 1, 2, 7 and 8: guards and permissions tried from outside, as a CRM would.

The CRM publishes with the contract only (docs/EVENTS.md, schemas/): starts whose chunks do
not match what they declared, a start reusing the id of another manager's campaign, starts
and chunks no schema accepts, templates that cannot be rendered. Each case reads what a
manager reads (the campaign-status events, the poll endpoint, `mailer ops stuck`) and what
an SMTP server received: nothing refused is ever sent, and every refusal says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest

from services.pipeline.contract import encode, envelope, validate
from services.pipeline.publish import campaign_messages, publish
from services.pipeline.settings import Settings
from services.pipeline.topics import Topic, topic_name
from tests.support.campaigns import campaign, recipients
from tests.support.events import StatusEvents
from tests.support.kafka import produce_raw, read_topic
from tests.support.poll import get_json, wait_for_status
from tests.support.processes import ROOT, ServiceRunner
from tests.support.smtp_server import SmtpServer

pytestmark = pytest.mark.integration

SQL = Callable[..., list[tuple]]


@pytest.fixture
def pipeline(settings: Settings, services: ServiceRunner) -> Iterator[StatusEvents]:
    for name in ("planner", "sender", "reconciler"):
        services.start(name)
    events = StatusEvents(settings.kafka_bootstrap_servers, topic_name(Topic.CAMPAIGN_STATUS, settings))
    yield events
    events.close()


def start_message(campaign_id: str, total_recipients: int, total_chunks: int,
                  **fields: Any) -> dict[str, Any]:
    """A valid `campaign.start` declaring the given totals (whatever chunks follow)."""
    definition = campaign(campaign_id, **fields)
    start = next(iter(campaign_messages(definition, recipients(1))))
    start.update(total_recipients=total_recipients, total_chunks=total_chunks)
    return validate(start, Topic.CAMPAIGN_COMMANDS)


def chunk_message(campaign_id: str, index: int, people: list[dict[str, Any]]) -> dict[str, Any]:
    return validate(envelope("campaign.recipients", campaign_id=campaign_id, chunk_index=index,
                             recipients=people), Topic.CAMPAIGN_COMMANDS)


def poll(settings: Settings, campaign_id: str, lang: str = "en") -> tuple[int, dict[str, Any]]:
    return get_json(f"http://127.0.0.1:{settings.http_port}/campaigns/{campaign_id}",
                    headers={"Accept-Language": lang})


def dead_letters(settings: Settings, expect: int | None = None) -> list[dict[str, Any]]:
    return [orjson.loads(m.value()) for m in read_topic(
        settings.kafka_bootstrap_servers, topic_name(Topic.DEAD_LETTERS, settings), expect=expect,
        idle=3.0, timeout=60)]


def events_of(events: StatusEvents, campaign_id: str) -> list[dict[str, Any]]:
    return [e for _, e in events.seen if e["campaign_id"] == campaign_id]


def wait_for_event(events: StatusEvents, campaign_id: str, check: Callable[[dict[str, Any]], bool],
                   timeout: float = 60.0) -> dict[str, Any]:
    """The first status event of `campaign_id` that `check` accepts (each is schema-valid)."""
    deadline = time.monotonic() + timeout
    while True:
        for event in events_of(events, campaign_id):
            if check(event):
                return validate(dict(event), Topic.CAMPAIGN_STATUS)
        if time.monotonic() > deadline:
            raise AssertionError(f"no such event for {campaign_id}: {events_of(events, campaign_id)}")
        with contextlib.suppress(AssertionError):  # reads what arrives for half a second
            events.wait_for(campaign_id, "__never__", timeout=0.5)


def chunk_refused(index: int, code: str) -> Callable[[dict[str, Any]], bool]:
    """Whether a status event refuses chunk `index` with `code`."""
    return lambda e: (e.get("reason_code") == code and e.get("command") == "campaign.recipients"
                      and f"Chunk {index} " in e["reason"])


def mailer(services: ServiceRunner, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "services.pipeline.cli", *argv], cwd=ROOT,
                          env=services.env(), capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)


def test_d1_chunks_beyond_the_declared_chunks_or_recipients_are_refused_and_never_mailed(
    settings: Settings, services: ServiceRunner, pipeline: StatusEvents, smtp_server: SmtpServer, sql: SQL,
) -> None:
    # The case: 10 recipients and 1 chunk declared (no confirmation needed), then 1,510 arrive.
    small = recipients(1_510, domain="declared.example.com")
    asyncio.run(publish(settings, [
        start_message("declared", 10, 1),
        chunk_message("declared", 0, small[:10]),
        chunk_message("declared", 1, small[10:1_010]),
        chunk_message("declared", 2, small[1_010:]),
    ]))
    # Two chunks declared for 10 recipients; the second brings 1,000 more than declared.
    over = recipients(1_010, domain="over.example.com")
    asyncio.run(publish(settings, [
        start_message("over", 10, 2),
        chunk_message("over", 0, over[:8]),
        chunk_message("over", 1, over[8:1_008]),
    ]))
    for campaign_id, index, code in (("declared", 1, "chunk_not_declared"),
                                     ("declared", 2, "chunk_not_declared"),
                                     ("over", 1, "recipients_over_declared")):
        event = wait_for_event(pipeline, campaign_id, chunk_refused(index, code))
        assert event["reason_ru"], event
    body = wait_for_status(settings, services, "declared", "completed")
    assert body["counts"]["total"] == 10 and body["counts"]["sent"] == 10, body
    assert body["declared"] == {"recipients": 10, "chunks": 1, "chunks_received": 1}
    # "over" waits for its chunk 1, which was refused; the CRM sends it again, corrected
    _, over_body = poll(settings, "over")
    assert [c["chunk_index"] for c in over_body["refused_chunks"]] == [1], over_body
    asyncio.run(publish(settings, [chunk_message("over", 1, over[8:10])]))
    body = wait_for_status(settings, services, "over", "completed")
    assert body["counts"]["sent"] == 10 and body["refused_chunks"] == [], body
    # A chunk with a new index to a completed campaign is refused too.
    asyncio.run(publish(settings, [chunk_message("declared", 5, recipients(3, domain="late.example.com"))]))
    wait_for_event(pipeline, "declared", lambda e: e.get("reason_code") == "chunk_not_declared"
                   and "Chunk 5 " in e["reason"])
    letters = dead_letters(settings, expect=4)
    planner = sorted((d["campaign_id"], d["error_type"]) for d in letters if d["service"] == "planner")
    assert planner == [("declared", "chunk_not_declared")] * 3 + [("over", "recipients_over_declared")], \
        letters
    time.sleep(2)  # whatever was wrongly planned would be at the SMTP server by now
    delivered = smtp_server.delivered()
    assert len(delivered) == 20 and set(delivered.values()) == {1}
    assert {e.split("@")[1] for e in delivered} == {"declared.example.com", "over.example.com"}
    assert sql("SELECT count(*) FROM planned_sends") == [(20,)]
    assert sql("SELECT total, sent FROM campaigns WHERE campaign_id = 'declared'") == [(10, 10)]


def test_d2_another_managers_start_and_chunk_on_an_existing_id_change_nothing(
    settings: Settings, services: ServiceRunner, pipeline: StatusEvents, smtp_server: SmtpServer, sql: SQL,
) -> None:
    mine = recipients(3, domain="owned.example.com")
    asyncio.run(publish(settings, list(campaign_messages(campaign("owned"), mine))))
    wait_for_status(settings, services, "owned", "completed")
    # Manager B reuses the id: own start (other template and From), then a chunk of 5 new addresses.
    theirs = campaign("owned", manager_id="manager-8", template={"subject": "B's", "text": "B's text"},
                      **{"from": {"email": "b@other.example.com"}})
    b_start = next(iter(campaign_messages(theirs, recipients(5))))
    b_chunk = chunk_message("owned", 0, recipients(5, domain="b.example.com"))
    asyncio.run(publish(settings, [b_start, b_chunk]))
    forbidden = wait_for_event(pipeline, "owned", lambda e: e["status"] == "forbidden")
    assert forbidden["command"] == "campaign.start" and forbidden["previous_status"] == "completed"
    assert "manager-8 may not start a campaign of manager-7" in forbidden["reason"], forbidden
    conflict = wait_for_event(pipeline, "owned", lambda e: e.get("reason_code") == "chunk_conflict")
    assert conflict["command"] == "campaign.recipients" and conflict["status"] == "completed"
    # Manager A publishes a start with the same id and different content: refused, not a replay.
    changed = campaign("owned", template={"subject": "Other subject", "text": "Other"})
    asyncio.run(publish(settings, [next(iter(campaign_messages(changed, mine)))]))
    reused = wait_for_event(pipeline, "owned", lambda e: e.get("reason_code") == "campaign_id_reused")
    assert reused["status"] == "rejected" and reused["command"] == "campaign.start"
    assert reused["previous_status"] == "completed" and reused["reason_ru"]
    # A true replay of A's start (same content) changes nothing and is not refused.
    asyncio.run(publish(settings, list(campaign_messages(campaign("owned"), mine))))
    letters = dead_letters(settings, expect=3)
    assert sorted(d["error_type"] for d in letters if d["service"] == "planner") == [
        "campaign_id_reused", "chunk_conflict", "forbidden"], letters
    assert sql("SELECT actor, action, before_status, after_status FROM audit_log"
               " WHERE campaign_id = 'owned' AND action = 'forbidden_start'") == [
        ("manager-8", "forbidden_start", "completed", "completed")]
    time.sleep(2)
    _, body = poll(settings, "owned")
    assert body["status"] == "completed" and body["counts"]["total"] == 3 and body["counts"]["sent"] == 3
    assert body["manager_id"] == "manager-7"
    assert set(smtp_server.delivered()) == {p["email"] for p in mine}
    assert all(m.message["From"] == "Shop <news@shop.example.com>" for m in smtp_server.messages())
    answers = [e["reason_code"] for e in events_of(pipeline, "owned") if e.get("command") == "campaign.start"]
    assert answers == ["forbidden", "campaign_id_reused"]


def test_d7_an_invalid_start_is_answered_rejected_and_the_poll_endpoint_knows_it(
    settings: Settings, services: ServiceRunner, pipeline: StatusEvents, smtp_server: SmtpServer,
) -> None:
    bad = start_message("unreadable", 2, 1)
    bad["from"] = {"email": "news@shop"}  # no valid address: the schema or the checks refuse it
    produce_raw(settings.kafka_bootstrap_servers, topic_name(Topic.CAMPAIGN_COMMANDS, settings),
                [(b"unreadable", encode(bad))])
    rejected = wait_for_event(pipeline, "unreadable", lambda e: e["status"] == "rejected")
    assert rejected["reason_code"] == "invalid_start" and rejected["previous_status"] is None
    assert "from" in rejected["reason"] and rejected["reason_ru"], rejected
    code, body = poll(settings, "unreadable")
    assert code == 200 and body["status"] == "rejected", body
    assert body["reason_code"] == "invalid_start" and "from" in body["reason"]
    _, ru = poll(settings, "unreadable", "ru")
    assert "Запуск" in ru["reason"] or "запуск" in ru["reason"], ru
    # the CRM fixes it and publishes the start again, same id: it is taken and sent
    asyncio.run(publish(settings, list(campaign_messages(campaign("unreadable"), recipients(2)))))
    wait_for_event(pipeline, "unreadable",
                   lambda e: e["status"] == "sending" and e["previous_status"] == "rejected")
    wait_for_status(settings, services, "unreadable", "completed")
    assert len(smtp_server.delivered()) == 2


def test_d7_a_campaign_waiting_for_a_refused_chunk_says_so_and_ops_stuck_flags_it(
    settings: Settings, services: ServiceRunner, pipeline: StatusEvents, smtp_server: SmtpServer,
) -> None:
    asyncio.run(publish(settings, [start_message("orphaned", 2, 1)]))
    pipeline.wait_for("orphaned", "sending")
    chunk = chunk_message("orphaned", 0, recipients(2))
    chunk["recipients"][1]["email"] = "not-an-address@"
    produce_raw(settings.kafka_bootstrap_servers, topic_name(Topic.CAMPAIGN_COMMANDS, settings),
                [(b"orphaned", encode(chunk))])
    refused = wait_for_event(pipeline, "orphaned", lambda e: e.get("reason_code") == "chunk_invalid")
    assert refused["command"] == "campaign.recipients" and "recipients[1].email" in refused["reason"]
    code, body = poll(settings, "orphaned")
    assert code == 200 and body["status"] == "sending"
    assert [c["chunk_index"] for c in body["refused_chunks"]] == [0], body
    assert "chunk 0" in body["reason"].lower() and "refused" in body["reason"].lower(), body
    shown = mailer(services, "show", "orphaned")
    assert "refused" in shown.stdout.lower() and "chunk 0" in shown.stdout.lower(), shown.stdout
    stuck = mailer(services, "ops", "stuck")
    assert stuck.returncode == 1, (stuck.stdout, stuck.stderr)
    assert "orphaned" in stuck.stdout and "chunk 0" in stuck.stdout, stuck.stdout
    inspected = mailer(services, "ops", "campaign", "orphaned")
    assert "refused chunks:" in inspected.stdout, inspected.stdout
    assert any(line.split()[:3] == ["0", "chunk_invalid", "yes"]
               for line in inspected.stdout.splitlines()), inspected.stdout
    assert not smtp_server.messages()


def test_d8_templates_are_checked_at_admission_and_failed_recipients_show_the_reason(
    settings: Settings, services: ServiceRunner, pipeline: StatusEvents, smtp_server: SmtpServer,
) -> None:
    cases = {
        "syntax": {"subject": "Hello {{ name ", "text": "Hi"},
        "escape": {"subject": "Hello", "text": "{{ ''.__class__.__mro__[1].__subclasses__() }}"},
        "hidden": {"subject": "Hi", "text": "{% if vip %}{{ cycler.__init__.__globals__ }}{% endif %}"},
    }
    for campaign_id, template in cases.items():
        asyncio.run(publish(settings, list(campaign_messages(campaign(campaign_id, template=template),
                                                             recipients(2)))))
    for campaign_id in cases:
        event = wait_for_event(pipeline, campaign_id, lambda e: e["status"] == "refused")
        assert event["reason_code"] == "template_invalid", event
        assert "template" in event["reason"].lower() and "шаблон" in event["reason_ru"].lower(), event
        _, body = poll(settings, campaign_id)
        assert body["status"] == "refused" and body["reason_code"] == "template_invalid", body
    assert "syntax error" in events_of(pipeline, "syntax")[0]["reason"]
    assert "forbidden by the sandbox" in events_of(pipeline, "escape")[0]["reason"]
    assert "forbidden by the sandbox" in events_of(pipeline, "hidden")[0]["reason"]
    # a template that fails only with some recipients' data is sent, and the failure says why
    data = campaign("by-data", template={"subject": "Hi", "text": "{{ 100 // parts }}"})
    people = recipients(2)
    people[0]["variables"] = {"parts": 4}
    people[1]["variables"] = {"parts": 0}
    asyncio.run(publish(settings, list(campaign_messages(data, people))))
    body = wait_for_status(settings, services, "by-data", "completed")
    assert body["counts"]["sent"] == 1 and body["counts"]["failed"] == 1, body
    [failed] = body["failed_recipients"]
    assert failed["error_class"] == "template_error" and "ZeroDivisionError" in failed["reason"], failed
    assert len(smtp_server.messages()) == 1
