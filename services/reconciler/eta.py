"""When a campaign will finish, predicted from its limits, quota and working windows (B1).

Contract: `estimate(inputs)` simulates sending forward from `inputs.now` and
returns an `Eta`: `finish_at`, the instant the last remaining recipient is
sent, or `None` with `blocked_by` naming why the campaign cannot finish
(`QUOTA_EXHAUSTED` when the quota is smaller than what remains,
`OUTSIDE_HOURS` when the windows are never open together, or the binding
limit, `DAILY_LIMIT`, `CAMPAIGN_RATE` or `RATE_PER_HOUR`, when it would take
longer than `HORIZON`). `deadline_warning` says whether an ETA misses a deadline.

The model: the rate limiter is an exact sliding 60-minute window (a send at
`t` frees its token at `t + 1h`) and the senders are fast, so sends go out in
BURSTS, not evenly: 250 recipients at 100/h from an empty window at 09:00 go
out as 100 at 09:00, 100 at 10:00 and 50 at 11:00, finishing at 11:00.

- The rate is the smallest non-zero of `hourly_rate` and `campaign_rate`;
  neither means no rate limit (one block of unlimited tokens: everything goes
  at the first instant all windows are open, still split by the daily limit).
- Tokens live in blocks `(free_at, count)`. At the start there are
  `rate - sends in the window` tokens free at `max(now, not_before)`, and each
  send in the window gives its token back one hour after it was made: the
  real expiry of the limiter's tokens (`window_sends`, the scores of the
  account's sliding-window ZSET), so the finish does not move from one poll to
  the next while nothing changes. The oldest sends beyond `rate` give nothing
  back (the window holds more than the rate allows now). Without the times,
  `sent_last_hour` sends are assumed to leave the window all at `now + 1h`.
  No token is used before `not_before`.
- Other campaigns on the same account go first: `ahead` sends of theirs
  (higher priorities' remaining, and for each equal priority as many as this
  campaign sends, at most its remaining: the fair share) use the account's
  window too. The finish is the later of this campaign's own simulation and
  the account's (hourly rate and windows only) for `ahead + remaining` sends.
- Repeatedly the earliest block is taken. Its send instant `s` is the first
  instant `>= free_at` when every window is open and the manager's daily
  budget of that local day of `time_zone` is left (`daily_limit`, with
  `sent_today` already spent today). `k = min(count, left, budget)` go out at
  `s` as one burst and their `k` tokens come back as a block at `s + 1h`;
  tokens the daily limit could not use wait for the next local day.
- With a measured `throughput_per_hour` the sender is a single serial
  resource: a burst of `k` takes `k / throughput` hours (its last send is at
  `s + k / throughput h`), the next burst starts when it is done, and a burst
  stops where the windows close (only sends that complete by then go; the rest
  wait for the next opening).
- The finish is the instant of the last send, rounded to the second.

Blocks freeing at the same instant are merged, so a campaign takes about one
step per burst; and once the state at a local midnight (blocks and sender
relative to it) equals the state a week before and no zone changes its clock,
the following weeks repeat it and are skipped whole. Any estimate takes a few
milliseconds at most.
"""

from __future__ import annotations

import heapq
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from services.pipeline.defer_reasons import DeferReason
from services.pipeline.working_hours import (
    MINUTES_PER_DAY,
    SEARCH_DAYS,
    WorkingHours,
    local_instant,
    open_intervals_all,
    zone,
)

HORIZON = timedelta(days=366)  # beyond this a campaign counts as unable to finish

# The simulation counts time in integer microseconds since the epoch (exact arithmetic).
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)
_SECOND = 1_000_000
_HOUR = 3600 * _SECOND
_WEEK = 7 * 24 * _HOUR
_SEARCH = SEARCH_DAYS * 24 * _HOUR
_NEVER = 1 << 62  # the end of an open stretch that never ends (no windows)
_UNLIMITED = 1 << 62  # the tokens of a block when there is no rate limit


def _us(at: datetime) -> int:
    return (at - _EPOCH) // _US


def _at(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)


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
    window_sends: Sequence[datetime] = ()  # when each of them was made (exact token expiry)
    ahead: int = 0  # other campaigns' sends that go before this one's on the account
    quota: int | None = None  # emails_available; None = no quota
    windows: Sequence[WorkingHours] = ()  # all must be open to send
    time_zone: str = "Europe/Moscow"  # for daily boundaries
    not_before: datetime | None = None  # the campaign is deferred until then
    throughput_per_hour: float = 0.0  # measured sender speed; 0 = unknown (bursts are instant)

    def __post_init__(self) -> None:
        for name in ("now", "not_before"):
            value = getattr(self, name)
            if value is not None and (value.tzinfo is None or value.utcoffset() is None):
                raise ValueError(f"EtaInputs.{name} must be an aware datetime, got {value!r}")
        for name in ("remaining", "hourly_rate", "campaign_rate", "daily_limit", "sent_today",
                     "sent_last_hour", "throughput_per_hour", "ahead"):
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


