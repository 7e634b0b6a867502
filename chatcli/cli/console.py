"""Terminal output helpers: the stderr console, the download progress bar, human-readable numbers.

rich is imported only when something is shown, so `chatcli --help` stays fast.
"""

from __future__ import annotations

import sys
import time
from functools import cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress, TaskID


@cache
def err() -> Console:
    """The one console for status, warnings and errors (stderr)."""
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


@cache
def out() -> Console:
    """A console on stdout, for tables the user asked for."""
    from rich.console import Console

    # Piped tables are for reading in a pager or grep: don't wrap them at 80 columns.
    return Console(highlight=False, soft_wrap=False, width=None if sys.stdout.isatty() else 200)


def print_table(table: object) -> None:
    """Print a rich table on stdout without the trailing spaces rich pads cells with (kinder to pipes)."""
    console = out()
    with console.capture() as captured:
        console.print(table)
    sys.stdout.write("".join(line.rstrip() + "\n" for line in captured.get().splitlines()))
    sys.stdout.flush()


def stderr_is_tty() -> bool:
    return sys.stderr.isatty()


def info(message: str) -> None:
    err().print(message, markup=False)


def warn(message: str) -> None:
    err().print(f"[yellow]warning:[/yellow] {_escape(message)}")


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def size(n: int | float | None) -> str:
    from chatcli.units import human_bytes

    return "-" if n is None else human_bytes(n)


def count(n: int | None) -> str:
    """Parameter counts the way model cards write them: 135M, 1.2B."""
    if not n:
        return "-"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            value = n / scale
            return f"{value:.1f}{unit}" if value < 10 else f"{value:.0f}{unit}"
    return str(n)


def ago(timestamp: float | None) -> str:
    if not timestamp:
        return "never"
    seconds = max(0.0, time.time() - timestamp)
    for unit, scale in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= scale:
            value = int(seconds // scale)
            return f"{value} {unit}{'s' if value != 1 else ''} ago"
    return "just now"


class DownloadBar:
    """A rich progress bar on stderr (bytes, speed, ETA); silent when stderr is not a terminal."""

    def __init__(self) -> None:
        self._progress: Progress | None = None
        self._task: TaskID | None = None

    def start(self, name: str, total: int, done: int) -> None:
        if not stderr_is_tty():
            return
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        if self._progress is None:
            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=err(),
                transient=False,
            )
            self._progress.start()
        label = name if done == 0 else f"{name} (resuming)"
        self._task = self._progress.add_task(label, total=total, completed=done)

    def note(self, message: str) -> None:
        info(message)

    def advance(self, nbytes: int) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.advance(self._task, nbytes)

    def finish(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
            self._task = None
