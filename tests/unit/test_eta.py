"""The campaign ETA (B1): bursts through a sliding hour, windows, daily limits, quota, DST, cross-checks."""

from __future__ import annotations

import heapq
import random
import time
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from services.pipeline.defer_reasons import DeferReason
from services.pipeline.working_hours import WorkingHours
from services.reconciler import eta as eta_module
from services.reconciler.eta import HORIZON, Eta, EtaInputs, deadline_warning, estimate

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
        ({}, msk(24, 11)),  # 100 at 09:00, 100 at 10:00, 50 at 11:00
        ({"remaining": 1}, msk(24, 9)),
        ({"remaining": 100}, msk(24, 9)),  # one burst
        ({"remaining": 101}, msk(24, 10)),
        ({"remaining": 1000}, msk(25, 9)),  # 900 in nine bursts on Monday, the last 100 on Tuesday 09:00
        ({"now": msk(24, 17)}, msk(25, 10)),  # 100 at 17:00; tokens free at 18:00 (closed): Tue 09:00, 10:00
        ({"now": msk(24, 17, 30)}, msk(25, 10)),  # 100 at 17:30; 18:30 is closed: Tue 09:00 100, 10:00 50
        ({"now": msk(24, 20)}, msk(25, 11)),  # evening: waits for the morning
        ({"now": msk(28, 17)}, msk(1, 10, month=12)),  # Friday evening -> Monday
        ({"now": msk(29, 12)}, msk(1, 11, month=12)),  # Saturday -> Monday
        ({"now": msk(24, 7)}, msk(24, 11)),  # before opening
        ({"now": msk(24, 8, 59)}, msk(24, 11)),  # tokens do not free before the first send
        ({"windows": ()}, msk(24, 11)),  # no windows: always open
        ({"now": msk(24, 17), "windows": ()}, msk(24, 19)),
        ({"now": msk(24, 9, 17)}, msk(24, 11, 17)),  # bursts keep the phase of the first one
        ({"campaign_rate": 50}, msk(24, 13)),  # the campaign's own rate is lower: 50 an hour
        ({"campaign_rate": 500}, msk(24, 11)),  # a higher override does not speed up the account
        ({"hourly_rate": 0, "campaign_rate": 50}, msk(24, 13)),  # only the campaign limits
        ({"hourly_rate": 0}, msk(24, 9)),  # no rate limit: all at once
        ({"hourly_rate": 0, "now": msk(24, 7)}, msk(24, 9)),
        ({"hourly_rate": 0, "now": msk(24, 18)}, msk(25, 9)),
        ({"not_before": msk(25, 9)}, msk(25, 11)),  # deferred until Tuesday
        ({"not_before": msk(24, 9, 30)}, msk(24, 11, 30)),
        ({"not_before": msk(20, 9)}, msk(24, 11)),  # a past deferral changes nothing
    ],
)
def test_finish_at(overrides: dict[str, Any], finish: datetime) -> None:
    eta = estimate(inputs(**overrides))
    assert eta == Eta(finish, None)
    assert eta.finish_at is not None and eta.finish_at.tzinfo == UTC


@pytest.mark.parametrize(
    ("overrides", "finish"),
    [
        # Faster than the rate: each burst of 100 takes 48 minutes; the last 50 take 24.
        ({"throughput_per_hour": 125.0}, msk(24, 11, 24)),
        ({"remaining": 1, "throughput_per_hour": 100.0}, msk(24, 9) + timedelta(seconds=36)),
        # Slower than the rate: the sender is the limit, 50 an hour back to back.
        ({"throughput_per_hour": 50.0}, msk(24, 14)),
        # 50 by 18:00 when the windows close, the other 50 from Tuesday 09:00.
        ({"remaining": 100, "now": msk(24, 17), "throughput_per_hour": 50.0}, msk(25, 10)),
        ({"remaining": 100, "now": msk(24, 17), "hourly_rate": 0, "throughput_per_hour": 50.0}, msk(25, 10)),
        ({"hourly_rate": 0, "throughput_per_hour": 100.0}, msk(24, 11, 30)),
    ],
)
def test_throughput_stretches_the_bursts(overrides: dict[str, Any], finish: datetime) -> None:
    assert estimate(inputs(**overrides)) == Eta(finish, None)


