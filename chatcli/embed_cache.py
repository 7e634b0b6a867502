"""Embeddings computed once: a SQLite cache of vectors keyed by model, pooling and the text's sha256.

`similar` over the same files again, or `embed` over lines it has seen, reads vectors back instead of running
the model, and when every vector is cached the model is not even loaded (embedding.Embedder loads lazily).

One file, cache_dir()/embeddings.db, private (0600), in WAL mode with a busy timeout, so two chatcli
processes can read and write it at once; every write is one short transaction. A row holds the raw float32
vector (little-endian) as the model gave it, before normalisation, so one row serves both. Only the text's
hash is kept, never the text. The model is keyed by its file identity (snapshots.model_identity: a Hub blob's
sha256, else path, size and mtime) with llama-cpp-python's version, so a changed file or library computes
anew. A row whose blob is not exactly `width` float32s, or holds a NaN or inf, is deleted and recomputed:
a damaged row is never trusted. The file stays under a size budget (DEFAULT_MAX_MB): past it, the rows used
longest ago go first. `clear()` empties it; deleting the file is always safe.
"""

from __future__ import annotations

import hashlib
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chatcli import paths
from chatcli.errors import ChatcliError

if TYPE_CHECKING:
    from chatcli.embedding import Embedder, Vector

DEFAULT_MAX_MB = 512
FILE_NAME = "embeddings.db"
SCHEMA_VERSION = 1
TOUCH_SECONDS = 24 * 3600  # a hit refreshes its row's last use at most once a day: reads stay reads
QUERY_CHUNK = 500  # keys per SELECT (SQLite's variable limit is 32766; small chunks keep each query cheap)
EVICT_FRACTION = 0.2  # past the budget, evict down to this much below it (oldest use first)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS embeddings (
    id INTEGER PRIMARY KEY,       -- grows with each write: among rows used in the same second, the older goes first
    model BLOB NOT NULL,          -- sha256 of (model identity, library version, pooling), 16 bytes
    text BLOB NOT NULL,           -- sha256 of the UTF-8 text, 32 bytes
    vector BLOB NOT NULL,         -- float32, little-endian, the model's width
    used INTEGER NOT NULL,        -- unix seconds of the last write or (at most daily) read
    UNIQUE (model, text)
);
CREATE INDEX IF NOT EXISTS embeddings_used ON embeddings (used, id);
"""


class EmbedCacheError(ChatcliError):
    """The cache file cannot be opened or written (it is a cache: delete it and run again)."""


@dataclass(frozen=True)
class CacheStats:
    rows: int
    bytes: int  # the file's pages in use
    path: Path


def default_path() -> Path:
    return paths.cache_dir() / FILE_NAME


def model_key(identity: str, pooling: int) -> bytes:
    """The rows of one model file, library version and pooling."""
    return hashlib.sha256(f"{identity}\0{_library_version()}\0{pooling}".encode()).digest()[:16]


def _library_version() -> str:
    """llama-cpp-python's version, read from its __init__.py: importing llama_cpp (or scanning the installed
    distributions with importlib.metadata) would cost much of what a cache hit saves."""
    import importlib.util
    import re

    try:
        spec = importlib.util.find_spec("llama_cpp")
        text = Path(spec.origin).read_text(encoding="utf-8") if spec and spec.origin else ""
    except (ImportError, OSError, ValueError):
        text = ""
    found = re.search(r"""^__version__\s*=\s*["']([^"']+)["']""", text, re.MULTILINE)
    return found.group(1) if found else "?"


def text_key(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


class EmbeddingCache:
    """The vectors of texts seen before; open with `with EmbeddingCache() as cache:`."""

    def __init__(self, path: Path | None = None, *, max_bytes: int = DEFAULT_MAX_MB << 20) -> None:
        self.path = Path(path) if path is not None else default_path()
        self.max_bytes = max_bytes
        try:
            paths.private_file(self.path)  # 0600 before SQLite opens it; its -wal and -shm follow below
            self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # a cache: a power cut may lose the last rows, no more
            self._db.execute("PRAGMA busy_timeout=30000")
            self._db.executescript(_SCHEMA)
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            elif version != SCHEMA_VERSION:
                raise EmbedCacheError(f"{self.path} was written by another chatcli version (schema {version}); "
                                      "delete it to start a new cache")
        except sqlite3.DatabaseError as exc:
            raise EmbedCacheError(f"cannot use the embedding cache {self.path}: {exc}; delete the file and run "
                                  "again") from exc
        for suffix in ("-wal", "-shm"):
            side = self.path.with_name(self.path.name + suffix)
            if side.exists():
                paths.make_private(side)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> EmbeddingCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------- reading and writing

    def get_many(self, model: bytes, texts: Sequence[str], width: int) -> list[Vector | None]:
        """The cached vector of each text (None where there is none, or the row was damaged: it is deleted)."""
        import numpy as np

        keys = [text_key(t) for t in texts]
        found: dict[bytes, bytes] = {}
        unique = list(dict.fromkeys(keys))
        try:
            for start in range(0, len(unique), QUERY_CHUNK):
                chunk = unique[start:start + QUERY_CHUNK]
                marks = ",".join("?" * len(chunk))
                rows = self._db.execute(f"SELECT text, vector, used FROM embeddings WHERE model = ? AND text IN "
                                        f"({marks})", [model, *chunk]).fetchall()
                stale = time.time() - TOUCH_SECONDS
                touch = [key for key, _vector, used in rows if used < stale]
                found.update((key, vector) for key, vector, _used in rows)
                if touch:
                    self._write("UPDATE embeddings SET used = ? WHERE model = ? AND text = ?",
                                [(int(time.time()), model, key) for key in touch], many=True)
        except sqlite3.DatabaseError as exc:
            raise EmbedCacheError(f"cannot read the embedding cache {self.path}: {exc}") from exc
        out: list[Vector | None] = []
        damaged: list[bytes] = []
        for key in keys:
            blob = found.get(key)
            vector = None
            if blob is not None:
                if isinstance(blob, bytes) and len(blob) == 4 * width:
                    vector = np.frombuffer(blob, dtype="<f4").astype(np.float32)
                    if not np.isfinite(vector).all():
                        vector = None
                if vector is None:
                    damaged.append(key)
                    found.pop(key)
            out.append(vector)
        if damaged:
            self._write("DELETE FROM embeddings WHERE model = ? AND text = ?", [(model, key) for key in damaged],
                        many=True)
        return out

    def put_many(self, model: bytes, items: Sequence[tuple[str, Vector]]) -> None:
        """Store vectors (as the model gave them); then keep the file within its budget."""
        import numpy as np

        if not items:
            return
        now = int(time.time())
        rows = [(model, text_key(text), np.asarray(vector, dtype="<f4").tobytes(), now) for text, vector in items]
        self._write("INSERT OR REPLACE INTO embeddings (model, text, vector, used) VALUES (?, ?, ?, ?)", rows,
                    many=True)
        self._keep_within_budget()

    def _write(self, sql: str, params: Any, *, many: bool = False) -> None:
        """One statement in its own short write transaction (executemany over params with many=True)."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if many:
                    self._db.executemany(sql, params)
                else:
                    self._db.execute(sql, params)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            raise EmbedCacheError(f"cannot write the embedding cache {self.path}: {exc}") from exc

    # -------------------------------------------------------- size

    def _used_bytes(self) -> int:
        pages = self._db.execute("PRAGMA page_count").fetchone()[0]
        free = self._db.execute("PRAGMA freelist_count").fetchone()[0]
        size = self._db.execute("PRAGMA page_size").fetchone()[0]
        return int((pages - free) * size)

    def _keep_within_budget(self) -> None:
        """Past max_bytes, drop the rows used longest ago, down to (1 - EVICT_FRACTION) of the budget."""
        for _ in range(4):  # freed pages are only whole empty ones: check again, a few times at most
            used = self._used_bytes()
            if used <= self.max_bytes:
                return
            rows = self._db.execute("SELECT count(*) FROM embeddings").fetchone()[0]
            if not rows:
                return
            drop = max(1, int(rows * (1 - (1 - EVICT_FRACTION) * self.max_bytes / used)))
            self._write("DELETE FROM embeddings WHERE id IN (SELECT id FROM embeddings ORDER BY used, id LIMIT ?)",
                        (drop,))

    def stats(self) -> CacheStats:
        rows = self._db.execute("SELECT count(*) FROM embeddings").fetchone()[0]
        return CacheStats(rows=int(rows), bytes=self._used_bytes(), path=self.path)

    def clear(self) -> int:
        """Delete every row; returns how many there were. The file shrinks (VACUUM)."""
        rows = self.stats().rows
        self._write("DELETE FROM embeddings", ())
        try:
            self._db.execute("VACUUM")
        except sqlite3.DatabaseError:  # another process holds it: the space is reused anyway
            pass
        return rows


