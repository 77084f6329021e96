"""Deferred outcomes: parking a send the gate refused, and retrying a 4xx with backoff."""

from __future__ import annotations

import copy
import itertools
import random
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from services.pipeline.contract import Message, validate
from services.pipeline.defer_reasons import DeferReason
from services.pipeline.settings import Settings
from services.sender.deferral import MAX_BACKOFF, parked_outcome, retry_later
from services.sender.send_step import Outcomes
from tests.support.campaigns import send_email

NOW = datetime(2025, 1, 16, 10, 0, 0, 123456, tzinfo=UTC)
RECIPIENT = {"email": "user@gmail.com", "name": "User", "variables": {"code": "C1"}}
SLOW_WITH_DELAY = "4.7.1 Try again in 30 seconds"
SLOW_NO_DELAY = "4.7.1 Greylisted, please try again later"


def command(**overrides: Any) -> dict[str, Any]:
    return send_email(dict(RECIPIENT), **overrides)


def failed(cmd: dict[str, Any], reply: str = SLOW_WITH_DELAY, code: int = 451) -> Message:
    return Outcomes(cmd, Settings(), time.monotonic()).failed(
        "transient", f"RCPT TO refused with {code}", code, reply
    )


def parse_time(text: str) -> datetime:
    assert text.endswith("Z")
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


def delay_of(outcome: Message, now: datetime = NOW) -> float:
    return (parse_time(outcome["deferred_until"]) - now).total_seconds()


# --- parked_outcome -----------------------------------------------------------------------


@pytest.mark.parametrize("reason", list(DeferReason))
def test_parked_outcome_is_a_valid_deferred_outcome_embedding_the_command(reason: DeferReason) -> None:
    cmd = command()
    before = copy.deepcopy(cmd)
    until = datetime(2025, 1, 17, 6, 0, tzinfo=UTC)
    outcome = validate(parked_outcome(cmd, Settings(), reason, until, time.monotonic()))
    assert outcome["kind"] == "outcome.deferred"
    assert outcome["defer_reason"] == reason.value
    assert outcome["deferred_until"] == "2025-01-17T06:00:00.000000Z"
    assert outcome["reason"] == f"{reason.value} until 2025-01-17T06:00:00.000000Z"
    assert outcome["command"] == cmd
    assert outcome["command"] is not cmd  # a copy: the caller may keep changing its own
    assert validate(outcome["command"]) == cmd
    assert cmd == before
    assert (outcome["send_id"], outcome["campaign_id"], outcome["attempt"], outcome["account"]) == (
        cmd["send_id"], cmd["campaign_id"], 1, "default")
    assert outcome["recipient_email"] == "user@gmail.com"
    assert outcome["smtp_code"] is None and outcome["smtp_reply"] == "" and outcome["error_class"] is None


def test_parked_outcome_writes_until_in_utc() -> None:
    moscow = timezone(timedelta(hours=3))
    until = datetime(2025, 1, 17, 9, 0, tzinfo=moscow)
    outcome = validate(parked_outcome(command(), Settings(), DeferReason.OUTSIDE_HOURS, until,
                                      time.monotonic()))
    assert outcome["deferred_until"] == "2025-01-17T06:00:00.000000Z"


def test_parked_outcome_keeps_the_attempt_of_a_retried_command() -> None:
    cmd = command(attempt=3, first_attempt_at="2025-01-16T09:00:00.000000Z")
    outcome = validate(parked_outcome(cmd, Settings(), DeferReason.RATE_PER_HOUR, NOW, time.monotonic()))
    assert outcome["attempt"] == 3
    assert outcome["command"]["attempt"] == 3
    assert outcome["command"]["first_attempt_at"] == "2025-01-16T09:00:00.000000Z"


# --- retry_later --------------------------------------------------------------------------


def test_retry_is_a_valid_deferred_outcome_of_the_next_attempt() -> None:
    cmd = command()
    before = copy.deepcopy(cmd)
    outcome = retry_later(cmd, failed(cmd), Settings(), NOW, time.monotonic(), random.Random(1))
    assert outcome is not None
    validate(outcome)
    assert outcome["kind"] == "outcome.deferred"
    assert outcome["defer_reason"] == DeferReason.TRANSIENT_ERROR.value == "transient_error"
    assert outcome["error_class"] == "transient"
    assert outcome["smtp_code"] == 451
    assert outcome["smtp_reply"] == SLOW_WITH_DELAY
    assert outcome["attempt"] == 1  # the outcome is of the attempt that failed
    assert "attempt 1 got 451" in outcome["reason"] and "retry 2 at" in outcome["reason"]

    retry = validate(outcome["command"])
    assert retry["kind"] == "send.email"
    assert retry["attempt"] == 2
    assert retry["first_attempt_at"] == "2025-01-16T10:00:00.123456Z"
    assert {k: v for k, v in retry.items() if k != "first_attempt_at"} == {**cmd, "attempt": 2}
    assert cmd == before  # the original command is untouched