@pytest.mark.parametrize(
    ("overrides", "finish"),
    [
        ({"remaining": 1000, "daily_limit": 300}, msk(27, 9)),  # 300 Mon, Tue, Wed (09-11); 100 Thursday
        ({"remaining": 1000, "daily_limit": 300, "sent_today": 250}, msk(28, 9)),  # 50 + 300*3, then 50
        ({"remaining": 1000, "daily_limit": 300, "sent_today": 999}, msk(28, 9)),  # nothing today
        ({"remaining": 1000, "daily_limit": 250}, msk(27, 11)),  # 100, 100, 50 a day; Thursday's at 11:00
        ({"remaining": 250, "daily_limit": 100, "hourly_rate": 0}, msk(26, 9)),  # 100 each morning
        # Deferred to tomorrow: today's sends do not count against tomorrow.
        ({"remaining": 300, "daily_limit": 300, "sent_today": 300, "not_before": msk(25, 9)}, msk(25, 11)),
        # Without windows the daily limit resets at Moscow midnight: 100 at 23:00, 50 at 00:00.
        ({"remaining": 150, "daily_limit": 100, "windows": (), "now": msk(24, 23)}, msk(25, 0)),
        ({"remaining": 150, "daily_limit": 100, "windows": (), "now": msk(24, 23, 30)}, msk(25, 0, 30)),
    ],
)
def test_daily_limit(overrides: dict[str, Any], finish: datetime) -> None:
    assert estimate(inputs(**overrides)) == Eta(finish, None)


@pytest.mark.parametrize(
    ("sent_last_hour", "remaining", "finish"),
    [
        (0, 100, msk(24, 9)),
        (100, 50, msk(24, 10)),  # the window is full: nothing until its sends free at 10:00
        (60, 100, msk(24, 10)),  # 40 at 09:00, then the 60 freed at 10:00
        (60, 40, msk(24, 9)),
        (60, 150, msk(24, 11)),  # 40 at 09:00; 60 + 40 at 10:00; 10 at 11:00
        (500, 50, msk(24, 10)),  # more than the rate (a lowered rate): at most the rate frees
        (500, 150, msk(24, 11)),
    ],
)
def test_sends_of_the_last_hour_free_one_hour_from_now(
    sent_last_hour: int, remaining: int, finish: datetime
) -> None:
    assert estimate(inputs(sent_last_hour=sent_last_hour, remaining=remaining)) == Eta(finish, None)


def test_sends_of_the_last_hour_do_not_free_before_a_deferral() -> None:
    eta = estimate(inputs(sent_last_hour=100, remaining=150, windows=(), not_before=msk(24, 12)))
    assert eta == Eta(msk(24, 13), None)  # all 100 tokens at 12:00, the last 50 at 13:00


def test_remaining_zero_finishes_now() -> None:
    now = datetime(2025, 11, 29, 3, 0, tzinfo=MSK)  # even outside the window
    assert estimate(inputs(now=now, remaining=0)) == Eta(now, None)


@pytest.mark.parametrize(
    ("quota", "blocked"), [(10, True), (0, True), (249, True), (250, False), (None, False)]
)
def test_quota(quota: int | None, blocked: bool) -> None:
    eta = estimate(inputs(quota=quota))
    assert eta == (Eta(None, DeferReason.QUOTA_EXHAUSTED) if blocked else Eta(msk(24, 11), None))


def test_windows_never_open_together() -> None:
    weekend = WorkingHours.parse("10:00-16:00", "6-7")
    assert estimate(inputs(windows=(OFFICE, weekend))) == Eta(None, DeferReason.OUTSIDE_HOURS)
    assert estimate(inputs(windows=(OFFICE, weekend), hourly_rate=0)) == Eta(None, DeferReason.OUTSIDE_HOURS)


