"""Working hours: parsing, open/closed, the next opening, and DST transitions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from services.pipeline.working_hours import (
    ALWAYS,
    WorkingHours,
    WorkingHoursError,
    local_day,
    next_open_all,
    open_intervals_all,
)

MSK = ZoneInfo("Europe/Moscow")
BERLIN = ZoneInfo("Europe/Berlin")
DEFAULT = WorkingHours.parse()  # 09:00-18:00, Mon-Fri, Europe/Moscow


def msk(day: int, hour: int, minute: int = 0, second: int = 0, month: int = 11) -> datetime:
    """A Moscow time in 2025 (2025-11-24 is a Monday, 2025-11-28 a Friday)."""
    return datetime(2025, month, day, hour, minute, second, tzinfo=MSK)


def utc(month: int, day: int, hour: int, minute: int = 0, second: int = 0) -> datetime:
    """A UTC time in 2025."""
    return datetime(2025, month, day, hour, minute, second, tzinfo=UTC)


def test_defaults() -> None:
    assert WorkingHours(9 * 60, 18 * 60, frozenset({1, 2, 3, 4, 5}), "Europe/Moscow") == DEFAULT
    assert DEFAULT.describe() == "09:00-18:00"
    assert DEFAULT.to_json() == {"hours": "09:00-18:00", "days": "1-5", "time_zone": "Europe/Moscow"}


@pytest.mark.parametrize(
    ("days", "expected"),
    [
        ("1-5", {1, 2, 3, 4, 5}),
        ("1,3,5", {1, 3, 5}),
        ("1-3,6", {1, 2, 3, 6}),
        ("1-7", {1, 2, 3, 4, 5, 6, 7}),
        (" 7 ", {7}),
        ("2-2", {2}),
    ],
)
def test_parse_days(days: str, expected: set[int]) -> None:
    assert WorkingHours.parse(days=days).days == frozenset(expected)


@pytest.mark.parametrize(
    ("hours", "start", "end"),
    [
        ("09:00-18:00", 540, 1080),
        ("9:30-17:45", 570, 1065),
        ("00:00-24:00", 0, 1440),
        ("23:59-24:00", 1439, 1440),
    ],
)
def test_parse_hours(hours: str, start: int, end: int) -> None:
    parsed = WorkingHours.parse(hours)
    assert (parsed.start_minute, parsed.end_minute) == (start, end)


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [
        ({"hours": "18:00-09:00"}, "across midnight"),
        ({"hours": "09:00-09:00"}, "after the start"),
        ({"hours": "9-18"}, "'9-18'"),
        ({"hours": "09:60-18:00"}, "09:60"),
        ({"hours": "25:00-26:00"}, "25:00"),
        ({"hours": "24:00-24:00"}, "before 24:00"),
        ({"hours": "09:00-24:30"}, "24:30"),
        ({"hours": ""}, "HH:MM-HH:MM"),
        ({"days": ""}, "empty"),
        ({"days": "0-5"}, "'0-5'"),
        ({"days": "1-8"}, "'1-8'"),
        ({"days": "5-1"}, "backwards"),
        ({"days": "mon-fri"}, "'mon-fri'"),
        ({"days": "1,,3"}, "''"),
        ({"days": "1-3-5"}, "'1-3-5'"),
        ({"time_zone": "Mars/Olympus"}, "Mars/Olympus"),
        ({"time_zone": ""}, "empty"),
        ({"time_zone": "../etc/passwd"}, "../etc/passwd"),
    ],
)
def test_bad_settings_name_the_bad_part(kwargs: dict[str, str], names: str) -> None:
    with pytest.raises(WorkingHoursError) as caught:
        WorkingHours.parse(**kwargs)
    assert isinstance(caught.value, ValueError)
    assert names in str(caught.value)


def test_direct_construction_is_validated() -> None:
    with pytest.raises(WorkingHoursError):
        WorkingHours(600, 540, frozenset({1}), "UTC")
    with pytest.raises(WorkingHoursError):
        WorkingHours(0, 60, frozenset(), "UTC")
    with pytest.raises(WorkingHoursError):
        WorkingHours(0, 1441, frozenset({1}), "UTC")


def test_json_round_trip_and_defaults() -> None:
    custom = WorkingHours.parse("10:00-17:00", "1-3,6", "Europe/Berlin")
    assert custom.to_json() == {"hours": "10:00-17:00", "days": "1-3,6", "time_zone": "Europe/Berlin"}
    assert WorkingHours.from_json(custom.to_json()) == custom
    assert WorkingHours.from_json({}) == DEFAULT
    assert WorkingHours.from_json({"hours": "10:00-17:00"}, default=custom) == custom
    assert WorkingHours.from_json({"days": "1-7"}, default=custom) == WorkingHours.parse(
        "10:00-17:00", "1-7", "Europe/Berlin")
    assert WorkingHours.from_json({"days": [6, 7]}).days == frozenset({6, 7})
    with pytest.raises(WorkingHoursError, match="unknown keys"):
        WorkingHours.from_json({"hour": "10:00-17:00"})
    with pytest.raises(WorkingHoursError):
        WorkingHours.from_json({"hours": 10})


@pytest.mark.parametrize(
    ("at", "is_open"),
    [
        (msk(24, 8, 59, 59), False),
        (msk(24, 9), True),
        (msk(26, 12), True),
        (msk(28, 17, 55), True),
        (msk(28, 17, 59, 59), True),
        (msk(28, 18), False),
        (msk(29, 12), False),  # Saturday
        (msk(30, 12), False),  # Sunday
        (utc(11, 24, 6, 0), True),  # 09:00 MSK given in UTC
        (utc(11, 24, 5, 59), False),
    ],
)
def test_is_open(at: datetime, is_open: bool) -> None:
    assert DEFAULT.is_open(at) is is_open


@pytest.mark.parametrize(
    ("at", "expected"),
    [
        (msk(24, 10), msk(24, 10)),  # open: itself
        (msk(24, 7), msk(24, 9)),
        (msk(24, 18), msk(25, 9)),
        (msk(28, 18, 5), msk(1, 9, month=12)),  # Friday evening -> Monday morning
        (msk(29, 3), msk(1, 9, month=12)),  # Saturday -> Monday
        (msk(28, 17, 55), msk(28, 17, 55)),  # five minutes before the close it is still open
    ],
)
def test_next_open(at: datetime, expected: datetime) -> None:
    got = DEFAULT.next_open(at)
    assert got == expected
    assert got.tzinfo == UTC


def test_window_end() -> None:
    assert DEFAULT.window_end(msk(28, 17, 55)) == msk(28, 18)
    with pytest.raises(WorkingHoursError):
        DEFAULT.window_end(msk(28, 18))


def test_naive_datetimes_are_refused() -> None:
    with pytest.raises(ValueError, match="aware"):
        DEFAULT.is_open(datetime(2025, 11, 24, 10))


def test_24_00_runs_to_the_next_midnight() -> None:
    late = WorkingHours.parse("20:00-24:00", "5")
    assert late.is_open(msk(28, 23, 59, 59))
    assert not late.is_open(msk(29, 0))
    assert late.window_end(msk(28, 21)) == msk(29, 0)
    assert late.next_open(msk(29, 0)) == msk(5, 20, month=12)


def test_always() -> None:
    for at in (msk(29, 3), utc(3, 30, 1, 30)):
        assert ALWAYS.is_open(at)
        assert ALWAYS.next_open(at) == at


# Europe/Berlin: 2025-03-30 02:00 CET -> 03:00 CEST (01:00 UTC);
#                2025-10-26 03:00 CEST -> 02:00 CET (01:00 UTC).

def test_dst_spring_forward_window_in_the_skipped_hour_starts_at_the_jump() -> None:
    night = WorkingHours.parse("02:30-04:00", "1-7", "Europe/Berlin")
    assert night.next_open(utc(3, 29, 23, 0)) == utc(3, 30, 1, 0)
    assert not night.is_open(utc(3, 30, 0, 59, 59))
    assert night.is_open(utc(3, 30, 1, 0))  # 03:00 CEST
    assert night.window_end(utc(3, 30, 1, 0)) == utc(3, 30, 2, 0)


def test_dst_day_window_keeps_local_times() -> None:
    office = WorkingHours.parse("09:00-18:00", "1-7", "Europe/Berlin")
    # Saturday before the spring change: 09:00 CET = 08:00 UTC; Sunday: 09:00 CEST = 07:00 UTC.
    assert office.next_open(utc(3, 29, 0, 0)) == utc(3, 29, 8, 0)
    assert office.next_open(utc(3, 29, 20, 0)) == utc(3, 30, 7, 0)
    # Autumn: Saturday 09:00 CEST = 07:00 UTC; Sunday 09:00 CET = 08:00 UTC.
    assert office.next_open(utc(10, 25, 0, 0)) == utc(10, 25, 7, 0)
    assert office.next_open(utc(10, 25, 20, 0)) == utc(10, 26, 8, 0)
    assert office.window_end(utc(10, 26, 9, 0)) == utc(10, 26, 17, 0)
    assert not office.is_open(utc(10, 26, 7, 30))  # 08:30 CET


def test_dst_fall_back_repeated_hour_means_its_first_occurrence() -> None:
    night = WorkingHours.parse("01:00-02:30", "1-7", "Europe/Berlin")
    # 02:30 first occurs at 02:30 CEST = 00:30 UTC; at 01:15 UTC the clock reads 02:15 CET again.
    assert night.window_end(utc(10, 26, 0, 0)) == utc(10, 26, 0, 30)
    assert not night.is_open(utc(10, 26, 1, 15))


def test_dst_whole_day_windows_are_23_and_25_hours() -> None:
    day = WorkingHours.parse("00:00-24:00", "7", "Europe/Berlin")
    for sunday, hours in ((30, 23), (26, 25)):
        month = 3 if sunday == 30 else 10
        noon = datetime(2025, month, sunday, 12, 0, tzinfo=BERLIN)
        assert day.window_end(noon) - day.next_open(noon - timedelta(days=1)) == timedelta(hours=hours)


def test_local_day() -> None:
    assert local_day(msk(24, 23, 59), "Europe/Moscow") == ("2025-11-24", msk(25, 0))
    assert local_day(utc(11, 24, 21, 0), "Europe/Moscow") == ("2025-11-25", msk(26, 0))
    day, midnight = local_day(utc(10, 26, 12, 0), "Europe/Berlin")
    assert (day, midnight) == ("2025-10-26", utc(10, 26, 23, 0))
    assert midnight.tzinfo == UTC


def test_next_open_all() -> None:
    berlin = WorkingHours.parse("10:00-17:00", "1-7", "Europe/Berlin")  # 12:00-19:00 MSK in winter
    assert next_open_all([DEFAULT, berlin], msk(24, 9)) == msk(24, 12)
    assert next_open_all([DEFAULT, berlin], msk(24, 13)) == msk(24, 13)
    assert next_open_all([DEFAULT, berlin], msk(24, 18)) == msk(25, 12)
    weekend = WorkingHours.parse("10:00-16:00", "6-7")
    assert next_open_all([weekend, ALWAYS], msk(24, 9)) == msk(29, 10)
    assert next_open_all([], msk(24, 3)) == msk(24, 3)
    with pytest.raises(WorkingHoursError, match="never all open"):
        next_open_all([DEFAULT, weekend], msk(24, 9))


def test_open_intervals_all() -> None:
    berlin = WorkingHours.parse("10:00-17:00", "1-7", "Europe/Berlin")
    assert open_intervals_all([DEFAULT, berlin], msk(24, 0), msk(26, 0)) == [
        (msk(24, 12), msk(24, 18)), (msk(25, 12), msk(25, 18))]
    assert open_intervals_all([DEFAULT], msk(24, 15), msk(24, 16)) == [(msk(24, 15), msk(24, 16))]
    assert open_intervals_all([DEFAULT], msk(29, 0), msk(30, 0)) == []
