"""Sharing the CPU between chatcli processes that generate at the same time on one machine.

llama.cpp's OpenMP threads spin while they wait for each other. Two processes that each use every core
(`xargs -P2`, a chat in one terminal and a pipeline in another) preempt each other's spinning threads, and
both crawl: on 2 cores, 0.4-27 tok/s each against 110-137 alone. So each generating engine holds an advisory
lock on a file of its own in a folder that every chatcli process of this user on this machine sees (the user's
runtime dir, whatever CHATCLI_HOME says: the cores are the machine's), counts the other held
locks every few tokens, and runs with its share of the cores (`llama_set_n_threads`). Alone it keeps every
core. A process that dies drops its lock with it; its file is removed by the next one that looks.

Only the thread count is automatic: `--threads N` / `CHATCLI_THREADS` still mean exactly N.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CHECK_SECONDS = 0.25  # how often a generating engine looks for others: cheap (a listdir and a flock each)

try:
    import fcntl
except ImportError:  # Windows: no sharing; every engine keeps its own thread count
    fcntl = None  # type: ignore[assignment]


def share_of(cores: int, generating: int) -> int:
    """Threads for one of `generating` engines on `cores` cores: an even split, at least one."""
    return max(1, cores // max(1, generating))


class CoreShare:
    """The running engines of this user, as held locks in `folder`; one instance per engine."""

    def __init__(self, cores: int, folder: Path | None = None) -> None:
        self._folder = folder  # None: the user's runtime dir, found on first use
        self.cores = max(1, cores)
        self._fd: int | None = None
        self._name: str | None = None
        self._checked = 0.0
        self._threads = self.cores

    @contextmanager
    def generating(self) -> Iterator[CoreShare]:
        """Be counted while generating; `threads()` tells the share to use now."""
        self._enter()
        try:
            yield self
        finally:
            self._leave()

    def threads(self, *, force: bool = False) -> int:
        """This engine's share of the cores; recounted at most every CHECK_SECONDS unless `force`."""
        now = time.monotonic()
        if force or now - self._checked >= CHECK_SECONDS:
            self._checked = now
            self._threads = share_of(self.cores, 1 + self.others())
        return self._threads

    def others(self) -> int:
        """How many other engines are generating now (files whose lock is held); stale files are removed."""
        if fcntl is None:
            return 0
        try:
            names = os.listdir(self.folder)
        except OSError:
            return 0
        count = 0
        for name in names:
            if name == self._name or not name.endswith(".gen"):
                continue
            path = self.folder / name
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                count += 1  # held: that engine is generating
            except OSError:
                pass
            else:
                _unlink_quietly(path)  # left by a process that died, or one between generations
            finally:
                os.close(fd)
        return count

    @property
    def folder(self) -> Path:
        if self._folder is None:
            self._folder = runtime_dir() / "generating"
        return self._folder

    def _enter(self) -> None:
        if fcntl is None or self._fd is not None:
            return
        stem = f"{os.getpid()}-{id(self):x}"
        try:
            self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(self.folder / f"{stem}.new", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        except OSError:
            return  # no sharing: generate with the cores we have
        # locked before it is visible as .gen: an unlocked .gen file is always a dead one, safe to remove
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            os.replace(self.folder / f"{stem}.new", self.folder / f"{stem}.gen")
        except OSError:
            os.close(fd)
            return
        self._fd, self._name = fd, f"{stem}.gen"
        self._checked = 0.0

    def _leave(self) -> None:
        if self._fd is None or self._name is None:
            return
        _unlink_quietly(self.folder / self._name)
        os.close(self._fd)  # releases the lock
        self._fd = self._name = None


def runtime_dir() -> Path:
    """This user's private runtime folder for chatcli ($XDG_RUNTIME_DIR/chatcli, else a checked one in /tmp)."""
    import warnings

    import platformdirs

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "XDG_RUNTIME_DIR is not set": platformdirs then uses a checked fallback
        return Path(platformdirs.user_runtime_dir("chatcli"))


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass
