"""The event contract: JSON Schemas in `schemas/`, compiled once, checked at every ingress.

Contract: `decode(raw, topic)` returns the message as a dict when `raw` is at
most `input_checks.MAX_MESSAGE_BYTES` long (checked before parsing), is JSON whose `kind`
belongs to `topic`, which its kind's schema accepts, and which passes the
checks no schema can express (`input_checks.py`: NUL, header injection,
address syntax and IDNA, variables and integer limits); otherwise it raises
`InvalidMessage` with a reason a person can act on, naming the field. It
never raises anything else for any input. `encode()` is the one serializer
(orjson). Schema files are named `<kind>.v<version>.json`.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

import fastjsonschema
import orjson

from services.pipeline import input_checks
from services.pipeline.topics import REGISTRY, Topic

SCHEMA_VERSION = 1
SCHEMAS_DIR = Path(__file__).resolve().parents[2] / "schemas"

Message = dict[str, Any]

#: Longest reason an InvalidMessage carries (a dead letter holds up to 2000 characters).
MAX_REASON_CHARS = 1000
#: A campaign id worth putting on a dead letter (the schema's id pattern).
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}\Z")


class InvalidMessage(ValueError):
    """A message that no schema of its topic accepts; `reason` says why."""

    def __init__(self, reason: str, *, campaign_id: str | None = None) -> None:
        if len(reason) > MAX_REASON_CHARS:
            reason = reason[: MAX_REASON_CHARS - 3] + "..."
        super().__init__(reason)
        self.reason = reason or "invalid message"
        self.campaign_id = campaign_id


def schema_path(kind: str, version: int = SCHEMA_VERSION) -> Path:
    """Where the schema of `kind` at `version` lives."""
    return SCHEMAS_DIR / f"{kind}.v{version}.json"


@cache
def load_schema(kind: str, version: int = SCHEMA_VERSION) -> dict[str, Any]:
    """The parsed JSON Schema of `kind`."""
    return dict(orjson.loads(schema_path(kind, version).read_bytes()))


@cache
def validator(kind: str, version: int = SCHEMA_VERSION) -> Callable[[Any], Any]:
    """The compiled validator of `kind` (compiled once per process)."""
    compiled: Callable[[Any], Any] = fastjsonschema.compile(load_schema(kind, version))
    return compiled


def compile_all() -> None:
    """Compile every registered kind's schema; fails fast when one is missing or broken."""
    for spec in REGISTRY.values():
        for kind in spec.kinds:
            validator(kind)


def validate(message: Message, topic: Topic | None = None) -> Message:
    """Check `message` against its kind's schema (and `topic`'s kinds); return it."""
    if not isinstance(message, dict):
        raise InvalidMessage(f"message must be a JSON object, not {type(message).__name__}")
    kind = message.get("kind")
    campaign_id = _campaign_id(message)
    if not isinstance(kind, str):
        raise InvalidMessage("message has no 'kind' string", campaign_id=campaign_id)
    allowed = REGISTRY[topic].kinds if topic is not None else _all_kinds()
    if kind not in allowed:
        where = f" on {topic.value}" if topic is not None else ""
        raise InvalidMessage(
            f"unknown kind {kind[:64]!r}{where}; expected one of {', '.join(allowed)}",
            campaign_id=campaign_id,
        )
    version = message.get("schema_version")
    if version != SCHEMA_VERSION:
        raise InvalidMessage(
            f"{kind}: unsupported schema_version {repr(version)[:64]}; "
            f"this service reads {SCHEMA_VERSION}",
            campaign_id=campaign_id,
        )
    try:
        validator(kind)(message)
    except fastjsonschema.JsonSchemaValueException as exc:
        raise InvalidMessage(f"{kind}: {exc.message}", campaign_id=campaign_id) from None
    problem = input_checks.problem(message)
    if problem is not None:
        raise InvalidMessage(f"{kind}: {problem}", campaign_id=campaign_id)
    return message


def _campaign_id(message: Message) -> str | None:
    """The message's campaign id when it is one (never a hostile blob on a dead letter)."""
    value = message.get("campaign_id")
    return value if isinstance(value, str) and _ID.match(value) else None


def decode(raw: bytes | None, topic: Topic) -> Message:
    """Parse and validate one message read from `topic`."""
    if raw is None:
        raise InvalidMessage("empty message (null value)")
    if not isinstance(raw, bytes):
        raise InvalidMessage(f"message value must be bytes, not {type(raw).__name__}")
    too_large = input_checks.size_problem(raw)
    if too_large is not None:
        raise InvalidMessage(too_large)
    try:
        message = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidMessage(f"not valid JSON: {exc}") from None
    try:
        return validate(message, topic)
    except InvalidMessage:
        raise
    except RecursionError:
        raise InvalidMessage("message is nested too deeply") from None
    except Exception as exc:  # a validator bug must still give a reason, never a crash
        raise InvalidMessage(f"message cannot be checked: {type(exc).__name__}") from None


def encode(message: Message) -> bytes:
    """Serialize one message (orjson)."""
    return orjson.dumps(message)


def utc_now() -> str:
    """The current UTC time as the contract writes it (RFC 3339, milliseconds, `Z`)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def iso(at: datetime) -> str:
    """An aware datetime as the contract writes it (RFC 3339 UTC, microseconds, `Z`)."""
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f") + "Z"


def new_message_id() -> str:
    """A fresh, unique message id."""
    return str(uuid.uuid4())


def envelope(kind: str, **fields: Any) -> Message:
    """A message of `kind` with the common envelope filled in (fields may override)."""
    message: Message = {
        "kind": kind,
        "schema_version": SCHEMA_VERSION,
        "message_id": new_message_id(),
        "occurred_at": utc_now(),
    }
    message.update(fields)
    return message


@cache
def _all_kinds() -> tuple[str, ...]:
    return tuple(k for spec in REGISTRY.values() for k in spec.kinds)
