"""What managers and ops see of one campaign, read from the projections.

Contract: `campaign_view(conn, id, failed_limit)` returns the JSON-ready dict
the poll endpoint serves (status, reason, counts per state, declared sizes,
failed recipients with their SMTP replies, timestamps), or `None` for an
unknown campaign. `show_command` prints the same for `mailer show`.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from datetime import datetime
from typing import Any

import orjson
import psycopg
from psycopg import AsyncConnection

from services.pipeline.db import fetch_dicts
from services.pipeline.settings import Settings
from services.reconciler.status_events import COUNT_FIELDS

_TIMESTAMPS = ("created_at", "started_at", "first_sent_at", "completed_at", "updated_at")


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat().replace("+00:00", "Z")


async def campaign_view(conn: AsyncConnection, campaign_id: str, failed_limit: int) -> dict[str, Any] | None:
    """The poll endpoint's body for `campaign_id`, or `None` when it is unknown."""
    rows = await fetch_dicts(conn, "SELECT * FROM campaigns WHERE campaign_id = %s", (campaign_id,))
    if not rows:
        return None
    c = rows[0]
    failed = await fetch_dicts(
        conn,
        "SELECT email, send_id::text AS send_id, last_code, last_reply, error_class, updated_at"
        " FROM recipients WHERE campaign_id = %s AND status = 'failed'"
        " ORDER BY updated_at, email LIMIT %s",
        (campaign_id, failed_limit),
    )
    return {
        "campaign_id": c["campaign_id"],
        "name": c["name"],
        "manager_id": c["manager_id"],
        "account": c["account"],
        "priority": c["priority"],
        "status": c["status"],
        "status_reason": c["status_reason"],
        "counts": {k: c[k] for k in COUNT_FIELDS},
        "declared": {
            "recipients": c["total_declared"],
            "chunks": c["chunks_declared"],
            "chunks_received": c["chunks_received"],
        },
        "failed_recipients": [
            {
                "email": f["email"],
                "send_id": f["send_id"],
                "smtp_code": f["last_code"],
                "smtp_reply": f["last_reply"],
                "error_class": f["error_class"],
                "at": _iso(f["updated_at"]),
            }
            for f in failed
        ],
        "failed_recipients_truncated": c["failed"] > len(failed),
        **{k: _iso(c[k]) for k in _TIMESTAMPS},
    }


def show_command(args: argparse.Namespace, settings: Settings) -> int:
    """`mailer show ID`: print one campaign (exit 1 when it is unknown)."""

    async def load() -> dict[str, Any] | None:
        async with await psycopg.AsyncConnection.connect(settings.database_url) as conn:
            return await campaign_view(conn, args.campaign_id, settings.failed_recipients_limit)

    view = asyncio.run(load())
    if view is None:
        print(f"mailer: no campaign {args.campaign_id!r}", file=sys.stderr)
        return 1
    if args.json:
        print(orjson.dumps(view, option=orjson.OPT_INDENT_2).decode())
        return 0
    counts = view["counts"]
    print(f"campaign  {view['campaign_id']}  ({view['name']})")
    print(f"status    {view['status']}  {view['status_reason']}")
    print("counts    " + "  ".join(f"{k}={counts[k]}" for k in COUNT_FIELDS))
    print(f"started   {view['started_at']}   completed {view['completed_at']}")
    for f in view["failed_recipients"]:
        print(f"failed    {f['email']}  {f['smtp_code']} {f['smtp_reply']}")
    return 0
