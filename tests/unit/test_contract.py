"""The event contract: schema files, the examples in docs/EVENTS.md, and what is rejected."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from jsonschema import Draft7Validator

from services.pipeline import contract
from services.pipeline.contract import InvalidMessage, Message
from services.pipeline.topics import REGISTRY, Topic, kind_topic
from tests.support.contract_cases import drop, example, examples, invalid, set_field

ROOT = Path(__file__).resolve().parents[2]
KINDS = sorted(k for spec in REGISTRY.values() for k in spec.kinds)


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
    found = examples()
    assert sorted(found) == KINDS
    assert {k: len(v) for k, v in found.items()} == dict.fromkeys(KINDS, 1)


@pytest.mark.parametrize("kind", KINDS)
def test_events_md_example_is_valid(kind: str) -> None:
    message = example(kind)
    assert message["kind"] == kind
    topic = kind_topic(kind)
    assert contract.validate(message, topic) == message
    assert contract.decode(contract.encode(message), topic) == message
    assert not list(Draft7Validator(contract.load_schema(kind)).iter_errors(message))


def _many_recipients(m: Message) -> None:
    m["recipients"] = [{"email": f"user{i}@example.com"} for i in range(1001)]


def _bad_email(m: Message) -> None:
    m["recipients"][0]["email"] = "anna.petrova.example.com"


def _subject_newline(m: Message) -> None:
    m["template"]["subject"] = "Spring sale\r\nBcc: victim@example.org"


INVALID = [
    pytest.param(lambda: b"\xff{kind: campaign.start", Topic.CAMPAIGN_COMMANDS,
                 "not valid JSON", id="not-json"),
    invalid("missing-kind", "campaign.start", drop("kind"), "no 'kind'"),
    pytest.param(lambda: contract.encode(example("send.email")), Topic.CAMPAIGN_COMMANDS,
                 "unknown kind 'send.email' on mailer.campaign-commands", id="kind-on-wrong-topic"),
    invalid("schema-version-2", "campaign.start", set_field("schema_version", 2),
             "unsupported schema_version 2"),
    invalid("chunk-1001-recipients", "campaign.recipients", _many_recipients,
             "recipients must contain less than or equal to 1000 items"),
    invalid("start-without-template", "campaign.start", drop("template"), "['template']"),
    invalid("bad-email", "campaign.recipients", _bad_email, "recipients[0].email must match"),
    invalid("occurred-at-without-z", "outcome.sent",
             set_field("occurred_at", "2026-03-20T09:00:02.031"), "occurred_at must match"),
    invalid("extra-property", "campaign.pause", set_field("colour", "red"), "{'colour'}"),
    invalid("deferred-without-deferred-until", "outcome.deferred", drop("deferred_until"),
             "['deferred_until']"),
    invalid("subject-with-newline", "campaign.test_email", _subject_newline,
             "template.subject must match"),
]


@pytest.mark.parametrize(("raw", "topic", "named"), INVALID)
def test_invalid_message_is_rejected_with_a_reason(
    raw: Callable[[], bytes], topic: Topic, named: str
) -> None:
    with pytest.raises(InvalidMessage) as err:
        contract.decode(raw(), topic)
    assert named in err.value.reason
