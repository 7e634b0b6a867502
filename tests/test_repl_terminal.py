"""`chatcli chat` in a real pseudo-terminal, read through a terminal emulator (pyte), on a tiny generated model.

What the user sees is checked against what history stored: a reply longer than the screen, one stopped with
Ctrl-C, a message typed over two lines with Alt+Enter. The Markdown live view and the toolbar run here as they
do for a user (prompt_toolkit's cursor-position requests are answered, as a terminal would).
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

import gguf
import pexpect  # a test dependency: if it is missing, this file fails rather than skips
import pyte
import pytest
from ggufgen import CHATML_TEMPLATE, ENDOFTEXT, IM_END, IM_START, bytes_to_unicode, make_llama, make_vocab

COLUMNS, ROWS = 80, 12


def make_babbler(path: Path, n_ctx: int = 4096) -> Path:
    """A tiny llama (ChatML template) that writes only lower-case letters, spaces and newlines, and never stops.

    Every token embedding gets a large first component, +10 for those tokens and -10 for the others: that
    component dominates the hidden state after the final norm, and through the tied output head the logits,
    so the model babbles text whose Markdown is plain paragraphs, never markup or control characters.
    """
    make_llama(path, n_ctx=n_ctx, chat_template=CHATML_TEMPLATE, name="babbler")
    tokens, _, _ = make_vocab([ENDOFTEXT, IM_START, IM_END])  # make_llama's vocabulary
    byte_char = bytes_to_unicode()
    space, newline = byte_char[ord(" ")], byte_char[ord("\n")]
    reader = gguf.GGUFReader(path, "r+")
    [embeddings] = [t for t in reader.tensors if t.name == "token_embd.weight"]
    rows = embeddings.data  # numpy (n_vocab, n_embd), a writable view of the file
    for i, token in enumerate(tokens):
        word = token.replace(space, "")
        wanted = token in (space, newline) or (word.isascii() and word.isalpha() and word.islower())
        rows[i, 0] = 10.2 if token == space else 10.0 if wanted else -10.0  # a few more spaces: shorter words
    del rows, embeddings, reader  # flushes the memory map
    return path


@pytest.fixture(scope="module")
def babbler(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_babbler(tmp_path_factory.mktemp("babbler") / "babbler.gguf")


class _Screen(pyte.HistoryScreen):
    """A screen that keeps the lines scrolled off its top and answers the program's queries like a terminal."""

    def __init__(self, answer: Callable[[str], None]) -> None:
        super().__init__(COLUMNS, ROWS, history=5000)
        self._answer = answer

    def write_process_input(self, data: str) -> None:  # pyte's hook: e.g. the reply to "where is the cursor?"
        self._answer(data)


