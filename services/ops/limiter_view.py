"""`mailer ops limiter`: what the shared limiter and the provider quota allow each account now.

Contract: `limiter_state()` reads Redis only with reads (ZCOUNT, GET, HGETALL,
SCAN, EXISTS): per account the sends in the sliding hour against the hourly
rate times the adaptive factor and when the next slot frees, the campaigns
competing for it (priority, sends wanted: the admission registry), today's sends
per manager against the daily limit, the warm-up cap, the provider quota and
when it was synced; plus from Postgres the account's breaker and its parked
sends by reason. When Redis does not answer, `redis` says so and the Redis
figures are absent: that is the answer to "is Redis down?".
"""

from __future__ import annotations

import contextlib
from datetime import datetime, timedelta
from typing import Any

from psycopg import AsyncConnection
from redis.asyncio import Redis
from redis.exceptions import RedisError

from services.ops.render import table, when
from services.pipeline.accounts import Account, Accounts
from services.pipeline.clock import Clock
from services.pipeline.db import fetch_dicts
from services.pipeline.limiter_keys import LimiterKeys
from services.pipeline.working_hours import local_day

WINDOW = 3600.0


async def limiter_state(
    conn: AsyncConnection, redis: Redis, keys: LimiterKeys, accounts: Accounts, clock: Clock,
    only: str | None = None,
) -> dict[str, Any]:
    """The limiter's and the quota's state of every account (or of `only`)."""
    names = [only] if only else sorted(accounts.by_name)
    state: dict[str, Any] = {"redis": "ok", "limiter_state": None, "accounts": []}
    try:
        state["limiter_state"] = "present" if await redis.exists(keys.epoch()) else (
            "missing: every send is refused until the reconciler restores it from the claims")
    except (RedisError, OSError) as exc:
        state["redis"] = f"unreachable ({type(exc).__name__}: {exc})"
    for name in names:
        account = accounts.get(name)
        if account is None:
            raise KeyError(name)
        row: dict[str, Any] = {"account": name, **await _postgres_figures(conn, name)}
        if state["redis"] == "ok":
            try:
                row.update(await _redis_figures(redis, keys, account, clock))
            except (RedisError, OSError) as exc:
                state["redis"] = f"unreachable ({type(exc).__name__}: {exc})"
        state["accounts"].append(row)
    return state


async def _redis_figures(redis: Redis, keys: LimiterKeys, account: Account, clock: Clock) -> dict[str, Any]:
    now = clock.time()
    day, _ = local_day(clock.now(), account.time_zone)
    window = keys.account_rate(account.name)
    used = int(await redis.zcount(window, f"({now - WINDOW}", "+inf"))
    factor = float(await redis.get(keys.adaptive(account.name)) or 1.0)
    limit = int(account.hourly_rate * factor) if account.hourly_rate else 0
    frees_at = None
    if limit and used >= limit:
        oldest = await redis.zrangebyscore(window, f"({now - WINDOW}", "+inf", start=0, num=1,
                                           withscores=True)
        frees_at = float(oldest[0][1]) + WINDOW if oldest else None
    daily = {}
    async for key in redis.scan_iter(match=keys.daily(account.name, "*", day), count=500):
        manager = _text(key).split(":")[-2]
        daily[manager] = int(await redis.get(key) or 0)
    competing: list[dict[str, Any]] = []
    for campaign, value in sorted((await redis.hgetall(keys.demand(account.name))).items()):
        priority, wants, until = [*_text(value).split("|"), "", "", ""][:3]
        with contextlib.suppress(ValueError):
            if float(until) > now and int(wants) > 0:
                competing.append({"campaign_id": _text(campaign), "priority": int(priority),
                                  "wants": int(wants)})
    competing.sort(key=lambda c: (-c["priority"], c["campaign_id"]))
    cap = await redis.get(keys.warmup_cap(account.name))
    quota = await redis.get(keys.quota(account.name))
    info = {_text(k): _text(v) for k, v in (await redis.hgetall(keys.quota_info(account.name))).items()}
    return {
        "hour": {"sent": used, "rate": account.hourly_rate, "factor": factor, "limit": limit,
                 "next_slot_at": _at(clock, frees_at)},
        "competing": competing,
        "day": {"date": day, "limit_per_manager": account.daily_limit_per_manager, "sent_by_manager": daily},
        "warmup": None if account.warmup is None else {
            "cap": int(cap) if cap else account.warmup.daily_caps[0],
            "sent_today": int(await redis.get(keys.warmup_daily(account.name, day)) or 0),
        },
        "quota": None if account.quota is None else {
            "remaining": None if quota is None else int(float(quota)),
            "synced_at": _synced_at(info.get("synced_at")),
            "provider": {k: v for k, v in info.items() if k != "synced_at"},
        },
    }


