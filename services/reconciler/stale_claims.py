"""Claims that never got a result become `unknown`, and are never sent again (R29).

Contract: `expire_claims(conn, settings, outcomes_topic)` runs in the caller's
transaction: every claim older than MAILER_CLAIM_TIMEOUT (wall seconds) with
no result — its sender died mid-send, or lost the reply after DATA and died
before saying so — is marked `unknown`, and an `outcome.unknown` for it is put
in the outbox and stored in the claim (a redelivered command, or its sender
coming back late, repeats that one), so the projections and analytics hear of
it like any outcome (a recipient already in a terminal state keeps it). The
send is not retried: whether the provider took it cannot be known.

A send has exactly one terminal outcome, ever: a claim whose (send, attempt)
already has an outcome in send_log recorded after it was claimed (its sender
published the outcome but could not write the result, e.g. Postgres lost the
last asynchronous commits) is settled with that outcome's result and gets no
second outcome. Returns how many were declared unknown.
"""

from __future__ import annotations

from psycopg import AsyncConnection

from services.pipeline.contract import encode, envelope
from services.pipeline.ids import message_id_header
from services.pipeline.settings import Settings

#: Most claims expired in one pass.
BATCH = 1000

#: One statement: lock the stale claims, settle those an outcome already told (from send_log),
#: mark the others unknown and return them. A send_log row counts when the reconciler recorded
#: it after the claim was taken (an earlier park of the same attempt does not).
_EXPIRE = """
    WITH stale AS (
        SELECT send_id, attempt, claimed_at FROM send_claims
        WHERE result IS NULL AND claimed_at < now() - make_interval(secs => %s)
        ORDER BY claimed_at LIMIT %s FOR UPDATE SKIP LOCKED
    ), told AS (
        SELECT DISTINCT ON (s.send_id, s.attempt) s.send_id, s.attempt,
               CASE l.outcome WHEN 'skipped' THEN 'failed' ELSE l.outcome END AS result
        FROM stale s JOIN send_log l ON l.send_id = s.send_id AND l.attempt = s.attempt
        WHERE l.recorded_at >= s.claimed_at
        ORDER BY s.send_id, s.attempt,
                 array_position(ARRAY['sent', 'failed', 'unknown', 'deferred', 'skipped'], l.outcome)
    ), settled AS (
        UPDATE send_claims c SET result = told.result, finished_at = now()
        FROM told WHERE c.send_id = told.send_id AND c.attempt = told.attempt
        RETURNING 1
    )
    UPDATE send_claims c SET result = 'unknown', finished_at = now()
    FROM stale
    WHERE c.send_id = stale.send_id AND c.attempt = stale.attempt
      AND NOT EXISTS (SELECT 1 FROM told WHERE told.send_id = stale.send_id
                                            AND told.attempt = stale.attempt)
    RETURNING c.send_id::text, c.attempt, c.campaign_id, c.account, c.recipient, c.is_test,
              c.claimed_by, c.claimed_at
"""


async def expire_claims(conn: AsyncConnection, settings: Settings, outcomes_topic: str) -> int:
    """Mark stale claims unknown and queue their outcomes; return how many."""
    cur = await conn.execute(_EXPIRE, (settings.claim_timeout, BATCH))
    rows = await cur.fetchall()
    if not rows:
        return 0
    outcomes = [
        (sid, attempt, encode(envelope(
            "outcome.unknown", campaign_id=campaign_id, send_id=sid, attempt=attempt,
            is_test=is_test, account=account, recipient_email=recipient, smtp_code=None,
            smtp_reply="", error_class="claim_timeout",
            message_id_header=message_id_header(sid, settings.message_id_domain),
            duration_ms=0,
            reason=(f"claimed by {by} at {at.isoformat()} and never finished within "
                    f"{settings.claim_timeout:g}s: the sender stopped mid-send; not resent"),
        )))
        for sid, attempt, campaign_id, account, recipient, is_test, by, at in rows
    ]
    async with conn.cursor() as out:
        await out.executemany(
            "INSERT INTO outbox (topic, key, payload) VALUES (%s, %s, %s)",
            [(outcomes_topic, sid, payload) for sid, _, payload in outcomes],
        )
        await out.executemany(
            "UPDATE send_claims SET outcome = %s WHERE send_id = %s AND attempt = %s",
            [(payload, sid, attempt) for sid, attempt, payload in outcomes],
        )
    return len(rows)
