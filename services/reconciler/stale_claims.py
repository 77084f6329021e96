"""Claims that never got a result become `unknown`, and are never sent again (R29).

Contract: `expire_claims(conn, settings, outcomes_topic)` runs in the caller's
transaction: every claim older than MAILER_CLAIM_TIMEOUT (wall seconds) with
no result — its sender died mid-send, or lost the reply after DATA and died
before saying so — is marked `unknown`, and an `outcome.unknown` for it is put
in the outbox, so the projections and analytics hear of it like any outcome
(a recipient already in a terminal state keeps it). The send is not retried:
whether the provider took it cannot be known. Returns how many expired.
"""

from __future__ import annotations

from psycopg import AsyncConnection

from services.pipeline.contract import encode, envelope
from services.pipeline.ids import message_id_header
from services.pipeline.settings import Settings

#: Most claims expired in one pass.
BATCH = 1000


async def expire_claims(conn: AsyncConnection, settings: Settings, outcomes_topic: str) -> int:
    """Mark stale claims unknown and queue their outcomes; return how many."""
    cur = await conn.execute(
        """
        UPDATE send_claims c SET result = 'unknown', finished_at = now()
        FROM (SELECT send_id, attempt FROM send_claims
              WHERE result IS NULL AND claimed_at < now() - make_interval(secs => %s)
              ORDER BY claimed_at LIMIT %s FOR UPDATE SKIP LOCKED) stale
        WHERE c.send_id = stale.send_id AND c.attempt = stale.attempt
        RETURNING c.send_id::text, c.attempt, c.campaign_id, c.account, c.recipient, c.is_test,
                  c.claimed_by, c.claimed_at
        """,
        (settings.claim_timeout, BATCH),
    )
    rows = await cur.fetchall()
    if not rows:
        return 0
    async with conn.cursor() as out:
        await out.executemany(
            "INSERT INTO outbox (topic, key, payload) VALUES (%s, %s, %s)",
            [
                (outcomes_topic, sid, encode(envelope(
                    "outcome.unknown", campaign_id=campaign_id, send_id=sid, attempt=attempt,
                    is_test=is_test, account=account, recipient_email=recipient, smtp_code=None,
                    smtp_reply="", error_class="claim_timeout",
                    message_id_header=message_id_header(sid, settings.message_id_domain),
                    duration_ms=0,
                    reason=(f"claimed by {by} at {at.isoformat()} and never finished within "
                            f"{settings.claim_timeout:g}s: the sender stopped mid-send; not resent"),
                )))
                for sid, attempt, campaign_id, account, recipient, is_test, by, at in rows
            ],
        )
    return len(rows)
