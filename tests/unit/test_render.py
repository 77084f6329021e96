"""Sandboxed template rendering: variables, escaping, errors, caching."""

from __future__ import annotations

from typing import Any

import pytest

from services.sender.render import (
    TemplateError,
    clear_template_cache,
    render_command,
    render_string,
    template_cache_info,
    template_variables,
)
from tests.support.campaigns import send_email


def command(**overrides: Any) -> dict[str, Any]:
    """A valid `send.email` command."""
    email = overrides.pop("email", "ann@example.com")
    recipient = overrides.pop(
        "recipient", {"email": email, "name": "Ann", "variables": {"code": "ANN1"}})
    defaults: dict[str, Any] = {
        "template": {
            "subject": "Hello {{ name }}, code {{ code }}",
            "text": "Dear {{ name }}, {{ code }} / {{ greeting }}",
            "html": "<p>{{ name }} {{ code }}</p>",
        },
        "variables": {"code": "CAMPAIGN", "greeting": "hi"},
    }
    return send_email(recipient, **{**defaults, **overrides})


def test_recipient_variables_override_campaign_variables() -> None:
    out = render_command(command())
    assert out.subject == "Hello Ann, code ANN1"
    assert out.text == "Dear Ann, ANN1 / hi"
    assert out.html == "<p>Ann ANN1</p>"
    assert out.unsubscribe_url is None


def test_builtin_variables() -> None:
    cmd = command()
    variables = template_variables(cmd)
    assert variables["email"] == "ann@example.com"
    assert variables["name"] == "Ann"
    assert variables["send_id"] == cmd["send_id"]
    assert variables["campaign_id"] == "camp-1"


def test_builtins_cannot_be_spoofed_by_variables() -> None:
    cmd = command(variables={"email": "evil@example.com", "send_id": "x", "campaign_id": "y"})
    variables = template_variables(cmd)
    assert variables["email"] == "ann@example.com"
    assert variables["send_id"] == cmd["send_id"]
    assert variables["campaign_id"] == "camp-1"


def test_name_falls_back_to_variable_then_empty() -> None:
    cmd = command(recipient={"email": "bo@example.com", "variables": {"name": "Bo"}})
    assert template_variables(cmd)["name"] == "Bo"
    cmd = command(recipient={"email": "bo@example.com"})
    assert template_variables(cmd)["name"] == ""


def test_missing_and_null_variables_render_empty() -> None:
    assert render_string("[{{ nope }}][{{ nope.deeper['x'] }}][{{ n }}]", {"n": None}) == "[][][]"


def test_autoescape_in_html_only() -> None:
    cmd = command(
        recipient={"email": "ann@example.com", "name": "<Ann & Co>"},
        template={"subject": "{{ name }}", "text": "{{ name }}", "html": "<b>{{ name }}</b>"},
    )
    out = render_command(cmd)
    assert out.subject == "<Ann & Co>"
    assert out.text == "<Ann & Co>"
    assert out.html == "<b>&lt;Ann &amp; Co&gt;</b>"


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__ }}",
        "{{ name.__class__.__mro__[1].__subclasses__() }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ nope.__class__ }}",
        "{{ 'a' * 100000000 }}",
        "{{ 2 ** 1000000 }}",
        "{{ ((10 ** 100) ** 100) ** 100 }}",
    ],
)
def test_sandbox_blocks_unsafe_access(source: str) -> None:
    with pytest.raises(TemplateError) as info:
        render_string(source, {"name": "x"})
    assert "sandbox" in info.value.reason


def test_syntax_error_is_template_error() -> None:
    cmd = command(template={"subject": "ok", "text": "{% if %}"})
    with pytest.raises(TemplateError) as info:
        render_command(cmd)
    assert info.value.reason.startswith("text: syntax error on line 1")


def test_runtime_error_is_template_error() -> None:
    with pytest.raises(TemplateError, match="ZeroDivisionError"):
        render_string("{{ 1 / 0 }}", {})


def test_subject_is_one_line() -> None:
    cmd = command(
        variables={"v": "a\r\nBcc: evil@example.com\n\nb"},
        template={"subject": "x {{ v }} y", "text": "t"},
    )
    subject = render_command(cmd).subject
    assert "\r" not in subject and "\n" not in subject
    assert subject == "x a Bcc: evil@example.com b y"


def test_unsubscribe_url_is_rendered() -> None:
    cmd = command(unsubscribe_url="https://shop.example.com/u/{{ send_id }}?c={{ campaign_id }}")
    out = render_command(cmd)
    assert out.unsubscribe_url == f"https://shop.example.com/u/{cmd['send_id']}?c=camp-1"


def test_unsubscribe_url_that_renders_empty_is_an_error() -> None:
    with pytest.raises(TemplateError, match="unsubscribe_url"):
        render_command(command(unsubscribe_url="{{ missing }}"))


def test_templates_compile_once_per_source() -> None:
    clear_template_cache()
    for i in range(1000):
        email = f"user{i}@example.com"
        cmd = command(email=email, recipient={"email": email, "name": f"U{i}"})
        out = render_command(cmd)
        assert out.subject == f"Hello U{i}, code CAMPAIGN"
    info = template_cache_info()
    assert info.misses == 3  # subject, text, html
    assert info.hits == 2997


def test_bad_template_fails_fast_every_time() -> None:
    clear_template_cache()
    for _ in range(3):
        with pytest.raises(TemplateError):
            render_string("{{ }", {})
    assert template_cache_info().misses == 1
