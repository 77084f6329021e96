"""Sends one `send.email` command and says what happened, as one outcome message.

Contract: `send_one(command, pools, settings)` renders, builds and sends the
email through the account's SMTP pool and returns exactly one outcome message
(`contract.envelope`, fields per docs/ARCHITECTURE.md):

- a 2xx reply to the payload → `outcome.sent` with that reply's code and text;
- a 4xx or 5xx reply at MAIL, RCPT or DATA → `outcome.failed` whose error_class
  the reply rules give (services/sender/smtp_replies.py): `permanent` (with
  `hard_bounce` when the address itself is bad), `transient` (the caller
  retries it), or `auth` when the account is refused;
- a template that does not render → `outcome.failed`, `template_error`;
- an address the message cannot carry → `outcome.failed`, `invalid_address`;
- a Unicode domain goes out as IDNA A-labels (services/sender/message.py), so
  only a non-ASCII local part needs SMTPUTF8: when the server does not offer it
  → `outcome.failed`, `not_supported`, with a reason that says so (no reply);
- an account with no pool → `outcome.failed`, `unknown_account`;
- no connection, a TLS or AUTH failure, a lost connection or a timeout before
  the payload went out → `outcome.failed`, `connection` / `tls` / `auth` /
  `timeout`;
- the connection lost or timed out after the payload went out (no reply), or
  any other error then → `outcome.unknown`, reason `no_reply_after_data`.

Any other exception before the payload went out propagates: the caller turns
it into `internal_failure()` (error_class `internal`). Outcomes never hold
credentials.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Mapping
from typing import Any

import aiosmtplib

from services.pipeline.contract import Message, envelope
from services.pipeline.ids import message_id_header
from services.pipeline.settings import Settings
from services.sender.message import MessageError, build_message, needs_smtputf8, smtp_address
from services.sender.raw_message import RawMessage
from services.sender.render import TemplateError, render_command
from services.sender.smtp_pool import PooledSMTP, SmtpConnectError, SmtpPools, UnknownAccount
from services.sender.smtp_replies import ReplyRules

NO_REPLY_AFTER_DATA = "no_reply_after_data"
DEFAULT_REPLY_RULES = ReplyRules.defaults()
MAX_TEXT = 2000
#: Control characters an SMTP reply may carry that no outcome keeps (tab, CR and LF stay).
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\x85\u2028\u2029]")


class Outcomes:
    """Builds the outcomes of one command, measuring time from its creation."""

    def __init__(
        self, command: Mapping[str, Any], settings: Settings, started: float,
        rules: ReplyRules | None = None,
    ) -> None:
        self.command = command
        self.settings = settings
        self.started = started
        self.rules = rules or DEFAULT_REPLY_RULES

    def build(
        self,
        kind: str,
        *,
        code: int | None = None,
        reply: str = "",
        error_class: str | None = None,
        reason: str | None = None,
        **extra: Any,
    ) -> Message:
        command = self.command
        fields: dict[str, Any] = {
            "campaign_id": command["campaign_id"],
            "send_id": command["send_id"],
            "attempt": command["attempt"],
            "is_test": command["is_test"],
            "account": command["account"],
            "recipient_email": command["recipient"]["email"],
            "smtp_code": code if code is not None and 100 <= code <= 599 else None,
            "smtp_reply": _CONTROL.sub(" ", reply[:MAX_TEXT]),  # a hostile server's NUL stops here
            "error_class": error_class,
            "message_id_header": message_id_header(
                command["send_id"], self.settings.message_id_domain
            ),
            "duration_ms": round(max(0.0, time.monotonic() - self.started) * 1000, 3),
        }
        if reason is not None:
            fields["reason"] = reason[:MAX_TEXT]
        fields.update(extra)
        return envelope(f"outcome.{kind}", **fields)

    def failed(
        self, error_class: str, reason: str, code: int | None = None, reply: str = ""
    ) -> Message:
        return self.build("failed", code=code, reply=reply, error_class=error_class, reason=reason)

    def by_reply(self, step: str, code: int, reply: str) -> Message:
        """The outcome of a negative SMTP reply at `step`, classified by the reply rules (R31)."""
        if not 400 <= code <= 599:
            return self.failed("protocol", f"{step} got an unexpected reply {code}", code, reply)
        verdict = self.rules.classify(code, reply)
        error_class = {"permanent": "permanent", "transient": "transient",
                       "account_stop": "auth"}[verdict.reply_class]
        outcome = self.failed(
            error_class, f"{step} refused with {code} ({verdict.rule})", code, reply
        )
        if verdict.hard_bounce:
            outcome["hard_bounce"] = True
        return outcome


def internal_failure(
    command: Mapping[str, Any], settings: Settings, reason: str, started: float | None = None
) -> Message:
    """`outcome.failed` with error_class `internal`, for an unexpected error."""
    return Outcomes(command, settings, time.monotonic() if started is None else started).failed(
        "internal", reason
    )


async def send_one(
    command: Mapping[str, Any], pools: SmtpPools, settings: Settings,
    rules: ReplyRules | None = None,
) -> Message:
    """Send one command's email; return its outcome message."""
    outcomes = Outcomes(command, settings, time.monotonic(), rules)
    try:
        rendered = render_command(command)
    except TemplateError as exc:
        return outcomes.failed("template_error", exc.reason)
    try:
        message = build_message(command, rendered, settings)
        sender = smtp_address(command["from"]["email"])
        recipient = smtp_address(command["recipient"]["email"])
    except MessageError as exc:
        return outcomes.failed("invalid_address", exc.reason)
    try:
        pool = pools.get(command["account"])
    except UnknownAccount:
        return outcomes.failed(
            "unknown_account", f"no SMTP account {command['account']!r} is configured"
        )

    lent: PooledSMTP | None = None
    try:
        async with pool.connection() as conn:
            lent = conn
            if (needs_smtputf8(sender) or needs_smtputf8(recipient)) \
                    and not conn.supports_extension("smtputf8"):
                return outcomes.failed("not_supported", _smtputf8_missing(sender, recipient))
            try:
                if isinstance(message, RawMessage):
                    await conn.sendmail(sender, [recipient], message.data)
                else:  # an address only SMTPUTF8 can carry: aiosmtplib negotiates it
                    await conn.send_message(message, sender=sender, recipients=[recipient])
            except aiosmtplib.SMTPRecipientsRefused as exc:
                refused = exc.recipients[0]
                return outcomes.by_reply("RCPT TO", refused.code, refused.message)
            except aiosmtplib.SMTPResponseException as exc:
                if not 400 <= exc.code <= 599:
                    raise  # a garbled reply: the session cannot be trusted any more
                return outcomes.by_reply(_step(exc), exc.code, exc.message)
            reply = conn.data_reply
            if reply is None:  # send_message returned without our DATA: cannot happen
                raise RuntimeError("DATA reply missing after a successful send")
            return outcomes.build("sent", code=reply.code, reply=reply.message)
    except SmtpConnectError as exc:
        return outcomes.failed(exc.error_class, exc.reason, exc.code, exc.reply)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        if lent is not None and lent.payload_sent:
            return outcomes.build(
                "unknown",
                error_class=_transport_class(exc) or type(exc).__name__,
                reason=NO_REPLY_AFTER_DATA,
            )
        error_class = _transport_class(exc)
        if error_class is not None:
            return outcomes.failed(error_class, f"{error_class} error before DATA: {_text(exc)}")
        if isinstance(exc, aiosmtplib.SMTPNotSupported):
            return outcomes.failed("not_supported", _text(exc))
        if isinstance(exc, aiosmtplib.SMTPResponseException):
            return outcomes.by_reply(_step(exc), exc.code, exc.message)
        if isinstance(exc, ValueError) and lent is not None:
            # aiosmtplib refuses addresses that are unsafe on an SMTP command line
            return outcomes.failed("invalid_address", "address cannot be sent over SMTP")
        raise


