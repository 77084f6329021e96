"""The one catalogue of what managers read about a campaign, in Russian and English (R19).

Contract: `defer_text(reason, lang, until=..., time_zone=..., now=..., numbers=...)`
explains a deferral with its numbers and the time sending resumes, e.g.
"Вы достигли дневного лимита 120/120. Продолжим завтра в 09:00 МСК."; every
`DeferReason` has a text in every language, and a missing number falls back to
a text without it, never an error. An unknown reason raises
`UnknownDeferReason`. Times are shown in `time_zone` as HH:MM with its label
(МСК/MSK for Moscow, UTC, else the offset such as UTC+01:00) and the day as
today/tomorrow or a date. `status_text` names a campaign status, with a reason
if given; `pick_language` reads an Accept-Language header (Russian by default).
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal, cast, get_args

from services.pipeline.defer_reasons import DeferReason, defer_reason
from services.pipeline.working_hours import WorkingHours, zone

Language = Literal["ru", "en"]
LANGUAGES: tuple[Language, ...] = get_args(Language)

_R = DeferReason
_RETRY_SOON = timedelta(minutes=60)  # retries this close are told in minutes as well
_ZONE_LABELS: dict[str, dict[Language, str]] = {
    "Europe/Moscow": {"ru": "МСК", "en": "MSK"},
    "UTC": {"ru": "UTC", "en": "UTC"},
    "Etc/UTC": {"ru": "UTC", "en": "UTC"},
}
_MONTHS_EN = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


@dataclass(frozen=True)
class _Entry:
    """One reason's text in one language."""

    variants: tuple[str, ...]  # most specific first; the first whose numbers are all given wins
    resume: str  # with {when}: when sending resumes
    resume_unknown: str  # when that time is not known
    retry: bool = False  # a retry: a time within the hour is also told in minutes


def _entries(ru: _Entry, en: _Entry) -> dict[Language, _Entry]:
    return {"ru": ru, "en": en}


_RU_RESUME, _EN_RESUME = "Продолжим {when}.", "We will resume {when}."
_RU_AUTO, _EN_AUTO = "Рассылка продолжится автоматически.", "Sending will resume automatically."
_RU_RETRY, _EN_RETRY = "Повторим попытку {when}.", "We will retry {when}."

