"""Status changes become audit rows and `campaign.status` events, never lost.

Contract: `record()` runs in the transaction that made the changes: it writes
one audit_log row per change and puts the `campaign.status` event (with the
campaign's counts as of that transaction) into the outbox table. Every event
of a campaign carries the next `sequence` number (1, 2, 3 … per campaign), and
`status_announcements` keeps what the campaign's last event said (status,
defer reason, counts), updated in the same transaction. So: a deferral that
repeats what the CRM was last told is not announced again; a `previous_status`
is the status the CRM last saw (`deferred`, not `sending`, before a campaign
that waited completes, pauses or is cancelled); and a settled campaign
(paused, cancelled, completed) of `recheck` whose counts differ from its last
event's gets a correction: the same status again with `correction: true` and
the counts as they are now (in-flight sends that landed after the event).
`publish_outbox()` runs after the commit: it produces outbox rows in id order,
waits for the broker's acknowledgement and deletes them. A crash in between
publishes them on the next call (at least once; consumers dedupe by
message_id and keep the event with the highest sequence).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from psycopg import AsyncConnection
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from services.pipeline.contract import encode, envelope, iso
from services.pipeline.producer import AsyncProducer
from services.reconciler.projections import StatusChange
from services.reconciler.reason_texts import correction_texts, status_text

COUNT_FIELDS = ("total", "pending", "sent", "failed", "skipped", "unknown", "cancelled")
#: Statuses a campaign rests in while sends already under way may still land: a change of
#: counts after their event is published as a correction.
SETTLED = ("paused", "cancelled", "completed")
#: Actions whose event only tells the campaign's queue state (deferred or sending again).
_QUEUE_ACTIONS = ("defer", "deferral_over")


@dataclass(frozen=True)
class Announced:
    """What a campaign's last status event said."""

    sequence: int
    status: str
    defer_reason: str
    counts: dict[str, int]


async def record(
    conn: AsyncConnection, changes: list[StatusChange], status_topic: str,
    *, recheck: Iterable[str] = (),
) -> list[StatusChange]:
    """Audit `changes` and queue their status events in the outbox; then queue a correction
    for each settled campaign of `recheck` whose counts moved since its last event. Returns
    the corrections queued."""
    audited = [c for c in changes if not c.correction]
    if audited:
        async with conn.cursor() as cur:
            await cur.executemany(
                "INSERT INTO audit_log (campaign_id, actor, action, before_status, after_status,"
                " reason, source_message_id) VALUES (%s, %s, %s, %s, %s, %s, %s)",
                [
                    (c.campaign_id, c.actor, c.action, c.before, c.after, c.reason,
                     c.source_message_id)
                    for c in audited
                ],
            )
    recheck = set(recheck)
    if not recheck and not any(c.announce for c in changes):
        return []
    ids = sorted({c.campaign_id for c in changes if c.announce} | recheck)
    cur = await conn.execute(
        f"SELECT campaign_id, status, {', '.join(COUNT_FIELDS)} FROM campaigns"
        " WHERE campaign_id = ANY(%s)",
        (ids,),
    )
    rows = await cur.fetchall()
    status = {row[0]: row[1] for row in rows}
    counts = {row[0]: dict(zip(COUNT_FIELDS, row[2:], strict=True)) for row in rows}
    last = await last_announced(conn, ids, lock=True)
    empty = dict.fromkeys(COUNT_FIELDS, 0)
    events: list[tuple[str, str, bytes]] = []
    corrections: list[StatusChange] = []

    def announce(change: StatusChange) -> None:
        before = last.get(change.campaign_id)
        now_counts = counts.get(change.campaign_id, empty)
        sequence = (before.sequence if before else 0) + 1
        event = _event(change, now_counts, sequence, _previous(change, before))
        events.append((status_topic, change.campaign_id, encode(event)))
        shown_status, shown_reason = _shown(change, before)
        last[change.campaign_id] = Announced(sequence, shown_status, shown_reason, now_counts)

    for change in changes:
        if change.announce and not _repeats(change, last.get(change.campaign_id)):
            announce(change)
    for campaign_id in sorted(recheck):
        correction = correction_for(campaign_id, status.get(campaign_id), counts.get(campaign_id),
                                    last.get(campaign_id))
        if correction is not None:
            announce(correction)
            corrections.append(correction)
    if not events:
        return corrections
    async with conn.cursor() as cur:
        await cur.executemany("INSERT INTO outbox (topic, key, payload) VALUES (%s, %s, %s)", events)
        await cur.executemany(
            """
            INSERT INTO status_announcements AS a (campaign_id, sequence, status, defer_reason, counts)
            VALUES (%s, %s, %s, %s, %s)
            ON CONFLICT (campaign_id) DO UPDATE SET sequence = EXCLUDED.sequence,
                status = EXCLUDED.status, defer_reason = EXCLUDED.defer_reason,
                counts = EXCLUDED.counts, announced_at = now()
            """,
            [(cid, a.sequence, a.status, a.defer_reason, Jsonb(a.counts))
             for cid, a in sorted(last.items()) if cid in {key for _, key, _ in events}],
        )
    return corrections


