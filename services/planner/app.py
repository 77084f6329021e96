"""The planner service: campaign commands in, one send command per recipient out.

Contract: consumes `mailer.campaign-commands`; a `campaign.start` is admitted
(`services/pipeline/admission.py`, the decision the reconciler reads too) and
recorded (its definition, never its recipients); each `campaign.recipients`
chunk and each admitted `campaign.test_email` is planned by `plan_chunk.plan`.
The chunks of a campaign that needs confirmation are held in Postgres and
planned, in order, when a permitted `campaign.confirm` arrives. Other
lifecycle commands belong to the reconciler and are skipped here. An invalid
command, a start reusing the id of another campaign (`forbidden` for an actor
who may not act on it, `campaign_id_reused` for other content), a chunk whose
campaign was never started or was refused, and a chunk `chunks.refusal` refuses
(an undeclared index, other recipients under a received index, recipients above
the declared total or MAILER_MAX_RECIPIENTS) go to the dead-letter topic with
the reason (the reconciler announces them); the planner goes on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import faust
from redis.asyncio import Redis

from services.pipeline import faust_app
from services.pipeline.accounts import load_accounts
from services.pipeline.admission import Admissions, permitted
from services.pipeline.clock import clock_from_settings
from services.pipeline.contract import Message
from services.pipeline.db import open_pool
from services.pipeline.dead_letters import DeadLetters
from services.pipeline.ids import test_send_id
from services.pipeline.ingress import accept, reject
from services.pipeline.limiter_demand import announce_demand
from services.pipeline.producer import AsyncProducer
from services.pipeline.retry import retry_transient
from services.pipeline.settings import Settings
from services.pipeline.topics import Topic, topic_name
from services.planner import chunks
from services.planner.campaign_store import CampaignStore
from services.planner.plan_chunk import plan, unique_recipients

log = logging.getLogger(__name__)

SERVICE = "planner"


@dataclass
class PlannerParts:
    """What the planner works with, opened once at start-up."""

    store: CampaignStore
    producer: AsyncProducer
    dead_letters: DeadLetters
    send_topic: str
    pool: Any
    admissions: Admissions


#: Test emails go before campaign sends competing for the same account (R5, R6).
TEST_EMAIL_PRIORITY = 9


class Planner:
    """Handles one campaign command at a time."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.accounts = load_accounts(settings)
        self.parts: PlannerParts | None = None

    async def start(self) -> PlannerParts:
        """Open the pool and the producer (once)."""
        if self.parts is None:
            pool = await open_pool(self.settings, name=SERVICE)
            producer = AsyncProducer(self.settings, client_id=self.settings.app_id(SERVICE))
            redis = Redis.from_url(self.settings.redis_url, socket_timeout=2.0, socket_connect_timeout=2.0)
            self.parts = PlannerParts(
                store=CampaignStore(pool),
                producer=producer,
                dead_letters=DeadLetters(producer, self.settings, SERVICE),
                send_topic=topic_name(Topic.SEND_COMMANDS, self.settings),
                pool=pool,
                admissions=Admissions(self.settings, self.accounts, clock_from_settings(self.settings),
                                      redis),
            )
        return self.parts

    async def stop(self) -> None:
        """Flush the producer and close the pool."""
        if self.parts is not None:
            await self.parts.producer.close()
            await self.parts.pool.close()
            await self.parts.admissions.redis.aclose()
            self.parts = None

    async def handle(self, event: Any) -> None:
        """Plan one campaign command, or dead-letter it; never raises for one bad command."""
        parts = await retry_transient(self.start, what="planner start-up")
        try:
            await retry_transient(lambda: self._handle(event, parts), what="planning a command")
        except Exception as exc:  # a bug must not stop the planner nor lose the command
            log.exception("planning failed; dead-lettering the command")
            await reject(event, parts.dead_letters, f"planner error: {type(exc).__name__}: {exc}",
                         error_type="internal_error")

    async def _handle(self, event: Any, parts: PlannerParts) -> None:
        message = await accept(event, Topic.CAMPAIGN_COMMANDS, parts.dead_letters,
                               self.accounts.command_problem)
        if message is None:
            return
        kind = message["kind"]
        if kind == "campaign.start":
            message["account"] = self.accounts.route(message.get("account"), message["manager_id"])
            async with parts.pool.connection() as conn:
                admitted = await parts.admissions.start(conn, message)
            if admitted.command_only:  # reuses the id of a campaign it may not change
                await reject(event, parts.dead_letters, admitted.reason, error_type=admitted.code,
                             campaign_id=message["campaign_id"])
                return
            await parts.store.save(message)
            log.info("campaign %s: start recorded (%s)", message["campaign_id"], admitted.decision)
        elif kind == "campaign.recipients":
            await self._plan_chunk(event, message, parts)
        elif kind == "campaign.test_email":
            async with parts.pool.connection() as conn:
                admitted = await parts.admissions.test_email(conn, message)
            if admitted.goes_ahead:
                await self._plan_test_email(message, parts)
        elif kind == "campaign.confirm":
            await self._confirm(message, parts)

    async def _plan_chunk(self, event: Any, chunk: Message, parts: PlannerParts) -> None:
        campaign_id = chunk["campaign_id"]
        recipients = chunk["recipients"]
        if len(recipients) > self.settings.max_chunk_recipients:
            await reject(
                event, parts.dead_letters,
                f"chunk {chunk['chunk_index']} holds {len(recipients)} recipients; "
                f"at most {self.settings.max_chunk_recipients} are allowed per chunk",
                error_type="chunk_too_large", campaign_id=campaign_id,
            )
            return
        definition = await parts.store.load(campaign_id)
        if definition is None:
            await reject(
                event, parts.dead_letters,
                f"chunk {chunk['chunk_index']} of campaign {campaign_id!r} arrived but the "
                "campaign was never started: publish campaign.start first (same key)",
                error_type="unknown_campaign", campaign_id=campaign_id,
            )
            return
        decision = await chunks.admission(parts.pool, campaign_id)
        if decision in ("refused", "forbidden"):
            await reject(
                event, parts.dead_letters,
                f"chunk {chunk['chunk_index']} of campaign {campaign_id!r}: the campaign was {decision} "
                "at start (its status event says why); its recipients are not sent",
                error_type="campaign_refused", campaign_id=campaign_id,
            )
            return
        held = decision == "needs_confirmation"
        refused = await chunks.record(parts.pool, chunk, definition, held=held,
                                      limit=self.settings.max_campaign_recipients)
        if refused is not None:
            await reject(event, parts.dead_letters, refused.reason, error_type=refused.code,
                         campaign_id=campaign_id)
            return
        if held:
            log.info("campaign %s: chunk %s held until the campaign is confirmed",
                     campaign_id, chunk["chunk_index"])
            return
        await self._plan_recipients(parts, definition, chunk)

    async def _plan_recipients(self, parts: PlannerParts, definition: dict[str, Any], chunk: Message) -> None:
        campaign_id, recipients = chunk["campaign_id"], chunk["recipients"]
        await announce_demand(parts.admissions, definition, len(recipients))  # before its first send
        produced = await plan(
            parts.pool, parts.producer, parts.send_topic, definition,
            unique_recipients(campaign_id, recipients),
        )
        log.info(
            "campaign %s: chunk %s planned, %d send commands produced (%d recipients)",
            campaign_id, chunk["chunk_index"], produced, len(recipients),
        )

    async def _confirm(self, command: Message, parts: PlannerParts) -> None:
        """Plan the held chunks of a permitted confirm, in order (a replay finds none held)."""
        campaign_id = command["campaign_id"]
        definition = await parts.store.load(campaign_id)
        if definition is None or not permitted(command["actor_id"], command["actor_role"],
                                               definition["manager_id"]):
            return  # unknown, or forbidden: the reconciler announces it
        await chunks.confirm(parts.pool, campaign_id)
        for chunk in await chunks.held(parts.pool, campaign_id):
            await self._plan_recipients(parts, definition, chunk)
            await chunks.release(parts.pool, campaign_id, chunk["chunk_index"])

    async def _plan_test_email(self, command: Message, parts: PlannerParts) -> None:
        definition: dict[str, Any] = {
            k: command[k]
            for k in ("campaign_id", "manager_id", "account", "from", "reply_to", "template",
                      "variables", "unsubscribe_url", "occurred_at")
            if k in command
        }
        definition["account"] = self.accounts.route(command.get("account"), command["manager_id"])
        definition["priority"] = TEST_EMAIL_PRIORITY  # a manager waits for it; limits still apply
        sid = test_send_id(command["campaign_id"], command["message_id"])
        await plan(
            parts.pool, parts.producer, parts.send_topic, definition,
            {sid: command["to"]}, is_test=True,
        )


def create_planner_app(settings: Settings) -> faust.App:
    """The planner's faust app and its one agent."""
    app = faust_app.create_app(SERVICE, settings)
    commands = faust_app.faust_topic(app, Topic.CAMPAIGN_COMMANDS, settings)
    planner = Planner(settings)

    @app.agent(commands, name="plan-campaign-commands")
    async def plan_commands(stream: faust.StreamT) -> None:
        async for event in stream.events():
            await planner.handle(event)

    faust_app.close_on_shutdown(app, planner.stop)
    return app


def run(settings: Settings) -> None:
    """Run the planner until SIGTERM/SIGINT."""
    faust_app.run(create_planner_app(settings), settings, SERVICE)
