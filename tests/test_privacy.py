"""chatcli's own folders are private on POSIX: folders 0700, files 0600, also what an older version left open."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest

from chatcli import paths

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX modes")


def open_modes(root: Path) -> list[str]:
    """Every folder not 0700 and every file readable or writable by group or others, under root."""
    found = []
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            mode = stat.S_IMODE(os.lstat(Path(folder, name)).st_mode)
            if mode != 0o700:
                found.append(f"{Path(folder, name)} {mode:o}")
        for name in files:
            mode = stat.S_IMODE(os.lstat(Path(folder, name)).st_mode)
            if mode & 0o077:
                found.append(f"{Path(folder, name)} {mode:o}")
    return found


def test_after_a_real_chat_nothing_of_chatclis_is_open_to_others(chatcli, tiny_llama: Path, home: Path) -> None:
    lines = "/set temperature 0\n/set max_tokens 8\n" + "".join(
        f"tell me about the river and the snow in the morning, part {i}\n" for i in range(3))
    old_umask = os.umask(0o022)  # the usual umask: what chatcli does not set itself would come out 0644
    try:
        result = chatcli("chat", "-m", str(tiny_llama), "--system", "You are terse.", input=lines)
        assert result.returncode == 0, result.stderr
        setting = chatcli("config", "set", "threads", "1")
        assert setting.returncode == 0, setting.stderr
    finally:
        os.umask(old_umask)
    data, cache, config = home / "data", home / "cache", home / "config"
    assert list((cache / "snapshots").glob("*.state")), "the chat saved no snapshot: nothing was checked"
    assert (data / "history.db").is_file() and (config / "config.toml").is_file()
    for kind in (data, cache, config):
        assert stat.S_IMODE(kind.stat().st_mode) == 0o700, kind
        assert open_modes(kind) == []


def test_existing_folders_and_files_are_tightened_on_first_use(home: Path) -> None:
    data = home / "data"
    (data / "old").mkdir(parents=True)
    os.chmod(data, 0o755)
    db = data / "history.db"
    db.write_bytes(b"")
    for path in (db, data / "history.db-wal", data / "input_history", data / "old" / "notes"):
        path.write_bytes(b"") if not path.exists() else None
        os.chmod(path, 0o644)
    os.chmod(data / "old", 0o755)
    assert paths.data_dir() == data
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert open_modes(data) == []
    assert stat.S_IMODE(db.stat().st_mode) == 0o600


def test_history_db_is_created_private_and_sqlite_keeps_that_for_its_wal(home: Path) -> None:
    from chatcli.history import History

    old_umask = os.umask(0o022)
    try:
        with History() as history:
            conversation = history.new_conversation(model="m", system=None, template=None, settings={})
            history.add_turn(conversation.id, "user", "hello", model="m")
            written = sorted(p.name for p in (home / "data").iterdir())
            assert "history.db-wal" in written and "history.db-shm" in written
            assert open_modes(home / "data") == []
    finally:
        os.umask(old_umask)


def test_a_history_db_left_open_is_tightened_when_opened(tmp_path: Path) -> None:
    from chatcli.history import History

    db = tmp_path / "elsewhere" / "history.db"
    History(db).close()
    os.chmod(db, 0o644)
    History(db).close()
    assert stat.S_IMODE(db.stat().st_mode) == 0o600


def test_links_and_the_hugging_face_cache_are_left_alone(home: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    shared = tmp_path / "shared.gguf"
    shared.write_bytes(b"x")
    os.chmod(shared, 0o644)
    hub = home / "cache" / "hf-inside" / "hub"
    hub.mkdir(parents=True)
    os.chmod(hub, 0o755)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    (home / "cache" / "model.gguf").symlink_to(shared)
    paths.cache_dir()
    assert stat.S_IMODE(shared.stat().st_mode) == 0o644
    assert stat.S_IMODE(hub.stat().st_mode) == 0o755
    assert stat.S_IMODE((home / "cache").stat().st_mode) == 0o700


def test_input_history_file_is_created_private(home: Path) -> None:
    old_umask = os.umask(0o022)
    try:
        path = paths.private_file(paths.data_dir() / "input_history")
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.write_text("kept\n")
    os.chmod(path, 0o644)
    paths.private_file(path)
    assert path.read_text() == "kept\n" and stat.S_IMODE(path.stat().st_mode) == 0o600
