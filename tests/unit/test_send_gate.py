"""The pure parts of the send gate: where a refused send waits, its windows, its limit request."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from services.pipeline.accounts import Account, DomainThrottle, QuotaSource, WarmupPlan
from services.pipeline.defer_reasons import DeferReason
from services.pipeline.working_hours import WorkingHours, WorkingHoursError
from services.sender.rate_limit import LimitRequest
from services.sender.send_gate import Parked, limit_request, parked_until, sending_windows
from tests.support.campaigns import send_email

MSK = timezone(timedelta(hours=3))  # Europe/Moscow has no DST since 2014
OFFICE = WorkingHours.parse("09:00-18:00", "1-5", "Europe/Moscow")


def msk(day: int, hour: int, minute: int = 0, second: int = 0) -> datetime:
    """A time in January 2025, Moscow wall clock (the 16th is a Thursday)."""
    return datetime(2025, 1, day, hour, minute, second, tzinfo=MSK)


RATE_REASONS = [r for r in DeferReason if r not in (DeferReason.DAILY_LIMIT, DeferReason.WARMUP_CAP)]
DAY_REASONS = [DeferReason.DAILY_LIMIT, DeferReason.WARMUP_CAP]


# --- parked_until -------------------------------------------------------------------------


@pytest.mark.parametrize("reason", list(DeferReason))
@pytest.mark.parametrize(
    "until",
    [msk(16, 12), msk(16, 9), msk(16, 17, 59, 59), msk(17, 9, 30), msk(20, 9)],
    ids=["thu-noon", "thu-open", "thu-last-second", "fri-morning", "mon-open"],
)
def test_inside_the_window_nothing_changes(reason: DeferReason, until: datetime) -> None:
    assert parked_until(reason, until, [OFFICE]) == Parked(reason, until)


@pytest.mark.parametrize("reason", RATE_REASONS)
@pytest.mark.parametrize(
    ("until", "opens"),
    [
        (msk(16, 18, 30), msk(17, 9)),  # a rate that frees after Thursday's window: Friday 09:00
        (msk(16, 18), msk(17, 9)),  # the window end is not in the window
        (msk(16, 23, 59), msk(17, 9)),
        (msk(17, 0), msk(17, 9)),
        (msk(16, 7), msk(16, 9)),  # before the window of the same day
        (msk(17, 18, 30), msk(20, 9)),  # a Friday evening waits for Monday
        (msk(18, 12), msk(20, 9)),  # Saturday
        (msk(19, 23, 59, 59), msk(20, 9)),  # Sunday night
    ],
)
def test_a_rate_freeing_outside_hours_waits_for_the_window(
    reason: DeferReason, until: datetime, opens: datetime
) -> None:
    parked = parked_until(reason, until, [OFFICE])
    assert parked == Parked(DeferReason.OUTSIDE_HOURS, opens)
    assert parked.until.tzinfo is not None and parked.until.utcoffset() == timedelta(0)


@pytest.mark.parametrize("reason", DAY_REASONS)
@pytest.mark.parametrize(
    ("until", "opens"),
    [
        (msk(17, 0), msk(17, 9)),  # the next local midnight: wait for the window start
        (msk(16, 18, 30), msk(17, 9)),
        (msk(18, 0), msk(20, 9)),  # Saturday midnight after a Friday: Monday
        (msk(20, 0), msk(20, 9)),
    ],
)
def test_a_daily_limit_keeps_its_reason_but_moves_to_the_window(
    reason: DeferReason, until: datetime, opens: datetime
) -> None:
    assert parked_until(reason, until, [OFFICE]) == Parked(reason, opens)


def test_parked_until_in_utc_terms() -> None:
    # 18:30 MSK Thursday is 15:30 UTC; Friday 09:00 MSK is 06:00 UTC
    parked = parked_until(DeferReason.RATE_PER_HOUR, datetime(2025, 1, 16, 15, 30, tzinfo=UTC), [OFFICE])
    assert parked.reason is DeferReason.OUTSIDE_HOURS
    assert parked.until == datetime(2025, 1, 17, 6, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("reason", "until", "expected"),
    [
        # the campaign's 10:00-12:00 on top of the account's 09:00-18:00
        (DeferReason.CAMPAIGN_RATE, msk(16, 11), Parked(DeferReason.CAMPAIGN_RATE, msk(16, 11))),
        (DeferReason.CAMPAIGN_RATE, msk(16, 9, 30), Parked(DeferReason.OUTSIDE_HOURS, msk(16, 10))),
        (DeferReason.RATE_PER_HOUR, msk(16, 13), Parked(DeferReason.OUTSIDE_HOURS, msk(17, 10))),
        (DeferReason.DAILY_LIMIT, msk(17, 0), Parked(DeferReason.DAILY_LIMIT, msk(17, 10))),
    ],
)
def test_every_window_must_be_open(reason: DeferReason, until: datetime, expected: Parked) -> None:
    campaign = WorkingHours.parse("10:00-12:00", "1-5", "Europe/Moscow")
    assert parked_until(reason, until, [OFFICE, campaign]) == expected


def test_windows_in_different_zones() -> None:
    # Berlin 09:00-18:00 is 11:00-20:00 in Moscow in winter: both open only 11:00-18:00 MSK
    berlin = WorkingHours.parse("09:00-18:00", "1-5", "Europe/Berlin")
    assert parked_until(DeferReason.DOMAIN_THROTTLE, msk(16, 10), [OFFICE, berlin]) == Parked(
        DeferReason.OUTSIDE_HOURS, msk(16, 11))
    assert parked_until(DeferReason.DOMAIN_THROTTLE, msk(16, 17), [OFFICE, berlin]) == Parked(
        DeferReason.DOMAIN_THROTTLE, msk(16, 17))


def test_windows_that_never_meet() -> None:
    weekend = WorkingHours.parse("09:00-18:00", "6-7", "Europe/Moscow")
    with pytest.raises(WorkingHoursError):
        parked_until(DeferReason.RATE_PER_HOUR, msk(16, 12), [OFFICE, weekend])


# --- sending_windows ----------------------------------------------------------------------


def account(**overrides: Any) -> Account:
    fields: dict[str, Any] = {
        "name": "main", "host": "smtp.example.com", "port": 587, "tls": "starttls", "username": "u",
        "password": lambda: "pw", "hourly_rate": 300, "daily_limit_per_manager": 2000,
        "working_hours": OFFICE,
    }
    fields.update(overrides)
    return Account(**fields)


RECIPIENT = {"email": "someone@GoogleMail.com", "name": "Someone"}


def test_windows_without_campaign_hours_are_the_accounts() -> None:
    assert sending_windows(account(), send_email(dict(RECIPIENT))) == [OFFICE]


def test_empty_campaign_hours_add_nothing() -> None:
    assert sending_windows(account(), send_email(dict(RECIPIENT), working_hours={})) == [OFFICE]


@pytest.mark.parametrize(
    ("campaign_hours", "expected"),
    [
        ({"hours": "10:00-12:00", "days": "1-3", "time_zone": "Asia/Tokyo"},
         WorkingHours.parse("10:00-12:00", "1-3", "Asia/Tokyo")),
        ({"hours": "10:00-12:00"}, WorkingHours.parse("10:00-12:00", "1-5", "Europe/Moscow")),
        ({"days": "1,3,5"}, WorkingHours.parse("09:00-18:00", "1,3,5", "Europe/Moscow")),
        ({"time_zone": "America/New_York"}, WorkingHours.parse("09:00-18:00", "1-5", "America/New_York")),
        ({"hours": "00:00-24:00", "days": "1-7"}, WorkingHours.parse("00:00-24:00", "1-7", "Europe/Moscow")),
    ],
)
def test_campaign_hours_are_added_with_missing_fields_from_the_account(
    campaign_hours: dict[str, str], expected: WorkingHours
) -> None:
    command = send_email(dict(RECIPIENT), working_hours=campaign_hours)
    assert sending_windows(account(), command) == [OFFICE, expected]


def test_missing_campaign_fields_come_from_this_account() -> None:
    tokyo = WorkingHours.parse("08:00-20:00", "1-6", "Asia/Tokyo")
    command = send_email(dict(RECIPIENT), working_hours={"hours": "10:00-11:00"})
    assert sending_windows(account(working_hours=tokyo), command) == [
        tokyo, WorkingHours.parse("10:00-11:00", "1-6", "Asia/Tokyo")]


def test_bad_campaign_hours_raise() -> None:
    command = send_email(dict(RECIPIENT))
    command["working_hours"] = {"hours": "18:00-09:00"}
    with pytest.raises(WorkingHoursError):
        sending_windows(account(), command)


# --- limit_request ------------------------------------------------------------------------

THROTTLES = (
    DomainThrottle("google", frozenset({"gmail.com", "googlemail.com"}), 50),
    DomainThrottle("yandex", frozenset({"yandex.ru"}), 80),
)


def full_account(**overrides: Any) -> Account:
    return account(
        domain_throttles=THROTTLES,
        warmup=WarmupPlan((40, 100, 250)),
        quota=QuotaSource("main", "https://quota.example", lambda: "key"),
        **overrides,
    )


def test_limit_request_of_a_full_account() -> None:
    command = send_email(dict(RECIPIENT), rate_per_hour=120, attempt=3, account="main")
    now = datetime(2025, 1, 16, 12, 0, tzinfo=UTC).timestamp()
    request = limit_request(full_account(), command, now)
    assert request == LimitRequest(
        token_id=f"{command['send_id']}:3",
        account="main",
        account_rate=300,
        manager_id="manager-7",
        daily_limit=2000,
        day="2025-01-16",
        next_day_at=datetime(2025, 1, 16, 21, 0, tzinfo=UTC).timestamp(),  # midnight in Moscow
        campaign_id="camp-1",
        campaign_rate=120,
        domain_group="google",
        domain_rate=50,
        warmup_cap=40,
        quota_enforced=True,
        now=now,
        priority=int(command.get("priority", 5)),  # admission by priority and fair share (issue 14)
    )


def test_limit_request_of_a_bare_account() -> None:
    command = send_email({"email": "someone@example.org"})
    now = datetime(2025, 1, 16, 12, 0, tzinfo=UTC).timestamp()
    request = limit_request(account(hourly_rate=0, daily_limit_per_manager=0), command, now)
    assert request.token_id == f"{command['send_id']}:1"
    assert (request.account_rate, request.daily_limit, request.campaign_rate) == (0, 0, 0)
    assert (request.domain_group, request.domain_rate) == (None, 0)
    assert request.warmup_cap == 0
    assert request.quota_enforced is False
    assert request.now == now


@pytest.mark.parametrize(
    ("email", "group", "rate"),
    [("a@gmail.com", "google", 50), ("a@GMAIL.COM", "google", 50), ("a@yandex.ru", "yandex", 80),
     ("a@mail.ru", None, 0)],
)
def test_limit_request_domain_group(email: str, group: str | None, rate: int) -> None:
    request = limit_request(full_account(), send_email({"email": email}), 1_737_000_000.0)
    assert (request.domain_group, request.domain_rate) == (group, rate)


@pytest.mark.parametrize(
    ("time_zone", "now", "day", "next_midnight"),
    [
        # 22:30 UTC Thursday is already Friday 01:30 in Moscow
        ("Europe/Moscow", datetime(2025, 1, 16, 22, 30, tzinfo=UTC), "2025-01-17",
         datetime(2025, 1, 17, 21, 0, tzinfo=UTC)),
        ("Europe/Moscow", datetime(2025, 1, 16, 20, 59, 59, tzinfo=UTC), "2025-01-16",
         datetime(2025, 1, 16, 21, 0, tzinfo=UTC)),
        ("Europe/Moscow", datetime(2025, 1, 16, 21, 0, tzinfo=UTC), "2025-01-17",
         datetime(2025, 1, 17, 21, 0, tzinfo=UTC)),
        # 03:00 UTC Friday is still Thursday 22:00 in New York
        ("America/New_York", datetime(2025, 1, 17, 3, 0, tzinfo=UTC), "2025-01-16",
         datetime(2025, 1, 17, 5, 0, tzinfo=UTC)),
        # the local day of the spring-forward change is 23 hours long
        ("America/New_York", datetime(2025, 3, 9, 12, 0, tzinfo=UTC), "2025-03-09",
         datetime(2025, 3, 10, 4, 0, tzinfo=UTC)),
        ("Asia/Tokyo", datetime(2025, 1, 16, 15, 0, tzinfo=UTC), "2025-01-17",
         datetime(2025, 1, 17, 15, 0, tzinfo=UTC)),
        ("UTC", datetime(2025, 1, 16, 23, 59, 59, tzinfo=UTC), "2025-01-16",
         datetime(2025, 1, 17, 0, 0, tzinfo=UTC)),
    ],
)
def test_limit_request_day_is_the_accounts_local_day(
    time_zone: str, now: datetime, day: str, next_midnight: datetime
) -> None:
    hours = WorkingHours.parse("09:00-18:00", "1-5", time_zone)
    request = limit_request(account(working_hours=hours), send_email(dict(RECIPIENT)), now.timestamp())
    assert request.day == day
    assert request.next_day_at == next_midnight.timestamp()
    assert request.now == now.timestamp()


@pytest.mark.parametrize("attempt", [1, 2, 5])
def test_token_ids_differ_per_attempt(attempt: int) -> None:
    command = send_email(dict(RECIPIENT), attempt=attempt)
    request = limit_request(account(), command, 1_737_000_000.0)
    assert request.token_id == f"{command['send_id']}:{attempt}"
