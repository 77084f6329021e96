"""Renders one send command's template in a Jinja2 sandbox.

Contract: `render_command(command)` returns the subject, text body, HTML body
and unsubscribe URL of a `send.email` command, rendered with the campaign
`variables` overlaid by the recipient's `variables`, plus `email`, `name`,
`send_id` and `campaign_id`. HTML is autoescaped; subject, text and URL are
not. Missing variables (and null values) render empty. The subject is one line
(CR/LF become a space). Any template problem — a syntax error, an access the
sandbox forbids, a runtime error, an oversized output — raises
`TemplateError(reason)`. Compiled templates are cached by source (LRU), so the
recipients of one campaign compile each template once per process.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

import jinja2
from jinja2.exceptions import SecurityError
from jinja2.runtime import ChainableUndefined, Context
from jinja2.sandbox import SandboxedEnvironment

#: Most characters one rendered part (subject, text, HTML or URL) may have.
MAX_RENDERED_CHARS = 2_000_000
#: Largest exponent the `**` operator accepts inside a template.
MAX_EXPONENT = 100
#: Largest integer (in bits) the `**` operator may produce.
MAX_POWER_BITS = 4096
#: Templates kept compiled (a campaign uses up to four: subject, text, HTML, URL).
CACHE_SIZE = 128

_NEWLINES = re.compile(r"\s*[\r\n]+\s*")
_BAD_URL_CHARS = re.compile(r"[\s<>\"]")


class TemplateError(Exception):
    """A template that cannot be rendered; `reason` says why (no variable values)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Rendered:
    """The rendered parts of one email."""

    subject: str
    text: str | None
    html: str | None
    unsubscribe_url: str | None


class _Sandbox(SandboxedEnvironment):
    """Sandbox that raises on unsafe access and bounds `*` and `**`."""

    intercepted_binops = frozenset({"*", "**"})

    def unsafe_undefined(self, obj: Any, attribute: str) -> NoReturn:
        raise SecurityError(
            f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe"
        )

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and isinstance(right, int | float):
            if abs(right) > MAX_EXPONENT:
                raise SecurityError(f"exponent {right} is larger than {MAX_EXPONENT}")
            if isinstance(left, int) and left.bit_length() * abs(right) > MAX_POWER_BITS:
                raise SecurityError("power result is too large")
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if (
                    isinstance(seq, str | list | tuple)
                    and isinstance(times, int)
                    and len(seq) * times > MAX_RENDERED_CHARS
                ):
                    raise SecurityError("repetition result is too large")
        return super().call_binop(context, operator, left, right)


def _finalize(value: Any) -> Any:
    return "" if value is None else value


def _environment(autoescape: bool) -> _Sandbox:
    return _Sandbox(
        autoescape=autoescape,
        undefined=ChainableUndefined,
        finalize=_finalize,
        keep_trailing_newline=True,
        auto_reload=False,
    )


_TEXT_ENV = _environment(autoescape=False)
_HTML_ENV = _environment(autoescape=True)


@functools.lru_cache(maxsize=CACHE_SIZE)
def _compile(source: str, html: bool) -> jinja2.Template | str:
    """The compiled template, or the reason it does not compile (cached either way)."""
    env = _HTML_ENV if html else _TEXT_ENV
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        return f"syntax error on line {exc.lineno}: {exc.message}"
    except jinja2.TemplateError as exc:
        return f"template error: {exc.message or type(exc).__name__}"


def template_cache_info() -> Any:
    """Hits, misses and size of the compiled-template cache."""
    return _compile.cache_info()


def clear_template_cache() -> None:
    """Forget every compiled template (tests)."""
    _compile.cache_clear()


def render_string(source: str, variables: Mapping[str, Any], *, html: bool = False) -> str:
    """Render one template source; `html` turns autoescaping on."""
    compiled = _compile(source, html)
    if isinstance(compiled, str):
        raise TemplateError(compiled)
    try:
        out = compiled.render(variables)
    except SecurityError as exc:
        raise TemplateError(f"forbidden by the sandbox: {exc.message}") from None
    except jinja2.UndefinedError as exc:
        raise TemplateError(f"undefined value: {exc.message}") from None
    except jinja2.TemplateError as exc:
        raise TemplateError(f"template error: {exc.message or type(exc).__name__}") from None
    except Exception as exc:  # a runtime error caused by the template (1/0, bad filter arg)
        raise TemplateError(f"template raised {type(exc).__name__}") from None
    if len(out) > MAX_RENDERED_CHARS:
        raise TemplateError(f"rendered part is longer than {MAX_RENDERED_CHARS} characters")
    return out


def template_variables(command: Mapping[str, Any]) -> dict[str, Any]:
    """Campaign variables, overlaid by the recipient's, plus the built-in names.

    `email`, `send_id` and `campaign_id` always come from the command; `name` is
    the recipient's display name when it has one, else a `name` variable, else empty.
    """
    recipient: Mapping[str, Any] = command["recipient"]
    variables: dict[str, Any] = dict(command.get("variables") or {})
    variables.update(recipient.get("variables") or {})
    name = recipient.get("name")
    if name is None:
        name = variables.get("name")
    variables.update(
        email=recipient["email"],
        name="" if name is None else name,
        send_id=command["send_id"],
        campaign_id=command["campaign_id"],
    )
    return variables


def one_line(value: str) -> str:
    """`value` with every line break (and the blanks around it) turned into one space."""
    return _NEWLINES.sub(" ", value).strip()


def render_command(command: Mapping[str, Any]) -> Rendered:
    """Render the subject, bodies and unsubscribe URL of one `send.email` command."""
    template: Mapping[str, Any] = command["template"]
    variables = template_variables(command)
    subject = one_line(_part("subject", template["subject"], variables, html=False))
    text = template.get("text")
    html = template.get("html")
    unsubscribe = command.get("unsubscribe_url")
    url: str | None = None
    if unsubscribe is not None:
        url = one_line(_part("unsubscribe_url", unsubscribe, variables, html=False))
        if not url or _BAD_URL_CHARS.search(url):
            raise TemplateError("unsubscribe_url: renders to an empty or invalid URL")
    return Rendered(
        subject=subject,
        text=None if text is None else _part("text", text, variables, html=False),
        html=None if html is None else _part("html", html, variables, html=True),
        unsubscribe_url=url,
    )


def _part(label: str, source: str, variables: Mapping[str, Any], *, html: bool) -> str:
    try:
        return render_string(source, variables, html=html)
    except TemplateError as exc:
        raise TemplateError(f"{label}: {exc.reason}") from None
