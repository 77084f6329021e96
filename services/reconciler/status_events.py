"""Status changes become audit rows and `campaign.status` events, never lost.

Contract: `record()` runs in the transaction that made the changes: it writes
one audit_log row per change and puts the `campaign.status` event (with the
campaign's counts as of that transaction) into the outbox table. `publish_outbox()`
runs after the commit: it produces outbox rows in id order, waits for the
broker's acknowledgement and deletes them. A crash in between publishes them
on the next call (at least once; consumers dedupe by message_id).
"""

from __future__ import annotations

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from services.pipeline.contract import encode, envelope, iso
from services.pipeline.producer import AsyncProducer
from services.reconciler.projections import StatusChange

COUNT_FIELDS = ("total", "pending", "sent", "failed", "skipped", "unknown", "cancelled")


async def record(conn: AsyncConnection, changes: list[StatusChange], status_topic: str) -> None:
    """Audit `changes` and queue their status events in the outbox."""
    if not changes:
        return
    async with conn.cursor() as cur:
        await cur.executemany(
            "INSERT INTO audit_log (campaign_id, actor, action, before_status, after_status,"
            " reason, source_message_id) VALUES (%s, %s, %s, %s, %s, %s, %s)",
            [
                (c.campaign_id, c.actor, c.action, c.before, c.after, c.reason,
                 c.source_message_id)
                for c in changes
            ],
        )
    cur = await conn.execute(
        f"SELECT campaign_id, {', '.join(COUNT_FIELDS)} FROM campaigns WHERE campaign_id = ANY(%s)",
        (sorted({c.campaign_id for c in changes}),),
    )
    counts = {row[0]: dict(zip(COUNT_FIELDS, row[1:], strict=True)) for row in await cur.fetchall()}
    empty = dict.fromkeys(COUNT_FIELDS, 0)
    if not any(c.announce for c in changes):
        return
    async with conn.cursor() as cur:
        await cur.executemany(
            "INSERT INTO outbox (topic, key, payload) VALUES (%s, %s, %s)",
            [
                (status_topic, c.campaign_id, encode(_event(c, counts.get(c.campaign_id, empty))))
                for c in changes
                if c.announce
            ],
        )


def _event(change: StatusChange, counts: dict[str, int]) -> dict[str, object]:
    fields: dict[str, object] = {}
    if change.defer_reason:
        fields["defer_reason"] = change.defer_reason
        until = change.deferred_until
        fields["deferred_until"] = None if until is None else iso(until)
    if change.reason_code:
        fields["reason_code"] = change.reason_code
    if change.reason_ru:
        fields["reason_ru"] = change.reason_ru
    if change.warnings:
        fields["warnings"] = list(change.warnings)
    if change.command:
        fields["command"] = change.command
    return envelope(
        "campaign.status", campaign_id=change.campaign_id, status=change.event_status or change.after,
        previous_status=change.before, reason=change.reason, actor_id=change.actor,
        counts=counts, **fields,
    )


async def publish_outbox(pool: AsyncConnectionPool, producer: AsyncProducer, limit: int = 1000) -> int:
    """Publish and delete queued events; return how many were published."""
    published = 0
    while True:
        async with pool.connection() as conn, conn.transaction():
            cur = await conn.execute(
                "SELECT id, topic, key, payload FROM outbox ORDER BY id LIMIT %s"
                " FOR UPDATE SKIP LOCKED",
                (limit,),
            )
            rows = await cur.fetchall()
            if not rows:
                return published
            await producer.produce_all([(topic, key, bytes(payload)) for _, topic, key, payload in rows])
            await conn.execute("DELETE FROM outbox WHERE id = ANY(%s)", ([r[0] for r in rows],))
        published += len(rows)
