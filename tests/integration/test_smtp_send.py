"""The send step against a real SMTP server (aiosmtpd on loopback).

Covers the outcome of each SMTP situation (accepted, 550, 451, lost reply
after DATA, refused connection, failed AUTH), connection reuse by the pool,
that the password never shows up in outcomes or logs, and the sender
runtime's per-record handling (dead letter, outcome keyed by send_id,
`internal` failure, retried delivery) with an in-memory producer.
"""

from __future__ import annotations

import asyncio
import base64
import email
import email.policy
import logging
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, cast

import orjson
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from services.pipeline import contract
from services.pipeline.accounts import load_accounts
from services.pipeline.clock import SystemClock
from services.pipeline.producer import AsyncProducer, DeliveryError
from services.pipeline.settings import Settings
from services.pipeline.topics import Topic, topic_name
from services.sender import app as sender_app
from services.sender.app import SenderRuntime, create_sender_app
from services.sender.rate_limit import Limiter
from services.sender.send_gate import SendGate
from services.sender.send_step import send_one
from services.sender.smtp_pool import SmtpPools
from tests.support.campaigns import send_email

pytestmark = pytest.mark.integration

PERMANENT = "gone@example.com"
TRANSIENT = "later@example.com"
DROP_AFTER_DATA = "drop@example.com"
SLOW_AFTER_DATA = "slow@example.com"
PERMANENT_REPLY = "550 5.1.1 <gone@example.com>: Recipient address rejected: User unknown"
TRANSIENT_REPLY = "451 4.7.1 Greylisted, please try again later"
USERNAME = "mailer-user"
PASSWORD = "S3cret-Pa55w0rd-never-logged"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Handler:
    """Records messages and the client connections they came over; misbehaves on request."""

    received: list[email.message.EmailMessage] = field(default_factory=list)
    peers: set[Any] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_MAIL(self, server: Any, session: Any, envelope: Any, address: str,
                          mail_options: list[str]) -> str:
        with self.lock:
            self.peers.add(session.peer)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: list[str]) -> str:
        if address == PERMANENT:
            return PERMANENT_REPLY
        if address == TRANSIENT:
            return TRANSIENT_REPLY
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if DROP_AFTER_DATA in envelope.rcpt_tos:
            server.transport.abort()  # the payload arrived; the reply never will
            return "250 OK"
        if SLOW_AFTER_DATA in envelope.rcpt_tos:
            await asyncio.sleep(3)
        msg = email.message_from_bytes(envelope.content, policy=email.policy.default)
        with self.lock:
            self.received.append(cast(email.message.EmailMessage, msg))
        return "250 2.0.0 Ok: queued as ABC123"


def authenticator(server: Any, session: Any, envelope: Any, mechanism: str,
                  auth_data: Any) -> AuthResult:
    ok = (
        isinstance(auth_data, LoginPassword)
        and auth_data.login == USERNAME.encode()
        and auth_data.password == b"right-password"
    )
    return AuthResult(success=ok, handled=False)


@pytest.fixture
def smtpd() -> Iterator[Callable[..., tuple[Handler, int]]]:
    """Starts aiosmtpd servers on free loopback ports: `smtpd(**smtp_kwargs)`."""
    controllers: list[Controller] = []

    def start(**smtp_kwargs: Any) -> tuple[Handler, int]:
        handler = Handler()
        port = free_port()
        controller = Controller(handler, hostname="127.0.0.1", port=port, **smtp_kwargs)
        controller.start()
        controllers.append(controller)
        return handler, port

    yield start
    for controller in controllers:
        controller.stop()


def make_settings(port: int, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "smtp_host": "127.0.0.1",
        "smtp_port": port,
        "smtp_pool_size": 2,
        "smtp_timeout": 5.0,
        "message_id_domain": "mail.test.example.com",
        # the sending limits are tested elsewhere: none here, at any hour, own Redis keys
        "redis_key_prefix": f"smtp-send-{uuid.uuid4().hex[:8]}",
        "hourly_rate": 0,
        "daily_limit_per_manager": 0,
        "working_hours": "00:00-24:00",
        "working_days": "1-7",
    }
    values.update(overrides)
    return replace(Settings(), **values)


def command(to: str = "ann@example.com", **overrides: Any) -> dict[str, Any]:
    """A valid `send.email` command for `to`."""
    return send_email(
        {"email": to, "name": "Recipient", "variables": {"code": "R1"}},
        campaign_id="camp-9",
        **{
            "template": {"subject": "Hello {{ name }}", "text": "Your code: {{ code }}",
                         "html": "<p>Your code: <b>{{ code }}</b></p>"},
            "variables": {"code": "DEFAULT"},
            "unsubscribe_url": "https://shop.example.com/u/{{ send_id }}",
            **overrides,
        },
    )


