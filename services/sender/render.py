"""Renders one send command's template in a Jinja2 sandbox.

Contract: `render_command(command)` returns the subject, text body, HTML body
and unsubscribe URL of a `send.email` command, rendered with the campaign
`variables` overlaid by the recipient's `variables`, plus `email`, `name`,
`send_id` and `campaign_id`. HTML is autoescaped; subject, text and URL are
not. Missing variables (and null values) render empty. The subject is one line
(every line break — CR, LF, U+2028, ... — and control character becomes a
space, so no variable can inject a header). Any template problem — a syntax error, an access the
sandbox forbids, a runtime error, an oversized output — raises
`TemplateError(reason)`. Compiled templates are cached by source (LRU), so the
recipients of one campaign compile each template once per process.

The sandbox bounds what one part may cost, not only what it may reach: no
file, import or attribute escape (Jinja2's SandboxedEnvironment, no loader),
and no template can hang or exhaust the sender. Every part renders within
`MAX_RENDER_SECONDS` of wall time, `MAX_LOOP_ITERATIONS` loop iterations (all
`{% for %}` loops together) and `MAX_RENDER_MEMORY` bytes of growth of the
process, checked at every loop iteration, attribute access, call, operator and
output chunk; and every single operation that could build a huge value in one
step (`*`, `+`, `~`, `%`, `str.format`, `center`, `replace`, `join`,
`to_bytes`, the `center`, `indent`, `wordwrap`, `replace`, `join`, `format`,
`batch`, `slice` filters, `lipsum`, printing a collection) is refused before
it runs when its result would pass `MAX_RENDERED_CHARS`. A template that ran
out of time or iterations fails fast for the next recipients (cached by
source).
"""

from __future__ import annotations

import contextvars
import functools
import itertools
import os
import re
import string
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

import jinja2
from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.exceptions import SecurityError
from jinja2.filters import FILTERS
from jinja2.runtime import ChainableUndefined, Context
from jinja2.sandbox import SandboxedEnvironment
from jinja2.utils import generate_lorem_ipsum

#: Most characters one rendered part (subject, text, HTML or URL) may have.
MAX_RENDERED_CHARS = 2_000_000
#: Largest exponent the `**` operator accepts inside a template.
MAX_EXPONENT = 100
#: Largest integer (in bits) the `**` operator may produce.
MAX_POWER_BITS = 4096
#: Templates kept compiled (a campaign uses up to four: subject, text, HTML, URL).
CACHE_SIZE = 128
#: Wall-clock seconds one part may take to render.
MAX_RENDER_SECONDS = 1.0
#: Loop iterations one part may run, all `{% for %}` loops together.
MAX_LOOP_ITERATIONS = 200_000
#: Growth of the process's resident memory one part may cause (bytes).
MAX_RENDER_MEMORY = 256 * 1024 * 1024
#: Largest group count of the `batch` and `slice` filters and of `lipsum`'s arguments.
MAX_GROUPS = 10_000
#: How often (in checks) the memory growth is measured.
_MEMORY_EVERY = 256
#: Output chunks read between two checks of the part's length and budget.
_CHUNKS_PER_CHECK = 32

#: Line breaks (every character `str.splitlines` breaks on) and other control
#: characters but TAB: none may stay in a one-line value such as the subject.
_NEWLINES = re.compile(r"\s*[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]+\s*")
_BAD_URL_CHARS = re.compile(r"[\s<>\"]")
_PERCENT_SPEC = re.compile(
    r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?([diouxXeEfFgGcrsa%])"
)
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


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


_STATM: dict[int, int] = {}  # pid -> open descriptor of /proc/<pid>/statm


def _resident_memory() -> int | None:
    """This process's resident memory in bytes (Linux), or None where it cannot be read."""
    pid = os.getpid()
    try:
        fd = _STATM.get(pid)
        if fd is None:
            fd = _STATM[pid] = os.open(f"/proc/{pid}/statm", os.O_RDONLY)
        return int(os.pread(fd, 128, 0).split()[1]) * _PAGE_SIZE
    except (OSError, ValueError, IndexError):
        return None


class _MemoryReading:
    """The last resident-memory reading and when it was taken."""

    at = float("-inf")
    value: int | None = None


