"""Conversation-state snapshots: llama.cpp's KV state saved per token prefix, restored instead of a prefill.

One flat folder (cache_dir()/snapshots). `<group>-<n>-<key>.state` holds llama_state_save_file's bytes,
zlib-compressed where that pays; the `.json` beside it is the metadata and the commit record (a state
without its JSON is no entry). group hashes (model, n_ctx, llama-cpp-python version), key hashes that plus
the n tokens, so finding the longest cached prefix needs no JSON parsing. The JSON's mtime is the last use.
A snapshot that fails any check is deleted and the caller prefills as usual: never a wrong answer.

A chat keeps one snapshot per conversation: `<group>-<n>-<key>-c<conversation hash>`, found by the same
prefix search, and a newer one for the conversation deletes the older (only the newest could be restored).
Those are written off the path between a reply and the next prompt (save_later): the chat thread claims the
context, a writer thread copies its state into memory, lets the context go (the next generation waits for
that copy only, a few ms), then compresses, hashes and writes the file while the user types.

A recurrent model's state (Mamba, RWKV) cannot be cut back to a shorter prefix: it is saved only where the
context holds exactly the prefix wanted, and restored only at that position, then extended.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from chatcli import paths
from chatcli.errors import ChatcliError, UsageError

if TYPE_CHECKING:
    from chatcli.engine import Engine

MIN_TOKENS = 32  # shorter prefixes prefill about as fast as a file is read
MIN_SAVING = 0.20  # keep the compressed form only when it is at least this much smaller
DEFAULT_MAX_MB = 2048
STALE_SECONDS = 3600  # temp files and orphaned states this old were left by a process that died
CHUNK = 1 << 20
FORMAT = 1
TMP = ".tmp-"


class _Damaged(Exception):
    """A snapshot failed a check."""


def model_identity(path: Path) -> str:
    """What snapshots are keyed by: a cached model's blob sha256, else the file's path, size and mtime."""
    real = Path(path).resolve()
    if len(real.name) == 64 and all(c in "0123456789abcdef" for c in real.name):
        return real.name  # the HF cache names blobs by their sha256
    st = real.stat()
    return f"{real}:{st.st_size}:{st.st_mtime_ns}"


def _lib_version() -> str:
    import llama_cpp

    return str(llama_cpp.__version__)


def _flash(engine: object) -> bool:
    """Flash attention changes the KV cache layout of the same model: a state from one never fits the other."""
    return bool(getattr(engine, "flash_attn", False))


def _group_hash(model_id: str, n_ctx: int, flash_attn: bool) -> hashlib._Hash:
    return hashlib.sha256(json.dumps([FORMAT, model_id, n_ctx, flash_attn, _lib_version()]).encode())


def _pack(tokens: Sequence[int]) -> bytes:
    return struct.pack(f"<{len(tokens)}i", *tokens)


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _store(data: bytes | bytearray | memoryview, out: BinaryIO) -> tuple[bool, str, int, int]:
    """Write data to `out`, zlib-compressed when that saves >= MIN_SAVING: (compressed, sha256 and size of
    what was written, raw size). Compression is given up as soon as it does not pay (KV caches seldom do)."""
    view = memoryview(data).cast("B")
    raw_size = len(view)
    packed_hash = hashlib.sha256()
    squeezer = zlib.compressobj(1)
    packed_size = 0
    trying = raw_size > 0
    for offset in range(0, raw_size, CHUNK):
        piece = squeezer.compress(view[offset:offset + CHUNK])
        packed_hash.update(piece)
        packed_size += out.write(piece)
        if packed_size > (1 - MIN_SAVING) * min(raw_size, offset + CHUNK):
            trying = False
            break
    if trying:
        piece = squeezer.flush()
        packed_hash.update(piece)
        packed_size += out.write(piece)
        if packed_size <= (1 - MIN_SAVING) * raw_size:
            return True, packed_hash.hexdigest(), packed_size, raw_size
    out.seek(0)
    out.truncate()
    raw_hash = hashlib.sha256()
    for offset in range(0, raw_size, CHUNK):  # hash and write in step: each chunk is read from memory once more
        chunk = view[offset:offset + CHUNK]
        raw_hash.update(chunk)
        out.write(chunk)
    return False, raw_hash.hexdigest(), raw_size, raw_size


def _conversation_tag(conversation_id: str) -> str:
    return "c" + hashlib.sha256(conversation_id.encode()).hexdigest()[:16]


def _private_temp(folder: Path, suffix: str) -> tuple[BinaryIO, Path]:
    """A new file only the user can read (snapshots hold conversations): O_EXCL, mode 0600."""
    path = folder / f"{TMP}{os.getpid()}-{uuid.uuid4().hex}{suffix}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o600)
    return os.fdopen(fd, "wb"), path


def _max_bytes_from_env() -> int:
    text = os.environ.get("CHATCLI_SNAPSHOT_MAX_MB", "").strip()
    try:
        mb = float(text) if text else float(DEFAULT_MAX_MB)
    except ValueError:
        mb = -1.0
    if not 0 <= mb < 2**40:  # also refuses nan and inf
        raise UsageError(f"invalid CHATCLI_SNAPSHOT_MAX_MB {text!r}: use a size in MB, 0 or more")
    return int(mb * 1024 * 1024)


class SnapshotStore:
    """Saved llama.cpp states, found by the longest token prefix, evicted least-recently-used past a cap."""

    def __init__(self, root: Path | None = None, *, max_bytes: int | None = None) -> None:
        self.root = Path(root) if root is not None else paths.cache_dir() / "snapshots"
        self.max_bytes = max_bytes if max_bytes is not None else _max_bytes_from_env()
        self.last_error: Exception | None = None  # the last background save's failure (they are best effort)
        self._pool: tuple[ThreadPoolExecutor, ThreadPoolExecutor] | None = None
        self._captured: Future[Any] | None = None  # the newest queued capture, and write
        self._written: Future[Any] | None = None
        self._captures = 0
        self._newest: dict[str, int] = {}  # conversation tag -> number of its newest capture
        self._lock = threading.Lock()

    def save_prefix(self, engine: Engine, tokens: Sequence[int], *, model_id: str,
                    margin: int = 0) -> Path | None:
        """Best effort: keep only what the context shares with `tokens` (less `margin`), then save it.

        Callers pass the tokens a later prompt will start with, so the snapshot is always a prefix of it.
        A failure (e.g. a full disk) just means no snapshot: None.
        """
        from chatcli.engine import common_prefix

        cached = engine.cached_tokens
        common = max(0, common_prefix(cached, tokens) - margin)
        if common < len(cached):
            engine.truncate(common)
        try:
            return self.save(engine, model_id=model_id)
        except ChatcliError:
            return None

    def save(self, engine: Engine, *, model_id: str, conversation_id: str | None = None) -> Path | None:
        """Snapshot the engine's cached tokens; returns the state file, or None when not worth keeping."""
        self.wait_captured(engine)
        if len(engine.cached_tokens) < MIN_TOKENS:
            return None
        captured = engine.state_file_bytes(min_tokens=MIN_TOKENS)
        if captured is None:
            return None
        tokens, data = captured
        return self._write(tokens, data, model_id=model_id, n_ctx=engine.n_ctx, flash_attn=_flash(engine),
                           conversation_id=conversation_id)

    def save_later(self, engine: Engine, keep: Callable[[], Sequence[int] | None], *, model_id: str,
                   conversation_id: str | None) -> None:
        """Snapshot a conversation in the background, as save_prefix would; returns at once.

        The context is claimed here and let go as soon as a capture thread has copied its state into memory:
        until then anything that changes it waits (engine.wait_state), a few ms at most. A writer thread then
        compresses, hashes and writes it, skipping a capture that a newer one of the same conversation has
        superseded, and deletes the conversation's older snapshot. `keep` runs on the capture thread and gives
        the tokens a later prompt will start with (None: no snapshot). Failures end up in `last_error`.
        Nothing happens for an engine that keeps no state here.
        """
        if not hasattr(engine, "state_file_bytes"):
            return
        n_ctx, flash_attn = engine.n_ctx, _flash(engine)
        tag = _conversation_tag(conversation_id) if conversation_id else None

        def write(number: int, tokens: list[int], data: bytearray) -> Path | None:
            if tag is not None and self._newest.get(tag) != number:
                return None  # a newer state of this conversation is queued: this one would be deleted at once
            return self._guard(lambda: self._write(tokens, data, model_id=model_id, n_ctx=n_ctx,
                                                   flash_attn=flash_attn, conversation_id=conversation_id))

        def capture() -> None:
            try:
                tokens = keep()
                captured = None if tokens is None else engine.state_file_bytes(tokens, MIN_TOKENS)
            finally:
                engine.release_state()
            if captured is not None:
                with self._lock:
                    self._captures += 1
                    if tag is not None:
                        self._newest[tag] = self._captures
                    self._written = self._threads()[1].submit(write, self._captures, *captured)

        engine.claim_state()
        try:
            with self._lock:
                self._captured = self._threads()[0].submit(self._guard, capture)
        except BaseException:
            engine.release_state()
            raise

    def wait_captured(self, engine: Engine) -> None:
        """Return once no background save is copying this engine's context (before anything changes it)."""
        wait = getattr(engine, "wait_state", None)
        if wait is not None:
            wait()

    def flush(self) -> None:
        """Wait until every background save queued so far is written (or has failed, see last_error)."""
        for name in ("_captured", "_written"):  # captures queue writes: those first
            pending = getattr(self, name)
            if pending is not None:
                pending.result()  # _guard keeps failures out of it

    def close(self) -> None:
        """Finish the queued saves and stop the background threads (a later save_later starts new ones)."""
        self.flush()
        with self._lock:
            threads, self._pool = self._pool, None
        for pool in threads or ():
            pool.shutdown(wait=True)

    def _threads(self) -> tuple[ThreadPoolExecutor, ThreadPoolExecutor]:
        """(capture, writer): one thread each. Their threads finish queued work before the interpreter exits."""
        if self._pool is None:
            self._pool = (ThreadPoolExecutor(1, thread_name_prefix="chatcli-snapshot-capture"),
                          ThreadPoolExecutor(1, thread_name_prefix="chatcli-snapshot-writer"))
        return self._pool

    def _guard(self, work: Callable[[], Any]) -> Any:
        try:
            return work()
        except Exception as exc:  # a snapshot is only a shortcut: keep the reason, lose the snapshot
            self.last_error = exc
            return None

    def _write(self, tokens: list[int], data: bytes | bytearray, *, model_id: str, n_ctx: int, flash_attn: bool,
               conversation_id: str | None = None) -> Path | None:
        """Commit a captured state (llama_state_save_file's layout) as an entry; None when over the cap."""
        key = _group_hash(model_id, n_ctx, flash_attn)
        group = key.hexdigest()[:16]
        key.update(_pack(tokens))
        stem = f"{group}-{len(tokens)}-{key.hexdigest()[:32]}"
        tag = _conversation_tag(conversation_id) if conversation_id else None
        stem += f"-{tag}" if tag else ""
        state, meta = self.root / f"{stem}.state", self.root / f"{stem}.json"
        if meta.exists() and state.exists():
            self._touch(meta)
            self._supersede(tag, stem)
            return state
        placed = committed = False
        temps: list[Path] = []
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            out, temp_state = _private_temp(self.root, ".raw")
            temps.append(temp_state)
            with out:
                compressed, digest, size, raw_size = _store(data, out)
            record = {"format": FORMAT, "model_id": model_id, "n_ctx": n_ctx, "flash_attn": flash_attn,
                      "lib_version": _lib_version(),
                      "n_tokens": len(tokens), "sha256": digest, "compressed": compressed, "size": size,
                      "raw_size": raw_size, "created": time.time(), "conversation": conversation_id,
                      "tokens": tokens}
            body = json.dumps(record, separators=(",", ":"))
            if size + len(body) > self.max_bytes:
                return None  # could never fit under the cap
            out, meta_tmp = _private_temp(self.root, ".json")
            temps.append(meta_tmp)
            with out:
                out.write(body.encode("utf-8"))
            # State first, then its metadata: readers only ever see an entry whose state is complete.
            # (Two processes saving the same tokens at once may pair one's JSON with the other's state;
            # the hash check then drops the entry: a lost snapshot, never a wrong one.)
            os.replace(temp_state, state)
            placed = True
            os.replace(meta_tmp, meta)
            committed = True
        except OSError as exc:
            raise ChatcliError(f"could not save a conversation snapshot in {self.root}: {exc}") from exc
        finally:
            for path in temps + ([state] if placed and not committed else []):
                path.unlink(missing_ok=True)
        self._supersede(tag, stem)
        self._evict()
        return state

    def _supersede(self, tag: str | None, stem: str) -> None:
        """Delete the conversation's other snapshots: only its newest can ever be restored."""
        if tag is not None:
            for old in self.root.glob(f"*-{tag}.json"):
                if old.stem != stem:
                    self._remove(old.stem)

    def restore(self, engine: Engine, tokens: Sequence[int], *, model_id: str) -> int:
        """Load the snapshot holding the longest prefix of `tokens`; returns its token count, 0 if none fits.

        Does nothing (returns 0) when the engine's live cache already shares as long a prefix. A snapshot
        that fails a check is deleted and the next longest tried; if one got as far as llama.cpp, the
        engine is reset. Either way the caller's prefill then gives the right answer.
        """
        tokens = [int(t) for t in tokens]
        recurrent = engine.recurrent
        for n, stem in self._candidates(model_id, engine.n_ctx, _flash(engine), tokens):
            live = engine.cached_tokens  # again after each failure: a failed load resets the engine
            # a KV cache is cut back to the shared prefix; a recurrent state is usable only whole, as a prefix
            usable = live[:n] == tokens[:n] if not recurrent else \
                len(live) >= n and live == tokens[: len(live)]
            if usable:
                return 0
            if self._load(engine, stem, tokens[:n], model_id):
                return n
        return 0

    def info(self) -> dict[str, Any]:
        """count, total_bytes, max_bytes, root, models ({model_id: count})."""
        entries = self._entries()
        models: dict[str, int] = {}
        for _, _, stem in entries:
            try:
                model = str(json.loads((self.root / f"{stem}.json").read_text(encoding="utf-8"))["model_id"])
            except (OSError, ValueError, KeyError, TypeError):
                model = "(damaged)"
            models[model] = models.get(model, 0) + 1
        return {"count": len(entries), "total_bytes": sum(size for _, size, _ in entries),
                "max_bytes": self.max_bytes, "root": str(self.root), "models": models}

    def clear(self) -> int:
        """Delete every snapshot (and leftovers of dead processes); returns the bytes freed."""
        freed = sum(self._remove(stem) for _, _, stem in self._entries())
        return freed + self._sweep(force_orphans=True)

    # ------------------------------------------------------------------ internals

    def _candidates(self, model_id: str, n_ctx: int, flash_attn: bool, tokens: list[int]) -> list[tuple[int, str]]:
        """(n, stem) of the entries whose key is that of tokens[:n] (a conversation's or not), longest first."""
        hasher = _group_hash(model_id, n_ctx, flash_attn)
        group = hasher.hexdigest()[:16]
        named: dict[int, list[str]] = {}
        for meta in self.root.glob(f"{group}-*.json"):
            parts = meta.stem.split("-")
            if len(parts) in (3, 4) and parts[1].isdigit() and MIN_TOKENS <= int(parts[1]) <= len(tokens):
                named.setdefault(int(parts[1]), []).append(meta.stem)
        found, done = [], 0
        for n in sorted(named):
            hasher.update(_pack(tokens[done:n]))
            done = n
            prefix = f"{group}-{n}-{hasher.copy().hexdigest()[:32]}"
            found += [(n, stem) for stem in sorted(named[n]) if stem == prefix or stem.startswith(prefix + "-")]
        return found[::-1]

    def _load(self, engine: Engine, stem: str, tokens: list[int], model_id: str) -> bool:
        meta_path, state = self.root / f"{stem}.json", self.root / f"{stem}.state"
        inflated = self.root / f"{TMP}{os.getpid()}-{uuid.uuid4().hex}.raw"
        touched = False
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            expected = {"format": FORMAT, "model_id": model_id, "n_ctx": engine.n_ctx, "flash_attn": _flash(engine),
                        "lib_version": _lib_version(), "n_tokens": len(tokens), "tokens": tokens}
            if not isinstance(meta, dict) or any(meta.get(k) != v for k, v in expected.items()):
                raise _Damaged("metadata does not match")
            if state.stat().st_size != meta["size"] or _file_sha256(state) != meta["sha256"]:
                raise _Damaged("hash mismatch")
            source = state
            if meta["compressed"]:
                self._inflate(state, inflated, int(meta["raw_size"]))
                source = inflated
            touched = True
            if engine.load_state(source) != tokens:
                raise _Damaged("llama.cpp restored other tokens")
        except (_Damaged, OSError, ValueError, KeyError, TypeError, zlib.error):
            self._remove(stem)
            if touched:
                engine.reset()
            return False
        finally:
            inflated.unlink(missing_ok=True)
        self._touch(meta_path)
        return True

    @staticmethod
    def _inflate(packed: Path, out: Path, raw_size: int) -> None:
        opener = zlib.decompressobj()
        written = 0
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0), 0o600)
        with open(packed, "rb") as src, os.fdopen(fd, "wb") as dst:
            while chunk := src.read(CHUNK):
                data = opener.decompress(chunk)
                written += dst.write(data)
            written += dst.write(opener.flush())
        if not opener.eof or opener.unused_data or written != raw_size:
            raise _Damaged("the compressed state is incomplete")

    @staticmethod
    def _touch(meta: Path) -> None:
        with contextlib.suppress(FileNotFoundError):  # evicted by another process meanwhile
            os.utime(meta, ns=(time.time_ns(), time.time_ns()))

    def _entries(self) -> list[tuple[int, int, str]]:
        """(last used ns, bytes, stem) of every entry."""
        entries = []
        for meta in self.root.glob("*.json") if self.root.is_dir() else ():
            if meta.name.startswith(TMP):
                continue
            try:
                st = meta.stat()
            except FileNotFoundError:  # removed by another process meanwhile
                continue
            size = st.st_size
            with contextlib.suppress(FileNotFoundError):  # a missing state is found out on restore
                size += meta.with_suffix(".state").stat().st_size
            entries.append((st.st_mtime_ns, size, meta.stem))
        return sorted(entries)

    def _remove(self, stem: str) -> int:
        freed = 0
        for path in (self.root / f"{stem}.json", self.root / f"{stem}.state"):
            with contextlib.suppress(FileNotFoundError):
                size = path.stat().st_size
                path.unlink()
                freed += size
        return freed

    def _sweep(self, *, force_orphans: bool = False) -> int:
        """Delete temp files and metadata-less states that dead processes left behind."""
        freed = 0
        cutoff = time.time() - STALE_SECONDS
        for path in self.root.iterdir() if self.root.is_dir() else ():
            orphan = path.suffix == ".state" and not path.with_suffix(".json").exists()
            with contextlib.suppress(FileNotFoundError):
                st = path.stat()
                if (path.name.startswith(TMP) or orphan) and (st.st_mtime < cutoff or (orphan and force_orphans)):
                    path.unlink()
                    freed += st.st_size
        return freed

    def _evict(self) -> None:
        self._sweep()
        entries = self._entries()
        total = sum(size for _, size, _ in entries)
        for _, size, stem in entries:
            if total <= self.max_bytes:
                break
            self._remove(stem)
            total -= size