def valid(outcome: dict[str, Any]) -> dict[str, Any]:
    """The outcome, after checking it against its schema."""
    return contract.validate(outcome, Topic.SEND_OUTCOMES)


async def test_sent_permanent_and_transient(smtpd: Callable[..., tuple[Handler, int]]) -> None:
    handler, port = smtpd()
    settings = make_settings(port)
    pools = SmtpPools.from_settings(settings)
    try:
        ok_cmd = command("ann@example.com")
        sent = valid(await send_one(ok_cmd, pools, settings))
        assert sent["kind"] == "outcome.sent"
        assert sent["smtp_code"] == 250
        assert sent["smtp_reply"] == "2.0.0 Ok: queued as ABC123"
        assert sent["error_class"] is None
        assert sent["recipient_email"] == "ann@example.com"
        assert sent["message_id_header"] == f"<{ok_cmd['send_id']}@mail.test.example.com>"
        assert sent["duration_ms"] >= 0

        failed = valid(await send_one(command(PERMANENT), pools, settings))
        assert failed["kind"] == "outcome.failed"
        assert failed["error_class"] == "permanent"
        assert failed["smtp_code"] == 550
        assert failed["smtp_reply"] == PERMANENT_REPLY[4:]

        later = valid(await send_one(command(TRANSIENT), pools, settings))
        assert later["kind"] == "outcome.failed"
        assert later["error_class"] == "transient"
        assert later["smtp_code"] == 451
        assert later["smtp_reply"] == TRANSIENT_REPLY[4:]

        # the refusals reset the envelope, so the same connection still works
        again = valid(await send_one(command("bob@example.com"), pools, settings))
        assert again["kind"] == "outcome.sent"
        assert pools.get("default").opened == 1
    finally:
        await pools.close()

    assert len(handler.received) == 2
    msg = handler.received[0]
    assert msg["Message-ID"] == f"<{ok_cmd['send_id']}@mail.test.example.com>"
    assert msg["Subject"] == "Hello Recipient"
    assert msg["From"] == "Shop <news@shop.example.com>"
    assert msg["List-Unsubscribe"].strip() == f"<https://shop.example.com/u/{ok_cmd['send_id']}>"
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    body = msg.get_body(("plain",))
    assert body is not None and body.get_content().strip() == "Your code: R1"


async def test_connections_are_reused(smtpd: Callable[..., tuple[Handler, int]]) -> None:
    handler, port = smtpd()
    settings = make_settings(port, smtp_pool_size=2)
    pools = SmtpPools.from_settings(settings)
    try:
        outcomes = await asyncio.gather(
            *(send_one(command(f"user{i}@example.com"), pools, settings) for i in range(50))
        )
        assert [valid(o)["kind"] for o in outcomes] == ["outcome.sent"] * 50
        assert pools.get("default").opened <= 2
    finally:
        await pools.close()
    assert len(handler.received) == 50
    assert 1 <= len(handler.peers) <= 2


async def test_dropped_idle_connection_is_replaced(
    smtpd: Callable[..., tuple[Handler, int]],
) -> None:
    _, port = smtpd(timeout=0.3)  # the server closes sessions idle for 0.3 s
    settings = make_settings(port, smtp_pool_size=1)
    pools = SmtpPools.from_settings(settings)
    try:
        assert (await send_one(command("a@example.com"), pools, settings))["kind"] == "outcome.sent"
        await asyncio.sleep(1.0)
        assert (await send_one(command("b@example.com"), pools, settings))["kind"] == "outcome.sent"
        assert pools.get("default").opened == 2
    finally:
        await pools.close()


async def test_idle_connection_is_checked_with_noop(
    smtpd: Callable[..., tuple[Handler, int]],
) -> None:
    _, port = smtpd()
    settings = make_settings(port, smtp_pool_size=1)
    pools = SmtpPools.from_settings(settings)
    pools.get("default").idle_check_after = 0.0
    try:
        for i in range(3):
            outcome = await send_one(command(f"n{i}@example.com"), pools, settings)
            assert outcome["kind"] == "outcome.sent"
        assert pools.get("default").opened == 1
    finally:
        await pools.close()


