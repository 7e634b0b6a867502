"""Downloads from the Hugging Face Hub into its standard cache: resumable across processes, sha256-verified.

huggingface_hub (2.x) writes a per-process `.incomplete` file and checks only sizes, so an interrupted pull
restarts from zero and a corrupted body of the right size is accepted. We use its URL, metadata, auth and HTTP
session helpers, and do the transfer ourselves into `blobs/<sha256>.incomplete` (one name across processes,
guarded by the same `.locks/` file lock huggingface_hub takes), hashing as bytes arrive. Only a file whose
sha256 matches the Hub's LFS hash is moved to `blobs/<sha256>` and linked from `snapshots/<commit>/<file>`.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from chatcli import paths, quants, store
from chatcli.errors import ChatcliError, DownloadError, UsageError
from chatcli.registry import ModelRef

CHUNK = 1 << 20
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")


class HubUnreachableError(DownloadError):
    """The Hub could not be reached at all (so a mirror may be tried)."""


class PullProgress(Protocol):
    def start(self, name: str, total: int, done: int) -> None: ...
    def advance(self, nbytes: int) -> None: ...
    def note(self, message: str) -> None: ...
    def finish(self) -> None: ...


@dataclass(frozen=True)
class RemoteFile:
    repo: str
    filename: str
    commit: str
    sha256: str
    size: int
    url: str


@dataclass
class PullResult:
    model: store.LocalModel
    downloaded: int  # bytes fetched by this call
    already_present: bool
    source: str = "hub"


def _retry_delays() -> list[float]:
    """Back-off before each retry of a server error; CHATCLI_HTTP_RETRIES sets how many (default 4)."""
    try:
        count = max(0, int(os.environ.get("CHATCLI_HTTP_RETRIES", "4")))
    except ValueError:
        count = 4
    return [min(0.5 * 2**i, 8.0) for i in range(count)]


def _endpoint() -> str:
    return paths.hf_endpoint()


# ---------------------------------------------------------------- errors


def _translate(exc: BaseException, repo: str, filename: str | None, revision: str) -> ChatcliError:
    """Map huggingface_hub / httpx2 / OS errors to one clear line that says what to do."""
    import httpx2
    from huggingface_hub import errors as hf

    what = f"{repo}/{filename}" if filename else repo
    if isinstance(exc, ChatcliError):
        return exc
    if isinstance(exc, hf.GatedRepoError):
        return DownloadError(
            f"{repo} is gated: accept its terms at {_endpoint()}/{repo}, then set HF_TOKEN to a token with access"
        )
    if isinstance(exc, hf.RevisionNotFoundError):
        return DownloadError(f"revision {revision!r} not found in {repo}")
    if isinstance(exc, hf.RepositoryNotFoundError):
        status = exc.response.status_code if getattr(exc, "response", None) is not None else None
        if status in (401, 403):
            return DownloadError(f"{repo}: access denied (HTTP {status}); if it is private or gated, set HF_TOKEN")
        return DownloadError(f"repo {repo} not found on the Hub; check the name (if it is private, set HF_TOKEN)")
    if isinstance(exc, hf.EntryNotFoundError | hf.RemoteEntryNotFoundError):
        return DownloadError(f"{what} not found at revision {revision!r}; `chatcli pull {repo}` picks a file for you")
    if isinstance(exc, hf.HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else 0
        if status in (401, 403):
            return DownloadError(f"{what}: access denied (HTTP {status}); set HF_TOKEN to a token with access")
        if status >= 500 or status == 429:
            return DownloadError(f"the Hub answered HTTP {status} for {what} after retries; try again later")
        return DownloadError(f"the Hub answered HTTP {status} for {what}")
    if isinstance(exc, hf.OfflineModeIsEnabled):
        return DownloadError(f"HF_HUB_OFFLINE is set and {what} is not in the cache; unset it to download")
    if isinstance(exc, httpx2.TransportError):
        reason = str(exc) or type(exc).__name__
        return HubUnreachableError(
            f"cannot reach the Hub at {_endpoint()} ({reason}); check your network, proxy or HF_ENDPOINT"
        )
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return DownloadError(f"disk full while downloading {what}; free some space and run the pull again to resume")
    if isinstance(exc, OSError):
        return DownloadError(f"{what}: {exc.strerror or exc}")
    return DownloadError(f"{what}: {type(exc).__name__}: {exc}")


def _with_retries(call: Callable[[], object], repo: str, filename: str | None, revision: str) -> object:
    import httpx2
    from huggingface_hub import errors as hf

    delays = _retry_delays()
    for attempt in range(len(delays) + 1):
        try:
            return call()
        except KeyboardInterrupt:
            raise
        except (hf.HfHubHTTPError, httpx2.TransportError) as exc:
            retriable = isinstance(exc, httpx2.TimeoutException | httpx2.RemoteProtocolError | httpx2.ReadError)
            if isinstance(exc, hf.HfHubHTTPError) and exc.response is not None:
                retriable = exc.response.status_code >= 500 or exc.response.status_code == 429
            if isinstance(exc, hf.RepositoryNotFoundError | hf.EntryNotFoundError | hf.RevisionNotFoundError):
                retriable = False
            if not retriable or attempt == len(delays):
                raise _translate(exc, repo, filename, revision) from exc
            time.sleep(delays[attempt])
        except Exception as exc:  # noqa: BLE001 - mapped to one clear line, traceback kept for --debug
            raise _translate(exc, repo, filename, revision) from exc
    raise AssertionError("unreachable")


# ---------------------------------------------------------------- remote queries


def list_repo_ggufs(repo: str, revision: str) -> list[str]:
    from huggingface_hub import HfApi

    def call() -> list[str]:
        tree = HfApi(endpoint=_endpoint()).list_repo_tree(repo, revision=revision, recursive=True)
        return [item.path for item in tree if getattr(item, "size", None) is not None]

    return _with_retries(call, repo, None, revision)  # type: ignore[return-value]


@dataclass(frozen=True)
class RepoEntry:
    """A file in a repo listing: its size, and the id of its content (the LFS sha256, else the git blob id)."""

    path: str
    size: int
    oid: str


def list_repo_entries(repo: str, revision: str) -> list[RepoEntry]:
    """Every file of a repo with its size and content id, from the tree listing (no per-file requests).

    Asked through huggingface_hub's session and headers but without HfApi's own backoff, which spends ~30 s
    retrying a refused connection: an unreachable Hub is answered at once (HubUnreachableError).
    """
    from urllib.parse import quote

    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    def call() -> list[RepoEntry]:
        url: str | None = f"{_endpoint()}/api/models/{repo}/tree/{quote(revision, safe='')}?recursive=true"
        out = []
        while url:
            resp = get_session().get(url, headers=build_hf_headers(), follow_redirects=True, timeout=30)
            hf_raise_for_status(resp)
            for item in resp.json():
                if item.get("type") != "file":
                    continue
                lfs = item.get("lfs") or {}
                out.append(RepoEntry(str(item["path"]), int(item.get("size") or 0), str(lfs.get("oid") or
                                                                                       item.get("oid") or "")))
            url = resp.links.get("next", {}).get("url")
        return out

    return _with_retries(call, repo, None, revision)  # type: ignore[return-value]


def remote_file(repo: str, filename: str, revision: str) -> RemoteFile:
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    def call() -> RemoteFile:
        url = hf_hub_url(repo, filename, revision=revision, endpoint=_endpoint())
        meta = get_hf_file_metadata(url, timeout=30)
        commit = meta.commit_hash or ""
        sha = (meta.etag or "").strip('"').lower()
        if not _COMMIT_RE.match(commit):
            raise DownloadError(f"{repo}/{filename}: the server sent no valid commit hash; is HF_ENDPOINT a Hub?")
        if not _SHA256_RE.match(sha):
            raise DownloadError(
                f"{repo}/{filename}: the Hub gave no sha256 for it (not an LFS file), so it cannot be verified"
            )
        if meta.size is None or meta.size <= 0:
            raise DownloadError(f"{repo}/{filename}: the Hub gave no file size")
        return RemoteFile(repo, filename, commit, sha, meta.size, meta.location)

    return _with_retries(call, repo, filename, revision)  # type: ignore[return-value]


def files_for(ref: ModelRef, revision: str) -> list[str]:
    """The repo files a reference needs (several for a split model); lists the repo when it must choose."""
    assert ref.repo is not None
    if ref.filename:
        split = store.split_info(ref.filename)
        if split is None:
            return [ref.filename]
        listing = list_repo_ggufs(ref.repo, revision)
        group = [c for c in quants.group_files(listing) if ref.filename in c.files]
        if not group:
            raise DownloadError(f"{ref.repo}/{ref.filename} not found at revision {revision!r}")
        return list(group[0].files)
    listing = list_repo_ggufs(ref.repo, revision)
    default = ref.spec.default_quant if ref.spec else None
    chosen = quants.choose(quants.group_files(listing), quant=ref.quant, default_quant=default, where=ref.repo)
    return list(chosen.files)


# ---------------------------------------------------------------- the transfer


@contextmanager
def _blob_lock(repo: str, sha: str, waiting: Callable[[], None] | None = None) -> Iterator[None]:
    """The same lock file huggingface_hub takes, so it and we never write one blob at once."""
    from filelock import FileLock, Timeout

    lock_path = paths.hf_hub_cache() / ".locks" / store.repo_folder(repo).name / f"{sha}.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if waiting is not None:
            waiting()
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _hash_file(path: Path, hasher: hashlib._Hash) -> int:
    done = 0
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            hasher.update(chunk)
            done += len(chunk)
    return done


def _check_space(target: Path, need: int, name: str) -> None:
    free = shutil.disk_usage(target).free
    if free < need:
        raise DownloadError(
            f"not enough disk space for {name}: needs {_mb(need)}, {_mb(free)} free in {target}; free some space"
        )


def _mb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _stream_into(remote: RemoteFile, partial: Path, hasher: hashlib._Hash, progress: PullProgress | None
                 ) -> tuple[int, hashlib._Hash]:
    """Append the rest of the file to `partial`, resuming with Range requests; returns (bytes received, hash)."""
    import httpx2
    from huggingface_hub import errors as hf
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    received = 0
    delays = _retry_delays()
    failures = 0
    while True:
        offset = partial.stat().st_size if partial.exists() else 0
        if offset >= remote.size:
            return received, hasher
        headers = build_hf_headers(headers={"Accept-Encoding": "identity"})
        if offset:
            headers["Range"] = f"bytes={offset}-"
        progress_before = received
        try:
            with get_session().stream(
                "GET", remote.url, headers=headers, follow_redirects=True, timeout=httpx2.Timeout(30.0)
            ) as resp:
                hf_raise_for_status(resp)
                if offset and resp.status_code != 206:
                    # The server ignored our Range: start again from byte 0.
                    partial.unlink()
                    hasher = hashlib.sha256()
                    offset = 0
                    if progress:
                        progress.start(remote.filename, remote.size, 0)
                elif offset and not resp.headers.get("Content-Range", "").startswith(f"bytes {offset}-"):
                    raise DownloadError(f"{remote.filename}: the server resumed at the wrong offset")
                with partial.open("ab") as out:
                    for chunk in resp.iter_bytes():  # as bytes arrive: a cut loses nothing received
                        if offset + len(chunk) > remote.size:
                            raise DownloadError(f"{remote.filename}: the server sent more bytes than the file has")
                        out.write(chunk)
                        hasher.update(chunk)
                        offset += len(chunk)
                        received += len(chunk)
                        if progress:
                            progress.advance(len(chunk))
            if offset < remote.size:
                raise httpx2.RemoteProtocolError("connection closed early")
            return received, hasher
        except KeyboardInterrupt:
            raise
        except (httpx2.TransportError, hf.HfHubHTTPError) as exc:
            status = getattr(getattr(exc, "response", None), "status_code", None)
            if status is not None and status < 500 and status != 429:
                raise _translate(exc, remote.repo, remote.filename, remote.commit) from exc
            failures = 0 if received > progress_before else failures + 1  # bytes came: the link works
            if failures > len(delays):
                raise _translate(exc, remote.repo, remote.filename, remote.commit) from exc
            time.sleep(delays[failures - 1] if failures else 0.1)


def _link(folder: Path, remote: RemoteFile, revision: str) -> Path:
    blob = folder / "blobs" / remote.sha256
    pointer = folder / "snapshots" / remote.commit / remote.filename
    pointer.parent.mkdir(parents=True, exist_ok=True)
    if not pointer.exists():
        if pointer.is_symlink():  # dangling link left by a deleted blob
            pointer.unlink()
        os.symlink(os.path.relpath(blob, pointer.parent), pointer)
    if revision != remote.commit:
        ref = folder / "refs" / revision
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(remote.commit)
    return pointer


def fetch_file(remote: RemoteFile, revision: str, progress: PullProgress | None = None) -> int:
    """Make `remote` present and verified in the cache; returns the bytes downloaded (0 when it was there)."""
    folder = store.repo_folder(remote.repo)
    blobs = folder / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    blob = blobs / remote.sha256
    partial = blobs / f"{remote.sha256}.incomplete"
    def waiting() -> None:
        if progress is not None:
            progress.note(f"another process is downloading {remote.filename}; waiting for it")

    with _blob_lock(remote.repo, remote.sha256, waiting):
        if blob.is_file() and blob.stat().st_size == remote.size:
            if store.is_verified(remote.sha256, blob) or _verify_existing(blob, remote.sha256):
                _link(folder, remote, revision)
                return 0
        hasher = hashlib.sha256()
        done = _hash_file(partial, hasher) if partial.exists() else 0
        if done > remote.size:
            partial.unlink()
            hasher, done = hashlib.sha256(), 0
        _check_space(blobs, remote.size - done, remote.filename)
        if progress:
            progress.start(remote.filename, remote.size, done)
        try:
            received, hasher = _stream_into(remote, partial, hasher, progress)
        except OSError as exc:
            raise _translate(exc, remote.repo, remote.filename, revision) from exc
        finally:
            if progress:
                progress.finish()
        digest = hasher.hexdigest()
        if digest != remote.sha256:
            partial.unlink(missing_ok=True)
            raise DownloadError(
                f"{remote.filename}: checksum mismatch (expected sha256 {remote.sha256[:12]}…, got {digest[:12]}…); "
                "the download was discarded, run the pull again"
            )
        with partial.open("rb+") as f:
            os.fsync(f.fileno())
        os.chmod(partial, 0o644)
        os.replace(partial, blob)
        store.mark_verified(remote.sha256, blob)
        _link(folder, remote, revision)
        return received


def _verify_existing(blob: Path, sha: str) -> bool:
    """A blob another tool downloaded (unverified): hash it once; a bad one is removed."""
    hasher = hashlib.sha256()
    _hash_file(blob, hasher)
    if hasher.hexdigest() == sha:
        store.mark_verified(sha, blob)
        return True
    blob.unlink()
    return False


# ---------------------------------------------------------------- pull


def locate(ref: ModelRef, revision: str = "main") -> store.LocalModel | None:
    """The local copy of a reference, without touching the network."""
    if ref.kind == "local" or ref.repo is None:
        return None
    strict = revision != "main"  # an explicit --revision means that revision, not any copy
    if ref.filename:
        return store.find(ref.repo, ref.filename, revision, strict=strict)
    local = store.models_in_repo(ref.repo)
    if not local:
        return None
    candidates = quants.group_files([m.filename for m in local])
    default = ref.spec.default_quant if ref.spec else None
    try:
        chosen = quants.choose(candidates, quant=ref.quant, default_quant=default, where=ref.repo)
    except UsageError:
        return None
    return store.find(ref.repo, chosen.name, revision, strict=strict)


def pull(
    ref: ModelRef, *, revision: str = "main", refresh: bool = False, progress: PullProgress | None = None
) -> PullResult:
    """Download (or resume) the model a reference names; instant when it is already present and verified."""
    if ref.kind == "local":
        raise UsageError(f"{ref.local_path} is a local file: nothing to pull, use it directly")
    if ref.kind == "store":
        from chatcli.stores import TOOLS

        tool = TOOLS.get(str(ref.store), str(ref.store))
        raise UsageError(f"{ref.display} belongs to {tool}: chatcli uses it in place, nothing to pull "
                         f"(update it with {tool} itself)")
    if ref.kind == "remote":
        raise UsageError(f"{ref.display} runs on a remote endpoint: nothing to pull")
    if ref.repo is None:
        raise UsageError(f"{ref.display} names no Hub repository: nothing to pull")
    present = locate(ref, revision)
    if present is not None and not refresh and present.sha256 and all(p.exists() for p in present.parts):
        blob = present.path.resolve()
        if store.is_verified(present.sha256, blob) or _verify_existing(blob, present.sha256):
            return PullResult(present, 0, already_present=True)
    if paths.hf_offline():
        raise DownloadError(f"HF_HUB_OFFLINE is set and {ref.display} is not in the cache; unset it to download")
    names = files_for(ref, revision)
    remotes = [remote_file(ref.repo, name, revision) for name in names]
    downloaded = sum(fetch_file(remote, revision, progress) for remote in remotes)
    model = store.find(ref.repo, names[0], remotes[0].commit)
    if model is None:
        raise DownloadError(f"{ref.display}: downloaded but not found in the cache at {paths.hf_hub_cache()}")
    return PullResult(model, downloaded, already_present=downloaded == 0)
