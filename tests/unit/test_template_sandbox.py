"""The template sandbox (R1): no file, import or attribute escape, and no template can
hang the sender or exhaust its memory; whatever a template does, rendering returns a
string or raises TemplateError."""

from __future__ import annotations

import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.sender import render
from services.sender.render import TemplateError, clear_template_cache, render_command, render_string
from tests.support.campaigns import send_email

VARIABLES = {"name": "Ann", "code": "X1", "items": "abc", "n": 3}

ESCAPES = [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{% include '/etc/passwd' %}",
    "{% import 'os' as os %}{{ os.system('id') }}",
    "{% from 'os' import system %}",
    "{% extends '/etc/passwd' %}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ joiner.__init__.__globals__.os }}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ self._TemplateReference__context }}",
    "{{ self.__dict__ }}",
    "{{ lipsum.__globals__ }}",
    "{{ lipsum.__globals__['os'].popen('id').read() }}",
    "{{ range.__self__.__import__('os') }}",
    "{{ [].append.__self__.__class__ }}",
    "{{ ''|attr('__class__') }}",
    "{{ ''['__class__'] }}",
    "{{ '{0.__class__.__mro__}'.format('') }}",
    "{{ '{0.__class__}'.format_map({'x': 1}) }}",
    "{{ name.__init__.__globals__ }}",
    "{{ ().__class__.__base__.__subclasses__() }}",
    "{{ dict.__init__ }}",
    "{{ config.__class__.__init__.__globals__ }}",
    "{{ loop.__class__ }}",
    "{{ (1).__class__.__bases__ }}",
]

#: Templates that would hang the sender or take its memory without the budget.
EXHAUSTION = [
    "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{% set s = 'a' * 100000 %}{% for i in s %}{% for j in s %}{% endfor %}{% endfor %}",
    "{{ range(10**9) | list | length }}",
    "{% for i in range(10**7) %}{% endfor %}",
    "{{ 'a' * 10**9 }}",
    "{{ 'a' * 10**6 * 1000 }}",
    "{{ ['a' * 100000] * 1000 }}",
    "{{ (['a' * 100000] * 1000) | join }}",
    "{{ 'a'.encode() * 10**9 }}",
    "{% set x = 'a' * 1000000 %}{{ x ~ x ~ x }}",
    "{% set x = 'a' * 1000000 %}{% set y = x ~ x %}{% set z = y ~ y %}{{ z | length }}",
    "{% set l = ['a' * 1000000] %}{{ (l + l + l) | join | length }}",
    "{{ 2 ** 1000000 }}",
    "{{ 9999999999999999999 ** 100 }}",
    "{% set a = 2 ** 90 %}{% set b = a * a * a * a * a * a * a * a * a * a %}{{ b * b * b * b * b }}",
    "{{ (10 ** 100).to_bytes(10 ** 9, 'big') }}",
    "{{ 'x' | center(10 ** 9) }}",
    "{{ 'x'.center(10 ** 9) }}",
    "{{ 'x'.ljust(10 ** 9) }}",
    "{{ 'x'.zfill(10 ** 9) }}",
    "{{ ('\\t' * 1000000).expandtabs(1000) }}",
    "{{ 'x' | indent(10 ** 9) }}",
    "{{ ('a ' * 1000000) | wordwrap(1) }}",
    "{{ ('a' * 1000000) | replace('a', 'bbbbbbbbbb') }}",
    "{{ ('a' * 1000000).replace('a', 'b' * 1000) }}",
    "{{ ('a' * 1000000).translate({97: 'b' * 1000}) }}",
    "{{ '{0:>1000000000}'.format('x') }}",
    "{{ ('{0}' * 100000).format('a' * 100000) }}",
    "{{ '%1000000000s' % 'x' }}",
    "{{ '%.1000000000f' % 1.0 }}",
    "{{ '%*s' % (1000000000, 'x') }}",
    "{{ '%1000000000s' | format('x') }}",
    "{{ 'abc' | slice(10 ** 9) | list }}",
    "{{ [1] | batch(10 ** 9, 'x') | list }}",
    "{{ lipsum(10 ** 6) }}",
    "{{ lipsum(5, min=10 ** 7, max=10 ** 7) }}",
    "{% macro r(n) %}{{ r(n + 1) }}{% endmacro %}{{ r(0) }}",
    "{% macro r(n) %}{{ r(n) }}{{ r(n) }}{% endmacro %}{{ r(0) }}",
    "{% for x in range(1000) recursive %}{{ loop(range(1000)) }}{% endfor %}",
    "{% for i in range(100000) %}{% set x = ('a' * 1000000) | replace('a', 'b') %}{% endfor %}",
    "{% set l = [] %}{% for i in range(100000) %}{{ l.append('x' * 1999999) }}{% endfor %}",
    "{% set l = [] %}{% for i in range(100000) %}{{ l.append(range(10000) | list) }}{% endfor %}",
    "{{ ('x' * 1999999) ~ 'xx' }}",
    "{% for i in range(3) %}{{ 'x' * 1000000 }}{% endfor %}",
    "{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}",
    "{% if 1 %}" * 300 + "x" + "{% endif %}" * 300,
]

