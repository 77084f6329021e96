"""What an SMTP reply asks of us: retry, give up, or stop the account, and after how long.

Contract:
- `is_slow_down(code, reply)` is True for the replies providers use to throttle
  a sender (421 and 451, enhanced codes 4.7.x and 4.4.5, and texts such as
  "too many", "slow down", "rate limit", "try again later").
- `retry_after(reply)` is the delay in seconds a reply names ("try again in 30
  seconds", "retry after 5 minutes"), or None.
- `ReplyRules` is the classification table (R31): an ordered list of
  `ReplyRule`s, each matching on the reply code, the enhanced status code
  (RFC 3463) and a text pattern; the first rule that matches decides whether
  the reply is `transient` (retry with backoff), `permanent` (fail; a hard
  bounce also suppresses the address) or `account_stop` (the account itself is
  refused, e.g. bad credentials). `ReplyRules.defaults()` follows RFC 5321 and
  RFC 3463; `from_file` puts an operator's JSON rules before the defaults and
  raises `ReplyRulesError` naming the rule and field of any mistake.
- `classify_error(error_class)` maps a transport failure (`connection`,
  `timeout`, `tls`, `auth`, see smtp_pool.py) to the same classes.
- Each rule also says whether a reply it matches counts towards the circuit
  breakers (`ReplyRule.breaker`, issue 14 defect 10): only what says the
  server or the connection is in trouble counts (421, 4.3.x system states,
  4.7.x and other throttling, 451/452/454 without a mailbox status, no reply
  at all, and every connection failure, timeout or TLS failure); a reply
  about one recipient's mailbox (450, 4.1.x addresses, 4.2.x mailbox states,
  greylisting) does not. `ReplyRules.counts_for_breaker(code, reply)` is that
  verdict; `breaker_table()` is the default table as docs/GUARANTEES.md shows it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from services.pipeline.settings import Settings

_SLOW_CODES = frozenset({421, 451})
#: An enhanced status code (RFC 3463) opens the reply text, after the reply code if repeated.
_SLOW_ENHANCED = re.compile(r"^\s*(?:\d{3}[ -])?4\.(7\.\d{1,3}|4\.5)\b")
_SLOW_TEXT = re.compile(
    r"too many|slow down|rate.?limit|throttl|try again later|temporarily deferred|too fast",
    re.IGNORECASE,
)
_RETRY_AFTER = re.compile(
    r"(?:try again|retry)(?: later)?\s+(?:in|after)\s+(\d{1,6})\s*(s|sec|second|m|min|minute|h|hour)s?\b",
    re.IGNORECASE,
)
_UNIT = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60, "h": 3600, "hour": 3600}


def is_slow_down(code: int | None, reply: str) -> bool:
    """Whether a 4xx reply asks the sender to send more slowly."""
    if code is None or not 400 <= code <= 499:
        return False
    return code in _SLOW_CODES or bool(_SLOW_ENHANCED.search(reply) or _SLOW_TEXT.search(reply))


def retry_after(reply: str) -> float | None:
    """Seconds the reply asks us to wait ("try again in 30 seconds"), or None."""
    match = _RETRY_AFTER.search(reply)
    if match is None:
        return None
    return float(int(match.group(1)) * _UNIT[match.group(2).lower()])


# --- the classification table ----------------------------------------------------------------

ReplyClass = Literal["transient", "permanent", "account_stop"]
REPLY_CLASSES: tuple[ReplyClass, ...] = get_args(ReplyClass)

#: The enhanced status code where it stands: at the start, after the reply code if repeated.
_ENHANCED = re.compile(r"^\s*(?:\d{3}[ -])?([245]\.\d{1,3}\.\d{1,3})\b")
#: A rule's enhanced prefix: a class, class.subject, or a whole code ("5", "5.1.", "4.7.1").
_ENHANCED_PREFIX = re.compile(r"^[245](?:\.\d{1,3}){0,2}\.?$")
#: A code in a rules file: 550, or a family with x for any digit ("5xx", "55x").
_CODE_PATTERN = re.compile(r"^[1-5][0-9x][0-9x]$")


class ReplyRulesError(ValueError):
    """A reply rule, or the file holding rules, cannot be used; the message names what is wrong."""


def code_set(*patterns: int | str) -> frozenset[int]:
    """Reply codes from exact codes and families with x wildcards: `code_set(550, "45x")`."""
    found: set[int] = set()
    for pattern in patterns:
        if isinstance(pattern, int):
            found.add(pattern)
            continue
        regex = re.compile(pattern.lower().replace("x", r"\d") + "$")
        found.update(code for code in range(100, 600) if regex.match(str(code)))
    return frozenset(found)


def _enhanced_parts(value: str) -> tuple[int, ...]:
    return tuple(int(part) for part in value.rstrip(".").split("."))


@dataclass(frozen=True)
class ReplyRule:
    """One row of the table: what it matches, and the class it gives a matching reply.

    A rule matches when every condition it sets holds: the reply code is one of
    `codes` (empty: any code, or none), the reply's enhanced status code starts
    with `enhanced` component by component ("5.1" matches 5.1.1 and 5.1.10;
    "4.7.1" does not match 4.7.10), and `text` is found anywhere in the reply.
    """

    name: str
    reply_class: ReplyClass
    codes: frozenset[int] = frozenset()
    enhanced: str | None = None
    text: re.Pattern[str] | None = None
    hard_bounce: bool = False
    retry_after: float | None = None
    #: Whether a transient reply this rule matches counts towards the campaign's and the
    #: account's circuit breakers: True when it says the server or the connection is in
    #: trouble, False when it is about one recipient (its mailbox, its address, greylisting).
    breaker: bool = True

    def __post_init__(self) -> None:
        def fail(field: str, problem: str) -> ReplyRulesError:
            return ReplyRulesError(f"field {field!r}: {problem}")

        if not self.name:
            raise fail("name", "must not be empty")
        if self.reply_class not in REPLY_CLASSES:
            raise fail("reply_class", f"one of {', '.join(REPLY_CLASSES)}; got {self.reply_class!r}")
        if self.enhanced is not None and not _ENHANCED_PREFIX.match(self.enhanced):
            raise fail("enhanced", f'a status code or its prefix ("5.1", "4.7.1"); got {self.enhanced!r}')
        if self.hard_bounce and self.reply_class != "permanent":
            raise fail("hard_bounce", "only a permanent rule can be a hard bounce")
        if self.retry_after is not None:
            if self.reply_class == "permanent":
                raise fail("retry_after", "a permanent rule is never retried")
            if not (math.isfinite(self.retry_after) and self.retry_after >= 0):
                raise fail("retry_after", f"seconds, a number >= 0; got {self.retry_after!r}")

    def matches(self, code: int | None, enhanced: tuple[int, ...] | None, reply: str) -> bool:
        """Whether this rule applies to the reply (enhanced: the reply's code split at the dots)."""
        if self.codes and code not in self.codes:
            return False
        if self.enhanced is not None:
            wanted = _enhanced_parts(self.enhanced)
            if enhanced is None or enhanced[: len(wanted)] != wanted:
                return False
        return self.text is None or self.text.search(reply) is not None


@dataclass(frozen=True)
class Classification:
    """What to do with one failed attempt; `rule` names the rule that decided it."""

    reply_class: ReplyClass
    rule: str
    hard_bounce: bool
    #: Seconds to wait before the retry, from the reply text or else the rule; None when
    #: neither names one, and always None for permanent replies.
    retry_after: float | None
    #: Whether the reply counts towards the circuit breakers (see `ReplyRule.breaker`);
    #: always False for permanent replies (they neither count nor reset). Not compared:
    #: two classifications are equal when they decide the same retry.
    breaker: bool = field(default=True, compare=False)


def _text(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern, re.IGNORECASE)


_5XX = code_set("5xx")
_4XX = code_set("4xx")
_REJECTED_RECIPIENT = frozenset({550, 551, 553})
#: The 4xx codes a reply about one recipient comes with (421 always means the whole server).
_RECIPIENT_4XX = frozenset({450, 451, 452})

#: The default table, most specific first (RFC 5321 section 4.2, RFC 3463, RFC 4954, RFC 7505).
DEFAULT_RULES: tuple[ReplyRule, ...] = (
    # The account is refused: credentials, app passwords, TLS or AUTH required.
    ReplyRule("auth_failed", "account_stop", code_set(530, 534, 535)),
    ReplyRule("auth_failed", "account_stop", _5XX, enhanced="5.7.8"),
    # The recipient's address is bad: hard bounces.
    ReplyRule("bad_mailbox", "permanent", _REJECTED_RECIPIENT, enhanced="5.1.1", hard_bounce=True),
    ReplyRule("bad_domain", "permanent", _REJECTED_RECIPIENT, enhanced="5.1.2", hard_bounce=True),
    ReplyRule("bad_address_syntax", "permanent", _REJECTED_RECIPIENT, enhanced="5.1.3", hard_bounce=True),
    ReplyRule("mailbox_moved", "permanent", _REJECTED_RECIPIENT, enhanced="5.1.6", hard_bounce=True),
    ReplyRule("null_mx", "permanent", _REJECTED_RECIPIENT | {556}, enhanced="5.1.10", hard_bounce=True),
    # Our own daily sending quota (Gmail 5.4.5): the account recovers by itself.
    ReplyRule(
        "sending_quota", "transient", _5XX,
        text=_text(r"sending (?:quota|limit)|(?:quota|limit) (?:for sending|of sent)"),
        retry_after=3600.0,
    ),
    # The mailbox exists but cannot take mail now: permanent, but no reason to suppress it.
    ReplyRule("mailbox_full", "permanent", _5XX, enhanced="5.2.2"),
    ReplyRule(
        "mailbox_full", "permanent", _5XX, text=_text(r"mailbox (?:is )?full|over ?quota|quota exceeded")
    ),
    # Providers that say "no such user" without a 5.1.x code (Yandex, Mail.ru).
    ReplyRule(
        "unknown_user", "permanent", _REJECTED_RECIPIENT, hard_bounce=True,
        text=_text(
            r"no such (?:user|mailbox|recipient)|user (?:unknown|not found|does ?n[o']t exist)"
            r"|unknown (?:user|recipient)|recipient not found|mailbox (?:not found|does ?n[o']t exist)"
            r"|invalid (?:mailbox|recipient)"
        ),
    ),
    # Refused for policy, spam or reputation: permanent for this message, the address is fine.
    ReplyRule("policy_rejected", "permanent", _5XX, enhanced="5.7"),
    ReplyRule("policy_rejected", "permanent", _5XX, text=_text(r"spam|policy|block ?list|blacklist|blocked")),
    ReplyRule("permanent_5xx", "permanent", _5XX),
    # 4xx: greylisting and throttling first, then the enhanced codes about one recipient,
    # then each code RFC 5321 names, then the rest. `breaker=False`: the reply is about one
    # recipient (its mailbox, its address), not the server (issue 14, defect 10).
    ReplyRule("greylisted", "transient", _4XX, text=_text(r"grey ?list|gray ?list"), breaker=False),
    ReplyRule("slow_down", "transient", _4XX, enhanced="4.7"),
    ReplyRule("slow_down", "transient", _4XX, enhanced="4.4.5"),
    ReplyRule("system_state", "transient", code_set(450), enhanced="4.3"),
    ReplyRule("mailbox_state", "transient", _RECIPIENT_4XX, enhanced="4.2", breaker=False),
    ReplyRule("address_state", "transient", _RECIPIENT_4XX, enhanced="4.1", breaker=False),
    ReplyRule("slow_down", "transient", _4XX, text=_SLOW_TEXT),
    ReplyRule("service_unavailable", "transient", code_set(421)),
    ReplyRule("mailbox_busy", "transient", code_set(450), breaker=False),
    ReplyRule("local_error", "transient", code_set(451)),
    ReplyRule("insufficient_storage", "transient", code_set(452)),
    ReplyRule("tls_unavailable", "transient", code_set(454)),
    ReplyRule("transient_4xx", "transient", _4XX),
    # No reply code (the connection dropped) or one outside 4xx/5xx: try again.
    ReplyRule("unclassified", "transient"),
)

#: Transport failures (services/sender/smtp_pool.py `ErrorClass`) and what they mean.
_ERRORS: dict[str, Classification] = {
    "connection": Classification("transient", "connection_failed", False, None),
    "timeout": Classification("transient", "timeout", False, None),
    "tls": Classification("transient", "tls_failed", False, None),
    "auth": Classification("account_stop", "auth_failed", False, None),
}
_UNKNOWN_ERROR = Classification("transient", "unknown_error", False, None)


class ReplyRules:
    """An ordered table of reply rules; the first rule that matches a reply decides."""

    def __init__(self, rules: Sequence[ReplyRule]) -> None:
        self.rules: tuple[ReplyRule, ...] = tuple(rules)

    @classmethod
    def defaults(cls) -> ReplyRules:
        """The RFC 5321 / RFC 3463 table (`DEFAULT_RULES`)."""
        return cls(DEFAULT_RULES)

    @classmethod
    def from_file(cls, path: str) -> ReplyRules:
        """The rules of a JSON file, put before the defaults.

        The file is a list of objects with the fields of `ReplyRule`: `name` and
        `reply_class` required; `codes` a list of codes (550) or families ("5xx");
        `enhanced` a prefix ("5.1", "4.7.1"); `text` a regular expression searched
        case-insensitively; `hard_bounce` a boolean; `retry_after` seconds; `breaker` a
        boolean, false for a reply about one recipient (it then never counts towards the
        circuit breakers; default true).
        Raises `ReplyRulesError` naming the file, the rule's index and the field.
        """
        try:
            with open(path, encoding="utf-8") as file:
                data = json.load(file)
        except OSError as exc:
            raise ReplyRulesError(f"reply rules file {path!r}: cannot read: {exc.strerror or exc}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ReplyRulesError(f"reply rules file {path!r}: not valid JSON: {exc}") from None
        try:
            rules = parse_rules(data)
        except ReplyRulesError as exc:
            raise ReplyRulesError(f"reply rules file {path!r}: {exc}") from None
        return cls((*rules, *DEFAULT_RULES))

    @classmethod
    def from_settings(cls, settings: Settings) -> ReplyRules:
        """`from_file(settings.reply_rules_file)`, or the defaults when it is empty."""
        if not settings.reply_rules_file:
            return cls.defaults()
        return cls.from_file(settings.reply_rules_file)

    def classify(self, code: int | None, reply: str) -> Classification:
        """The class the first matching rule gives the reply; transient when none matches."""
        found = _ENHANCED.match(reply)
        enhanced = _enhanced_parts(found.group(1)) if found else None
        for rule in self.rules:
            if rule.matches(code, enhanced, reply):
                return _classification(rule.name, rule.reply_class, rule.hard_bounce, rule.retry_after,
                                       reply, rule.breaker)
        return _classification("unclassified", "transient", False, None, reply)

    def counts_for_breaker(self, code: int | None, reply: str) -> bool:
        """Whether a transient reply counts towards the circuit breakers: True when it says the
        server or the connection is in trouble, False when it is about one recipient. No reply
        code at all (the connection failed or dropped) always counts."""
        if code is None:
            return True
        verdict = self.classify(code, reply)
        return verdict.reply_class != "permanent" and verdict.breaker

    def classify_error(self, error_class: str) -> Classification:
        """The class of a transport failure: connection, timeout and tls are transient, auth stops
        the account, anything else is transient (rule `unknown_error`). When the failure carries
        an SMTP reply (a 454 or 535 to AUTH), `classify` that reply instead."""
        return _ERRORS.get(error_class, _UNKNOWN_ERROR)


def _classification(
    name: str, reply_class: ReplyClass, hard_bounce: bool, rule_delay: float | None, reply: str,
    breaker: bool = True,
) -> Classification:
    if reply_class == "permanent":
        return Classification(reply_class, name, hard_bounce, None, breaker=False)
    asked = retry_after(reply)
    return Classification(reply_class, name, hard_bounce, asked if asked is not None else rule_delay,
                          breaker=breaker)


def breaker_table(rules: Sequence[ReplyRule] = DEFAULT_RULES) -> str:
    """The transient rules as a Markdown table: what each matches and whether it counts towards
    the circuit breakers (docs/GUARANTEES.md holds the default table; a unit test compares)."""
    lines = [
        "| Rule | Reply code | Enhanced code | Text | Counts towards the breakers |",
        "|---|---|---|---|---|",
    ]
    for rule in rules:
        if rule.reply_class != "transient":
            continue
        codes = _codes_text(rule.codes)
        text = f"`{rule.text.pattern}`" if rule.text is not None else "any"
        enhanced = "any" if not rule.enhanced else (
            rule.enhanced if rule.enhanced.count(".") == 2 else f"{rule.enhanced}.x")
        counts = "yes (the server)" if rule.breaker else "no (one recipient)"
        text = text.replace("|", "\\|")  # a pipe inside a cell
        lines.append(f"| `{rule.name}` | {codes} | {enhanced} | {text} | {counts} |")
    lines.append("| connection failure, timeout, TLS failure, no reply code | - | - | - | yes (the server) |")
    return "\n".join(lines)


def _codes_text(codes: frozenset[int]) -> str:
    if not codes:
        return "any"
    for family in range(1, 6):
        if codes == code_set(f"{family}xx"):
            return f"{family}xx"
    return ", ".join(str(code) for code in sorted(codes))


# --- reading rules from configuration ---------------------------------------------------------

_FIELDS = ("name", "reply_class", "codes", "enhanced", "text", "hard_bounce", "retry_after", "breaker")


def parse_rules(data: Any) -> list[ReplyRule]:
    """Rules from decoded JSON (a list of objects); errors name the rule's index and field."""
    if not isinstance(data, list):
        raise ReplyRulesError(f"must be a JSON list of rules, not {type(data).__name__}")
    return [_parse_rule(index, entry) for index, entry in enumerate(data)]


def _parse_rule(index: int, entry: Any) -> ReplyRule:
    where = f"rule {index}"
    if not isinstance(entry, dict):
        raise ReplyRulesError(f"{where}: must be an object, not {type(entry).__name__}")
    name = entry.get("name")
    if isinstance(name, str) and name:
        where = f"rule {index} ({name})"
    unknown = sorted(set(entry) - set(_FIELDS))
    if unknown:
        raise ReplyRulesError(f"{where}: unknown field {unknown[0]!r}; fields are {', '.join(_FIELDS)}")

    def fail(field: str, problem: str) -> ReplyRulesError:
        return ReplyRulesError(f"{where}: field {field!r}: {problem}")

    if not isinstance(name, str) or not name:
        raise fail("name", "required, a non-empty string")
    reply_class = entry.get("reply_class")
    if reply_class not in REPLY_CLASSES:
        raise fail("reply_class", f"required, one of {', '.join(REPLY_CLASSES)}; got {reply_class!r}")
    rule_codes = _parse_codes(entry.get("codes", []), fail)
    enhanced = entry.get("enhanced")
    if enhanced is not None and not isinstance(enhanced, str):
        raise fail("enhanced", f'a string such as "5.1" or "4.7.1"; got {enhanced!r}')
    text = entry.get("text")
    pattern: re.Pattern[str] | None = None
    if text is not None:
        if not isinstance(text, str) or not text:
            raise fail("text", f"a non-empty regular expression; got {text!r}")
        try:
            pattern = _text(text)
        except re.error as exc:
            raise fail("text", f"not a regular expression: {exc}") from None
    if not (rule_codes or enhanced or pattern):
        raise ReplyRulesError(f"{where}: needs at least one of 'codes', 'enhanced', 'text'")
    hard_bounce = entry.get("hard_bounce", False)
    if not isinstance(hard_bounce, bool):
        raise fail("hard_bounce", f"true or false; got {hard_bounce!r}")
    delay = entry.get("retry_after")
    if delay is not None and (isinstance(delay, bool) or not isinstance(delay, int | float)):
        raise fail("retry_after", f"seconds, a number >= 0; got {delay!r}")
    breaker = entry.get("breaker", True)
    if not isinstance(breaker, bool):
        raise fail("breaker", f"true (the reply says the server is in trouble) or false; got {breaker!r}")
    try:
        return ReplyRule(
            name, reply_class, rule_codes, enhanced, pattern, hard_bounce,
            None if delay is None else float(delay), breaker,
        )
    except ReplyRulesError as exc:
        raise ReplyRulesError(f"{where}: {exc}") from None


def _parse_codes(value: Any, fail: Callable[[str, str], ReplyRulesError]) -> frozenset[int]:
    if isinstance(value, int | str) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list):
        raise fail("codes", f'a list of reply codes (550) or families ("5xx"); got {value!r}')
    parsed: list[int | str] = []
    for item in value:
        is_code = isinstance(item, int) and not isinstance(item, bool) and 100 <= item <= 599
        if not (is_code or (isinstance(item, str) and _CODE_PATTERN.match(item.lower()))):
            raise fail("codes", f'{item!r} is not a reply code (100-599) or a family such as "5xx"')
        parsed.append(item)
    return code_set(*parsed)