def _rate(inputs: EtaInputs) -> int:
    """The binding per-hour rate: the smallest non-zero limit, 0 when there is none."""
    rates = [r for r in (inputs.hourly_rate, inputs.campaign_rate) if r > 0]
    return min(rates) if rates else 0


def _binding_limit(inputs: EtaInputs, hit_daily: bool) -> DeferReason:
    """The limit to blame when the campaign would not finish within the horizon."""
    if hit_daily:
        return DeferReason.DAILY_LIMIT
    if inputs.campaign_rate > 0 and (inputs.hourly_rate == 0 or inputs.campaign_rate < inputs.hourly_rate):
        return DeferReason.CAMPAIGN_RATE
    return DeferReason.RATE_PER_HOUR


class _OpenTimes:
    """When every window is open: merged `[start, end)` stretches, computed a week at a time."""

    def __init__(self, windows: Sequence[WorkingHours], origin: int) -> None:
        self._windows = tuple(windows)
        self.restart(origin)

    def restart(self, origin: int) -> None:
        """Forget what was computed; no question will be asked about instants before `origin`."""
        self._starts: list[int] = []
        self._ends: list[int] = []
        self._until = origin

    def _extend(self) -> None:
        start, end = self._until, self._until + _WEEK
        for low, high in open_intervals_all(self._windows, _at(start), _at(end)):
            a, b = _us(low), _us(high)
            if self._ends and self._ends[-1] == a:  # one stretch across a week's edge or two windows
                self._ends[-1] = b
            else:
                self._starts.append(a)
                self._ends.append(b)
        self._until = end

    def next(self, at: int) -> tuple[int, int] | None:
        """The first instant `>= at` when all windows are open and when that open stretch ends.

        None when they do not open within `SEARCH_DAYS` days.
        """
        if not self._windows:
            return at, _NEVER
        while True:
            i = bisect_right(self._ends, at)
            if i < len(self._ends):
                end = self._ends[i]
                if end < self._until or end - at > _SEARCH:  # the stretch's real end (or far enough)
                    return max(self._starts[i], at), end
            elif self._until - at > _SEARCH:
                return None
            self._extend()


class _Days:
    """The local calendar day of an instant in one zone: (ordinal, start, end), cached."""

    def __init__(self, tz: ZoneInfo) -> None:
        self._tz = tz
        self._day = (0, 0, 0)

    def of(self, at: int) -> tuple[int, int, int]:
        ordinal, start, end = self._day
        if not start <= at < end:
            day = _at(at).astimezone(self._tz).date()
            ordinal = day.toordinal()
            start = _us(local_instant(day, 0, self._tz))
            end = _us(local_instant(day, MINUTES_PER_DAY, self._tz))
            self._day = (ordinal, start, end)
        return ordinal, start, end


class _Blocks:
    """Free tokens as blocks `free_at -> count`; blocks freeing at the same instant merge."""

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self._heap: list[int] = []

    def add(self, at: int, count: int) -> None:
        if count <= 0:
            return
        if at in self.counts:
            self.counts[at] += count
        else:
            self.counts[at] = count
            heapq.heappush(self._heap, at)

    def pop(self) -> tuple[int, int]:
        at = heapq.heappop(self._heap)
        return at, self.counts.pop(at)

    def __bool__(self) -> bool:
        return bool(self._heap)

    def relative_to(self, origin: int) -> tuple[tuple[int, int], ...]:
        """The blocks with times relative to `origin`, those freed earlier counted as freed at it."""
        merged: dict[int, int] = {}
        for at, count in self.counts.items():
            key = max(at, origin) - origin
            merged[key] = merged.get(key, 0) + count
        return tuple(sorted(merged.items()))

    def reset(self, blocks: tuple[tuple[int, int], ...], origin: int) -> None:
        self.counts = {origin + at: count for at, count in blocks}
        self._heap = sorted(self.counts)


def _steady(zones: Sequence[ZoneInfo], a: int, b: int) -> bool:
    """Whether every zone has the same UTC offset at the instants `a` and `b`."""
    at_a, at_b = _at(a), _at(b)
    return all(at_a.astimezone(z).utcoffset() == at_b.astimezone(z).utcoffset() for z in zones)


def estimate(inputs: EtaInputs) -> Eta:
    """Simulate the remaining sends burst by burst and say when the last one goes out; with
    other campaigns ahead on the account, the later of this campaign's own finish and the
    account's finish of everything up to this campaign's last send."""
    own = _estimate(replace(inputs, ahead=0))
    if inputs.ahead <= 0 or own.finish_at is None or inputs.remaining <= 0:
        return own
    account = _estimate(replace(inputs, remaining=inputs.remaining + inputs.ahead, campaign_rate=0,
                                daily_limit=0, sent_today=0, quota=None, ahead=0))
    if account.finish_at is None:
        return account
    return own if own.finish_at >= account.finish_at else account


