"""What managers and ops see of one campaign, read from the projections.

Contract: `campaign_view(conn, id, failed_limit, views, lang)` returns the
JSON-ready dict the poll endpoint serves, or `None` for an unknown campaign:
status (`deferred` while a sending campaign waits for a limit), the reason as
a code and as a manager's text in `lang` (one catalogue, numbers and times
filled in), `next_run_at`, counts per state, declared sizes, the ETA from the
remaining recipients, the limits, the quota and the working windows (with a
deadline warning), failed recipients with their SMTP replies and the
outcome's reason (a template error says which), the refused chunks not received
since (a sending campaign waiting for one says so in `reason`), timestamps; a
`rejected` start's reason from `rejected_starts`.
Limiter figures come from Redis when it answers; without it the ETA assumes
an empty window and an unknown quota. `show_command` prints it for `mailer show`.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
import psycopg
from psycopg import AsyncConnection
from redis.asyncio import Redis
from redis.exceptions import RedisError

from services.pipeline.accounts import Account, Accounts, load_accounts
from services.pipeline.admission_texts import refusal_texts
from services.pipeline.circuit_breaker import breaker_state
from services.pipeline.clock import Clock, clock_from_settings
from services.pipeline.db import fetch_dicts
from services.pipeline.limiter_keys import LimiterKeys
from services.pipeline.settings import Settings
from services.pipeline.working_hours import local_day, next_open_all
from services.reconciler.deferrals import campaign_windows, deferral_numbers
from services.reconciler.eta import EtaInputs, deadline_warning
from services.reconciler.eta import estimate as estimate_eta
from services.reconciler.reason_texts import Language, defer_text, status_text
from services.reconciler.status_events import COUNT_FIELDS

_TIMESTAMPS = ("created_at", "started_at", "first_sent_at", "completed_at", "updated_at")


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class CampaignViews:
    """What a view needs besides Postgres: the accounts, the clock and the limiter's Redis."""

    accounts: Accounts
    clock: Clock
    redis: Redis
    keys: LimiterKeys


