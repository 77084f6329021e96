"""Clocks: compressed time arithmetic, the file-driven clock, and picking one from settings."""

from __future__ import annotations

import os
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import orjson
import pytest

from services.pipeline import clock as clock_module
from services.pipeline.clock import (
    CompressedClock,
    FileClock,
    SystemClock,
    clock_from_settings,
    write_clock_file,
)
from services.pipeline.settings import Settings, SettingsError

START = datetime(2025, 1, 16, 17, 59, 0, tzinfo=UTC)  # a Thursday, 20:59 in Moscow


class FakeTime:
    """Stands in for the `time` module inside services.pipeline.clock."""

    def __init__(self, wall: float = 1_000_000.0, mono: float = 5_000.0) -> None:
        self.wall = wall
        self.mono = mono

    def time(self) -> float:
        return self.wall

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds


@pytest.fixture
def fake_time(monkeypatch: pytest.MonkeyPatch) -> FakeTime:
    fake = FakeTime()
    monkeypatch.setattr(clock_module, "_time", fake)
    return fake


# --- CompressedClock ----------------------------------------------------------------------


@pytest.mark.parametrize("speed", [1.0, 60.0, 3600.0, 0.5])
@pytest.mark.parametrize("elapsed", [0.0, 1.0, 10.5, 600.0])
def test_compressed_clock_runs_speed_times_faster(fake_time: FakeTime, speed: float, elapsed: float) -> None:
    clock = CompressedClock(START, fake_time.wall, speed)
    assert clock.time() == START.timestamp()
    assert clock.now() == START
    fake_time.advance(elapsed)
    assert clock.time() == pytest.approx(START.timestamp() + elapsed * speed)
    assert abs(clock.now() - (START + timedelta(seconds=elapsed * speed))) <= timedelta(microseconds=1)
    assert clock.now().tzinfo is UTC


def test_compressed_clock_reads_start_at_anchor_not_at_creation(fake_time: FakeTime) -> None:
    anchor = fake_time.wall - 10.0  # the anchor was 10 wall seconds ago
    clock = CompressedClock(START, anchor, 60.0)
    assert clock.time() == START.timestamp() + 600.0
    assert clock.now() == START + timedelta(minutes=10)
    future = CompressedClock(START, fake_time.wall + 1.0, 60.0)  # anchor still to come
    assert future.time() == START.timestamp() - 60.0


def test_compressed_clock_start_in_another_zone_is_the_same_instant(fake_time: FakeTime) -> None:
    moscow = START.astimezone(timezone(timedelta(hours=3)))
    clock = CompressedClock(moscow, fake_time.wall, 10.0)
    assert clock.now() == START
    assert clock.now().utcoffset() == timedelta(0)


def test_compressed_clock_needs_aware_start_and_positive_speed() -> None:
    with pytest.raises(ValueError, match="aware"):
        CompressedClock(datetime(2025, 1, 1, 12, 0), 0.0, 1.0)
    for speed in (0.0, -1.0):
        with pytest.raises(ValueError, match="positive speed"):
            CompressedClock(START, 0.0, speed)


def test_system_clock() -> None:
    clock = SystemClock()
    before = datetime.now(UTC)
    now = clock.now()
    assert now.tzinfo is not None and now.utcoffset() == timedelta(0)
    assert before - timedelta(seconds=1) <= now <= datetime.now(UTC) + timedelta(seconds=1)
    assert abs(clock.time() - now.timestamp()) < 5


# --- FileClock ----------------------------------------------------------------------------


@pytest.fixture
def check_always(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(FileClock, "CHECK_EVERY", 0)


def _bump_mtime(path: Path, seconds: int) -> None:
    """Give the file a distinct modification time (as a later write would have)."""
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + seconds * 1_000_000_000))


def test_file_clock_reads_the_file(fake_time: FakeTime, tmp_path: Path) -> None:
    path = tmp_path / "clock.json"
    write_clock_file(str(path), START, 60.0)  # anchor: the (fake) wall time now
    clock = FileClock(str(path))
    assert clock.now() == START
    fake_time.advance(2.0)
    assert clock.time() == pytest.approx(START.timestamp() + 120.0)


def test_file_clock_follows_a_rewritten_file(fake_time: FakeTime, tmp_path: Path, check_always: None) -> None:
    path = tmp_path / "clock.json"
    write_clock_file(str(path), START, 60.0)
    clock = FileClock(str(path))
    fake_time.advance(1.0)
    assert clock.now() == START + timedelta(minutes=1)

    jump = datetime(2025, 1, 17, 5, 59, tzinfo=UTC)  # Friday 08:59 in Moscow
    write_clock_file(str(path), jump, 3600.0)
    _bump_mtime(path, 1)
    assert clock.now() == jump
    fake_time.advance(0.5)
    assert clock.now() == jump + timedelta(minutes=30)

    later = datetime(2025, 1, 20, 6, 0, tzinfo=UTC)
    write_clock_file(str(path), later, 2.0, anchor=fake_time.wall - 5.0)
    _bump_mtime(path, 2)
    assert clock.now() == later + timedelta(seconds=10)