def _synced_at(value: str | None) -> str | None:
    """The quota sync's `synced_at` (ISO 8601 clock time, services/reconciler/quota_sync.py)."""
    if not value:
        return None
    try:
        return datetime.fromisoformat(value).isoformat(timespec="seconds")
    except ValueError:
        return None  # written by something else: shown as never synced, never a crash


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _at(clock: Clock, seconds: float | None) -> str | None:
    """Clock seconds as an ISO time (the limiter's scores are the pipeline clock's seconds)."""
    if seconds is None:
        return None
    return (clock.now() + timedelta(seconds=seconds - clock.time())).isoformat(timespec="seconds")


async def _postgres_figures(conn: AsyncConnection, account: str) -> dict[str, Any]:
    breaker = await fetch_dicts(
        conn,
        "SELECT consecutive, opened_at, probe_after, opened_at IS NOT NULL AND probe_after <= now()"
        " AS half_open FROM circuit_breakers WHERE scope = 'account' AND key = %s",
        (account,),
    )
    parked = await fetch_dicts(
        conn,
        "SELECT reason, count(*) AS waiting, min(due_at) AS next_due FROM parked_sends"
        " WHERE account = %s AND released_at IS NULL GROUP BY reason ORDER BY 3",
        (account,),
    )
    b = breaker[0] if breaker else {"consecutive": 0, "opened_at": None, "probe_after": None,
                                    "half_open": False}
    return {"breaker": {"open": b["opened_at"] is not None, **b}, "parked": parked}


def limiter_lines(state: dict[str, Any]) -> list[str]:
    """The state as text: Redis first, then one block per account."""
    lines = [f"redis          {state['redis']}"]
    if state["limiter_state"]:
        lines.append(f"limiter state  {state['limiter_state']}")
    for a in state["accounts"]:
        lines.append(f"account {a['account']}")
        if "hour" in a:
            h, d = a["hour"], a["day"]
            rate = f"{h['sent']}/{h['limit']} (rate {h['rate']} x factor {h['factor']:g})" if h["rate"] else (
                f"{h['sent']} (no hourly limit)")
            lines.append(f"  last hour    {rate}   next slot {when(h['next_slot_at'])}")
            if len(a["competing"]) > 1:
                lines.append("  sharing      " + ", ".join(
                    f"{c['campaign_id']} (priority {c['priority']}, wants {c['wants']})"
                    for c in a["competing"]))
            per = ", ".join(f"{m}={n}" for m, n in sorted(d["sent_by_manager"].items())) or "none yet"
            lines.append(f"  today {d['date']}  limit {d['limit_per_manager'] or 'none'} per manager: {per}")
            if a["warmup"]:
                lines.append(f"  warm-up      {a['warmup']['sent_today']}/{a['warmup']['cap']} today")
            q = a["quota"]
            remaining = "not synced yet" if q is None or q["remaining"] is None else q["remaining"]
            lines.append("  quota        no provider quota" if q is None else
                         f"  quota        {remaining} remaining, synced {when(q['synced_at'])}")
        b = a["breaker"]
        if not b["open"]:
            breaker_state = "closed"
        elif b.get("half_open"):
            breaker_state = f"HALF-OPEN since {when(b['probe_after'])} (one probe send at a time)"
        else:
            probe = f", probe after {when(b['probe_after'])}" if b.get("probe_after") else ""
            breaker_state = f"OPEN since {when(b['opened_at'])}{probe}"
        lines.append(f"  breaker      {breaker_state} ({b['consecutive']} consecutive failures)")
        lines += ["  " + line for line in table(
            [[p["reason"], str(p["waiting"]), when(p["next_due"])] for p in a["parked"]],
            ["parked for", "waiting", "next due"],
        )]
    return lines
