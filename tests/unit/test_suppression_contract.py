"""The suppression topic's contract: its registry entry, its kinds, and what is rejected."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from services.pipeline import contract
from services.pipeline.contract import InvalidMessage
from services.pipeline.topics import REGISTRY, Topic, kind_topic
from tests.support.campaigns import outcome
from tests.support.contract_cases import drop, example, invalid, set_field

KINDS = ("suppression.add", "suppression.remove")


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
    message = example("suppression.add")
    message["reason"] = reason
    assert contract.validate(message, Topic.SUPPRESSIONS) == message


INVALID = [
    invalid("add-without-email", "suppression.add", drop("email"), "['email']"),
    invalid("add-without-reason", "suppression.add", drop("reason"), "['reason']"),
    invalid("add-unknown-reason", "suppression.add", set_field("reason", "bored"), "reason must be one of"),
    invalid("add-bad-email", "suppression.add", set_field("email", "john.smith.example.org"),
             "email must match"),
    invalid("add-email-with-blanks", "suppression.add", set_field("email", " john@example.org "),
             "email must match"),
    invalid("add-source-too-long", "suppression.add", set_field("source", "x" * 257),
             "source must be shorter than or equal to 256"),
    invalid("add-bad-actor", "suppression.add", set_field("actor_id", "-nobody"), "actor_id must match"),
    invalid("add-extra-property", "suppression.add", set_field("campaign_id", "c1"), "{'campaign_id'}"),
    invalid("remove-with-reason", "suppression.remove", set_field("reason", "manual"), "{'reason'}"),
    invalid("remove-without-email", "suppression.remove", drop("email"), "['email']"),
    invalid("remove-schema-version-2", "suppression.remove", set_field("schema_version", 2),
             "unsupported schema_version 2"),
    pytest.param(lambda: contract.encode(example("suppression.add")), Topic.CAMPAIGN_COMMANDS,
                 "unknown kind 'suppression.add' on mailer.campaign-commands", id="kind-on-wrong-topic"),
    pytest.param(lambda: contract.encode(example("campaign.pause")), Topic.SUPPRESSIONS,
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
