"""A hardened Jinja sandbox for untrusted chat templates (GGUF `tokenizer.chat_template`, CVE-2024-34359).

jinja2's ImmutableSandboxedEnvironment, set up as transformers' `apply_chat_template` sets it up (trim/lstrip
blocks, loop controls, `raise_exception`, `strftime_now`, `tojson`), with every loop, output, join, call and
operator checked against a budget: RENDER_TIMEOUT_S seconds, and no value or output over MAX_CHARS characters.
The sandbox stops escapes, the budget stops endless loops and huge strings; either way: TemplateError.
"""

from __future__ import annotations

import contextvars
import functools
import json
import re
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sized
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.exceptions import SecurityError
from jinja2.ext import loopcontrols
from jinja2.runtime import Context, Undefined
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace, pass_context
from jinja2.visitor import NodeTransformer

from chatcli.errors import TemplateError

Message = dict[str, str]

RENDER_TIMEOUT_S = 1.0
MAX_CHARS = 10_000_000  # a rendered prompt, or any one value built on the way
MAX_PRODUCED = 5 * MAX_CHARS  # all text emitted in one render, captured blocks and macros included
MAX_ITEMS = 1_000_000  # elements in a list or tuple built by + or *
MAX_INT_ARG = 100_000  # widths and counts; no chat template needs more
MAX_INT_BITS = 100_000


class _LimitExceeded(Exception):
    """The template went over its time or size budget."""


class _RaisedByTemplate(Exception):
    """The template called raise_exception()."""


@dataclass
class _Budget:
    deadline: float
    produced: int = 0


_budget: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("chat_template_budget", default=None)


def _tick() -> None:
    budget = _budget.get()
    if budget is not None and time.monotonic() > budget.deadline:
        raise _LimitExceeded(f"ran longer than {RENDER_TIMEOUT_S:g} s")


def _weight(obj: Any) -> int:
    """Roughly how many characters `str(obj)` takes; stops counting past MAX_CHARS."""
    total, stack = 0, [obj]
    while stack and total <= MAX_CHARS:
        item = stack.pop()
        if isinstance(item, (str, bytes)):
            total += len(item)
        elif isinstance(item, int):
            total += item.bit_length() // 3 + 1
        elif isinstance(item, Namespace):  # its repr shows its attributes
            stack.append(item._Namespace__attrs)
        elif isinstance(item, Collection) and not isinstance(item, Undefined):
            total += 2 + len(item)
            if total <= MAX_CHARS:
                stack.extend(item.items() if isinstance(item, Mapping) else item)
        else:
            total += 1
    return total


def _check(value: Any) -> Any:
    """Refuse a value whose text would be too long; cheap for strings, a walk for containers."""
    if _weight(value) > MAX_CHARS:
        raise _LimitExceeded(f"built a value over {MAX_CHARS:,} characters")
    return value


def _check_result(value: Any) -> Any:
    """Refuse a result that is already too big; containers are weighed later, where they become text."""
    if isinstance(value, (str, bytes)) and len(value) > MAX_CHARS:
        raise _LimitExceeded(f"built a value over {MAX_CHARS:,} characters")
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise _LimitExceeded("built a number too large")
    return value


# Calls whose output can be many times their input, and how many units their input has: each unit can grow
# by the size of the other arguments (or by an int argument, for widths). That bound is checked first.
_UNITS: dict[str, Callable[[Any, tuple[Any, ...]], int]] = {
    "replace": lambda s, p: s.count(p[0]) + 1 if p and isinstance(p[0], str) else len(s) + 1,
    "indent": lambda s, p: s.count("\n") + 1,
    "expandtabs": lambda s, p: s.count("\t") + 1,
    "format": lambda s, p: s.count("{") + s.count("%") + 1,
    "format_map": lambda s, p: s.count("{") + 1,
    "join": lambda s, p: len(s) + 1 if isinstance(s, Sized) else MAX_INT_ARG,
    "translate": lambda s, p: len(s) + 1,
    "wordwrap": lambda s, p: len(s) + 1,
    "urlize": lambda s, p: len(s) + 1,
}
_WIDTH_ARGS = {"center", "ljust", "rjust", "zfill", "indent", "expandtabs", "slice"}
# Calls that never turn their arguments into text: no need to weigh them (which costs a walk each time).
_KEEPS_VALUES = {
    "length", "count", "list", "first", "last", "sort", "unique", "reverse", "batch", "slice", "groupby",
    "select", "reject", "selectattr", "rejectattr", "map", "attr", "dictsort", "items", "keys", "values",
    "get", "index", "min", "max", "sum", "default", "d", "int", "float", "abs", "round", "random", "tojson",
}


