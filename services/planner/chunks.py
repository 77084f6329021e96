"""The planner's record of recipient chunks: the campaign's size so far, and the held ones.

Contract: `record(pool, chunk, definition, held, limit)` records the chunk once
(its whole message when `held`, and a digest of its recipients) and returns
None, or records nothing and returns the `ChunkRefusal` the caller dead-letters.
`refusal()` is the one rule, shared with the reconciler's projection, applied
to what actually arrived: a chunk index at or beyond the start's `total_chunks`
is `chunk_not_declared` (so a completed campaign, which has received every
declared index, takes no new one); an index already received with other
recipients is `chunk_conflict` (the same recipients: a replay, counted once);
a chunk that takes the campaign's recipients, counted over its received chunks,
above the start's `total_recipients` is `recipients_over_declared`, above
`limit` (MAILER_MAX_RECIPIENTS) `recipients_over_limit`. `held()` returns
the chunks kept while the campaign waited for confirmation, in chunk order;
`release()` marks one planned. `admission()` reads the start's decision
(`command_admissions`), `confirm()` turns a needs_confirmation decision into
accepted (idempotent; the reconciler does the same).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from psycopg.types.json import Jsonb

from services.pipeline.admission_texts import refusal_texts
from services.pipeline.contract import Message


@dataclass(frozen=True)
class ChunkRefusal:
    """Why one chunk is refused: a code of the closed set and the texts managers read."""

    code: str
    reason: str  # English
    reason_ru: str


def digest(recipients: list[dict[str, Any]]) -> str:
    """A digest of a chunk's recipients (what a replay of the chunk must hold again)."""
    return hashlib.sha256(orjson.dumps(recipients, option=orjson.OPT_SORT_KEYS)).hexdigest()


def refusal(index: int, size: int, chunk_digest: str, *, declared_chunks: int, declared_recipients: int,
            received: Mapping[int, tuple[int, str | None]], limit: int = 0) -> ChunkRefusal | None:
    """Why chunk `index` of `size` recipients may not join its campaign, or None.

    `received` holds the campaign's chunks taken so far: index -> (recipients, digest or
    None when recorded before digests were kept)."""
    code, numbers = "", dict[str, Any]()
    seen = received.get(index)
    if index >= declared_chunks:
        code, numbers = "chunk_not_declared", {"chunks": declared_chunks, "last": declared_chunks - 1}
    elif seen is not None:
        if seen[1] is None or seen[1] == chunk_digest:
            return None  # a replay: taken once
        code = "chunk_conflict"
    else:
        total = sum(n for i, (n, _) in received.items() if i != index) + size
        if total > declared_recipients:
            code, numbers = "recipients_over_declared", {"total": total, "declared": declared_recipients}
        elif limit and total > limit:
            code, numbers = "recipients_over_limit", {"total": total, "limit": limit}
    if not code:
        return None
    en, ru = refusal_texts(code, chunk=index, **numbers)
    return ChunkRefusal(code, en, ru)


async def admission(pool: Any, campaign_id: str) -> str | None:
    """The start's admission decision, or None when it was never admitted."""
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT decision FROM command_admissions WHERE admission_key = %s",
                                 (f"start:{campaign_id}",))
        row = await cur.fetchone()
    return None if row is None else str(row[0])


async def record(pool: Any, chunk: Message, definition: Mapping[str, Any], *, held: bool,
                 limit: int) -> ChunkRefusal | None:
    """Record `chunk` unless `refusal()` refuses it; the refusal, or None when it was taken."""
    campaign_id, index, size = chunk["campaign_id"], chunk["chunk_index"], len(chunk["recipients"])
    chunk_digest = digest(chunk["recipients"])
    async with pool.connection() as conn, conn.transaction():
        cur = await conn.execute(
            "SELECT chunk_index, recipients, digest FROM planner_chunks WHERE campaign_id = %s",
            (campaign_id,),
        )
        received = {int(row[0]): (int(row[1]), row[2]) for row in await cur.fetchall()}
        refused = refusal(index, size, chunk_digest, declared_chunks=int(definition["total_chunks"]),
                          declared_recipients=int(definition["total_recipients"]), received=received,
                          limit=limit)
        if refused is None:
            await conn.execute(
                "INSERT INTO planner_chunks (campaign_id, chunk_index, recipients, held, digest)"
                " VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                (campaign_id, index, size, Jsonb(chunk) if held else None, chunk_digest),
            )
    return refused


async def confirm(pool: Any, campaign_id: str) -> None:
    """The start is confirmed: its decision becomes accepted."""
    async with pool.connection() as conn:
        await conn.execute(
            "UPDATE command_admissions SET decision = 'accepted' WHERE admission_key = %s"
            " AND decision = 'needs_confirmation'", (f"start:{campaign_id}",),
        )


async def held(pool: Any, campaign_id: str) -> list[dict[str, Any]]:
    """The chunks held for confirmation, in chunk order."""
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT held FROM planner_chunks WHERE campaign_id = %s AND held IS NOT NULL"
            " ORDER BY chunk_index", (campaign_id,),
        )
        return [dict(row[0]) for row in await cur.fetchall()]


async def release(pool: Any, campaign_id: str, chunk_index: int) -> None:
    """Mark a held chunk planned."""
    async with pool.connection() as conn:
        await conn.execute(
            "UPDATE planner_chunks SET held = NULL WHERE campaign_id = %s AND chunk_index = %s",
            (campaign_id, chunk_index),
        )
