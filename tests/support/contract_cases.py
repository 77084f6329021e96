"""The examples of docs/EVENTS.md, and invalid messages made from them, for the contract tests."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from services.pipeline import contract
from services.pipeline.contract import Message
from services.pipeline.topics import kind_topic

EVENTS_MD = Path(__file__).resolve().parents[2] / "docs" / "EVENTS.md"
_EXAMPLE = re.compile(r"^### (\S+)[ \t]*\n+```json\n(.*?)^```", re.MULTILINE | re.DOTALL)


def examples() -> dict[str, list[Message]]:
    """Every example of docs/EVENTS.md, by the kind its heading names."""
    found: dict[str, list[Message]] = {}
    for kind, body in _EXAMPLE.findall(EVENTS_MD.read_text(encoding="utf-8")):
        found.setdefault(kind, []).append(json.loads(body))
    return found


def example(kind: str) -> Message:
    """A fresh copy of the (first) example of `kind`."""
    return copy.deepcopy(examples()[kind][0])


def drop(key: str) -> Callable[[Message], None]:
    return lambda m: m.pop(key)


def set_field(key: str, value: Any) -> Callable[[Message], None]:
    return lambda m: m.__setitem__(key, value)


def mutated(kind: str, mutate: Callable[[Message], None]) -> bytes:
    """The example of `kind`, changed by `mutate`, encoded."""
    message = example(kind)
    mutate(message)
    return contract.encode(message)


def invalid(case: str, kind: str, mutate: Callable[[Message], None], named: str) -> Any:
    """A pytest case: (raw bytes, the topic of `kind`, what the rejection must name)."""
    return pytest.param(lambda: mutated(kind, mutate), kind_topic(kind), named, id=case)
