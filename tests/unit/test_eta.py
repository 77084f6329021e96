"""The campaign ETA (B1): rates, windows, daily limits, quota, DST, and a brute-force cross-check."""

from __future__ import annotations

import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from services.pipeline.defer_reasons import DeferReason
from services.pipeline.working_hours import WorkingHours
from services.reconciler.eta import Eta, EtaInputs, deadline_warning, estimate

MSK = ZoneInfo("Europe/Moscow")
BERLIN = ZoneInfo("Europe/Berlin")
OFFICE = WorkingHours.parse()  # 09:00-18:00 Mon-Fri Moscow


def msk(day: int, hour: int, minute: int = 0, month: int = 11) -> datetime:
    """A Moscow time in 2025 (2025-11-24 is a Monday)."""
    return datetime(2025, month, day, hour, minute, tzinfo=MSK)


def inputs(**overrides: Any) -> EtaInputs:
    base: dict[str, Any] = {"now": msk(24, 9), "remaining": 250, "hourly_rate": 100, "windows": (OFFICE,)}
    return EtaInputs(**{**base, **overrides})


@pytest.mark.parametrize(
    ("overrides", "finish"),
    [
        ({}, msk(24, 11, 30)),  # 250 at 100/h from Monday 09:00
        ({"remaining": 1}, msk(24, 9, 0) + timedelta(seconds=36)),
        ({"remaining": 1000}, msk(25, 10)),  # 900 on Monday, the rest on Tuesday morning
        ({"now": msk(24, 17)}, msk(25, 10, 30)),  # across the night: 100 today, 150 tomorrow
        ({"now": msk(24, 20)}, msk(25, 11, 30)),  # evening: waits for the morning
        ({"now": msk(28, 17)}, msk(1, 10, 30, month=12)),  # Friday evening -> Monday
        ({"now": msk(29, 12)}, msk(1, 11, 30, month=12)),  # Saturday -> Monday
        ({"now": msk(24, 7)}, msk(24, 11, 30)),  # before opening
        ({"windows": ()}, msk(24, 11, 30)),  # no windows: always open
        ({"now": msk(24, 17), "windows": ()}, msk(24, 19, 30)),
        ({"campaign_rate": 50}, msk(24, 14)),  # the campaign's own rate is lower
        ({"campaign_rate": 500}, msk(24, 11, 30)),  # a higher override does not speed up the account
        ({"throughput_per_hour": 125.0}, msk(24, 11, 30)),  # measured speed above the rate: ignored
        ({"throughput_per_hour": 50.0}, msk(24, 14)),  # measured speed below the rate: it binds
        ({"hourly_rate": 0}, msk(24, 9)),  # no rate limit: all at once
        ({"hourly_rate": 0, "now": msk(24, 7)}, msk(24, 9)),
        ({"not_before": msk(25, 9)}, msk(25, 11, 30)),  # deferred until Tuesday
        ({"not_before": msk(20, 9)}, msk(24, 11, 30)),  # a past deferral changes nothing
    ],
)
def test_finish_at(overrides: dict[str, Any], finish: datetime) -> None:
    eta = estimate(inputs(**overrides))
    assert eta == Eta(finish, None)
    assert eta.finish_at is not None and eta.finish_at.tzinfo == UTC


@pytest.mark.parametrize(
    ("overrides", "finish"),
    [
        ({"remaining": 1000, "daily_limit": 300}, msk(27, 10)),  # 300 Mon, Tue, Wed; 100 on Thursday
        ({"remaining": 1000, "daily_limit": 300, "sent_today": 250}, msk(28, 9, 30)),  # 50+300*3, then 50
        ({"remaining": 1000, "daily_limit": 300, "sent_today": 999}, msk(28, 10)),  # nothing today
        ({"remaining": 250, "daily_limit": 100, "hourly_rate": 0}, msk(26, 9)),  # 100 each morning
        # Deferred to tomorrow: today's sends do not count against tomorrow.
        ({"remaining": 300, "daily_limit": 300, "sent_today": 300, "not_before": msk(25, 9)}, msk(25, 12)),
        # Without windows the daily limit resets at Moscow midnight.
        ({"remaining": 150, "daily_limit": 100, "windows": (), "now": msk(24, 23)}, msk(25, 0, 30)),
    ],
)
def test_daily_limit(overrides: dict[str, Any], finish: datetime) -> None:
    assert estimate(inputs(**overrides)) == Eta(finish, None)


