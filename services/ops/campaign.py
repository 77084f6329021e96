"""`mailer ops campaign ID`: why a campaign is where it is, in one screen.

Contract: `inspect_campaign()` returns the poll endpoint's view (status,
reason text, defer reason, deferred_until, next_run_at, ETA, counts, failed
recipients, breakers) plus what only ops need: parked sends by reason with
the next due time, sends released and awaiting their outcome, the last send,
the latest non-sent outcomes with their replies, and the newest audit rows.
`campaign_lines()` prints it; `None` means no such campaign.
"""

from __future__ import annotations

from typing import Any

from psycopg import AsyncConnection

from services.ops.audit_trail import audit_lines, audit_trail
from services.ops.render import table, when
from services.pipeline.db import fetch_dicts
from services.pipeline.settings import Settings
from services.reconciler.campaign_view import CampaignViews, campaign_view
from services.reconciler.status_events import COUNT_FIELDS

LAST_ERRORS = 5
LAST_AUDIT = 8


async def inspect_campaign(
    conn: AsyncConnection, settings: Settings, views: CampaignViews, campaign_id: str
) -> dict[str, Any] | None:
    """Everything ops need to explain one campaign, or None when it is unknown."""
    view = await campaign_view(conn, campaign_id, settings.failed_recipients_limit, views, "en")
    if view is None:
        return None
    parked = await fetch_dicts(
        conn,
        "SELECT reason, count(*) FILTER (WHERE released_at IS NULL) AS waiting,"
        " min(due_at) FILTER (WHERE released_at IS NULL) AS next_due,"
        " count(*) FILTER (WHERE released_at IS NOT NULL AND NOT EXISTS ("
        "   SELECT 1 FROM send_log l WHERE l.send_id = p.send_id AND l.recorded_at >= p.released_at"
        " )) AS released_in_flight"
        " FROM parked_sends p WHERE campaign_id = %s GROUP BY reason ORDER BY next_due NULLS LAST",
        (campaign_id,),
    )
    last = await fetch_dicts(
        conn,
        "SELECT max(occurred_at) FILTER (WHERE outcome = 'sent') AS last_sent_at,"
        " max(occurred_at) AS last_outcome_at FROM send_log WHERE campaign_id = %s AND NOT is_test",
        (campaign_id,),
    )
    errors = await fetch_dicts(
        conn,
        "SELECT occurred_at AS at, recipient, outcome, attempt, smtp_code, smtp_reply, error_class, reason"
        " FROM send_log WHERE campaign_id = %s AND outcome <> 'sent'"
        " ORDER BY occurred_at DESC LIMIT %s",
        (campaign_id, LAST_ERRORS),
    )
    return {
        **view,
        "parked": [p for p in parked if p["waiting"] or p["released_in_flight"]],
        **last[0],
        "last_errors": errors,
        "audit": await audit_trail(conn, campaign_id, LAST_AUDIT),
    }


def campaign_lines(c: dict[str, Any]) -> list[str]:
    """The inspection as a terminal screen: the answer first, the evidence below."""
    counts = c["counts"]
    lines = [
        f"campaign   {c['campaign_id']}  ({c['name']})  account={c['account']}  manager={c['manager_id']}"
        f"  priority={c['priority']}",
        f"status     {c['status'].upper()}: {c.get('reason') or c['status_reason']}",
    ]
    if c["defer_reason"]:
        lines.append(f"deferred   {c['defer_reason']} until {when(c['deferred_until'])}")
    eta = (c.get("eta") or {}).get("finish_at")
    lines += [
        f"next run   {when(c.get('next_run_at'))}   eta {when(eta)}",
        "counts     " + "  ".join(f"{k}={counts[k]}" for k in COUNT_FIELDS),
        f"progress   started {when(c['started_at'])}   last sent {when(c['last_sent_at'])}"
        f"   last outcome {when(c['last_outcome_at'])}   updated {when(c['updated_at'])}",
    ]
    if c.get("refused_chunks"):
        lines.append("refused chunks:")
        lines += ["  " + line for line in table(
            [[str(r["chunk_index"]), r["reason_code"], "yes" if r["waiting"] else "no (not declared)",
              r["reason"]] for r in c["refused_chunks"]],
            ["chunk", "code", "waited for", "reason"],
        )]
    for scope, b in c["circuit_breaker"].items():
        state = f"OPEN since {when(b['opened_at'])}" if b["open"] else "closed"
        lines.append(f"breaker    {scope}: {state} ({b['consecutive']} consecutive failures)")
    lines.append("parked sends:")
    lines += ["  " + line for line in table(
        [[p["reason"], str(p["waiting"]), when(p["next_due"]), str(p["released_in_flight"])]
         for p in c["parked"]],
        ["reason", "waiting", "next due", "released, outcome pending"],
    )]
    lines.append("latest outcomes other than sent:")
    lines += ["  " + line for line in table(
        [[when(e["at"]), e["recipient"], f"{e['outcome']}#{e['attempt']}",
          f"{e['smtp_code'] or ''} {e['smtp_reply'] or e['reason'] or e['error_class'] or ''}".strip()]
         for e in c["last_errors"]],
        ["at", "recipient", "outcome", "reply or reason"],
    )]
    lines.append(f"audit (latest {LAST_AUDIT}; all: mailer ops audit {c['campaign_id']}):")
    lines += ["  " + line for line in audit_lines(c["audit"])]
    return lines
