"""Issue 14, defects 1, 2, 7 and 8: the pure rules behind the guards (the live cases are in
tests/integration/test_outside_guards.py)."""

from __future__ import annotations

import pytest

from services.pipeline.admission import rejected_command, start_digest, template_problem
from services.pipeline.admission_texts import refusal_texts
from services.pipeline.contract import encode
from services.planner.chunks import digest, refusal
from tests.support.campaigns import campaign
from tests.support.contract_cases import example

PEOPLE = [{"email": f"u{i}@example.com"} for i in range(10)]


def test_d1_a_chunk_index_at_or_beyond_the_declared_chunks_is_refused() -> None:
    refused = refusal(1, 1_000, digest(PEOPLE), declared_chunks=1, declared_recipients=10,
                      received={0: (10, "x")})
    assert refused is not None and refused.code == "chunk_not_declared"
    assert refused.reason.startswith("Chunk 1 was not declared: the start declared 1 chunk(s), "
                                     "numbered 0 to 0.")
    assert "Часть 1 не была объявлена" in refused.reason_ru


def test_d1_recipients_beyond_the_declared_total_are_counted_as_they_arrive() -> None:
    assert refusal(0, 8, "a", declared_chunks=2, declared_recipients=10, received={}) is None
    refused = refusal(1, 1_000, "b", declared_chunks=2, declared_recipients=10, received={0: (8, "a")})
    assert refused is not None and refused.code == "recipients_over_declared"
    assert "to 1,008 recipients; its start declared 10" in refused.reason
    assert refusal(1, 2, "c", declared_chunks=2, declared_recipients=10, received={0: (8, "a")}) is None


def test_d1_the_recipient_maximum_still_applies() -> None:
    refused = refusal(1, 6, "b", declared_chunks=2, declared_recipients=20, received={0: (5, "a")}, limit=10)
    assert refused is not None and refused.code == "recipients_over_limit"


def test_d2_a_received_index_takes_a_replay_only() -> None:
    received: dict[int, tuple[int, str | None]] = {0: (10, digest(PEOPLE))}
    assert refusal(0, 10, digest(list(PEOPLE)), declared_chunks=1, declared_recipients=10,
                   received=received) is None
    other = digest(PEOPLE[:5])
    refused = refusal(0, 5, other, declared_chunks=1, declared_recipients=10, received=received)
    assert refused is not None and refused.code == "chunk_conflict"
    # a chunk recorded before digests were kept is taken as a replay
    assert refusal(0, 5, other, declared_chunks=1, declared_recipients=10, received={0: (10, None)}) is None


def test_d2_a_start_digest_ignores_envelope_and_actor_but_not_content() -> None:
    start = example("campaign.start")
    same = {**start, "message_id": "other", "occurred_at": "2026-03-21T00:00:00.000Z",
            "actor_id": "ops-1", "actor_role": "ops"}
    assert start_digest(start, "default") == start_digest(same, "default")
    changed = {**start, "template": {"subject": "Other", "text": "x"}}
    assert start_digest(start, "default") != start_digest(changed, "default")
    assert start_digest(start, "default") != start_digest(start, "other-account")


SANDBOX = "forbidden by the sandbox"


@pytest.mark.parametrize(("template", "found"), [
    ({"subject": "Hello {{ name ", "text": "x"}, "subject: syntax error on line 1"),
    ({"subject": "x", "text": "{{ ''.__class__ }}"}, f"text: {SANDBOX}: access to attribute '__class__'"),
    ({"subject": "x", "html": "{% if vip %}{{ x['__globals__'] }}{% endif %}"}, f"html: {SANDBOX}"),
    ({"subject": "x", "text": "{{ x|attr('__class__') }}"}, f"text: {SANDBOX}"),
    ({"subject": "x", "text": "{% include 'secrets.txt' %}"}, f"text: {SANDBOX}: {{% include %}}"),
    ({"subject": "x", "text": "{% for i in range(1000) %}{% for j in range(1000) %}{% endfor %}{% endfor %}"},
     f"text: {SANDBOX}: loops"),
    ({"subject": "x", "text": "{% for i in range(3) %}{{ i }}{% endfor %} {{ code }}"}, None),
    ({"subject": "x", "text": "{{ 100 // parts }}"}, None),  # depends on each recipient's data
])
def test_d8_templates_are_compiled_and_checked(template: dict[str, str], found: str | None) -> None:
    problem = template_problem(campaign("t", template=template))
    assert (problem is None) if found is None else (problem or "").startswith(found), problem


def test_d8_the_unsubscribe_url_template_is_checked_too() -> None:
    assert template_problem(campaign("t", unsubscribe_url="https://x.example/{{ email.__class__ }}"))
    assert template_problem(campaign("t", unsubscribe_url="https://x.example/{{ email|urlencode }}")) is None


def test_d8_the_refusal_text_names_the_problem_in_both_languages() -> None:
    en, ru = refusal_texts("template_invalid", problem="text: syntax error on line 1: unexpected '}'")
    assert en.startswith("The template cannot be used (text: syntax error on line 1")
    assert ru.startswith("Шаблон нельзя использовать (text: syntax error on line 1")


def test_d7_an_unreadable_start_or_chunk_gives_its_campaign_id_and_reason() -> None:
    start = example("campaign.start")
    start["from"] = {"email": "news@shop"}
    found = rejected_command(encode(start))
    assert found is not None and found.kind == "campaign.start"
    assert found.campaign_id == start["campaign_id"] and found.manager_id == start["manager_id"]
    assert "from" in found.reason and found.message_id == start["message_id"]
    chunk = example("campaign.recipients")
    chunk["recipients"][0]["email"] = "nobody@"
    found = rejected_command(encode(chunk))
    assert found is not None and found.chunk_index == 0 and "recipients[0].email" in found.reason
    # valid ones, other kinds, unreadable ids and unparsable bytes give nothing
    assert rejected_command(encode(example("campaign.start"))) is None
    assert rejected_command(encode({**example("campaign.pause"), "x": 1})) is None
    assert rejected_command(encode({**start, "campaign_id": "bad id\n"})) is None
    assert rejected_command(b"\xff{") is None and rejected_command(None) is None
    # a check the schema cannot express (an unconfigured account) is a reason too
    assert rejected_command(encode(example("campaign.start")), lambda m: "no such account") is not None


def test_every_reason_code_of_a_status_event_has_both_texts() -> None:
    from services.pipeline.admission_texts import _REFUSALS, CHUNK_REFUSALS
    from services.pipeline.contract import load_schema

    codes = set(load_schema("campaign.status")["properties"]["reason_code"]["enum"])
    assert codes - {"forbidden"} <= set(_REFUSALS)  # forbidden's texts name the actor
    assert set(CHUNK_REFUSALS) | {"template_invalid", "campaign_id_reused", "invalid_start"} <= codes
    assert "rejected" in load_schema("campaign.status")["definitions"]["status"]["enum"]


def test_the_rejected_start_example_of_the_docs_is_valid() -> None:
    import json
    import re
    from pathlib import Path

    from services.pipeline.contract import validate
    from services.pipeline.topics import Topic

    text = (Path(__file__).resolve().parents[2] / "docs" / "EVENTS.md").read_text(encoding="utf-8")
    [block] = [b for b in re.findall(r"```json\n(.*?)^```", text, re.M | re.S) if '"invalid_start"' in b]
    event = validate(json.loads(block), Topic.CAMPAIGN_STATUS)
    assert event["status"] == "rejected" and event["command"] == "campaign.start"
