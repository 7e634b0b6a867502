"""`chatcli chat` in a real pseudo-terminal (pexpect) with the real SmolLM2: type, stream, Ctrl-C, leave, resume."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pexpect  # a test dependency: missing, it fails this file instead of skipping it
import pytest

from chatcli.history import History

pytestmark = pytest.mark.real_model


def spawn(*args: str):  # noqa: ANN201
    # pexpect is not a terminal emulator: it cannot answer prompt_toolkit's cursor-position requests
    env = {**os.environ, "TERM": "xterm-256color", "PROMPT_TOOLKIT_NO_CPR": "1"}
    child = pexpect.spawn(sys.executable, ["-m", "chatcli", "chat", *args], env=env, encoding="utf-8",
                          timeout=60, dimensions=(30, 100))
    return child


def test_type_stream_interrupt_exit_and_continue(smollm2: Path, home: Path) -> None:
    child = spawn("-m", str(smollm2))
    child.expect("chatting with")
    child.expect(">")
    child.sendline("/set max_tokens 2000")
    child.expect("max_tokens = 2000")
    child.sendline("Write a very long story about a dragon who learns to bake bread.")
    # The reply streams, and is saved while it streams: wait until the stored partial reply has some words.
    partial = ""
    deadline = time.monotonic() + 60
    while len(partial.split()) < 5 and time.monotonic() < deadline:
        time.sleep(0.2)
        with History() as store:
            latest = store.latest()
            turns = store.turns(latest.id) if latest else []
        partial = turns[1].content if len(turns) > 1 else ""
    assert len(partial.split()) >= 5
    child.expect(partial.split()[3])  # ... and those words were on the screen
    child.sendintr()  # Ctrl-C mid-reply
    child.expect(r"\[interrupted\]", timeout=30)
    child.expect(">")
    child.sendline("/exit")
    child.expect(pexpect.EOF, timeout=30)
    child.close()
    assert child.exitstatus == 0

    with History() as store:
        conversation = store.latest()
        turns = store.turns(conversation.id)
    assert turns[0].content.startswith("Write a very long story")
    assert turns[1].finish_reason == "interrupted" and turns[1].content.startswith(partial)

    child = spawn("--continue")
    child.expect(f"continuing conversation {conversation.id}")
    child.expect(">")
    child.sendline("/exit")
    child.expect(pexpect.EOF, timeout=30)
    child.close()
    assert child.exitstatus == 0


def test_sigint_stops_a_piped_chat_with_130_and_keeps_the_partial_reply(smollm2: Path, home: Path) -> None:
    import signal
    import subprocess

    proc = subprocess.Popen([sys.executable, "-m", "chatcli", "chat", "-m", str(smollm2)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=os.environ.copy())
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(b"/set max_tokens 3000\nWrite a very long story about a lighthouse keeper.\nSecond question\n")
    proc.stdin.close()
    proc.stdin = None  # closed: communicate() must not flush it
    shown = proc.stdout.read(40)  # the reply is streaming
    proc.send_signal(signal.SIGINT)
    rest, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert b"Traceback" not in err
    with History() as store:
        turns = store.turns(store.latest().id)
    assert [t.role for t in turns] == ["user", "assistant"]  # the second line was never sent
    assert turns[1].finish_reason == "interrupted"
    assert (shown + rest).decode(errors="replace").strip().startswith(turns[1].content.strip()[:30])