@pytest.mark.parametrize(
    ("overrides", "blocked_by"),
    [
        ({"remaining": 1000, "daily_limit": 1}, DeferReason.DAILY_LIMIT),
        ({"remaining": 100_000, "daily_limit": 1, "hourly_rate": 0}, DeferReason.DAILY_LIMIT),
        ({"remaining": 100_000, "hourly_rate": 1, "windows": ()}, DeferReason.RATE_PER_HOUR),
        ({"remaining": 100_000, "hourly_rate": 100, "campaign_rate": 1, "windows": ()},
         DeferReason.CAMPAIGN_RATE),
    ],
)
def test_more_than_a_year_cannot_finish(overrides: dict[str, Any], blocked_by: DeferReason) -> None:
    assert estimate(inputs(**overrides)) == Eta(None, blocked_by)


def test_just_within_the_horizon() -> None:
    hours = int(HORIZON / timedelta(hours=1))  # 8784 one-send bursts, one an hour
    eta = estimate(inputs(remaining=hours, hourly_rate=1, windows=()))
    assert eta == Eta(msk(24, 9) + timedelta(hours=hours - 1), None)
    assert estimate(inputs(remaining=hours + 1, hourly_rate=1, windows=())) == Eta(
        None, DeferReason.RATE_PER_HOUR)


def test_two_windows_in_two_zones() -> None:
    berlin = WorkingHours.parse("10:00-17:00", "1-7", "Europe/Berlin")  # 12:00-19:00 MSK in winter
    assert estimate(inputs(windows=(OFFICE, berlin))) == Eta(msk(24, 14), None)  # 12:00, 13:00, 14:00
    assert estimate(inputs(windows=(OFFICE, berlin), remaining=700)) == Eta(msk(25, 12), None)


def test_dst_change_over_a_weekend() -> None:
    office = WorkingHours.parse("09:00-18:00", "1-5", "Europe/Berlin")
    friday = datetime(2025, 10, 24, 9, 0, tzinfo=BERLIN)
    eta = estimate(EtaInputs(now=friday, remaining=1000, hourly_rate=100, windows=(office,),
                             time_zone="Europe/Berlin"))
    # 900 on Friday (09:00-17:00 CEST); the last 100 on Monday 09:00, now CET (08:00 UTC).
    assert eta == Eta(datetime(2025, 10, 27, 8, 0, tzinfo=UTC), None)


def test_dst_change_during_a_long_campaign() -> None:
    office = WorkingHours.parse("09:00-18:00", "1-5", "Europe/Berlin")
    monday = datetime(2025, 9, 1, 9, 0, tzinfo=BERLIN)
    eta = estimate(EtaInputs(now=monday, remaining=9 * 900 + 100, hourly_rate=100, windows=(office,),
                             time_zone="Europe/Berlin"))
    # 900 a working day, then the last 100 at 09:00 local on the next working day.
    day = date(2025, 9, 1)
    working = [day + timedelta(days=i) for i in range(100) if (day + timedelta(days=i)).isoweekday() <= 5]
    last = working[9]  # 9 full days of 900, the 10th day's first burst
    assert eta == Eta(datetime(last.year, last.month, last.day, 9, 0, tzinfo=BERLIN), None)
    long = estimate(EtaInputs(now=monday, remaining=45 * 900 + 100, hourly_rate=100, windows=(office,),
                              time_zone="Europe/Berlin"))
    last = working[45]  # past the 2025-10-26 change
    assert last > date(2025, 10, 26)
    assert long == Eta(datetime(last.year, last.month, last.day, 9, 0, tzinfo=BERLIN).astimezone(UTC), None)


def test_inputs_are_validated() -> None:
    with pytest.raises(ValueError, match="aware"):
        inputs(now=datetime(2025, 11, 24, 9))
    with pytest.raises(ValueError, match="negative"):
        inputs(remaining=-1)