@pytest.mark.parametrize(
    ("sent_last_hour", "remaining", "finish"),
    [
        (0, 100, msk(24, 10)),
        (100, 50, msk(24, 10, 30)),  # the window is full: the first hour sends nothing
        (60, 100, msk(24, 10, 36)),  # 40 by 09:24, wait for 10:00, then 60 more
        (60, 40, msk(24, 9, 24)),
        (500, 50, msk(24, 10, 30)),  # more than the rate (a lowered rate): still just the first hour
    ],
)
def test_sends_of_the_last_hour_occupy_the_first_hour(
    sent_last_hour: int, remaining: int, finish: datetime
) -> None:
    assert estimate(inputs(sent_last_hour=sent_last_hour, remaining=remaining)) == Eta(finish, None)


def test_remaining_zero_finishes_now() -> None:
    now = datetime(2025, 11, 29, 3, 0, tzinfo=MSK)  # even outside the window
    assert estimate(inputs(now=now, remaining=0)) == Eta(now, None)


@pytest.mark.parametrize(
    ("quota", "blocked"), [(10, True), (0, True), (249, True), (250, False), (None, False)]
)
def test_quota(quota: int | None, blocked: bool) -> None:
    eta = estimate(inputs(quota=quota))
    assert eta == (Eta(None, DeferReason.QUOTA_EXHAUSTED) if blocked else Eta(msk(24, 11, 30), None))


def test_windows_never_open_together() -> None:
    weekend = WorkingHours.parse("10:00-16:00", "6-7")
    assert estimate(inputs(windows=(OFFICE, weekend))) == Eta(None, DeferReason.OUTSIDE_HOURS)


@pytest.mark.parametrize(
    ("overrides", "blocked_by"),
    [
        ({"remaining": 1000, "daily_limit": 1}, DeferReason.DAILY_LIMIT),
        ({"remaining": 100_000, "hourly_rate": 1, "windows": ()}, DeferReason.RATE_PER_HOUR),
        ({"remaining": 100_000, "hourly_rate": 100, "campaign_rate": 1, "windows": ()},
         DeferReason.CAMPAIGN_RATE),
    ],
)
def test_more_than_a_year_cannot_finish(overrides: dict[str, Any], blocked_by: DeferReason) -> None:
    assert estimate(inputs(**overrides)) == Eta(None, blocked_by)


def test_two_windows_in_two_zones() -> None:
    berlin = WorkingHours.parse("10:00-17:00", "1-7", "Europe/Berlin")  # 12:00-19:00 MSK in winter
    assert estimate(inputs(windows=(OFFICE, berlin))) == Eta(msk(24, 14, 30), None)
    assert estimate(inputs(windows=(OFFICE, berlin), remaining=700)) == Eta(msk(25, 13), None)


def test_dst_change_over_a_weekend() -> None:
    office = WorkingHours.parse("09:00-18:00", "1-5", "Europe/Berlin")
    friday = datetime(2025, 10, 24, 9, 0, tzinfo=BERLIN)
    eta = estimate(EtaInputs(now=friday, remaining=1000, hourly_rate=100, windows=(office,),
                             time_zone="Europe/Berlin"))
    # 900 on Friday; Monday 09:00 is now CET (08:00 UTC), plus one hour.
    assert eta == Eta(datetime(2025, 10, 27, 9, 0, tzinfo=UTC), None)


def test_inputs_are_validated() -> None:
    with pytest.raises(ValueError, match="aware"):
        inputs(now=datetime(2025, 11, 24, 9))
    with pytest.raises(ValueError, match="negative"):
        inputs(remaining=-1)


def test_to_json() -> None:
    assert estimate(inputs()).to_json() == {"finish_at": "2025-11-24T08:30:00Z", "blocked_by": None}
    assert estimate(inputs(quota=1)).to_json() == {"finish_at": None, "blocked_by": "quota_exhausted"}


