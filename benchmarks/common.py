"""Helpers shared by the benchmark scripts: same-run baselines, interleaved repetitions, medians, tables.

Every script compares a candidate with a baseline measured in the same run, alternating their order
(A B, B A, A B, ...) so that a machine that slows down or speeds up part-way hurts both alike, and
reports medians and RATIO lines. Absolute numbers are printed for context only.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
T = TypeVar("T")


def parser(description: str, *, reps: int, quick_reps: int) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help=f"fewer repetitions ({quick_reps} instead of {reps})")
    p.add_argument("--reps", type=int, default=None, help="repetitions of each variant (overrides --quick)")
    p.set_defaults(default_reps=reps, quick_reps=quick_reps)
    return p


def repetitions(args: argparse.Namespace) -> int:
    if args.reps is not None:
        return max(1, args.reps)
    return args.quick_reps if args.quick else args.default_reps


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def spread(values: Sequence[float]) -> str:
    """min..max, to show how noisy a median is."""
    return f"{min(values):.3g}..{max(values):.3g}" if values else "-"


class Contention:
    """How busy the CPUs were with other processes while each run went on (from /proc/stat, Linux only).

    others = (all busy CPU time - this process's and its children's CPU time) / (wall time x CPUs).
    A run with others well above 0 shared the machine: its timing says little.
    """

    def __init__(self) -> None:
        self.by_variant: dict[str, list[float]] = {}

    @staticmethod
    def _snapshot() -> tuple[float, float, float] | None:
        try:
            fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None
        hz = os.sysconf("SC_CLK_TCK")
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / hz  # all but idle and iowait
        own = sum(sum(resource.getrusage(who)[:2]) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
        return time.perf_counter(), busy, own

    def measure(self, name: str, fn: Callable[[], T]) -> T:
        before = self._snapshot()
        value = fn()
        after = self._snapshot()
        if before and after and after[0] > before[0]:
            others = (after[1] - before[1]) - (after[2] - before[2])
            self.by_variant.setdefault(name, []).append(
                max(0.0, others / ((after[0] - before[0]) * (os.cpu_count() or 1))))
        return value

    def median_percent(self, name: str) -> float | None:
        values = self.by_variant.get(name)
        return 100 * median(values) if values else None

    def warn(self, threshold: float = 0.15) -> None:
        worst = max((v for vs in self.by_variant.values() for v in vs), default=0.0)
        if worst > threshold:
            print(f"warning: other processes used up to {100 * worst:.0f}% of the CPUs during some runs: "
                  "these numbers are noisy; rerun when the machine is idle or with more --reps")


def interleaved(variants: dict[str, Callable[[], T]], reps: int,
                contention: Contention | None = None) -> dict[str, list[T]]:
    """Run every variant `reps` times, alternating the order each round; results by variant name."""
    names = list(variants)
    results: dict[str, list[T]] = {name: [] for name in names}
    for i in range(reps):
        for name in names if i % 2 == 0 else reversed(names):
            fn = variants[name]
            value = contention.measure(name, fn) if contention is not None else fn()
            results[name].append(value)
    return results


def run_timed(cmd: Sequence[str], env: dict[str, str], *, timeout: float = 600,
              capture: bool = True) -> tuple[float, subprocess.CompletedProcess[str]]:
    """Wall seconds of one subprocess run (fails loudly on a non-zero exit)."""
    started = time.perf_counter()
    proc = subprocess.run(list(cmd), env=env, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
                          stderr=subprocess.PIPE)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"benchmark command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return seconds, proc


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """The caller's environment without HF_*/CHATCLI_* settings, with a private chatcli home and HF cache."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "HUGGING_FACE", "HUGGINGFACE", "CHATCLI_"))}
    env.update({
        "CHATCLI_HOME": str(home / "chatcli"),
        "HF_HOME": str(home / "hf"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_XET": "1",
        "HF_ENDPOINT": "http://127.0.0.1:9",  # a closed port: no benchmark reaches the real Hub
        "PYTHONDONTWRITEBYTECODE": env.get("PYTHONDONTWRITEBYTECODE", ""),
    })
    if not env["PYTHONDONTWRITEBYTECODE"]:
        del env["PYTHONDONTWRITEBYTECODE"]
    env.update(extra)
    return env


@contextmanager
def scratch(prefix: str) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=f"chatcli-bench-{prefix}-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def chatcli_command() -> list[str]:
    """How a user runs chatcli: the installed console script (not a pyenv shim), else `python -m chatcli`."""
    script = Path(sysconfig.get_path("scripts")) / "chatcli"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "chatcli"]


def default_model() -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 the tests use (fetched once into ~/.cache/chatcli-test)."""
    sys.path.insert(0, str(TESTS))
    from conftest import smollm2_file

    return smollm2_file()


def load_fakehub():  # noqa: ANN201 - tests/fakehub.FakeHub
    sys.path.insert(0, str(TESTS))
    from fakehub import FakeHub

    return FakeHub


def print_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [[str(c) for c in header]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for n, row in enumerate(cells):
        padded = [c.rjust(w) if n and i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        print("  ".join(padded))
        if n == 0:
            print("  ".join("-" * w for w in widths))


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return "-" if value is None else str(value)


def paired_ratio(candidate: Sequence[float], baseline: Sequence[float]) -> float:
    """Median of the per-round ratios: each pair ran back to back, so it saw about the same machine."""
    return median([c / b for c, b in zip(candidate, baseline, strict=True) if b])


def ratio_line(name: str, value: float, target: str, ok: bool, paired: float | None = None) -> str:
    """`RATIO name: x.xx (target ...)`: value is the ratio of the medians; paired, when given, is shown too."""
    extra = f" [median of paired ratios {paired:.2f}]" if paired is not None else ""
    line = f"RATIO {name}: {value:.2f} (target {target}) {'ok' if ok else 'MISSED'}{extra}"
    print(line)
    return line


def note_machine() -> None:
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    print(f"# {os.cpu_count()} CPUs, load average {load:.2f} at start; medians of interleaved runs\n")
