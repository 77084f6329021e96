"""The SMTP sink: accepts and counts mail, bounces rejected addresses, stops cleanly."""

from __future__ import annotations

import asyncio
import signal
import smtplib
import subprocess
import sys
import time
from email.message import EmailMessage

import pytest

from services.pipeline.embedded import free_port, port_open
from services.pipeline.smtp_sink import REJECT_REPLY, SinkHandler, start_server

pytestmark = pytest.mark.integration


def _message(to: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "demo@example.com"
    msg["To"] = to
    msg["Subject"] = "hello"
    msg.set_content("hi")
    return msg


def _send(port: int, addresses: list[str]) -> list[str]:
    """Send one message per address on one connection; return the refused ones."""
    refused: list[str] = []
    with smtplib.SMTP("127.0.0.1", port, timeout=5) as client:
        for address in addresses:
            try:
                client.send_message(_message(address))
            except smtplib.SMTPRecipientsRefused as exc:
                code, reply = exc.recipients[address]
                assert (code, reply.decode()) == (550, REJECT_REPLY.split(" ", 1)[1])
                refused.append(address)
    return refused


async def test_handler_counts_and_rejects() -> None:
    handler = SinkHandler(["Bounce@Example.com"])
    server = await start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        addresses = [f"r{i}@example.com" for i in range(30)] + ["bounce@example.com"]
        refused = await asyncio.to_thread(_send, port, addresses)
    finally:
        server.close()
    assert refused == ["bounce@example.com"]
    assert handler.messages == 30
    assert handler.rejected == 1
    assert list(handler.recipients) == addresses[:30]


def test_sink_command_reports_and_exits_cleanly() -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.pipeline.cli", "smtp-sink", "--port", str(port),
         "--reject", "bounce@example.com"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while not port_open("127.0.0.1", port):
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline, "sink did not listen"
            time.sleep(0.05)
        addresses = [f"r{i}@example.com" for i in range(1000)]
        refused = _send(port, [*addresses[:500], "bounce@example.com", *addresses[500:]])
        assert refused == ["bounce@example.com"]
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out
    assert f"listening on 127.0.0.1:{port}" in out
    assert "smtp-sink: 1000 messages\n" in out
    assert "1000 messages received, 1 recipients rejected" in out


def test_busy_port_is_an_error() -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.pipeline.cli", "smtp-sink", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while not port_open("127.0.0.1", port):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        second = subprocess.run(
            [sys.executable, "-m", "services.pipeline.cli", "smtp-sink", "--port", str(port)],
            capture_output=True, text=True, timeout=20,
        )
        assert second.returncode == 1
        assert "cannot listen" in second.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=10)
