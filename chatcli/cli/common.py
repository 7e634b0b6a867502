"""Helpers every command module shares: the catalogue, references, how `list` names a model."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterator

    from chatcli.registry import Catalogue, ModelRef
    from chatcli.store import LocalModel


def stdin_lines() -> Iterator[str] | None:
    """stdin's lines as they arrive, as UTF-8 (undecodable bytes replaced) without their line ends; None when
    stdin is a terminal. Read from the binary buffer: a text wrapper, once collected, would close sys.stdin
    (and a later isatty(), the offer to download a missing model, would fail)."""
    if sys.stdin is None or sys.stdin.isatty():
        return None
    return (raw.decode("utf-8", errors="replace").rstrip("\r\n") for raw in sys.stdin.buffer)


def catalogue() -> Catalogue:
    from chatcli.registry import load_catalogue

    return load_catalogue()


def model_ref(text: str, quant: str | None = None) -> ModelRef:
    from chatcli.registry import parse_ref

    return parse_ref(text, catalogue(), quant=quant)


def display(model: LocalModel, catalogue: Catalogue) -> str:
    """How `list` names a cached model: alias:QUANT for catalogue repos, else owner/repo:QUANT or the file."""
    alias = catalogue.alias_for_repo(model.repo)
    spec = catalogue.get(alias) if alias else None
    quant = model.quant
    if spec is not None and quant and spec.file_for(quant) == model.filename:
        return f"{alias}:{quant}"
    if quant:
        return f"{model.repo}:{quant}"
    return f"{model.repo}/{model.filename}"
