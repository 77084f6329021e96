"""Rebuilding the limiter's Redis state from Postgres after Redis lost it.

Contract: `restore_if_lost(pool, limiter, accounts, clock)` does nothing
while the limiter's epoch key exists. When it is missing (Redis restarted
empty, was flushed, or a first start), it reads every send of the last 25
hours that may have reached the provider from what is written BEFORE SMTP:
the sender's claims (`send_claims`, committed before the SMTP conversation:
unfinished, `sent` or `unknown`; `failed` and `deferred` gave their tokens
back), plus `send_log` (sent or unknown) for sends whose claim is gone, and
hands them to `Limiter.restore`, which refills the hourly windows and today's
daily and warm-up counters and sets the epoch. Until then every reserve is
refused with `limiter_unavailable`, so a flush or a restart never opens a limit.

Each send is restored at a time no earlier than its reservation, so its token
never frees early: the outcome's time in `send_log` when projected, else the
claim's finish time, else its claim time plus `CLAIM_SLACK` (a claim and its
reservation are milliseconds apart), never later than now. Claim times are
Postgres wall times, converted to the pipeline clock (identity in production).
A restored token is a placeholder: if its send reserves after the rebuild
(it was claimed but not yet granted), the script decides afresh instead of
taking the placeholder as a grant; and if its claim is given up instead (the
send was refused while the state was missing, and parked), the next passes
give the placeholder back (`WATCH_SECONDS` after the rebuild). The quota is not restored here: the quota
sync sets it again on its next poll.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime, timedelta

from psycopg_pool import AsyncConnectionPool
from redis.exceptions import RedisError

from services.pipeline import limiter_demand
from services.pipeline.accounts import Accounts, load_accounts
from services.pipeline.clock import Clock, clock_from_settings
from services.pipeline.settings import Settings
from services.pipeline.working_hours import local_day
from services.sender.rate_limit import Limiter, RestoredSend

log = logging.getLogger(__name__)


#: How much later than its claim a send's reservation may be (clock seconds); a restored
#: unfinished claim counts from its claim time plus this, so it never frees before its token.
CLAIM_SLACK = 60.0
#: How long (wall seconds) after a rebuild its placeholders of unfinished claims are watched: a
#: claim refused while the state was missing is given up within milliseconds of the refusal.
WATCH_SECONDS = 60.0
LOOKBACK = timedelta(hours=25)

_SENDS = """
SELECT c.send_id::text || ':' || c.attempt, c.account, c.campaign_id, coalesce(m.manager_id, ''),
       c.recipient, extract(epoch FROM c.claimed_at)::float8,
       extract(epoch FROM c.finished_at)::float8, l.occurred_at
FROM send_claims c
LEFT JOIN campaigns m ON m.campaign_id = c.campaign_id
LEFT JOIN send_log l ON l.send_id = c.send_id AND l.attempt = c.attempt
     AND l.outcome IN ('sent', 'unknown')
WHERE c.claimed_at > now() - %(lookback)s AND (c.result IS NULL OR c.result IN ('sent', 'unknown'))
UNION ALL
SELECT s.send_id::text || ':' || s.attempt, s.account, s.campaign_id, coalesce(m.manager_id, ''),
       s.recipient, NULL, NULL, s.occurred_at
FROM send_log s LEFT JOIN campaigns m ON m.campaign_id = s.campaign_id
WHERE s.outcome IN ('sent', 'unknown') AND s.occurred_at > %(since)s
  AND NOT EXISTS (SELECT 1 FROM send_claims c WHERE c.send_id = s.send_id AND c.attempt = s.attempt)
"""


def clock_seconds(clock: Clock, wall: float) -> float:
    """The pipeline clock's reading at wall time `wall` (the clock's current speed; identity for
    the system clock). Never later than the clock's now."""
    now_clock, now_wall = clock.time(), time.time()
    speed = float(getattr(getattr(clock, "_clock", clock), "speed", 1.0))
    return min(now_clock, now_clock - (now_wall - wall) * speed)