def _estimate(inputs: EtaInputs) -> Eta:
    now = inputs.now.astimezone(UTC)
    if inputs.remaining <= 0:
        return Eta(now, None)
    if inputs.quota is not None and inputs.quota < inputs.remaining:
        return Eta(None, DeferReason.QUOTA_EXHAUSTED)

    now_us = _us(now)
    start = now_us if inputs.not_before is None else max(now_us, _us(inputs.not_before))
    horizon = now_us + HORIZON // _US
    left = inputs.remaining
    rate = _rate(inputs)
    throughput = float(inputs.throughput_per_hour)
    daily = inputs.daily_limit
    tz = zone(inputs.time_zone)
    zones = [tz, *(w.tz for w in inputs.windows)]
    open_times = _OpenTimes(inputs.windows, start)
    days = _Days(tz)
    today = days.of(now_us)[0]
    used: dict[int, int] = {today: inputs.sent_today} if daily else {}  # sends per local day

    blocks = _Blocks()

    def free(at: int, count: int) -> bool:
        """Add a block, moved to the next instant all windows are open; False if they never are."""
        opened = open_times.next(at)
        if opened is None:
            return False
        blocks.add(opened[0], count)
        return True

    if rate > 0 and inputs.window_sends:
        made = sorted(_us(t.astimezone(UTC)) for t in inputs.window_sends
                      if now_us - _HOUR < _us(t.astimezone(UTC)) <= now_us)
        returning = made[max(0, len(made) - rate):]  # beyond the rate, the oldest give nothing back
        if not free(start, rate - len(returning)):
            return Eta(None, DeferReason.OUTSIDE_HOURS)
        for at in returning:
            if not free(max(at + _HOUR, start), 1):
                return Eta(None, DeferReason.OUTSIDE_HOURS)
    elif rate > 0:
        in_window = min(inputs.sent_last_hour, rate)
        if not (free(start, rate - in_window) and free(max(now_us + _HOUR, start), in_window)):
            return Eta(None, DeferReason.OUTSIDE_HOURS)
    elif not free(start, _UNLIMITED):  # no rate limit: tokens without end, never coming back
        return Eta(None, DeferReason.OUTSIDE_HOURS)

    hit_daily = False
    busy = start  # the sender is done with its previous burst (with a throughput)
    current_day = -1
    snapshots: dict[int, tuple[Any, int]] = {}  # local midnight -> (state relative to it, left)
    while blocks:
        t, count = blocks.pop()
        opened = open_times.next(max(t, busy))
        if opened is None:
            return Eta(None, DeferReason.OUTSIDE_HOURS)
        s, stretch_end = opened
        if s >= horizon:
            break
        ordinal, day_start, day_end = days.of(s)

        if ordinal != current_day:
            current_day = ordinal
            if ordinal != today and day_start >= start:
                # The first burst of a new local day: remember the state at its midnight, and
                # when it equals the state a week earlier, the weeks to come repeat that week.
                blocks.add(t, count)
                state = (blocks.relative_to(day_start), max(busy, day_start) - day_start)
                before = snapshots.get(day_start - _WEEK)
                weeks = per_week = 0
                if before is not None and before[0] == state and _steady(zones, day_start - _WEEK, day_start):
                    per_week = before[1] - left
                    at = day_start
                    while (left > (weeks + 1) * per_week and at + _WEEK < horizon
                           and _steady(zones, at, at + _WEEK)):
                        weeks += 1
                        at += _WEEK
                if weeks:
                    left -= weeks * per_week
                    origin = day_start + weeks * _WEEK
                    blocks.reset(state[0], origin)
                    busy = origin + state[1]
                    open_times.restart(origin)
                    snapshots.clear()
                    current_day = -1
                else:
                    snapshots = {d: v for d, v in snapshots.items() if d > day_start - _WEEK - _HOUR * 24}
                    snapshots[day_start] = (state, left)
                continue  # take the earliest block again

        budget = daily - used.get(ordinal, 0) if daily else left
        cap = count
        if throughput > 0 and stretch_end != _NEVER:  # only sends done before the windows close
            cap = int((stretch_end - s) * throughput / _HOUR + 1e-9)
        k = max(0, min(count, left, budget, cap))
        if k > 0:
            left -= k
            if daily:
                used[ordinal] = used.get(ordinal, 0) + k
                hit_daily = hit_daily or used[ordinal] >= daily
            last = s + (round(k * _HOUR / throughput) if throughput > 0 else 0)
            if left == 0:
                return Eta(_at((last + _SECOND // 2) // _SECOND * _SECOND), None)
            busy = last
            if rate > 0 and not free(s + _HOUR, k):
                return Eta(None, DeferReason.OUTSIDE_HOURS)
        if k < count:  # the rest waits for the next local day and/or the next opening
            later = s
            if k >= budget:
                hit_daily = True
                later = max(later, day_end)
            if k >= cap:
                later = max(later, stretch_end)
            if not free(later, count - k if rate > 0 else _UNLIMITED):
                return Eta(None, DeferReason.OUTSIDE_HOURS)
    return Eta(None, _binding_limit(inputs, hit_daily))


def deadline_warning(eta: Eta, deadline: datetime | None) -> bool:
    """True when the campaign will not finish by `deadline` (no deadline: never)."""
    if deadline is None:
        return False
    return eta.finish_at is None or eta.finish_at > deadline
