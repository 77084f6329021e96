"""The sender benchmark's pure parts: its commands, its emails, how it counts outcomes."""

from __future__ import annotations

from benchmarks.sender import Outcomes, commands, email_bytes, raw_shares
from services.pipeline.contract import encode, envelope, validate
from services.pipeline.settings import Settings
from services.pipeline.topics import Topic


def outcome(campaign_id: str, sid: str, kind: str = "outcome.sent", at: str = "2026-01-01T00:00:00.000000Z"
            ) -> bytes:
    return encode(envelope(kind, campaign_id=campaign_id, send_id=sid, occurred_at=at))


def test_commands_are_valid_and_distinct() -> None:
    made = list(commands("bench-sender-1", 0, 50))
    for command in made:
        validate(command, Topic.SEND_COMMANDS)
    assert len({c["send_id"] for c in made}) == 50
    assert len({c["recipient"]["email"] for c in made}) == 50


def test_email_bytes_are_what_smtp_sends() -> None:
    command = next(commands("bench-sender-1", 7, 8))
    sender, to, data = email_bytes(command, Settings())
    assert (sender, to) == ("demo@example.com", "bench-0000007@example.com")
    assert b"\r\nMessage-ID: <" + command["send_id"].encode() in data
    assert b"\n" not in data.replace(b"\r\n", b"")


def test_outcomes_count_one_campaign_once_each() -> None:
    seen = Outcomes("c1")
    seen.add(outcome("c1", "a", at="2026-01-01T00:00:00.000000Z"))
    seen.add(outcome("c1", "b", "outcome.failed", at="2026-01-01T00:00:02.000000Z"))
    seen.add(outcome("c1", "a", at="2026-01-01T00:00:09.000000Z"))  # a repeat: not counted
    seen.add(outcome("warm", "c", at="2026-01-01T00:00:30.000000Z"))  # another campaign
    assert seen.count == 2
    assert seen.seconds == 2.0
    assert seen.rate == 1.0
    assert seen.anomalies() == "1 outcome.failed, 1 repeated"


def test_raw_shares_cover_every_email_once() -> None:
    shares = raw_shares(Settings(), "c", 1001, 2)
    assert [(s.start, s.stop) for s in shares] == [(0, 500), (500, 1001)]
    assert all(s.connections == Settings().sender_concurrency for s in shares)
