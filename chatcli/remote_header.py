"""Know before you download: read a Hub GGUF's header with bounded HTTP Range requests, and say if it fits.

A GGUF's metadata and tensor table sit at its start, so the architecture, parameters, context length, chat
template and the bytes every tensor takes are known from the first few kilobytes to megabytes of a file
that may be tens of gigabytes. The header goes through gguf_info's own bounds-checked parser (fed by
Range reads instead of a local file) and gguf_checks' value checks, so a hostile remote header gets the
same one-line refusal as a local one. Reads start small and grow only as the parser asks for more, up to
MAX_HEADER_BYTES; what was read is kept in the cache dir, keyed by repo, file and content id, so a second
`show` costs one tree listing. URLs, auth headers and the HTTP session are huggingface_hub's (as in hub.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal, cast

from chatcli import config, hub, paths, quants
from chatcli.errors import ChatcliError, DownloadError, GGUFError, UsageError
from chatcli.gguf_info import GGUFInfo, read_gguf_from
from chatcli.registry import ModelRef
from chatcli.units import human_bytes

MAX_HEADER_BYTES = 32 << 20  # real headers are 1-10 MB (a 262k-token vocabulary with its scores is ~6 MB)
FIRST_READ = 32 << 10  # the first Range request; each further one doubles what was read, up to MAX_STEP
MAX_STEP = 4 << 20
PARSE_CHUNK = 16 << 10  # gguf_info's read-ahead per refill: keeps each request close to what the parser needs
FITS_SHARE = 0.8  # "fits" leaves a fifth of the budget for the OS, the compute buffers and everything else

Verdict = Literal["fits", "tight", "too big", "unknown"]


class HeaderTooLargeError(GGUFError):
    """The header did not end within MAX_HEADER_BYTES: not read further."""


# ---------------------------------------------------------------- Range reads


class _RangeFile:
    """A read-only, seekable view of a remote file that fetches its prefix on demand with Range requests.

    Only the prefix [0, len(data)) is ever held, and it only grows: the parser reads forward, and looks
    back (token strings) only into what it has already read.
    """

    def __init__(self, url: str, size: int, repo: str, filename: str, data: bytes = b"") -> None:
        self.url = url
        self.size = size
        self.repo = repo
        self.filename = filename
        self.data = bytearray(data)
        self.pos = 0
        self.fetched = 0  # bytes received over HTTP by this object
        self.requests = 0
        self.hit_cap = False

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = pos if whence == 0 else self.pos + pos if whence == 1 else self.size + pos
        return self.pos

    def tell(self) -> int:
        return self.pos

    def read(self, n: int = -1) -> bytes:
        end = self.size if n < 0 else min(self.pos + n, self.size)
        if end > MAX_HEADER_BYTES:
            self.hit_cap = True
            end = MAX_HEADER_BYTES
        if end > len(self.data):
            self._fetch(end)
        out = bytes(self.data[self.pos : end])
        self.pos += len(out)
        return out

    def _fetch(self, end: int) -> None:
        have = len(self.data)
        step = FIRST_READ if not have else min(max(have, FIRST_READ), MAX_STEP)
        stop = min(max(end, have + step), self.size, MAX_HEADER_BYTES)
        self.data += _get_range(self.url, have, stop, self.repo, self.filename)
        self.fetched += stop - have
        self.requests += 1


def _get_range(url: str, start: int, stop: int, repo: str, filename: str) -> bytes:
    """Bytes [start, stop) of a file; a server that ignores Range is read only that far, then cut off."""
    import httpx2
    from huggingface_hub import errors as hf
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    want = stop - start
    label = f"{repo}/{filename}"
    headers = build_hf_headers(headers={"Accept-Encoding": "identity", "Range": f"bytes={start}-{stop - 1}"})
    try:
        with get_session().stream("GET", url, headers=headers, follow_redirects=True,
                                  timeout=httpx2.Timeout(30.0)) as resp:
            hf_raise_for_status(resp)
            skip = 0
            if resp.status_code != 206:
                skip = start  # the whole file is coming: drop its first `start` bytes
            elif not resp.headers.get("Content-Range", "").startswith(f"bytes {start}-"):
                raise DownloadError(f"{label}: the server answered the header read at the wrong offset")
            body = bytearray()
            for chunk in resp.iter_bytes():
                if skip:
                    cut = min(skip, len(chunk))
                    chunk, skip = chunk[cut:], skip - cut
                body += chunk
                if len(body) >= want:
                    break
    except (hf.HfHubHTTPError, httpx2.TransportError) as exc:
        raise hub._translate(exc, repo, filename, "main") from exc
    if len(body) < want:
        raise DownloadError(f"{label}: the connection closed while reading the header; try again")
    return bytes(body[:want])


# ---------------------------------------------------------------- one file's header


@dataclass(frozen=True)
class RemoteHeader:
    """A remote file's parsed header and what reading it cost."""

    repo: str
    filename: str
    size: int
    info: GGUFInfo  # .path is the cached copy of the header (so checks can read the vocabulary back)
    fetched: int  # bytes this call received over HTTP (0 when the cache had them)
    requests: int


