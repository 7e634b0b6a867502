"""GGUF headers that passed every value check, remembered per file, so the next load skips the walk.

Reading a header means walking every token and merge string (49k + 49k for SmolLM2), and checking it reads the
vocabulary back to look for duplicates: about 0.1 s of pure Python before llama.cpp even starts, on every cold
`complete`. Model files do not change under a name (Hub blobs are content-addressed), so the parsed header of a
file that passed is kept as JSON in the cache dir, keyed by the file's identity (device, inode, size, mtime):
a file replaced or touched is read and checked again. Only the checks that depend on the file alone are
skipped; whether it fits in memory is checked at every load.

JSON, not pickle: the cache is the user's, but what it holds should never be able to run code. Anything that
does not read back as exactly what was written is a miss (and is removed).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from chatcli.gguf_info import ArraySummary, GGUFInfo, TensorInfo

FORMAT = 1  # bump when GGUFInfo or the checks change what a "sound" header means


def _folder() -> Path:
    from chatcli.paths import cache_dir

    return cache_dir() / "headers"


def _identity(path: Path) -> str:
    st = os.stat(path)
    return f"{FORMAT}:{os.path.abspath(path)}:{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


def _entry(identity: str) -> Path:
    return _folder() / (hashlib.sha256(identity.encode()).hexdigest()[:40] + ".json")


def lookup(path: Path) -> GGUFInfo | None:
    """The header of `path` if it passed the checks before and the file has not changed since; else None."""
    try:
        identity = _identity(path)
        entry = _entry(identity)
        data = json.loads(entry.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    try:
        if data["identity"] != identity:
            raise ValueError("another file")
        return _decode(data["info"], Path(path))
    except (KeyError, TypeError, ValueError):
        entry.unlink(missing_ok=True)
        return None


def remember(info: GGUFInfo) -> None:
    """Keep a header that passed every value check (best effort: a cache that cannot be written is no cache)."""
    try:
        identity = _identity(info.path)
        entry = _entry(identity)
        entry.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = entry.with_name(f".{entry.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"identity": identity, "info": _encode(info)}, f)
        os.replace(tmp, entry)
    except OSError:
        pass


# ---------------------------------------------------------------- GGUFInfo <-> JSON


def _value_out(value: object) -> object:
    if isinstance(value, ArraySummary):
        return {"array": [value.type, value.length]}
    if isinstance(value, tuple):
        return {"tuple": [_value_out(v) for v in value]}
    if isinstance(value, bytes):
        return {"bytes": value.hex()}
    if isinstance(value, float):
        return {"float": repr(value)}  # keeps nan and inf exact
    return value


def _value_in(value: Any) -> object:
    if isinstance(value, dict):
        if set(value) == {"array"}:
            kind, length = value["array"]
            return ArraySummary(type=str(kind), length=int(length))
        if set(value) == {"tuple"}:
            return tuple(_value_in(v) for v in value["tuple"])
        if set(value) == {"bytes"}:
            return bytes.fromhex(value["bytes"])
        if set(value) == {"float"}:
            return float(value["float"])
        raise ValueError("unknown value")
    if value is None or isinstance(value, (bool, int, str)):
        return value
    raise ValueError("unknown value")


_PLAIN = ("file_size", "version", "architecture", "name", "n_tensors", "n_params", "file_type", "context_length",
          "chat_template", "bos_token_id", "eos_token_id", "eot_token_id", "bos_token", "eos_token", "eot_token",
          "license", "alignment", "data_offset")


def _encode(info: GGUFInfo) -> dict[str, object]:
    return {
        **{name: getattr(info, name) for name in _PLAIN},
        "metadata": [[key, _value_out(value)] for key, value in info.metadata.items()],
        "split": list(info.split) if info.split else None,
        "tensors": [[t.name, list(t.shape), t.type, t.offset, t.n_elements, t.n_bytes] for t in info.tensors],
        "array_spans": {key: list(span) for key, span in info.array_spans.items()},
    }


def _decode(data: dict[str, Any], path: Path) -> GGUFInfo:
    plain = {name: data[name] for name in _PLAIN}
    for name in ("file_size", "version", "n_tensors", "n_params", "alignment", "data_offset"):
        if not isinstance(plain[name], int):
            raise ValueError(name)
    split = data["split"]
    return GGUFInfo(
        path=path,
        metadata={str(key): _value_in(value) for key, value in data["metadata"]},
        split=(int(split[0]), int(split[1])) if split else None,
        tensors=tuple(
            TensorInfo(name=str(name), shape=tuple(int(d) for d in shape), type=str(kind), offset=int(offset),
                       n_elements=int(n_elements), n_bytes=None if n_bytes is None else int(n_bytes))
            for name, shape, kind, offset, n_elements, n_bytes in data["tensors"]
        ),
        array_spans={str(key): (int(span[0]), int(span[1])) for key, span in data["array_spans"].items()},
        **plain,
    )
