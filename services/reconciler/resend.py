"""Sending again to the recipients that failed or ended unknown (B2).

Contract: `resend(conn, command, send_topic)` runs in the caller's
transaction for one `campaign.resend`. Once per message_id (a replay does
nothing) it takes the campaign's recipients in the asked statuses (default
failed and unknown), leaves out suppressed addresses, puts them back to
`pending` and queues one send command each in the outbox, built by the
planner's own builder from the stored definition and recipient, as the next
attempt (a new claim: the earlier one is never reused). A completed campaign
goes back to `sending`; a cancelled one is not resent. Returns the status
changes to audit and announce.
"""

from __future__ import annotations

from psycopg import AsyncConnection

from services.pipeline.contract import Message, encode
from services.planner.plan_chunk import send_command
from services.reconciler.projections import StatusChange, change_status


async def resend(conn: AsyncConnection, command: Message, send_topic: str) -> list[StatusChange]:
    """Queue the resend of `command`'s campaign; its status changes."""
    campaign_id = command["campaign_id"]
    cur = await conn.execute(
        "INSERT INTO resend_requests (message_id, campaign_id, recipients) VALUES (%s, %s, 0)"
        " ON CONFLICT DO NOTHING RETURNING 1",
        (command["message_id"], campaign_id),
    )
    if await cur.fetchone() is None:
        return []  # carried out before
    cur = await conn.execute(
        "SELECT c.status, p.definition FROM campaigns c"
        " JOIN planner_campaigns p ON p.campaign_id = c.campaign_id WHERE c.campaign_id = %s",
        (campaign_id,),
    )
    row = await cur.fetchone()
    if row is None or row[0] == "cancelled":
        return []
    status, definition = row
    cur = await conn.execute(
        """
        SELECT r.send_id::text, r.email, r.data,
               greatest(r.attempts, coalesce(max(c.attempt), 0)) AS last_attempt
        FROM recipients r LEFT JOIN send_claims c ON c.send_id = r.send_id
        WHERE r.campaign_id = %s AND r.status = ANY(%s)
          AND NOT EXISTS (SELECT 1 FROM suppressions s WHERE s.email = lower(btrim(r.email)))
        GROUP BY r.send_id, r.email, r.data, r.attempts
        ORDER BY r.email
        """,
        (campaign_id, list(command.get("statuses") or ["failed", "unknown"])),
    )
    rows = await cur.fetchall()
    commands = []
    for sid, email, data, last_attempt in rows:
        message = send_command(definition, data or {"email": email}, sid)
        message["attempt"] = last_attempt + 1
        commands.append((send_topic, sid, encode(message)))
    if commands:
        await conn.execute(
            "UPDATE recipients SET status = 'pending', updated_at = now() WHERE send_id = ANY(%s::uuid[])",
            ([sid for _, sid, _ in commands],),
        )
        async with conn.cursor() as out:
            await out.executemany("INSERT INTO outbox (topic, key, payload) VALUES (%s, %s, %s)", commands)
    await conn.execute("UPDATE resend_requests SET recipients = %s WHERE message_id = %s",
                       (len(commands), command["message_id"]))
    reason = command.get("reason") or f"resend to {len(commands)} recipients"
    if status == "completed" and commands:
        change = await change_status(conn, campaign_id, "resend", ("completed",), "sending",
                                     reason=reason, actor=command["actor_id"],
                                     source_message_id=command["message_id"])
        return [] if change is None else [change]
    return [StatusChange(campaign_id=campaign_id, before=status, after=status, actor=command["actor_id"],
                         action="resend", reason=reason, source_message_id=command["message_id"],
                         announce=False)]
