"""The checks of hostile input that a JSON Schema cannot express (R1).

Contract: `size_problem(raw)` says why a raw message is too large to parse
(None: it is not); it runs before any JSON parsing. `problem(message)` runs
after the message's schema accepted it and says why the message must still be
refused, naming the field (e.g. `recipients[3].email: not a valid address:
...`), or returns None. It never raises for any input. The checks:

- no NUL character in any string, key or value, anywhere;
- no line break (CR, LF, or any other character `str.splitlines` breaks on),
  NUL or other control character in a value that ends up in a mail header:
  the subject template, every address and display name (from, reply_to, to,
  recipient, recipients[i]), the unsubscribe URL template, the Message-ID
  header and the outcome's recipient address (no header injection);
- every address is a valid, globally deliverable address by RFC 5321/5322
  syntax, internationalised domains (IDNA) and local parts (SMTPUTF8)
  included (`email-validator`, without DNS look-ups);
- objects and arrays nest at most `MAX_DEPTH` levels (a free-form `command`
  nested deeper could be parsed but never encoded again);
- every `variables` object holds at most `MAX_VARIABLES` names of at most
  `MAX_VARIABLE_NAME_CHARS` characters and encodes to at most
  `MAX_VARIABLES_BYTES` bytes;
- integer fields are integers (not `5.0`) from 0 to `MAX_INTEGER`, and a
  campaign declares no more chunks than recipients;
- an SMTP reply is at most `MAX_SMTP_REPLY_CHARS` characters; a working-hours
  time zone is a known IANA zone; the command carried by an `outcome.deferred`
  is a `send.email` of the same send and campaign.

The limits are sized so that everything derived from an accepted message (its
send commands, a deferred outcome carrying one, and the dead letter of any of
them, base64 and all) stays under the producers' 1,000,000-byte
`message.max.bytes` and Kafka's default 1 MiB `max.message.bytes`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator, Mapping
from typing import Any
from zoneinfo import ZoneInfo

import orjson
from email_validator import EmailNotValidError, validate_email

#: Largest raw message (bytes) any ingress parses; a larger one is refused unread.
MAX_MESSAGE_BYTES = 512 * 1024
#: Largest value of an integer field (it must fit a Postgres `integer`).
MAX_INTEGER = 2**31 - 1
#: Most names one `variables` object may hold.
MAX_VARIABLES = 200
#: Longest variable name.
MAX_VARIABLE_NAME_CHARS = 128
#: Largest JSON encoding of one `variables` object (campaign or recipient).
MAX_VARIABLES_BYTES = 32 * 1024
#: Longest SMTP reply an outcome may carry (the sender cuts replies to this length).
MAX_SMTP_REPLY_CHARS = 2000
#: Deepest nesting of objects and arrays (the JSON parser allows 1024, the encoder 255).
MAX_DEPTH = 32

#: Characters that must never reach a header: C0 controls but TAB, DEL, C1
#: controls (NEL included) and the Unicode line and paragraph separators.
_HEADER_UNSAFE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")
#: An ASCII dot-atom local part (a subset of RFC 5322 atext) @ an ASCII domain: the fast path.
_PLAIN_ADDRESS = re.compile(r"([A-Za-z0-9_+-]+(?:\.[A-Za-z0-9_+-]+)*)@([A-Za-z0-9.-]+)\Z")
_TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?Z\Z")
#: Fields whose value must be an integer from 0 to MAX_INTEGER (outside `variables`).
_INTEGER_FIELDS = frozenset({
    "priority", "attempt", "total_recipients", "total_chunks", "chunk_index", "rate_per_hour",
    "smtp_code",
})
#: Objects holding an address `{email, name?}` (a recipient also has `variables`).
_MAILBOX_FIELDS = ("from", "reply_to", "to", "recipient")


def size_problem(raw: bytes) -> str | None:
    """Why `raw` is too large to be parsed, or None."""
    if len(raw) > MAX_MESSAGE_BYTES:
        return (f"message is {len(raw)} bytes; at most {MAX_MESSAGE_BYTES} bytes are accepted "
                "(send fewer recipients per chunk or a smaller template)")
    return None


def problem(message: Mapping[str, Any]) -> str | None:
    """Why a schema-valid `message` must still be refused (the first problem found), or None."""
    for check in (_depth_problem, _nul_problem, _header_problem, _address_problem, _variables_problem,
                  _integer_problem, _kind_problem):
        found = check(message)
        if found is not None:
            return found
    return None


def address_problem(address: str) -> str | None:
    """Why `address` is not a valid address to mail (syntax, IDNA), or None."""
    return _address_reason(address)


def header_unsafe(value: str) -> bool:
    """Whether `value` holds a line break, NUL or control character a header must not carry."""
    return _HEADER_UNSAFE.search(value) is not None


def _depth_problem(message: Mapping[str, Any]) -> str | None:
    stack: list[tuple[int, Any]] = [(0, message)]
    while stack:
        depth, item = stack.pop()
        if depth > MAX_DEPTH:
            return f"message is nested more than {MAX_DEPTH} levels deep"
        if isinstance(item, dict):
            stack.extend((depth + 1, child) for child in item.values())
        elif isinstance(item, list):
            stack.extend((depth + 1, child) for child in item)
    return None


def _nul_problem(message: Mapping[str, Any]) -> str | None:
    for path, value in _strings(message, ""):
        if "\x00" in value:
            where = path if len(path) <= 200 else f"{path[:120]}...{path[-60:]}"
            return f"{where}: contains a NUL character"
    return None


def _strings(value: Any, path: str) -> Iterator[tuple[str, str]]:
    """(path, string) of every key and string value under `value` (iteratively: a free-form
    object may be nested as deep as the JSON parser allows)."""
    stack = [(path, value)]
    while stack:
        where, item = stack.pop()
        if isinstance(item, str):
            yield where or "message", item
        elif isinstance(item, dict):
            for key, child in reversed(item.items()):
                inner = _join(where, key)
                stack.append((inner, child))
                stack.append((f"{inner} (the name)", key))
        elif isinstance(item, list):
            stack.extend((f"{where}[{index}]", child) for index, child in reversed(list(enumerate(item))))


def _header_values(message: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
    """(path, value) of every field that ends up in a mail header."""
    template = message.get("template")
    if isinstance(template, dict):
        yield "template.subject", template.get("subject")
    yield "unsubscribe_url", message.get("unsubscribe_url")
    yield "message_id_header", message.get("message_id_header")
    for path, address in _mailboxes(message):
        yield f"{path}.email", address.get("email")
        yield f"{path}.name", address.get("name")


def _mailboxes(message: Mapping[str, Any]) -> Iterator[tuple[str, Mapping[str, Any]]]:
    for field in _MAILBOX_FIELDS:
        value = message.get(field)
        if isinstance(value, dict):
            yield field, value
    recipients = message.get("recipients")
    if isinstance(recipients, list):
        for index, value in enumerate(recipients):
            if isinstance(value, dict):
                yield f"recipients[{index}]", value


def _header_problem(message: Mapping[str, Any]) -> str | None:
    for path, value in _header_values(message):
        if isinstance(value, str) and header_unsafe(value):
            return f"{path}: contains a line break, NUL or control character (header injection)"
    return None


def _address_problem(message: Mapping[str, Any]) -> str | None:
    addresses: list[tuple[str, Any]] = [
        (f"{path}.email", mailbox.get("email")) for path, mailbox in _mailboxes(message)
    ]
    addresses += [(field, message.get(field)) for field in ("email", "recipient_email")]
    for path, address in addresses:
        if isinstance(address, str):
            reason = _address_reason(address)
            if reason is not None:
                return f"{path}: {reason}"
    return None


def _address_reason(address: str) -> str | None:
    """`email-validator`'s verdict; a plain ASCII dot-atom address on a domain already found
    valid is accepted without it (it is what nearly every recipient looks like, and the full
    validation costs ~20-30 us an address, most of it the domain's IDNA checks). Anything
    else, and any address whose domain is not valid, gets the full validation and its reason.
    """
    match = _PLAIN_ADDRESS.match(address)
    if (match is not None and len(match.group(1)) <= 64 and len(address) <= 254
            and "xn--" not in match.group(2).lower()  # IDNA labels: their Unicode form counts
            and _validator_reason("a@" + match.group(2)) is None):
        return None
    return _validator_reason(address)


@functools.lru_cache(maxsize=16384)
def _validator_reason(address: str) -> str | None:
    try:
        validate_email(address, check_deliverability=False)
    except EmailNotValidError as exc:
        return f"not a valid address: {exc}"
    except Exception as exc:  # the validator must never take a service down
        return f"not a valid address ({type(exc).__name__})"
    return None


def _variables_problem(message: Mapping[str, Any]) -> str | None:
    objects: list[tuple[str, Any]] = [("variables", message.get("variables"))]
    objects += [(f"{path}.variables", mailbox.get("variables")) for path, mailbox in _mailboxes(message)]
    for path, variables in objects:
        if not isinstance(variables, dict):
            continue
        if len(variables) > MAX_VARIABLES:
            return f"{path}: {len(variables)} variables; at most {MAX_VARIABLES} are allowed"
        for name in variables:
            if len(name) > MAX_VARIABLE_NAME_CHARS:
                return (f"{path}: variable name {_clip(name)!r}... is longer than "
                        f"{MAX_VARIABLE_NAME_CHARS} characters")
        size = len(orjson.dumps(variables))
        if size > MAX_VARIABLES_BYTES:
            return f"{path}: {size} bytes of variables; at most {MAX_VARIABLES_BYTES} are allowed"
    return None


def _integer_problem(message: Mapping[str, Any]) -> str | None:
    for field in _INTEGER_FIELDS:
        value = message.get(field)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            return f"{field}: must be an integer, not {_clip(repr(value))}"
        if not 0 <= value <= MAX_INTEGER:
            return f"{field}: {value} is out of range (0 to {MAX_INTEGER})"
    return None


def _kind_problem(message: Mapping[str, Any]) -> str | None:
    kind = message.get("kind")
    if kind == "campaign.start" and message["total_chunks"] > message["total_recipients"]:
        return (f"total_chunks: {message['total_chunks']} chunks cannot hold "
                f"{message['total_recipients']} recipients (every chunk holds at least one)")
    reply = message.get("smtp_reply")
    if isinstance(reply, str) and len(reply) > MAX_SMTP_REPLY_CHARS:
        return f"smtp_reply: longer than {MAX_SMTP_REPLY_CHARS} characters"
    hours = message.get("working_hours")
    zone = hours.get("time_zone") if isinstance(hours, dict) else None
    if isinstance(zone, str) and not _known_zone(zone):
        return f"working_hours.time_zone: {_clip(zone)!r} is not a known IANA time zone"
    if kind == "outcome.deferred":
        return _deferred_command_problem(message)
    return None


@functools.lru_cache(maxsize=512)
def _known_zone(name: str) -> bool:
    try:
        ZoneInfo(name)
    except Exception:  # ValueError for a path-like key, ZoneInfoNotFoundError, ...
        return False
    return True


def _deferred_command_problem(message: Mapping[str, Any]) -> str | None:
    command = message["command"]
    if command.get("kind") != "send.email":
        return f"command.kind: must be 'send.email', not {_clip(repr(command.get('kind')))}"
    for field in ("send_id", "campaign_id"):
        if command.get(field) != message[field]:
            return f"command.{field}: does not match the outcome's {field}"
    priority = command.get("priority")
    if priority is not None and (
        isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority <= 9
    ):
        return "command.priority: must be an integer from 0 to 9"
    for field in ("queued_at", "occurred_at", "first_attempt_at"):
        value = command.get(field)
        if value is not None and not (isinstance(value, str) and _TIMESTAMP.match(value)):
            return f"command.{field}: must be a UTC RFC 3339 time ending in Z"
    return None


def _join(path: str, key: str) -> str:
    """`path.key`, or `path['key']` (repr, clipped) for a key that is not a plain name."""
    if _PLAIN_NAME.match(key):
        return f"{path}.{key}" if path else key
    return f"{path}[{_clip(key)!r}]"


def _clip(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[:limit]
