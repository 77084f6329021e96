"""Turning a send that must wait into an `outcome.deferred` that carries it back.

Contract: `parked_outcome()` is the outcome of a send the gate refused: it
names the reason (closed set), `deferred_until` and embeds the command, so the
reconciler can park it in Postgres and release it when due. `retry_later()`
decides what a 4xx reply leads to: while attempts remain, an
`outcome.deferred` (reason `transient_error`) whose embedded command is the
next attempt, due after exponential backoff with jitter, or after the delay
the reply names; once they are used up or MAILER_TRANSIENT_MAX_AGE has passed
since the first attempt, None (the 4xx outcome stands).
`refused_outcome()` is the outcome of a send its claim refused (paused,
cancelled, suppressed, duplicate). Times are clock times; nothing here sleeps.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from services.pipeline.contract import Message, iso
from services.pipeline.defer_reasons import DeferReason
from services.pipeline.settings import Settings
from services.sender.claims import Refusal
from services.sender.send_step import Outcomes
from services.sender.smtp_replies import retry_after

#: Longest backoff between two attempts after a 4xx reply (clock seconds).
MAX_BACKOFF = 6 * 3600.0


def parked_outcome(
    command: Mapping[str, Any], settings: Settings, reason: DeferReason, until: datetime, started: float
) -> Message:
    """`outcome.deferred` for a send the limits or working hours turned away."""
    return Outcomes(command, settings, started).build(
        "deferred",
        reason=f"{reason.value} until {iso(until)}",
        defer_reason=reason.value,
        deferred_until=iso(until),
        command=dict(command),
    )


def retry_later(
    command: Mapping[str, Any],
    failed: Message,
    settings: Settings,
    now: datetime,
    started: float,
    rng: random.Random | None = None,
) -> Message | None:
    """The deferred outcome retrying a 4xx-failed send, or None when attempts are used up."""
    attempt = int(command["attempt"])
    if attempt >= settings.transient_max_attempts:
        return None
    first = command.get("first_attempt_at")
    if first and (now - datetime.fromisoformat(first.replace("Z", "+00:00"))).total_seconds() \
            > settings.transient_max_age:
        return None  # retried for long enough: the 4xx stands
    asked = retry_after(failed.get("smtp_reply") or "")
    if asked is None:
        base = settings.transient_retry_seconds * 2 ** (attempt - 1)
        delay = min(MAX_BACKOFF, base * (rng or random).uniform(0.8, 1.2))
    else:
        delay = asked
    until = now + timedelta(seconds=delay)
    retry = dict(command)
    retry["attempt"] = attempt + 1
    retry.setdefault("first_attempt_at", iso(now))
    return Outcomes(command, settings, started).build(
        "deferred",
        code=failed.get("smtp_code"),
        reply=failed.get("smtp_reply") or "",
        error_class="transient",
        reason=f"attempt {attempt} got {failed.get('smtp_code')}; retry {attempt + 1} at {iso(until)}",
        defer_reason=DeferReason.TRANSIENT_ERROR.value,
        deferred_until=iso(until),
        command=retry,
    )


def refused_outcome(
    command: Mapping[str, Any], settings: Settings, refusal: Refusal, now: datetime, started: float
) -> Message:
    """The outcome of a send its claim refused: nothing went to SMTP.

    A paused campaign's send is parked (`campaign_paused`, due now: released
    once the campaign resumes), so is one behind an open breaker
    (`circuit_open`: its campaign is being paused); a cancelled campaign's, a suppressed address's
    and a duplicate command's are `outcome.skipped` with that error_class (the
    projections ignore `duplicate`: the first claim's outcome tells the truth).
    """
    if refusal.reason == "paused":
        return parked_outcome(command, settings, DeferReason.CAMPAIGN_PAUSED, now, started)
    if refusal.reason == "breaker":
        return parked_outcome(command, settings, DeferReason.CIRCUIT_OPEN, now, started)
    return Outcomes(command, settings, started).build(
        "skipped", error_class=refusal.reason, reason=refusal.detail
    )


def account_stopped(
    command: Mapping[str, Any], failed: Message, settings: Settings, now: datetime, started: float
) -> Message:
    """The send whose SMTP account was refused (AUTH failed): parked, not failed.

    The recipient is not at fault: the send waits with `circuit_open` while the
    reconciler opens the account's breaker (pausing its campaigns) on seeing it,
    and goes out once the campaign is resumed.
    """
    return Outcomes(command, settings, started).build(
        "deferred",
        code=failed.get("smtp_code"),
        reply=failed.get("smtp_reply") or "",
        error_class="auth",
        reason=f"the SMTP account refused our credentials: {failed.get('reason') or ''}".strip(),
        defer_reason=DeferReason.CIRCUIT_OPEN.value,
        deferred_until=iso(now),
        command=dict(command),
    )
