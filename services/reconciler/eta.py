"""When a campaign will finish, predicted from its limits, quota and working windows (B1).

Contract: `estimate(inputs)` simulates sending forward from `inputs.now` and
returns an `Eta`: `finish_at`, the instant the last remaining recipient is
sent, or `None` with `blocked_by` naming why the campaign cannot finish
(`QUOTA_EXHAUSTED` when the quota is smaller than what remains,
`OUTSIDE_HOURS` when the windows are never open together, or the binding
limit when it would take longer than `HORIZON`).

The model: sends go out evenly at the effective hourly rate (the smallest
non-zero of the account rate, the campaign rate and the measured throughput;
none means no rate limit), only while every window is open, at most
`daily_limit` per local day of `time_zone` (`sent_today` already used today),
never before `not_before`. The account's `sent_last_hour` occupy its sliding
window, so the first hour after `now` holds only `hourly_rate -
sent_last_hour` sends. The simulation steps per local day and open segment,
and skips whole weeks that repeat the last one (no DST change in any zone), so
it takes about a millisecond for any size. `deadline_warning` says whether an
ETA misses a deadline.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from services.pipeline.defer_reasons import DeferReason
from services.pipeline.working_hours import SEARCH_DAYS, WorkingHours, local_day, open_intervals_all, zone

HORIZON = timedelta(days=366)  # beyond this a campaign counts as unable to finish
_EPSILON = 1e-6  # sends; fractions below this are float noise
_HOUR = 3600.0
_WEEK = timedelta(days=7)


@dataclass(frozen=True)
class EtaInputs:
    """Everything the estimate depends on; counts are recipients, rates are per hour."""

    now: datetime  # aware
    remaining: int  # recipients not yet in a terminal state
    hourly_rate: int  # account's per-hour rate (0 = unlimited)
    campaign_rate: int = 0  # campaign override per hour (0 = none)
    daily_limit: int = 0  # per manager per local day (0 = none)
    sent_today: int = 0  # manager's sends today already
    sent_last_hour: int = 0  # account's sends in the last 60 minutes (they occupy the window)
    quota: int | None = None  # emails_available; None = no quota
    windows: Sequence[WorkingHours] = ()  # all must be open to send
    time_zone: str = "Europe/Moscow"  # for daily boundaries
    not_before: datetime | None = None  # the campaign is deferred until then
    throughput_per_hour: float = 0.0  # measured sender speed cap; 0 = unknown (ignore)

    def __post_init__(self) -> None:
        for name in ("now", "not_before"):
            value = getattr(self, name)
            if value is not None and (value.tzinfo is None or value.utcoffset() is None):
                raise ValueError(f"EtaInputs.{name} must be an aware datetime, got {value!r}")
        for name in ("remaining", "hourly_rate", "campaign_rate", "daily_limit", "sent_today",
                     "sent_last_hour", "throughput_per_hour"):
            if getattr(self, name) < 0:
                raise ValueError(f"EtaInputs.{name} must not be negative, got {getattr(self, name)}")


@dataclass(frozen=True)
class Eta:
    """The predicted finish, or why there is none."""

    finish_at: datetime | None  # None when it cannot finish
    blocked_by: DeferReason | None  # e.g. QUOTA_EXHAUSTED when quota < remaining

    def to_json(self) -> dict[str, Any]:
        """`{"finish_at": ISO 8601 UTC with Z or null, "blocked_by": reason or null}`."""
        finish = None
        if self.finish_at is not None:
            finish = self.finish_at.astimezone(UTC).isoformat().replace("+00:00", "Z")
        return {"finish_at": finish,
                "blocked_by": None if self.blocked_by is None else self.blocked_by.value}


def _effective_rate(inputs: EtaInputs) -> float:
    limits = (inputs.hourly_rate, inputs.campaign_rate, inputs.throughput_per_hour)
    rates = [float(r) for r in limits if r > 0]
    return min(rates) if rates else math.inf


def _binding_limit(inputs: EtaInputs, hit_daily: bool) -> DeferReason:
    """The limit to blame when the campaign would not finish within the horizon."""
    if hit_daily:
        return DeferReason.DAILY_LIMIT
    if inputs.campaign_rate > 0 and (inputs.hourly_rate == 0 or inputs.campaign_rate < inputs.hourly_rate):
        return DeferReason.CAMPAIGN_RATE
    return DeferReason.RATE_PER_HOUR


def _whole_second(at: datetime) -> datetime:
    """`at` rounded to the nearest second (the model is no finer; this drops float noise)."""
    return (at + timedelta(microseconds=500_000)).replace(microsecond=0)


class _Sender:
    """The simulation's state: what is left to send and what the first hour still allows."""

    def __init__(self, left: float, rate: float, first_hour_end: datetime, first_budget: float) -> None:
        self.left = left
        self.rate = rate
        self.first_hour_end = first_hour_end
        self.first_budget = first_budget

    def send(self, start: datetime, end: datetime, allowed: float) -> tuple[float, datetime | None]:
        """Send during `[start, end)`, at most `allowed`; (sent, finish instant if the last one went)."""
        if start < self.first_hour_end < end:
            sent, finish = self.send(start, self.first_hour_end, allowed)
            if finish is not None:
                return sent, finish
            more, finish = self.send(self.first_hour_end, end, allowed - sent)
            return sent + more, finish
        in_first_hour = start < self.first_hour_end
        if in_first_hour:
            allowed = min(allowed, self.first_budget)
        by_time = self.rate * (end - start).total_seconds() / _HOUR
        if self.left <= allowed + _EPSILON and self.left <= by_time + _EPSILON:
            sent, finish = self.left, start + timedelta(seconds=_HOUR * self.left / self.rate)
        else:
            sent, finish = max(0.0, min(allowed, by_time)), None
        self.left -= sent
        if in_first_hour:
            self.first_budget -= sent
        return sent, finish


