"""The manager texts catalogue (R19): every reason in both languages, numbers and times filled in."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from services.pipeline.defer_reasons import DeferReason, UnknownDeferReason
from services.pipeline.working_hours import WorkingHours
from services.reconciler.reason_texts import (
    _CATALOGUE,
    LANGUAGES,
    Language,
    _fields,
    defer_text,
    hours_text,
    pick_language,
    reason_label,
    status_text,
    time_text,
    zone_label,
)

MSK = ZoneInfo("Europe/Moscow")
NOW = datetime(2025, 11, 27, 14, 20, tzinfo=MSK)  # a Thursday
NUMBERS: dict[str, int | str] = {
    "limit": 100, "sent": 100, "window": "9:00-18:00 UTC", "domain": "gmail.com", "errors": 10,
    "available": 5, "needed": 250,
}


def text(reason: DeferReason | str, lang: Language = "ru", until: datetime | None = None,
         numbers: dict[str, int | str] | None = None, time_zone: str = "Europe/Moscow") -> str:
    return defer_text(reason, lang, until=until, time_zone=time_zone, now=NOW, numbers=numbers)


@pytest.mark.parametrize("reason", list(DeferReason))
@pytest.mark.parametrize("lang", LANGUAGES)
def test_every_reason_has_a_text_in_every_language(reason: DeferReason, lang: Language) -> None:
    full = text(reason, lang, NOW + timedelta(hours=2), NUMBERS)
    bare = text(reason, lang, None, None)
    for got in (full, bare, text(reason.value, lang, NOW + timedelta(days=1), {})):
        assert got and "{" not in got and "}" not in got
        assert got.endswith(".")
    assert _fields(_CATALOGUE[reason][lang].variants[-1]) == set()  # the fallback needs no numbers
    cyrillic = any("а" <= ch <= "я" for ch in full.lower())
    assert cyrillic is (lang == "ru")


def test_the_catalogue_is_closed() -> None:
    assert set(_CATALOGUE) == set(DeferReason)
    assert all(set(entries) == set(LANGUAGES) for entries in _CATALOGUE.values())


@pytest.mark.parametrize(
    ("reason", "lang", "until", "numbers", "expected"),
    [
        ("rate_per_hour", "ru", NOW.replace(hour=15, minute=0), {"limit": 100},
         "Достигнут лимит 100 писем/час. Продолжим сегодня в 15:00 МСК."),
        ("rate_per_hour", "en", NOW.replace(hour=15, minute=0), {"limit": 100},
         "Reached the limit of 100 emails per hour. We will resume today at 15:00 MSK."),
        ("rate_per_hour", "ru", NOW.replace(hour=15, minute=0), {"limit": 1},
         "Достигнут лимит 1 письмо/час. Продолжим сегодня в 15:00 МСК."),
        ("rate_per_hour", "ru", NOW.replace(hour=15, minute=0), {"limit": 22},
         "Достигнут лимит 22 письма/час. Продолжим сегодня в 15:00 МСК."),
        ("daily_limit", "ru", datetime(2025, 11, 28, 9, 0, tzinfo=MSK), {"sent": 120, "limit": 120},
         "Вы достигли дневного лимита 120/120. Продолжим завтра в 09:00 МСК."),
        ("daily_limit", "en", datetime(2025, 11, 28, 9, 0, tzinfo=MSK), {"sent": 120, "limit": 120},
         "You have reached your daily limit of 120/120. We will resume tomorrow at 09:00 MSK."),
        ("quota_exhausted", "ru", None, None,
         "Глобальная квота исчерпана. Администратор пополнит квоту, после чего рассылка продолжится"
         " автоматически."),
        ("outside_hours", "ru", datetime(2025, 11, 28, 9, 0, tzinfo=MSK), {"window": "9:00-18:00 МСК"},
         "Сейчас вне рабочего времени (9:00-18:00 МСК). Продолжим завтра в 09:00 МСК."),
        ("outside_hours", "ru", datetime(2025, 12, 1, 9, 0, tzinfo=MSK), {"window": "9:00-18:00 МСК"},
         "Сейчас вне рабочего времени (9:00-18:00 МСК). Продолжим 01.12 в 09:00 МСК."),
        ("outside_hours", "en", datetime(2025, 12, 1, 9, 0, tzinfo=MSK), {"window": "9:00-18:00 MSK"},
         "It is outside working hours (9:00-18:00 MSK). We will resume on 1 Dec at 09:00 MSK."),
        ("transient_error", "ru", NOW + timedelta(minutes=5), None,
         "Временная ошибка отправки. Повторим попытку через 5 минут (в 14:25 МСК)."),
        ("transient_error", "en", NOW + timedelta(minutes=1), None,
         "Temporary sending error. We will retry in 1 minute (at 14:21 MSK)."),
        ("circuit_open", "ru", NOW + timedelta(minutes=30), {"errors": 10},
         "Слишком много временных ошибок SMTP подряд (10); отправка приостановлена."
         " Повторим попытку через 30 минут (в 14:50 МСК)."),
    ],
)
def test_texts(reason: str, lang: Language, until: datetime | None, numbers: dict[str, int | str] | None,
               expected: str) -> None:
    assert text(reason, lang, until, numbers) == expected


@pytest.mark.parametrize(
    ("numbers", "expected"),
    [
        ({"sent": 50, "limit": 50}, "Вы достигли дневного лимита 50/50."),
        ({"limit": 50}, "Вы достигли дневного лимита (50 писем)."),
        ({"sent": 50}, "Вы достигли дневного лимита."),
        ({"limit": "many"}, "Вы достигли дневного лимита."),
        ({"limit": ""}, "Вы достигли дневного лимита."),
        ({}, "Вы достигли дневного лимита."),
    ],
)
def test_a_missing_number_falls_back(numbers: dict[str, int | str], expected: str) -> None:
    assert text("daily_limit", "ru", None, numbers) == expected + " Рассылка продолжится автоматически."


def test_quota_shortfall_names_the_numbers() -> None:
    got = text("quota_exhausted", "en", None, {"available": 5, "needed": 250})
    assert "5 available" in got and "250 needed" in got


def test_unknown_reason_is_refused() -> None:
    with pytest.raises(UnknownDeferReason):
        text("tired")
    with pytest.raises(UnknownDeferReason):
        reason_label("tired", "en")


def test_unsupported_language_is_refused() -> None:
    with pytest.raises(ValueError, match="unsupported language"):
        defer_text("daily_limit", "de", until=None, time_zone="UTC", now=NOW)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("time_zone", "lang", "at", "label"),
    [
        ("Europe/Moscow", "ru", NOW, "МСК"),
        ("Europe/Moscow", "en", NOW, "MSK"),
        ("UTC", "ru", NOW, "UTC"),
        ("Europe/Berlin", "en", datetime(2025, 11, 27, 12, tzinfo=UTC), "UTC+01:00"),
        ("Europe/Berlin", "en", datetime(2025, 7, 1, 12, tzinfo=UTC), "UTC+02:00"),
        ("America/New_York", "ru", datetime(2025, 11, 27, 12, tzinfo=UTC), "UTC-05:00"),
        ("Asia/Kolkata", "en", NOW, "UTC+05:30"),
    ],
)
def test_zone_label(time_zone: str, lang: Language, at: datetime, label: str) -> None:
    assert zone_label(time_zone, lang, at) == label


@pytest.mark.parametrize(
    ("at", "time_zone", "lang", "expected"),
    [
        (datetime(2025, 11, 27, 20, 59, tzinfo=UTC), "Europe/Moscow", "ru", "сегодня в 23:59 МСК"),
        (datetime(2025, 11, 27, 21, 0, tzinfo=UTC), "Europe/Moscow", "ru", "завтра в 00:00 МСК"),
        (datetime(2025, 11, 28, 21, 0, tzinfo=UTC), "Europe/Moscow", "en", "on 29 Nov at 00:00 MSK"),
        (datetime(2025, 11, 30, 6, 0, tzinfo=UTC), "Europe/Moscow", "ru", "30.11 в 09:00 МСК"),
        (datetime(2026, 1, 2, 6, 0, tzinfo=UTC), "Europe/Moscow", "ru", "02.01.2026 в 09:00 МСК"),
        (datetime(2026, 1, 2, 6, 0, tzinfo=UTC), "Europe/Moscow", "en", "on 2 Jan 2026 at 09:00 MSK"),
        (datetime(2025, 11, 28, 8, 0, tzinfo=UTC), "Europe/Berlin", "en", "tomorrow at 09:00 UTC+01:00"),
        (NOW - timedelta(minutes=1), "Europe/Moscow", "ru", "в ближайшее время"),
        (NOW, "Europe/Moscow", "en", "shortly"),
    ],
)
def test_time_text(at: datetime, time_zone: str, lang: Language, expected: str) -> None:
    assert time_text(at, lang, time_zone=time_zone, now=NOW) == expected


def test_the_day_is_the_day_in_the_given_zone() -> None:
    # 23:30 UTC on the 27th is already the 28th in Moscow ("today" there at 02:30 Moscow time).
    now = datetime(2025, 11, 27, 23, 30, tzinfo=UTC)
    at = datetime(2025, 11, 28, 6, 0, tzinfo=UTC)
    assert time_text(at, "ru", time_zone="Europe/Moscow", now=now) == "сегодня в 09:00 МСК"
    assert time_text(at, "en", time_zone="UTC", now=now) == "tomorrow at 06:00 UTC"


def test_hours_text() -> None:
    assert hours_text(WorkingHours.parse(), "ru", NOW) == "9:00-18:00 МСК"
    assert hours_text(WorkingHours.parse("10:30-24:00", time_zone="Europe/Berlin"), "en", NOW) == (
        "10:30-24:00 UTC+01:00")


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("en-US,en;q=0.9", "en"),
        ("ru-RU,ru;q=0.9,en-US;q=0.8,en;q=0.7", "ru"),
        ("fr-FR, en;q=0.5", "en"),
        ("en;q=0.5, ru;q=0.6", "ru"),
        ("ru;q=0, en;q=0.1", "en"),
        ("EN", "en"),
        ("de, fr", "ru"),
        ("*", "ru"),
        ("", "ru"),
        (None, "ru"),
        ("en;q=abc, ru;q=0.2", "ru"),
        (";;,", "ru"),
    ],
)
def test_pick_language(header: str | None, expected: Language) -> None:
    assert pick_language(header) == expected


def test_pick_language_default() -> None:
    assert pick_language(None, default="en") == "en"
    assert pick_language("de", default="en") == "en"


@pytest.mark.parametrize(
    ("status", "lang", "reason", "expected"),
    [
        ("sending", "ru", "", "Идёт рассылка"),
        ("deferred", "ru", "daily_limit", "Рассылка отложена: дневной лимит"),
        ("deferred", "en", "outside_hours", "Deferred: outside working hours"),
        ("paused", "ru", "circuit_open", "Рассылка приостановлена: много ошибок SMTP подряд"),
        ("paused", "en", "by the manager", "Paused: by the manager"),
        ("cancelled", "en", "", "Cancelled"),
        ("completed", "ru", "", "Рассылка завершена"),
    ],
)
def test_status_text(status: str, lang: Language, reason: str, expected: str) -> None:
    assert status_text(status, lang, reason=reason) == expected


def test_unknown_status_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown campaign status"):
        status_text("exploded", "ru")
