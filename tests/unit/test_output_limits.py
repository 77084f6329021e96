"""What the services write stays writable: dead letters fit the broker, outcomes fit Postgres."""

from __future__ import annotations

import base64
import time

from services.pipeline.contract import validate
from services.pipeline.dead_letters import MAX_ORIGINAL_BYTES, dead_letter_message
from services.pipeline.settings import Settings
from services.pipeline.topics import Topic
from services.sender.send_step import Outcomes
from tests.support.campaigns import recipients, send_email


def test_a_huge_rejected_message_becomes_a_dead_letter_that_fits_and_says_it_was_cut() -> None:
    value = b"x" * 900_000
    letter = dead_letter_message(service="planner", source_topic="t", partition=0, offset=7, key=b"k",
                                 value=value, reason="too large", error_type="invalid_message")
    kept = base64.b64decode(letter["original_value_b64"])
    assert kept == value[:MAX_ORIGINAL_BYTES]
    assert f"original value truncated to its first {MAX_ORIGINAL_BYTES} of 900000 bytes" in letter["reason"]
    assert len(letter["original_value_b64"]) < 400_000
    validate(letter, Topic.DEAD_LETTERS)


def test_a_small_rejected_message_is_kept_whole() -> None:
    letter = dead_letter_message(service="planner", source_topic="t", partition=0, offset=7, key=None,
                                 value=b"{}", reason="bad", error_type="invalid_message")
    assert base64.b64decode(letter["original_value_b64"]) == b"{}" and letter["reason"] == "bad"


def test_control_characters_of_a_hostile_smtp_reply_are_not_kept() -> None:
    command = send_email(recipients(1)[0])
    outcome = Outcomes(command, Settings(), time.monotonic()).build(
        "failed", code=550, reply="5.1.1 no\x00such\x1buser\r\nsecond line", error_class="permanent")
    assert outcome["smtp_reply"] == "5.1.1 no such user\r\nsecond line"
    validate(outcome, Topic.SEND_OUTCOMES)