_CATALOGUE: dict[DeferReason, dict[Language, _Entry]] = {
    _R.RATE_PER_HOUR: _entries(
        _Entry(("Достигнут лимит {limit_emails}/час.", "Достигнут часовой лимит отправки."),
               _RU_RESUME, _RU_AUTO),
        _Entry(("Reached the limit of {limit_emails} per hour.", "Reached the hourly sending limit."),
               _EN_RESUME, _EN_AUTO),
    ),
    _R.CAMPAIGN_RATE: _entries(
        _Entry(("Достигнут лимит кампании {limit_emails}/час.", "Достигнут часовой лимит кампании."),
               _RU_RESUME, _RU_AUTO),
        _Entry(("Reached the campaign's limit of {limit_emails} per hour.",
                "Reached the campaign's hourly limit."), _EN_RESUME, _EN_AUTO),
    ),
    _R.DOMAIN_THROTTLE: _entries(
        _Entry(("Достигнут лимит отправки на {domain}: {limit_emails}/час.",
                "Достигнут лимит отправки на {domain}.",
                "Достигнут лимит отправки на почтовый сервис получателей."), _RU_RESUME, _RU_AUTO),
        _Entry(("Reached the sending limit for {domain}: {limit_emails} per hour.",
                "Reached the sending limit for {domain}.",
                "Reached the sending limit for the recipients' mail provider."), _EN_RESUME, _EN_AUTO),
    ),
    _R.DAILY_LIMIT: _entries(
        _Entry(("Вы достигли дневного лимита {sent}/{limit}.",
                "Вы достигли дневного лимита ({limit_emails}).",
                "Вы достигли дневного лимита."), _RU_RESUME, _RU_AUTO),
        _Entry(("You have reached your daily limit of {sent}/{limit}.",
                "You have reached your daily limit ({limit_emails}).", "You have reached your daily limit."),
               _EN_RESUME, _EN_AUTO),
    ),
    _R.WARMUP_CAP: _entries(
        _Entry(("Ящик отправителя на прогреве: дневной лимит прогрева ({limit_emails}) исчерпан.",
                "Ящик отправителя на прогреве: дневной лимит прогрева исчерпан."), _RU_RESUME, _RU_AUTO),
        _Entry(("The sending mailbox is warming up: today's warm-up limit ({limit_emails}) is used up.",
                "The sending mailbox is warming up: today's warm-up limit is used up."),
               _EN_RESUME, _EN_AUTO),
    ),
    _R.QUOTA_EXHAUSTED: _entries(
        _Entry(("Глобальной квоты не хватает: доступно {available}, нужно {needed}. Администратор пополнит"
                " квоту, после чего рассылка продолжится автоматически.",
                "Глобальная квота исчерпана. Администратор пополнит квоту, после чего рассылка продолжится"
                " автоматически."), "Проверим квоту снова {when}.", ""),
        _Entry(("The global quota is too small: {available} available, {needed} needed. An administrator"
                " will top it up, and sending will then resume automatically.",
                "The global quota is exhausted. An administrator will top it up, and sending will then"
                " resume automatically."), "We will check the quota again {when}.", ""),
    ),
    _R.QUOTA_UNKNOWN: _entries(
        _Entry(("Квота почтового провайдера ещё не получена. Рассылка начнётся автоматически, как только"
                " квота станет известна.",), "Проверим снова {when}.", ""),
        _Entry(("The mail provider's quota is not known yet. Sending will start automatically as soon as"
                " it is.",), "We will check again {when}.", ""),
    ),
    _R.OUTSIDE_HOURS: _entries(
        _Entry(("Сейчас вне рабочего времени ({window}).", "Сейчас вне рабочего времени."),
               _RU_RESUME, _RU_AUTO),
        _Entry(("It is outside working hours ({window}).", "It is outside working hours."),
               _EN_RESUME, _EN_AUTO),
    ),
    _R.LIMITER_UNAVAILABLE: _entries(
        _Entry(("Сервис учёта лимитов временно недоступен; чтобы не превысить лимиты, отправка"
                " приостановлена.",), _RU_RETRY, _RU_AUTO, retry=True),
        _Entry(("The limits service is temporarily unavailable; sending is on hold so that no limit is"
                " exceeded.",), _EN_RETRY, _EN_AUTO, retry=True),
    ),
    _R.TRANSIENT_ERROR: _entries(
        _Entry(("Временная ошибка отправки.",), _RU_RETRY, _RU_AUTO, retry=True),
        _Entry(("Temporary sending error.",), _EN_RETRY, _EN_AUTO, retry=True),
    ),
    _R.CIRCUIT_OPEN: _entries(
        _Entry(("Слишком много временных ошибок SMTP подряд ({errors}); отправка приостановлена.",
                "Слишком много временных ошибок SMTP подряд; отправка приостановлена."), _RU_RETRY,
               "Рассылка продолжится, когда SMTP-сервер снова начнёт принимать письма.", retry=True),
        _Entry(("Too many temporary SMTP errors in a row ({errors}); sending is on hold.",
                "Too many temporary SMTP errors in a row; sending is on hold."), _EN_RETRY,
               "Sending will continue once the SMTP server accepts mail again.", retry=True),
    ),
    _R.CAMPAIGN_PAUSED: _entries(
        _Entry(("Рассылка приостановлена; письма ждут возобновления.",), "",
               "Рассылка продолжится с того же места после команды «возобновить»."),
        _Entry(("The campaign is paused; its emails wait for it to resume.",), "",
               "Sending continues where it stopped once the campaign is resumed."),
    ),
}

_LABELS: dict[DeferReason, dict[Language, str]] = {
    _R.RATE_PER_HOUR: {"ru": "часовой лимит", "en": "hourly limit"},
    _R.CAMPAIGN_RATE: {"ru": "часовой лимит кампании", "en": "campaign's hourly limit"},
    _R.DOMAIN_THROTTLE: {"ru": "лимит почтового сервиса получателей", "en": "recipients' provider limit"},
    _R.DAILY_LIMIT: {"ru": "дневной лимит", "en": "daily limit"},
    _R.WARMUP_CAP: {"ru": "лимит прогрева", "en": "warm-up limit"},
    _R.QUOTA_EXHAUSTED: {"ru": "квота исчерпана", "en": "quota exhausted"},
    _R.QUOTA_UNKNOWN: {"ru": "квота ещё не известна", "en": "quota not known yet"},
    _R.OUTSIDE_HOURS: {"ru": "вне рабочего времени", "en": "outside working hours"},
    _R.LIMITER_UNAVAILABLE: {"ru": "сервис лимитов недоступен", "en": "limits service unavailable"},
    _R.TRANSIENT_ERROR: {"ru": "временная ошибка отправки", "en": "temporary sending error"},
    _R.CIRCUIT_OPEN: {"ru": "много ошибок SMTP подряд", "en": "too many SMTP errors in a row"},
    _R.CAMPAIGN_PAUSED: {"ru": "кампания на паузе", "en": "the campaign is paused"},
}

