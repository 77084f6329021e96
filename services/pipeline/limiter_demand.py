"""Which campaigns compete for an account's hourly window, for admission by priority and fair share.

Contract: the registry is one Redis hash per account (`LimiterKeys.demand`):
campaign id -> "priority|demand|until", demand the sends the campaign still
wants, until the clock time the entry holds without a refresh. The limiter's
script (services/sender/rate_limit.lua) reads it on every reserve and capacity
of a send carrying a priority and takes one from the demand of each grant.
It is written by two hands:

- `announce()` (the planner, before it produces a chunk's commands): adds the
  chunk's recipients to the campaign's demand, so a campaign started in the
  same second as another is known before its first send reaches the limiter;
- `refresh()` (the reconciler, every scheduler pass): the truth from
  Postgres. Every sending campaign gets demand = its pending recipients less
  those parked for a reason of its own (`campaign_rate`, `daily_limit`, a
  domain throttle, working hours, a pause, a breaker, a transient retry's
  backoff: all but `WINDOW_WAITS`); campaigns it knows that do
  not compete (completed, paused, cancelled, no demand) are removed, so what
  they leave flows to the others at once. Entries of campaigns the reconciler
  has not projected yet are left to their `until`.

Losing the registry (Redis flushed) only loses the sharing until the next
refresh; it never lets a limit open. Nothing here sleeps.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from psycopg import AsyncConnection
from redis.asyncio import Redis
from redis.exceptions import RedisError

from services.pipeline.accounts import DEFAULT_ACCOUNT
from services.pipeline.limiter_keys import LimiterKeys

if TYPE_CHECKING:
    from services.pipeline.admission import Admissions

log = logging.getLogger(__name__)

#: How long (clock seconds) an entry holds without a refresh: the reconciler refreshes every
#: release interval; a planner's announcement bridges the time until the reconciler knows it.
HOLD_SECONDS = 600.0
#: Reasons a parked send waits for that are not its campaign's own: the account's window and
#: what holds every campaign of the account alike. A send parked for any other reason (its
#: campaign's rate, its manager's daily limit, a domain throttle, working hours, a pause or
#: breaker, a transient retry's backoff) does not need the window now: not counted in demand.
WINDOW_WAITS = ("rate_per_hour", "limiter_unavailable", "quota_exhausted", "quota_unknown",
                "warmup_cap")

#: KEYS: registry. ARGV: campaign, priority, added demand, until, now.
_ANNOUNCE = """
local value = redis.call('HGET', KEYS[1], ARGV[1])
local demand = tonumber(ARGV[3])
if value then
  local p, d, u = string.match(value, '^(%-?%d+)|(%-?%d+)|(.+)$')
  if d and tonumber(u) > tonumber(ARGV[5]) then demand = demand + tonumber(d) end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. '|' .. demand .. '|' .. ARGV[4])
return demand
"""


def entry(priority: int, demand: int, until: float) -> str:
    """One registry value."""
    return f"{int(priority)}|{int(demand)}|{until!r}"


async def announce(redis: Redis, keys: LimiterKeys, account: str, campaign_id: str, priority: int,
                   count: int, now: float) -> None:
    """Add `count` sends to what `campaign_id` wants of `account`'s window."""
    if count <= 0:
        return
    await redis.eval(_ANNOUNCE, 1, keys.demand(account), campaign_id, int(priority), count,
                     repr(now + HOLD_SECONDS), repr(now))


async def announce_demand(admissions: Admissions, definition: dict[str, Any], count: int) -> None:
    """The planner's announcement of a chunk (Redis errors only cost the sharing: logged)."""
    try:
        await announce(admissions.redis, admissions.keys, definition.get("account") or DEFAULT_ACCOUNT,
                       definition["campaign_id"], int(definition.get("priority", 5)), count,
                       admissions.clock.time())
    except (RedisError, OSError) as exc:
        log.info("campaign %s: demand not announced to the limiter (%s)", definition["campaign_id"],
                 type(exc).__name__)


async def refresh(conn: AsyncConnection, redis: Redis, keys: LimiterKeys, accounts: list[str],
                  now: float) -> dict[str, dict[str, str]]:
    """Rewrite every account's registry from Postgres; returns what it wrote, per account."""
    registered: dict[str, list[str]] = {}
    for account in accounts:
        registered[account] = [
            k.decode() if isinstance(k, bytes) else str(k)
            for k in await redis.hkeys(keys.demand(account))
        ]
    known = [c for ids in registered.values() for c in ids]
    cur = await conn.execute(
        """
        SELECT c.campaign_id, c.account, c.priority, c.pending - coalesce(h.held, 0), c.status
        FROM campaigns c
        LEFT JOIN (SELECT campaign_id, count(*) AS held FROM parked_sends
                   WHERE released_at IS NULL AND reason <> ALL(%s) GROUP BY campaign_id) h
               ON h.campaign_id = c.campaign_id
        WHERE (c.status = 'sending' AND c.pending > 0) OR c.campaign_id = ANY(%s)
        """,
        (list(WINDOW_WAITS), known),
    )
    competing: dict[str, dict[str, str]] = defaultdict(dict)
    seen: dict[str, str] = {}
    for campaign_id, account, priority, wanted, status in await cur.fetchall():
        seen[campaign_id] = account
        if status == "sending" and wanted > 0:
            competing[account][campaign_id] = entry(priority, wanted, now + HOLD_SECONDS)
    async with redis.pipeline(transaction=False) as pipe:
        for account in accounts:
            key = keys.demand(account)
            gone = [c for c in registered[account] if c in seen and c not in competing[account]]
            if gone:
                pipe.hdel(key, *gone)
            if competing[account]:
                mapping: dict[Any, Any] = dict(competing[account])
                pipe.hset(key, mapping=mapping)
        await pipe.execute()
    return {a: dict(c) for a, c in competing.items()}