_LAST_READING = _MemoryReading()
#: How old a resident-memory reading a part's budget may start from (s).
_MEMORY_READING_AGE = 0.05


def _recent_resident_memory() -> int | None:
    """`_resident_memory()`, read at most every 50 ms: every part's budget starts from it, and
    a read per part cost 3% of a sender's CPU. Growth is still measured by fresh reads."""
    now = time.monotonic()
    if now - _LAST_READING.at > _MEMORY_READING_AGE:
        _LAST_READING.value, _LAST_READING.at = _resident_memory(), now
    return _LAST_READING.value


class _LimitExceeded(SecurityError):
    """A part ran out of time, loop iterations or memory; `repeatable` when the same
    template would run out again whatever the process's state (time, iterations)."""

    def __init__(self, message: str, *, repeatable: bool = True) -> None:
        super().__init__(message)
        self.repeatable = repeatable


class _Budget:
    """What one part may still spend: time, loop iterations, memory growth."""

    __slots__ = ("checks", "deadline", "iterations", "memory_start")

    def __init__(self) -> None:
        self.deadline = time.monotonic() + MAX_RENDER_SECONDS
        self.iterations = 0
        self.checks = 0
        self.memory_start = _recent_resident_memory()

    def check(self) -> None:
        """Raise when the part ran out of time or memory."""
        self.checks += 1
        if time.monotonic() > self.deadline:
            raise _LimitExceeded(f"rendering took longer than {MAX_RENDER_SECONDS} s")
        if self.checks % _MEMORY_EVERY == 0 and self.memory_start is not None:
            now = _resident_memory()
            if now is not None and now - self.memory_start > MAX_RENDER_MEMORY:
                raise _LimitExceeded(
                    f"rendering used more than {MAX_RENDER_MEMORY // (1024 * 1024)} MiB",
                    repeatable=False,
                )

    def iterate(self) -> None:
        """Count one loop iteration."""
        self.iterations += 1
        if self.iterations > MAX_LOOP_ITERATIONS:
            raise _LimitExceeded(f"loops ran more than {MAX_LOOP_ITERATIONS} iterations")
        self.check()


class _Unlimited(_Budget):
    """The budget outside `render_string` (compiling, tests poking at the environment)."""

    def check(self) -> None:
        return None

    def iterate(self) -> None:
        return None


_UNLIMITED = _Unlimited()
_BUDGET: contextvars.ContextVar[_Budget] = contextvars.ContextVar("render_budget", default=_UNLIMITED)


def _check() -> None:
    _BUDGET.get().check()


def _size(value: Any, limit: int = MAX_RENDERED_CHARS) -> int:
    """About how many characters `str(value)` has; counting stops once past `limit`."""
    if isinstance(value, str | bytes | bytearray):
        return len(value)
    total = 0
    seen: set[int] = set()
    stack = [value]
    while stack and total <= limit:
        item = stack.pop()
        if isinstance(item, str | bytes | bytearray):
            total += len(item) + 4
        elif isinstance(item, list | tuple | set | frozenset | dict):
            if id(item) in seen:
                total += 5
                continue
            seen.add(id(item))
            total += 2 + 2 * len(item)
            if total > limit:
                break
            stack.extend(item)
            if isinstance(item, dict):
                stack.extend(item.values())
        elif isinstance(item, int) and not isinstance(item, bool):
            total += item.bit_length() // 3 + 2
        else:
            total += 24
    return total


def _within(size: int, what: str) -> None:
    """Refuse to build `what` when it would have more than MAX_RENDERED_CHARS characters."""
    if size > MAX_RENDERED_CHARS:
        raise SecurityError(f"{what} result is too large")


def _width(value: Any, what: str, limit: int = MAX_RENDERED_CHARS) -> None:
    if isinstance(value, int) and value > limit:
        raise SecurityError(f"{what} of {value} is larger than {limit}")


def _check_str_format(fmt: str, args: Iterable[Any]) -> None:
    """Refuse a `str.format` whose widths or output would be too large."""
    fields = 0
    for _, name, spec, _ in string.Formatter().parse(fmt):
        if name is None:
            continue
        fields += 1
        if spec and "{" in spec:
            raise SecurityError("nested replacement fields in a format spec are not allowed")
        for number in re.findall(r"\d+", spec or ""):
            _width(int(number), "format width")
    largest = max((_size(a) for a in args), default=0)
    _within(len(fmt) + fields * largest, "format")


