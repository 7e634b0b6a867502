"""Files in a prompt: `-f PATH` on complete and chat, `/file PATH` in the REPL.

Through the real CLI on the tiny models (n_ctx 256, so "too large" is a few hundred words), and the REPL command
through prompt_toolkit's pipe input on the fake engine (one token per character, so counts are exact).
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
from fake_engine import FakeEngine
from test_chat import make_session

from chatcli import attachments
from chatcli.attachments import Attachment
from chatcli.errors import ContextOverflowError, UsageError
from chatcli.history import History


@pytest.fixture
def history(home: Path):  # noqa: ANN201
    with History() as store:
        yield store


@pytest.fixture
def files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """Files in the current folder, named by relative paths (the tiny models' 256 tokens are soon used up)."""
    monkeypatch.chdir(tmp_path)
    made = {
        "notes.txt": "Meeting at noon.\nBring the report.\n",
        "todo.md": "- call Ann\n- fix the build",  # no final newline
        "big.txt": "word " * 2000,
    }
    out = {}
    for name, text in made.items():
        out[name] = Path(name)
        out[name].write_text(text, encoding="utf-8")
    out["binary.bin"] = Path("binary.bin")
    out["binary.bin"].write_bytes(b"\x7fELF\x02\x01\x00\x00binary")
    out["latin1.txt"] = Path("latin1.txt")
    out["latin1.txt"].write_bytes("café au lait\n".encode("latin-1"))
    out["utf16.txt"] = Path("sub") / "utf16.txt"
    out["utf16.txt"].parent.mkdir()
    out["utf16.txt"].write_text("hello\n", encoding="utf-16")
    return out


# ---------------------------------------------------------------- reading and the block format


def test_each_file_is_a_block_under_a_line_naming_it(files: dict[str, Path]) -> None:
    notes, todo = attachments.read(str(files["notes.txt"])), attachments.read(str(files["todo.md"]))
    assert attachments.join([notes, todo], "What do I do today?") == (
        f"--- file: {files['notes.txt']} ---\nMeeting at noon.\nBring the report.\n"
        f"--- end of file: {files['notes.txt']} ---\n\n"
        f"--- file: {files['todo.md']} ---\n- call Ann\n- fix the build\n--- end of file: {files['todo.md']} ---\n\n"
        "What do I do today?"
    )
    assert attachments.join([notes], None) == notes.block()
    cut = Attachment("x.txt", "abc", cut=(3, 1200))
    assert cut.block() == "--- file: x.txt ---\nabc\n--- end of file: x.txt (cut: its first 3 of 1,200 tokens) ---"


def test_what_is_not_utf8_text_is_refused_in_one_line(files: dict[str, Path], tmp_path: Path) -> None:
    cases = {
        "binary.bin": "it is a binary file, not text",
        "latin1.txt": "not UTF-8 text (byte 0xe9 at offset 3)",
        "utf16.txt": "it is UTF-16 text; convert it to UTF-8 first",
    }
    for name, why in cases.items():
        with pytest.raises(UsageError, match=re.escape(why)) as info:
            attachments.read(str(files[name]))
        assert "\n" not in str(info.value)
    with pytest.raises(UsageError, match="no such file"):
        attachments.read(str(tmp_path / "missing.txt"))
    with pytest.raises(UsageError, match="it is a folder"):
        attachments.read(str(tmp_path))
    bom = tmp_path / "bom.txt"
    bom.write_bytes(b"\xef\xbb\xbfhello")
    assert attachments.read(str(bom)).text == "hello"  # a UTF-8 byte order mark is not part of the text


def test_a_file_past_the_read_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attachments, "MAX_BYTES", 9)
    huge = tmp_path / "huge.txt"
    huge.write_text("abcdefghé and much more", encoding="utf-8")  # é's two bytes straddle the limit
    with pytest.raises(ContextOverflowError, match="huge.txt is over"):
        attachments.read(str(huge))
    assert attachments.read(str(huge), truncate=True).text == "abcdefgh"  # the split character is dropped


def test_fit_refuses_with_the_largest_files_token_count_or_cuts_later_files_first() -> None:
    engine = FakeEngine(n_ctx=100)  # one token per character
    first, second = Attachment("a.txt", "A" * 30), Attachment("b.txt", "B" * 90)

    def fits(chosen: list[Attachment]) -> bool:
        return len(attachments.join(chosen, "Q?")) <= 200  # a block's two lines take 50 to 80

    with pytest.raises(ContextOverflowError, match=r"^b.txt is 90 tokens \(with 1 more file\(s\)\): that does not "):
        attachments.fit([first, second], fits, engine, truncate=False)
    kept, notes = attachments.fit([first, second], fits, engine, truncate=True)
    assert kept[0] == first and kept[1].cut == (len(kept[1].text), 90) and fits(kept)
    assert not fits([first, Attachment("b.txt", kept[1].text + "B", cut=kept[1].cut)])  # as much as fits, no less
    assert notes == [f"b.txt cut to its first {len(kept[1].text)} of 90 tokens to fit the context window (--truncate)"]
    kept, notes = attachments.fit([second, first], lambda c: len(attachments.join(c, "")) <= 80, engine,
                                  truncate=True)
    assert [f.name for f in kept] == ["b.txt"] and "a.txt (30 tokens) left out" in notes[1]


