"""A closed stdout (`| head`, `| true`) ends every command quietly with exit 0, and stops generation at once.

Each test makes the closed reader certain instead of likely: stdout is a pipe whose read end is closed before
chatcli starts (or a reader that closes after a few bytes), and the same command is first run with a working
stdout to show that it does write there, so the write really meets EPIPE.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from ggufgen import make_llama

CHATCLI = [sys.executable, "-m", "chatcli"]


def run_into_closed_pipe(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run chatcli with stdout a pipe that nobody will ever read: its first write fails with EPIPE."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run([*CHATCLI, *args], stdout=write_end, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                              text=True, env={**os.environ, **(env or {})}, timeout=120)
    finally:
        os.close(write_end)


def run_shell(pipeline: str) -> subprocess.CompletedProcess[str]:
    """A real shell pipeline; prints chatcli's own exit status (PIPESTATUS[0]) last on stdout."""
    script = f"{pipeline}; echo \"status=${{PIPESTATUS[0]}}\""
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=os.environ.copy(), timeout=120)


def _history_with_a_conversation() -> None:
    from chatcli.history import History

    with History() as store:
        for n in range(3):
            conversation = store.new_conversation(model="tiny")
            store.add_turn(conversation.id, "user", f"question {n}")
            store.add_turn(conversation.id, "assistant", f"answer {n}")


COMMANDS = {
    "help": ["--help"],
    "subcommand help": ["complete", "--help"],
    "version": ["--version"],
    "config show": ["config", "show"],
    "config show --json": ["config", "show", "--json"],
    "list --available": ["list", "--available"],
    "list --json": ["list", "--json"],
    "history list": ["history", "list"],
    "history list --json": ["history", "list", "--json"],
    "show": ["show", "{model}"],
    "show --json": ["show", "{model}", "--json"],
    "complete": ["complete", "-m", "{model}", "hello", "-n", "8", "--temperature", "0"],
    "complete --json": ["complete", "-m", "{model}", "hello", "-n", "4", "--temperature", "0", "--json"],
    "complete --jsonl": ["complete", "-m", "{model}", "hello", "-n", "4", "--temperature", "0", "--jsonl"],
}


@pytest.mark.parametrize("args", COMMANDS.values(), ids=COMMANDS.keys())
def test_a_closed_stdout_exits_0_quietly(args: list[str], tiny_gpt2: Path) -> None:
    _history_with_a_conversation()
    args = [a.format(model=tiny_gpt2) for a in args]
    working = subprocess.run([*CHATCLI, *args], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                             env=os.environ.copy(), timeout=120)
    assert working.returncode == 0, working.stderr
    assert working.stdout.strip(), "the command must write to stdout for this test to mean anything"
    closed = run_into_closed_pipe(*args)
    assert closed.returncode == 0, closed.stderr
    assert closed.stderr == ""  # no traceback, no "Exception ignored ... BrokenPipeError" at exit


@pytest.mark.parametrize("pipeline", [
    "{chatcli} config show | true",
    "{chatcli} --help | head -1 >/dev/null",
    "{chatcli} list --available | head -1 >/dev/null",
    "{chatcli} history list | head -1 >/dev/null",
    "{chatcli} show {model} | head -1 >/dev/null",
    "{chatcli} complete -m {model} hello -n 50 --temperature 0 | head -c 5 >/dev/null",
])
def test_shell_pipelines_into_head_exit_0(pipeline: str, tiny_gpt2: Path) -> None:
    _history_with_a_conversation()
    result = run_shell(pipeline.format(chatcli=" ".join(CHATCLI), model=tiny_gpt2))
    assert result.stdout.strip().endswith("status=0"), result.stderr
    assert result.stderr == ""


def test_errors_still_go_to_stderr_with_their_exit_code_when_stdout_is_closed() -> None:
    closed = run_into_closed_pipe("show", "no/such-model-GGUF")
    assert closed.returncode == 1
    assert closed.stderr.startswith("error: ")


# ---------------------------------------------------------------- generation stops when the reader goes


@pytest.fixture(scope="module")
def long_context_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny llama with a long context window (RoPE: no position table), so a completion can run for seconds."""
    return make_llama(tmp_path_factory.mktemp("long") / "long-llama.gguf", n_ctx=16384, n_embd=256, n_layer=4,
                      seed=3)


def _timed(cmd: list[str], stdout: int) -> float:
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=stdout, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            env=os.environ.copy())
    if stdout != subprocess.DEVNULL:
        os.close(stdout)
    _out, err = proc.communicate(timeout=300)
    took = time.monotonic() - started
    assert proc.returncode == 0 and err == b"", err.decode()
    return took


def test_generation_stops_when_the_reader_goes_away(long_context_model: Path) -> None:
    """`complete -n N | head -c 5`: the process ends soon after head leaves, not after generating all N tokens.

    Measured against itself in the same test: the same command to a working stdout takes `full` seconds, of
    which `decoding` is spent generating. Stopping at once means the cut run takes about `full - decoding`;
    generating on (for instance if a closed stdout were ignored) would take about `full`.
    """
    n_tokens = 4000  # long enough that decoding dominates start-up even on a fast, idle machine (~1,200 tok/s)
    cmd = [*CHATCLI, "complete", "-m", str(long_context_model), "hello", "-n", str(n_tokens), "--temperature", "0",
           "--threads", "1", "--ctx-size", "8192"]
    started = time.monotonic()
    whole = subprocess.run([*cmd, "--json"], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                           env=os.environ.copy(), timeout=300)
    full = time.monotonic() - started
    assert whole.returncode == 0, whole.stderr
    summary = json.loads(whole.stdout)
    assert summary["completion_tokens"] == n_tokens and summary["finish_reason"] == "length"
    decoding = summary["timings"]["decode_seconds"]
    assert decoding > 0.6 * full, f"decoding must dominate for the comparison to mean anything: {summary}"

    read_end, write_end = os.pipe()
    received = bytearray()

    def head() -> None:  # like `head -c 5`: read a few bytes, then close the pipe
        while len(received) < 5:
            chunk = os.read(read_end, 5 - len(received))
            if not chunk:
                break
            received.extend(chunk)
        os.close(read_end)

    reader = threading.Thread(target=head)
    reader.start()
    cut = _timed(cmd, write_end)
    reader.join(timeout=10)
    assert len(received) == 5
    # Stopping at once: cut ~ full - decoding (< 0.4 full). Generating on: cut ~ full.
    assert cut < full - 0.5 * decoding, f"cut run {cut:.2f}s vs whole run {full:.2f}s ({decoding:.2f}s decoding)"