async def campaign_view(
    conn: AsyncConnection, campaign_id: str, failed_limit: int,
    views: CampaignViews | None = None, lang: Language = "ru",
) -> dict[str, Any] | None:
    """The poll endpoint's body for `campaign_id`, or `None` when it is unknown."""
    rows = await fetch_dicts(conn, "SELECT * FROM campaigns WHERE campaign_id = %s", (campaign_id,))
    if not rows:
        return None
    c = rows[0]
    failed = await fetch_dicts(
        conn,
        "SELECT r.email, r.send_id::text AS send_id, r.last_code, r.last_reply, r.error_class, r.updated_at,"
        " l.reason FROM recipients r LEFT JOIN LATERAL (SELECT reason FROM send_log s"
        " WHERE s.send_id = r.send_id AND s.outcome = 'failed' ORDER BY s.attempt DESC LIMIT 1) l ON true"
        " WHERE r.campaign_id = %s AND r.status = 'failed'"
        " ORDER BY r.updated_at, r.email LIMIT %s",
        (campaign_id, failed_limit),
    )
    refused_chunks = await fetch_dicts(
        conn,
        "SELECT chunk_index, reason_code, reason, reason_ru, refused_at FROM refused_chunks r"
        " WHERE campaign_id = %s AND NOT EXISTS (SELECT 1 FROM campaign_chunks k"
        " WHERE k.campaign_id = r.campaign_id AND k.chunk_index = r.chunk_index)"
        " ORDER BY chunk_index LIMIT 100",
        (campaign_id,),
    )
    status = "deferred" if c["status"] == "sending" and c["defer_reason"] else c["status"]
    if views is not None and status in ("sending", "deferred"):
        c["ahead"] = await _sends_ahead(conn, c)
    schedule = await _schedule(c, status, views, lang) if views is not None else {}
    if status in ("needs_confirmation", "refused"):
        admitted = await fetch_dicts(
            conn, "SELECT reason, reason_ru, reason_code FROM command_admissions WHERE admission_key = %s",
            (f"start:{campaign_id}",),
        )
        if admitted:
            text = admitted[0]["reason_ru" if lang == "ru" else "reason"]
            schedule["reason"] = status_text(status, lang, reason=text)
            schedule["reason_code"] = admitted[0]["reason_code"]
    if status == "rejected":  # a start that could not be read (issue 14, defect 7)
        rejected = await fetch_dicts(
            conn, "SELECT reason, reason_ru, reason_code FROM rejected_starts WHERE campaign_id = %s",
            (campaign_id,),
        )
        if rejected:
            text = rejected[0]["reason_ru" if lang == "ru" else "reason"]
            schedule["reason"] = status_text(status, lang, reason=text)
            schedule["reason_code"] = rejected[0]["reason_code"]
    waiting = [r for r in refused_chunks if r["chunk_index"] < c["chunks_declared"]]
    if waiting and c["status"] in ("sending", "needs_confirmation"):  # it waits for a refused chunk
        first = waiting[0]
        schedule["reason"] = refusal_texts(
            "waiting_for_refused_chunk", chunk=first["chunk_index"], chunks=c["chunks_declared"],
            reason=first["reason_ru" if lang == "ru" else "reason"],
        )[1 if lang == "ru" else 0]
    return {
        "campaign_id": c["campaign_id"],
        "name": c["name"],
        "manager_id": c["manager_id"],
        "account": c["account"],
        "priority": c["priority"],
        "status": status,
        "status_reason": c["status_reason"],
        "defer_reason": c["defer_reason"] or None,
        "deferred_until": _iso(c["deferred_until"]),
        **schedule,
        "counts": {k: c[k] for k in COUNT_FIELDS},
        "declared": {
            "recipients": c["total_declared"],
            "chunks": c["chunks_declared"],
            "chunks_received": c["chunks_received"],
        },
        "failed_recipients": [
            {
                "email": f["email"],
                "send_id": f["send_id"],
                "smtp_code": f["last_code"],
                "smtp_reply": f["last_reply"],
                "error_class": f["error_class"],
                "reason": f["reason"],
                "at": _iso(f["updated_at"]),
            }
            for f in failed
        ],
        "refused_chunks": [
            {
                "chunk_index": r["chunk_index"],
                "reason_code": r["reason_code"],
                "reason": r["reason_ru" if lang == "ru" else "reason"],
                "waiting": r["chunk_index"] < c["chunks_declared"],
                "at": _iso(r["refused_at"]),
            }
            for r in refused_chunks
        ],
        "failed_recipients_truncated": c["failed"] > len(failed),
        "warnings": [{"code": w["code"], "text": w["text_ru" if lang == "ru" else "text"],
                      **({"starts_at": w["starts_at"]} if "starts_at" in w else {})}
                     for w in c["warnings"]],
        "circuit_breaker": await breaker_state(conn, campaign_id),
        **{k: _iso(c[k]) for k in _TIMESTAMPS},
    }


async def _schedule(
    c: dict[str, Any], status: str, views: CampaignViews, lang: Language
) -> dict[str, Any]:
    """reason text, next_run_at and ETA of one campaign row."""
    now = views.clock.now()
    account = views.accounts.get(c["account"])
    if account is None:
        return {"reason": c["status_reason"], "next_run_at": None, "eta": None}
    windows = campaign_windows(account, c["working_hours"])
    live = await _limiter_figures(c["manager_id"], account, views, now)
    numbers = deferral_numbers(account, c["defer_reason"], c["rate_per_hour"], windows, lang, now,
                               sent_today=live["sent_today"])
    if status == "deferred":
        reason = defer_text(c["defer_reason"], lang, until=c["deferred_until"],
                            time_zone=account.time_zone, now=now, numbers=numbers)
        next_run: datetime | None = c["deferred_until"]
    else:
        reason = status_text(status, lang, reason=c["status_reason"])
        next_run = next_open_all(windows, now) if status == "sending" else None
    eta = None
    deadline_late = False
    if status in ("sending", "deferred"):
        estimate = estimate_eta(EtaInputs(
            now=now, remaining=c["pending"], hourly_rate=account.hourly_rate,
            campaign_rate=c["rate_per_hour"], daily_limit=account.daily_limit_per_manager,
            sent_today=live["sent_today"], sent_last_hour=live["sent_last_hour"],
            window_sends=live["window_sends"], ahead=c.get("ahead", 0),
            quota=live["quota"], windows=windows, time_zone=account.time_zone,
            not_before=c["deferred_until"],
        ))
        eta = estimate.to_json()
        deadline_late = deadline_warning(estimate, c["deadline"])
    return {
        "reason": reason,
        "next_run_at": _iso(next_run),
        "eta": eta,
        "deadline": _iso(c["deadline"]),
        "deadline_warning": deadline_late,
    }