# ---------------------------------------------------------------- complete -f


def test_complete_puts_the_files_before_the_prompt(chatcli, tiny_llama: Path, files: dict[str, Path]) -> None:
    args = ("complete", "-m", str(tiny_llama), "-n", "2", "--temperature", "0", "--json")
    plain = json.loads(chatcli(*args, "Summary:").stdout)
    result = chatcli(*args, "--echo", "-f", str(files["notes.txt"]), "-f", str(files["todo.md"]), "Summary:")
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    expected = attachments.join([attachments.read(str(files["notes.txt"])), attachments.read(str(files["todo.md"]))],
                                "Summary:")
    assert reply["prompt"] == expected
    assert reply["prompt_tokens"] > plain["prompt_tokens"] + 20


def test_complete_with_a_file_and_stdin(chatcli, tiny_llama: Path, files: dict[str, Path]) -> None:
    result = chatcli("complete", "-m", str(tiny_llama), "-n", "1", "--json", "--echo", "-f", str(files["todo.md"]),
                     "And?", input="piped text\n")
    assert result.returncode == 0, result.stderr
    prompt = json.loads(result.stdout)["prompt"]
    assert prompt.startswith(f"--- file: {files['todo.md']} ---\n") and prompt.endswith("\n\npiped text\n\nAnd?")
    alone = chatcli("complete", "-m", str(tiny_llama), "-n", "1", "--json", "--echo", "-f", str(files["todo.md"]))
    assert alone.returncode == 0 and json.loads(alone.stdout)["prompt"] == attachments.read(
        str(files["todo.md"])).block()  # a file is a prompt on its own


def test_complete_refuses_a_binary_file_before_loading(chatcli, tiny_llama: Path, files: dict[str, Path]) -> None:
    result = chatcli("complete", "-m", str(tiny_llama), "-f", str(files["binary.bin"]), "hi")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [f"error: cannot attach {files['binary.bin']}: it is a binary file, "
                                                  "not text"]


def test_complete_a_file_too_large_for_the_context_exits_3(chatcli, tiny_llama: Path,
                                                           files: dict[str, Path]) -> None:
    result = chatcli("complete", "-m", str(tiny_llama), "-f", str(files["big.txt"]), "Summary:")
    assert result.returncode == 3 and result.stdout == ""
    [line] = result.stderr.strip().splitlines()
    count = re.search(rf"{re.escape(str(files['big.txt']))} is ([\d,]+) tokens: that does not fit the context window "
                      r"\(256 tokens", line)
    assert count and int(count.group(1).replace(",", "")) > 256 and "--truncate" in line


def test_complete_truncate_cuts_the_file_keeps_the_question_and_says_so(chatcli, tiny_llama: Path,
                                                                       files: dict[str, Path]) -> None:
    result = chatcli("complete", "-m", str(tiny_llama), "-n", "4", "--json", "--echo", "--truncate",
                     "-f", str(files["big.txt"]), "Summary:")
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    assert 200 < reply["prompt_tokens"] <= 256 - 4  # as much of the file as fits, with room for 4 tokens
    assert reply["prompt"].startswith(f"--- file: {files['big.txt']} ---\nword word")
    assert re.search(r"--- end of file: .*big.txt \(cut: its first [\d,]+ of [\d,]+ tokens\) ---\n\nSummary:$",
                     reply["prompt"])
    assert re.search(r"warning: .*big.txt cut to its first [\d,]+ of [\d,]+ tokens to fit the context window "
                     r"\(--truncate\)", result.stderr)


# ---------------------------------------------------------------- chat -f


def test_chat_file_goes_with_the_first_message_and_history_keeps_what_was_sent(
        chatcli, tiny_llama: Path, files: dict[str, Path]) -> None:
    result = chatcli("chat", "-m", str(tiny_llama), "-n", "2", "-f", str(files["notes.txt"]),
                     input="When is the meeting?\nThanks.\n")
    assert result.returncode == 0, result.stderr
    [row] = json.loads(chatcli("history", "list", "--json").stdout)
    exported = json.loads(chatcli("history", "export", row["id"], "--format", "json").stdout)
    sent = [t["content"] for t in exported["turns"] if t["role"] == "user"]
    assert sent == [attachments.join([attachments.read(str(files["notes.txt"]))], "When is the meeting?"), "Thanks."]


