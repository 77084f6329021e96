"""`mailer ops stuck` and `mailer ops deferred`: the campaigns that are not moving, and why.

Contract: `stuck()` lists sending campaigns with recipients waiting and no
progress for `minutes` that no deferral explains (the reconcile job's
definition, `reconcile_job.stuck_campaigns`), and campaigns (sending or
awaiting confirmation) still missing declared chunks: at once when a missing
index was refused (it will not come unless the CRM sends it again), else when
no chunk came for `minutes`; `deferred()` lists campaigns
waiting on purpose — deferred with a reason and a time, or paused — with
their recipients waiting and parked sends. Both read Postgres only.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from psycopg import AsyncConnection

from services.ops.render import table, when
from services.pipeline.db import fetch_dicts
from services.reconciler.reconcile_job import stuck_campaigns


async def stuck(conn: AsyncConnection, minutes: float) -> list[dict[str, Any]]:
    """Sending campaigns without progress for `minutes`, no deferral ahead."""
    now = datetime.now(UTC)
    found = await stuck_campaigns(conn, now - timedelta(minutes=minutes), now)
    rows: dict[str, dict[str, Any]] = {
        f.campaign_id or "": {"campaign_id": f.campaign_id, "detail": f.detail} for f in found}
    for row in await missing_chunks(conn, now - timedelta(minutes=minutes)):
        if row["campaign_id"] in rows:
            rows[row["campaign_id"]]["detail"] += f"; {row['detail']}"
        else:
            rows[row["campaign_id"]] = row
    return [rows[campaign_id] for campaign_id in sorted(rows)]


async def missing_chunks(conn: AsyncConnection, before: datetime) -> list[dict[str, Any]]:
    """Campaigns waiting for declared chunks: a refused one (at once), or none for long."""
    found = await fetch_dicts(
        conn,
        """
        SELECT c.campaign_id, c.chunks_declared, c.chunks_received,
               greatest(c.started_at, (SELECT max(received_at) FROM campaign_chunks k
                                       WHERE k.campaign_id = c.campaign_id)) AS last_chunk_at,
               (SELECT r.chunk_index FROM refused_chunks r
                WHERE r.campaign_id = c.campaign_id AND r.chunk_index < c.chunks_declared
                  AND NOT EXISTS (SELECT 1 FROM campaign_chunks k WHERE k.campaign_id = r.campaign_id
                                  AND k.chunk_index = r.chunk_index)
                ORDER BY r.chunk_index LIMIT 1) AS refused_index
        FROM campaigns c
        WHERE c.status IN ('sending', 'needs_confirmation') AND c.chunks_received < c.chunks_declared
        ORDER BY c.campaign_id
        """,
    )
    rows = []
    for f in found:
        missing = f["chunks_declared"] - f["chunks_received"]
        waited = f"waiting for {missing} of {f['chunks_declared']} declared chunks"
        if f["refused_index"] is not None:
            reason = await fetch_dicts(
                conn, "SELECT reason_code, reason FROM refused_chunks WHERE campaign_id = %s"
                " AND chunk_index = %s", (f["campaign_id"], f["refused_index"]))
            code, text = (reason[0]["reason_code"], reason[0]["reason"]) if reason else ("", "")
            rows.append({"campaign_id": f["campaign_id"],
                         "detail": f"{waited}; chunk {f['refused_index']} was refused ({code}): {text}"})
        elif f["last_chunk_at"] is not None and f["last_chunk_at"] < before:
            rows.append({"campaign_id": f["campaign_id"],
                         "detail": f"{waited}; none arrived since {f['last_chunk_at'].isoformat()}"})
    return rows


def stuck_lines(rows: list[dict[str, Any]], minutes: float) -> list[str]:
    """One line per stuck campaign, or a line saying there is none."""
    if not rows:
        return [f"no campaign stuck (sending, recipients waiting, no progress for {minutes:g} min; "
                "or waiting for a declared chunk that was refused or never came)"]
    return [f"STUCK  {r['campaign_id']}  {r['detail']}" for r in rows]


async def deferred(conn: AsyncConnection) -> list[dict[str, Any]]:
    """Deferred and paused campaigns, the longest-waiting first."""
    return await fetch_dicts(
        conn,
        """
        SELECT c.campaign_id, c.account, c.manager_id,
               CASE WHEN c.status = 'sending' THEN 'deferred' ELSE c.status END AS status,
               CASE WHEN c.status = 'sending' THEN c.defer_reason ELSE c.status_reason END AS reason,
               c.deferred_until, c.pending,
               (SELECT count(*) FROM parked_sends p
                WHERE p.campaign_id = c.campaign_id AND p.released_at IS NULL) AS parked,
               c.updated_at
        FROM campaigns c
        WHERE (c.status = 'sending' AND c.defer_reason <> '') OR c.status = 'paused'
        ORDER BY c.updated_at, c.campaign_id
        """,
    )


def deferred_lines(rows: list[dict[str, Any]]) -> list[str]:
    """A table of the waiting campaigns."""
    if not rows:
        return ["no campaign deferred or paused"]
    return table(
        [[r["campaign_id"], r["status"], r["reason"], when(r["deferred_until"]), str(r["pending"]),
          str(r["parked"]), r["account"], r["manager_id"]] for r in rows],
        ["campaign", "status", "reason", "until", "waiting", "parked", "account", "manager"],
    )
