"""The time every limit, window and deferral is measured on.

Contract: `Clock.now()` is an aware UTC datetime and `Clock.time()` the same
instant as epoch seconds. `SystemClock` is the wall clock. `CompressedClock`
runs `speed` times faster than the wall clock and reads `start` at the wall
time `anchor`; processes given the same three values agree on the time, which
is how tests run hours of limits in seconds. `FileClock` reads those three
values from a file and follows its changes, so a test can also jump every
process forward at once. `clock_from_settings()` picks one from `MAILER_CLOCK_FILE`.
"""

from __future__ import annotations

import os
import time as _time
from datetime import UTC, datetime
from typing import Protocol

import orjson

from services.pipeline.settings import Settings, SettingsError


class Clock(Protocol):
    """A source of the current time."""

    def time(self) -> float:
        """Now, in epoch seconds."""
        ...

    def now(self) -> datetime:
        """Now, as an aware UTC datetime."""
        ...


class SystemClock:
    """The wall clock."""

    def time(self) -> float:
        return _time.time()

    def now(self) -> datetime:
        return datetime.now(UTC)


class CompressedClock:
    """A clock that reads `start` at wall time `anchor` and runs `speed` times faster."""

    def __init__(self, start: datetime, anchor: float, speed: float) -> None:
        if start.tzinfo is None:
            raise ValueError("a compressed clock needs an aware start time")
        if speed <= 0:
            raise ValueError("a compressed clock needs a positive speed")
        self.start = start.timestamp()
        self.anchor = anchor
        self.speed = speed

    def time(self) -> float:
        return self.start + (_time.time() - self.anchor) * self.speed

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.time(), UTC)


class FileClock:
    """A compressed clock whose start, anchor and speed a JSON file holds and may change.

    The file is `{"start": ISO time, "anchor": wall epoch seconds, "speed": x}`; it is
    re-read when it changes (checked at most every `CHECK_EVERY` wall seconds), so a
    test can move every process's time forward at once (e.g. from 18:00 to 08:59).
    Writers replace the file atomically and only ever move time forward.
    """

    CHECK_EVERY = 0.05

    def __init__(self, path: str) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._checked = 0.0
        self._clock = self._load()

    def _load(self) -> CompressedClock:
        try:
            with open(self.path, "rb") as fh:
                stat = os.fstat(fh.fileno())
                spec = orjson.loads(fh.read())
            start = datetime.fromisoformat(str(spec["start"]).replace("Z", "+00:00"))
            clock = CompressedClock(start, float(spec["anchor"]), float(spec.get("speed", 1.0)))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise SettingsError(f"MAILER_CLOCK_FILE cannot be used: {exc}") from None
        self._stamp = (stat.st_mtime_ns, stat.st_ino, stat.st_size)
        return clock

    def _current(self) -> CompressedClock:
        wall = _time.monotonic()
        if wall - self._checked >= self.CHECK_EVERY:
            self._checked = wall
            try:
                stat = os.stat(self.path)
                if (stat.st_mtime_ns, stat.st_ino, stat.st_size) != self._stamp:
                    self._clock = self._load()
            except (OSError, SettingsError):
                pass  # keep the last good clock while the file is being replaced
        return self._clock

    def time(self) -> float:
        return self._current().time()

    def now(self) -> datetime:
        return self._current().now()


def write_clock_file(path: str, start: datetime, speed: float, anchor: float | None = None) -> None:
    """Point every FileClock reading `path` at `start` from now (or `anchor`) on, at `speed`."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as fh:
        fh.write(orjson.dumps({
            "start": start.isoformat(), "anchor": _time.time() if anchor is None else anchor,
            "speed": speed,
        }))
    os.replace(tmp, path)


def clock_from_settings(settings: Settings) -> Clock:
    """The system clock, or the file-driven compressed clock `MAILER_CLOCK_FILE` names."""
    if not settings.clock_file:
        return SystemClock()
    return FileClock(settings.clock_file)