_STATUSES: dict[str, dict[Language, str]] = {
    "sending": {"ru": "Идёт рассылка", "en": "Sending"},
    "deferred": {"ru": "Рассылка отложена", "en": "Deferred"},
    "paused": {"ru": "Рассылка приостановлена", "en": "Paused"},
    "cancelled": {"ru": "Рассылка отменена", "en": "Cancelled"},
    "completed": {"ru": "Рассылка завершена", "en": "Completed"},
    "needs_confirmation": {"ru": "Ждёт подтверждения", "en": "Awaiting confirmation"},
    "refused": {"ru": "Кампания отклонена", "en": "Refused"},
    "rejected": {"ru": "Запуск не принят", "en": "Start rejected"},
}


def _check_language(lang: str) -> Language:
    if lang not in LANGUAGES:
        raise ValueError(f"unsupported language {lang!r} (supported: {', '.join(LANGUAGES)})")
    return cast(Language, lang)


def _aware(at: datetime, what: str) -> datetime:
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError(f"{what} must be an aware datetime, got {at!r}")
    return at


def pick_language(accept_language: str | None, default: Language = "ru") -> Language:
    """The supported language an Accept-Language header prefers most (q-values honoured), else `default`."""
    best: tuple[float, Language] | None = None
    for item in (accept_language or "").split(","):
        tag, *params = (part.strip() for part in item.split(";"))
        quality = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = -1.0
        if not (0.0 < quality <= 1.0):
            continue
        primary = tag.split("-")[0].lower()
        if primary != "*" and primary not in LANGUAGES:
            continue
        lang = default if primary == "*" else cast(Language, primary)
        if best is None or quality > best[0]:
            best = (quality, lang)
    return default if best is None else best[1]


def _plural_ru(n: int, one: str, few: str, many: str) -> str:
    if n % 10 == 1 and n % 100 != 11:
        return one
    if 2 <= n % 10 <= 4 and not 12 <= n % 100 <= 14:
        return few
    return many


_EMAILS: dict[Language, tuple[str, ...]] = {"ru": ("письмо", "письма", "писем"), "en": ("email", "emails")}
_MINUTES: dict[Language, tuple[str, ...]] = {"ru": ("минуту", "минуты", "минут"), "en": ("minute", "minutes")}


def _count(n: int, lang: Language, forms: Mapping[Language, tuple[str, ...]]) -> str:
    """`n` with its noun in the right plural form: '1 письмо', '5 писем', '1 email', '5 emails'."""
    words = forms[lang]
    word = _plural_ru(n, *words) if lang == "ru" else (words[0] if n == 1 else words[1])
    return f"{n} {word}"


def zone_label(time_zone: str, lang: Language, at: datetime) -> str:
    """How a time in `time_zone` is labelled: 'МСК'/'MSK', 'UTC', or its offset at `at`, e.g. 'UTC+01:00'."""
    known = _ZONE_LABELS.get(time_zone)
    if known is not None:
        return known[_check_language(lang)]
    offset = _aware(at, "at").astimezone(zone(time_zone)).utcoffset() or timedelta(0)
    minutes = int(offset.total_seconds()) // 60
    sign = "-" if minutes < 0 else "+"
    return f"UTC{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"


def time_text(at: datetime, lang: Language, *, time_zone: str, now: datetime, retry: bool = False) -> str:
    """`at` as a manager in `time_zone` reads it at `now`: 'завтра в 09:00 МСК', 'on 30 Nov at 09:00 MSK'.

    With `retry`, a time within the hour is also given in minutes ('через 5 минут (в 15:05 МСК)').
    """
    lang = _check_language(lang)
    tz = zone(time_zone)
    local, local_now = _aware(at, "until").astimezone(tz), _aware(now, "now").astimezone(tz)
    if local <= local_now:
        return "в ближайшее время" if lang == "ru" else "shortly"
    clock = f"{local:%H:%M} {zone_label(time_zone, lang, at)}"
    if retry and local - local_now <= _RETRY_SOON:
        minutes = max(1, round((local - local_now).total_seconds() / 60))
        count = _count(minutes, lang, _MINUTES)
        return f"через {count} (в {clock})" if lang == "ru" else f"in {count} (at {clock})"
    days = (local.date() - local_now.date()).days
    if days == 0:
        return f"сегодня в {clock}" if lang == "ru" else f"today at {clock}"
    if days == 1:
        return f"завтра в {clock}" if lang == "ru" else f"tomorrow at {clock}"
    same_year = local.year == local_now.year
    if lang == "ru":
        return f"{local:%d.%m}{'' if same_year else f'.{local.year}'} в {clock}"
    month = _MONTHS_EN[local.month - 1]
    return f"on {local.day} {month}{'' if same_year else f' {local.year}'} at {clock}"


