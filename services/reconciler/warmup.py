"""Warm-up of a new sending domain: a daily cap that steps up only while sends go well (R12).

Contract: `advance_warmup(conn, redis, keys, accounts, now)` runs once per
call for every account with a `WarmupPlan`, each in its own transaction
(a savepoint inside the caller's) with its `account_warmup` row locked:
- no row: insert stage 0, `stage_day` = the account's local today;
- `stage_day` before local today: judge the account's non-test send_log rows
  of the local days [stage_day, today) with `decide_step` (one step up at most,
  however many days passed), then set `stage_day` = today; the decision is
  logged with its ratios;
- otherwise nothing changes, so calling it again the same day is a no-op.
It then SETs `keys.warmup_cap(account)` to `daily_caps[stage]` every time (a
restarted Redis is repaired by the next call), DELetes the cap key of accounts
without a plan (a plan taken out of the configuration stops capping), and
returns {account: cap} for the accounts with a plan.

What counts: attempts are rows with outcome sent, failed, unknown or deferred;
a deferred row counts only when it came from an SMTP try, not when our own
gate parked the send (reasons such as `warmup_cap` or `rate_per_hour`), or
the cap itself would hold the warm-up back. Bounces are failed rows of
error_class `permanent`; deferrals are the counted deferred rows plus failed
rows of error_class `transient`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import date, datetime

import redis.asyncio as aioredis
from psycopg import AsyncConnection

from services.pipeline.accounts import Account, Accounts, WarmupPlan
from services.pipeline.defer_reasons import DeferReason
from services.pipeline.limiter_keys import LimiterKeys
from services.pipeline.working_hours import local_day, local_instant, zone

log = logging.getLogger(__name__)

#: Deferral reasons of our own gate: the send never reached SMTP, so it says nothing of the domain.
GATE_REASONS = tuple(sorted(r.value for r in DeferReason if r is not DeferReason.TRANSIENT_ERROR))

_COUNTS = """
    SELECT count(*) FILTER (WHERE outcome IN ('sent', 'failed', 'unknown')
                               OR (outcome = 'deferred' AND NOT coalesce(reason, '') = ANY(%(gate)s))),
           count(*) FILTER (WHERE outcome = 'failed' AND error_class = 'permanent'),
           count(*) FILTER (WHERE (outcome = 'deferred' AND NOT coalesce(reason, '') = ANY(%(gate)s))
                               OR (outcome = 'failed' AND error_class = 'transient'))
      FROM send_log
     WHERE account = %(account)s AND NOT is_test
       AND occurred_at >= %(start)s AND occurred_at < %(end)s
"""


@dataclass(frozen=True)
class WarmupCounts:
    """What an account's sends of the judged days came to."""

    attempts: int
    bounces: int
    deferrals: int

    @property
    def bounce_ratio(self) -> float:
        return self.bounces / self.attempts if self.attempts else 0.0

    @property
    def deferral_ratio(self) -> float:
        return self.deferrals / self.attempts if self.attempts else 0.0


def decide_step(stage: int, plan: WarmupPlan, attempts: int, bounces: int, deferrals: int) -> tuple[int, str]:
    """The stage after judging one period's sends, and why.

    One step up only with at least `min_daily_volume` attempts and both the
    bounce and the deferral ratio at or under the plan's thresholds; never
    past the last cap (a stage beyond it, from a shortened plan, is clamped).
    """
    last = len(plan.daily_caps) - 1
    stage = min(max(stage, 0), last)
    counts = WarmupCounts(attempts, bounces, deferrals)
    ratios = (f"{attempts} attempts, bounce ratio {counts.bounce_ratio:.1%} "
              f"(max {plan.max_bounce_ratio:.1%}), deferral ratio {counts.deferral_ratio:.1%} "
              f"(max {plan.max_deferral_ratio:.1%})")
    if attempts < plan.min_daily_volume:
        return stage, f"hold at stage {stage}: {attempts} attempts < min_daily_volume {plan.min_daily_volume}"
    if counts.bounce_ratio > plan.max_bounce_ratio:
        return stage, f"hold at stage {stage}: bounce ratio too high; {ratios}"
    if counts.deferral_ratio > plan.max_deferral_ratio:
        return stage, f"hold at stage {stage}: deferral ratio too high; {ratios}"
    if stage >= last:
        return stage, f"hold at stage {stage}: last step of the plan; {ratios}"
    return stage + 1, f"step up to stage {stage + 1} (cap {plan.daily_caps[stage + 1]}); {ratios}"


async def advance_warmup(
    conn: AsyncConnection, redis: aioredis.Redis, keys: LimiterKeys, accounts: Accounts, now: datetime
) -> dict[str, int]:
    """Judge each warming account once per local day and publish its cap; {account: cap}."""
    caps: dict[str, int] = {}
    for account in accounts.by_name.values():
        if account.warmup is None:
            await redis.delete(keys.warmup_cap(account.name))
            continue
        stage = await _advance_account(conn, account, account.warmup, now)
        cap = account.warmup.daily_caps[min(stage, len(account.warmup.daily_caps) - 1)]
        await redis.set(keys.warmup_cap(account.name), cap)
        caps[account.name] = cap
    return caps


async def _advance_account(conn: AsyncConnection, account: Account, plan: WarmupPlan, now: datetime) -> int:
    """The account's stage after today's judgement (made at most once per local day)."""
    today = date.fromisoformat(local_day(now, account.time_zone)[0])
    async with conn.transaction():
        await conn.execute(
            "INSERT INTO account_warmup (account, stage, stage_day, updated_at) VALUES (%s, 0, %s, %s)"
            " ON CONFLICT (account) DO NOTHING",
            (account.name, today, now),
        )
        cur = await conn.execute(
            "SELECT stage, stage_day FROM account_warmup WHERE account = %s FOR UPDATE", (account.name,)
        )
        row = await cur.fetchone()
        assert row is not None
        stage, stage_day = int(row[0]), row[1]
        if stage_day >= today:
            return stage
        tz = zone(account.time_zone)
        start, end = local_instant(stage_day, 0, tz), local_instant(today, 0, tz)
        cur = await conn.execute(
            _COUNTS, {"gate": list(GATE_REASONS), "account": account.name, "start": start, "end": end}
        )
        totals = await cur.fetchone()
        assert totals is not None
        counts = WarmupCounts(*(int(n) for n in totals))
        new_stage, reason = decide_step(stage, plan, counts.attempts, counts.bounces, counts.deferrals)
        await conn.execute(
            "UPDATE account_warmup SET stage = %s, stage_day = %s, updated_at = %s WHERE account = %s",
            (new_stage, today, now, account.name),
        )
    log.info(
        "warm-up of account %s over %s..%s: %s (attempts=%d bounce_ratio=%.4f deferral_ratio=%.4f)",
        account.name, stage_day.isoformat(), today.isoformat(), reason,
        counts.attempts, counts.bounce_ratio, counts.deferral_ratio,
    )
    return new_stage