def test_to_json() -> None:
    assert estimate(inputs()).to_json() == {"finish_at": "2025-11-24T08:00:00Z", "blocked_by": None}
    assert estimate(inputs(quota=1)).to_json() == {"finish_at": None, "blocked_by": "quota_exhausted"}
    assert estimate(inputs(remaining=1000, daily_limit=1)).to_json() == {
        "finish_at": None, "blocked_by": "daily_limit"}


@pytest.mark.parametrize(
    ("deadline", "warn"),
    [(None, False), (msk(24, 12), False), (msk(24, 11), False), (msk(24, 10, 59), True)],
)
def test_deadline_warning(deadline: datetime | None, warn: bool) -> None:
    assert deadline_warning(estimate(inputs()), deadline) is warn


def test_deadline_warning_when_it_cannot_finish() -> None:
    assert deadline_warning(Eta(None, DeferReason.QUOTA_EXHAUSTED), msk(30, 0)) is True
    assert deadline_warning(Eta(None, DeferReason.QUOTA_EXHAUSTED), None) is False


# --- A token-by-token brute force, independent of the module under test -----------------------

Window = tuple[ZoneInfo, set[int], int, int]  # zone, ISO weekdays, start hour, end hour


def brute_force(case: EtaInputs, rate: int, windows: list[Window]) -> datetime | None:
    """Every token on its own: a heap of single-token free instants, scanned minute by minute.

    None when no send is possible for 14 days on end.
    """
    tz = ZoneInfo(case.time_zone)
    start = case.now if case.not_before is None else max(case.now, case.not_before)
    if rate:
        in_window = min(case.sent_last_hour, rate)
        tokens = [start] * (rate - in_window) + [max(case.now + timedelta(hours=1), start)] * in_window
    else:
        tokens = [start] * case.remaining
    heapq.heapify(tokens)
    daily = case.daily_limit or 1 << 60
    sent_on: dict[date, int] = {case.now.astimezone(tz).date(): case.sent_today}

    def can_send(at: datetime) -> bool:
        if sent_on.get(at.astimezone(tz).date(), 0) >= daily:
            return False
        return all(at.astimezone(z).isoweekday() in days and first <= at.astimezone(z).hour < end
                   for z, days, first, end in windows)

    cursor = start  # the send instants never go back: closed stays closed, spent stays spent
    sent = 0
    while True:
        at = max(heapq.heappop(tokens), cursor)
        give_up = at + timedelta(days=14)
        while not can_send(at):
            at += timedelta(minutes=1)
            if at > give_up:
                return None
        day = at.astimezone(tz).date()
        sent_on[day] = sent_on.get(day, 0) + 1
        sent += 1
        if sent == case.remaining:
            return at.astimezone(UTC)
        if rate:
            heapq.heappush(tokens, at + timedelta(hours=1))
        cursor = at


WINDOW_CHOICES = [
    ("Europe/Berlin", "1-5", 9, 18),
    ("Europe/Moscow", "1-5", 9, 18),
    ("Europe/Berlin", "1-6", 8, 17),
    ("Europe/Moscow", "1-7", 10, 20),
    ("Europe/Berlin", "1-7", 1, 5),  # a night window across the change
    ("Europe/Berlin", "1-7", 2, 3),  # the repeated / skipped hour itself
    ("America/New_York", "1-5", 8, 20),
    ("Europe/Berlin", "2,4,6", 0, 24),
]


