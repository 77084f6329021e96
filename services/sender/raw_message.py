"""The fast path of message building: the bytes of a message whose addresses are plain ASCII.

Contract: `raw_message(command, rendered, date, message_id)` returns a
`RawMessage` (the message as sent: CRLF line ends, 7-bit) or None when an
address is not a plain ASCII addr-spec, the unsubscribe URL is not plain
printable ASCII, a header would be longer than 998 characters, or the text
cannot be encoded as UTF-8; the caller then uses the email package
(services/sender/message.py), which says what is wrong. The layout is the
email package's (policy SMTP): the same header order, and bodies encoded
exactly as its content manager does (quoted-printable UTF-8). Header text that
is printable ASCII, without `=?` and without leading, trailing or doubled
spaces, is written as is and folded at spaces to 78 columns; any other text
becomes RFC 2047 base64 words, so a header never carries a line break or a
byte the text did not mean (a display name needing more than one word goes to
the email package: readers put a space between the words of a phrase; its
runs of spaces, which readers collapse, are written as one, and its leading
and trailing spaces dropped). A
message is built in 7–12 µs where the email package takes 1.1–1.3 ms
(`python -m benchmarks.message_build`).
"""

from __future__ import annotations

import base64
import random
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from email import quoprimime
from typing import Any

from services.sender.render import Rendered

UNSUBSCRIBE_POST = "List-Unsubscribe=One-Click"
MAX_LINE = 78  # where headers are folded (RFC 5322 "SHOULD")
MAX_HEADER_LINE = 998  # no line may be longer (RFC 5322 "MUST")
#: UTF-8 bytes per encoded word: 40 bytes → 56 base64 characters → a 68-character word.
WORD_BYTES = 40

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_ADDR_SPEC = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*@{_LABEL}(?:\.{_LABEL})*")
_ATOM_PHRASE = re.compile(rf"{_ATEXT}+(?: {_ATEXT}+)*")
#: Printable ASCII with single spaces between non-space runs, no leading or trailing space.
_PLAIN_TEXT = re.compile(r"[!-~]+(?: [!-~]+)*")
_URL = re.compile(r"[!-;=?-~]+")  # printable ASCII without space, '<' and '>'


@dataclass(frozen=True)
class RawMessage:
    """A message ready for SMTP DATA."""

    data: bytes

    def as_bytes(self) -> bytes:
        """The message as sent."""
        return self.data


def raw_message(
    command: Mapping[str, Any], rendered: Rendered, date: str, message_id: str
) -> RawMessage | None:
    """The message's bytes, or None when the email package must build it (see the contract)."""
    try:
        headers = _headers(command, rendered, date, message_id)
        body = _body(rendered)
    except _NotPlain:
        return None
    return RawMessage((headers + body).encode("ascii"))


class _NotPlain(Exception):
    """The message needs the email package."""


def _headers(command: Mapping[str, Any], rendered: Rendered, date: str, message_id: str) -> str:
    lines = [
        _header("From", _mailbox(command["from"])),
        _header("To", _mailbox(command["recipient"])),
    ]
    reply_to = command.get("reply_to")
    if reply_to:
        lines.append(_header("Reply-To", _mailbox(reply_to)))
    lines += [_header("Subject", _unstructured(rendered.subject)),
              f"Date: {date}\r\n", f"Message-ID: {message_id}\r\n"]
    if rendered.unsubscribe_url:
        if not _URL.fullmatch(rendered.unsubscribe_url):
            raise _NotPlain
        lines += [_header("List-Unsubscribe", f"<{rendered.unsubscribe_url}>"),
                  f"List-Unsubscribe-Post: {UNSUBSCRIBE_POST}\r\n"]
    return "".join(lines)


