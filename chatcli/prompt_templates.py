"""The user's prompt templates: TOML files in `<config dir>/templates/NAME.toml`.

A template holds an optional system prompt, a prompt with `{input}` and `{name}` variables, a default
model, default variable values and default sampling options. Only plain `{identifier}` fields are
substituted, in one pass; `{{` and `}}` are literal braces. We never call str.format on user text:
it would evaluate `{0.__class__}`.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from chatcli import paths
from chatcli.errors import TemplateError, UsageError

NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_IDENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# `{{`, `}}`, a `{...}` field, or a lone brace (an error, as in str.format).
_TOKEN_RE = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")

KEYS = ("description", "system", "prompt", "model", "defaults", "options")
# the sampling options a template may set: SamplingOptions' fields, less grammar
OPTIONS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repeat_penalty", "seed", "stop")
_FLOAT_OPTIONS = ("temperature", "top_p", "min_p", "repeat_penalty")

Segment = tuple[bool, str]  # (is_field, text): a field's text is its variable name


def _segments(text: str, where: str) -> list[Segment]:
    """Split text into literals and `{name}` fields; reject any field str.format would do more with."""
    out: list[Segment] = []
    pos = 0
    for m in _TOKEN_RE.finditer(text):
        if m.start() > pos:
            out.append((False, text[pos : m.start()]))
        token, inner = m.group(0), m.group(1)
        if token in ("{{", "}}"):
            out.append((False, token[0]))
        elif inner is not None and _IDENT_RE.fullmatch(inner):
            out.append((True, inner))
        elif inner is not None:
            raise TemplateError(
                f"{where}: unsupported placeholder {token!r}: only {{name}} fields are allowed "
                "(write {{ and }} for literal braces)"
            )
        else:
            raise TemplateError(f"{where}: single {token!r}: write {token * 2} for a literal brace")
        pos = m.end()
    if pos < len(text):
        out.append((False, text[pos:]))
    return out


def _fields(segments: list[Segment] | None) -> list[str]:
    return [text for is_field, text in segments or [] if is_field]


def _substitute(segments: list[Segment], values: dict[str, str]) -> str:
    return "".join(values[text] if is_field else text for is_field, text in segments)


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    path: Path
    description: str = ""
    system: str | None = None
    prompt: str | None = None
    model: str | None = None
    defaults: dict[str, str] = field(default_factory=dict)
    options: dict[str, float | int | list[str]] = field(default_factory=dict)
    error: str | None = None  # set only by list_templates() for a file that failed to load

    def _parsed(self) -> tuple[list[Segment] | None, list[Segment] | None]:
        system = None if self.system is None else _segments(self.system, f"{self.path}: 'system'")
        prompt = None if self.prompt is None else _segments(self.prompt, f"{self.path}: 'prompt'")
        return system, prompt

    @property
    def variables(self) -> list[str]:
        """Variable names used in the system prompt and prompt, in order of first use, without `input`."""
        names: list[str] = []
        for segments in self._parsed():
            for name in _fields(segments):
                if name != "input" and name not in names:
                    names.append(name)
        return names

    def render(self, input: str | None, variables: dict[str, str]) -> tuple[str | None, str]:
        """(system prompt, prompt text) with `{input}` and the variables filled in."""
        system, prompt = self._parsed()
        known = self.variables
        unknown = [name for name in variables if name not in known]
        if unknown:
            has = f"its variables: {', '.join(known)}" if known else "it has no variables"
            raise UsageError(f"template '{self.name}' has no variable '{unknown[0]}' ({has})")
        values = {**self.defaults, **variables}
        missing = [name for name in known if name not in values]
        if missing:
            flags = " ".join(f"--var {name}=VALUE" for name in missing)
            raise UsageError(f"template '{self.name}' needs {flags}")
        uses_input = "input" in _fields(system) + _fields(prompt)
        if uses_input:
            if input is None:
                raise UsageError(f"template '{self.name}' needs input: give it as an argument or on stdin")
            values["input"] = input
        system_text = None if system is None else _substitute(system, values)
        text = "" if prompt is None else _substitute(prompt, values)
        if input and not uses_input:
            text = f"{text.rstrip()}\n\n{input}" if text.strip() else input
        return system_text, text


def templates_dir() -> Path:
    return paths.config_dir() / "templates"


def template_path(name: str) -> Path:
    """Where template NAME lives; the name may not contain path separators or start with a dot."""
    if not NAME_RE.fullmatch(name) or len(name) > 100:
        raise UsageError(f"invalid template name {name!r}: use letters, digits, '_', '.' and '-'")
    return templates_dir() / f"{name}.toml"


def template_names() -> list[str]:
    """The names of the template files, sorted; files whose stem is not a valid name are skipped."""
    folder = templates_dir()
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.glob("*.toml") if NAME_RE.fullmatch(p.stem) and p.is_file())


def _fail(path: Path, what: str) -> TemplateError:
    return TemplateError(f"{path}: {what}")


def _read(path: Path) -> dict[str, object]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise _fail(path, f"cannot read the template: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise _fail(path, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # tomllib's message already says "(at line N, column M)"
        raise _fail(path, f"invalid TOML: {exc}") from exc


def _optional_str(path: Path, data: dict[str, object], key: str) -> str | None:
    value = data.get(key)
    if value is None or isinstance(value, str):
        return value
    raise _fail(path, f"'{key}' must be a string")


def _table(path: Path, data: dict[str, object], key: str) -> dict[str, object]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise _fail(path, f"'{key}' must be a table ([{key}])")
    return value


def _options(path: Path, raw: dict[str, object]) -> dict[str, float | int | list[str]]:
    options: dict[str, float | int | list[str]] = {}
    for key, value in raw.items():
        if key not in OPTIONS:
            close = difflib.get_close_matches(key, OPTIONS, n=1, cutoff=0.5)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise _fail(path, f"unknown option '{key}' in [options]: {hint}allowed: {', '.join(OPTIONS)}")
        if key == "stop":
            if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value):
                raise _fail(path, "[options] stop must be a list of non-empty strings")
            options[key] = [str(s) for s in value]
        elif isinstance(value, float) and key in _FLOAT_OPTIONS:
            options[key] = value
        elif isinstance(value, int) and not isinstance(value, bool):
            options[key] = float(value) if key in _FLOAT_OPTIONS else value
        else:
            kind = "a number" if key in _FLOAT_OPTIONS else "a whole number"
            raise _fail(path, f"[options] {key} must be {kind}, got {value!r}")
    # The same limits as the command-line flags, so that a bad value is caught when the file is saved.
    from chatcli.engine import SamplingOptions

    values = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
    try:
        SamplingOptions(**values).validate()  # type: ignore[arg-type]
    except UsageError as exc:
        raise _fail(path, f"[options]: {exc}") from exc
    return options


def _build(name: str, path: Path, data: dict[str, object]) -> PromptTemplate:
    unknown = [key for key in data if key not in KEYS]
    if unknown:
        raise _fail(path, f"unknown key '{unknown[0]}' (allowed: {', '.join(KEYS)})")
    defaults: dict[str, str] = {}
    for key, value in _table(path, data, "defaults").items():
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise _fail(path, f"[defaults] {key} must be a string, got {value!r}")
        defaults[key] = str(value)
    template = PromptTemplate(
        name=name,
        path=path,
        description=_optional_str(path, data, "description") or "",
        system=_optional_str(path, data, "system"),
        prompt=_optional_str(path, data, "prompt"),
        model=_optional_str(path, data, "model"),
        defaults=defaults,
        options=_options(path, _table(path, data, "options")),
    )
    used = template.variables  # also checks the placeholders' syntax
    for key in defaults:
        if key not in used:
            raise _fail(path, f"[defaults] {key} is not used in 'system' or 'prompt'")
    return template


def validate_file(path: Path, name: str | None = None) -> PromptTemplate:
    """Parse and check one template file (after `templates edit`); raises TemplateError naming the file."""
    path = Path(path)
    return _build(name or path.stem, path, _read(path))


def load_template(name: str) -> PromptTemplate:
    path = template_path(name)
    if not path.is_file():
        close = difflib.get_close_matches(name, template_names(), n=3, cutoff=0.6)
        hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
        raise TemplateError(f"no template '{name}': see `chatcli templates list`{hint}")
    return validate_file(path)


def list_templates() -> list[PromptTemplate]:
    """Every template, by name; one that fails to load comes back with `error` set, the rest still list."""
    result: list[PromptTemplate] = []
    for name in template_names():
        path = template_path(name)
        try:
            result.append(validate_file(path))
        except TemplateError as exc:
            result.append(PromptTemplate(name=name, path=path, error=str(exc)))
    return result


def parse_vars(pairs: Sequence[str]) -> dict[str, str]:
    """`--var NAME=VALUE` pairs to a dict; the value may contain `=`; a later pair wins."""
    values: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not _IDENT_RE.fullmatch(key):
            raise UsageError(f"invalid --var {pair!r}: use NAME=VALUE")
        values[key] = value
    return values


def new_template_text(name: str) -> str:
    """A commented skeleton for `chatcli templates edit NAME` when the file does not exist yet."""
    return f'''# chatcli prompt template '{name}'. Use it with: chatcli complete -t {name} "some input"
# {{input}} is replaced by the input; other {{names}} by --var NAME=VALUE or [defaults].
# Write {{{{ and }}}} for literal braces.

description = ""
# system = "You are a concise assistant."
prompt = "{{input}}"
# model = "smollm2"

[defaults]
# bullets = "3"

[options]
# temperature = 0.3
# max_tokens = 200
# stop = ["\\n\\n"]
'''
