"""A real SMTP server (aiosmtpd) for tests: records what it receives, rejects on request.

Contract: every accepted message is recorded with its envelope recipients and
Message-ID; an address in `reject` is answered `550 5.1.1 ... User unknown`
at RCPT TO, so it is never delivered.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from email import message_from_bytes
from email.message import Message
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from services.pipeline.embedded import free_port

REJECT_REPLY = "550 5.1.1 Recipient address rejected: User unknown in local recipient table"
SLOW_DOWN_REPLY = "451 4.7.1 Too many messages, slow down and try again later"


@dataclass
class Received:
    """One message as the server got it."""

    recipients: list[str]
    message: Message
    at: float = field(default_factory=time.time)  # wall time it was accepted


@dataclass
class RecordingHandler:
    """aiosmtpd handler that records deliveries."""

    reject: dict[str, str] = field(default_factory=dict)  # address → the reply refusing it
    data_delay: float = 0.0  # seconds to wait before answering DATA (a slow server)
    slow_down_once: set[str] = field(default_factory=set)  # answered 451 4.7.1 at RCPT, once
    rcpt_reply: str | None = None  # while set, every RCPT TO gets this reply (e.g. a 4xx storm)
    rcpt_attempts: Counter[str] = field(default_factory=Counter)  # RCPT TO per address
    received: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: list[str]) -> str:
        with self.lock:
            self.rcpt_attempts[address.lower()] += 1
        if self.rcpt_reply is not None:
            return self.rcpt_reply
        if address.lower() in self.reject:
            return self.reject[address.lower()]
        if address.lower() in self.slow_down_once:
            self.slow_down_once.discard(address.lower())
            return SLOW_DOWN_REPLY
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.data_delay:
            await asyncio.sleep(self.data_delay)
        with self.lock:
            self.received.append(
                Received(list(envelope.rcpt_tos), message_from_bytes(envelope.content))
            )
        return "250 2.0.0 Ok: queued"


@dataclass
class PasswordCheck:
    """aiosmtpd authenticator: one user and password; records every login tried (user, ok)."""

    username: str
    password: str
    logins: list[tuple[str, bool]] = field(default_factory=list)

    def __call__(self, server: Any, session: Any, envelope: Any, mechanism: str,
                 auth_data: Any) -> AuthResult:
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        user, password = auth_data.login.decode(), auth_data.password.decode()
        ok = (user, password) == (self.username, self.password)
        self.logins.append((user, ok))
        return AuthResult(success=ok, handled=False)  # a refusal is answered 535 by aiosmtpd


class SmtpServer:
    """An aiosmtpd server on a free loopback port; with `auth`, it requires that login (no TLS).
    It offers SMTPUTF8 unless `smtputf8` is False (as many real servers)."""

    def __init__(self, auth: PasswordCheck | None = None, *, smtputf8: bool = True) -> None:
        self.handler = RecordingHandler()
        self.port = free_port()
        self.auth = auth
        options: dict[str, Any] = {} if auth is None else {
            "authenticator": auth, "auth_required": True, "auth_require_tls": False}
        options["enable_SMTPUTF8"] = smtputf8
        self._controller = Controller(self.handler, hostname="127.0.0.1", port=self.port, **options)

    def start(self) -> None:
        self._controller.start()

    def stop(self) -> None:
        self._controller.stop()

    def reject(self, address: str, reply: str = REJECT_REPLY) -> None:
        """Refuse `address` at RCPT TO with `reply` (550 5.1.1 user unknown by default)."""
        self.handler.reject[address.lower()] = reply

    def accept(self, address: str) -> None:
        """Stop refusing `address`."""
        self.handler.reject.pop(address.lower(), None)

    def delivered(self) -> Counter[str]:
        """How many times each address received a message."""
        with self.handler.lock:
            return Counter(r.lower() for m in self.handler.received for r in m.recipients)

    def messages(self) -> list[Received]:
        """Every message received so far."""
        with self.handler.lock:
            return list(self.handler.received)
