"""The reconciler service: commands, outcomes and suppressions in, Postgres projections out.

Contract: three agents read `mailer.campaign-commands`, `mailer.send-outcomes`
and `mailer.suppressions` in batches (`settings.reconciler_batch_size` /
`_batch_seconds`). Each batch is one transaction: projections, counts,
completions, audit rows and status events (outbox) commit together; the
outbox is published after the commit; faust acknowledges the batch's offsets
only after all of that (faust's `take` acks a batch when the loop asks for the
next one). Outcome batches also park deferred commands (`deferrals.park`),
pause the campaigns an open circuit breaker covers (the senders count),
add hard bounces to the suppression list and bring the campaigns' queue state
up to date. A pause or cancel waits for the campaign's sends in flight.
Tasks beside the agents: the scheduler (every `MAILER_RELEASE_INTERVAL` s:
restore the limiter's Redis state if lost, release due parked sends, expire
claims that never finished), the consumer-lag export (every 15 s, for
/metrics), the reconcile job (every 5 minutes), the provider
quota sync and the warm-up steps.
Invalid messages go to the dead-letter topic; an invalid start or chunk whose
campaign id can be read is answered as well (`projections.REJECTED`: a
`rejected` start, a refused chunk). Postgres or broker outages are
waited out and retried. The poll endpoint is served on `settings.http_port`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import faust
from aiohttp import web

from services.pipeline import faust_app
from services.pipeline.accounts import load_accounts
from services.pipeline.admission import Admissions, rejected_command
from services.pipeline.clock import clock_from_settings
from services.pipeline.consumer_lag import ProgressWatch, export, measure
from services.pipeline.contract import Message
from services.pipeline.db import open_pool
from services.pipeline.dead_letters import DeadLetters
from services.pipeline.ingress import accept, reject
from services.pipeline.limiter_keys import LimiterKeys
from services.pipeline.metrics import BREAKERS_OPEN, CAMPAIGNS, RECIPIENTS_PENDING, STALLED_SECONDS
from services.pipeline.producer import AsyncProducer
from services.pipeline.retry import retry_transient
from services.pipeline.settings import Settings
from services.pipeline.topics import Topic, topic_name
from services.reconciler import deferrals, projections, status_events, suppressions
from services.reconciler.campaign_view import CampaignViews
from services.reconciler.http_api import start_server
from services.reconciler.limiter_state import refresh_demand, restore_if_lost
from services.reconciler.quota_sync import QuotaSync
from services.reconciler.reconcile_job import reconcile
from services.reconciler.release import Releaser
from services.reconciler.resend import resend
from services.reconciler.stale_claims import expire_claims
from services.reconciler.warmup import advance_warmup
from services.sender.rate_limit import Limiter

log = logging.getLogger(__name__)

SERVICE = "reconciler"
#: Wall seconds between two measurements of the consumer groups' lag (for /metrics).
LAG_INTERVAL = 15.0
#: Wall seconds between two runs of the reconcile job (it scans every recipient).
RECONCILE_INTERVAL = 300.0
#: Wall seconds between two warm-up steps (a step changes at most once a local day).
WARMUP_INTERVAL = 60.0


class Reconciler:
    """Owns the reconciler's pool, producer and the write lock of its batches."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.status_topic = topic_name(Topic.CAMPAIGN_STATUS, settings)
        self.outcomes_topic = topic_name(Topic.SEND_OUTCOMES, settings)
        self.send_topic = topic_name(Topic.SEND_COMMANDS, settings)
        self._write_lock = asyncio.Lock()  # one batch transaction at a time: no deadlocks
        self._started = asyncio.Lock()
        self.stopping = asyncio.Event()  # set first on shutdown: the background loops end
        self.pool: Any = None
        self.producer: AsyncProducer | None = None
        self.dead_letters: DeadLetters | None = None
        self.runner: web.AppRunner | None = None
        self.accounts = load_accounts(settings)
        self.clock = clock_from_settings(settings)
        self.limiter: Limiter | None = None
        self.releaser: Releaser | None = None
        self.quota_sync: QuotaSync | None = None
        self.admissions: Admissions | None = None

    async def start(self) -> None:
        """Open the pool, the producer and the poll endpoint (once)."""
        async with self._started:
            if self.pool is None:
                self.pool = await open_pool(self.settings, max_size=6, name=SERVICE)
                self.producer = AsyncProducer(self.settings, client_id=self.settings.app_id(SERVICE))
                self.dead_letters = DeadLetters(self.producer, self.settings, SERVICE)
                self.limiter = Limiter.from_settings(self.settings)
                self.admissions = Admissions(self.settings, self.accounts, self.clock, self.limiter.redis)
                self.releaser = Releaser(
                    self.pool, self.producer, self.limiter, self.accounts, self.clock,
                    topic_name(Topic.SEND_COMMANDS, self.settings), self.status_topic,
                )
                sources = [a.quota for a in self.accounts.by_name.values() if a.quota is not None]
                self.quota_sync = QuotaSync(
                    sources, self.limiter.redis, LimiterKeys(self.settings.redis_key_prefix), self.clock
                )
                self.runner = await start_server(self.pool, self.settings, self.views())
                log.info("poll endpoint on %s:%s", self.settings.http_host, self.settings.http_port)
                await status_events.publish_outbox(self.pool, self.producer)

    def views(self) -> CampaignViews:
        """What the poll endpoint needs besides Postgres: accounts, clock, limiter state."""
        assert self.limiter is not None
        return CampaignViews(self.accounts, self.clock, self.limiter.redis,
                             LimiterKeys(self.settings.redis_key_prefix))

    async def schedule(self) -> None:
        """One pass of the scheduler: restore the limiter if Redis lost it, release what is
        due, expire claims that never finished, update the queue gauges, publish the events
        that produced."""
        await self.start()
        assert self.releaser is not None and self.limiter is not None and self.producer is not None
        await restore_if_lost(self.pool, self.limiter, self.accounts, self.clock)
        await refresh_demand(self.pool, self.limiter, self.accounts, self.clock)
        async with self._write_lock:
            await self.releaser.release_due()
            async with self.pool.connection() as conn, conn.transaction():
                expired = await expire_claims(conn, self.settings, self.outcomes_topic)
                await queue_gauges(conn)
        if expired:
            log.warning("%d claims never finished within %gs: their sends are unknown",
                        expired, self.settings.claim_timeout)
        await status_events.publish_outbox(self.pool, self.producer)

    async def reconcile(self) -> None:
        """Check the invariants, repair what is safe, log what is not (R26)."""
        await self.start()
        assert self.producer is not None
        async with self._write_lock, self.pool.connection() as conn, conn.transaction():
            report = await reconcile(conn, self.status_topic, accounts=self.accounts)
        for finding in report.unrepaired:
            log.warning("reconcile: %s %s: %s", finding.check, finding.campaign_id or "-", finding.detail)
        if report.findings:
            log.info("reconcile: %d findings, %d repaired", len(report.findings),
                     len(report.findings) - len(report.unrepaired))
        await status_events.publish_outbox(self.pool, self.producer)

    async def warm_up(self) -> None:
        """Step the warm-up schedules and write the caps to Redis."""
        await self.start()
        assert self.limiter is not None
        if not any(a.warmup for a in self.accounts.by_name.values()):
            return
        async with self.pool.connection() as conn, conn.transaction():
            await advance_warmup(conn, self.limiter.redis, LimiterKeys(self.settings.redis_key_prefix),
                                 self.accounts, self.clock.now())

    async def stop(self) -> None:
        """End the background loops, stop serving, flush and close."""
        self.stopping.set()
        async with self._write_lock:  # let a release pass or batch in progress finish
            pass
        if self.runner is not None:
            await self.runner.cleanup()
        if self.limiter is not None:
            await self.limiter.close()
        if self.producer is not None:
            await self.producer.close()
        if self.pool is not None:
            await self.pool.close()

    async def accept_batch(self, events: list[Any], topic: Topic) -> list[tuple[Any, Message]]:
        """(event, message) for the valid events; the others are dead-lettered, and a start or
        chunk among them whose campaign id can be read is answered too (its `REJECTED` entry)."""
        assert self.dead_letters is not None
        accepted = []
        for event in events:
            message = await accept(event, topic, self.dead_letters, self.accounts.command_problem)
            if message is not None:
                accepted.append((event, message))
            elif topic is Topic.CAMPAIGN_COMMANDS:
                rejected = rejected_command(event.value, self.accounts.command_problem)
                if rejected is not None:
                    accepted.append((event, projections.rejection_message(rejected)))
        return accepted

    async def write_commands(self, batch: list[tuple[Any, Message]]) -> None:
        """Apply one batch of campaign commands."""
        await self._write("campaign commands", batch, self._commands_tx)

    async def write_outcomes(self, batch: list[tuple[Any, Message]]) -> None:
        """Apply one batch of send outcomes."""
        await self._write("send outcomes", batch, self._outcomes_tx)

    async def write_suppressions(self, batch: list[tuple[Any, Message]]) -> None:
        """Apply one batch of suppression-list changes (R32)."""
        await self._write("suppressions", batch, self._suppressions_tx)

    async def _suppressions_tx(self, conn: Any, messages: list[Message]) -> None:
        await suppressions.apply_suppressions(conn, messages)

    async def _commands_tx(self, conn: Any, commands: list[Message]) -> None:
        assert self.admissions is not None
        changes, touched = await projections.apply_commands(
            conn, commands, self.accounts, self.admissions, self.settings.max_campaign_recipients,
        )
        changes += await projections.admit_test_emails(conn, commands, self.admissions)
        for command in commands:
            if command["kind"] == "campaign.resend":
                refused = await projections.forbidden_change(conn, command)
                changes += [refused] if refused is not None else await resend(conn, command, self.send_topic)
        changes += await projections.refresh_campaigns(conn, touched)
        changes += await deferrals.refresh_queue_state(conn, touched, self.accounts, self.clock.now())
        await status_events.record(conn, changes, self.status_topic, recheck=touched)

    async def _outcomes_tx(self, conn: Any, outcomes: list[Message]) -> None:
        touched = await projections.apply_outcomes(conn, outcomes)
        touched |= await deferrals.park(conn, outcomes)
        await suppressions.suppress_hard_bounces(conn, outcomes)
        changes = await projections.pause_open_breakers(conn)
        touched |= {c.campaign_id for c in changes}
        # apply_outcomes moved the counts by what it changed: no recount (a scan per campaign)
        changes += await projections.refresh_campaigns(conn, touched, recount=False)
        changes += await deferrals.refresh_queue_state(conn, touched, self.accounts, self.clock.now())
        # outcomes of sends under way when a campaign paused, was cancelled or completed: corrected
        await status_events.record(conn, changes, self.status_topic, recheck=touched)

    async def _write(self, what: str, batch: list[tuple[Any, Message]], tx: Any) -> None:
        """Write a batch in one transaction; if it fails for a reason other than an
        outage, write its messages one by one and dead-letter those that fail."""
        if not batch:
            return
        try:
            await self._write_messages(what, [m for _, m in batch], tx)
        except Exception:  # outages are retried inside; this is a message that cannot apply
            log.exception("batch of %d %s failed; writing them one by one", len(batch), what)
            for event, message in batch:
                try:
                    await self._write_messages(what, [message], tx)
                except Exception as exc:
                    assert self.dead_letters is not None
                    await reject(event, self.dead_letters,
                                 f"reconciler could not apply it: {type(exc).__name__}: {exc}",
                                 error_type=getattr(exc, "error_type", "projection_error"),
                                 campaign_id=message.get("campaign_id"))

    async def _write_messages(self, what: str, messages: list[Message], tx: Any) -> None:
        async def work() -> None:
            async with self._write_lock:
                async with self.pool.connection() as conn, conn.transaction():
                    await tx(conn, messages)
                assert self.producer is not None
                await status_events.publish_outbox(self.pool, self.producer)

        await retry_transient(work, what=f"writing {len(messages)} {what}")