async def test_connection_lost_after_data_is_unknown(
    smtpd: Callable[..., tuple[Handler, int]],
) -> None:
    _, port = smtpd()
    settings = make_settings(port)
    pools = SmtpPools.from_settings(settings)
    try:
        outcome = valid(await send_one(command(DROP_AFTER_DATA), pools, settings))
        assert outcome["kind"] == "outcome.unknown"
        assert outcome["reason"] == "no_reply_after_data"
        assert outcome["smtp_code"] is None
        # the broken connection was discarded: the next send opens a new one and works
        after = valid(await send_one(command("ann@example.com"), pools, settings))
        assert after["kind"] == "outcome.sent"
        assert pools.get("default").opened == 2
    finally:
        await pools.close()


async def test_timeout_after_data_is_unknown(smtpd: Callable[..., tuple[Handler, int]]) -> None:
    _, port = smtpd()
    settings = make_settings(port, smtp_timeout=1.0)
    pools = SmtpPools.from_settings(settings)
    try:
        outcome = valid(await send_one(command(SLOW_AFTER_DATA), pools, settings))
        assert outcome["kind"] == "outcome.unknown"
        assert outcome["reason"] == "no_reply_after_data"
        assert outcome["error_class"] == "timeout"
    finally:
        await pools.close()


async def test_connection_refused() -> None:
    settings = make_settings(free_port())  # nothing listens there
    pools = SmtpPools.from_settings(settings)
    try:
        outcome = valid(await send_one(command(), pools, settings))
    finally:
        await pools.close()
    assert outcome["kind"] == "outcome.failed"
    assert outcome["error_class"] == "connection"
    assert outcome["smtp_code"] is None


async def test_tls_failure_is_tls(smtpd: Callable[..., tuple[Handler, int]]) -> None:
    _, port = smtpd()  # plain SMTP, no STARTTLS advertised
    for mode in ("starttls", "tls"):
        settings = make_settings(port, smtp_tls=mode, smtp_timeout=2.0)
        pools = SmtpPools.from_settings(settings)
        try:
            outcome = valid(await send_one(command(), pools, settings))
        finally:
            await pools.close()
        assert (outcome["kind"], outcome["error_class"]) == ("outcome.failed", "tls"), mode


async def test_template_error_outcome(smtpd: Callable[..., tuple[Handler, int]]) -> None:
    handler, port = smtpd()
    settings = make_settings(port)
    pools = SmtpPools.from_settings(settings)
    bad = command(template={"subject": "{{ ''.__class__.__mro__ }}", "text": "x"})
    try:
        outcome = valid(await send_one(bad, pools, settings))
    finally:
        await pools.close()
    assert outcome["kind"] == "outcome.failed"
    assert outcome["error_class"] == "template_error"
    assert outcome["smtp_code"] is None
    assert outcome["reason"].startswith("subject: forbidden by the sandbox")
    assert handler.received == []


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
async def test_auth_success(smtpd: Callable[..., tuple[Handler, int]]) -> None:
    handler, port = smtpd(authenticator=authenticator, auth_require_tls=False, auth_required=True)
    settings = make_settings(port, smtp_username=USERNAME, smtp_password="right-password")
    pools = SmtpPools.from_settings(settings)
    try:
        outcome = valid(await send_one(command(), pools, settings))
    finally:
        await pools.close()
    assert outcome["kind"] == "outcome.sent"
    assert len(handler.received) == 1


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
async def test_password_never_in_outcome_or_logs(
    smtpd: Callable[..., tuple[Handler, int]], caplog: pytest.LogCaptureFixture, tmp_path: Any
) -> None:
    _, port = smtpd(authenticator=authenticator, auth_require_tls=False, auth_required=True)
    secret_file = tmp_path / "smtp-password"
    secret_file.write_text(PASSWORD + "\n")
    settings = make_settings(
        port, smtp_username=USERNAME, smtp_password_file=str(secret_file)
    )
    assert PASSWORD not in repr(settings)
    pools = SmtpPools.from_settings(settings)
    caplog.set_level(logging.DEBUG)
    try:
        outcome = valid(await send_one(command(), pools, settings))
    finally:
        await pools.close()
    assert outcome["kind"] == "outcome.failed"
    assert outcome["error_class"] == "auth"
    assert outcome["smtp_code"] == 535
    encoded = base64.b64encode(PASSWORD.encode()).decode()
    assert PASSWORD not in orjson.dumps(outcome).decode()
    assert caplog.records, "the connect failure should have been logged"
    for record in caplog.records:
        text = record.getMessage() + (record.exc_text or "") + repr(record.args)
        assert PASSWORD not in text, record.name
        if record.name.startswith("services."):
            assert encoded not in text
            assert USERNAME not in text


# --- the runtime around send_one (in-memory producer, real SMTP) --------------------