def _check_call(name: str, subject: Any, params: tuple[Any, ...]) -> None:
    """Refuse a call whose arguments or likely output break the budget, before it runs."""
    _tick()
    if name not in _KEEPS_VALUES:
        for value in (subject, *params):
            _check(value)
    ints = [param for param in params if isinstance(param, int)]
    if name in _WIDTH_ARGS and any(abs(i) > MAX_INT_ARG for i in ints):
        raise _LimitExceeded(f"passed {name} a number over {MAX_INT_ARG:,}")
    units = _UNITS.get(name)
    if units is None or not isinstance(subject, Iterable if name == "join" else str):
        return
    per_unit = sum(_weight(param) for param in params if not isinstance(param, int))
    if isinstance(subject, str) and name.startswith("format"):  # widths written in the format string
        per_unit += max((int(d) if len(d) < 9 else MAX_CHARS for d in re.findall(r"\d+", subject)), default=0)
    if name in ("indent", "expandtabs") or name == "format" and "*" in subject:
        per_unit += max(ints, default=0)
    if _weight(subject) + units(subject, params) * per_unit > MAX_CHARS:
        raise _LimitExceeded(f"asked {name} for over {MAX_CHARS:,} characters")


def _guard_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(func)  # keeps jinja's pass_context/pass_eval_context marks
    def guarded(*args: Any, **kwargs: Any) -> Any:
        passed = args and isinstance(args[0], (Context, nodes.EvalContext, jinja2.Environment))
        rest = args[1:] if passed else args
        _check_call(name, rest[0] if rest else None, (*rest[1:], *kwargs.values()))
        return _check_result(func(*args, **kwargs))

    return guarded


@pass_context  # pass_context also keeps jinja from running these at compile time
def _guard_out(context: Context, value: Any) -> str:
    _tick()
    text = value if isinstance(value, str) else str(_check(value))
    budget = _budget.get()
    if budget is not None:
        budget.produced += len(text)
        if budget.produced > MAX_PRODUCED:
            raise _LimitExceeded(f"produced over {MAX_PRODUCED:,} characters")
    return text


@pass_context
def _guard_iter(context: Context, iterable: Any) -> Iterator[Any]:
    for item in iterable:
        _tick()
        yield item


@pass_context
def _guard_concat(context: Context, parts: list[Any]) -> str:
    return "".join(str(part) for part in _check(parts))


def _fail_if_refused(method: Callable[..., Any]) -> Callable[..., Any]:
    def checked(self: Undefined, *args: Any) -> Any:
        if self._undefined_exception is SecurityError:
            self._fail_with_undefined_error()
        return method(self, *args)

    return checked


class _Undefined(Undefined):
    """Lenient about missing names, as transformers is, but a refused attribute fails wherever it is used."""

    __slots__ = ()
    __str__ = _fail_if_refused(Undefined.__str__)
    __bool__ = _fail_if_refused(Undefined.__bool__)
    __iter__ = _fail_if_refused(Undefined.__iter__)
    __len__ = _fail_if_refused(Undefined.__len__)


def _filter(node: nodes.Node, name: str) -> nodes.Filter:
    return nodes.Filter(node, name, [], [], None, None, lineno=node.lineno)


class _AddGuards(NodeTransformer):
    """Send every loop, `~` and output through the budget checks."""

    def visit_For(self, node: nodes.For) -> nodes.Node:
        self.generic_visit(node)
        node.iter = _filter(node.iter, "_guard_iter")
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        return _filter(nodes.List(node.nodes, lineno=node.lineno), "_guard_concat")

    def visit_Output(self, node: nodes.Output) -> nodes.Node:
        self.generic_visit(node)
        node.nodes = [_filter(child, "_guard_out") for child in node.nodes]
        return node


