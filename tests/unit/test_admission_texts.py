"""Refusal and warning texts at start: real numbers in each language's style, times in the account's zone."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from services.pipeline.admission import permitted
from services.pipeline.admission_texts import refusal_texts, warning
from services.pipeline.working_hours import WorkingHours

NOW = datetime(2026, 11, 27, 16, 0, tzinfo=UTC)  # Friday 19:00 MSK


def test_too_many_recipients_names_both_numbers_and_asks_to_split() -> None:
    en, ru = refusal_texts("too_many_recipients", total=11_000, limit=10_000)
    assert en.startswith("The campaign has 11,000 recipients; at most 10,000 are allowed. Split it")
    assert ru.startswith("В кампании 11\u00a0000 получателей, а можно не больше 10\u00a0000. Разделите")


def test_an_hourly_throttle_says_when_to_try_again_in_the_accounts_zone() -> None:
    en, ru = refusal_texts("starts_per_hour", limit=10, when=datetime(2026, 11, 27, 16, 40, tzinfo=UTC),
                           now=NOW, time_zone="Europe/Moscow")
    assert en == "At most 10 campaign starts per hour. Try again today at 19:40 MSK."
    assert ru == "Можно запускать не больше 10 кампаний в час. Попробуйте снова сегодня в 19:40 МСК."


def test_outside_hours_warning_names_the_window_and_the_start() -> None:
    hours = WorkingHours.parse("09:00-18:00", "1-5", "Europe/Moscow")
    found = warning("outside_hours", starts_at=datetime(2026, 11, 30, 6, 0, tzinfo=UTC), now=NOW,
                    time_zone="Europe/Moscow", windows=[hours])
    assert found["text"] == ("Started outside working hours (9:00-18:00 MSK): "
                             "sending begins on 30 Nov at 09:00 MSK.")
    assert found["text_ru"] == ("Запуск вне рабочего времени (9:00-18:00 МСК): "
                                "рассылка начнётся 30.11 в 09:00 МСК.")
    assert found["starts_at"] == "2026-11-30T06:00:00.000000Z"


def test_unknown_codes_are_refused() -> None:
    with pytest.raises(KeyError):
        refusal_texts("because")


@pytest.mark.parametrize(("actor", "role", "owner", "allowed"), [
    ("manager-7", "manager", "manager-7", True),
    ("manager-8", "manager", "manager-7", False),
    ("oncall", "ops", "manager-7", True),
    ("root", "admin", "manager-7", True),
    ("manager-7", "viewer", "manager-7", False),
])
def test_a_manager_acts_on_own_campaigns_ops_and_admins_on_all(actor: str, role: str, owner: str,
                                                               allowed: bool) -> None:
    assert permitted(actor, role, owner) is allowed
