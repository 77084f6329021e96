"""The planner's record of recipient chunks: the campaign's size so far, and the held ones.

Contract: `record(pool, chunk, held, limit)` returns the campaign's recipients
over every chunk seen, this one included, and records the chunk once (its
whole message when `held`) unless that total is above `limit`, in which case
nothing is recorded and the caller refuses the chunk; a replayed chunk counts
once. `held()` returns the chunks kept while the campaign waited for
confirmation, in chunk order; `release()` marks one planned. `admission()`
reads the start's decision (`command_admissions`), `confirm()` turns a
needs_confirmation decision into accepted (idempotent; the reconciler does
the same).
"""

from __future__ import annotations

from typing import Any

from psycopg.types.json import Jsonb

from services.pipeline.contract import Message


async def admission(pool: Any, campaign_id: str) -> str | None:
    """The start's admission decision, or None when it was never admitted."""
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT decision FROM command_admissions WHERE admission_key = %s",
                                 (f"start:{campaign_id}",))
        row = await cur.fetchone()
    return None if row is None else str(row[0])


async def record(pool: Any, chunk: Message, *, held: bool, limit: int) -> int:
    """Record `chunk` unless it takes the campaign above `limit`; the campaign's total with it."""
    campaign_id, index, size = chunk["campaign_id"], chunk["chunk_index"], len(chunk["recipients"])
    async with pool.connection() as conn, conn.transaction():
        cur = await conn.execute(
            "SELECT coalesce(sum(recipients), 0) FROM planner_chunks"
            " WHERE campaign_id = %s AND chunk_index <> %s", (campaign_id, index),
        )
        row = await cur.fetchone()
        total = int(row[0] if row else 0) + size
        if total <= limit:
            await conn.execute(
                "INSERT INTO planner_chunks (campaign_id, chunk_index, recipients, held)"
                " VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING",
                (campaign_id, index, size, Jsonb(chunk) if held else None),
            )
    return total


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