async def _sends_ahead(conn: AsyncConnection, c: dict[str, Any]) -> int:
    """Sends of other sending campaigns on the account that go before this one's last (the
    limiter's admission rule): all of a higher priority's, and of each equal priority as many
    as this one still sends (the fair share), at most its own remaining."""
    rows = await fetch_dicts(
        conn,
        "SELECT priority, pending FROM campaigns WHERE account = %s AND campaign_id <> %s"
        " AND status = 'sending' AND pending > 0 AND priority >= %s",
        (c["account"], c["campaign_id"], c["priority"]),
    )
    return sum(r["pending"] if r["priority"] > c["priority"] else min(r["pending"], c["pending"])
               for r in rows)


async def _limiter_figures(
    manager_id: str, account: Account, views: CampaignViews, now: datetime
) -> dict[str, Any]:
    """The manager's sends today, the account's sends this hour and its quota, from Redis."""
    day, _ = local_day(now, account.time_zone)
    figures: dict[str, Any] = {"sent_today": 0, "sent_last_hour": 0, "window_sends": [], "quota": None}
    try:
        daily = await views.redis.get(views.keys.daily(account.name, manager_id, day))
        in_window = await views.redis.zrangebyscore(  # each token's time: when it frees (the ETA)
            views.keys.account_rate(account.name), f"({now.timestamp() - 3600}", "+inf",
            withscores=True,
        )
        quota = await views.redis.get(views.keys.quota(account.name))
    except (RedisError, OSError):
        return figures
    figures["sent_today"] = int(daily or 0)
    figures["sent_last_hour"] = len(in_window)
    figures["window_sends"] = [datetime.fromtimestamp(float(entry[1]), UTC) for entry in in_window]
    if account.quota is not None and quota is not None:
        figures["quota"] = int(float(quota))  # the limiter decrements with INCRBYFLOAT
    return figures


def views_from_settings(settings: Settings) -> CampaignViews:
    """CampaignViews for a CLI process (its own Redis client; close `.redis` after)."""
    return CampaignViews(
        load_accounts(settings), clock_from_settings(settings),
        Redis.from_url(settings.redis_url, socket_timeout=2, socket_connect_timeout=2),
        LimiterKeys(settings.redis_key_prefix),
    )


def show_command(args: argparse.Namespace, settings: Settings) -> int:
    """`mailer show ID`: print one campaign (exit 1 when it is unknown)."""

    async def load() -> dict[str, Any] | None:
        views = views_from_settings(settings)
        try:
            async with await psycopg.AsyncConnection.connect(settings.database_url) as conn:
                return await campaign_view(conn, args.campaign_id, settings.failed_recipients_limit,
                                           views, "en")
        finally:
            await views.redis.aclose()

    view = asyncio.run(load())
    if view is None:
        print(f"mailer: no campaign {args.campaign_id!r}", file=sys.stderr)
        return 1
    if args.json:
        print(orjson.dumps(view, option=orjson.OPT_INDENT_2).decode())
        return 0
    counts = view["counts"]
    print(f"campaign  {view['campaign_id']}  ({view['name']})")
    print(f"status    {view['status']}  {view['reason']}")
    if view["defer_reason"]:
        print(f"deferred  {view['defer_reason']} until {view['deferred_until']}")
    print(f"next run  {view['next_run_at']}   eta {(view['eta'] or {}).get('finish_at')}")
    print("counts    " + "  ".join(f"{k}={counts[k]}" for k in COUNT_FIELDS))
    print(f"started   {view['started_at']}   completed {view['completed_at']}")
    for r in view["refused_chunks"]:
        print(f"refused   chunk {r['chunk_index']}{' (waited for)' if r['waiting'] else ''}: {r['reason']}")
    for f in view["failed_recipients"]:
        print(f"failed    {f['email']}  {f['smtp_code']} {f['smtp_reply']}"
              + (f"  ({f['reason']})" if f["reason"] else ""))
    return 0