def _smtputf8_missing(sender: str, recipient: str) -> str:
    """Why a message needing SMTPUTF8 cannot go to a server that does not offer it."""
    whose = "recipient's" if needs_smtputf8(recipient) else "sender's"
    return (f"the {whose} mailbox name (the part before @) is not ASCII: it can only be sent "
            "with the SMTPUTF8 extension (RFC 6531), which this SMTP server does not offer")


def _step(exc: aiosmtplib.SMTPResponseException) -> str:
    if isinstance(exc, aiosmtplib.SMTPSenderRefused):
        return "MAIL FROM"
    if isinstance(exc, aiosmtplib.SMTPRecipientRefused):
        return "RCPT TO"
    if isinstance(exc, aiosmtplib.SMTPDataError):
        return "DATA"
    if isinstance(exc, aiosmtplib.SMTPHeloError):
        return "EHLO"
    return "SMTP"


def _transport_class(exc: BaseException) -> str | None:
    """`timeout` or `connection` for a transport failure, else None."""
    if isinstance(exc, aiosmtplib.SMTPTimeoutError | asyncio.TimeoutError):
        return "timeout"
    if isinstance(exc, aiosmtplib.SMTPServerDisconnected | ConnectionError | OSError):
        return "connection"
    return None


def _text(exc: BaseException) -> str:
    return (str(exc) or type(exc).__name__)[:500]
