"""Constrained output: JSON schemas turned into llama.cpp GBNF grammars."""

from __future__ import annotations

import json
from pathlib import Path

from chatcli.errors import UsageError


def load_schema(value: str) -> dict:
    """--json-schema takes inline JSON or a file holding it; the result must be a JSON object."""
    text = value
    if not value.lstrip().startswith(("{", "[")):
        try:
            text = Path(value).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"invalid value for --json-schema: cannot read {value}: {exc}") from exc
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"invalid value for --json-schema: not valid JSON ({exc})") from exc
    if not isinstance(schema, dict):
        raise UsageError("invalid value for --json-schema: a schema must be a JSON object")
    return schema


def schema_to_gbnf(value: str) -> str:
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    schema = load_schema(value)
    try:
        return json_schema_to_gbnf(json.dumps(schema))
    except Exception as exc:  # noqa: BLE001 - the converter raises bare Exception/ValueError/KeyError/...
        raise UsageError(f"invalid value for --json-schema: unsupported schema ({type(exc).__name__}: {exc})") from exc
