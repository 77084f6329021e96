"""`mailer ops stuck` and `mailer ops deferred`: the campaigns that are not moving, and why.

Contract: `stuck()` lists sending campaigns with recipients waiting and no
progress for `minutes` that no deferral explains (the reconcile job's
definition, `reconcile_job.stuck_campaigns`); `deferred()` lists campaigns
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
    return [{"campaign_id": f.campaign_id, "detail": f.detail} for f in found]


def stuck_lines(rows: list[dict[str, Any]], minutes: float) -> list[str]:
    """One line per stuck campaign, or a line saying there is none."""
    if not rows:
        return [f"no campaign stuck (sending, recipients waiting, no progress for {minutes:g} min)"]
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
