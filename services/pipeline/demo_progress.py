"""The demo's view of a campaign: the poll endpoint client and the live progress.

Contract: `fetch_campaign()` returns the reconciler's JSON for a campaign, or
None while the endpoint or the campaign is not there yet (a 404); other HTTP
errors raise `PollError`. `counts_of()` reads the counts with zeros for what
is missing, `failed_recipients()` the (address, reply) pairs the endpoint
lists. `Progress` shows a rich bar on a terminal and throttled plain lines
otherwise.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

TERMINAL = ("sent", "failed", "skipped", "unknown", "cancelled")


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy


class PollError(RuntimeError):
    """The poll endpoint answered with an unexpected HTTP error."""


def fetch_campaign(port: int, token: str, campaign_id: str,
                   timeout: float = 2.0) -> dict[str, Any] | None:
    """The poll endpoint's JSON fetched with bearer `token`, or None while the campaign (or the
    endpoint) is not there; another HTTP error (a refused token) raises PollError."""
    url = f"http://127.0.0.1:{port}/campaigns/{campaign_id}"
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            data = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        if exc.code in (404, 503):  # not there yet / still starting
            return None
        raise PollError(f"poll endpoint answered {exc.code} for {url}") from None
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None
    return data if isinstance(data, dict) else None


def counts_of(view: dict[str, Any] | None) -> dict[str, int]:
    """The view's counts (total, pending and every terminal state), 0 when missing."""
    raw = (view or {}).get("counts") or {}
    return {k: int(raw.get(k) or 0) for k in ("total", "pending", *TERMINAL)}


def failed_recipients(view: dict[str, Any]) -> list[tuple[str, str]]:
    """(address, reply) of each failed recipient the poll endpoint lists."""
    items = view.get("failed_recipients") or view.get("failed") or []
    result: list[tuple[str, str]] = []
    if not isinstance(items, list):
        return result
    for item in items:
        if not isinstance(item, dict):
            continue
        email = str(item.get("email") or item.get("recipient_email") or "?")
        code = item.get("smtp_code")
        reply = str(item.get("smtp_reply") or item.get("reply") or item.get("error") or "")
        if code is not None and not reply.startswith(str(code)):
            reply = f"{code} {reply}".strip()
        result.append((email, reply))
    return result


class Progress:
    """Live progress: a rich bar on a terminal, plain lines otherwise."""

    def __init__(self, total: int, plain: bool) -> None:
        self.total = total
        self.plain = plain
        self._last_line = ""
        self._last_print = 0.0
        self._bar: Any = None
        self._task: Any = None

    def __enter__(self) -> Progress:
        if not self.plain:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(
                TextColumn("[bold]sending"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total}"),
                TextColumn("[green]sent {task.fields[sent]}[/] [red]failed {task.fields[failed]}[/]"
                           " pending {task.fields[pending]}"),
                TextColumn("{task.fields[rate]:.0f} msg/s"),
                TimeElapsedColumn(),
            )
            self._bar.__enter__()
            self._task = self._bar.add_task(
                "sending", total=self.total, sent=0, failed=0, pending=self.total, rate=0.0
            )
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)

    def update(self, status: str, counts: dict[str, int], elapsed: float) -> None:
        done = sum(counts[k] for k in TERMINAL)
        rate = done / elapsed if elapsed > 0 else 0.0
        pending = counts["pending"] if status != "waiting" else self.total
        if self._bar is not None:
            self._bar.update(self._task, completed=done, sent=counts["sent"],
                             failed=counts["failed"], pending=pending, rate=rate)
            return
        line = (f"{status}: {done}/{self.total} done, sent {counts['sent']}, "
                f"failed {counts['failed']}, pending {pending}")
        now = time.monotonic()
        if line != self._last_line and (now - self._last_print >= 1.0 or status == "completed"):
            print(f"  [{elapsed:6.1f}s] {line}, {rate:.0f} msg/s", flush=True)
            self._last_line, self._last_print = line, now