class Terminal:
    """chatcli in a COLUMNS x ROWS pseudo-terminal, its output fed to a terminal emulator."""

    def __init__(self, *args: str) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
        env |= {"TERM": "xterm-256color", "CHATCLI_THREADS": "1"}  # one thread: 2 shared cores stay usable
        self.child = pexpect.spawn(sys.executable, ["-m", "chatcli", *args], env=env, dimensions=(ROWS, COLUMNS))
        self.screen = _Screen(lambda data: self.child.send(data.encode()))
        self.stream = pyte.ByteStream(self.screen)

    def pump(self, seconds: float = 0.05) -> None:
        try:
            self.stream.feed(self.child.read_nonblocking(65536, timeout=seconds))
        except pexpect.TIMEOUT:
            pass

    def type(self, keys: str) -> None:
        self.child.send(keys.encode())

    def rows(self) -> list[str]:
        return [line.rstrip() for line in self.screen.display]

    def transcript(self) -> list[str]:
        """Every line shown: those scrolled off the top, then the screen."""
        scrolled = ["".join(line[x].data for x in range(COLUMNS)).rstrip() for line in self.screen.history.top]
        return scrolled + self.rows()

    def wait_for(self, ready: Callable[[], bool], what: str, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; the screen:\n" + "\n".join(self.rows()))
            self.pump()

    def at_prompt(self, conversation: bool = True) -> bool:
        """The prompt is up, with its toolbar on the bottom row (once a conversation exists, it shows its id)."""
        bottom = self.rows()[-1]
        return "· context " in bottom and (not conversation or "· new ·" not in bottom)

    def on_screen(self, text: str) -> bool:
        return any(text in row for row in self.rows())

    def lines_after(self, line: str) -> int:
        """How many lines have been shown below `line` (0 before it is shown)."""
        transcript = self.transcript()
        return len(transcript) - 1 - transcript.index(line) if line in transcript else 0


def between(lines: list[str], first: str, end: Callable[[str], bool]) -> list[str]:
    """The lines after the last one equal to `first`, up to the first line that `end` accepts."""
    start = max(i for i, line in enumerate(lines) if line == first) + 1
    stop = next(i for i in range(start, len(lines)) if end(lines[i]))
    return lines[start:stop]


def letters(text: str) -> str:
    return re.sub(r"\s+", "", text)


def test_replies_on_screen_are_the_stored_replies(babbler: Path, chatcli) -> None:
    term = Terminal("chat", "-m", str(babbler))
    term.wait_for(lambda: term.at_prompt(conversation=False), "the prompt and its toolbar")
    assert term.rows()[-1].startswith(" babbler.gguf · context 0/")
    term.type("/set seed 7\r")
    term.wait_for(lambda: term.on_screen("seed = 7"), "/set seed")
    term.type("/set max_tokens 700\r")
    term.wait_for(lambda: term.on_screen("max_tokens = 700"), "/set max_tokens")

    # 1. A reply longer than the screen, streamed through the live Markdown view; Enter pressed meanwhile.
    term.type("tell me a story\r")
    term.wait_for(lambda: term.lines_after("> tell me a story") > 3, "the reply to stream")
    term.type("\r")  # typed ahead: not echoed into the live view, and an empty line at the next prompt
    term.wait_for(term.at_prompt, "the reply to end")
    first = between(term.transcript(), "> tell me a story", lambda line: line.startswith("(reply cut at 700"))
    assert len(first) > ROWS  # longer than the screen

    # 2. Ctrl-C while the live view fills the screen.
    term.type("/set max_tokens 3000\r")
    term.wait_for(lambda: term.on_screen("max_tokens = 3000"), "/set max_tokens")
    term.type("another story\r")
    # the live view (at most ROWS - 3 lines) has reached the bottom of the screen, and the reply goes on
    term.wait_for(lambda: term.lines_after("> another story") >= ROWS - 3 and not term.at_prompt(),
                  "the second reply to fill the screen")
    term.child.sendintr()
    term.wait_for(lambda: term.on_screen("[interrupted]") and term.at_prompt(), "the interrupted reply")
    second = between(term.transcript(), "> another story", lambda line: line == "[interrupted]")

    # 3. Two lines in one message (Alt+Enter = Esc then Enter), then leave.
    term.type("/set max_tokens 30\r")
    term.wait_for(lambda: term.on_screen("max_tokens = 30"), "/set max_tokens")
    term.type("first line\x1b\rsecond line\r")
    term.wait_for(lambda: term.on_screen("(reply cut at 30") and term.at_prompt(), "the third reply")
    transcript = term.transcript()
    assert transcript[transcript.index("> first line") + 1].strip() == "second line"
    term.type("/exit\r")
    term.child.expect(pexpect.EOF, timeout=30)
    term.child.close()
    assert term.child.exitstatus == 0

    [row] = json.loads(chatcli("history", "list", "--json").stdout)
    turns = json.loads(chatcli("history", "export", row["id"], "--format", "json").stdout)["turns"]
    assert [t["content"] for t in turns if t["role"] == "user"] == [
        "tell me a story", "another story", "first line\nsecond line"]
    replies = [t for t in turns if t["role"] == "assistant"]
    assert [t["finish_reason"] for t in replies] == ["length", "interrupted", "length"]
    assert 0 < replies[1]["completion_tokens"] < 3000
    # What the screen shows between the message and the next line is the stored reply, and nothing else: no
    # fragment of the live view left above it. (Markdown re-wraps lines: compare all but whitespace.)
    assert letters("".join(first)) == letters(replies[0]["content"])
    assert letters("".join(second)) == letters(replies[1]["content"])