async def last_announced(
    conn: AsyncConnection, campaign_ids: list[str] | None = None, *, lock: bool = False
) -> dict[str, Announced]:
    """What the last status event of each campaign (of `campaign_ids`, or all) said."""
    where = "" if campaign_ids is None else " WHERE campaign_id = ANY(%s)"
    cur = await conn.execute(
        "SELECT campaign_id, sequence, status, defer_reason, counts FROM status_announcements"
        + where + " ORDER BY campaign_id" + (" FOR UPDATE" if lock else ""),
        () if campaign_ids is None else (campaign_ids,),
    )
    return {
        row[0]: Announced(int(row[1]), row[2], row[3], {k: int(row[4].get(k, 0)) for k in COUNT_FIELDS})
        for row in await cur.fetchall()
    }


def correction_for(
    campaign_id: str, status: str | None, counts: dict[str, int] | None, last: Announced | None
) -> StatusChange | None:
    """The event a settled campaign needs when its last event does not hold its counts: a
    correction (same status, `correction: true`); when even the status differs (an event
    never queued, e.g. a status repaired by hand), a plain event of the status it is in."""
    if status not in SETTLED or counts is None or last is None:
        return None
    if (last.status, last.counts) == (status, counts):
        return None
    if last.status != status:
        return StatusChange(
            campaign_id=campaign_id, before=last.status, after=status, actor="system",
            action="correct", reason=status_text(status, "en"), reason_ru=status_text(status, "ru"),
        )
    en, ru = correction_texts(status)
    return StatusChange(
        campaign_id=campaign_id, before=last.status, after=status, actor="system",
        action="correct", reason=en, reason_ru=ru, correction=True,
    )


def _shown(change: StatusChange, before: Announced | None) -> tuple[str, str]:
    """The (status, defer_reason) the CRM reads after `change`'s event."""
    if change.command or (change.event_status == "forbidden" and change.before is not None):
        # a command refused: the campaign keeps the status the CRM knows
        return (before.status, before.defer_reason) if before else (change.before or change.after, "")
    if change.after == "deferred":
        return "deferred", change.defer_reason
    return change.event_status or change.after, ""


def _repeats(change: StatusChange, before: Announced | None) -> bool:
    """A queue-state event that tells the CRM what its last event already said."""
    if change.action not in _QUEUE_ACTIONS or before is None:
        return False
    return (before.status, before.defer_reason) == _shown(change, before)


def _previous(change: StatusChange, before: Announced | None) -> str | None:
    """The status the CRM last saw: `deferred` is shown for a sending campaign that waits."""
    if before is not None and change.before in ("sending", "deferred") \
            and before.status in ("sending", "deferred"):
        return before.status
    return change.before


def _event(
    change: StatusChange, counts: dict[str, int], sequence: int, previous: str | None
) -> dict[str, object]:
    fields: dict[str, object] = {"sequence": sequence}
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
    if change.correction:
        fields["correction"] = True
    return envelope(
        "campaign.status", campaign_id=change.campaign_id, status=change.event_status or change.after,
        previous_status=previous, reason=change.reason, actor_id=change.actor,
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