def hours_text(hours: WorkingHours, lang: Language, at: datetime) -> str:
    """A working window as managers read it, e.g. '9:00-18:00 МСК' (the `window` number of outside_hours)."""
    start, end = hours.start_minute, hours.end_minute
    return (f"{start // 60}:{start % 60:02d}-{end // 60}:{end % 60:02d} "
            f"{zone_label(hours.time_zone, lang, at)}")


def _fields(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


def _values(numbers: Mapping[str, int | str], lang: Language) -> dict[str, str]:
    """The numbers as text, plus '<name>_emails' ('100 писем', '1 email') for every whole number."""
    values = {key: str(value) for key, value in numbers.items() if value is not None and str(value) != ""}
    for key, value in numbers.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
            values[f"{key}_emails"] = _count(int(value), lang, _EMAILS)
    return values


def defer_text(
    reason: DeferReason | str,
    lang: Language,
    *,
    until: datetime | None,
    time_zone: str,
    now: datetime,
    numbers: Mapping[str, int | str] | None = None,
) -> str:
    """The manager's explanation of a deferral for `reason`, resuming at `until` (None: not known)."""
    entry = _CATALOGUE[defer_reason(reason)][_check_language(lang)]
    values = _values(numbers or {}, lang)
    # The last variant needs no numbers, so a missing number never fails.
    text = next((v for v in entry.variants if _fields(v) <= values.keys()), entry.variants[-1])
    text = text.format_map(values) if _fields(text) <= values.keys() else text
    if until is None:
        resume = entry.resume_unknown
    else:
        resume = entry.resume.format(
            when=time_text(until, lang, time_zone=time_zone, now=now, retry=entry.retry))
    return f"{text} {resume}".strip()


def reason_label(reason: DeferReason | str, lang: Language) -> str:
    """A few words naming `reason`, e.g. 'дневной лимит' / 'daily limit'."""
    return _LABELS[defer_reason(reason)][_check_language(lang)]


def status_text(status: str, lang: Language, *, reason: str = "") -> str:
    """A campaign status as managers read it; `reason` (a `DeferReason` value or free text) follows it."""
    names = _STATUSES.get(status)
    if names is None:
        raise ValueError(f"unknown campaign status {status!r} (known: {', '.join(_STATUSES)})")
    text = names[_check_language(lang)]
    reason = reason.strip()
    if not reason:
        return text
    if reason in {r.value for r in DeferReason}:
        reason = reason_label(reason, lang)
    return f"{text}: {reason}"


_RESUMED: dict[Language, str] = {
    "ru": "Ожидание окончено ({label}): рассылка снова идёт.",
    "en": "The wait is over ({label}): sending again.",
}
_CORRECTED: dict[Language, str] = {
    "ru": "Счётчики уточнены: письма, которые уже отправлялись в момент события «{status}»,"
          " получили результат.",
    "en": "Counts brought up to date: emails already on their way at the \u201c{status}\u201d event"
          " have their results.",
}


def resumed_text(reason: DeferReason | str, lang: Language) -> str:
    """The manager's text when a deferral for `reason` is over and the campaign sends again."""
    return _RESUMED[_check_language(lang)].format(label=reason_label(reason, lang))


def correction_text(status: str, lang: Language) -> str:
    """The manager's text of a corrected status event: the counts changed after it, not the status."""
    lang = _check_language(lang)
    names = _STATUSES.get(status)
    if names is None:
        raise ValueError(f"unknown campaign status {status!r} (known: {', '.join(_STATUSES)})")
    return _CORRECTED[lang].format(status=names[lang])


def correction_texts(status: str) -> tuple[str, str]:
    """(English, Russian) of `correction_text`, as a status event carries them."""
    return correction_text(status, "en"), correction_text(status, "ru")
