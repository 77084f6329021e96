"""The sender service: send commands in, one acknowledged outcome per command out.

Contract: `create_sender_app(settings)` returns the faust app whose one agent
(concurrency `MAILER_SENDER_CONCURRENCY`) reads `mailer.send-commands`. For
each record it either dead-letters it (not a valid `send.email`) or passes it
through the `SendGate` (working hours, then the shared Redis limiter): a send
the gate refuses becomes `outcome.deferred` carrying the command (the
reconciler parks it and brings it back when due; the agent never sleeps), an
admitted one is sent with `send_one`. The send's claim
(services/sender/claims.py) is taken before the gate: a redelivered command
repeats the first outcome and never touches the limiter (no second token, no
refund of the first). A failed send gives its tokens back; a
4xx becomes a deferred retry while attempts remain, and a "slow down" reply
cuts the account's adaptive rate. The outcome goes to `mailer.send-outcomes`
keyed by send_id, stamped with the (possibly compressed) clock's time.
Either way the iteration waits for the broker's acknowledgement (retrying a
failed delivery) before it ends, so faust acks, and later
commits, the command's offset only once its outcome or dead letter is
durable. An unexpected error while sending becomes `outcome.failed` with
error_class `internal`; nothing is dropped silently and the agent keeps
going. The Kafka producer and SMTP pools are created on first use and closed
when the app stops (`on_before_shutdown`, after the consumer has drained).
`run(settings)` runs the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import traceback
from collections.abc import Awaitable, Callable
from typing import Any

import faust

from services.pipeline import circuit_breaker, faust_app
from services.pipeline.accounts import load_accounts
from services.pipeline.clock import clock_from_settings
from services.pipeline.contract import InvalidMessage, Message, decode, encode, iso
from services.pipeline.db import open_pool
from services.pipeline.dead_letters import DeadLetters
from services.pipeline.logs import event as log_event
from services.pipeline.metrics import DEFERRALS, SENDS, SMTP_SECONDS
from services.pipeline.producer import AsyncProducer, DeliveryError
from services.pipeline.redaction import mask_email
from services.pipeline.retry import retry_transient
from services.pipeline.settings import Settings
from services.pipeline.topics import Topic, topic_name
from services.sender.claims import Claim, ClaimResult, Claims, Refusal
from services.sender.deferral import account_stopped, parked_outcome, refused_outcome, retry_later
from services.sender.rate_limit import Limiter
from services.sender.send_gate import Admitted, Parked, SendGate
from services.sender.send_step import internal_failure, send_one
from services.sender.smtp_pool import SmtpPools
from services.sender.smtp_replies import ReplyRules, is_slow_down

log = logging.getLogger(__name__)

SERVICE = "sender"
#: Failures retried later (R31): 4xx replies, and no connection, a timeout or TLS failing
#: before the message went out.
RETRYABLE = ("transient", "connection", "timeout", "tls")
#: What a claim records for each outcome kind.
CLAIM_RESULT: dict[str, ClaimResult] = {
    "outcome.sent": "sent", "outcome.failed": "failed", "outcome.deferred": "deferred",
    "outcome.unknown": "unknown", "outcome.skipped": "failed",
}
#: Longest pause between two attempts to deliver an outcome or dead letter (s).
MAX_RETRY_PAUSE = 10.0


class SenderRuntime:
    """The sender's per-process resources and its per-record work."""

    def __init__(
        self,
        settings: Settings,
        *,
        producer: AsyncProducer | None = None,
        pools: SmtpPools | None = None,
        gate: SendGate | None = None,
        claims: Claims | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock_from_settings(settings)
        self.reply_rules = ReplyRules.from_settings(settings)
        circuit_breaker.configure(self.reply_rules, settings.breaker_cooldown)  # what counts (R10)
        self._gate = gate
        self._claims = claims
        self._claims_lock = asyncio.Lock()
        self._producer = producer
        self._pools = pools
        self._dead_letters: DeadLetters | None = None
        self._outcomes_topic = topic_name(Topic.SEND_OUTCOMES, settings)
        self._closed = False

    def _resources(self) -> tuple[AsyncProducer, SmtpPools, DeadLetters, SendGate]:
        if self._closed:
            raise RuntimeError("sender runtime is closed")
        if self._gate is None:
            limiter = Limiter.from_settings(self.settings)
            self._gate = SendGate(load_accounts(self.settings), limiter, self.clock)
        if self._producer is None:
            self._producer = AsyncProducer(self.settings, client_id=self.settings.app_id(SERVICE))
        if self._pools is None:
            self._pools = SmtpPools.from_settings(self.settings)
        if self._dead_letters is None:
            self._dead_letters = DeadLetters(self._producer, self.settings, SERVICE)
        return self._producer, self._pools, self._dead_letters, self._gate

    async def claims(self) -> Claims:
        """The claims of this process (its Postgres pool opened on first use)."""
        async with self._claims_lock:
            if self._claims is None:
                pool = await retry_transient(
                    lambda: open_pool(self.settings, max_size=self.settings.sender_concurrency + 2,
                                      name=SERVICE, check=False),  # claim_send retries a dead one
                    what="sender database pool",
                )
                self._claims = Claims(pool, f"{self.settings.app_id(SERVICE)}/{os.getpid()}")
            return self._claims

    async def handle(
        self,
        *,
        topic: str,
        partition: int | None,
        offset: int | None,
        key: bytes | None,
        value: bytes | None,
    ) -> Message | None:
        """Process one record; return the outcome produced (None when dead-lettered)."""
        producer, pools, dead_letters, gate = self._resources()
        try:
            command = decode(value, Topic.SEND_COMMANDS)
        except Exception as exc:
            if isinstance(exc, InvalidMessage):
                reason, error_type, campaign_id = exc.reason, "invalid_message", exc.campaign_id
            else:  # a decoder bug must not drop the record either
                reason, error_type, campaign_id = (
                    f"cannot decode: {type(exc).__name__}", "internal", None
                )
            await _until_delivered(
                "dead letter",
                lambda: dead_letters.send(
                    source_topic=topic, partition=partition, offset=offset, key=key,
                    value=value, reason=reason, error_type=error_type, campaign_id=campaign_id,
                ),
            )
            return None
        started = time.monotonic()
        try:
            outcome = await self._send(command, gate, await self.claims(), pools, started)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            outcome = self._internal_failure(command, exc, started)
        payload = encode(outcome)
        send_id = command["send_id"].encode("ascii")
        await _until_delivered(
            "outcome", lambda: producer.produce(self._outcomes_topic, payload, send_id)
        )
        _log_outcome(outcome)
        _count_outcome(outcome)
        return outcome

    async def _send(
        self, command: Message, gate: SendGate, claims: Claims, pools: SmtpPools, started: float
    ) -> Message:
        """Claim, admit, send and account for one command; return its outcome.

        The claim comes before the gate: a command its claim refuses (a redelivered
        one above all) never touches the limiter, so repeating a finished send's
        outcome can neither take a second token nor give back the first, and a send
        reserves a token only once it knows it may go to SMTP. A send the gate parks
        gives its claim back (nothing went to SMTP). Once claimed, whatever happens
        ends in the claim's result: an unexpected error is recorded as the internal
        failure it publishes, so the stale-claim sweep never adds a second outcome."""
        async with claims.hold(command) as claim:
            if isinstance(claim, Refusal):
                if claim.outcome is not None:  # this send was done: say again what happened
                    return decode(claim.outcome, Topic.SEND_OUTCOMES)
                return self._stamped(
                    refused_outcome(command, self.settings, claim, self.clock.now(), started)
                )
            try:
                return await self._claimed(command, gate, claim, pools, started)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                return await self._finish(
                    claim, command, self._internal_failure(command, exc, started), started)

    async def _claimed(
        self, command: Message, gate: SendGate, claim: Claim, pools: SmtpPools, started: float
    ) -> Message:
        """Admit and send a claimed command; record its result in the claim."""
        try:
            admission = await gate.admit(command)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await asyncio.shield(claim.release())
            raise
        if isinstance(admission, Parked):
            await claim.release()
            return self._stamped(
                parked_outcome(command, self.settings, admission.reason, admission.until, started)
            )
        request = admission.request
        try:
            outcome = await send_one(command, pools, self.settings, self.reply_rules)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # before the payload went out (send_one's contract)
            if request is not None:
                await _logged(gate.limiter.refund(request), "refunding a send's tokens")
            outcome = self._internal_failure(command, exc, started)
        else:
            try:
                outcome = await self._account_for(command, gate, admission, outcome, started)
            except Exception as exc:  # SMTP's answer stands; only the accounting is lost
                log.warning("could not account for send %s: %s", command["send_id"],
                            type(exc).__name__)
            outcome = self._stamped(outcome)
        return await self._finish(claim, command, outcome, started)

    async def _finish(self, claim: Claim, command: Message, outcome: Message, started: float) -> Message:
        """Record the claim's result, then the outcome to publish: this one, or the one the
        stale-claim sweep gave the send first (never both)."""
        superseded = await claim.finish(CLAIM_RESULT[outcome["kind"]], outcome, encode(outcome),
                                         self.settings.breaker_threshold)
        if superseded is None:
            return outcome
        log.warning("claim %s/%s was settled before its result could be recorded; repeating "
                    "that outcome instead of %s", command["send_id"], command["attempt"],
                    outcome["kind"])
        if superseded.outcome is not None:
            return decode(superseded.outcome, Topic.SEND_OUTCOMES)
        return self._stamped(refused_outcome(
            command, self.settings, Refusal("duplicate", "the claim was settled before"),
            self.clock.now(), started))

    def _stamped(self, outcome: Message) -> Message:
        """The outcome with its time on this service's clock."""
        outcome["occurred_at"] = iso(self.clock.now())
        return outcome

    def _internal_failure(self, command: Message, exc: Exception, started: float) -> Message:
        """`outcome.failed` (error_class `internal`) for an unexpected error, logged with its stack."""
        log.error(
            "internal error sending %s (campaign %s, to %s): %s\n%s",
            command["send_id"], command["campaign_id"], mask_email(command["recipient"]["email"]),
            type(exc).__name__, "".join(traceback.format_tb(exc.__traceback__)),
        )
        return self._stamped(internal_failure(
            command, self.settings, f"internal error: {type(exc).__name__}", started
        ))

    async def _account_for(
        self, command: Message, gate: SendGate, admission: Admitted, outcome: Message,
        started: float,
    ) -> Message:
        """Give tokens back for a send the provider did not count, adapt the rate, and turn a
        transient failure into a deferred retry while attempts remain."""
        request = admission.request
        if request is None:
            return outcome
        if outcome["kind"] == "outcome.sent":
            if admission.factor < 1.0:
                await gate.limiter.feedback(request.account, request.domain_group, slow_down=False)
            return outcome
        if outcome["kind"] != "outcome.failed":
            return outcome  # unknown: the provider may have counted it; keep the tokens
        await gate.limiter.refund(request)
        if outcome["error_class"] == "auth":  # the account is refused, not the recipient
            return account_stopped(command, outcome, self.settings, self.clock.now(), started)
        if outcome["error_class"] not in RETRYABLE:
            return outcome
        if is_slow_down(outcome["smtp_code"], outcome["smtp_reply"]):
            await gate.limiter.feedback(request.account, request.domain_group, slow_down=True)
        retry = retry_later(command, outcome, self.settings, self.clock.now(), started)
        return outcome if retry is None else retry

    async def close(self) -> None:
        """Close the SMTP pools, then flush and close the producer."""
        self._closed = True
        if self._pools is not None:
            await self._pools.close()
        if self._gate is not None:
            await self._gate.limiter.close()
        if self._claims is not None:
            await self._claims.pool.close()
        if self._producer is not None:
            await self._producer.close()
        log.info("sender closed its SMTP pools and outcome producer")


def _count_outcome(outcome: Message) -> None:
    """The outcome in the send series (R23)."""
    kind = outcome["kind"].removeprefix("outcome.")
    SENDS.labels(kind, outcome.get("error_class") or "none").inc()
    if kind == "deferred":
        DEFERRALS.labels(outcome["defer_reason"]).inc()
    if kind in ("sent", "failed", "unknown"):
        SMTP_SECONDS.labels(kind).observe(outcome["duration_ms"] / 1000)


def _log_outcome(outcome: Message) -> None:
    """One log event per outcome: the send's ids, and its reply or why it waits (R22)."""
    kind = outcome["kind"].removeprefix("outcome.")
    fields = {
        "campaign_id": outcome["campaign_id"], "send_id": outcome["send_id"],
        "attempt": outcome["attempt"], "account": outcome["account"],
        "recipient": outcome["recipient_email"], "smtp_code": outcome.get("smtp_code"),
        "error_type": outcome.get("error_class"),
    }
    if kind == "deferred":
        fields |= {"defer_reason": outcome["defer_reason"], "deferred_until": outcome["deferred_until"]}
    message = {"sent": "sent", "deferred": "deferred: {defer_reason} until {deferred_until}"}.get(
        kind, "{kind}: {reason}").format(kind=kind, reason=outcome.get("reason", ""), **fields)
    log_event(log, f"send.{kind}", message, **fields)


async def _logged(work: Awaitable[None], what: str) -> None:
    """Await `work`; an error is logged, not raised (the outcome matters more)."""
    try:
        await work
    except Exception as exc:
        log.warning("%s failed: %s", what, type(exc).__name__)


async def _until_delivered(what: str, attempt: Callable[[], Awaitable[None]]) -> None:
    """Await `attempt()` until the broker has the message, pausing longer each time."""
    pause = 0.5
    while True:
        try:
            await attempt()
            return
        except DeliveryError as exc:
            log.warning("could not deliver %s (%s); retrying in %.1fs", what, exc, pause)
            await asyncio.sleep(pause)
            pause = min(pause * 2, MAX_RETRY_PAUSE)


def create_sender_app(settings: Settings) -> faust.App:
    """The sender's faust app: one agent over the send commands."""
    app = faust_app.create_app(SERVICE, settings)
    commands = faust_app.faust_topic(app, Topic.SEND_COMMANDS, settings)
    runtime = SenderRuntime(settings)

    async def send_commands(stream: faust.StreamT[Any]) -> None:
        # The event is acked when the next one is taken, so after handle() returned,
        # i.e. after its outcome (or dead letter) was acknowledged by the broker.
        async for event in stream.events():
            msg = event.message
            await runtime.handle(
                topic=msg.topic, partition=msg.partition, offset=msg.offset,
                key=msg.key, value=msg.value,
            )

    app.agent(commands, name="sender.send_commands", concurrency=settings.sender_concurrency)(
        send_commands
    )

    faust_app.close_on_shutdown(app, runtime.close)
    return app


def run(settings: Settings) -> None:
    """Run the sender worker until it is stopped."""
    app = create_sender_app(settings)
    faust_app.run(app, settings, SERVICE)
