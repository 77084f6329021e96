"""What real provider replies ask of the sender: slow down, and after how long to retry."""

from __future__ import annotations

import pytest

from services.sender.smtp_replies import is_slow_down, retry_after


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