def _cache_paths(repo: str, filename: str, oid: str) -> tuple[Path, Path]:
    key = hashlib.sha256(f"{repo}\0{filename}\0{oid}".encode()).hexdigest()[:40]
    folder = paths.cache_dir() / "remote-headers"
    return folder / f"{key}.gguf-head", folder / f"{key}.json"


def _load_cached(head: Path, meta: Path, repo: str, filename: str, oid: str, size: int) -> bytes:
    try:
        record = json.loads(meta.read_text(encoding="utf-8"))
        data = head.read_bytes()
    except (OSError, ValueError):
        return b""
    if record != {"repo": repo, "file": filename, "oid": oid, "size": size, "bytes": len(data)}:
        return b""
    return data


def _store_cached(head: Path, meta: Path, record: dict[str, object], data: bytes) -> None:
    head.parent.mkdir(parents=True, exist_ok=True)
    for target, payload in ((head, data), (meta, json.dumps(record).encode())):
        fd, tmp = tempfile.mkstemp(dir=head.parent, prefix=".tmp-")
        with os.fdopen(fd, "wb") as out:
            out.write(payload)
        os.replace(tmp, target)


def read_remote_header(repo: str, filename: str, size: int, oid: str, revision: str = "main") -> RemoteHeader:
    """Parse a Hub file's GGUF header from as few bytes as the parser needs (or the cache); GGUFError if unsound."""
    from huggingface_hub import hf_hub_url

    label = f"{repo}/{filename}"
    head, meta = _cache_paths(repo, filename, oid)
    cached = _load_cached(head, meta, repo, filename, oid, size) if oid else b""
    url = hf_hub_url(repo, filename, revision=revision, endpoint=paths.hf_endpoint())
    source = _RangeFile(url, size, repo, filename, cached)
    try:
        info = read_gguf_from(cast(BinaryIO, source), Path(label), size, chunk=PARSE_CHUNK)
    except GGUFError as exc:
        if source.hit_cap:
            raise HeaderTooLargeError(
                f"{label}: its GGUF header does not end within {MAX_HEADER_BYTES >> 20} MiB; not read further"
            ) from exc
        raise
    data = bytes(source.data)
    if oid and len(data) > len(cached):
        _store_cached(head, meta, {"repo": repo, "file": filename, "oid": oid, "size": size, "bytes": len(data)},
                      data)
    elif not oid:  # nothing to key a cache entry on: keep a private copy for this call only
        head = Path(tempfile.mkdtemp(prefix="chatcli-head-")) / "head.gguf"
        head.write_bytes(data)
    return RemoteHeader(repo, filename, size, dataclasses.replace(info, path=head), source.fetched, source.requests)


# ---------------------------------------------------------------- memory and fit


def _parse_size(text: str) -> int:
    units = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
             "t": 10**12, "tb": 10**12, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
    raw = text.strip().lower().replace(" ", "")
    number = raw.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = raw[len(number):]
    try:
        value = float(number)
    except ValueError:
        value = -1
    if unit not in units or value <= 0:
        raise UsageError(f"memory_limit {text!r} is not a size: write e.g. 8GB, 512MB or 16GiB")
    return int(value * units[unit])