def test_file_clock_checks_the_file_at_most_every_check_every(
    fake_time: FakeTime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(FileClock, "CHECK_EVERY", 10.0)
    path = tmp_path / "clock.json"
    write_clock_file(str(path), START, 1.0)
    clock = FileClock(str(path))
    assert clock.now() == START  # the first read checks (and finds nothing new)
    later = START + timedelta(days=1)
    write_clock_file(str(path), later, 1.0)
    _bump_mtime(path, 1)
    fake_time.mono += 5.0  # not yet time to look at the file again
    assert clock.now() == START
    fake_time.mono += 5.0
    assert clock.now() == later


@pytest.mark.parametrize(
    "broken",
    [
        b"",
        b"{",
        b'{"anchor": 1.0, "speed": 2.0}',
        b'{"start": "not a time", "anchor": 1.0}',
        b'{"start": "2025-01-16T12:00:00", "anchor": 1.0}',  # naive
        b'{"start": "2025-01-16T12:00:00Z", "anchor": "soon"}',
        b'{"start": "2025-01-16T12:00:00Z", "anchor": 1.0, "speed": 0}',
        b"[1, 2, 3]",
    ],
)
def test_file_clock_keeps_the_last_good_clock_while_the_file_is_broken(
    fake_time: FakeTime, tmp_path: Path, check_always: None, broken: bytes
) -> None:
    path = tmp_path / "clock.json"
    write_clock_file(str(path), START, 60.0)
    clock = FileClock(str(path))

    path.write_bytes(broken)
    _bump_mtime(path, 1)
    fake_time.advance(1.0)
    assert clock.now() == START + timedelta(minutes=1)

    path.unlink()  # mid-replacement: no file at all
    fake_time.advance(1.0)
    assert clock.now() == START + timedelta(minutes=2)

    repaired = START + timedelta(hours=5)
    write_clock_file(str(path), repaired, 1.0)
    _bump_mtime(path, 2)
    assert clock.now() == repaired


def test_file_clock_accepts_z_suffix_and_default_speed(fake_time: FakeTime, tmp_path: Path) -> None:
    path = tmp_path / "clock.json"
    spec = {"start": "2025-01-16T17:59:00Z", "anchor": fake_time.wall}  # no speed
    path.write_bytes(orjson.dumps(spec))
    clock = FileClock(str(path))
    assert clock.now() == START
    fake_time.advance(3.0)
    assert clock.time() == pytest.approx(START.timestamp() + 3.0)


def test_write_clock_file_with_explicit_anchor(fake_time: FakeTime, tmp_path: Path) -> None:
    path = tmp_path / "clock.json"
    write_clock_file(str(path), START, 10.0, anchor=123.5)
    assert os.listdir(tmp_path) == ["clock.json"]  # no temporary file left behind
    clock = FileClock(str(path))
    fake_time.wall = 124.5  # one wall second after the anchor
    assert clock.time() == pytest.approx(START.timestamp() + 10.0)


def test_file_clock_follows_a_rewrite_with_an_unchanged_mtime(
    fake_time: FakeTime, tmp_path: Path, check_always: None
) -> None:
    path = tmp_path / "clock.json"
    write_clock_file(str(path), START, 60.0)
    clock = FileClock(str(path))
    first = os.stat(path)
    jump = START + timedelta(hours=12)
    write_clock_file(str(path), jump, 60.0)  # os.replace: a new inode...
    os.utime(path, ns=(first.st_atime_ns, first.st_mtime_ns))  # ...written in the same tick
    assert os.stat(path).st_ino != first.st_ino
    assert clock.now() == jump


# --- clock_from_settings ------------------------------------------------------------------


def test_clock_from_settings_without_file_is_the_system_clock() -> None:
    assert isinstance(clock_from_settings(Settings()), SystemClock)


def test_clock_from_settings_with_file(fake_time: FakeTime, tmp_path: Path) -> None:
    path = tmp_path / "clock.json"
    write_clock_file(str(path), START, 60.0)
    clock = clock_from_settings(replace(Settings(), clock_file=str(path)))
    assert isinstance(clock, FileClock)
    assert clock.now() == START


@pytest.mark.parametrize(
    "content",
    [
        None,  # no file
        b"not json",
        b'{"start": "2025-01-16T12:00:00Z"}',
        b'{"start": "2025-01-16T12:00:00", "anchor": 1.0}',
        b'{"start": "2025-01-16T12:00:00Z", "anchor": 1.0, "speed": -3}',
        b'{"start": 5, "anchor": 1.0}',
        b'"2025-01-16T12:00:00Z"',
    ],
)
def test_clock_from_settings_with_bad_file(tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "clock.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(SettingsError, match="MAILER_CLOCK_FILE cannot be used"):
        clock_from_settings(replace(Settings(), clock_file=str(path)))
