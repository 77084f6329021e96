"""The closed set of deferral reasons, and every copy of it (SQL CHECKs, JSON Schemas)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import orjson
import pytest

from services.pipeline.defer_reasons import DeferReason, UnknownDeferReason, defer_reason

ROOT = Path(__file__).resolve().parents[2]
MIGRATION = ROOT / "services" / "pipeline" / "migrations" / "0002_sending_discipline.sql"
KNOWN = {r.value for r in DeferReason}


def test_the_set() -> None:
    expected = {
        "rate_per_hour", "campaign_rate", "domain_throttle", "daily_limit", "warmup_cap",
        "quota_exhausted", "quota_unknown", "outside_hours", "limiter_unavailable",
        "transient_error", "circuit_open", "campaign_paused",
    }
    assert {r.value for r in DeferReason} == expected
    assert len(KNOWN) == len(DeferReason)


@pytest.mark.parametrize("reason", list(DeferReason))
def test_known_reasons_round_trip(reason: DeferReason) -> None:
    assert defer_reason(reason.value) is reason
    assert defer_reason(str(reason)) is reason
    assert reason == reason.value  # a StrEnum: stored and published as its value


@pytest.mark.parametrize(
    "value",
    ["", "unknown", "RATE_PER_HOUR", "Rate_Per_Hour", "rate_per_hour ", " rate_per_hour",
     "rate-per-hour", "ratelimit", "outside hours", "OUTSIDE_HOURS", "deferred", "none"],
)
def test_unknown_reason_raises(value: str) -> None:
    with pytest.raises(UnknownDeferReason) as info:
        defer_reason(value)
    assert repr(value) in str(info.value)
    for known in KNOWN:  # the message lists what is allowed
        assert known in str(info.value)


def test_unknown_defer_reason_is_a_value_error() -> None:
    assert issubclass(UnknownDeferReason, ValueError)


# --- the SQL migration --------------------------------------------------------------------


def _in_list(sql: str, pattern: str) -> set[str]:
    match = re.search(pattern, sql, re.DOTALL | re.IGNORECASE)
    assert match is not None, f"no CHECK matching {pattern!r} in {MIGRATION.name}"
    items = re.findall(r"'([^']*)'", match.group(1))
    assert items, "the IN list is empty"
    assert len(items) == len(set(items)), f"duplicates in the IN list: {items}"
    return set(items)


def test_campaigns_check_constraint_lists_exactly_the_reasons() -> None:
    sql = MIGRATION.read_text(encoding="utf-8")
    values = _in_list(
        sql, r"CONSTRAINT\s+campaigns_defer_reason_known\s+CHECK\s*\(\s*defer_reason\s+IN\s*\(([^)]*)\)"
    )
    assert values == KNOWN | {""}  # '' is a campaign that waits for nothing


def test_parked_sends_check_lists_exactly_the_reasons() -> None:
    sql = MIGRATION.read_text(encoding="utf-8")
    table = re.search(r"CREATE TABLE parked_sends\s*\((.*?)\n\);", sql, re.DOTALL)
    assert table is not None
    values = _in_list(table.group(1), r"\breason\s+text\s+NOT NULL\s+CHECK\s*\(\s*reason\s+IN\s*\(([^)]*)\)")
    assert values == KNOWN  # a parked send always has a reason


# --- the JSON Schemas ---------------------------------------------------------------------


def _schema(name: str) -> dict[str, Any]:
    document: dict[str, Any] = orjson.loads((ROOT / "schemas" / name).read_bytes())
    return document


@pytest.mark.parametrize("name", ["outcome.deferred.v1.json", "campaign.status.v1.json"])
def test_schema_enum_lists_exactly_the_reasons(name: str) -> None:
    schema = _schema(name)
    enum = schema["definitions"]["defer_reason"]["enum"]
    assert len(enum) == len(set(enum))
    assert set(enum) == KNOWN
    assert schema["properties"]["defer_reason"]["$ref"] == "#/definitions/defer_reason"