class _Sandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"+", "*", "**", "%"})

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        tree: nodes.Template = _AddGuards().visit(super()._parse(source, name, filename))
        tree.set_environment(self)
        return tree

    def getattr(self, obj: Any, attribute: str) -> Any:
        _tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _tick()
        return super().getitem(obj, argument)

    def call(self, context: Context, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        method = getattr(obj, "__wrapped__", obj)  # the sandbox wraps str.format
        name, subject, params = getattr(method, "__name__", ""), getattr(method, "__self__", None), args
        if name == "join" and isinstance(subject, str) and args:  # sep.join(items): the items are the input
            subject, params = args[0], (subject, *args[1:])
        _check_call(name if subject is not None else "", subject, (*params, *kwargs.values()))
        return _check_result(super().call(context, obj, *args, **kwargs))

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        _tick()
        if operator in ("*", "**") and isinstance(left, int) and isinstance(right, int):
            bits = left.bit_length() + right.bit_length() if operator == "*" else left.bit_length() * right
            if bits > MAX_INT_BITS:
                raise _LimitExceeded("built a number too large")
        elif operator == "%" and isinstance(left, str):
            _check_call("format", left, right if isinstance(right, tuple) else (right,))
        elif operator in ("*", "+"):  # refuse before building: a list of references can be huge and cheap
            seq, other = (right, left) if isinstance(left, int) else (left, right)
            if isinstance(seq, Sized) and isinstance(other, (int, Sized)):
                size = len(seq) * other if isinstance(other, int) else len(seq) + len(other)
                if isinstance(seq, str) and size > MAX_CHARS:
                    raise _LimitExceeded(f"built a value over {MAX_CHARS:,} characters")
                if not isinstance(seq, str) and size > MAX_ITEMS:
                    raise _LimitExceeded(f"built a sequence over {MAX_ITEMS:,} items")
        return _check_result(super().call_binop(context, operator, left, right))


def _raise_exception(message: str) -> None:
    raise _RaisedByTemplate(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    if (len(indent) if isinstance(indent, str) else indent or 0) > 64:
        raise _LimitExceeded("asked tojson for an indent over 64")
    encoder = json.JSONEncoder(ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                               sort_keys=sort_keys)
    parts, size = [], 0
    for chunk in encoder.iterencode(value):  # streamed, so a huge result is stopped part-way
        size += len(chunk)
        if size > MAX_CHARS:
            raise _LimitExceeded(f"built a value over {MAX_CHARS:,} characters")
        parts.append(chunk)
    return "".join(parts)


@functools.cache
def _environment() -> _Sandbox:
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols], undefined=_Undefined)
    env.filters["tojson"] = _tojson
    env.filters = {name: _guard_filter(name, func) for name, func in env.filters.items()}
    env.filters.update(_guard_out=_guard_out, _guard_iter=_guard_iter, _guard_concat=_guard_concat)
    env.globals.pop("lipsum", None)  # lipsum(n) takes time in proportion to n
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
    return env


@functools.lru_cache(maxsize=64)
def _compile(source: str) -> jinja2.Template:
    return _environment().from_string(source)


def _describe(exc: Exception) -> str:
    if isinstance(exc, _RaisedByTemplate):
        return f"chat template rejected the conversation: {exc}"
    if isinstance(exc, SecurityError):
        found = re.search(r"access to (.*) is unsafe", str(exc))
        return f"chat template tried to access {found.group(1) if found else exc}: refused"
    if isinstance(exc, _LimitExceeded):
        return f"chat template {exc}: refused"
    if isinstance(exc, jinja2.TemplateSyntaxError):
        return f"chat template is invalid: {exc.message} (line {exc.lineno})"
    return f"chat template failed: {type(exc).__name__}: {exc}"


def render_template(source: str, messages: list[Message], *, add_generation_prompt: bool = True,
                    bos_token: str = "", eos_token: str = "") -> str:
    """Render a chat template in the sandbox, on the time and size budget; TemplateError on any failure."""
    token = _budget.set(_Budget(time.monotonic() + RENDER_TIMEOUT_S))
    try:
        text = _compile(source).render(
            messages=[dict(message) for message in messages],  # copies: the caller's list stays as it was
            add_generation_prompt=add_generation_prompt, bos_token=bos_token, eos_token=eos_token,
            tools=None, documents=None,
        )
    except Exception as exc:  # the template is untrusted code: whatever it does wrong, one clear error
        raise TemplateError(_describe(exc)) from exc
    finally:
        _budget.reset(token)
    if len(text) > MAX_CHARS:
        raise TemplateError(f"chat template produced over {MAX_CHARS:,} characters: refused")
    return text