def _steady(zones: Sequence[ZoneInfo], instants: Sequence[datetime]) -> bool:
    """Whether every zone has the same UTC offset at all `instants` (no DST change between them)."""
    return all(len({at.astimezone(z).utcoffset() for at in instants}) == 1 for z in zones)


def estimate(inputs: EtaInputs) -> Eta:
    """Simulate the remaining sends forward and say when the last one goes out."""
    now = inputs.now.astimezone(UTC)
    if inputs.remaining <= 0:
        return Eta(now, None)
    if inputs.quota is not None and inputs.quota < inputs.remaining:
        return Eta(None, DeferReason.QUOTA_EXHAUSTED)

    # The account's sliding window still holds `sent_last_hour` during the first hour.
    first_budget = (max(0.0, float(inputs.hourly_rate - inputs.sent_last_hour))
                    if inputs.hourly_rate > 0 else math.inf)
    first_hour_end = now + timedelta(hours=1)
    sender = _Sender(float(inputs.remaining), _effective_rate(inputs), first_hour_end, first_budget)
    daily = float(inputs.daily_limit) if inputs.daily_limit > 0 else math.inf
    today, _ = local_day(now, inputs.time_zone)
    zones = [zone(inputs.time_zone), *(w.tz for w in inputs.windows)]
    horizon = now + HORIZON
    hit_daily = False
    week: deque[tuple[datetime, float]] = deque(maxlen=7)  # (local midnight, sent that day)

    t = now if inputs.not_before is None else max(now, inputs.not_before.astimezone(UTC))
    last_open = t
    whole_day = False  # the first day is partial
    while t < horizon:
        day, day_end = local_day(t, inputs.time_zone)
        day_left = max(0.0, daily - inputs.sent_today) if day == today else daily
        segments = open_intervals_all(inputs.windows, t, day_end)
        if segments:
            last_open = t
        elif day_end - last_open > timedelta(days=SEARCH_DAYS):
            return Eta(None, DeferReason.OUTSIDE_HOURS)
        sent_on_day = 0.0
        for start, end in segments:
            if day_left <= _EPSILON:
                break
            sent, finish = sender.send(start, end, day_left)
            if finish is not None:
                return Eta(_whole_second(finish), None)
            day_left -= sent
            sent_on_day += sent
        hit_daily = hit_daily or day_left <= _EPSILON
        if whole_day and t >= first_hour_end:
            week.append((t, sent_on_day))  # free of the first day's and first hour's special cases
        t, whole_day = day_end, True
        # Once a whole week has been simulated and no clock changes, the next week repeats it.
        if len(week) == 7 and week[0][0] == t - _WEEK and _steady(zones, (t - _WEEK, t)):
            per_week = sum(sent for _, sent in week)
            while (per_week > _EPSILON and sender.left > per_week + _EPSILON and t + _WEEK < horizon
                   and _steady(zones, (t, t + _WEEK))):
                sender.left -= per_week
                t += _WEEK
                last_open = t
            week.clear()
    return Eta(None, _binding_limit(inputs, hit_daily))


def deadline_warning(eta: Eta, deadline: datetime | None) -> bool:
    """True when the campaign will not finish by `deadline` (no deadline: never)."""
    if deadline is None:
        return False
    return eta.finish_at is None or eta.finish_at > deadline
