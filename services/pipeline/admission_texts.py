"""What managers read when a start or a test email is refused, waits, or starts with a warning.

Contract: `refusal_texts(code, ...)` returns (English, Russian) for a refusal
or wait code, with its real numbers and, for the hourly throttles, the time a
new try succeeds; `warning(code, ...)` returns a status-event warning
`{code, text, text_ru[, starts_at]}`. Unknown codes raise KeyError. Besides
the refusals at start, the catalogue holds the refusals of one chunk
(`CHUNK_REFUSALS`), of an unreadable start (`invalid_start`) and the poll
endpoint's `waiting_for_refused_chunk`. Times and
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
    "template_invalid": (
        "The template cannot be used ({problem}). Nothing was sent: fix the template and start "
        "the campaign again under a new campaign id.",
        "Шаблон нельзя использовать ({problem}). Ничего не отправлено: исправьте шаблон и "
        "запустите кампанию снова под новым id.",
    ),
    "campaign_id_reused": (
        "Campaign {campaign} already exists with another start (its template, sender, recipients "
        "or settings differ). A campaign id names one campaign: start this one under a new id.",
        "Кампания {campaign} уже существует и была запущена с другими данными (шаблон, "
        "отправитель, получатели или настройки). Один id — одна кампания: запустите эту под новым id.",
    ),
    "invalid_start": (
        "The start of the campaign cannot be accepted: {problem}. Nothing was sent: fix it and "
        "publish the start again.",
        "Запуск кампании не принят: {problem}. Ничего не отправлено: исправьте его и "
        "опубликуйте запуск снова.",
    ),
    "chunk_not_declared": (
        "Chunk {chunk} was not declared: the start declared {chunks} chunk(s), numbered 0 to {last}. "
        "Its recipients are not sent.",
        "Часть {chunk} не была объявлена: при запуске объявлено частей — {chunks}, с номерами "
        "от 0 до {last}. Её получатели не получат письмо.",
    ),
    "recipients_over_declared": (
        "Chunk {chunk} would bring the campaign to {total} recipients; its start declared {declared}. "
        "Its recipients are not sent: send the chunk again with the declared recipients, or start "
        "a new campaign for the others.",
        "Часть {chunk} довела бы кампанию до {total} получателей, а при запуске объявлено "
        "{declared}. Её получатели не получат письмо: отправьте часть снова с объявленными "
        "получателями или запустите для остальных новую кампанию.",
    ),
    "chunk_conflict": (
        "Chunk {chunk} was already received with other recipients; a chunk cannot be replaced. "
        "Its recipients are not sent.",
        "Часть {chunk} уже получена с другими получателями; заменить часть нельзя. "
        "Её получатели не получат письмо.",
    ),
    "chunk_invalid": (
        "Chunk {chunk} cannot be accepted: {problem}. Its recipients are not sent: fix it and "
        "publish it again.",
        "Часть {chunk} не принята: {problem}. Её получатели не получат письмо: исправьте её и "
        "опубликуйте снова.",
    ),
    "waiting_for_refused_chunk": (
        "Waiting for chunk {chunk} of {chunks}, which was refused: {reason}",
        "Ждём часть {chunk} из {chunks}, она была отклонена: {reason}",
    ),
}

#: Refusals of one chunk (the campaign keeps its status; its status event names the chunk).
CHUNK_REFUSALS = ("chunk_not_declared", "recipients_over_declared", "chunk_conflict", "chunk_invalid",
                  "recipients_over_limit")

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
                  now: datetime | None = None, **numbers: int | str) -> tuple[str, str]:
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
