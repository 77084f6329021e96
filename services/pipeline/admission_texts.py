"""What managers read when a start or a test email is refused, waits, or starts with a warning.

Contract: `refusal_texts(code, ...)` returns (English, Russian) for a refusal
or wait code, with its real numbers and, for the hourly throttles, the time a
new try succeeds; `warning(code, ...)` returns a status-event warning
`{code, text, text_ru[, starts_at]}`. Unknown codes raise KeyError. Times and
working windows are written by the deferral catalogue (`reason_texts`).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from services.pipeline.contract import iso
from services.pipeline.working_hours import WorkingHours
from services.reconciler.reason_texts import Language, hours_text, time_text

LANGUAGES_EN_RU: tuple[Language, Language] = ("en", "ru")

_REFUSALS: dict[str, tuple[str, str]] = {
    "too_many_recipients": (
        "The campaign has {total} recipients; at most {limit} are allowed. Split it into campaigns "
        "of up to {limit} recipients and start each one separately.",
        "В кампании {total} получателей, а можно не больше {limit}. Разделите её на несколько "
        "кампаний до {limit} получателей и запустите каждую отдельно.",
    ),
    "recipients_over_limit": (
        "Chunk {chunk} would bring the campaign to {total} recipients; at most {limit} are allowed. "
        "Its recipients are not sent: split the campaign.",
        "Часть {chunk} довела бы кампанию до {total} получателей, а можно не больше {limit}. "
        "Её получатели не получат письмо: разделите кампанию.",
    ),
    "active_campaigns": (
        "You already have {active} active campaigns; at most {limit} may run at once. Start this one "
        "when one of them completes, or cancel one.",
        "У вас уже {active} активных кампаний, одновременно можно не больше {limit}. Запустите эту, "
        "когда одна из них завершится, или отмените одну.",
    ),
    "starts_per_hour": (
        "At most {limit} campaign starts per hour. Try again {when}.",
        "Можно запускать не больше {limit} кампаний в час. Попробуйте снова {when}.",
    ),
    "test_emails_per_hour": (
        "At most {limit} test emails per hour. Try again {when}.",
        "Можно отправлять не больше {limit} тестовых писем в час. Попробуйте снова {when}.",
    ),
    "needs_confirmation": (
        "The campaign has {total} recipients, more than {limit}: confirm it to start sending.",
        "В кампании {total} получателей — больше {limit}. Подтвердите запуск, чтобы начать рассылку.",
    ),
}

_WARNINGS: dict[str, tuple[str, str]] = {
    "large_campaign": (
        "Large campaign: {total} recipients (more than {limit}). Check the list before it goes.",
        "Большая кампания: {total} получателей (больше {limit}). Проверьте список перед отправкой.",
    ),
    "quota_empty": (
        "The provider quota of account {account} is 0: sending waits until it is topped up.",
        "Квота провайдера для аккаунта {account} равна 0: рассылка начнётся после пополнения.",
    ),
    "outside_hours": (
        "Started outside working hours ({window}): sending begins {when}.",
        "Запуск вне рабочего времени ({window}): рассылка начнётся {when}.",
    ),
}


def _both(pair: tuple[str, str], numbers: dict[str, Any], *, at: datetime | None, now: datetime | None,
          time_zone: str, windows: Sequence[WorkingHours] = ()) -> tuple[str, str]:
    """(English, Russian) of a template pair, with its numbers, `at` as {when} and the {window}."""
    texts = []
    for template, lang in zip(pair, LANGUAGES_EN_RU, strict=True):
        sep = "," if lang == "en" else "\u00a0"
        values = {k: f"{v:,}".replace(",", sep) if isinstance(v, int) else v for k, v in numbers.items()}
        if at is not None and now is not None:
            values["when"] = time_text(at, lang, time_zone=time_zone, now=now)
            values["window"] = ", ".join(hours_text(w, lang, now) for w in windows)
        texts.append(template.format(**values))
    return texts[0], texts[1]


def refusal_texts(code: str, *, when: datetime | None = None, time_zone: str = "UTC",
                  now: datetime | None = None, **numbers: int) -> tuple[str, str]:
    """(English, Russian) explanation of refusal or wait `code` with its numbers."""
    return _both(_REFUSALS[code], dict(numbers), at=when, now=now, time_zone=time_zone)


def warning(code: str, *, starts_at: datetime | None = None, now: datetime | None = None,
            time_zone: str = "UTC", windows: Sequence[WorkingHours] = (), **numbers: Any) -> dict[str, Any]:
    """One start warning as the status event and the poll endpoint carry it."""
    en, ru = _both(_WARNINGS[code], numbers, at=starts_at, now=now, time_zone=time_zone, windows=windows)
    found: dict[str, Any] = {"code": code, "text": en, "text_ru": ru}
    if starts_at is not None:
        found["starts_at"] = iso(starts_at)
    return found
