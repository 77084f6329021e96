"""The planner's memory of campaign definitions, kept in Postgres.

Contract: `save()` records a campaign start once (a replayed or repeated start
keeps the first definition); `load()` returns it, or `None` for a campaign
whose start was never seen. Definitions are small (template and sender), so
the store caches the most recent ones; recipients are never held.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from services.pipeline.contract import Message

DEFINITION_FIELDS = (
    "campaign_id", "manager_id", "account", "priority", "from", "reply_to",
    "template", "variables", "unsubscribe_url", "total_recipients", "total_chunks",
    "occurred_at", "rate_per_hour", "working_hours",  # queue time and the campaign's own limits
)


class CampaignStore:
    """Campaign definitions by id, persisted in `planner_campaigns`."""

    def __init__(self, pool: AsyncConnectionPool, cache_size: int = 256) -> None:
        self._pool = pool
        self._cache: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._cache_size = cache_size

    async def save(self, start: Message) -> None:
        """Record the definition carried by a `campaign.start`."""
        definition = {k: start[k] for k in DEFINITION_FIELDS if k in start}
        async with self._pool.connection() as conn:
            await conn.execute(
                "INSERT INTO planner_campaigns (campaign_id, definition) VALUES (%s, %s)"
                " ON CONFLICT (campaign_id) DO NOTHING",
                (start["campaign_id"], Jsonb(definition)),
            )

    async def load(self, campaign_id: str) -> dict[str, Any] | None:
        """The definition of `campaign_id`, or `None` when its start is unknown."""
        cached = self._cache.get(campaign_id)
        if cached is not None:
            self._cache.move_to_end(campaign_id)
            return cached
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "SELECT definition FROM planner_campaigns WHERE campaign_id = %s", (campaign_id,)
            )
            row = await cur.fetchone()
        if row is None:
            return None
        definition: dict[str, Any] = row[0]
        self._cache[campaign_id] = definition
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return definition