def test_chat_a_file_too_large_exits_3_before_the_chat_starts(chatcli, tiny_llama: Path,
                                                              files: dict[str, Path]) -> None:
    result = chatcli("chat", "-m", str(tiny_llama), "-f", str(files["big.txt"]), input="hi\n")
    assert result.returncode == 3 and result.stdout == ""
    assert re.search(r"big.txt is [\d,]+ tokens: that does not fit the context window \(256 tokens", result.stderr)
    assert json.loads(chatcli("history", "list", "--json").stdout) == []  # nothing was sent, nothing stored
    cut = chatcli("chat", "-m", str(tiny_llama), "-n", "2", "--truncate", "-f", str(files["big.txt"]),
                  input="Summarise it.\n")
    assert cut.returncode == 0, cut.stderr
    assert len(re.findall(r"big.txt cut to its first [\d,]+ of [\d,]+ tokens", cut.stderr)) == 1


def test_chat_refuses_non_utf8_files_in_one_line(chatcli, tiny_llama: Path, files: dict[str, Path]) -> None:
    result = chatcli("chat", "-m", str(tiny_llama), "-f", str(files["latin1.txt"]), input="hi\n")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: cannot attach {files['latin1.txt']}: not UTF-8 text (byte 0xe9 at offset 3); convert it first, "
        "e.g. iconv -f latin1 -t UTF-8"]


# ---------------------------------------------------------------- /file in the REPL


def run_repl(session, keys: str, **kwargs) -> tuple[str, str]:  # noqa: ANN001
    from prompt_toolkit.input import create_pipe_input
    from prompt_toolkit.output import DummyOutput
    from rich.console import Console

    from chatcli.cli.repl import Repl

    out, err = io.StringIO(), io.StringIO()
    with create_pipe_input() as pipe:
        pipe.send_text(keys)
        repl = Repl(session, out=out, err=Console(file=err, width=300), markdown=False, pt_input=pipe,
                    pt_output=DummyOutput(), **kwargs)
        assert repl.run() == 0
    return out.getvalue(), err.getvalue()


def test_repl_file_attaches_to_the_next_message_only(history: History, files: dict[str, Path]) -> None:
    session = make_session(history, "Noon.", "You're welcome.")
    notes, todo = files["notes.txt"], files["todo.md"]
    out, err = run_repl(session, f"/file\r/file {notes} {todo}\r/file\rWhen?\rThanks.\r/exit\r")
    assert "usage: /file PATH..." in err
    assert f"attached {notes} (35 tokens): it goes with your next message" in err
    assert f"attached for your next message: {notes} (35 tokens), {todo} (26 tokens)" in err
    expected = attachments.join([attachments.read(str(notes)), attachments.read(str(todo))], "When?")
    assert [t.content for t in history.turns(session.conversation_id) if t.role == "user"] == [expected, "Thanks."]
    assert expected in session.engine.prompts[0] and "--- file:" not in session.engine.prompts[1].split("Noon.")[1]
    assert out == "Noon.\nYou're welcome.\n"


def test_repl_file_errors_are_one_line_and_attach_nothing(history: History, files: dict[str, Path]) -> None:
    session = make_session(history, "ok", n_ctx=400)  # room for 300 characters, with the reply's share
    keys = f"/file {files['binary.bin']}\r/file {files['big.txt']}\r/file\rhi\r/exit\r"
    _, err = run_repl(session, keys)
    assert f"error: cannot attach {files['binary.bin']}: it is a binary file, not text" in err
    assert f"error: {files['big.txt']} is 10,000 tokens: that does not fit the context window (400 tokens" in err
    assert "usage: /file PATH..." in err  # nothing stayed attached
    assert [t.content for t in history.turns(session.conversation_id) if t.role == "user"] == ["hi"]


def test_repl_file_with_truncate_cuts_when_the_message_goes(history: History, files: dict[str, Path]) -> None:
    session = make_session(history, "ok", n_ctx=400)
    _, err = run_repl(session, f"/file {files['big.txt']}\rSum it up.\r/exit\r", truncate=True)
    [sent] = [t.content for t in history.turns(session.conversation_id) if t.role == "user"]
    kept = re.search(r"cut to its first (\d+) of 10,000 tokens to fit the context window \(--truncate\)", err)
    assert kept is not None and sent.endswith(
        f"--- end of file: {files['big.txt']} (cut: its first {kept.group(1)} of 10,000 tokens) ---\n\nSum it up.")
    assert len(session.engine.prompts[0]) <= 300  # the whole prompt fits what the session allows


def test_repl_chat_dash_f_attachments_are_greeted_and_sent_first(history: History, files: dict[str, Path]) -> None:
    session = make_session(history, "Noon.")
    _, err = run_repl(session, "When?\r/exit\r", attachments=[attachments.read(str(files["notes.txt"]))])
    assert f"attached {files['notes.txt']} (35 tokens): it goes with your next message" in err
    assert history.turns(session.conversation_id)[0].content.startswith(f"--- file: {files['notes.txt']} ---\n")
