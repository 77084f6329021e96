"""`mailer ops …`: the on-call commands.

Contract: `ops_command(args, settings)` runs the subcommand that
`services.ops.arguments` parsed and returns the exit status: 0 when all
is well, 1 when the command found what it looks for (a stuck campaign,
Redis unreachable, an unknown campaign) or a pause/resume did not take
effect in time, 2 for bad input.
Every command prints text for a terminal, or JSON with `--json`.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
from confluent_kafka import KafkaException

from services.ops.audit_trail import audit_lines, audit_trail
from services.ops.campaign import campaign_lines, inspect_campaign
from services.ops.dead_letter_view import dead_letter_lines, newest_dead_letters
from services.ops.limiter_view import limiter_lines, limiter_state
from services.ops.render import emit
from services.ops.waiting import deferred, deferred_lines, stuck, stuck_lines
from services.pipeline.kafka_problems import BrokerUnavailable
from services.pipeline.settings import Settings
from services.reconciler.campaign_view import views_from_settings

PAUSE_WAIT = 30.0  # seconds `ops pause` / `ops resume` wait for the reconciler to apply them


def ops_command(args: argparse.Namespace, settings: Settings) -> int:
    """Run `mailer ops <what>`."""
    handler = _HANDLERS[args.ops_command]
    try:
        return handler(args, settings)
    except psycopg.OperationalError as exc:
        print(f"mailer ops: Postgres did not answer: {exc}".rstrip(), file=sys.stderr)
    except KafkaException as exc:
        print(f"mailer ops: Kafka did not answer: {exc}", file=sys.stderr)
    except BrokerUnavailable as exc:
        print(f"mailer ops: {exc}", file=sys.stderr)
    return 1


def _with_conn(settings: Settings, work: Callable[[psycopg.AsyncConnection], Awaitable[Any]]) -> Any:
    async def run() -> Any:
        async with await psycopg.AsyncConnection.connect(settings.database_url, autocommit=True) as conn:
            return await work(conn)

    return asyncio.run(run())


def _campaign(args: argparse.Namespace, settings: Settings) -> int:
    async def work(conn: psycopg.AsyncConnection) -> dict[str, Any] | None:
        views = views_from_settings(settings)
        try:
            return await inspect_campaign(conn, settings, views, args.campaign_id)
        finally:
            await views.redis.aclose()

    found = _with_conn(settings, work)
    if found is None:
        return _unknown(args.campaign_id)
    emit(found, campaign_lines(found), args.json)
    return 0


def _audit(args: argparse.Namespace, settings: Settings) -> int:
    rows = _with_conn(settings, lambda conn: audit_trail(conn, args.campaign_id, args.limit))
    if not rows:
        return _unknown(args.campaign_id)
    emit(rows, audit_lines(rows), args.json)
    return 0


def _stuck(args: argparse.Namespace, settings: Settings) -> int:
    rows = _with_conn(settings, lambda conn: stuck(conn, args.minutes))
    emit(rows, stuck_lines(rows, args.minutes), args.json)
    return 1 if rows else 0


def _deferred(args: argparse.Namespace, settings: Settings) -> int:
    rows = _with_conn(settings, deferred)
    emit(rows, deferred_lines(rows), args.json)
    return 0


def _limiter(args: argparse.Namespace, settings: Settings) -> int:
    from services.pipeline.accounts import load_accounts

    accounts = load_accounts(settings)
    if args.account and accounts.get(args.account) is None:
        print(f"mailer ops: no account {args.account!r}; configured: {', '.join(sorted(accounts.by_name))}",
              file=sys.stderr)
        return 2

    async def work(conn: psycopg.AsyncConnection) -> dict[str, Any]:
        views = views_from_settings(settings)
        try:
            return await limiter_state(conn, views.redis, views.keys, accounts, views.clock, args.account)
        finally:
            await views.redis.aclose()

    state = _with_conn(settings, work)
    emit(state, limiter_lines(state), args.json)
    return 0 if state["redis"] == "ok" else 1


def _lag(args: argparse.Namespace, settings: Settings) -> int:
    from dataclasses import asdict

    from services.pipeline.consumer_lag import lag_lines, measure

    groups = measure(settings)
    emit([asdict(g) for g in groups], lag_lines(groups), args.json)
    return 0


def _dead_letters(args: argparse.Namespace, settings: Settings) -> int:
    events = newest_dead_letters(settings, args.limit, args.payload)
    emit(events, dead_letter_lines(events), args.json)
    return 0


def _reconcile(args: argparse.Namespace, settings: Settings) -> int:
    from services.reconciler.reconcile_job import reconcile_command

    return asyncio.run(reconcile_command(args, settings))


def _lifecycle(args: argparse.Namespace, settings: Settings) -> int:
    from services.pipeline.publish import PublishError, lifecycle_message, publish

    want = {"pause": "paused", "resume": "sending"}[args.ops_command]
    before = _status(settings, args.campaign_id)
    if before is None:
        return _unknown(args.campaign_id)
    if before == want:
        print(f"{args.campaign_id} is already {before}")
        return 0
    if before in ("completed", "cancelled"):
        print(f"mailer ops: {args.campaign_id} is {before}; it cannot be {want} again", file=sys.stderr)
        return 1
    try:
        message = lifecycle_message(args.ops_command, args.campaign_id, args.actor, args.reason, "ops")
    except PublishError as exc:
        print(f"mailer ops: {exc}", file=sys.stderr)
        return 2
    asyncio.run(publish(settings, [message]))
    print(f"published campaign.{args.ops_command} for {args.campaign_id} (status was {before})")
    if args.no_wait:
        return 0
    deadline = time.monotonic() + PAUSE_WAIT
    status = before
    while time.monotonic() < deadline:
        status = _status(settings, args.campaign_id) or status
        if status == want:
            print(f"{args.campaign_id} is {status}")
            return 0
        time.sleep(0.5)
    print(f"mailer ops: {args.campaign_id} is still {status} after {PAUSE_WAIT:g}s; is the reconciler "
          "running? (mailer ops lag shows its group)", file=sys.stderr)
    return 1


def _breaker(args: argparse.Namespace, settings: Settings) -> int:
    """`ops breaker reset ACCOUNT`: close the account's circuit breaker (audited in breaker_audit);
    the reconciler then resumes the campaigns it paused."""
    from services.pipeline import circuit_breaker
    from services.pipeline.accounts import load_accounts

    accounts = load_accounts(settings)
    if accounts.get(args.account) is None:
        print(f"mailer ops: no account {args.account!r}; configured: {', '.join(sorted(accounts.by_name))}",
              file=sys.stderr)
        return 2
    reason = args.reason or "reset by hand"

    async def work(conn: psycopg.AsyncConnection) -> bool:
        async with conn.transaction():
            return await circuit_breaker.reset_account(conn, args.account, args.actor, reason)

    closed = _with_conn(settings, work)
    line = (f"closed the account breaker of {args.account} (audited: {args.actor}, {reason}); the "
            "campaigns it paused send again within a release interval" if closed else
            f"the account breaker of {args.account} is already closed; nothing changed")
    emit({"account": args.account, "closed": closed, "actor": args.actor, "reason": reason},
         [line], args.json)
    return 0


def _status(settings: Settings, campaign_id: str) -> str | None:
    with psycopg.connect(settings.database_url) as conn:
        row = conn.execute("SELECT status FROM campaigns WHERE campaign_id = %s", (campaign_id,)).fetchone()
    return None if row is None else str(row[0])


def _unknown(campaign_id: str) -> int:
    print(f"mailer ops: no campaign {campaign_id!r}", file=sys.stderr)
    return 1


_HANDLERS: dict[str, Callable[[argparse.Namespace, Settings], int]] = {
    "campaign": _campaign, "audit": _audit, "stuck": _stuck, "deferred": _deferred,
    "limiter": _limiter, "lag": _lag, "dead-letters": _dead_letters, "reconcile": _reconcile,
    "pause": _lifecycle, "resume": _lifecycle, "breaker": _breaker,
}
