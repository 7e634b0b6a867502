"""The conversation store: SQLite (WAL) in the data dir, one row per turn, committed as it happens.

Every write commits at once, so a crash or `kill -9` mid-reply keeps what was already shown; appends take
the write lock up front (BEGIN IMMEDIATE) so two chatcli processes on one conversation never collide.
"""

from __future__ import annotations

import builtins
import functools
import json
import os
import re
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Concatenate, Literal, ParamSpec, TypeVar

from chatcli import paths
from chatcli.errors import HistoryError

ROLES = ("system", "user", "assistant")  # the schema's CHECK constraints enforce these two
FINISH_REASONS = ("stop", "length", "context", "interrupted")
BUSY_TIMEOUT_S = 10.0
_SQLITE_MAGIC = b"SQLite format 3\x00"
# Crockford base32, lower case: ids are typed by hand (`chat --continue 01jd3`), so no i, l, o, u.
_ID_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"
_ID_RE = re.compile(f"^[{_ID_ALPHABET}]+$")
_P = ParamSpec("_P")
_R = TypeVar("_R")


def _m001_tables(db: sqlite3.Connection) -> None:
    # settings columns hold JSON text (NULL when empty); times are Unix seconds.
    db.execute("""
        CREATE TABLE conversations (
            id TEXT PRIMARY KEY, title TEXT, model TEXT, system TEXT, template TEXT,
            settings TEXT, created REAL NOT NULL, updated REAL NOT NULL)""")
    db.execute("""
        CREATE TABLE turns (
            id INTEGER PRIMARY KEY,
            conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
            seq INTEGER NOT NULL,
            role TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
            content TEXT NOT NULL, model TEXT, settings TEXT, created REAL NOT NULL,
            prompt_tokens INTEGER, completion_tokens INTEGER, duration REAL,
            finish_reason TEXT CHECK (finish_reason IN ('stop', 'length', 'context', 'interrupted')),
            UNIQUE (conversation_id, seq))""")


def _m002_updated_index(db: sqlite3.Connection) -> None:
    # `history list` and `chat --continue` read the most recently updated conversations first.
    db.execute("CREATE INDEX conversations_updated ON conversations(updated)")


# Append only: position N (1-based) takes a database from user_version N-1 to N. Never edit a shipped one.
MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [_m001_tables, _m002_updated_index]


@dataclass(frozen=True)
class Conversation:
    id: str
    title: str | None
    model: str | None
    system: str | None
    template: str | None
    settings: dict[str, Any] = field(default_factory=dict)
    created: float = 0.0
    updated: float = 0.0


@dataclass(frozen=True)
class Turn:
    id: int
    conversation_id: str
    seq: int
    role: str
    content: str
    model: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    created: float = 0.0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    duration: float | None = None
    finish_reason: str | None = None  # None on an assistant turn: still streaming, or its writer died


@dataclass(frozen=True)
class ConversationSummary:
    id: str
    title: str  # the title, else the first user message (shortened)
    model: str | None
    n_turns: int
    updated: float


_CONV_COLS = "id, title, model, system, template, settings, created, updated"
_TURN_COLS = ("id, conversation_id, seq, role, content, model, settings, created, prompt_tokens, "
              "completion_tokens, duration, finish_reason")


def _conversation(r: tuple[Any, ...]) -> Conversation:
    return Conversation(r[0], r[1], r[2], r[3], r[4], json.loads(r[5] or "{}"), r[6], r[7])


def _turn(r: tuple[Any, ...]) -> Turn:
    return Turn(r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6] or "{}"), *r[7:])


def _json(settings: dict[str, Any] | None) -> str | None:
    return json.dumps(settings, sort_keys=True) if settings else None