def random_case(seed: int) -> tuple[EtaInputs, int, list[Window]]:
    rng = random.Random(seed)
    # Shortly before a DST change in Europe (and in the US a week apart), at a random minute.
    base = rng.choice([datetime(2025, 10, 22, tzinfo=UTC), datetime(2026, 3, 25, tzinfo=UTC),
                       datetime(2025, 10, 31, tzinfo=UTC)])
    now = base + timedelta(minutes=rng.randrange(4 * 24 * 60))
    picked = rng.sample(WINDOW_CHOICES, rng.choice([0, 1, 1, 2]))
    hours = tuple(WorkingHours.parse(f"{first:02d}:00-{end:02d}:00", days, name)
                  for name, days, first, end in picked)
    hourly, campaign = rng.choice([(100, 0), (60, 0), (250, 40), (0, 13), (0, 0), (7, 90), (100, 100)])
    rate = min([r for r in (hourly, campaign) if r > 0], default=0)
    daily = rng.choice([0, 0, 150, 400, 999])
    case = EtaInputs(
        now=now, remaining=rng.randrange(1, 1500), hourly_rate=hourly, campaign_rate=campaign,
        daily_limit=daily, sent_today=rng.randrange(0, daily + 1) if daily else 0,
        sent_last_hour=rng.choice([0, 0, rng.randrange(0, 120)]), windows=hours,
        time_zone=rng.choice(["Europe/Moscow", "Europe/Berlin"]),
        not_before=rng.choice([None, now + timedelta(minutes=rng.randrange(-60, 3000))]),
    )
    return case, rate, [(h.tz, set(h.days), h.start_minute // 60, h.end_minute // 60) for h in hours]


@pytest.mark.parametrize("seed", range(12))
def test_matches_a_token_by_token_brute_force(seed: int) -> None:
    case, rate, windows = random_case(seed)
    expected = brute_force(case, rate, windows)
    if expected is None:
        assert estimate(case) == Eta(None, DeferReason.OUTSIDE_HOURS), case
    else:
        assert estimate(case) == Eta(expected, None), case


def test_the_brute_force_cases_cover_the_features() -> None:
    cases = [random_case(seed) for seed in range(12)]
    assert any(c.daily_limit and c.sent_today for c, _, _ in cases)
    assert any(c.sent_last_hour for c, rate, _ in cases if rate)
    assert any(rate == 0 for _, rate, _ in cases)
    assert any(c.not_before is not None and c.not_before > c.now for c, _, _ in cases)
    assert any(len(windows) == 2 for _, _, windows in cases)
    assert any(not windows for _, _, windows in cases)


@pytest.mark.parametrize("seed", range(40))
def test_skipping_repeated_weeks_changes_nothing(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    case, _, _ = random_case(seed)
    rng = random.Random(seed)
    case = replace(case, remaining=rng.choice([20_000, 100_000, 400_000]),
                   throughput_per_hour=rng.choice([0.0, 0.0, 45.0, 130.0]))
    skipped = estimate(case)
    monkeypatch.setattr(eta_module, "_steady", lambda *_: False)  # no week is ever skipped
    assert estimate(case) == skipped, case


def test_fast_for_a_big_campaign() -> None:
    berlin = WorkingHours.parse("10:00-17:00", "1-7", "Europe/Berlin")
    berlin_office = WorkingHours.parse("09:00-18:00", "1-5", "Europe/Berlin")
    fast = [
        inputs(remaining=100_000),  # 1000 bursts
        inputs(remaining=100_000, daily_limit=500, windows=(OFFICE, berlin)),
        inputs(remaining=100_000, throughput_per_hour=70.0),
    ]
    slow = [  # to the horizon, or across DST changes
        inputs(remaining=100_000, daily_limit=10, windows=(OFFICE, berlin)),
        inputs(remaining=100_000, hourly_rate=1, windows=()),
        inputs(remaining=100_000, hourly_rate=0, daily_limit=1, windows=(OFFICE, berlin)),
        inputs(remaining=1_000_000, hourly_rate=97, sent_last_hour=33, windows=(berlin_office,),
               time_zone="Europe/Berlin"),
        inputs(remaining=1_000_000, hourly_rate=37, windows=(), now=msk(24, 9) + timedelta(microseconds=7)),
    ]
    for limit, cases in ((0.010, fast), (0.050, slow)):
        for case in cases:
            estimate(replace(case, now=case.now + timedelta(days=3650)))  # cold: dates not seen yet
            best = min(_timed(case) for _ in range(5))
            assert best < limit, f"{best * 1000:.1f} ms for {case}"


def _timed(case: EtaInputs) -> float:
    start = time.perf_counter()
    estimate(case)
    return time.perf_counter() - start
