"""Postgres access shared by the services (psycopg 3, async pool).

Contract: `open_pool(settings)` returns an opened `AsyncConnectionPool` whose
connections are checked before use, so a restarted Postgres is reconnected
transparently; callers run each unit of work in `pool.connection()` +
`conn.transaction()` and treat the transaction as the unit of idempotency.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from services.pipeline.settings import Settings

#: SQL of a campaign's advisory lock key (one parameter: the campaign id). Sends hold it
#: shared while they talk to SMTP; a pause or cancel takes it exclusively (B5).
CAMPAIGN_LOCK = "hashtextextended(%s, 7)"


async def open_pool(
    settings: Settings, *, max_size: int = 4, name: str = "mailer", check: bool = True
) -> AsyncConnectionPool:
    """An opened connection pool to `settings.database_url`; `check=False` skips the health
    check on every checkout (for callers whose every use retries a dead connection)."""
    pool = AsyncConnectionPool(
        settings.database_url,
        min_size=1,
        max_size=max_size,
        name=name,
        open=False,
        check=AsyncConnectionPool.check_connection if check else None,
        kwargs={"autocommit": False},
        reconnect_timeout=300,
    )
    await pool.open(wait=True, timeout=60)
    return pool


async def fetch_dicts(
    conn: AsyncConnection, sql: str, params: Sequence[Any] | Mapping[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Run `sql` and return its rows as dicts."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(sql, params)
        return list(await cur.fetchall())