async def queue_gauges(conn: Any) -> None:
    """Queue depth and breaker state for /metrics: campaigns by state, recipients waiting,
    the longest a sending campaign has gone without progress."""
    cur = await conn.execute(
        "SELECT CASE WHEN status = 'sending' AND defer_reason <> '' THEN 'deferred' ELSE status END,"
        " count(*), coalesce(sum(pending) FILTER (WHERE status = 'sending'), 0)"
        " FROM campaigns GROUP BY 1"
    )
    pending = 0
    seen = {"sending": 0, "deferred": 0, "paused": 0, "completed": 0, "cancelled": 0}
    for state, count, waiting in await cur.fetchall():
        seen[state] = count
        pending += int(waiting)
    for state, count in seen.items():
        CAMPAIGNS.labels(state).set(count)
    RECIPIENTS_PENDING.set(pending)
    cur = await conn.execute(
        "SELECT scope, count(*) FILTER (WHERE opened_at IS NOT NULL) FROM circuit_breakers GROUP BY 1"
    )
    opened = dict(await cur.fetchall())
    for scope in ("campaign", "account"):
        BREAKERS_OPEN.labels(scope).set(opened.get(scope, 0))
    cur = await conn.execute(
        "SELECT coalesce(max(extract(epoch FROM now() - greatest(updated_at, first_sent_at))), 0)"
        " FROM campaigns WHERE status = 'sending' AND pending > 0"
        " AND NOT (defer_reason <> '' AND coalesce(deferred_until > now(), true))"  # null: a quota
    )
    row = await cur.fetchone()
    STALLED_SECONDS.set(max(float(row[0]), 0.0) if row else 0.0)


