"""The conversation store on real SQLite files: round trips, migrations, damage, kills, concurrent writers."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import closing
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from chatcli import history
from chatcli.errors import HistoryError
from chatcli.history import History

REPO = Path(__file__).resolve().parents[1]

# The schema as migration 1 left it, written out by hand so that changing the code cannot change the test.
SCHEMA_1 = [
    """CREATE TABLE conversations (id TEXT PRIMARY KEY, title TEXT, model TEXT, system TEXT, template TEXT,
       settings TEXT, created REAL NOT NULL, updated REAL NOT NULL)""",
    """CREATE TABLE turns (id INTEGER PRIMARY KEY,
       conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE, seq INTEGER NOT NULL,
       role TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')), content TEXT NOT NULL, model TEXT,
       settings TEXT, created REAL NOT NULL, prompt_tokens INTEGER, completion_tokens INTEGER, duration REAL,
       finish_reason TEXT CHECK (finish_reason IN ('stop', 'length', 'context', 'interrupted')),
       UNIQUE (conversation_id, seq))""",
    "PRAGMA user_version = 1",
]


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "history.db"


@pytest.fixture
def store(db_path: Path) -> Iterator[History]:
    with History(db_path) as h:
        yield h


def run_child(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`python -c CODE ARGS` from the repo root, with this test's environment (and so its CHATCLI_HOME)."""
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=60)


def raw(path: Path, *statements: str) -> list[tuple]:
    """Run SQL on the file directly, outside History; returns the last statement's rows."""
    with closing(sqlite3.connect(path)) as db:
        rows: list[tuple] = []
        for sql in statements:
            rows = db.execute(sql).fetchall()
        db.commit()
        return rows


def snapshot(path: Path) -> tuple[bytes, int]:
    return path.read_bytes(), path.stat().st_mtime_ns


# ---------------------------------------------------------------- round trip, lookups, listing


def test_round_trip_survives_reopening(store: History, db_path: Path) -> None:
    conv = store.new_conversation(model="smollm2:q8_0", system="Be brief.", template="chatml",
                                  settings={"temperature": 0.2, "seed": 7}, title="Greetings")
    user = store.add_turn(conv.id, "user", "Hello there")
    reply = store.start_reply(conv.id, model="smollm2:q8_0", settings={"temperature": 0.2})
    assert reply.finish_reason is None and reply.content == "" and reply.seq == 2
    store.update_reply(reply.id, "Hi", duration=0.1)
    store.update_reply(reply.id, "Hi! How can I help?", finish_reason="stop", prompt_tokens=12,
                       completion_tokens=6, duration=0.4)
    store.close()

    with History(db_path) as again:
        got = again.get(conv.id)
        assert got == replace(conv, updated=got.updated)
        assert got.settings == {"temperature": 0.2, "seed": 7} and got.updated >= conv.created
        turns = again.turns(conv.id)
    assert turns[0] == user
    assert [(t.seq, t.role, t.content, t.finish_reason) for t in turns] == [
        (1, "user", "Hello there", None), (2, "assistant", "Hi! How can I help?", "stop")]
    assert (turns[1].prompt_tokens, turns[1].completion_tokens, turns[1].duration) == (12, 6, 0.4)
    assert turns[1].settings == {"temperature": 0.2} and turns[1].model == "smollm2:q8_0"


def test_default_path_is_in_the_data_dir(home: Path) -> None:
    with History() as h:
        conv = h.new_conversation(model="gpt2")
    assert (home / "data" / "history.db").is_file()
    with History(home / "data" / "history.db") as h:
        assert h.latest() == conv


def test_ids_are_short_typeable_and_sort_by_time(store: History) -> None:
    ids = []
    for _ in range(5):
        ids.append(store.new_conversation(model="m").id)
        time.sleep(0.002)
    assert all(len(i) == 12 and set(i) <= set("0123456789abcdefghjkmnpqrstvwxyz") for i in ids)
    assert ids == sorted(ids) and len(set(ids)) == 5


