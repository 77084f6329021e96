"""One log format for every service: JSON lines, or readable lines on a terminal (R22).

Contract: `logging_config(service, settings, tty)` is the `logging.config`
dict every service runs with (faust's worker applies it). Each record becomes
one JSON object (python-json-logger) with `ts`, `level`, `service`, `logger`,
`event` (the `event` extra, else `log`) and `message`, plus every extra the
call site gave: `campaign_id`, `send_id`, `recipient`, `account`,
`defer_reason`, `deferred_until`, `error_type`, `smtp_code`, … On a terminal
the same record is one readable line with those fields appended. Addresses in
`recipient` / `email` fields are masked (`i***@example.com`) unless
MAILER_LOG_ADDRESSES is on. `event(logger, name, message, **fields)` logs one
such event at info.
"""

from __future__ import annotations

import logging
from typing import Any

from services.pipeline.redaction import mask_email
from services.pipeline.settings import Settings

_LEVELS = {"debug": "DEBUG", "info": "INFO", "warn": "WARNING", "warning": "WARNING",
           "error": "ERROR", "crit": "CRITICAL", "critical": "CRITICAL"}
#: Extras whose value is an email address.
ADDRESS_FIELDS = ("recipient", "email", "recipient_email")
#: Attributes every LogRecord has: not extras.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class ServiceFields(logging.Filter):
    """Adds `service` and `event` to every record and masks addresses in its extras."""

    def __init__(self, service: str, mask: bool = True) -> None:
        super().__init__()
        self.service = service
        self.mask = mask

    def filter(self, record: logging.LogRecord) -> bool:
        record.service = self.service
        if not hasattr(record, "event"):
            record.event = "log"
        if self.mask:
            for name in ADDRESS_FIELDS:
                value = getattr(record, name, None)
                if isinstance(value, str):
                    setattr(record, name, mask_email(value))
        return True


class ConsoleFormatter(logging.Formatter):
    """`time level service event: message key=value ...` for people at a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        base = (f"{self.formatTime(record, '%H:%M:%S')} {record.levelname:<7} "
                f"{getattr(record, 'service', '-')} {getattr(record, 'event', 'log')}: "
                f"{record.getMessage()}")
        extras = " ".join(f"{k}={v}" for k, v in vars(record).items()
                          if k not in _STANDARD and k not in ("service", "event"))
        text = f"{base} {extras}" if extras else base
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def logging_config(service: str, settings: Settings, tty: bool) -> dict[str, Any]:
    """The dictConfig of `service`'s process."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"service": {"()": ServiceFields, "service": service,
                                "mask": not settings.log_addresses}},
        "formatters": {
            "json": {
                "()": "pythonjsonlogger.json.JsonFormatter",
                "fmt": "%(asctime)s %(levelname)s %(service)s %(name)s %(event)s %(message)s",
                "rename_fields": {"asctime": "ts", "levelname": "level", "name": "logger"},
            },
            "console": {"()": ConsoleFormatter},
        },
        "handlers": {
            "main": {"class": "logging.StreamHandler", "stream": "ext://sys.stderr",
                     "formatter": "console" if tty else "json", "filters": ["service"]},
        },
        "root": {"handlers": ["main"], "level": _LEVELS.get(settings.log_level, "INFO")},
    }


def event(logger: logging.Logger, name: str, message: str, **fields: Any) -> None:
    """Log the event `name` at info with its fields (ids, reasons, codes) as extras."""
    logger.info(message, extra={"event": name, **fields})