def free_vram() -> int | None:
    """Free GPU memory in bytes when this llama.cpp build can offload to an NVIDIA GPU; else None.

    llama_cpp (slow to import) is asked only when nvidia-smi exists, i.e. when there could be a GPU at all.
    """
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    from chatcli.engine import gpu_offload_supported

    try:
        if not gpu_offload_supported():
            return None
        out = subprocess.run([smi, "--query-gpu=memory.free", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
        return sum(int(line.strip()) for line in out.splitlines() if line.strip()) << 20
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


@dataclass(frozen=True)
class Budget:
    """The memory a model may take on this machine, and where that figure came from."""

    total: int | None
    source: str  # "the memory_limit setting", "free RAM", "free RAM + VRAM"


def memory_budget() -> Budget:
    """The `memory_limit` setting when set, else free RAM (and swap), plus free VRAM with a GPU backend."""
    from chatcli.gguf_checks import available_memory

    limit = config.get("memory_limit")
    if limit:
        return Budget(_parse_size(str(limit)), "the memory_limit setting")
    ram = available_memory()
    vram = free_vram()
    if vram:
        return Budget((ram or 0) + vram, "free RAM + free VRAM")
    return Budget(ram, "free RAM")


def verdict(need: int | None, budget: int | None) -> Verdict:
    if need is None or budget is None:
        return "unknown"
    if need <= budget * FITS_SHARE:
        return "fits"
    return "tight" if need <= budget else "too big"


# ---------------------------------------------------------------- one row per quant


@dataclass(frozen=True)
class QuantRow:
    """One model (a quant, all its split parts) of a repo, described from its header."""

    quant: str | None
    files: tuple[str, ...]
    size: int
    architecture: str | None = None
    family: str | None = None  # families.py: decoder, embedding, recurrent, encoder-decoder
    parameters: int | None = None
    context_length: int | None = None
    chat_template: bool | None = None
    n_ctx: int | None = None  # the context a load would choose
    weights: int | None = None
    kv_cache: int | None = None
    fit: Verdict = "unknown"
    problem: str | None = None  # the one-line refusal, when the header is unsound
    fetched: int = 0

    @property
    def memory(self) -> int | None:
        return None if self.weights is None or self.kv_cache is None else self.weights + self.kv_cache

    def as_dict(self) -> dict[str, object]:
        return {**dataclasses.asdict(self), "files": list(self.files), "memory": self.memory}


@dataclass(frozen=True)
class RepoReport:
    repo: str
    revision: str
    budget: Budget
    rows: list[QuantRow]

    @property
    def fetched(self) -> int:
        return sum(r.fetched for r in self.rows)


def _describe(repo: str, candidate: quants.Candidate, entries: dict[str, hub.RepoEntry], revision: str,
              context: int | None, budget: Budget) -> QuantRow:
    from chatcli.engine import choose_context, kv_bytes_per_token
    from chatcli.families import family
    from chatcli.gguf_checks import estimate_load_bytes, find_problems

    parts = [entries[name] for name in candidate.files]
    size = sum(p.size for p in parts)
    fetched = 0
    try:
        first = read_remote_header(repo, parts[0].path, parts[0].size, parts[0].oid, revision)
        fetched += first.fetched
        info = first.info
        tensors = list(info.tensors)
        for part in parts[1:]:  # a split model: metadata in the first part, tensors spread over all of them
            rest = read_remote_header(repo, part.path, part.size, part.oid, revision)
            fetched += rest.fetched
            tensors += rest.info.tensors
        if len(parts) > 1:
            info = dataclasses.replace(info, tensors=tuple(tensors), n_tensors=len(tensors),
                                       n_params=sum(t.n_elements for t in tensors))
        problems = find_problems(info)
        if problems:
            raise GGUFError(f"{repo}/{parts[0].path}: {problems[0]}")
        weights, _ = estimate_load_bytes(info, 0)
        params = info.n_params
    except GGUFError as exc:
        return QuantRow(candidate.quant, candidate.files, size, problem=str(exc), fetched=fetched)
    arch = info.architecture or ""
    n_ctx = choose_context(None, context, info.context_length, kv_bytes_per_token(info.metadata, arch))
    _, kv = estimate_load_bytes(info, n_ctx)
    return QuantRow(
        quant=candidate.quant or info.file_type, files=candidate.files, size=size, architecture=info.architecture,
        family=family(info).name, parameters=params, context_length=info.context_length,
        chat_template=bool(info.chat_template),
        n_ctx=n_ctx, weights=weights, kv_cache=kv, fit=verdict(weights + kv, budget.total), fetched=fetched,
    )


def describe_repo(ref: ModelRef, revision: str = "main", *, only_catalogue: bool = False) -> RepoReport:
    """Every GGUF model in the reference's repo (or just the file it names), each from its header alone."""
    if ref.repo is None:
        raise UsageError(f"{ref.display} is not a Hub model")
    if paths.hf_offline():
        raise DownloadError("HF_HUB_OFFLINE is set: the Hub cannot be asked what it holds; unset it")
    entries = {e.path: e for e in hub.list_repo_entries(ref.repo, revision)}
    candidates = quants.group_files(list(entries))
    if ref.kind == "file" and ref.filename:
        candidates = [c for c in candidates if ref.filename in c.files]
        if not candidates:
            raise DownloadError(f"{ref.repo}/{ref.filename} not found at revision {revision!r}")
    elif only_catalogue and ref.spec is not None:
        wanted = set(ref.spec.files.values())
        candidates = [c for c in candidates if c.name in wanted] or candidates
    if not candidates:
        raise UsageError(f"{ref.repo} has no GGUF files")
    budget = memory_budget()
    context = ref.spec.context if ref.spec else None
    rows = [_describe(ref.repo, c, entries, revision, context, budget) for c in candidates]
    rows.sort(key=lambda r: (r.weights if r.weights is not None else r.size, r.files))
    return RepoReport(ref.repo, revision, budget, rows)


# ---------------------------------------------------------------- --quant auto


@dataclass(frozen=True)
class AutoChoice:
    row: QuantRow
    reason: str


def _human(n: int | None) -> str:
    return "unknown" if n is None else human_bytes(n)


def choose_fitting(report: RepoReport) -> AutoChoice:
    """The largest model that fits the budget (else the largest tight one, said so); ChatcliError if none can."""
    budget = report.budget
    if budget.total is None:
        raise ChatcliError("--quant auto: this machine's free memory is unknown; name a quant, or set "
                           "memory_limit (`chatcli config set memory_limit 8GB`)")
    usable = [r for r in report.rows if r.memory is not None]
    if not usable:
        problems = "; ".join(r.problem for r in report.rows if r.problem)
        raise ChatcliError(f"--quant auto: no GGUF header in {report.repo} could be read ({problems})")
    for wanted in ("fits", "tight"):
        fitting = [r for r in usable if r.fit == wanted]
        if fitting:
            best = max(fitting, key=lambda r: r.memory or 0)
            larger = [r for r in usable if (r.memory or 0) > (best.memory or 0)]
            nxt = min(larger, key=lambda r: r.memory or 0) if larger else None
            why = (f"{best.quant or best.files[0]} is the largest that {'fits' if wanted == 'fits' else 'still fits'}"
                   f": it needs ~{_human(best.memory)} (weights {_human(best.weights)} + KV cache "
                   f"{_human(best.kv_cache)} at {best.n_ctx:,} tokens) of {_human(budget.total)} ({budget.source})")
            if nxt is not None:
                why += f"; {nxt.quant or nxt.files[0]} would need ~{_human(nxt.memory)}"
            if wanted == "tight":
                why += "; it is tight: close other programs, or use a smaller --ctx-size"
            return AutoChoice(best, why)
    smallest = min(usable, key=lambda r: r.memory or 0)
    raise ChatcliError(
        f"--quant auto: no quant of {report.repo} fits in {_human(budget.total)} ({budget.source}); the smallest, "
        f"{smallest.quant or smallest.files[0]}, needs ~{_human(smallest.memory)}"
    )
