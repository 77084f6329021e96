"""Printing ops answers: aligned text for a terminal, or JSON with `--json`.

Contract: `emit(data, lines, as_json)` prints either `data` as indented JSON
(datetimes as ISO 8601, orjson's own) or the given lines.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import orjson


def when(at: datetime | str | None) -> str:
    """A time (datetime or ISO 8601 text) for a terminal, in UTC to the second; `-` for none."""
    if at is None:
        return "-"
    moment = datetime.fromisoformat(at) if isinstance(at, str) else at
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def emit(data: Any, lines: Iterable[str], as_json: bool) -> None:
    """Print `data` as JSON, or `lines` as text."""
    if as_json:
        print(orjson.dumps(data, option=orjson.OPT_INDENT_2, default=str).decode())
    else:
        for line in lines:
            print(line)


def table(rows: list[list[str]], header: list[str]) -> list[str]:
    """Left-aligned columns under a header; a dash line when there are no rows."""
    if not rows:
        return ["(none)"]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return ["  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            for row in [header, *rows]]