SANE = [
    ("Hello {{ name }}!", "Hello Ann!"),
    ("{% for c in items %}[{{ c }}]{% endfor %}", "[a][b][c]"),
    ("{% for i in range(n) %}{{ loop.index }}{% endfor %}", "123"),
    ("{{ items | upper | center(7) }}", "  ABC  "),
    ("{{ 'a,b' | replace(',', ' and ') }}", "a and b"),
    ("{{ ['x', 'y'] | join(', ') }}", "x, y"),
    ("{{ '%s-%05d' | format(code, 42) }}", "X1-00042"),
    ("{{ '%s=%s' % (name, code) }}", "Ann=X1"),
    ("{{ '{0}:{1:>4}'.format(name, n) }}", "Ann:   3"),
    ("{{ name ~ '/' ~ code }}", "Ann/X1"),
    ("{{ (name + code) | length }}", "5"),
    ("{{ 2 ** 10 }} {{ 6 * 7 }}", "1024 42"),
    ("{{ [1, 2, 3] | sum }} {{ [3, 1, 2] | sort | first }}", "6 1"),
    ("{{ 'line one\nline two' | indent(2) }}", "line one\n  line two"),
    ("{{ range(7) | batch(3) | list | length }} {{ range(7) | slice(3) | list | length }}", "3 3"),
    ("{{ {'a': 1} | tojson }}", '{"a": 1}'),
    ("{{ lipsum(2, false) | length > 0 }}", "True"),
    ("{{ request.application.__globals__ }}", ""),  # undefined all the way: renders empty
]


@pytest.fixture(autouse=True)
def fresh_cache() -> None:
    clear_template_cache()


@pytest.mark.parametrize("source", ESCAPES)
def test_escapes_are_refused(source: str) -> None:
    with pytest.raises(TemplateError) as err:
        render_string(source, VARIABLES)
    assert err.value.reason


@pytest.mark.parametrize("source", EXHAUSTION)
def test_exhaustion_is_refused_quickly(source: str) -> None:
    started = time.monotonic()
    with pytest.raises(TemplateError) as err:
        render_string(source, VARIABLES)
    elapsed = time.monotonic() - started
    assert err.value.reason
    # the budget is MAX_RENDER_SECONDS; one bounded operation may run past it
    assert elapsed < render.MAX_RENDER_SECONDS + 4, f"{elapsed:.1f}s: {err.value.reason}"


@pytest.mark.parametrize(("source", "expected"), SANE)
def test_ordinary_templates_still_render(source: str, expected: str) -> None:
    assert render_string(source, VARIABLES) == expected


def test_a_template_that_ran_out_of_loops_fails_fast_afterwards() -> None:
    source = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    with pytest.raises(TemplateError, match="iterations"):
        render_string(source, VARIABLES)
    started = time.monotonic()
    for _ in range(100):
        with pytest.raises(TemplateError, match="iterations"):
            render_string(source, VARIABLES)
    assert time.monotonic() - started < 0.5


def test_the_loop_budget_is_per_part_not_per_process() -> None:
    source = "{% for i in range(100000) %}{% endfor %}ok"
    for _ in range(5):  # 500,000 iterations in all: each render has its own budget
        assert render_string(source, VARIABLES) == "ok"


def test_time_budget_stops_slow_work(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(render, "MAX_RENDER_SECONDS", 0.2)
    started = time.monotonic()
    with pytest.raises(TemplateError, match=r"longer than 0\.2 s"):
        render_string("{% for i in range(100000) %}{{ (name * 1000) | upper | length }}{% endfor %}",
                      VARIABLES)
    assert time.monotonic() - started < 2


def test_loop_variable_names_cannot_shadow_the_budget() -> None:
    source = "{% set budgeted_iter = none %}{% for i in range(100000) %}{% for j in range(10) %}" \
             "{% endfor %}{% endfor %}"
    with pytest.raises(TemplateError, match="iterations"):
        render_string(source, {"budgeted_iter": None, "environment": None})


def test_subject_and_url_take_every_kind_of_line_break_out() -> None:
    for breaker in ("\r\n", "\u2028", "\u2029", "\x85", "\x0b", "\x0c", "\x1c", "\x01"):
        command = send_email(
            {"email": "ann@example.com", "variables": {"v": f"a{breaker}Bcc: evil@example.org"}},
            template={"subject": "x {{ v }} y", "text": "t"},
        )
        assert render_command(command).subject == "x a Bcc: evil@example.org y"


def test_an_unsubscribe_url_with_a_control_character_is_refused() -> None:
    command = send_email(
        {"email": "ann@example.com", "variables": {"v": "a\x01b"}},
        template={"subject": "s", "text": "t"}, unsubscribe_url="https://x.example.com/{{ v }}",
    )
    with pytest.raises(TemplateError, match="unsubscribe_url"):
        render_command(command)


FRAGMENTS = [
    "{{", "}}", "{%", "%}", "{#", "#}", " for x in ", " endfor ", " if ", " endif ", " set y = ",
    "range(", "10**", "9", ")", "(", "'a'", "*", "~", "+", "%", "|", "center(", "join", "list",
    "replace(", ",", "x", "y", "name", ".", "__class__", "format(", "loop", "lipsum(", "[", "]",
    "macro m()", "endmacro", "m()", "'{0:>99999999}'", "\n",
]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(source=st.lists(st.sampled_from(FRAGMENTS), max_size=30).map("".join) | st.text(max_size=80))
def test_any_template_renders_or_raises_template_error(source: str) -> None:
    started = time.monotonic()
    try:
        out: Any = render_string(source, VARIABLES)
    except TemplateError as exc:
        assert exc.reason
    else:
        assert isinstance(out, str)
        assert len(out) <= render.MAX_RENDERED_CHARS
    assert time.monotonic() - started < render.MAX_RENDER_SECONDS + 4
