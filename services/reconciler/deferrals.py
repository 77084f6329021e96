"""Parked sends and each campaign's queue state (R9), kept in Postgres.

Contract: `park(conn, outcomes)` stores the command of every
`outcome.deferred` in `parked_sends` (one row per send id: a newer deferral
replaces an older one, a replayed older one changes nothing, a released row
comes back only for a newer deferral). `refresh_queue_state(conn, ids)`
recomputes `defer_reason` / `deferred_until` of sending campaigns from their
parked rows: the reason and due time of the earliest-due unreleased row;
unchanged while released sends are still in flight; cleared once no
recipient of the campaign waits. A campaign entering a deferral, or changing
its reason, gives a `StatusChange` (audit row, and a `campaign.status` event
unless that (campaign, reason, until) was announced before: R20). Both run in
the caller's transaction and are idempotent; an unknown reason raises.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from datetime import datetime

import orjson
from psycopg import AsyncConnection

from services.pipeline.contract import Message
from services.pipeline.defer_reasons import DeferReason, defer_reason
from services.reconciler.projections import StatusChange


async def park(conn: AsyncConnection, outcomes: Iterable[Message]) -> set[str]:
    """Park the commands of the deferred outcomes; return their campaigns."""
    rows = []
    for o in outcomes:
        if o["kind"] != "outcome.deferred":
            continue
        command = o["command"]
        reason = defer_reason(o["defer_reason"])
        rows.append((
            o["send_id"], o["campaign_id"], o["account"], int(command.get("priority", 5)),
            command.get("queued_at") or command.get("occurred_at") or o["occurred_at"],
            reason.value, o["deferred_until"], orjson.dumps(command), o["occurred_at"],
        ))
    if not rows:
        return set()
    async with conn.cursor() as cur:
        await cur.executemany(
            """
            INSERT INTO parked_sends AS p (send_id, campaign_id, account, priority, queued_at,
                                           reason, due_at, command, parked_at)
            VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)
            ON CONFLICT (send_id) DO UPDATE SET
                account = EXCLUDED.account, priority = EXCLUDED.priority,
                reason = EXCLUDED.reason, due_at = EXCLUDED.due_at, command = EXCLUDED.command,
                parked_at = EXCLUDED.parked_at, released_at = NULL
            WHERE p.parked_at < EXCLUDED.parked_at
            """,
            rows,
        )
    return {r[1] for r in rows}


#: Each campaign's queue state beside what its parked sends say (add WHERE / ORDER BY):
#: campaign_id, status, defer_reason, deferred_until, the earliest unreleased parked send's
#: reason and due_at, and whether any recipient is still deferred.
QUEUE_STATE_SQL = """
    SELECT c.campaign_id, c.status, c.defer_reason, c.deferred_until, e.reason, e.due_at,
           EXISTS (SELECT 1 FROM recipients r
                    WHERE r.campaign_id = c.campaign_id AND r.status = 'deferred')
    FROM campaigns c
    LEFT JOIN LATERAL (
        SELECT p.reason, p.due_at FROM parked_sends p
        WHERE p.campaign_id = c.campaign_id AND p.released_at IS NULL
        ORDER BY p.due_at LIMIT 1
    ) e ON true
"""


def wanted_state(
    status: str, old_reason: str, old_until: datetime | None, reason: str | None,
    due_at: datetime | None, waiting: bool,
) -> tuple[str, datetime | None]:
    """The (defer_reason, deferred_until) a campaign should show (its current one when it stands)."""
    if status != "sending":
        return "", None
    if reason is not None:
        return defer_reason(reason).value, due_at
    if waiting:
        return old_reason, old_until  # released sends are on their way: the deferral stands
    return "", None


async def refresh_queue_state(
    conn: AsyncConnection, campaign_ids: Iterable[str]
) -> list[StatusChange]:
    """Bring the queue state of `campaign_ids` up to date; return the deferrals to announce."""
    ids = sorted(set(campaign_ids))
    if not ids:
        return []
    cur = await conn.execute(
        QUEUE_STATE_SQL + " WHERE c.campaign_id = ANY(%s) ORDER BY c.campaign_id FOR UPDATE OF c",
        (ids,),
    )
    changes: list[StatusChange] = []
    for campaign_id, status, old_reason, old_until, reason, due_at, waiting in await cur.fetchall():
        new_reason, new_until = wanted_state(status, old_reason, old_until, reason, due_at, waiting)
        if (new_reason, new_until) == (old_reason, old_until):
            continue
        await conn.execute(
            """
            UPDATE campaigns SET defer_reason = %s, deferred_until = %s,
                   deferred_at = CASE WHEN %s = '' THEN NULL
                                      WHEN defer_reason = '' THEN now() ELSE deferred_at END,
                   updated_at = now()
            WHERE campaign_id = %s
            """,
            (new_reason, new_until, new_reason, campaign_id),
        )
        if new_reason == old_reason:
            continue  # the same deferral re-evaluated: a later `until`, nothing to announce
        change = _change(campaign_id, status, old_reason, new_reason, new_until)
        if new_reason and not await _first_notice(conn, campaign_id, new_reason, new_until):
            change = replace(change, announce=False)
        changes.append(change)
    return changes


def _change(
    campaign_id: str, status: str, old: str, new: str, until: datetime | None
) -> StatusChange:
    if not new:  # the campaign sends again, or was paused, cancelled or completed meanwhile
        return StatusChange(
            campaign_id=campaign_id, before="deferred", after=status, actor="system",
            action="deferral_over", reason=f"{old} deferral over", announce=False,
        )
    reason = DeferReason(new)
    when = "" if until is None else f" until {until.isoformat()}"
    return StatusChange(
        campaign_id=campaign_id, before="deferred" if old else "sending", after="deferred",
        actor="system", action="defer", reason=f"{reason.value}{when}",
        defer_reason=reason.value, deferred_until=until,
    )


async def _first_notice(
    conn: AsyncConnection, campaign_id: str, reason: str, until: datetime | None
) -> bool:
    """Record that (campaign, reason, until) is announced; False when it was before."""
    cur = await conn.execute(
        "INSERT INTO status_notifications (campaign_id, reason, until)"
        " VALUES (%s, %s, coalesce(%s, '-infinity'::timestamptz)) ON CONFLICT DO NOTHING"
        " RETURNING 1",
        (campaign_id, reason, until),
    )
    return await cur.fetchone() is not None