def _check_percent_format(fmt: str, values: Any) -> None:
    """Refuse a `%` format whose widths or output would be too large."""
    specs = _PERCENT_SPEC.findall(fmt)
    for width, precision, _ in specs:
        if "*" in (width, precision):
            raise SecurityError("'*' widths are not allowed in a format")
        _width(int(width or 0), "format width")
        _width(int(precision or 0), "format precision")
    if isinstance(values, tuple):
        items: Iterable[Any] = values
    elif isinstance(values, dict):
        items = values.values()
    else:
        items = (values,)
    largest = max((_size(v) for v in items), default=0)
    _within(len(fmt) + len(specs) * largest, "format")


def _check_method_call(obj: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """Refuse a call of a str, bytes or int method that would build a huge value; return
    the arguments to call it with (an iterable given to `join` is read once, here)."""
    owner = getattr(obj, "__self__", None)
    name = getattr(obj, "__name__", "")
    if isinstance(owner, str | bytes | bytearray):
        if name in ("center", "ljust", "rjust", "zfill") and args:
            _width(args[0], name)
        elif name == "expandtabs":
            tabsize = args[0] if args else kwargs.get("tabsize", 8)
            if isinstance(tabsize, int):
                tab = "\t" if isinstance(owner, str) else b"\t"
                _within(len(owner) + owner.count(tab) * tabsize, "expandtabs")  # type: ignore[arg-type]
        elif name == "replace" and len(args) >= 2:
            old, new = args[0], args[1]
            count = args[2] if len(args) > 2 else kwargs.get("count", -1)
            found = owner.count(old) if len(old) else len(owner) + 1
            if isinstance(count, int) and count >= 0:
                found = min(found, count)
            _within(len(owner) + found * max(0, len(new) - len(old)), "replace")
        elif name == "join" and args:
            items = list(args[0])
            _within(sum(_size(i) for i in items) + len(owner) * len(items), "join")
            return (items, *args[1:])
        elif name == "translate" and args and isinstance(args[0], dict):
            longest = max((_size(v) for v in args[0].values()), default=1)
            _within(len(owner) * max(1, longest), "translate")
    elif isinstance(owner, int) and name == "to_bytes":
        _width(args[0] if args else kwargs.get("length", 1), "to_bytes length")
    return args


class _CodeGenerator(CodeGenerator):
    """Compiles `~` through `environment.checked_concat`, which refuses a huge result."""

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        if frame.eval_ctx.volatile:
            func_name = "(markup_join if context.eval_ctx.volatile else str_join)"
        elif frame.eval_ctx.autoescape:
            func_name = "markup_join"
        else:
            func_name = "str_join"
        self.write(f"environment.checked_concat({func_name}, (")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _Sandbox(SandboxedEnvironment):
    """Sandbox that raises on unsafe access and bounds the time, loops, memory and the
    size of every value a template builds."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})
    code_generator_class = _CodeGenerator

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.filters.update(_GUARDED_FILTERS)
        self.globals["lipsum"] = _lipsum

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        """The template's tree, every `{% for %}` iterating through `budgeted_iter`."""
        tree = super()._parse(source, name, filename)
        for loop in list(tree.find_all(nodes.For)):
            loop.iter = nodes.Call(
                nodes.EnvironmentAttribute("budgeted_iter", lineno=loop.lineno),
                [loop.iter], [], None, None, lineno=loop.lineno,
            )
        tree.set_environment(self)
        return tree

    def budgeted_iter(self, iterable: Iterable[Any]) -> Iterator[Any]:
        """`iterable`, counting each item against the part's loop budget."""
        budget = _BUDGET.get()
        for item in iterable:
            budget.iterate()
            yield item

    def checked_concat(self, join: Callable[[Iterable[Any]], str], parts: tuple[Any, ...]) -> str:
        """`join(parts)` for `~`, refused when the result would be too large."""
        _check()
        _within(sum(_size(p) for p in parts), "concatenation")
        return join(parts)

    def unsafe_undefined(self, obj: Any, attribute: str) -> NoReturn:
        raise SecurityError(
            f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe"
        )

    def getattr(self, obj: Any, attribute: str) -> Any:
        _check()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _check()
        return super().getitem(obj, argument)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        fmt: str = value.__self__
        format_map = value.__name__ == "format_map"

        def checked(*args: Any, **kwargs: Any) -> str:
            _check()
            values = list(args[0].values()) if format_map and args and isinstance(args[0], dict) else [
                *args, *kwargs.values()]
            _check_str_format(fmt, values)
            return wrapped(*args, **kwargs)

        return checked

    def call(self, context: Context, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        _check()
        args = _check_method_call(obj, args, kwargs)
        return super().call(context, obj, *args, **kwargs)

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        _check()
        if operator == "**" and isinstance(right, int | float):
            if abs(right) > MAX_EXPONENT:
                raise SecurityError(f"exponent {right} is larger than {MAX_EXPONENT}")
            if isinstance(left, int) and left.bit_length() * abs(right) > MAX_POWER_BITS:
                raise SecurityError("power result is too large")
        elif operator == "*":
            if _is_int(left) and _is_int(right) and left.bit_length() + right.bit_length() > MAX_POWER_BITS:
                raise SecurityError("product is too large")
            for seq, times in ((left, right), (right, left)):
                if isinstance(seq, str | bytes | bytearray | list | tuple) and _is_int(times) and times > 0:
                    if len(seq) * times > MAX_RENDERED_CHARS:
                        raise SecurityError("repetition result is too large")
                    _within(_size(seq) * times, "repetition")
        elif operator == "+":
            if isinstance(left, str | bytes | bytearray | list | tuple) and isinstance(
                right, str | bytes | bytearray | list | tuple
            ):
                _within(_size(left) + _size(right), "concatenation")
        elif operator == "%" and isinstance(left, str):
            _check_percent_format(left, right)
        return super().call_binop(context, operator, left, right)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _guarded(original: Callable[..., Any],
             check: Callable[..., tuple[Any, ...] | None]) -> Callable[..., Any]:
    """`original` (a filter) run only after `check(value, *args, **kwargs)` accepts it;
    `check` may return the positional arguments to use instead."""
    skip = 1 if getattr(original, "jinja_pass_arg", None) is not None else 0

    @functools.wraps(original)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        _check()
        replaced = check(*args[skip:], **kwargs)
        if replaced is not None:
            args = (*args[:skip], *replaced)
        return original(*args, **kwargs)

    return guarded


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], index: int, name: str, default: Any) -> Any:
    return args[index] if len(args) > index else kwargs.get(name, default)