def new_id() -> str:
    """12 chars: milliseconds since 1970 (10 base32 chars, so ids sort by time) + 2 random chars."""
    n = (time.time_ns() // 1_000_000) << 10 | int.from_bytes(os.urandom(2), "big") & 0x3FF
    return "".join(_ID_ALPHABET[(n >> shift) & 31] for shift in range(55, -1, -5))


def _shorten(text: str, width: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


def _read_head(path: Path) -> bytes:
    try:
        with path.open("rb") as f:
            return f.read(len(_SQLITE_MAGIC))
    except FileNotFoundError:
        return b""


def _busy_retried(step: Callable[[], _R]) -> _R:
    """Run a step that takes a lock (open, BEGIN IMMEDIATE), again while SQLite answers "busy" within the timeout.

    SQLite's busy handler waits out a lock held by another process, but a few cases answer busy at once
    (a WAL file being recovered or its journal mode changing while another process opens it): the step is
    retried then, until BUSY_TIMEOUT_S has passed. The steps change nothing when they fail.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        try:
            return step()
        except sqlite3.OperationalError as e:
            name = getattr(e, "sqlite_errorname", "")
            if not name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or time.monotonic() >= deadline:
                raise
            time.sleep(0.05)


def _guarded(method: Callable[Concatenate[History, _P], _R]) -> Callable[Concatenate[History, _P], _R]:
    """Turn SQLite's errors (locked past the timeout, disk full, damaged file) into HistoryError."""

    @functools.wraps(method)
    def wrapper(self: History, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return method(self, *args, **kwargs)
        except sqlite3.Error as e:
            raise self._error(e) from e

    return wrapper


class History:
    """The conversation store; one SQLite connection, closed by close() or `with`."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = Path(path) if path is not None else paths.data_dir() / "history.db"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            head = _read_head(self.path)
            if head and head != _SQLITE_MAGIC:  # checked before SQLite opens it: nothing may write to it
                raise self._corrupt("it is not an SQLite database")
            # Created 0600 before SQLite opens it: SQLite gives the -wal and -shm files the database's mode.
            paths.private_file(self.path)
            for side in ("-wal", "-shm", "-journal"):
                paths.make_private(self.path.with_name(self.path.name + side))
            self._db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        except (OSError, sqlite3.Error) as e:
            raise HistoryError(f"cannot open the history database {self.path}: {e}") from e
        try:
            _busy_retried(self._open)
        except BaseException as e:
            self._db.close()
            if isinstance(e, sqlite3.Error):
                raise self._error(e) from e
            raise

    def _corrupt(self, why: object) -> HistoryError:
        return HistoryError(
            f"{self.path} is damaged ({why}); chatcli left it untouched. Move it aside "
            f"(e.g. `mv {self.path} {self.path}.bad`) and chatcli will start a new history.")

    def _error(self, e: sqlite3.Error) -> HistoryError:
        name = getattr(e, "sqlite_errorname", "")
        if name in ("SQLITE_NOTADB", "SQLITE_CORRUPT"):
            return self._corrupt(e)
        if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
            return HistoryError(f"{self.path} stayed locked by another chatcli for {BUSY_TIMEOUT_S:g} s; "
                                "try again")
        return HistoryError(f"history database {self.path}: {e}")

    def _open(self) -> None:
        db = self._db
        db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        # Read the version before anything writes: a newer chatcli's file must stay byte-identical.
        version = self._version()
        if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            db.execute("PRAGMA journal_mode = WAL")
        # In WAL mode NORMAL survives any process crash; only a power cut can drop the last commits.
        db.execute("PRAGMA synchronous = NORMAL")
        db.execute("PRAGMA foreign_keys = ON")
        if version < len(MIGRATIONS):
            self._migrate()

    def _version(self) -> int:
        version: int = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > len(MIGRATIONS):
            raise HistoryError(f"{self.path.name} was written by a newer chatcli (schema {version}); "
                               f"upgrade chatcli (this one knows schema {len(MIGRATIONS)})")
        return version

    def _migrate(self) -> None:
        with self._write() as db:
            version = self._version()  # again, under the lock: another process may have migrated it
            for number, migration in enumerate(MIGRATIONS[version:], start=version + 1):
                migration(db)
                db.execute(f"PRAGMA user_version = {number}")

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, holding the write lock from its start: commit on success, else roll back."""
        _busy_retried(lambda: self._db.execute("BEGIN IMMEDIATE"))
        try:
            yield self._db
        except BaseException:
            self._db.rollback()
            raise
        self._db.commit()

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> History:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------ conversations

    @_guarded
    def new_conversation(self, *, model: str, system: str | None = None, template: str | None = None,
                         settings: dict[str, Any] | None = None, title: str | None = None) -> Conversation:
        now = time.time()
        for _ in range(5):
            conv = Conversation(new_id(), title, model, system, template, dict(settings or {}), now, now)
            try:
                self._db.execute(f"INSERT INTO conversations ({_CONV_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                                 (conv.id, title, model, system, template, _json(settings), now, now))
                return conv
            except sqlite3.IntegrityError:  # same millisecond and same 10 random bits: draw again
                continue
        raise HistoryError(f"could not allocate a new conversation id in {self.path}")

    @_guarded
    def get(self, id_or_prefix: str) -> Conversation:
        """The conversation whose id is, or starts with, `id_or_prefix` (case-insensitive)."""
        text = id_or_prefix.strip()
        glob = text.lower() + "*" if _ID_RE.match(text.lower()) else None  # GLOB NULL matches nothing
        rows = self._db.execute(f"SELECT {_CONV_COLS} FROM conversations WHERE id = ? OR id GLOB ? "
                                "ORDER BY id LIMIT 11", (text, glob)).fetchall()
        exact = [r for r in rows if r[0] in (text, text.lower())]
        if exact or len(rows) == 1:
            return _conversation((exact or rows)[0])
        if not rows:
            raise HistoryError(f"no conversation '{id_or_prefix}': see `chatcli history list`")
        names = ", ".join(r[0] + (f" ({_shorten(r[1], 30)})" if r[1] else "") for r in rows[:10])
        more = ", ..." if len(rows) > 10 else ""
        raise HistoryError(f"'{id_or_prefix}' matches several conversations: {names}{more}; "
                           "type more of the id")

    @_guarded
    def latest(self) -> Conversation | None:
        row = self._db.execute(f"SELECT {_CONV_COLS} FROM conversations "
                               "ORDER BY updated DESC, id DESC LIMIT 1").fetchone()
        return _conversation(row) if row else None

    @_guarded
    def list(self, limit: int = 20, *, search: str | None = None) -> list[ConversationSummary]:
        """Most recently updated first; `search` matches titles and turn text (case-insensitive for ASCII)."""
        where, args = "", []
        if search:
            pattern = "%" + re.sub(r"([\\%_])", r"\\\1", search) + "%"
            where = ("WHERE c.title LIKE ?1 ESCAPE '\\' OR EXISTS (SELECT 1 FROM turns t "
                     "WHERE t.conversation_id = c.id AND t.content LIKE ?1 ESCAPE '\\')")
            args.append(pattern)
        rows = self._db.execute(
            f"""SELECT c.id, c.title, c.model, c.updated,
                   (SELECT COUNT(*) FROM turns t WHERE t.conversation_id = c.id),
                   (SELECT content FROM turns t WHERE t.conversation_id = c.id AND t.role = 'user'
                    ORDER BY t.seq LIMIT 1)
                FROM conversations c {where} ORDER BY c.updated DESC, c.id DESC LIMIT {int(limit)}""",
            args).fetchall()
        return [ConversationSummary(cid, title or _shorten(first or "") or "(empty)", model, n, updated)
                for cid, title, model, updated, n, first in rows]

    @_guarded
    def _set(self, conversation_id: str, column: str, value: str | None) -> None:
        cur = self._db.execute(f"UPDATE conversations SET {column} = ?, updated = ? WHERE id = ?",
                               (value, time.time(), conversation_id))
        if cur.rowcount == 0:
            raise HistoryError(f"no conversation '{conversation_id}': see `chatcli history list`")

    def set_title(self, conversation_id: str, value: str | None) -> None:
        self._set(conversation_id, "title", value)

    def set_system(self, conversation_id: str, value: str | None) -> None:
        self._set(conversation_id, "system", value)

    def set_model(self, conversation_id: str, value: str) -> None:
        self._set(conversation_id, "model", value)

    @_guarded
    def delete(self, conversation_id: str) -> None:
        """Delete a conversation and (by the foreign key's cascade) its turns."""
        if self._db.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,)).rowcount == 0:
            raise HistoryError(f"no conversation '{conversation_id}': see `chatcli history list`")

    # ------------------------------------------------------------ turns

    @_guarded
    def add_turn(self, conversation_id: str, role: str, content: str, *, model: str | None = None,
                 settings: dict[str, Any] | None = None, prompt_tokens: int | None = None,
                 completion_tokens: int | None = None, duration: float | None = None,
                 finish_reason: str | None = None) -> Turn:
        """Append a turn and commit; its seq is the conversation's next, taken under the write lock."""
        now = time.time()
        with self._write() as db:
            if db.execute("SELECT 1 FROM conversations WHERE id = ?", (conversation_id,)).fetchone() is None:
                raise HistoryError(f"no conversation '{conversation_id}': see `chatcli history list`")
            seq = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM turns WHERE conversation_id = ?",
                             (conversation_id,)).fetchone()[0]
            values = (conversation_id, seq, role, content, model, _json(settings), now, prompt_tokens,
                      completion_tokens, duration, finish_reason)
            cur = db.execute(f"INSERT INTO turns ({_TURN_COLS.removeprefix('id, ')}) "
                             "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", values)
            db.execute("UPDATE conversations SET updated = ? WHERE id = ?", (now, conversation_id))
        assert cur.lastrowid is not None
        return Turn(cur.lastrowid, conversation_id, seq, role, content, model, dict(settings or {}), now,
                    prompt_tokens, completion_tokens, duration, finish_reason)

    def start_reply(self, conversation_id: str, *, model: str | None = None,
                    settings: dict[str, Any] | None = None) -> Turn:
        """An empty assistant turn, written before the first token so a crash mid-reply keeps the text."""
        return self.add_turn(conversation_id, "assistant", "", model=model, settings=settings)

    @_guarded
    def update_reply(self, turn_id: int, content: str, *, finish_reason: str | None = None,
                     prompt_tokens: int | None = None, completion_tokens: int | None = None,
                     duration: float | None = None) -> None:
        """Save the reply so far (one committed UPDATE); call every ~0.5 s while streaming, and at the end."""
        cur = self._db.execute(
            "UPDATE turns SET content = ?, finish_reason = COALESCE(?, finish_reason), "
            "prompt_tokens = COALESCE(?, prompt_tokens), completion_tokens = COALESCE(?, completion_tokens), "
            "duration = COALESCE(?, duration) WHERE id = ?",
            (content, finish_reason, prompt_tokens, completion_tokens, duration, turn_id))
        if cur.rowcount == 0:
            raise HistoryError(f"turn {turn_id} is gone from {self.path} (deleted by another chatcli?)")

    @_guarded
    def turns(self, conversation_id: str) -> builtins.list[Turn]:
        rows = self._db.execute(f"SELECT {_TURN_COLS} FROM turns WHERE conversation_id = ? ORDER BY seq",
                                (conversation_id,)).fetchall()
        return [_turn(r) for r in rows]

    def _drop_from(self, db: sqlite3.Connection, conversation_id: str, seq: int) -> builtins.list[Turn]:
        rows = db.execute(f"SELECT {_TURN_COLS} FROM turns WHERE conversation_id = ? AND seq >= ? "
                          "ORDER BY seq", (conversation_id, seq)).fetchall()
        db.execute("DELETE FROM turns WHERE conversation_id = ? AND seq >= ?", (conversation_id, seq))
        db.execute("UPDATE conversations SET updated = ? WHERE id = ?", (time.time(), conversation_id))
        return [_turn(r) for r in rows]

    @_guarded
    def drop_last_exchange(self, conversation_id: str) -> builtins.list[Turn]:
        """For /undo: delete the last user turn and everything after it; return what was removed."""
        with self._write() as db:
            seq = db.execute("SELECT MAX(seq) FROM turns WHERE conversation_id = ? AND role = 'user'",
                             (conversation_id,)).fetchone()[0]
            return [] if seq is None else self._drop_from(db, conversation_id, seq)

    @_guarded
    def drop_last_reply(self, conversation_id: str) -> Turn | None:
        """For /retry: delete the last turn if it is an assistant reply, and return it."""
        with self._write() as db:
            row = db.execute("SELECT seq, role FROM turns WHERE conversation_id = ? "
                             "ORDER BY seq DESC LIMIT 1", (conversation_id,)).fetchone()
            if row is None or row[1] != "assistant":
                return None
            return self._drop_from(db, conversation_id, row[0])[0]

    # ------------------------------------------------------------ export

    @_guarded
    def export(self, conversation_id: str, fmt: Literal["md", "json"] = "md") -> str:
        conv = self.get(conversation_id)
        turns = self.turns(conv.id)
        if fmt == "json":
            rows = [{k: v for k, v in asdict(t).items() if k not in ("id", "conversation_id")}
                    | {"created": _iso(t.created)} for t in turns]
            return json.dumps(asdict(conv) | {"created": _iso(conv.created), "updated": _iso(conv.updated),
                                              "turns": rows}, indent=2, ensure_ascii=False)
        if fmt != "md":
            raise HistoryError(f"unknown export format {fmt!r}: use md or json")
        date = datetime.fromtimestamp(conv.created).astimezone().strftime("%Y-%m-%d %H:%M %Z")
        out = [f"# {conv.title or 'Conversation ' + conv.id}", "",
               f"- id: `{conv.id}`", f"- model: {conv.model or 'unknown'}", f"- date: {date}", ""]
        if conv.system:
            out += ["### System", "", conv.system, ""]
        notes = {"length": "*[stopped: token limit]*", "context": "*[stopped: context window full]*"}
        for t in turns:
            out += [f"### {t.role.capitalize()}", "", t.content, ""]
            if t.role == "assistant" and t.finish_reason in (None, "interrupted"):
                out += ["*[interrupted]*", ""]  # None: its writer was killed mid-reply (or is still writing)
            elif t.finish_reason in notes:
                out += [notes[t.finish_reason], ""]
        return "\n".join(out).rstrip("\n") + "\n"
