"""An SMTP sink for the demo and the tests: accepts and counts every message.

Contract: `SinkHandler` is an aiosmtpd handler that answers
``550 5.1.1 mailbox unavailable`` at RCPT TO for the addresses it was told to
reject (case-insensitive), accepts everything else, counts delivered messages
and keeps the accepted recipients in memory (the most recent `keep` of them,
all when `keep` is None). `start_server()` serves a handler on host:port in
the running event loop; it offers SMTPUTF8 unless `smtputf8=False` (`mailer
smtp-sink --no-smtputf8`: a server as many real ones, where only an ASCII
local part can be sent). `run_sink(args)` is the `mailer smtp-sink` command: it
serves until SIGTERM or SIGINT, prints a line per 1,000 messages and a total,
and returns 0.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections import deque
from collections.abc import Callable, Iterable

from aiosmtpd.smtp import SMTP, Envelope, Session

REJECT_REPLY = "550 5.1.1 mailbox unavailable"
REPORT_EVERY = 1000


class SinkHandler:
    """Accepts every message except for rejected recipients; counts what it gets."""

    def __init__(
        self,
        reject: Iterable[str] = (),
        *,
        keep: int | None = None,
        on_message: Callable[[int], None] | None = None,
    ) -> None:
        self.reject = {address.strip().lower() for address in reject}
        self.messages = 0
        self.rejected = 0
        self.recipients: deque[str] = deque(maxlen=keep)
        self.on_message = on_message

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if address.lower() in self.reject:
            self.rejected += 1
            return REJECT_REPLY
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(
        self, server: SMTP, session: Session, envelope: Envelope
    ) -> str:
        self.messages += 1
        self.recipients.extend(envelope.rcpt_tos)
        if self.on_message is not None:
            self.on_message(self.messages)
        return "250 Message accepted for delivery"


async def start_server(
    handler: SinkHandler, host: str, port: int, *, smtputf8: bool = True
) -> asyncio.Server:
    """Serve `handler` on host:port in the running loop (port 0: any free port)."""
    loop = asyncio.get_running_loop()

    def factory() -> SMTP:
        # A fixed hostname avoids a reverse DNS lookup per connection; no call
        # limit, because a pooled client sends many messages on one connection.
        return SMTP(handler, hostname="smtp-sink", enable_SMTPUTF8=smtputf8, loop=loop)

    return await loop.create_server(factory, host=host, port=port)


def _report(count: int) -> None:
    if count % REPORT_EVERY == 0:
        print(f"smtp-sink: {count} messages", flush=True)


async def _serve(host: str, port: int, reject: list[str], smtputf8: bool = True) -> SinkHandler:
    handler = SinkHandler(reject, keep=REPORT_EVERY, on_message=_report)
    server = await start_server(handler, host, port, smtputf8=smtputf8)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    bound = server.sockets[0].getsockname()
    print(f"smtp-sink: listening on {bound[0]}:{bound[1]}", flush=True)
    try:
        await stop.wait()
    finally:
        server.close()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    return handler


def run_sink(args: argparse.Namespace) -> int:
    """`mailer smtp-sink`: serve until SIGTERM/SIGINT, then print the total."""
    reject: list[str] = list(getattr(args, "reject", []) or [])
    try:
        handler = asyncio.run(_serve(args.host, args.port, reject,
                                     not getattr(args, "no_smtputf8", False)))
    except OSError as exc:
        print(f"smtp-sink: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    print(
        f"smtp-sink: stopped; {handler.messages} messages received, "
        f"{handler.rejected} recipients rejected",
        flush=True,
    )
    return 0