def test_get_accepts_a_unique_prefix_and_refuses_an_ambiguous_one(store: History) -> None:
    convs = [store.new_conversation(model="m", title=f"chat {n}") for n in range(3)]
    ids = [c.id for c in convs]
    for conv in convs:
        # The shortest prefix that no other id shares.
        n = next(n for n in range(1, 13) if sum(i.startswith(conv.id[:n]) for i in ids) == 1)
        assert store.get(conv.id[:n]) == conv
        assert store.get(conv.id[:n].upper()) == conv
        assert store.get(conv.id) == conv
    common = os.path.commonprefix(ids)
    with pytest.raises(HistoryError, match="matches several conversations") as e:
        store.get(common)
    assert all(i in str(e.value) for i in ids) and "chat 1" in str(e.value)
    for unknown in ("zzzzzz", "' OR 1=1 --", "0*", ""):
        with pytest.raises(HistoryError, match="see `chatcli history list`"):
            store.get(unknown)


def test_list_latest_and_search(store: History) -> None:
    assert store.latest() is None and store.list() == []
    a = store.new_conversation(model="gpt2", title="Rust questions")
    store.add_turn(a.id, "user", "What is a borrow checker?")
    b = store.new_conversation(model="smollm2")
    store.add_turn(b.id, "system", "You are a poet.")
    store.add_turn(b.id, "user", "Write   a poem\nabout 100% of the " + "very " * 20 + "long sea")
    store.add_turn(b.id, "assistant", "Waves.")
    c = store.new_conversation(model="qwen")  # nothing said yet

    assert store.latest() == c
    summaries = store.list()
    assert [s.id for s in summaries] == [c.id, b.id, a.id]
    assert [s.n_turns for s in summaries] == [0, 3, 1]
    assert summaries[2].title == "Rust questions" and summaries[2].model == "gpt2"
    poem = summaries[1].title  # the first user message, whitespace collapsed, cut to 60 characters
    assert poem.startswith("Write a poem about 100% of the very") and len(poem) == 60 and poem.endswith("…")
    assert summaries[0].title == "(empty)"
    assert [s.id for s in store.list(limit=1)] == [c.id]

    store.add_turn(a.id, "assistant", "It checks borrows.")  # activity moves a conversation to the top
    assert store.latest() == store.get(a.id) and store.list()[0].id == a.id
    assert [s.id for s in store.list(search="BORROW")] == [a.id]  # turn text, any case
    assert [s.id for s in store.list(search="rust")] == [a.id]  # title
    assert [s.id for s in store.list(search="100%")] == [b.id]  # % is literal
    assert store.list(search="10_%") == []  # and so is _


def test_setters(store: History) -> None:
    conv = store.new_conversation(model="gpt2")
    store.set_title(conv.id, "Named")
    store.set_system(conv.id, "Be terse.")
    store.set_model(conv.id, "smollm2")
    got = store.get(conv.id)
    assert (got.title, got.system, got.model) == ("Named", "Be terse.", "smollm2")
    with pytest.raises(HistoryError, match="no conversation 'nope'"):
        store.set_title("nope", "x")


def test_bad_input_gives_history_errors(store: History) -> None:
    conv = store.new_conversation(model="m")
    with pytest.raises(HistoryError, match="CHECK constraint failed: role"):
        store.add_turn(conv.id, "robot", "beep")
    with pytest.raises(HistoryError, match="CHECK constraint failed: finish_reason"):
        store.add_turn(conv.id, "assistant", "x", finish_reason="tired")
    with pytest.raises(HistoryError, match="no conversation 'missing'"):
        store.add_turn("missing", "user", "hello")
    with pytest.raises(HistoryError, match="unknown export format"):
        store.export(conv.id, "html")  # type: ignore[arg-type]
    assert store.turns(conv.id) == []


# ---------------------------------------------------------------- undo, retry, delete, export


