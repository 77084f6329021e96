"""The suppression list (R32): addresses that are never mailed again.

Contract: every function here runs inside the caller's transaction and is
idempotent: applying the same messages twice leaves `suppressions` as applying
them once, and the second time reports no rows changed. Addresses are stored
normalised (`normalize_email`: trimmed, lower-cased), so `Anna@Example.com `
and `anna@example.com` are one entry.

- `suppression.add` inserts the address, or updates the reason and source of
  an entry already there; the first `suppressed_at` is kept.
- `suppression.remove` deletes the entry.
- A permanent `outcome.failed` flagged `hard_bounce` suppresses its recipient
  with reason `hard_bounce`, unless the address is on the list already (then
  the reason given first, e.g. an unsubscribe, stands).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from psycopg import AsyncConnection

from services.pipeline.contract import Message
from services.pipeline.ids import normalize_email

REASONS: Final = ("unsubscribe", "hard_bounce", "complaint", "manual")
REPLY_CHARS: Final = 100  # how much of the SMTP reply a hard bounce's `source` keeps


async def apply_suppressions(conn: AsyncConnection, messages: Iterable[Message]) -> int:
    """Apply `suppression.add` / `suppression.remove` messages in order; return the rows changed.

    Messages of any other kind are ignored. An add takes its `suppressed_at`
    from the message's `occurred_at` (when it has one), so a replay of the
    topic into an empty table restores the original times.
    """
    changed = 0
    for message in messages:
        kind = message.get("kind")
        if kind == "suppression.add":
            changed += await _add(conn, message)
        elif kind == "suppression.remove":
            cur = await conn.execute(
                "DELETE FROM suppressions WHERE email = %s", (normalize_email(message["email"]),)
            )
            changed += cur.rowcount
    return changed


async def _add(conn: AsyncConnection, message: Message) -> int:
    cur = await conn.execute(
        """
        INSERT INTO suppressions (email, reason, source, suppressed_at)
        VALUES (%s, %s, %s, coalesce(%s::timestamptz, now()))
        ON CONFLICT (email) DO UPDATE
            SET reason = EXCLUDED.reason, source = EXCLUDED.source
            WHERE (suppressions.reason, suppressions.source)
                  IS DISTINCT FROM (EXCLUDED.reason, EXCLUDED.source)
        """,
        (
            normalize_email(message["email"]), message["reason"], message.get("source", ""),
            message.get("occurred_at"),
        ),
    )
    return cur.rowcount


def is_hard_bounce(outcome: Message) -> bool:
    """Whether `outcome` says its recipient's address itself is bad (a permanent, flagged failure)."""
    return (
        outcome.get("kind") == "outcome.failed"
        and outcome.get("error_class") == "permanent"
        and outcome.get("hard_bounce") is True
    )


def hard_bounce_source(outcome: Message) -> str:
    """The `source` of a hard bounce's entry: `smtp <code> <first 100 chars of the reply>`."""
    code = outcome.get("smtp_code")
    reply = str(outcome.get("smtp_reply") or "")[:REPLY_CHARS]
    return f"smtp {code if code is not None else '-'} {reply}".rstrip()


async def suppress_hard_bounces(conn: AsyncConnection, outcomes: Iterable[Message]) -> int:
    """Suppress the recipient of every hard-bounced outcome; return the rows inserted.

    Outcomes that are not hard bounces (`is_hard_bounce`) are ignored; an
    address already on the list keeps its entry as it is.
    """
    inserted = 0
    for outcome in outcomes:
        if not is_hard_bounce(outcome):
            continue
        cur = await conn.execute(
            """
            INSERT INTO suppressions (email, reason, source, suppressed_at)
            VALUES (%s, 'hard_bounce', %s, coalesce(%s::timestamptz, now()))
            ON CONFLICT (email) DO NOTHING
            """,
            (
                normalize_email(outcome["recipient_email"]), hard_bounce_source(outcome),
                outcome.get("occurred_at"),
            ),
        )
        inserted += cur.rowcount
    return inserted


async def is_suppressed(conn: AsyncConnection, email: str) -> str | None:
    """The reason `email` is suppressed (any case, surrounding blanks ignored), or None."""
    cur = await conn.execute(
        "SELECT reason FROM suppressions WHERE email = %s", (normalize_email(email),)
    )
    row = await cur.fetchone()
    return None if row is None else str(row[0])