def _center_check(value: Any, *args: Any, **kwargs: Any) -> None:
    _width(_arg(args, kwargs, 0, "width", 80), "center width")


def _indent_check(value: Any, *args: Any, **kwargs: Any) -> None:
    width = _arg(args, kwargs, 0, "width", 4)
    indention = len(width) if isinstance(width, str) else width
    if isinstance(indention, int):
        text = str(value)
        _within(len(text) + (text.count("\n") + 1) * indention, "indent")


def _wordwrap_check(value: Any, *args: Any, **kwargs: Any) -> None:
    width = _arg(args, kwargs, 0, "width", 79)
    wrapstring = _arg(args, kwargs, 2, "wrapstring", None) or "\n"
    text = str(value)
    if isinstance(width, int) and width > 0 and isinstance(wrapstring, str):
        lines = len(text) // width + text.count("\n") + 1
        _within(len(text) + lines * len(wrapstring), "wordwrap")


def _replace_check(value: Any, *args: Any, **kwargs: Any) -> None:
    text = str(value)
    old, new = str(_arg(args, kwargs, 0, "old", "")), str(_arg(args, kwargs, 1, "new", ""))
    count = _arg(args, kwargs, 2, "count", None)
    found = text.count(old) if old else len(text) + 1
    if isinstance(count, int) and count >= 0:
        found = min(found, count)
    _within(len(text) + found * max(0, len(new) - len(old)), "replace")


def _join_check(value: Any, *args: Any, **kwargs: Any) -> tuple[Any, ...]:
    items = list(value)
    separator = _arg(args, kwargs, 0, "d", "")
    _within(sum(_size(i) for i in items) + _size(separator) * len(items), "join")
    return (items, *args)


