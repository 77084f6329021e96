"""Rebuilding the limiter's Redis state from Postgres after Redis lost it.

Contract: `restore_if_lost(pool, limiter, accounts, clock)` does nothing
while the limiter's epoch key exists. When it is missing (Redis restarted
empty, or a first start), it reads the sends of the last 25 hours from
`send_log` (sent or unknown: the provider may have counted them) and hands
them to `Limiter.restore`, which refills the hourly windows and today's
daily and warm-up counters and sets the epoch; until then every reserve is
refused with `limiter_unavailable`, so a Redis restart never opens the limits.
Sends reserved but not yet projected when Redis died are not counted: the
overshoot is bounded by the sends in flight at that moment. The quota is
not restored here: the quota sync sets it again on its next poll.
"""

from __future__ import annotations

import logging
from datetime import UTC, timedelta

from psycopg_pool import AsyncConnectionPool
from redis.exceptions import RedisError

from services.pipeline.accounts import Accounts, load_accounts
from services.pipeline.clock import Clock, clock_from_settings
from services.pipeline.settings import Settings
from services.pipeline.working_hours import local_day
from services.sender.rate_limit import Limiter, RestoredSend

log = logging.getLogger(__name__)


async def restore_if_lost(
    pool: AsyncConnectionPool, limiter: Limiter, accounts: Accounts, clock: Clock
) -> bool:
    """Restore the limiter's state when Redis has lost it; True when it did."""
    try:
        if not await limiter.needs_restore():
            return False
    except (RedisError, OSError) as exc:  # Redis is down: nothing to restore into yet
        log.debug("limiter state not checked: %s", type(exc).__name__)
        return False
    now = clock.now()
    async with pool.connection() as conn:
        cur = await conn.execute(
            """
            SELECT s.send_id::text || ':' || s.attempt, s.account, s.campaign_id,
                   coalesce(c.manager_id, ''), s.recipient, s.occurred_at
            FROM send_log s LEFT JOIN campaigns c ON c.campaign_id = s.campaign_id
            WHERE s.outcome IN ('sent', 'unknown') AND s.occurred_at > %s
            """,
            (now - timedelta(hours=25),),
        )
        rows = await cur.fetchall()
    entries = []
    for token, account_name, campaign_id, manager_id, recipient, at in rows:
        account = accounts.get(account_name)
        if account is None:
            continue
        day, next_midnight = local_day(at.astimezone(UTC), account.time_zone)
        throttle = account.domain_throttle(recipient)
        entries.append(RestoredSend(
            token_id=token, account=account_name, campaign_id=campaign_id, manager_id=manager_id,
            day=day, at=at.timestamp(), domain_group=throttle.group if throttle else None,
            counts_warmup=account.warmup is not None, next_day_at=next_midnight.timestamp(),
        ))
    restored = await limiter.restore(entries, now=clock.time())
    if restored:
        # info: a first start looks the same; the limiter itself warns about a Redis outage
        log.info("limiter state (re)built in Redis from %d sends of the last 25 h in send_log",
                 len(entries))
    return restored




async def restore_limiter(settings: Settings) -> bool:
    """Restore the limiter's state if Redis lost it, from a one-off process (CLI, fixtures)."""
    limiter = Limiter.from_settings(settings)
    try:
        pool = AsyncConnectionPool(settings.database_url, min_size=1, max_size=1, open=False)
        async with pool:
            return await restore_if_lost(
                pool, limiter, load_accounts(settings), clock_from_settings(settings)
            )
    finally:
        await limiter.close()