def test_drop_last_exchange_and_last_reply(store: History) -> None:
    conv = store.new_conversation(model="m")
    assert store.drop_last_exchange(conv.id) == [] and store.drop_last_reply(conv.id) is None
    for role, text in [("system", "sys"), ("user", "q1"), ("assistant", "a1"), ("user", "q2"),
                       ("assistant", "a2")]:
        store.add_turn(conv.id, role, text)

    dropped = store.drop_last_reply(conv.id)
    assert dropped is not None and (dropped.seq, dropped.content) == (5, "a2")
    assert store.drop_last_reply(conv.id) is None  # the last turn is now the user's
    retried = store.start_reply(conv.id)
    assert retried.seq == 5

    undone = store.drop_last_exchange(conv.id)
    assert [(t.seq, t.content) for t in undone] == [(4, "q2"), (5, "")]
    assert [t.content for t in store.turns(conv.id)] == ["sys", "q1", "a1"]
    assert [t.content for t in store.drop_last_exchange(conv.id)] == ["q1", "a1"]
    assert store.drop_last_exchange(conv.id) == []  # only the system turn is left
    assert [t.content for t in store.turns(conv.id)] == ["sys"]


def test_delete_cascades_to_turns(store: History, db_path: Path) -> None:
    gone = store.new_conversation(model="m")
    kept = store.new_conversation(model="m")
    for conv in (gone, kept):
        store.add_turn(conv.id, "user", "hi")
        store.add_turn(conv.id, "assistant", "hello")
    store.delete(gone.id)
    assert raw(db_path, "SELECT conversation_id, COUNT(*) FROM turns GROUP BY 1") == [(kept.id, 2)]
    with pytest.raises(HistoryError, match="no conversation"):
        store.get(gone.id)
    with pytest.raises(HistoryError, match="no conversation"):
        store.delete(gone.id)


def test_update_reply_of_a_deleted_turn_is_an_error(store: History) -> None:
    conv = store.new_conversation(model="m")
    reply = store.start_reply(conv.id)
    store.drop_last_reply(conv.id)
    with pytest.raises(HistoryError, match=f"turn {reply.id} is gone"):
        store.update_reply(reply.id, "late text")


def test_export_markdown_and_json(store: History) -> None:
    conv = store.new_conversation(model="smollm2", system="Be kind.", title="Cooking")
    store.add_turn(conv.id, "user", "How do I boil an egg?")
    store.add_turn(conv.id, "assistant", "Put it in boiling water.", finish_reason="stop")
    store.add_turn(conv.id, "user", "And then?")
    cut = store.start_reply(conv.id)
    store.update_reply(cut.id, "Wait nine", finish_reason="interrupted")

    md = store.export(conv.id[:8], "md")
    assert md.startswith("# Cooking\n") and "smollm2" in md and conv.id in md
    sections = ["### System", "Be kind.", "### User", "How do I boil an egg?", "### Assistant",
                "Put it in boiling water.", "### User", "And then?", "### Assistant", "Wait nine",
                "*[interrupted]*"]
    positions = [md.index(s, md.index(sections[i - 1]) if i else 0) for i, s in enumerate(sections)]
    assert positions == sorted(positions)
    assert md.count("*[interrupted]*") == 1

    data = json.loads(store.export(conv.id, "json"))
    assert {k: data[k] for k in ("id", "title", "model", "system")} == {
        "id": conv.id, "title": "Cooking", "model": "smollm2", "system": "Be kind."}
    created = datetime.fromisoformat(data["created"])
    assert created.utcoffset() == timedelta(0) and abs(created.timestamp() - conv.created) < 1e-3
    assert [(t["role"], t["content"], t["finish_reason"]) for t in data["turns"]] == [
        ("user", "How do I boil an egg?", None), ("assistant", "Put it in boiling water.", "stop"),
        ("user", "And then?", None), ("assistant", "Wait nine", "interrupted")]
    assert all("T" in t["created"] for t in data["turns"])


# ---------------------------------------------------------------- migrations and damaged files


