"""Which SMTP replies count towards the circuit breakers (issue 14, defect 10), the docs table
that says so, the rules-file field, the cool-down setting and `mailer ops breaker reset` (12)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from services.pipeline import circuit_breaker
from services.pipeline.cli import build_parser
from services.pipeline.contract import Message, iso
from services.pipeline.settings import Settings, SettingsError
from services.sender.smtp_replies import ReplyRules, ReplyRulesError, breaker_table, parse_rules
from tests.support.campaigns import outcome

ROOT = Path(__file__).resolve().parents[2]
DEFAULTS = ReplyRules.defaults()


@pytest.mark.parametrize(
    ("code", "reply", "counts"),
    [
        # about one recipient: never counts
        (450, "4.2.1 Mailbox busy", False),
        (450, "Mailbox busy", False),
        (450, "4.2.1 Mailbox busy, try again later", False),
        (450, "4.2.1 Mailbox busy, try again in 30 seconds", False),
        (452, "4.2.2 Mailbox full", False),
        (451, "4.2.1 Mailbox temporarily disabled", False),
        (450, "4.1.1 <x@example.com>: Recipient address rejected: User unknown", False),
        (451, "4.7.1 Greylisted, please try again in 300 seconds", False),
        (450, "4.2.0 Graylisted, please try again in 5 minutes", False),
        # about the server or the connection: counts
        (421, "4.7.0 Try again later, closing connection", True),
        (421, "Service not available, closing transmission channel", True),
        (421, "4.2.1 Service shutting down", True),  # 421 is the whole server, whatever follows
        (451, "4.3.0 Temporary system problem", True),
        (450, "4.3.2 System not accepting network messages", True),
        (452, "4.3.1 Insufficient system storage", True),
        (451, "4.7.500 Server busy. Please try again later", True),
        (450, "4.4.5 Insufficient system resources", True),
        (451, "Requested action aborted: local error in processing", True),
        (454, "4.7.0 Temporary authentication failure", True),
        (447, "Timeout waiting for data", True),
        (None, "", True),  # no reply at all: the connection dropped
        # permanent replies are not transient: they neither count nor reset
        (550, "5.1.1 User unknown", False),
    ],
)
def test_d10_which_replies_count_towards_the_breakers(code: int | None, reply: str, counts: bool) -> None:
    assert DEFAULTS.counts_for_breaker(code, reply) is counts


def _deferred_retry(code: int | None, reply: str, error_class: str = "transient") -> Message:
    message = outcome("outcome.failed", "c", "a@x.example.com", code, reply, error_class=error_class)
    message.update(kind="outcome.deferred", defer_reason="transient_error",
                   deferred_until=iso(datetime.now(UTC) + timedelta(minutes=1)), command={})
    return message


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (_deferred_retry(450, "4.2.1 Mailbox busy"), None),  # the retry wave of defect 10
        (outcome("outcome.failed", "c", "a@x.example.com", 450, "4.2.1 Mailbox busy",
                 error_class="transient"), None),
        (_deferred_retry(421, "4.7.0 Try again later"), True),
        (_deferred_retry(451, "4.3.0 Temporary system problem"), True),
        (_deferred_retry(None, ""), True),
        (outcome("outcome.failed", "c", "a@x.example.com", None, "", error_class="timeout"), True),
        # a connection failure counts even when the greeting said something about a mailbox
        (outcome("outcome.failed", "c", "a@x.example.com", 450, "4.2.1 busy", error_class="connection"),
         True),
        (outcome("outcome.sent", "c", "a@x.example.com", 250, "2.0.0 Ok"), False),
    ],
)
def test_d10_is_transient_asks_the_reply_rules(message: Message, expected: bool | None) -> None:
    assert circuit_breaker.is_transient(message) is expected


def test_d10_an_operator_rule_decides_what_counts() -> None:
    rules = ReplyRules([*parse_rules([
        {"name": "relay_queue_full", "reply_class": "transient", "codes": [450],
         "text": "queue full", "breaker": True},
        {"name": "provider_soft_bounce", "reply_class": "transient", "codes": ["4xx"],
         "text": "soft bounce", "breaker": False},
    ]), *ReplyRules.defaults().rules])
    assert rules.counts_for_breaker(450, "Relay queue full") is True
    assert rules.counts_for_breaker(451, "4.3.0 soft bounce for this user") is False
    failed = outcome("outcome.failed", "c", "a@x.example.com", 450, "Relay queue full",
                     error_class="transient")
    assert circuit_breaker.is_transient(failed) is None  # the default rules: a mailbox
    assert circuit_breaker.is_transient(failed, rules) is True


def test_d10_the_breaker_field_of_a_rules_file_is_checked() -> None:
    with pytest.raises(ReplyRulesError, match=r"rule 0 \(x\): field 'breaker'"):
        parse_rules([{"name": "x", "reply_class": "transient", "codes": [450], "breaker": "no"}])
    (rule,) = parse_rules([{"name": "x", "reply_class": "transient", "codes": [450]}])
    assert rule.breaker is True  # an operator's rule counts unless it says it is about a recipient


def test_d10_the_docs_show_the_rule_table_with_what_counts() -> None:
    guarantees = (ROOT / "docs" / "GUARANTEES.md").read_text(encoding="utf-8")
    assert breaker_table() in guarantees, "regenerate with services.sender.smtp_replies.breaker_table()"
    assert "| `mailbox_busy` | 450 | any | any | no (one recipient) |" in breaker_table()
    assert "| `system_state` | 450 | 4.3.x | any | yes (the server) |" in breaker_table()


def test_d12_the_cool_down_setting() -> None:
    assert Settings().breaker_cooldown == 300.0
    with pytest.raises(SettingsError, match="MAILER_BREAKER_COOLDOWN"):
        Settings(breaker_cooldown=-1.0).check()


def test_d12_configure_sets_the_first_cool_down_and_the_rules() -> None:
    policy: Any = circuit_breaker._POLICY
    before = (policy.rules, policy.cooldown)
    try:
        circuit_breaker.configure(ReplyRules([]), 12.5)
        assert policy.cooldown == 12.5
        assert policy.rules.rules == ()
    finally:
        policy.rules, policy.cooldown = before


def test_d12_ops_breaker_reset_arguments() -> None:
    args = build_parser().parse_args(
        ["ops", "breaker", "reset", "acct-1", "--actor", "oncall-1", "--reason", "relay fixed"])
    assert (args.ops_command, args.breaker_command, args.account, args.actor, args.reason) == (
        "breaker", "reset", "acct-1", "oncall-1", "relay fixed")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["ops", "breaker", "reset", "acct-1"])  # --actor is required


def test_d12_the_playbook_says_how_an_account_breaker_closes() -> None:
    playbook = (ROOT / "docs" / "ONCALL_PLAYBOOK.md").read_text(encoding="utf-8")
    section = playbook.split("## Circuit breaker open", 1)[1].split("\n## ", 1)[0]
    assert "mailer ops breaker reset <account> --actor" in section
    assert "half-open" in section and "MAILER_BREAKER_COOLDOWN" in section


def test_d12_ops_limiter_says_open_half_open_or_closed() -> None:
    from datetime import UTC, datetime

    from services.ops.limiter_view import limiter_lines

    opened, probe = datetime(2026, 12, 6, 4, 0, tzinfo=UTC), datetime(2026, 12, 6, 4, 5, tzinfo=UTC)

    def breaker_line(**breaker: object) -> str:
        state = {"redis": "ok", "limiter_state": "", "accounts": [
            {"account": "default", "breaker": breaker, "parked": []}]}
        return next(line for line in limiter_lines(state) if line.startswith("  breaker"))

    assert breaker_line(open=False, consecutive=0, opened_at=None, probe_after=None,
                        half_open=False) == "  breaker      closed (0 consecutive failures)"
    assert breaker_line(open=True, consecutive=10, opened_at=opened, probe_after=probe,
                        half_open=False) == ("  breaker      OPEN since 2026-12-06 04:00:00 UTC, probe "
                                             "after 2026-12-06 04:05:00 UTC (10 consecutive failures)")
    assert breaker_line(open=True, consecutive=10, opened_at=opened, probe_after=probe,
                        half_open=True) == ("  breaker      HALF-OPEN since 2026-12-06 04:05:00 UTC "
                                            "(one probe send at a time) (10 consecutive failures)")
