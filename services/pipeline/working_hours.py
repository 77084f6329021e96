"""Working hours: when an account or a campaign may send, in its own time zone.

Contract: `WorkingHours` is one daily window `[start, end)` of local wall-clock
time on the listed ISO weekdays (1=Mon..7=Sun) in an IANA time zone; windows
never cross midnight and an end of 24:00 runs to the next local midnight.
`WorkingHours.parse` and `from_json` raise `WorkingHoursError` (a `ValueError`)
naming the bad part. All answers are DST-correct: a window bound that falls
into a skipped hour (spring forward) starts at the moment the clock jumps, and
a bound that occurs twice (fall back) means its first occurrence. Instants
passed in must be aware (any zone); instants returned are aware UTC.
`next_open_all` is the earliest instant at which every given window is open;
`local_day` names the local calendar day of an instant and when it ends.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

MINUTES_PER_DAY = 1440
SEARCH_DAYS = 14  # how far `next_open` and `next_open_all` look before giving up

_HOURS_RE = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")


class WorkingHoursError(ValueError):
    """A working-hours setting that cannot be understood, or no open time to be found."""


def zone(time_zone: str) -> ZoneInfo:
    """The `ZoneInfo` named `time_zone`; `WorkingHoursError` for an unknown or malformed name."""
    if not isinstance(time_zone, str) or not time_zone.strip():
        raise WorkingHoursError(f"time zone {time_zone!r} is empty; use an IANA name like 'Europe/Moscow'")
    try:
        return ZoneInfo(time_zone)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise WorkingHoursError(
            f"time zone {time_zone!r} is not a known IANA name (e.g. 'Europe/Moscow', 'UTC')"
        ) from None


def _aware(at: datetime, what: str = "at") -> datetime:
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError(f"{what} must be an aware datetime (with a time zone), got {at!r}")
    return at


def _wall(at: datetime, tz: ZoneInfo) -> datetime:
    """The naive local wall-clock time of the instant `at`."""
    return at.astimezone(tz).replace(tzinfo=None)


@lru_cache(maxsize=8192)
def local_instant(day: date, minute: int, tz: ZoneInfo) -> datetime:
    """The first instant (aware UTC) at which the wall clock of `day` reads `minute` or later.

    `minute` 1440 is the next day's midnight. A wall time skipped by a DST jump
    maps to the moment of the jump; a repeated one to its first occurrence.
    """
    if minute >= MINUTES_PER_DAY:
        day, minute = day + timedelta(days=1), minute - MINUTES_PER_DAY
    hour, minute = divmod(minute, 60)
    naive = datetime(day.year, day.month, day.day, hour, minute)
    before = tz.utcoffset(naive)  # fold=0: the offset in force before a transition
    after = tz.utcoffset(naive.replace(fold=1))  # fold=1: the offset after it
    assert before is not None and after is not None
    if before >= after:  # an ordinary wall time, or the first occurrence of a repeated one
        return naive.replace(tzinfo=UTC) - before
    # A skipped wall time: `naive - after` is an instant before the jump and
    # `naive - before` one after it. Find the jump to the second.
    low = int((naive.replace(tzinfo=UTC) - after).timestamp())
    high = int((naive.replace(tzinfo=UTC) - before).timestamp())
    while high - low > 1:
        mid = (low + high) // 2
        if _wall(datetime.fromtimestamp(mid, UTC), tz) >= naive:
            high = mid
        else:
            low = mid
    return datetime.fromtimestamp(high, UTC)


def _parse_clock(hour: str, minute: str, what: str, text: str) -> int:
    h, m = int(hour), int(minute)
    if m > 59 or h > 24 or (h == 24 and m != 0):
        raise WorkingHoursError(f"working hours {text!r}: {what} time {hour}:{minute} is not a time of day")
    return h * 60 + m


def _parse_hours(text: str) -> tuple[int, int]:
    if not isinstance(text, str):
        raise WorkingHoursError(f"working hours must be a string like '09:00-18:00', got {text!r}")
    match = _HOURS_RE.match(text)
    if match is None:
        raise WorkingHoursError(
            f"working hours {text!r} are not of the form 'HH:MM-HH:MM' (e.g. '09:00-18:00')")
    start = _parse_clock(match[1], match[2], "start", text)
    end = _parse_clock(match[3], match[4], "end", text)
    if start >= MINUTES_PER_DAY:
        raise WorkingHoursError(f"working hours {text!r}: the start must be before 24:00")
    if end <= start:
        raise WorkingHoursError(
            f"working hours {text!r}: the end must be after the start "
            "(windows across midnight are not supported; use 24:00 as the end of a day)"
        )
    return start, end


def _parse_days(text: str | Iterable[int]) -> frozenset[int]:
    if not isinstance(text, str):
        try:
            days = frozenset(int(d) for d in text)
        except (TypeError, ValueError):
            raise WorkingHoursError(f"working days {text!r} are not ISO weekday numbers 1..7") from None
        _check_days(days, repr(text))
        return days
    if not text.strip():
        raise WorkingHoursError("working days are empty; use e.g. '1-5' (Mon-Fri) or '1-7'")
    result: set[int] = set()
    for part in text.split(","):
        piece = part.strip()
        bounds = [b.strip() for b in piece.split("-")]
        if len(bounds) > 2 or not all(b.isdigit() for b in bounds):
            raise WorkingHoursError(
                f"working days {text!r}: {piece!r} is not a weekday (1..7) or a range like '1-5'"
            )
        low, high = int(bounds[0]), int(bounds[-1])
        if not (1 <= low <= 7 and 1 <= high <= 7):
            raise WorkingHoursError(f"working days {text!r}: {piece!r} is outside 1 (Mon)..7 (Sun)")
        if low > high:
            raise WorkingHoursError(f"working days {text!r}: range {piece!r} runs backwards")
        result.update(range(low, high + 1))
    return frozenset(result)


def _check_days(days: frozenset[int], shown: str) -> None:
    if not days:
        raise WorkingHoursError(f"working days {shown} are empty; at least one weekday 1..7 is needed")
    bad = sorted(d for d in days if not (isinstance(d, int) and 1 <= d <= 7))
    if bad:
        raise WorkingHoursError(f"working days {shown}: {bad} outside 1 (Mon)..7 (Sun)")


def _clock(minute: int) -> str:
    return f"{minute // 60:02d}:{minute % 60:02d}"


def days_text(days: Iterable[int]) -> str:
    """`days` in the compact syntax `parse` reads: {1,2,3,5} -> '1-3,5'."""
    ordered = sorted(set(days))
    parts: list[str] = []
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(parts)


@dataclass(frozen=True)
class WorkingHours:
    """A daily sending window `[start_minute, end_minute)` on `days`, in `time_zone`."""

    start_minute: int  # minutes after local midnight, 0..1439
    end_minute: int  # 1..1440 (1440 = 24:00, the next local midnight), > start_minute
    days: frozenset[int]  # ISO weekdays 1=Mon..7=Sun, non-empty
    time_zone: str  # IANA name
    _tz: ZoneInfo = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        if not (0 <= self.start_minute < MINUTES_PER_DAY):
            raise WorkingHoursError(f"working hours start {self.start_minute} is outside 0..1439 minutes")
        if not (0 < self.end_minute <= MINUTES_PER_DAY):
            raise WorkingHoursError(f"working hours end {self.end_minute} is outside 1..1440 minutes")
        if self.end_minute <= self.start_minute:
            raise WorkingHoursError(
                f"working hours {self.describe()}: the end must be after the start "
                "(windows across midnight are not supported)"
            )
        _check_days(frozenset(self.days), repr(sorted(self.days)))
        object.__setattr__(self, "days", frozenset(self.days))
        object.__setattr__(self, "_tz", zone(self.time_zone))

    @classmethod
    def parse(
        cls, hours: str = "09:00-18:00", days: str = "1-5", time_zone: str = "Europe/Moscow"
    ) -> WorkingHours:
        """Working hours from their settings text, e.g. ('10:00-17:00', '1-3,6', 'Europe/Berlin')."""
        start, end = _parse_hours(hours)
        return cls(start, end, _parse_days(days), time_zone)

    @classmethod
    def from_json(cls, obj: Mapping[str, Any], default: WorkingHours | None = None) -> WorkingHours:
        """From `{"hours": ..., "days": ..., "time_zone": ...}`; missing keys come from `default`."""
        if not isinstance(obj, Mapping):
            raise WorkingHoursError(f"working hours must be an object, got {type(obj).__name__}")
        unknown = sorted(set(obj) - {"hours", "days", "time_zone"})
        if unknown:
            raise WorkingHoursError(f"working hours: unknown keys {unknown} (known: hours, days, time_zone)")
        base = default.to_json() if default is not None else {
            "hours": "09:00-18:00", "days": "1-5", "time_zone": "Europe/Moscow"}
        start, end = _parse_hours(obj.get("hours", base["hours"]))
        return cls(start, end, _parse_days(obj.get("days", base["days"])),
                   obj.get("time_zone", base["time_zone"]))

    def to_json(self) -> dict[str, str]:
        """The JSON `from_json` reads back to an equal value."""
        return {"hours": self.describe(), "days": days_text(self.days), "time_zone": self.time_zone}

    def describe(self) -> str:
        """The window as 'HH:MM-HH:MM', e.g. '09:00-18:00'."""
        return f"{_clock(self.start_minute)}-{_clock(self.end_minute)}"

    @property
    def tz(self) -> ZoneInfo:
        """The window's time zone."""
        return self._tz

    def _window(self, day: date) -> tuple[datetime, datetime] | None:
        """The window of local date `day` as UTC `[start, end)`, or None when it does not open."""
        if day.isoweekday() not in self.days:
            return None
        start = local_instant(day, self.start_minute, self._tz)
        end = local_instant(day, self.end_minute, self._tz)
        return (start, end) if start < end else None

    def _windows_from(self, at: datetime, days: int) -> Iterable[tuple[datetime, datetime]]:
        # A window never runs past the midnight that ends its day, so the window
        # of the local date of `at` is the first that may hold it.
        first = at.astimezone(self._tz).date()
        for offset in range(days + 1):
            window = self._window(first + timedelta(days=offset))
            if window is not None:
                yield window

    def open_intervals(self, start: datetime, end: datetime) -> list[tuple[datetime, datetime]]:
        """The parts of `[start, end)` inside this window, in order, as aware UTC pairs."""
        start, end = _aware(start, "start").astimezone(UTC), _aware(end, "end").astimezone(UTC)
        if end <= start:
            return []
        first, last = start.astimezone(self._tz).date(), end.astimezone(self._tz).date()
        result: list[tuple[datetime, datetime]] = []
        for offset in range((last - first).days + 1):
            window = self._window(first + timedelta(days=offset))
            if window is not None and window[1] > start and window[0] < end:
                result.append((max(window[0], start), min(window[1], end)))
        return result

    def is_open(self, at: datetime) -> bool:
        """Whether sending is allowed at the instant `at`."""
        at = _aware(at).astimezone(UTC)
        return any(start <= at < end for start, end in self._windows_from(at, 1))

    def next_open(self, at: datetime) -> datetime:
        """`at` (as UTC) when open, else the start of the next window."""
        at = _aware(at).astimezone(UTC)
        for start, end in self._windows_from(at, SEARCH_DAYS):
            if at < end:
                return max(start, at)
        raise WorkingHoursError(f"working hours {self.describe()} never open within {SEARCH_DAYS} days")

    def window_end(self, at: datetime) -> datetime:
        """The end of the window containing `at`; `WorkingHoursError` when `at` is outside every window."""
        at = _aware(at).astimezone(UTC)
        for start, end in self._windows_from(at, 1):
            if start <= at < end:
                return end
        raise WorkingHoursError(f"{at.isoformat()} is outside the working hours {self.describe()}")


