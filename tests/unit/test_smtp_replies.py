"""What real provider replies ask of the sender: slow down, retry, give up or stop the account."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import pytest

from services.pipeline.settings import Settings
from services.sender.smtp_replies import (
    DEFAULT_RULES,
    Classification,
    ReplyClass,
    ReplyRule,
    ReplyRules,
    ReplyRulesError,
    code_set,
    is_slow_down,
    retry_after,
)


@pytest.mark.parametrize(
    ("code", "reply", "slow"),
    [
        # Gmail: connection-rate and volume throttling
        (421, "4.7.0 Try again later, closing connection. (EHLO) x12si345.1 - gsmtp", True),
        (421, "4.7.28 Our system has detected an unusual rate of unsolicited mail originating from "
              "your IP address. To protect our users from spam, mail sent from your IP address has "
              "been temporarily rate limited.", True),
        (450, "4.7.28 Gmail has detected an unusual rate of mail originating from your DKIM domain",
         True),
        # Yahoo / AOL
        (421, "4.7.0 [TSS04] Messages from 192.0.2.1 temporarily deferred due to unexpected volume "
              "or user complaints", True),
        (451, "Message temporarily deferred - [160]", True),  # 451 is a throttling code
        # Microsoft
        (451, "4.7.650 The mail server [192.0.2.1] has been temporarily rate limited due to IP "
              "reputation.", True),
        (452, "4.5.3 Too many recipients", True),
        # greylisting (Postfix postgrey)
        (451, "4.7.1 <user@example.net>: Recipient address rejected: Greylisted, see "
              "http://postgrey.schweikert.ch/help/example.net.html", True),
        (450, "4.7.1 Greylisted, please try again later", True),
        # Mail.ru / Yandex style
        (421, "Too many connections from your IP, slow down", True),
        (450, "4.4.5 Insufficient system resources, throttled", True),
        (454, "4.4.5 System congestion", True),
        (450, "Requested action aborted: rate-limit exceeded", True),
        (450, "You are sending too fast", True),
        (452, "Throttling failure: Maximum sending rate exceeded.", True),  # Amazon SES
        # busy mailbox and full disks are 4xx but no request to slow down
        (450, "4.2.1 Mailbox busy", False),
        (450, "4.2.1 Requested mail action not taken: mailbox unavailable", False),
        (452, "4.2.2 Mailbox full", False),
        (452, "4.3.1 Insufficient system storage", False),
        (450, "4.1.8 <bounce@nonexistent.invalid>: Sender address rejected: Domain not found", False),
        (454, "4.7.0 Temporary authentication failure", True),  # any 4.7.x enhanced code
        (451, "", True),
        (421, "", True),
        (450, "", False),
        (452, "", False),
        # 5xx never, whatever they say
        (550, "5.7.1 Service unavailable; client host blocked; too many connections", False),
        (554, "5.7.1 rate limit exceeded, try again later", False),
        (550, "5.1.1 The email account that you tried to reach does not exist", False),
        (521, "4.7.0 Try again later", False),
        # 2xx and 3xx never
        (250, "2.0.0 OK 1700000000 x12si345 - gsmtp", False),
        (250, "Too many: slow down, rate limit, try again later", False),
        (354, "Start mail input; end with <CRLF>.<CRLF>", False),
        (221, "4.7.0 Bye", False),
        # no reply at all
        (None, "4.7.0 Try again later", False),
        (None, "", False),
        # edge of the 4xx range
        (400, "try again later", True),
        (499, "", False),
        (500, "try again later", False),
        (399, "try again later", False),
    ],
)
def test_is_slow_down(code: int | None, reply: str, slow: bool) -> None:
    assert is_slow_down(code, reply) is slow


@pytest.mark.parametrize(
    "reply",
    ["TRY AGAIN LATER", "Rate Limit", "SLOW DOWN", "Throttled", "Temporarily Deferred", "TOO MANY"],
)
def test_slow_down_text_is_case_insensitive(reply: str) -> None:
    assert is_slow_down(450, reply)


@pytest.mark.parametrize(
    "reply",
    ["4.2.1 Mailbox busy for client [10.4.7.21]", "4.2.1 Mailbox busy, connection from 198.4.4.5"],
)
def test_dotted_numbers_in_text_are_not_enhanced_codes(reply: str) -> None:
    assert not is_slow_down(450, reply)


@pytest.mark.parametrize(
    ("reply", "seconds"),
    [
        ("4.7.0 Try again in 30 seconds", 30.0),
        ("try again in 30 seconds", 30.0),
        ("451 4.7.1 Greylisted, try again in 300 seconds", 300.0),
        ("Please retry after 5 minutes", 300.0),
        ("retry after 5 minutes", 300.0),
        ("try again in 1 hour", 3600.0),
        ("Try again in 2 hours", 7200.0),
        ("Try again in 1 minute", 60.0),
        ("try again in 45s", 45.0),
        ("try again in 10 sec", 10.0),
        ("try again in 10 secs", 10.0),
        ("try again in 2 mins", 120.0),
        ("try again in 3 min", 180.0),
        ("try again in 2h", 7200.0),
        ("try again in 15m", 900.0),
        ("TRY AGAIN IN 30 SECONDS", 30.0),
        ("Try again later in 10 minutes", 600.0),
        ("retry in 20 seconds", 20.0),
        ("try again after 90 seconds", 90.0),
        ("try again in 0 seconds", 0.0),
        ("deferred; try again in 30 seconds or retry after 5 minutes", 30.0),  # the first one
    ],
)
def test_retry_after(reply: str, seconds: float) -> None:
    assert retry_after(reply) == seconds


@pytest.mark.parametrize(
    "reply",
    [
        "",
        "4.7.0 Try again later",
        "Mailbox busy",
        "try again in a few minutes",
        "try again in 30",  # no unit
        "try again in 30 days",  # not a unit we read
        "try again in 30 hrs",
        "please wait 30 seconds",
        "421 4.7.0 Try again later, closing connection. (EHLO) 30 seconds",
    ],
)
def test_retry_after_none(reply: str) -> None:
    assert retry_after(reply) is None


def test_retry_after_returns_float() -> None:
    value = retry_after("try again in 30 seconds")
    assert isinstance(value, float)


# --- the classification table -------------------------------------------------------------------

DEFAULTS = ReplyRules.defaults()


@pytest.mark.parametrize(
    ("code", "reply", "reply_class", "rule", "hard_bounce", "delay"),
    [
        # --- hard bounces: the address is bad
        # Postfix
        (550, "5.1.1 <x@example.com>: Recipient address rejected: User unknown in virtual mailbox table",
         "permanent", "bad_mailbox", True, None),
        (550, "550 5.1.1 <x@example.com>: Recipient address rejected: User unknown",
         "permanent", "bad_mailbox", True, None),
        (553, "5.1.3 <x@@example.com>: Recipient address rejected: bad address syntax",
         "permanent", "bad_address_syntax", True, None),
        # Gmail (multi-line reply as aiosmtplib joins it)
        (550, "5.1.1 The email account that you tried to reach does not exist. Please try\n"
              "5.1.1 double-checking the recipient's email address for typos or\n"
              "5.1.1 unnecessary spaces. https://support.google.com/mail/?p=NoSuchUser x12si345 - gsmtp",
         "permanent", "bad_mailbox", True, None),
        (550, "550-5.1.1 The email account that you tried to reach does not exist.",
         "permanent", "bad_mailbox", True, None),
        # Outlook / Exchange Online
        (550, "5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup",
         "permanent", "null_mx", True, None),
        (550, "5.1.1 RESOLVER.ADR.ExRecipNotFound; not found", "permanent", "bad_mailbox", True, None),
        (551, "5.1.6 User has moved; no forwarding address", "permanent", "mailbox_moved", True, None),
        (550, "5.1.2 Host unknown: example.invalid", "permanent", "bad_domain", True, None),
        (556, "5.1.10 Recipient address has null MX", "permanent", "null_mx", True, None),
        # Yandex and Mail.ru: no 5.1.x code, the text says it
        (550, "5.7.1 No such user!", "permanent", "unknown_user", True, None),
        (550, "Message was not accepted -- invalid mailbox.  Local mailbox x@mail.ru is unavailable: "
              "user not found", "permanent", "unknown_user", True, None),
        (550, "Requested action not taken: mailbox unavailable (user unknown)",
         "permanent", "unknown_user", True, None),
        # a 5.1.x about the sender, or under a code outside 550/551/553, is not the recipient's fault
        (550, "5.1.8 <bounce@example.org>: Sender address rejected: Domain not found",
         "permanent", "permanent_5xx", False, None),
        (554, "5.1.1 Delivery failed", "permanent", "permanent_5xx", False, None),
        # --- permanent, but the address stays
        (552, "5.2.2 mailbox full", "permanent", "mailbox_full", False, None),
        (552, "5.2.2 <x@example.com>: Mailbox is full / Blocks limit exceeded / Inode limit exceeded",
         "permanent", "mailbox_full", False, None),
        (554, "5.2.2 mailbox full; STOREDRV.Deliver.Exception:QuotaExceededException."
              "MapiExceptionShutoffQuotaExceeded",
         "permanent", "mailbox_full", False, None),
        (550, "Mailbox quota exceeded", "permanent", "mailbox_full", False, None),
        (554, "5.7.1 Message rejected as spam", "permanent", "policy_rejected", False, None),
        (554, "5.7.1 [2] Message rejected under suspicion of SPAM; https://ya.cc/1IrBc 1700000000-abc",
         "permanent", "policy_rejected", False, None),
        (550, "spam message rejected. Please visit https://help.mail.ru/notspam-support/id?c=abc or "
              "report details to abuse@corp.mail.ru. Error code: abc. ID: def.",
         "permanent", "policy_rejected", False, None),
        (550, "5.7.1 Unfortunately, messages from [192.0.2.1] weren't sent. Please contact your Internet "
              "service provider since part of their network is on our block list (S3150).",
         "permanent", "policy_rejected", False, None),
        (554, "5.7.1 <x@example.com>: Relay access denied", "permanent", "policy_rejected", False, None),
        (550, "5.7.26 This mail has been blocked because the sender is unauthenticated.",
         "permanent", "policy_rejected", False, None),
        (554, "5.7.1 rate limit exceeded, try again later", "permanent", "policy_rejected", False, None),
        (554, "Transaction failed", "permanent", "permanent_5xx", False, None),
        (552, "5.3.4 Message size exceeds fixed limit", "permanent", "permanent_5xx", False, None),
        (550, "5.5.0 Requested action not taken: mailbox unavailable",
         "permanent", "permanent_5xx", False, None),
        (521, "4.7.0 Try again later", "permanent", "permanent_5xx", False, None),
        (501, "5.5.4 Syntax error in parameters", "permanent", "permanent_5xx", False, None),
        (554, "try again in 30 seconds", "permanent", "permanent_5xx", False, None),  # never retried
        # --- our own sending quota: comes back by itself
        (550, "5.4.5 Daily user sending quota exceeded. https://support.google.com/mail/?p=... - gsmtp",
         "transient", "sending_quota", False, 3600.0),
        (550, "5.4.5 Daily user sending limit exceeded, try again in 2 hours",
         "transient", "sending_quota", False, 7200.0),
        # --- the account is refused
        (535, "5.7.8 Authentication credentials invalid", "account_stop", "auth_failed", False, None),
        (535, "5.7.8 Username and Password not accepted. Learn more at https://support.google.com/mail/?p=BadCredentials",
         "account_stop", "auth_failed", False, None),
        (535, "5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant.",
         "account_stop", "auth_failed", False, None),
        (535, "5.7.8 Error: authentication failed: Invalid user or password!",
         "account_stop", "auth_failed", False, None),
        (535, "5.7.0 NEOBHODIM parol prilozheniya / Application password is REQUIRED",
         "account_stop", "auth_failed", False, None),
        (534, "5.7.9 Application-specific password required.", "account_stop", "auth_failed", False, None),
        (530, "5.7.0 Must issue a STARTTLS command first.", "account_stop", "auth_failed", False, None),
        (554, "5.7.8 Authentication failed", "account_stop", "auth_failed", False, None),
        # --- transient
        (421, "4.7.0 Try again later", "transient", "slow_down", False, None),
        (421, "4.7.0 Try again later, closing connection. (EHLO) x12si345 - gsmtp",
         "transient", "slow_down", False, None),
        (451, "4.7.1 Greylisted, please try again in 300 seconds", "transient", "greylisted", False, 300.0),
        (451, "4.7.1 <x@example.net>: Recipient address rejected: Greylisted, see "
              "http://postgrey.schweikert.ch/help/example.net.html", "transient", "greylisted", False, None),
        (450, "4.2.0 Graylisted, please try again in 5 minutes", "transient", "greylisted", False, 300.0),
        (451, "4.7.500 Server busy. Please try again later from [192.0.2.1]. (S77719)",
         "transient", "slow_down", False, None),
        (421, "4.7.0 [TSS04] Messages from 192.0.2.1 temporarily deferred due to unexpected volume",
         "transient", "slow_down", False, None),
        (451, "4.7.1 Sorry, the service is currently unavailable. Please come back later.",
         "transient", "slow_down", False, None),
        (421, "Too many connections from your IP, slow down", "transient", "slow_down", False, None),
        (450, "4.4.5 Insufficient system resources", "transient", "slow_down", False, None),
        (454, "4.7.0 Temporary authentication failure", "transient", "slow_down", False, None),
        (421, "Service not available, closing transmission channel", "transient", "service_unavailable",
         False, None),
        (450, "4.2.1 Mailbox busy", "transient", "mailbox_state", False, None),
        (450, "4.1.1 <x@example.com>: Recipient address rejected: User unknown in local recipient table",
         "transient", "address_state", False, None),  # Postfix soft_bounce: 4xx is never a hard bounce
        (451, "4.3.0 Local error in processing", "transient", "local_error", False, None),
        (452, "4.2.2 Mailbox full", "transient", "mailbox_state", False, None),
        (452, "4.3.1 Insufficient system storage", "transient", "insufficient_storage", False, None),
        (454, "4.3.0 TLS not available due to local problem", "transient", "tls_unavailable", False, None),
        (447, "Timeout waiting for data", "transient", "transient_4xx", False, None),
        (450, "Try again in 1 minute", "transient", "mailbox_busy", False, 60.0),
        # --- no code: the connection dropped mid-reply
        (None, "", "transient", "unclassified", False, None),
        (None, "5.1.1 User unknown", "transient", "unclassified", False, None),
        (None, "connection lost, try again in 10 seconds", "transient", "unclassified", False, 10.0),
    ],
)
def test_default_classification(
    code: int | None, reply: str, reply_class: ReplyClass, rule: str, hard_bounce: bool, delay: float | None
) -> None:
    assert DEFAULTS.classify(code, reply) == Classification(reply_class, rule, hard_bounce, delay)


@pytest.mark.parametrize("code", [421, 450, 451, 452, 454, 400, 499])
def test_every_4xx_is_transient(code: int) -> None:
    assert DEFAULTS.classify(code, "").reply_class == "transient"


@pytest.mark.parametrize("code", [500, 550, 551, 552, 553, 554, 599])
def test_every_5xx_but_auth_is_permanent(code: int) -> None:
    assert DEFAULTS.classify(code, "").reply_class == "permanent"
    assert DEFAULTS.classify(code, "").hard_bounce is False


@pytest.mark.parametrize(
    "reply",
    [
        "Recipient 5.7.1 rejected",  # dotted numbers later in the text are not the enhanced code
        "Rejected for 5.1.1 reasons",
        "  5.1.1x unknown",
    ],
)
def test_enhanced_code_is_read_only_where_it_stands(reply: str) -> None:
    assert DEFAULTS.classify(553, reply).rule == "permanent_5xx"


def test_enhanced_prefix_matches_whole_components() -> None:
    rules = ReplyRules([ReplyRule("exact", "transient", enhanced="4.7.1"), ReplyRule("rest", "permanent")])
    assert rules.classify(450, "4.7.1 greylisted").rule == "exact"
    assert rules.classify(450, "450 4.7.1 greylisted").rule == "exact"
    assert rules.classify(450, "4.7.10 something").rule == "rest"
    assert rules.classify(450, "4.7 something").rule == "rest"
    family = ReplyRules([ReplyRule("family", "permanent", enhanced="5.1."), ReplyRule("rest", "transient")])
    assert family.classify(550, "5.1.10 null mx").rule == "family"
    assert family.classify(550, "5.10.1 something").rule == "rest"


def test_rule_conditions_all_hold() -> None:
    rule = ReplyRule("x", "transient", code_set(550), enhanced="5.2", text=re.compile("quota", re.I))
    rules = ReplyRules([rule, ReplyRule("rest", "permanent")])
    assert rules.classify(550, "5.2.2 Quota exceeded").rule == "x"
    assert rules.classify(552, "5.2.2 quota exceeded").rule == "rest"
    assert rules.classify(550, "5.1.1 quota exceeded").rule == "rest"
    assert rules.classify(550, "5.2.2 mailbox full").rule == "rest"


def test_no_rule_matching_is_transient() -> None:
    assert ReplyRules([]).classify(550, "5.1.1 user unknown") == Classification(
        "transient", "unclassified", False, None
    )


def test_reply_delay_wins_over_the_rule_delay() -> None:
    rules = ReplyRules([ReplyRule("wait", "transient", code_set("4xx"), retry_after=120.0)])
    assert rules.classify(450, "busy").retry_after == 120.0
    assert rules.classify(450, "busy, try again in 5 seconds").retry_after == 5.0


def test_code_set() -> None:
    assert code_set(550, "45x") == frozenset({550, *range(450, 460)})
    assert code_set("5xx") == frozenset(range(500, 600))
    assert code_set("5XX") == frozenset(range(500, 600))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"name": ""}, "name"),
        ({"reply_class": "soft"}, "reply_class"),
        ({"enhanced": "5.1.1.1"}, "enhanced"),
        ({"enhanced": "6.1"}, "enhanced"),
        ({"reply_class": "transient", "hard_bounce": True}, "hard_bounce"),
        ({"retry_after": 5.0}, "retry_after"),
        ({"reply_class": "transient", "retry_after": -1.0}, "retry_after"),
        ({"reply_class": "transient", "retry_after": float("inf")}, "retry_after"),
    ],
)
def test_bad_rules_are_refused(kwargs: dict[str, Any], field: str) -> None:
    fields: dict[str, Any] = {"name": "x", "reply_class": "permanent", **kwargs}
    with pytest.raises(ReplyRulesError, match=f"field '{field}'"):
        ReplyRule(**fields)


def test_defaults_start_with_auth_and_end_with_a_catch_all() -> None:
    assert DEFAULT_RULES[0].reply_class == "account_stop"
    assert DEFAULT_RULES[-1] == ReplyRule("unclassified", "transient")
    assert ReplyRules.defaults().rules == DEFAULT_RULES


# --- transport failures ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error_class", "reply_class", "rule"),
    [
        ("connection", "transient", "connection_failed"),
        ("timeout", "transient", "timeout"),
        ("tls", "transient", "tls_failed"),
        ("auth", "account_stop", "auth_failed"),
        ("protocol", "transient", "unknown_error"),
        ("", "transient", "unknown_error"),
    ],
)
def test_classify_error(error_class: str, reply_class: ReplyClass, rule: str) -> None:
    assert DEFAULTS.classify_error(error_class) == Classification(reply_class, rule, False, None)


# --- rules from configuration ---------------------------------------------------------------


def write_rules(tmp_path: Path, rules: Any) -> str:
    path = tmp_path / "reply-rules.json"
    path.write_text(json.dumps(rules), encoding="utf-8")
    return str(path)


def test_file_rules_come_before_the_defaults(tmp_path: Path) -> None:
    path = write_rules(
        tmp_path,
        [
            {"name": "quota_is_temporary", "reply_class": "transient", "codes": [550],
             "text": "quota exceeded", "retry_after": 1800},
            {"name": "corp_blocks", "reply_class": "permanent", "codes": ["55x"], "enhanced": "5.7.",
             "text": "corp-filter", "hard_bounce": True},
        ],
    )
    rules = ReplyRules.from_file(path)
    assert rules.classify(550, "5.2.2 <x@example.com>: Mailbox quota exceeded") == Classification(
        "transient", "quota_is_temporary", False, 1800.0
    )
    assert rules.classify(550, "Quota Exceeded, try again in 10 minutes").retry_after == 600.0
    assert rules.classify(552, "5.2.2 quota exceeded").rule == "mailbox_full"  # not 550: the defaults
    assert rules.classify(553, "5.7.1 rejected by CORP-FILTER") == Classification(
        "permanent", "corp_blocks", True, None
    )
    assert rules.classify(550, "5.1.1 User unknown").rule == "bad_mailbox"
    assert rules.rules[2:] == DEFAULT_RULES


def test_a_single_code_may_stand_alone(tmp_path: Path) -> None:
    path = write_rules(tmp_path, [{"name": "odd", "reply_class": "transient", "codes": 554}])
    assert ReplyRules.from_file(path).classify(554, "5.7.1 spam").rule == "odd"


def test_an_empty_file_list_is_the_defaults(tmp_path: Path) -> None:
    assert ReplyRules.from_file(write_rules(tmp_path, [])).rules == DEFAULT_RULES


def test_from_settings(tmp_path: Path) -> None:
    settings = Settings()
    assert ReplyRules.from_settings(settings).rules == DEFAULT_RULES
    path = write_rules(tmp_path, [{"name": "x", "reply_class": "transient", "codes": [550]}])
    custom = ReplyRules.from_settings(dataclasses.replace(settings, reply_rules_file=path))
    assert custom.classify(550, "5.1.1 user unknown").rule == "x"


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ({"name": "x"}, "must be a JSON list of rules, not dict"),
        (["x"], "rule 0: must be an object, not str"),
        ([{"reply_class": "transient", "codes": [550]}], "rule 0: field 'name': required"),
        ([{"name": 5, "reply_class": "transient", "codes": [550]}], "rule 0: field 'name': required"),
        ([{"name": "a", "codes": [550]}], r"rule 0 \(a\): field 'reply_class': required"),
        ([{"name": "a", "reply_class": "soft", "codes": [550]}], r"rule 0 \(a\): field 'reply_class'"),
        ([{"name": "a", "reply_class": "transient", "codes": [550]},
          {"name": "b", "reply_class": "transient", "codes": [999]}], r"rule 1 \(b\): field 'codes': 999"),
        ([{"name": "a", "reply_class": "transient", "codes": ["5x"]}], "field 'codes': '5x'"),
        ([{"name": "a", "reply_class": "transient", "codes": [True]}], "field 'codes': True"),
        ([{"name": "a", "reply_class": "transient", "codes": {"550": 1}}], "field 'codes': a list"),
        ([{"name": "a", "reply_class": "transient", "enhanced": 5.1}], "field 'enhanced'"),
        ([{"name": "a", "reply_class": "transient", "enhanced": "5.1.1.1"}], "field 'enhanced'"),
        ([{"name": "a", "reply_class": "transient", "text": "(unclosed"}],
         "field 'text': not a regular expression"),
        ([{"name": "a", "reply_class": "transient", "text": ""}], "field 'text'"),
        ([{"name": "a", "reply_class": "transient"}], "rule 0 \\(a\\): needs at least one of"),
        ([{"name": "a", "reply_class": "transient", "codes": [550], "hard_bounce": True}],
         "field 'hard_bounce': only a permanent rule"),
        ([{"name": "a", "reply_class": "permanent", "codes": [550], "hard_bounce": "yes"}],
         "field 'hard_bounce': true or false"),
        ([{"name": "a", "reply_class": "permanent", "codes": [550], "retry_after": 60}],
         "field 'retry_after': a permanent rule is never retried"),
        ([{"name": "a", "reply_class": "transient", "codes": [550], "retry_after": "60"}],
         "field 'retry_after': seconds"),
        ([{"name": "a", "reply_class": "transient", "codes": [550], "retry_after": -5}],
         "field 'retry_after': seconds"),
        ([{"name": "a", "reply_class": "transient", "codes": [550], "class": "x"}],
         "rule 0 \\(a\\): unknown field 'class'"),
    ],
)
def test_bad_files_name_the_rule_and_field(tmp_path: Path, rules: Any, message: str) -> None:
    path = write_rules(tmp_path, rules)
    with pytest.raises(ReplyRulesError, match=message) as raised:
        ReplyRules.from_file(path)
    assert path in str(raised.value)


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.json")
    with pytest.raises(ReplyRulesError, match="cannot read"):
        ReplyRules.from_file(missing)
    broken = tmp_path / "broken.json"
    broken.write_text('[{"name": "a",', encoding="utf-8")
    with pytest.raises(ReplyRulesError, match=r"not valid JSON: .*line 1"):
        ReplyRules.from_file(str(broken))
    with pytest.raises(ValueError):  # a ReplyRulesError is a ValueError
        ReplyRules.from_settings(dataclasses.replace(Settings(), reply_rules_file=missing))
