"""The suppression topic's contract: its registry entry, its kinds, and what is rejected."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from services.pipeline import contract
from services.pipeline.contract import InvalidMessage, Message
from services.pipeline.topics import REGISTRY, Topic, kind_topic
from tests.support.campaigns import outcome

EVENTS_MD = Path(__file__).resolve().parents[2] / "docs" / "EVENTS.md"
KINDS = ("suppression.add", "suppression.remove")


def _example(kind: str) -> Message:
    """The example of `kind` in docs/EVENTS.md (a fresh copy)."""
    found = re.search(rf"^### {re.escape(kind)}[ \t]*\n+```json\n(.*?)^```",
                      EVENTS_MD.read_text(encoding="utf-8"), re.MULTILINE | re.DOTALL)
    assert found, f"no example of {kind} in docs/EVENTS.md"
    message: Message = json.loads(found.group(1))
    return message


def test_registry_declares_the_suppression_topic() -> None:
    spec = REGISTRY[Topic.SUPPRESSIONS]
    assert Topic.SUPPRESSIONS.value == "mailer.suppressions"
    assert spec.kinds == KINDS
    assert spec.partitions == 4
    assert spec.key.startswith("email")
    assert "reconciler" in spec.consumers
    assert {"crm", "unsubscribe endpoint"} <= set(spec.producers)
    assert all(kind_topic(kind) is Topic.SUPPRESSIONS for kind in KINDS)


@pytest.mark.parametrize(
    ("kind", "fields"),
    [
        ("suppression.add", {"email": "Anna.Petrova@Example.com", "reason": "complaint"}),
        ("suppression.add", {"email": "a@b.co", "reason": "hard_bounce", "source": "x" * 256,
                             "actor_id": "crm-user-17"}),
        ("suppression.remove", {"email": "anna.petrova@example.com"}),
        ("suppression.remove", {"email": "anna.petrova@example.com", "source": "",
                                "actor_id": "unsubscribe-endpoint"}),
    ],
)
def test_messages_built_with_the_envelope_are_valid(kind: str, fields: dict[str, Any]) -> None:
    message = contract.envelope(kind, **fields)
    assert contract.decode(contract.encode(message), Topic.SUPPRESSIONS) == message


@pytest.mark.parametrize("reason", ["unsubscribe", "hard_bounce", "complaint", "manual"])
def test_every_reason_is_accepted(reason: str) -> None:
    message = _example("suppression.add")
    message["reason"] = reason
    assert contract.validate(message, Topic.SUPPRESSIONS) == message


def _drop(key: str) -> Callable[[Message], None]:
    return lambda m: m.pop(key)


def _set(key: str, value: Any) -> Callable[[Message], None]:
    return lambda m: m.__setitem__(key, value)


def _mutated(kind: str, mutate: Callable[[Message], None]) -> bytes:
    message = _example(kind)
    mutate(message)
    return contract.encode(message)


def _invalid(case: str, kind: str, mutate: Callable[[Message], None], named: str) -> Any:
    return pytest.param(lambda: _mutated(kind, mutate), kind_topic(kind), named, id=case)


INVALID = [
    _invalid("add-without-email", "suppression.add", _drop("email"), "['email']"),
    _invalid("add-without-reason", "suppression.add", _drop("reason"), "['reason']"),
    _invalid("add-unknown-reason", "suppression.add", _set("reason", "bored"), "reason must be one of"),
    _invalid("add-bad-email", "suppression.add", _set("email", "john.smith.example.org"),
             "email must match"),
    _invalid("add-email-with-blanks", "suppression.add", _set("email", " john@example.org "),
             "email must match"),
    _invalid("add-source-too-long", "suppression.add", _set("source", "x" * 257),
             "source must be shorter than or equal to 256"),
    _invalid("add-bad-actor", "suppression.add", _set("actor_id", "-nobody"), "actor_id must match"),
    _invalid("add-extra-property", "suppression.add", _set("campaign_id", "c1"), "{'campaign_id'}"),
    _invalid("remove-with-reason", "suppression.remove", _set("reason", "manual"), "{'reason'}"),
    _invalid("remove-without-email", "suppression.remove", _drop("email"), "['email']"),
    _invalid("remove-schema-version-2", "suppression.remove", _set("schema_version", 2),
             "unsupported schema_version 2"),
    pytest.param(lambda: contract.encode(_example("suppression.add")), Topic.CAMPAIGN_COMMANDS,
                 "unknown kind 'suppression.add' on mailer.campaign-commands", id="kind-on-wrong-topic"),
    pytest.param(lambda: contract.encode(_example("campaign.pause")), Topic.SUPPRESSIONS,
                 "unknown kind 'campaign.pause' on mailer.suppressions", id="other-kind-on-suppressions"),
]


@pytest.mark.parametrize(("raw", "topic", "named"), INVALID)
def test_invalid_message_is_rejected_with_a_reason(
    raw: Callable[[], bytes], topic: Topic, named: str
) -> None:
    with pytest.raises(InvalidMessage) as err:
        contract.decode(raw(), topic)
    assert named in err.value.reason


def test_failed_outcome_may_say_it_is_a_hard_bounce() -> None:
    flagged = outcome("outcome.failed", "c1", "john@example.org", 550, "5.1.1 User unknown",
                      hard_bounce=True)
    assert contract.validate(flagged, Topic.SEND_OUTCOMES)["hard_bounce"] is True
    plain = outcome("outcome.failed", "c1", "john@example.org", 550, "5.7.1 Spam")
    assert "hard_bounce" not in plain
    with pytest.raises(InvalidMessage) as err:
        contract.validate({**flagged, "hard_bounce": "yes"}, Topic.SEND_OUTCOMES)
    assert "hard_bounce must be boolean" in err.value.reason
    with pytest.raises(InvalidMessage):  # only outcome.failed carries it
        outcome("outcome.sent", "c1", "john@example.org", 250, "Ok", hard_bounce=False)
