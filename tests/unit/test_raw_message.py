"""The fast message builder says what the email package says (services/sender/raw_message.py)."""

from __future__ import annotations

import re
from email import message_from_bytes, policy
from email.message import EmailMessage
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from services.sender.message import build_message, email_message
from services.sender.raw_message import RawMessage, raw_message
from services.sender.render import Rendered
from tests.support.campaigns import send_email

DATE = "Sat, 28 Nov 2026 07:00:00 +0000"
MESSAGE_ID = "<5b6f3c1e-0000-4000-8000-000000000001@mail.example.com>"
_BOUNDARY = re.compile(rb"={15}\d{19}==")


def command(name: str = "Ann", email: str = "ann@example.com", **fields: Any) -> dict[str, Any]:
    if not name:  # the contract wants no empty name: leave it out
        return {"from": {"email": "news@shop.example.com"}, "recipient": {"email": email},
                "send_id": "5b6f3c1e-0000-4000-8000-000000000001", **fields}
    return send_email({"email": email, "name": name},
                      **{"from": {"email": "news@shop.example.com", "name": "Shop"}, **fields})


def both(cmd: dict[str, Any], rendered: Rendered) -> tuple[bytes, bytes]:
    raw = raw_message(cmd, rendered, DATE, MESSAGE_ID)
    assert isinstance(raw, RawMessage)
    reference = email_message(cmd, rendered, DATE, MESSAGE_ID).as_bytes()
    return raw.data, reference


def parsed(data: bytes) -> EmailMessage:
    msg = message_from_bytes(data, policy=policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def contents(msg: EmailMessage) -> list[tuple[str, str]]:
    parts = list(msg.iter_parts()) if msg.is_multipart() else [msg]
    return [(p.get_content_type(), p.get_content()) for p in parts]  # type: ignore[attr-defined]


def test_a_plain_message_is_byte_for_byte_the_email_package_s() -> None:
    cmd = command(reply_to={"email": "help@shop.example.com", "name": "Help Desk"})
    for rendered in (
        Rendered("Hello Ann, your order", "Hi Ann,\n\nthanks.\n", "<p>Hi <b>Ann</b></p>",
                 "https://shop.example.com/u?id=1&t=2"),
        Rendered("Only text", "a line\r\nanother = sign\n" + "long " * 40, None, None),
        Rendered("Only html", None, "<p>" + "x" * 200 + "</p>", None),
        Rendered("Empty", None, None, None),
        Rendered("Привет, Анна", "Привет!\n", None, None),  # the body is the same either way
    ):
        raw, reference = both(cmd, rendered)
        if rendered.subject.isascii():
            assert _BOUNDARY.sub(b"B", raw) == _BOUNDARY.sub(b"B", reference)
        else:
            assert raw.split(b"\r\nDate:")[1] == reference.split(b"\r\nDate:")[1]


def test_names_with_specials_are_quoted_like_the_email_package() -> None:
    raw, reference = both(command(name='Ann "Q" O\'Neil, Jr.'), Rendered("S", "t", None, None))
    assert raw == reference


text_strategy = st.text(st.characters(blacklist_categories=("Cs",)), max_size=200)


@settings(max_examples=300, deadline=None)
@given(name=text_strategy, subject=text_strategy, text=st.none() | text_strategy,
       html=st.none() | text_strategy)
def test_any_text_reads_back_as_the_email_package_s(
    name: str, subject: str, text: str | None, html: str | None
) -> None:
    """Whatever the name, subject and bodies, a reader sees them as they were rendered, and
    the same addresses and contents as the email package's message gives."""
    name = "".join(c for c in name if c.isprintable())  # the ingress refuses control characters
    subject = "".join(c for c in subject if c.isprintable())
    cmd, rendered = command(name=name), Rendered(subject, text, html, None)
    built = raw_message(cmd, rendered, DATE, MESSAGE_ID)
    if built is None:  # only a long non-ASCII name needs the email package
        assert len(name.encode("utf-8")) > 40 and not name.isascii()
        return
    raw, reference = built.data, email_message(cmd, rendered, DATE, MESSAGE_ID).as_bytes()
    ours, theirs = parsed(raw), parsed(reference)
    assert str(ours["Subject"]) == subject
    # a reader collapses a phrase's runs of spaces (the email package's message reads so too)
    assert ours["To"].addresses[0].display_name == " ".join(p for p in name.split(" ") if p)
    for header in ("From", "Date", "Message-ID"):
        assert str(ours[header]) == str(theirs[header]), header
    assert ours["To"].addresses[0].addr_spec == theirs["To"].addresses[0].addr_spec
    assert contents(ours) == contents(theirs)
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))
    assert b"\n" not in raw.replace(b"\r\n", b"")  # no bare line break anywhere
    assert raw.isascii()


def test_long_plain_headers_are_folded_at_spaces() -> None:
    subject = " ".join(f"word{i}" for i in range(40))
    raw, _ = both(command(), Rendered(subject, "t", None, None))
    lines = raw.split(b"\r\n")
    start = next(i for i, line in enumerate(lines) if line.startswith(b"Subject:"))
    folded = [lines[start]] + [line for line in lines[start + 1:start + 5] if line.startswith(b" ")]
    assert len(folded) > 1 and all(len(line) <= 78 for line in folded)
    assert str(parsed(raw)["Subject"]) == subject


def test_an_address_only_smtputf8_carries_goes_to_the_email_package() -> None:
    cmd = command(email="анна@пример.рф")
    rendered = Rendered("S", "t", None, None)
    assert raw_message(cmd, rendered, DATE, MESSAGE_ID) is None
    assert isinstance(build_message(cmd, rendered, _settings()), EmailMessage)


def test_an_unsafe_unsubscribe_url_goes_to_the_email_package() -> None:
    rendered = Rendered("S", "t", None, "https://x.example.com/a b")
    assert raw_message(command(), rendered, DATE, MESSAGE_ID) is None


def test_plain_commands_take_the_fast_path() -> None:
    built = build_message(command(), Rendered("S", "t", "<p>h</p>", None), _settings())
    assert isinstance(built, RawMessage)
    assert parsed(built.as_bytes())["Message-ID"].startswith("<")


def _settings() -> Any:
    from services.pipeline.settings import Settings

    return Settings()
