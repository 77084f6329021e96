"""A campaign's audit trail (R28): every status change and deferral, who, what, when, why.

Contract: `audit_trail(conn, campaign_id, limit)` returns the newest `limit`
rows of `audit_log` for the campaign, oldest first, as dicts with `at`,
`actor`, `action`, `before`, `after`, `reason`; `audit_lines()` formats them.
"""

from __future__ import annotations

from typing import Any

from psycopg import AsyncConnection

from services.ops.render import table, when
from services.pipeline.db import fetch_dicts


async def audit_trail(conn: AsyncConnection, campaign_id: str, limit: int = 1000) -> list[dict[str, Any]]:
    """The campaign's newest `limit` audit rows, oldest first."""
    rows = await fetch_dicts(
        conn,
        "SELECT at, actor, action, before_status AS before, after_status AS after, reason"
        " FROM audit_log WHERE campaign_id = %s ORDER BY at DESC, id DESC LIMIT %s",
        (campaign_id, limit),
    )
    return rows[::-1]


def audit_lines(rows: list[dict[str, Any]]) -> list[str]:
    """One line per audit row: when, who, what, before → after, why."""
    return table(
        [[when(r["at"]), r["actor"], r["action"], f"{r['before'] or '-'} -> {r['after'] or '-'}", r["reason"]]
         for r in rows],
        ["at", "actor", "action", "status", "reason"],
    )