def _format_check(value: Any, *args: Any, **kwargs: Any) -> None:
    _check_percent_format(str(value), kwargs or args)


def _groups_check(value: Any, *args: Any, **kwargs: Any) -> None:
    _width(_arg(args, kwargs, 0, "linecount", 1), "group count", MAX_GROUPS)
    _width(kwargs.get("slices"), "group count", MAX_GROUPS)


def _printed_check(value: Any, *args: Any, **kwargs: Any) -> None:
    _within(_size(value), "printed value")


_GUARDED_FILTERS: dict[str, Callable[..., Any]] = {
    name: _guarded(FILTERS[name], check)
    for name, check in (
        ("center", _center_check), ("indent", _indent_check), ("wordwrap", _wordwrap_check),
        ("replace", _replace_check), ("join", _join_check), ("format", _format_check),
        ("batch", _groups_check), ("slice", _groups_check), ("string", _printed_check),
        ("tojson", _printed_check), ("pprint", _printed_check), ("list", _printed_check),
    )
}


def _lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:
    """Jinja2's `lipsum`, with its counts bounded."""
    _check()
    for value in (n, min, max):
        _width(value, "lipsum count", MAX_GROUPS // 10)
    return generate_lorem_ipsum(n=n, html=html, min=min, max=max)


def _finalize(value: Any) -> Any:
    if value is None:
        return ""
    if not isinstance(value, str | int | float):  # a collection: how long would it print?
        _within(_size(value), "printed value")
    return value


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
    except (RecursionError, MemoryError, SyntaxError, ValueError, OverflowError) as exc:
        return f"template cannot be compiled ({type(exc).__name__}: nested too deeply or too large)"


#: Reasons of the templates that ran out of time or loop iterations, by (source, html).
_EXHAUSTED: dict[tuple[str, bool], str] = {}


def template_cache_info() -> Any:
    """Hits, misses and size of the compiled-template cache."""
    return _compile.cache_info()


def clear_template_cache() -> None:
    """Forget every compiled template (tests)."""
    _compile.cache_clear()
    _EXHAUSTED.clear()


def render_string(source: str, variables: Mapping[str, Any], *, html: bool = False) -> str:
    """Render one template source; `html` turns autoescaping on."""
    compiled = _compile(source, html)
    if isinstance(compiled, str):
        raise TemplateError(compiled)
    exhausted = _EXHAUSTED.get((source, html))
    if exhausted is not None:
        raise TemplateError(exhausted)
    budget = _Budget()
    token = _BUDGET.set(budget)
    try:
        out = _render_bounded(compiled, variables, budget)
    except _LimitExceeded as exc:
        reason = f"forbidden by the sandbox: {exc.message}"
        if exc.repeatable:
            if len(_EXHAUSTED) >= CACHE_SIZE:
                _EXHAUSTED.pop(next(iter(_EXHAUSTED)))
            _EXHAUSTED[(source, html)] = reason
        raise TemplateError(reason) from None
    except SecurityError as exc:
        raise TemplateError(f"forbidden by the sandbox: {exc.message}") from None
    except jinja2.UndefinedError as exc:
        raise TemplateError(f"undefined value: {exc.message}") from None
    except jinja2.TemplateError as exc:
        raise TemplateError(f"template error: {exc.message or type(exc).__name__}") from None
    except Exception as exc:  # a runtime error caused by the template (1/0, bad filter arg)
        raise TemplateError(f"template raised {type(exc).__name__}") from None
    finally:
        _BUDGET.reset(token)
    return out


def _render_bounded(compiled: jinja2.Template, variables: Mapping[str, Any], budget: _Budget) -> str:
    """The rendered part, read chunk by chunk so that it never grows past the limit."""
    chunks: list[str] = []
    length = 0
    stream = compiled.root_render_func(compiled.new_context(dict(variables)))
    while batch := list(itertools.islice(stream, _CHUNKS_PER_CHECK)):
        length += sum(map(len, batch))
        if length > MAX_RENDERED_CHARS:
            raise TemplateError(f"rendered part is longer than {MAX_RENDERED_CHARS} characters")
        chunks += batch
        budget.check()
    return "".join(chunks)


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
