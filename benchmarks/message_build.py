"""How long building one email takes: the sender's byte writer against the email package.

Run: ``.venv/bin/python -m benchmarks.message_build [--messages 2000]``. Renders
`--messages` demo-campaign commands (distinct recipients), then times, per
message, `raw_message` (services/sender/raw_message.py, what the sender uses for
plain ASCII addresses) and the email package's `EmailMessage` built and
flattened to bytes (what it used before, and still uses for SMTPUTF8 addresses).
Prints both in microseconds and their ratio.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

from services.pipeline.demo import demo_campaign, demo_recipients
from services.pipeline.ids import message_id_header
from services.planner.plan_chunk import send_command
from services.sender.message import email_message
from services.sender.raw_message import raw_message
from services.sender.render import Rendered, render_command

DATE = "Sat, 28 Nov 2026 07:00:00 +0000"


def per_message_us(build: Callable[[int], Any], count: int) -> float:
    """Microseconds per call of `build(i)` for i in range(count)."""
    started = time.perf_counter()
    for i in range(count):
        build(i)
    return (time.perf_counter() - started) / count * 1e6


def main() -> None:
    """Print both builders' time per message and their ratio."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.message_build")
    parser.add_argument("--messages", type=int, default=2000)
    count = max(1, parser.parse_args().messages)
    definition = {**demo_campaign("bench-message"), "account": "default"}
    commands = [send_command(definition, r, f"00000000-0000-4000-8000-{i:012d}")
                for i, r in enumerate(demo_recipients(count))]
    rendered: list[Rendered] = [render_command(c) for c in commands]
    ids = [message_id_header(c["send_id"], "mail.example.com") for c in commands]
    raw = per_message_us(lambda i: raw_message(commands[i], rendered[i], DATE, ids[i]), count)
    package = per_message_us(
        lambda i: email_message(commands[i], rendered[i], DATE, ids[i]).as_bytes(), count)
    print(f"raw_message:   {raw:8.1f} us per message")
    print(f"email package: {package:8.1f} us per message (built and flattened)")
    print(f"ratio:         {package / raw:8.1f}x")


if __name__ == "__main__":
    main()