def test_a_fresh_or_empty_file_gets_the_whole_schema(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    db_path.touch()  # zero bytes: SQLite's empty database, schema 0
    with History(db_path) as h:
        h.add_turn(h.new_conversation(model="m").id, "user", "hi")
    assert raw(db_path, "PRAGMA user_version") == [(len(history.MIGRATIONS),)]
    assert raw(db_path, "PRAGMA journal_mode") == [("wal",)]


def test_schema_1_is_migrated_and_keeps_its_data(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    raw(db_path, *SCHEMA_1,
        "INSERT INTO conversations VALUES ('01hb2c3d4e5f', 'Old chat', 'gpt2', NULL, NULL, NULL, 1.0, 2.0)",
        "INSERT INTO turns (conversation_id, seq, role, content, created) VALUES ('01hb2c3d4e5f', 1, 'user', "
        "'from before', 1.5)")
    with History(db_path) as h:
        assert h.get("01HB2").title == "Old chat"
        assert h.add_turn("01hb2c3d4e5f", "assistant", "still here").seq == 2
        assert [t.content for t in h.turns("01hb2c3d4e5f")] == ["from before", "still here"]
    assert raw(db_path, "PRAGMA user_version") == [(len(history.MIGRATIONS),)]
    assert raw(db_path, "SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = 'conversations_updated'")


def test_a_failing_migration_changes_nothing(db_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    History(db_path).close()

    def broken(db: sqlite3.Connection) -> None:
        db.execute("CREATE TABLE half_done (x)")
        db.execute("ALTER TABLE no_such_table ADD COLUMN y")

    monkeypatch.setattr(history, "MIGRATIONS", [*history.MIGRATIONS, broken])
    with pytest.raises(HistoryError, match="no such table"):
        History(db_path)
    monkeypatch.undo()
    assert raw(db_path, "PRAGMA user_version") == [(len(history.MIGRATIONS),)]
    assert raw(db_path, "SELECT name FROM sqlite_master WHERE name = 'half_done'") == []


def test_a_database_from_a_newer_chatcli_is_refused_untouched(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    raw(db_path, "CREATE TABLE future (x)", "INSERT INTO future VALUES (1)", "PRAGMA user_version = 999")
    before = snapshot(db_path)
    time.sleep(0.01)
    with pytest.raises(HistoryError) as e:
        History(db_path)
    assert str(e.value).startswith("history.db was written by a newer chatcli (schema 999); upgrade chatcli")
    assert snapshot(db_path) == before
    assert sorted(p.name for p in db_path.parent.iterdir()) == ["history.db"]


@pytest.mark.parametrize("content", [
    pytest.param(b"\x00garbage" + bytes(range(256)) * 16, id="random-bytes"),
    pytest.param(b"SQLite format 3\x00" + b"\xff" * 4000, id="bad-header"),
    pytest.param(b'{"not": "a database"}\n', id="text"),
])
def test_a_damaged_file_is_reported_and_left_alone(db_path: Path, content: bytes) -> None:
    db_path.parent.mkdir(parents=True)
    db_path.write_bytes(content)
    before = snapshot(db_path)
    time.sleep(0.01)
    with pytest.raises(HistoryError) as e:
        History(db_path)
    message = str(e.value)
    assert str(db_path) in message and "damaged" in message and "Move it aside" in message
    assert snapshot(db_path) == before
    assert sorted(p.name for p in db_path.parent.iterdir()) == ["history.db"]


def test_a_lock_held_past_the_timeout_is_a_history_error(store: History, db_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    conv = store.new_conversation(model="m")
    monkeypatch.setattr(history, "BUSY_TIMEOUT_S", 0.2)
    with History(db_path) as impatient, closing(sqlite3.connect(db_path, isolation_level=None)) as other:
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(HistoryError, match="locked by another chatcli"):
            impatient.add_turn(conv.id, "user", "hello?")
        other.execute("ROLLBACK")
        assert impatient.add_turn(conv.id, "user", "hello!").seq == 1


# ---------------------------------------------------------------- crashes and concurrent writers

KILLED_MID_REPLY = """
import os, signal, sys
from chatcli.history import History
h = History()
conv = h.new_conversation(model="gpt2")
print(conv.id, flush=True)
h.add_turn(conv.id, "user", "Tell me a story")
reply = h.start_reply(conv.id, model="gpt2")
h.update_reply(reply.id, "Once upon")
h.update_reply(reply.id, "Once upon a time, there was")
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_kill_mid_reply_keeps_what_was_streamed(home: Path) -> None:
    child = run_child(KILLED_MID_REPLY)
    assert child.returncode == -signal.SIGKILL, child.stderr
    with History() as h:
        conv = h.get(child.stdout.strip())
        turns = h.turns(conv.id)
        assert [(t.role, t.content, t.finish_reason) for t in turns] == [
            ("user", "Tell me a story", None), ("assistant", "Once upon a time, there was", None)]
        assert "Once upon a time, there was\n\n*[interrupted]*" in h.export(conv.id, "md")


APPENDER = """
import sys, time
from chatcli.history import History
path, shared, worker, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
if shared == "-":  # race on opening (and creating) the database too
    sys.stdin.readline()
with History(path) as h:
    own = h.new_conversation(model="m", title="worker " + worker)
    print(own.id, flush=True)
    if shared == "-":
        shared = own.id
    else:
        sys.stdin.readline()  # the start barrier
    for i in range(count):
        h.add_turn(shared, "user", f"{worker}:{i}")
        h.add_turn(own.id, "assistant", f"{worker}:{i}")
        time.sleep(0.001)  # a breath between turns, as a real chat has, lets the writers interleave
"""


def run_appenders(db_path: Path, shared: str, workers: int, count: int) -> list[str]:
    """Start the workers, release them together, and return each one's own conversation id."""
    procs = [subprocess.Popen([sys.executable, "-c", APPENDER, str(db_path), shared, str(w), str(count)],
                              cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for w in range(workers)]
    own_ids = []
    try:
        if shared != "-":
            own_ids = [p.stdout.readline().strip() for p in procs]  # type: ignore[union-attr]
        for p in procs:
            p.stdin.write("go\n")  # type: ignore[union-attr]
            p.stdin.flush()  # type: ignore[union-attr]
        for p in procs:
            out, err = p.communicate(timeout=60)
            assert (p.returncode, err) == (0, ""), err
            own_ids += out.split()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return own_ids


def assert_complete(h: History, conversation_id: str, expected: set[str]) -> None:
    turns = h.turns(conversation_id)
    assert [t.seq for t in turns] == list(range(1, len(expected) + 1))
    contents = [t.content for t in turns]
    assert set(contents) == expected and len(contents) == len(expected)
    for worker in {c.split(":")[0] for c in expected}:  # each writer's turns keep its order
        mine = [int(c.split(":")[1]) for c in contents if c.split(":")[0] == worker]
        assert mine == sorted(mine)


def test_concurrent_writers_lose_and_collide_on_nothing(db_path: Path) -> None:
    workers, count = 4, 200
    with History(db_path) as h:
        shared = h.new_conversation(model="m", title="shared").id
    own_ids = run_appenders(db_path, shared, workers, count)
    with History(db_path) as h:
        assert_complete(h, shared, {f"{w}:{i}" for w in range(workers) for i in range(count)})
        writers = [t.content.split(":")[0] for t in h.turns(shared)]
        switches = sum(a != b for a, b in zip(writers, writers[1:], strict=False))
        assert switches > 50, "the writers took turns one after another: this test proved nothing"
        assert sorted(h.get(i).title or "" for i in own_ids) == [f"worker {w}" for w in range(workers)]
        for own in own_ids:
            worker = h.get(own).title.split()[1]  # type: ignore[union-attr]
            assert_complete(h, own, {f"{worker}:{i}" for i in range(count)})
        assert len(h.list(limit=100)) == workers + 1


def test_concurrent_first_opens_create_the_schema_once(db_path: Path) -> None:
    own_ids = run_appenders(db_path, "-", workers=4, count=20)
    with History(db_path) as h:
        assert len({h.get(i).id for i in own_ids}) == 4
        for own in own_ids:
            assert [t.seq for t in h.turns(own)] == list(range(1, 41))
    assert raw(db_path, "PRAGMA user_version") == [(len(history.MIGRATIONS),)]