# ---------------------------------------------------------------- embedding through the cache


@dataclass
class CacheUse:
    hits: int = 0
    computed: int = 0


def embed_cached(embedder: Embedder, texts: Sequence[str], cache: EmbeddingCache | None, *,
                 normalize: bool = True, truncate: bool = False, use: CacheUse | None = None) -> list[Vector]:
    """embedder.embed(texts), reading what the cache holds and storing what was computed.

    Equal texts are embedded once. A text cut to fit (truncate=True) is not stored: its vector stands for a
    part of it. With cache=None this is embedder.embed with the deduplication.
    """
    from chatcli.embedding import normalize as unit

    model = model_key(embedder.identity, embedder.pooling) if cache is not None else b""
    unique = list(dict.fromkeys(texts))
    vectors: dict[str, Vector] = {}
    if cache is not None:
        for text, vector in zip(unique, cache.get_many(model, unique, embedder.width), strict=True):
            if vector is not None:
                vectors[text] = vector
    missing = [t for t in unique if t not in vectors]
    if use is not None:
        use.hits += len(unique) - len(missing)
        use.computed += len(missing)
    if missing:
        computed = embedder.embed(missing, normalize=False, truncate=truncate)
        vectors.update(zip(missing, computed, strict=True))
        if cache is not None:
            keep = [(t, v) for t, v in zip(missing, computed, strict=True)
                    if not truncate or len(embedder.tokenize(t)) <= embedder.max_tokens]
            cache.put_many(model, keep)
    return [unit(vectors[t]) if normalize else vectors[t] for t in texts]