def restore_time(clock: Clock, now: float, claimed: float | None, finished: float | None,
                 occurred: datetime | None) -> float:
    """When a restored send counts as made: never before its reservation, never after now."""
    if occurred is not None:
        return min(now, occurred.timestamp())
    if finished is not None:
        return clock_seconds(clock, finished)
    assert claimed is not None
    return min(now, clock_seconds(clock, claimed) + CLAIM_SLACK)


async def restore_if_lost(
    pool: AsyncConnectionPool, limiter: Limiter, accounts: Accounts, clock: Clock
) -> bool:
    """Restore the limiter's state when Redis has lost it; True when it did."""
    try:
        if not await limiter.needs_restore():
            await _drop_given_up(pool, limiter)
            return False
    except (RedisError, OSError) as exc:  # Redis is down: nothing to restore into yet
        log.debug("limiter state not checked: %s", type(exc).__name__)
        return False
    now = clock.time()
    async with pool.connection() as conn:
        cur = await conn.execute(_SENDS, {"lookback": LOOKBACK,
                                          "since": clock.now() - LOOKBACK})
        rows = await cur.fetchall()
    entries = []
    unfinished = []
    for token, account_name, campaign_id, manager_id, recipient, claimed, finished, occurred in rows:
        account = accounts.get(account_name)
        if account is None:
            continue
        at = restore_time(clock, now, claimed, finished, occurred)
        if claimed is not None and finished is None and occurred is None:
            unfinished.append(token)
        day, next_midnight = local_day(datetime.fromtimestamp(at, UTC), account.time_zone)
        throttle = account.domain_throttle(recipient)
        entries.append(RestoredSend(
            token_id=token, account=account_name, campaign_id=campaign_id, manager_id=manager_id,
            day=day, at=at, domain_group=throttle.group if throttle else None,
            counts_warmup=account.warmup is not None, next_day_at=next_midnight.timestamp(),
        ))
    restored = await limiter.restore(entries, now=now)
    if restored:
        deadline = time.monotonic() + WATCH_SECONDS
        limiter.unconfirmed = dict.fromkeys(unfinished, deadline)
        # info: a first start looks the same; the limiter itself warns about a Redis outage
        log.info("limiter state (re)built in Redis from %d sends of the last 25 h (claims and send_log)",
                 len(entries))
    return restored


async def _drop_given_up(pool: AsyncConnectionPool, limiter: Limiter) -> None:
    """Give back the placeholders of unfinished claims that were given up since the rebuild (the
    send was refused while the state was missing, and parked): nothing of theirs was sent."""
    if not limiter.unconfirmed:
        return
    wall = time.monotonic()
    limiter.unconfirmed = {t: d for t, d in limiter.unconfirmed.items() if d > wall}
    tokens = list(limiter.unconfirmed)
    ids = [t.rsplit(":", 1) for t in tokens]
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT t.s::text || ':' || t.a FROM unnest(%s::uuid[], %s::int[]) AS t(s, a)"
            " WHERE NOT EXISTS (SELECT 1 FROM send_claims c WHERE c.send_id = t.s AND c.attempt = t.a)",
            ([i[0] for i in ids], [int(i[1]) for i in ids]),
        )
        gone = [str(row[0]) for row in await cur.fetchall()]
    for token in gone:
        await limiter.drop_placeholder(token)
        limiter.unconfirmed.pop(token, None)
    if gone:
        log.info("limiter: %d placeholders of claims given up after the rebuild given back", len(gone))


async def refresh_demand(
    pool: AsyncConnectionPool, limiter: Limiter, accounts: Accounts, clock: Clock
) -> None:
    """Rewrite the campaigns competing for each account's window (`limiter_demand.refresh`)."""
    try:
        async with pool.connection() as conn:
            await limiter_demand.refresh(conn, limiter.redis, limiter.keys, sorted(accounts.by_name),
                                         clock.time())
    except (RedisError, OSError) as exc:  # Redis is down: the limiter refuses anyway
        log.debug("demand registry not refreshed: %s", type(exc).__name__)


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
