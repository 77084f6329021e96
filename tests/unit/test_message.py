"""Building the RFC 5322 message of a send command."""

from __future__ import annotations

import email
import email.policy
from dataclasses import replace
from typing import Any

import pytest

from services.pipeline import ids
from services.pipeline.settings import Settings
from services.sender.message import MessageError, build_message, mailbox
from services.sender.render import render_command
from tests.support.campaigns import send_email

SETTINGS = replace(Settings(), message_id_domain="mail.shop.example.com")


def command(**overrides: Any) -> dict[str, Any]:
    """A valid `send.email` command."""
    recipient = overrides.pop("recipient", {"email": "ann@example.com", "name": "Ann Example"})
    return send_email(
        recipient,
        **{
            "template": {"subject": "Hi {{ name }}", "text": "Text {{ name }}",
                         "html": "<p>{{ name }}</p>"},
            "variables": {},
            "from": {"email": "news@shop.example.com", "name": "Shop News"},
            **overrides,
        },
    )


def build(cmd: dict[str, Any]) -> email.message.EmailMessage:
    msg = build_message(cmd, render_command(cmd), SETTINGS)
    # what the server will see: parse the serialized bytes back
    parsed = email.message_from_bytes(msg.as_bytes(), policy=email.policy.default)
    assert isinstance(parsed, email.message.EmailMessage)
    return parsed


def test_headers() -> None:
    cmd = command(reply_to={"email": "help@shop.example.com", "name": "Help"})
    msg = build(cmd)
    assert msg["From"] == "Shop News <news@shop.example.com>"
    assert msg["To"] == "Ann Example <ann@example.com>"
    assert msg["Reply-To"] == "Help <help@shop.example.com>"
    assert msg["Subject"] == "Hi Ann Example"
    assert msg["Date"]
    assert msg["Message-ID"] == f"<{cmd['send_id']}@mail.shop.example.com>"
    assert msg["List-Unsubscribe"] is None
    assert msg["List-Unsubscribe-Post"] is None
    assert msg["Reply-To"] is not None


def test_no_reply_to_when_absent() -> None:
    assert build(command())["Reply-To"] is None


def test_message_id_is_deterministic() -> None:
    cmd = command()
    first = build(cmd)["Message-ID"]
    second = build(command(attempt=2))["Message-ID"]
    assert first == second == ids.message_id_header(cmd["send_id"], "mail.shop.example.com")


def test_list_unsubscribe_headers() -> None:
    cmd = command(unsubscribe_url="https://shop.example.com/unsub?s={{ send_id }}")
    msg = build(cmd)
    # a long value may be folded onto its own line; unfolded it is the bracketed URL
    url = f"https://shop.example.com/unsub?s={cmd['send_id']}"
    assert msg["List-Unsubscribe"].strip() == f"<{url}>"
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"


def test_multipart_alternative_text_then_html() -> None:
    msg = build(command())
    assert msg.get_content_type() == "multipart/alternative"
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "text/html"]
    assert parts[0].get_content().strip() == "Text Ann Example"
    assert parts[1].get_content().strip() == "<p>Ann Example</p>"


def test_single_part_bodies() -> None:
    text_only = build(command(template={"subject": "s", "text": "only text"}))
    assert text_only.get_content_type() == "text/plain"
    html_only = build(command(template={"subject": "s", "html": "<i>only</i>"}))
    assert html_only.get_content_type() == "text/html"


def test_subject_newline_cannot_inject_headers() -> None:
    cmd = command(
        variables={"x": "boom\r\nBcc: victim@example.com"},
        template={"subject": "Hi {{ x }}", "text": "t"},
    )
    msg = build(cmd)
    assert msg["Bcc"] is None
    assert msg["Subject"] == "Hi boom Bcc: victim@example.com"


def test_non_ascii_names_are_encoded() -> None:
    cmd = command(recipient={"email": "ann@example.com", "name": "Änne Ümlaut"})
    raw = build_message(cmd, render_command(cmd), SETTINGS).as_bytes()
    assert raw.isascii()
    assert build(cmd)["To"] == "Änne Ümlaut <ann@example.com>"


def test_unusable_address_is_message_error() -> None:
    with pytest.raises(MessageError):
        mailbox({"email": "a..b@example.com"}, "recipient")
