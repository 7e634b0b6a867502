"""What `list` and `show` report: rows built from the cache, the catalogue and GGUF headers (no weights loaded)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from chatcli import store
from chatcli.errors import GGUFError
from chatcli.gguf_info import GGUFInfo, read_gguf
from chatcli.loading import resolve_present
from chatcli.registry import Catalogue, ModelRef, ModelSpec


def _header(path: Path) -> GGUFInfo | None:
    try:
        return read_gguf(path)
    except GGUFError:
        return None


def local_rows(catalogue: Catalogue, display: Callable[[store.LocalModel, Catalogue], str]) -> list[dict]:
    """Models in the HF cache (SOURCE hf), then those in other tools' stores (stores.py), each file once."""
    rows = []
    for model in store.scan():
        info = _header(model.path)
        rows.append({
            "reference": display(model, catalogue),
            "source": "hf",
            "quant": (info.file_type if info else None) or model.quant,
            "size": model.size,
            "architecture": info.architecture if info else "unreadable",
            "parameters": info.n_params if info else None,
            "context": info.context_length if info else None,
            "last_used": store.last_used(model.path),
            "repo": model.repo,
            "file": model.filename,
            "revision": model.commit,
            "path": str(model.path),
        })
    rows.extend(_store_rows({Path(str(row["path"])).resolve() for row in rows}))
    return rows


def _store_rows(listed: set[Path]) -> list[dict]:
    from chatcli import stores
    from chatcli.gguf_info import quant_from_filename

    rows = []
    for model in stores.scan():
        resolved = model.path.resolve()
        if resolved in listed:  # e.g. LM Studio's folder linking into the HF cache: one row is enough
            continue
        listed.add(resolved)
        info = _header(model.path)
        rows.append({
            "reference": model.reference,
            "source": model.source,
            "quant": (info.file_type if info else None) or quant_from_filename(model.path.name),
            "size": model.size,
            "architecture": info.architecture if info else "unreadable",
            "parameters": info.n_params if info else None,
            "context": info.context_length if info else None,
            "last_used": store.last_used(model.path),
            "repo": None,
            "file": model.name,
            "revision": None,
            "path": str(model.path),
        })
    return rows


def available_rows(catalogue: Catalogue) -> list[dict]:
    local_repos = {m.repo.lower(): m for m in store.scan()}
    rows = []
    for spec in catalogue.models.values():
        rows.append({
            "name": spec.alias,
            "kind": spec.kind,
            "repo": spec.repo,
            "default_quant": spec.default_quant,
            "quants": spec.quants,
            "downloaded": spec.repo.lower() in local_repos,
            "context": spec.context,
            "license": spec.license,
            "description": spec.description,
        })
    return rows


def _revision(model: store.LocalModel | None, spec: ModelSpec | None) -> str | None:
    """The Hub commit, or where a mirrored file came from (its snapshot folder is a stand-in, not a commit)."""
    if model is None:
        return None
    from chatcli.pulling import mirror_commit

    for mirror in spec.mirrors if spec else ():
        if mirror_commit(mirror) == model.commit:
            return f"from the PyPI mirror {mirror.package}=={mirror.version}"
    return model.commit


def describe(ref: ModelRef, catalogue: Catalogue) -> dict:
    from chatcli.engine import choose_context, kv_bytes_per_token
    from chatcli.families import POOLING_NAMES, family
    from chatcli.gguf_checks import available_memory, find_problems

    path, model = resolve_present(ref)
    info = read_gguf(path)
    spec = ref.spec or (catalogue.get(catalogue.alias_for_repo(model.repo) or "") if model else None)
    meta = info.metadata
    arch = info.architecture or ""
    # What `complete` would refuse, at the context it would choose (without a --ctx-size).
    n_ctx = choose_context(None, spec.context if spec else None, info.context_length,
                           kv_bytes_per_token(meta, arch))
    problems = [str(p) for p in find_problems(info, n_ctx=n_ctx, memory=available_memory())]
    kind = family(info)
    return {
        "model": ref.display,
        "description": spec.description if spec else None,
        "family": kind.describe(),
        "architecture": info.architecture,
        "pooling": POOLING_NAMES.get(kind.pooling) if kind.pooling is not None else None,
        "name": info.name,
        "parameters": info.n_params,
        "quant": info.file_type,
        "size": model.size if model else info.file_size,
        "context_length": info.context_length,
        "layers": meta.get(f"{arch}.block_count"),
        "embedding_length": meta.get(f"{arch}.embedding_length"),
        "chat_template": info.chat_template,
        "license": info.license or (spec.license if spec else None),
        "repo": model.repo if model else None,
        "file": model.filename if model else None,
        "revision": _revision(model, spec),
        "sha256": model.sha256 if model else None,
        "parts": len(model.parts) if model else 1,
        "path": str(path),
        "last_used": store.last_used(path),
        "problems": problems,
    }
