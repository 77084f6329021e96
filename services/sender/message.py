"""Builds the RFC 5322 message of one send command.

Contract: `build_message(command, rendered, settings)` returns the message
(`as_bytes()` gives it as sent, CRLF) with From (display name kept), To,
Reply-To when the command has one, Subject, Date, the deterministic
`Message-ID` `<send_id@MAILER_MESSAGE_ID_DOMAIN>`, the RFC 8058
`List-Unsubscribe` / `List-Unsubscribe-Post` pair when an unsubscribe URL was
rendered, and the body: text/plain, text/html, or multipart/alternative when
both exist, quoted-printable UTF-8. When every address is plain ASCII
(nearly always) it is a `RawMessage` written by `services/sender/raw_message.py`
(over 100 times faster; the same bytes as the email package but for the
boundary, and RFC 2047 words for non-ASCII text); otherwise an
`email.message.EmailMessage` (policy SMTP), which aiosmtplib's `send_message`
sends with SMTPUTF8. An address the email package cannot represent raises
`MessageError(reason)`.

Internationalised domains (RFC 5891): `smtp_address(addr)` is the address as it
goes on the wire, its domain converted to IDNA A-labels (UTS #46 mapping,
non-transitional), e.g. `ivan@пример.рф` → `ivan@xn--e1afmkfd.xn--p1ai`. Every
address of the message (envelope and From/To/Reply-To headers) is written
that way, so an ASCII local part at a Unicode domain is plain ASCII and needs
no SMTPUTF8; only a non-ASCII local part does (`needs_smtputf8`). A domain
that is not a valid IDN raises `MessageError`.
"""

from __future__ import annotations

import email.policy
from collections.abc import Mapping
from datetime import UTC, datetime
from email.errors import HeaderParseError, NonASCIILocalPartDefect
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime
from typing import Any

import idna

from services.pipeline.ids import message_id_header
from services.pipeline.settings import Settings
from services.sender.raw_message import RawMessage, raw_message
from services.sender.render import Rendered

UNSUBSCRIBE_POST = "List-Unsubscribe=One-Click"
#: Bodies are 7-bit clean whatever the server supports (no 8BITMIME needed).
_CTE = "quoted-printable"


class MessageError(ValueError):
    """The message cannot be built (an unusable address); `reason` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def smtp_address(addr: str) -> str:
    """`addr` with its domain as IDNA A-labels (RFC 5891); the local part as it is."""
    local, at, domain = addr.rpartition("@")
    if not at or domain.isascii():
        return addr
    try:
        ace = idna.encode(domain, uts46=True, transitional=False).decode("ascii")
    except (idna.IDNAError, UnicodeError, ValueError):
        raise MessageError("the address's domain is not a valid internationalised domain name") \
            from None
    return f"{local}@{ace}"


def needs_smtputf8(addr: str) -> bool:
    """Whether `addr` can only be sent with SMTPUTF8 (RFC 6531): a non-ASCII local part."""
    return not addr.rpartition("@")[0].isascii()


def _on_the_wire(command: Mapping[str, Any]) -> Mapping[str, Any]:
    """The command with every address's domain in A-labels (the same object when none changes)."""
    changed: dict[str, Any] = {}
    for field in ("from", "recipient", "reply_to"):
        address = command.get(field)
        if address and address.get("email"):
            wire = smtp_address(address["email"])
            if wire != address["email"]:
                changed[field] = {**address, "email": wire}
    return {**command, **changed} if changed else command


def mailbox(address: Mapping[str, Any], field: str) -> Address:
    """A header mailbox from a contract address `{email, name?}`."""
    name = address.get("name") or ""
    addr = address["email"]
    try:
        return Address(display_name=name, addr_spec=addr)
    except NonASCIILocalPartDefect:
        # An internationalized mailbox (RFC 6531): valid, needs SMTPUTF8 to be sent.
        local, _, domain = addr.rpartition("@")
        return Address(display_name=name, username=local, domain=domain)
    except (ValueError, HeaderParseError, IndexError):
        raise MessageError(f"{field} address cannot be put in a header") from None


def build_message(
    command: Mapping[str, Any], rendered: Rendered, settings: Settings
) -> RawMessage | EmailMessage:
    """The email of one `send.email` command with its rendered parts."""
    date = format_datetime(datetime.now(UTC))
    message_id = message_id_header(command["send_id"], settings.message_id_domain)
    command = _on_the_wire(command)
    raw = raw_message(command, rendered, date, message_id)
    return raw if raw is not None else email_message(command, rendered, date, message_id)


def email_message(
    command: Mapping[str, Any], rendered: Rendered, date: str, message_id: str
) -> EmailMessage:
    """The message built with the email package (any address it can represent)."""
    msg = EmailMessage(policy=email.policy.SMTP)
    msg["From"] = mailbox(command["from"], "from")
    msg["To"] = mailbox(command["recipient"], "recipient")
    reply_to = command.get("reply_to")
    if reply_to:
        msg["Reply-To"] = mailbox(reply_to, "reply_to")
    msg["Subject"] = rendered.subject
    msg["Date"] = date
    msg["Message-ID"] = message_id
    if rendered.unsubscribe_url:
        msg["List-Unsubscribe"] = f"<{rendered.unsubscribe_url}>"
        msg["List-Unsubscribe-Post"] = UNSUBSCRIBE_POST
    if rendered.text is not None:
        msg.set_content(rendered.text, subtype="plain", charset="utf-8", cte=_CTE)
        if rendered.html is not None:
            msg.add_alternative(rendered.html, subtype="html", charset="utf-8", cte=_CTE)
            for part in msg.iter_parts():
                del part["MIME-Version"]  # only the top level carries it
    elif rendered.html is not None:
        msg.set_content(rendered.html, subtype="html", charset="utf-8", cte=_CTE)
    else:
        msg.set_content("", subtype="plain", charset="utf-8", cte=_CTE)
    return msg