@pytest.mark.parametrize(
    ("deadline", "warn"),
    [(None, False), (msk(24, 12), False), (msk(24, 11, 30), False), (msk(24, 11, 29), True)],
)
def test_deadline_warning(deadline: datetime | None, warn: bool) -> None:
    assert deadline_warning(estimate(inputs()), deadline) is warn


def test_deadline_warning_when_it_cannot_finish() -> None:
    assert deadline_warning(Eta(None, DeferReason.QUOTA_EXHAUSTED), msk(30, 0)) is True
    assert deadline_warning(Eta(None, DeferReason.QUOTA_EXHAUSTED), None) is False


def brute_force(now: datetime, remaining: int, daily_limit: int, time_zone: ZoneInfo,
                windows: list[tuple[ZoneInfo, set[int], int, int]]) -> datetime:
    """One send per open minute (60/h), counted minute by minute, independent of the module under test."""
    at = now
    counts: dict[str, int] = {}
    sent = 0
    while True:
        open_ = all(at.astimezone(tz).isoweekday() in days and start <= at.astimezone(tz).hour < end
                    for tz, days, start, end in windows)
        day = at.astimezone(time_zone).date().isoformat()
        if open_ and counts.get(day, 0) < daily_limit:
            counts[day] = counts.get(day, 0) + 1
            sent += 1
            if sent == remaining:
                return at + timedelta(minutes=1)
        at += timedelta(minutes=1)


@pytest.mark.parametrize(
    ("time_zone", "windows", "remaining", "daily_limit"),
    [
        ("Europe/Berlin", [("Europe/Berlin", "1-5", 9, 18)], 6000, 200),
        ("Europe/Berlin", [("Europe/Berlin", "1-5", 9, 18)], 12000, 1000),
        ("Europe/Moscow", [("Europe/Moscow", "1-5", 9, 18), ("Europe/Berlin", "1-6", 8, 17)], 5000, 250),
        ("Europe/Moscow", [("Europe/Berlin", "1-7", 1, 5)], 7000, 10_000),  # a night window
        ("Europe/Moscow", [("Europe/Berlin", "1-7", 2, 3)], 1700, 10_000),  # the repeated hour itself
    ],
)
def test_matches_a_minute_by_minute_count_across_dst(
    time_zone: str, windows: list[tuple[str, str, int, int]], remaining: int, daily_limit: int
) -> None:
    now = datetime(2025, 10, 1, 0, 0, tzinfo=UTC)  # weeks before the 2025-10-26 change
    hours = tuple(WorkingHours.parse(f"{start:02d}:00-{end:02d}:00", days, tz)
                  for tz, days, start, end in windows)
    eta = estimate(EtaInputs(now=now, remaining=remaining, hourly_rate=60, daily_limit=daily_limit,
                             windows=hours, time_zone=time_zone))
    expected = brute_force(now, remaining, daily_limit, ZoneInfo(time_zone),
                           [(h.tz, set(h.days), h.start_minute // 60, h.end_minute // 60) for h in hours])
    assert expected > datetime(2025, 10, 27, tzinfo=UTC)  # the scenario does cross the change
    assert eta == Eta(expected, None)


def test_fast_for_a_big_campaign() -> None:
    berlin = WorkingHours.parse("10:00-17:00", "1-7", "Europe/Berlin")
    cases = [
        inputs(remaining=100_000),
        inputs(remaining=100_000, daily_limit=500, windows=(OFFICE, berlin)),
        inputs(remaining=100_000, daily_limit=10, windows=(OFFICE, berlin)),  # runs to the horizon
    ]
    for case in cases:
        estimate(replace(case, now=case.now + timedelta(days=3650)))  # cold: dates not seen yet
        best = min(_timed(case) for _ in range(5))
        assert best < 0.010, f"{best * 1000:.1f} ms for {case}"


def _timed(case: EtaInputs) -> float:
    start = time.perf_counter()
    estimate(case)
    return time.perf_counter() - start