class FakeProducer:
    """Acknowledges every message at once, after failing the first `fail` ones."""

    def __init__(self, fail: int = 0) -> None:
        self.fail = fail
        self.sent: list[tuple[str, bytes | str | None, bytes]] = []

    def produce(self, topic: str, value: bytes, key: bytes | str | None = None) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.fail:
            self.fail -= 1
            future.set_exception(DeliveryError("broker unavailable"))
        else:
            self.sent.append((topic, key, value))
            future.set_result(None)
        return future

    async def close(self) -> None:
        pass


async def runtime(settings: Settings, producer: FakeProducer, database_url: str,
                  redis_url: str) -> SenderRuntime:
    """A sender runtime on the real SMTP server, Redis (limiter state initialised) and Postgres."""
    settings = replace(settings, database_url=database_url, redis_url=redis_url)
    pools = SmtpPools.from_settings(settings)
    limiter = Limiter.from_settings(settings)
    await limiter.init_epoch()
    gate = SendGate(load_accounts(settings), limiter, SystemClock())
    return SenderRuntime(settings, producer=cast(AsyncProducer, producer), pools=pools, gate=gate)


async def test_runtime_produces_outcome_keyed_by_send_id(
    smtpd: Callable[..., tuple[Handler, int]], database_url: str, redis_url: str,
) -> None:
    _, port = smtpd()
    settings = make_settings(port, topic_prefix="rt.")
    producer = FakeProducer(fail=1)  # the first delivery fails and is retried
    rt = await runtime(settings, producer, database_url, redis_url)
    cmd = command()
    try:
        outcome = await rt.handle(
            topic="rt.mailer.send-commands", partition=3, offset=7,
            key=cmd["send_id"].encode(), value=contract.encode(cmd),
        )
    finally:
        await rt.close()
    assert outcome is not None and outcome["kind"] == "outcome.sent"
    [(topic, key, value)] = producer.sent
    assert topic == topic_name(Topic.SEND_OUTCOMES, settings) == "rt.mailer.send-outcomes"
    assert key == cmd["send_id"].encode()
    assert valid(orjson.loads(value)) == outcome


async def test_runtime_dead_letters_invalid_commands(
    smtpd: Callable[..., tuple[Handler, int]], database_url: str, redis_url: str,
) -> None:
    _, port = smtpd()
    settings = make_settings(port)
    producer = FakeProducer()
    rt = await runtime(settings, producer, database_url, redis_url)
    try:
        result = await rt.handle(
            topic="mailer.send-commands", partition=1, offset=42, key=b"k", value=b"not json"
        )
    finally:
        await rt.close()
    assert result is None
    [(topic, key, value)] = producer.sent
    assert topic == topic_name(Topic.DEAD_LETTERS, settings)
    assert key == b"k"
    letter = contract.validate(orjson.loads(value), Topic.DEAD_LETTERS)
    assert letter["service"] == "sender"
    assert letter["source_partition"] == 1 and letter["source_offset"] == 42
    assert base64.b64decode(letter["original_value_b64"]) == b"not json"
    assert letter["reason"].startswith("not valid JSON")


async def test_runtime_turns_unexpected_errors_into_internal_failures(
    smtpd: Callable[..., tuple[Handler, int]],
    database_url: str,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    _, port = smtpd()
    settings = make_settings(port)
    producer = FakeProducer()
    rt = await runtime(settings, producer, database_url, redis_url)
    cmd = command("carol.secret@example.com")

    async def broken(command: dict[str, Any], pools: SmtpPools, settings: Settings, rules: Any) -> Any:
        raise RuntimeError(f"bug while sending to {command['recipient']['email']}")

    monkeypatch.setattr(sender_app, "send_one", broken)
    try:
        outcome = await rt.handle(
            topic="mailer.send-commands", partition=0, offset=1,
            key=cmd["send_id"].encode(), value=contract.encode(cmd),
        )
    finally:
        await rt.close()
    assert outcome is not None
    valid(outcome)
    assert outcome["kind"] == "outcome.failed"
    assert outcome["error_class"] == "internal"
    assert outcome["reason"] == "internal error: RuntimeError"
    assert len(producer.sent) == 1
    logged = [r for r in caplog.records if r.name == "services.sender.app"]
    assert logged and all("carol.secret@" not in r.getMessage() for r in logged)


def test_create_sender_app() -> None:
    settings = replace(Settings(), sender_concurrency=3, topic_prefix="x.")
    app = create_sender_app(settings)
    agents = list(app.agents.values())
    assert len(agents) == 1
    assert agents[0].concurrency == 3
    assert set(agents[0].channel.topics) == {"x.mailer.send-commands"}