ALWAYS = WorkingHours(0, MINUTES_PER_DAY, frozenset(range(1, 8)), "UTC")


def next_open_all(windows: Sequence[WorkingHours], at: datetime) -> datetime:
    """The earliest instant `>= at` (aware UTC) at which all `windows` are open.

    `WorkingHoursError` when there is none within `SEARCH_DAYS` days (e.g. the
    windows are on disjoint days).
    """
    at = _aware(at).astimezone(UTC)
    limit = at + timedelta(days=SEARCH_DAYS)
    t = at
    while t <= limit:
        moved = t
        for window in windows:
            moved = max(moved, window.next_open(moved))
        if moved == t:
            return t
        t = moved
    shown = ", ".join(f"{w.describe()} ({days_text(w.days)}, {w.time_zone})" for w in windows)
    raise WorkingHoursError(f"the working hours {shown} are never all open at once within {SEARCH_DAYS} days")


def open_intervals_all(
    windows: Sequence[WorkingHours], start: datetime, end: datetime
) -> list[tuple[datetime, datetime]]:
    """The parts of `[start, end)` when every window in `windows` is open (aware UTC pairs, in order)."""
    start, end = _aware(start, "start").astimezone(UTC), _aware(end, "end").astimezone(UTC)
    result = [(start, end)] if start < end else []
    for window in windows:
        if not result:
            break
        result = _intersect(result, window.open_intervals(result[0][0], result[-1][1]))
    return result


def _intersect(
    a: list[tuple[datetime, datetime]], b: list[tuple[datetime, datetime]]
) -> list[tuple[datetime, datetime]]:
    """The intersection of two ordered lists of disjoint intervals."""
    result: list[tuple[datetime, datetime]] = []
    i = j = 0
    while i < len(a) and j < len(b):
        low, high = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if low < high:
            result.append((low, high))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return result


def local_day(at: datetime, time_zone: str) -> tuple[str, datetime]:
    """('YYYY-MM-DD' of the local calendar day of `at`, the next local midnight as aware UTC)."""
    tz = zone(time_zone)
    day = _aware(at).astimezone(tz).date()
    return day.isoformat(), local_instant(day, MINUTES_PER_DAY, tz)
