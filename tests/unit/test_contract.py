"""The event contract: schema files, the examples in docs/EVENTS.md, and what is rejected."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft7Validator

from services.pipeline import contract
from services.pipeline.contract import InvalidMessage, Message
from services.pipeline.topics import REGISTRY, Topic, kind_topic

ROOT = Path(__file__).resolve().parents[2]
EVENTS_MD = ROOT / "docs" / "EVENTS.md"
KINDS = sorted(k for spec in REGISTRY.values() for k in spec.kinds)
_EXAMPLE = re.compile(r"^### (\S+)[ \t]*\n+```json\n(.*?)^```", re.MULTILINE | re.DOTALL)


def _examples() -> dict[str, list[Message]]:
    found: dict[str, list[Message]] = {}
    for kind, body in _EXAMPLE.findall(EVENTS_MD.read_text(encoding="utf-8")):
        found.setdefault(kind, []).append(json.loads(body))
    return found


def _example(kind: str) -> Message:
    return copy.deepcopy(_examples()[kind][0])


def test_every_registered_kind_has_a_schema_and_every_schema_a_kind() -> None:
    files = {p.name.removesuffix(".v1.json") for p in contract.SCHEMAS_DIR.glob("*.json")}
    assert files == set(KINDS)
    for kind in KINDS:
        assert contract.load_schema(kind)["properties"]["kind"]["const"] == kind


@pytest.mark.parametrize("kind", KINDS)
def test_schema_is_valid_draft7(kind: str) -> None:
    schema = contract.load_schema(kind)
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    Draft7Validator.check_schema(schema)
    assert schema["additionalProperties"] is False


def test_events_md_has_exactly_one_example_per_kind() -> None:
    examples = _examples()
    assert sorted(examples) == KINDS
    assert {k: len(v) for k, v in examples.items()} == dict.fromkeys(KINDS, 1)


@pytest.mark.parametrize("kind", KINDS)
def test_events_md_example_is_valid(kind: str) -> None:
    example = _example(kind)
    assert example["kind"] == kind
    topic = kind_topic(kind)
    assert contract.validate(example, topic) == example
    assert contract.decode(contract.encode(example), topic) == example
    assert not list(Draft7Validator(contract.load_schema(kind)).iter_errors(example))


def _drop(key: str) -> Callable[[Message], None]:
    return lambda m: m.pop(key)


def _set(key: str, value: Any) -> Callable[[Message], None]:
    return lambda m: m.__setitem__(key, value)


def _many_recipients(m: Message) -> None:
    m["recipients"] = [{"email": f"user{i}@example.com"} for i in range(1001)]


def _bad_email(m: Message) -> None:
    m["recipients"][0]["email"] = "anna.petrova.example.com"


def _subject_newline(m: Message) -> None:
    m["template"]["subject"] = "Spring sale\r\nBcc: victim@example.org"


def _mutated(kind: str, mutate: Callable[[Message], None]) -> bytes:
    message = _example(kind)
    mutate(message)
    return contract.encode(message)


def _invalid(case: str, kind: str, mutate: Callable[[Message], None], named: str) -> Any:
    return pytest.param(lambda: _mutated(kind, mutate), kind_topic(kind), named, id=case)


INVALID = [
    pytest.param(lambda: b"\xff{kind: campaign.start", Topic.CAMPAIGN_COMMANDS,
                 "not valid JSON", id="not-json"),
    _invalid("missing-kind", "campaign.start", _drop("kind"), "no 'kind'"),
    pytest.param(lambda: contract.encode(_example("send.email")), Topic.CAMPAIGN_COMMANDS,
                 "unknown kind 'send.email' on mailer.campaign-commands", id="kind-on-wrong-topic"),
    _invalid("schema-version-2", "campaign.start", _set("schema_version", 2),
             "unsupported schema_version 2"),
    _invalid("chunk-1001-recipients", "campaign.recipients", _many_recipients,
             "recipients must contain less than or equal to 1000 items"),
    _invalid("start-without-template", "campaign.start", _drop("template"), "['template']"),
    _invalid("bad-email", "campaign.recipients", _bad_email, "recipients[0].email must match"),
    _invalid("occurred-at-without-z", "outcome.sent",
             _set("occurred_at", "2026-03-20T09:00:02.031"), "occurred_at must match"),
    _invalid("extra-property", "campaign.pause", _set("colour", "red"), "{'colour'}"),
    _invalid("deferred-without-deferred-until", "outcome.deferred", _drop("deferred_until"),
             "['deferred_until']"),
    _invalid("subject-with-newline", "campaign.test_email", _subject_newline,
             "template.subject must match"),
]


@pytest.mark.parametrize(("raw", "topic", "named"), INVALID)
def test_invalid_message_is_rejected_with_a_reason(
    raw: Callable[[], bytes], topic: Topic, named: str
) -> None:
    with pytest.raises(InvalidMessage) as err:
        contract.decode(raw(), topic)
    assert named in err.value.reason
