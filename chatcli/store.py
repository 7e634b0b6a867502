"""The local model store: GGUF files in the Hugging Face cache, what we verified, when each was last used.

Reads the standard cache layout (models--owner--name/{blobs,snapshots,refs}) directly, so it sees files that
other Hub tools downloaded, without importing huggingface_hub (`list` and `show` must start fast).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from chatcli import paths
from chatcli.quants import SPLIT_RE as _SPLIT_RE

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")


@dataclass
class LocalModel:
    """A GGUF model in the HF cache (all parts of a split model count as one)."""

    repo: str
    filename: str  # path inside the repo of the (first) file
    path: Path  # snapshot path of the (first) file: what llama.cpp opens
    commit: str
    parts: list[Path] = field(default_factory=list)
    revisions: list[str] = field(default_factory=list)  # refs (e.g. "main") that point at `commit`
    size: int = 0
    sha256: str | None = None  # of the first part, from its blob name

    @property
    def quant(self) -> str | None:
        from chatcli.gguf_info import quant_from_filename

        return quant_from_filename(Path(self.filename).name)


def split_info(filename: str) -> tuple[int, int] | None:
    """(index, count) for `name-00001-of-00003.gguf`, else None."""
    m = _SPLIT_RE.search(filename)
    return (int(m.group(1)), int(m.group(2))) if m else None


def repo_folder(repo: str) -> Path:
    return paths.hf_hub_cache() / ("models--" + repo.replace("/", "--"))


def _repo_from_folder(name: str) -> str | None:
    if not name.startswith("models--"):
        return None
    return name[len("models--"):].replace("--", "/")


def _refs(folder: Path) -> dict[str, list[str]]:
    """commit -> the revisions (refs) that name it."""
    out: dict[str, list[str]] = {}
    refs = folder / "refs"
    if refs.is_dir():
        for ref in refs.rglob("*"):
            if ref.is_file():
                try:
                    commit = ref.read_text().strip()
                except OSError:
                    continue
                out.setdefault(commit, []).append(ref.relative_to(refs).as_posix())
    return out


def _blob_sha(link: Path) -> str | None:
    try:
        name = Path(os.readlink(link)).name if link.is_symlink() else None
    except OSError:
        return None
    return name if name and _SHA256_RE.match(name) else None


def models_in_repo(repo: str, folder: Path | None = None) -> list[LocalModel]:
    folder = folder or repo_folder(repo)
    snapshots = folder / "snapshots"
    if not snapshots.is_dir():
        return []
    refs = _refs(folder)
    found: dict[tuple[str, str], LocalModel] = {}
    for snap in sorted(snapshots.iterdir()):
        if not snap.is_dir():
            continue
        for file in sorted(snap.rglob("*.gguf")):
            if not file.exists():  # dangling link (blob deleted by hand)
                continue
            rel = file.relative_to(snap).as_posix()
            split = split_info(rel)
            key_name = _SPLIT_RE.sub(".gguf", rel) if split else rel
            model = found.get((snap.name, key_name))
            if model is None:
                model = found[(snap.name, key_name)] = LocalModel(
                    repo=repo, filename=rel, path=file, commit=snap.name, revisions=sorted(refs.get(snap.name, []))
                )
            model.parts.append(file)
            model.size += file.stat().st_size
            if split is None or split[0] == 1:
                model.filename, model.path, model.sha256 = rel, file, _blob_sha(file)
    # The same blob in several snapshots: keep the one a ref points at (else the newest).
    unique: dict[str, LocalModel] = {}
    for model in found.values():
        key = model.sha256 or f"{model.commit}/{model.filename}"
        best = unique.get(key)
        if best is None or (model.revisions and not best.revisions):
            unique[key] = model
    return sorted(unique.values(), key=lambda m: m.filename.lower())


def scan() -> list[LocalModel]:
    """Every GGUF model in the HF cache."""
    cache = paths.hf_hub_cache()
    if not cache.is_dir():
        return []
    out: list[LocalModel] = []
    for folder in sorted(cache.iterdir()):
        repo = _repo_from_folder(folder.name)
        if repo and folder.is_dir():
            out.extend(models_in_repo(repo, folder))
    return out


def find(repo: str, filename: str, revision: str = "main", *, strict: bool = False) -> LocalModel | None:
    """The cached copy of `filename` (complete: all parts present) at `revision`; any copy unless `strict`."""
    candidates = [m for m in models_in_repo(repo) if m.filename == filename]
    if not candidates:
        return None
    split = split_info(filename)
    if split is not None:
        candidates = [m for m in candidates if len(m.parts) == split[1]]
    for model in candidates:
        if revision == model.commit or revision in model.revisions:
            return model
    return candidates[0] if candidates and not strict else None


def partial_downloads() -> list[Path]:
    cache = paths.hf_hub_cache()
    return sorted(cache.glob("models--*/blobs/*.incomplete")) if cache.is_dir() else []


# ---------------------------------------------------------------- removal


def remove(model: LocalModel) -> int:
    """Delete the model's snapshot links and the blobs no other snapshot uses. Returns bytes freed."""
    folder = repo_folder(model.repo)
    blobs = {p.resolve() for p in model.parts if p.is_symlink()}
    freed = 0
    for part in model.parts:
        if part.is_symlink():
            part.unlink()
        elif part.is_file():  # a copied (non-symlinked) cache, e.g. on Windows
            freed += part.stat().st_size
            part.unlink()
    still_used = {p.resolve() for p in (folder / "snapshots").rglob("*") if p.is_symlink()}
    for blob in blobs - still_used:
        if blob.is_file() and folder in blob.parents:
            freed += blob.stat().st_size
            blob.unlink()
    # Tidy empty folders; drop refs to snapshots that are gone.
    snapshots = folder / "snapshots"
    for path in sorted(snapshots.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    if snapshots.is_dir() and not any(snapshots.iterdir()):
        shutil.rmtree(folder, ignore_errors=True)
    else:
        for commit, names in _refs(folder).items():
            if not (snapshots / commit).exists():
                for name in names:
                    (folder / "refs" / name).unlink(missing_ok=True)
    forget(model.sha256)
    return freed


# ---------------------------------------------------------------- records: verified hashes, last use


def _records_path() -> Path:
    return paths.data_dir() / "models.json"


def _read_records() -> dict[str, dict]:
    try:
        data = json.loads(_records_path().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_records(records: dict[str, dict]) -> None:
    target = _records_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".models.", suffix=".tmp")
    with os.fdopen(fd, "w") as out:
        json.dump(records, out, indent=1, sort_keys=True)
    os.replace(tmp, target)


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def mark_verified(sha256: str, blob: Path) -> None:
    records = _read_records()
    records.setdefault(sha256, {})["verified"] = _stamp(blob)
    _write_records(records)


def is_verified(sha256: str, blob: Path) -> bool:
    """True when we hashed this exact blob (same size and mtime) before."""
    try:
        return _read_records().get(sha256, {}).get("verified") == _stamp(blob)
    except OSError:
        return False


def mark_used(model_path: Path) -> None:
    key = str(model_path.resolve())
    records = _read_records()
    records.setdefault(key, {})["last_used"] = time.time()
    _write_records(records)


def last_used(model_path: Path) -> float | None:
    value = _read_records().get(str(model_path.resolve()), {}).get("last_used")
    return float(value) if isinstance(value, int | float) else None


def forget(sha256: str | None) -> None:
    if not sha256:
        return
    records = _read_records()
    if records.pop(sha256, None) is not None:
        _write_records(records)