def test_retry_keeps_the_first_attempt_time() -> None:
    first = "2025-01-16T08:00:00.000000Z"
    cmd = command(attempt=3, first_attempt_at=first)
    outcome = retry_later(cmd, failed(cmd), Settings(), NOW, time.monotonic(), random.Random(1))
    assert outcome is not None
    validate(outcome)
    assert outcome["attempt"] == 3
    assert outcome["command"]["attempt"] == 4
    assert outcome["command"]["first_attempt_at"] == first


@pytest.mark.parametrize(
    ("reply", "seconds"),
    [
        (SLOW_WITH_DELAY, 30.0),
        ("4.7.0 Too many messages, retry after 5 minutes", 300.0),
        ("4.7.0 Try again in 1 hour", 3600.0),
        ("try again in 0 seconds", 0.0),
    ],
)
@pytest.mark.parametrize("attempt", [1, 3])
def test_retry_honours_the_delay_the_reply_names(reply: str, seconds: float, attempt: int) -> None:
    cmd = command(attempt=attempt)
    outcome = retry_later(cmd, failed(cmd, reply), Settings(), NOW, time.monotonic(), random.Random(7))
    assert outcome is not None
    validate(outcome)
    assert parse_time(outcome["deferred_until"]) == NOW + timedelta(seconds=seconds)  # no jitter


@pytest.mark.parametrize("seed", [0, 1, 2, 42, 1234])
def test_backoff_doubles_per_attempt_with_seeded_jitter(seed: int) -> None:
    settings = replace(Settings(), transient_retry_seconds=60.0, transient_max_attempts=6)
    jitter = random.Random(seed).uniform(0.8, 1.2)
    delays = []
    for attempt in range(1, 6):
        cmd = command(attempt=attempt)
        outcome = retry_later(cmd, failed(cmd, SLOW_NO_DELAY), settings, NOW, time.monotonic(),
                              random.Random(seed))
        assert outcome is not None
        validate(outcome)
        delay = delay_of(outcome)
        base = 60.0 * 2 ** (attempt - 1)
        assert delay == pytest.approx(base * jitter, abs=1e-6)
        assert 0.8 * base <= delay <= 1.2 * base
        delays.append(delay)
    for earlier, later in itertools.pairwise(delays):
        assert later == pytest.approx(2 * earlier, abs=1e-5)


def test_jitter_spreads_within_twenty_percent() -> None:
    settings = replace(Settings(), transient_retry_seconds=100.0)
    rng = random.Random(99)
    cmd = command(attempt=2)
    fail = failed(cmd, SLOW_NO_DELAY)
    delays = []
    for _ in range(200):
        outcome = retry_later(cmd, fail, settings, NOW, time.monotonic(), rng)
        assert outcome is not None
        delays.append(delay_of(outcome))
    assert all(160.0 <= d <= 240.0 for d in delays)
    assert min(delays) < 170.0 and max(delays) > 230.0  # really jittered, both ways
    assert len(set(delays)) > 150


def test_backoff_never_exceeds_max_backoff() -> None:
    settings = replace(Settings(), transient_retry_seconds=3600.0, transient_max_attempts=10)
    cmd = command(attempt=8)
    rng = random.Random(0)  # its first uniform(0.8, 1.2) is about 1.14
    outcome = retry_later(cmd, failed(cmd, SLOW_NO_DELAY), settings, NOW, time.monotonic(), rng)
    assert outcome is not None
    assert delay_of(outcome) <= MAX_BACKOFF


@pytest.mark.parametrize(
    ("max_attempts", "attempt", "retries"),
    [
        (5, 1, True),
        (5, 4, True),
        (5, 5, False),
        (5, 6, False),
        (3, 2, True),
        (3, 3, False),
        (1, 1, False),
    ],
)
def test_no_retry_once_attempts_are_used_up(max_attempts: int, attempt: int, retries: bool) -> None:
    settings = replace(Settings(), transient_max_attempts=max_attempts)
    cmd = command(attempt=attempt)
    outcome = retry_later(cmd, failed(cmd), settings, NOW, time.monotonic(), random.Random(0))
    assert (outcome is not None) is retries
    if outcome is not None:
        assert outcome["command"]["attempt"] == attempt + 1 <= max_attempts


def test_retry_without_reply_text_uses_backoff() -> None:
    cmd = command()
    fail = Outcomes(cmd, Settings(), time.monotonic()).failed("transient", "RCPT TO refused with 451", 451)
    outcome = retry_later(cmd, fail, Settings(), NOW, time.monotonic(), random.Random(5))
    assert outcome is not None
    validate(outcome)
    expected = Settings().transient_retry_seconds * random.Random(5).uniform(0.8, 1.2)
    assert delay_of(outcome) == pytest.approx(expected, abs=1e-6)