async def every(
    interval: float, work: Callable[[], Awaitable[None]], what: str, stop: asyncio.Event
) -> None:
    """Run `work` every `interval` wall seconds until `stop` is set; an error is logged, not fatal."""
    while not stop.is_set():
        try:
            await work()
        except asyncio.CancelledError:
            raise
        except Exception:
            if stop.is_set():
                return  # shutting down: the pool or producer it used is closed
            log.exception("%s failed; trying again in %.1fs", what, interval)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)


#: Most campaign commands (chunks of up to MAILER_MAX_CHUNK_RECIPIENTS recipients) in one
#: transaction: all 100 chunks of a 100,000-recipient campaign in one batch doubled the
#: reconciler's peak memory (issue 7).
COMMANDS_PER_BATCH = 10


def create_reconciler_app(settings: Settings) -> faust.App:
    """The reconciler's faust app: two batch agents and the poll endpoint."""
    app = faust_app.create_app(SERVICE, settings)
    reconciler = Reconciler(settings)
    batch, within = settings.reconciler_batch_size, settings.reconciler_batch_seconds

    def batch_agent(topic: Topic, write: Callable[[list[tuple[Any, Message]]], Awaitable[None]],
                    name: str, size: int = batch) -> None:
        async def project(stream: Any) -> None:
            await retry_transient(reconciler.start, what="reconciler start-up")
            async for events in stream.take_events(size, within=within):
                await write(await reconciler.accept_batch(list(events), topic))

        app.agent(faust_app.faust_topic(app, topic, settings), name=name)(project)

    # a command may be a chunk of up to MAILER_MAX_CHUNK_RECIPIENTS recipients: a few per batch
    # keep the reconciler's memory flat however large the campaign (issue 7)
    batch_agent(Topic.CAMPAIGN_COMMANDS, reconciler.write_commands, "project-campaign-commands",
                min(batch, COMMANDS_PER_BATCH))
    batch_agent(Topic.SEND_OUTCOMES, reconciler.write_outcomes, "project-send-outcomes")
    batch_agent(Topic.SUPPRESSIONS, reconciler.write_suppressions, "apply-suppressions")

    @app.task
    async def serve_poll_endpoint() -> None:
        await retry_transient(reconciler.start, what="reconciler start-up")

    @app.task
    async def release_parked_sends() -> None:
        await every(settings.release_interval, reconciler.schedule, "releasing parked sends",
                    reconciler.stopping)

    @app.task
    async def export_consumer_lag() -> None:
        watch = ProgressWatch()
        said: set[str] = set()  # the stalled groups already logged, said once per stall

        async def measure_lag() -> None:
            lags = await asyncio.get_running_loop().run_in_executor(None, measure, settings)
            stalled = watch.observe(lags)
            for lag in lags:
                if lag.group in stalled and lag.group not in said:
                    log.warning("consumer group stalled", extra={
                        "event": "consumer_group.stalled", "group": lag.group, "reason": lag.stalled})
            said.intersection_update(stalled)
            said.update(stalled)
            export(lags, stalled)

        await every(LAG_INTERVAL, measure_lag, "consumer lag", reconciler.stopping)

    @app.task
    async def check_invariants() -> None:
        await every(RECONCILE_INTERVAL, reconciler.reconcile, "reconcile", reconciler.stopping)

    @app.task
    async def step_warm_up() -> None:
        await every(WARMUP_INTERVAL, reconciler.warm_up, "warm-up step", reconciler.stopping)

    @app.task
    async def sync_quotas() -> None:
        await retry_transient(reconciler.start, what="reconciler start-up")
        assert reconciler.quota_sync is not None
        await reconciler.quota_sync.run(reconciler.stopping)

    faust_app.close_on_shutdown(app, reconciler.stop)
    return app


def run(settings: Settings) -> None:
    """Run the reconciler until SIGTERM/SIGINT."""
    faust_app.run(create_reconciler_app(settings), settings, SERVICE)