def _body(rendered: Rendered) -> str:
    if rendered.text is not None and rendered.html is not None:
        boundary = f"==============={random.randrange(sys.maxsize):019d}=="  # as the email package
        return (
            "MIME-Version: 1.0\r\n"
            f'Content-Type: multipart/alternative;\r\n boundary="{boundary}"\r\n\r\n'
            f"--{boundary}\r\n{_part('plain', rendered.text)}"
            f"\r\n--{boundary}\r\n{_part('html', rendered.html)}"
            f"\r\n--{boundary}--\r\n"
        )
    if rendered.text is not None:
        return _single("plain", rendered.text)
    if rendered.html is not None:
        return _single("html", rendered.html)
    return _single("plain", "")


def _single(subtype: str, text: str) -> str:
    return (f'Content-Type: text/{subtype}; charset="utf-8"\r\n'
            "Content-Transfer-Encoding: quoted-printable\r\n"
            f"MIME-Version: 1.0\r\n\r\n{_quoted_printable(text)}")


def _part(subtype: str, text: str) -> str:
    return (f'Content-Type: text/{subtype}; charset="utf-8"\r\n'
            f"Content-Transfer-Encoding: quoted-printable\r\n\r\n{_quoted_printable(text)}")


def _quoted_printable(text: str) -> str:
    """The body as email.contentmanager encodes it (cte quoted-printable), CRLF line ends."""
    try:
        lines = text.encode("utf-8").splitlines()
    except UnicodeEncodeError:
        raise _NotPlain from None
    body = b"\n".join(lines) + b"\n"
    return quoprimime.body_encode(body.decode("latin-1"), MAX_LINE).replace("\n", "\r\n")


def _mailbox(address: Mapping[str, Any]) -> str:
    addr = address["email"]
    if len(addr) > 254 or not _ADDR_SPEC.fullmatch(addr):
        raise _NotPlain
    # readers collapse the spaces of a phrase: write the name as it will be read
    name = " ".join(part for part in (address.get("name") or "").split(" ") if part)
    if not name:
        return addr
    return f"{_phrase(name)} <{addr}>"


def _phrase(name: str) -> str:
    if "=?" not in name:
        if _ATOM_PHRASE.fullmatch(name):
            return name
        if _PLAIN_TEXT.fullmatch(name):
            return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
    words = _encoded_words(name)
    if "\r\n" in words:  # readers put a space between the words of a phrase
        raise _NotPlain
    return words


def _unstructured(text: str) -> str:
    if "=?" not in text and _PLAIN_TEXT.fullmatch(text):
        return text
    return _encoded_words(text) if text else ""


def _encoded_words(text: str) -> str:
    """`text` as RFC 2047 base64 UTF-8 words, one per folded line."""
    words: list[str] = []
    chunk: list[str] = []
    size = 0
    try:
        for char in text:
            n = len(char.encode("utf-8"))
            if size + n > WORD_BYTES:
                words.append("".join(chunk))
                chunk, size = [], 0
            chunk.append(char)
            size += n
    except UnicodeEncodeError:
        raise _NotPlain from None
    words.append("".join(chunk))
    return "\r\n ".join(
        f"=?utf-8?b?{base64.b64encode(word.encode('utf-8')).decode('ascii')}?=" for word in words
    )


def _header(name: str, value: str) -> str:
    """`Name: value` CRLF, folded at spaces where the line passes 78 columns."""
    line = f"{name}: {value}"
    if len(line) <= MAX_LINE or "\r\n" in value:
        return line + "\r\n"
    # fold points: a space that a non-space follows (never a line of spaces only)
    cuts = [i for i in range(len(name) + 2, len(line) - 1)
            if line[i] == " " and line[i + 1] != " "]
    out, start = [], 0
    while cuts and len(line) - start > MAX_LINE:
        fitting = [i for i in cuts if i - start <= MAX_LINE]
        cut = fitting[-1] if fitting else cuts[0]
        out.append(line[start:cut])
        start = cut
        cuts = [i for i in cuts if i > cut]
    out.append(line[start:])
    if any(len(part) > MAX_HEADER_LINE for part in out):
        raise _NotPlain
    return "\r\n".join(out) + "\r\n"
