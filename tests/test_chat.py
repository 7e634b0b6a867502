"""The chat session and REPL: turns stored as they happen, slash commands, context fitting, non-TTY use."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fake_engine import FakeEngine
from ggufgen import make_llama

from chatcli.chat_templates import builtin_format
from chatcli.conversation import ChatSession
from chatcli.engine import InvalidSetting
from chatcli.errors import ContextOverflowError, UsageError
from chatcli.history import History


@pytest.fixture
def history(home: Path):  # noqa: ANN201
    with History() as store:
        yield store


def make_session(history: History | None, *replies: str, n_ctx: int = 4096, system: str | None = None
                 ) -> ChatSession:
    engine = FakeEngine(replies=list(replies), n_ctx=n_ctx)
    return ChatSession(engine=engine, fmt=builtin_format("chatml"), model_label="fake", history=history,
                       system=system)


def test_each_turn_is_stored_as_it_happens(history: History) -> None:
    session = make_session(history, "Hello there", system="be nice")
    reply = session.send("hi")
    assert [t.role for t in history.turns(session.conversation_id)] == ["user"]  # stored before the reply
    assert "".join(reply) == "Hello there"
    turns = history.turns(session.conversation_id)
    assert [(t.role, t.content, t.finish_reason) for t in turns] == [
        ("user", "hi", None), ("assistant", "Hello there", "stop")]
    assert turns[1].completion_tokens == 2 and turns[1].duration is not None
    assert history.get(session.conversation_id).system == "be nice"
    assert session.engine.prompts[0] == "<|im_start|>system\nbe nice<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n" \
                                        "<|im_start|>assistant\n"


def test_interrupted_reply_is_kept_and_marked(history: History) -> None:
    session = make_session(history, "one two three four five")

    def interrupt(result) -> None:  # noqa: ANN001
        if result.completion_tokens == 2:
            raise KeyboardInterrupt

    session.engine.chunk_hook = interrupt
    reply = session.send("count")
    seen = []
    with pytest.raises(KeyboardInterrupt):
        for chunk in reply:
            seen.append(chunk)
    assert "".join(seen) == "one two"
    last = history.turns(session.conversation_id)[-1]
    assert (last.content, last.finish_reason) == ("one two", "interrupted")
    assert session.messages[-1] == {"role": "assistant", "content": "one two"}
    assert "*[interrupted]*" in history.export(session.conversation_id, "md")


def test_undo_and_retry(history: History) -> None:
    session = make_session(history, "first", "second", "second again")
    "".join(session.send("a"))
    "".join(session.send("b"))
    assert "".join(session.retry()) == "second again"
    assert [t.content for t in history.turns(session.conversation_id)] == ["a", "first", "b", "second again"]
    assert session.undo()
    assert [m["content"] for m in session.messages] == ["a", "first"]
    assert [t.content for t in history.turns(session.conversation_id)] == ["a", "first"]
    assert session.undo() and not session.undo()
    with pytest.raises(UsageError, match="nothing to retry"):
        session.retry()


def test_old_turns_are_dropped_from_the_context_never_the_system_prompt(history: History) -> None:
    session = make_session(history, *["x" * 40] * 6, n_ctx=400, system="SYSTEM")
    for i in range(6):
        reply = session.send(f"question {i} " + "y" * 40)
        "".join(reply)
    assert reply.dropped > 0
    prompt = session.engine.prompts[-1]
    assert prompt.startswith("<|im_start|>system\nSYSTEM<|im_end|>")
    assert "question 0" not in prompt and "question 5" in prompt
    assert len(history.turns(session.conversation_id)) == 12  # history keeps everything


def test_a_message_too_long_for_the_context_is_refused_and_not_stored(history: History) -> None:
    session = make_session(history, n_ctx=100)
    with pytest.raises(ContextOverflowError):
        session.send("z" * 500)
    assert session.messages == [] and session.conversation_id is None


def test_load_continues_a_conversation(history: History) -> None:
    first = make_session(history, "Paris.")
    "".join(first.send("capital of France?"))
    resumed = make_session(history, "Rome.")
    resumed.load(first.conversation_id[:6])
    "".join(resumed.send("and Italy?"))
    assert "capital of France?" in resumed.engine.prompts[0] and "Paris." in resumed.engine.prompts[0]
    assert [t.content for t in history.turns(first.conversation_id)] == [
        "capital of France?", "Paris.", "and Italy?", "Rome."]


def test_settings_reach_the_sampler(history: History) -> None:
    session = make_session(history, "a b c d e f g")
    session.set("max_tokens", "3")
    session.set("temperature", "0")
    reply = session.send("go")
    assert "".join(reply) == "a b c" and reply.result.finish_reason == "length"
    with pytest.raises(UsageError, match="temperature must be a number"):
        session.set("temperature", "hot")
    with pytest.raises(InvalidSetting, match="^temperature must be between 0 and 5$") as info:
        session.set("temperature", "99")  # the library names the setting, not a flag of one front end
    assert info.value.name == "temperature"
    with pytest.raises(UsageError, match="unknown setting 'colour'"):
        session.set("colour", "1")


# ---------------------------------------------------------------- the REPL, through prompt_toolkit's pipe input


def run_repl(session: ChatSession, keys: str) -> tuple[str, str]:
    import io

    from prompt_toolkit.input import create_pipe_input
    from prompt_toolkit.output import DummyOutput
    from rich.console import Console

    from chatcli.cli.repl import Repl

    out, err = io.StringIO(), io.StringIO()
    with create_pipe_input() as pipe:
        pipe.send_text(keys)
        repl = Repl(session, out=out, err=Console(file=err, width=200), markdown=False, pt_input=pipe,
                    pt_output=DummyOutput())
        assert repl.run() == 0
    return out.getvalue(), err.getvalue()


def test_repl_chats_and_runs_slash_commands(history: History) -> None:
    session = make_session(history, "Hi!", "Fine.")
    out, err = run_repl(session, "hello\r/system be brief\r/set temperature 0.2\rhow are you\r/tokens\r/show\r/exit\r")
    assert out == "Hi!\nFine.\n"
    assert "system prompt set" in err and "temperature = 0.2" in err
    assert "tokens used" in err and "model        fake" in err and "temperature  0.2" in err
    assert session.engine.prompts[1].startswith("<|im_start|>system\nbe brief<|im_end|>")


def test_repl_bad_commands_get_one_line_hints(history: History) -> None:
    session = make_session(history)
    _, err = run_repl(session, "/hlep\r/set temperature\r/set top_k many\r/set temperature 9\r/load\r/load nosuchid\r"
                               "/retry\r/exit\r")
    lines = [line for line in err.splitlines() if line.strip()]
    assert "temperature must be between 0 and 5 (/set temperature 0.7)" in lines
    assert "--" not in err  # said as the REPL's command, not as a command-line flag
    assert any("unknown command /hlep" in line and "/help" in line for line in lines)
    assert any("usage: /set NAME VALUE" in line for line in lines)
    assert any("top_k must be a whole number" in line for line in lines)
    assert any("usage: /load ID" in line for line in lines)
    assert any("no conversation 'nosuchid'" in line for line in lines)
    assert any("nothing to retry" in line for line in lines)
    assert "Traceback" not in err


def test_repl_multiline_block_and_ctrl_d(history: History) -> None:
    session = make_session(history, "Got it.")
    out, _ = run_repl(session, '"""\rline one\rline two\r"""\r\x04')
    assert out == "Got it.\n"
    assert history.turns(session.conversation_id)[0].content == "line one\nline two"


def test_repl_undo_retry_history_and_load(history: History) -> None:
    old = make_session(history, "Old reply.")
    "".join(old.send("old question"))
    history.set_title(old.conversation_id, "the old one")
    session = make_session(history, "A1", "A2", "A2 again", "B1")
    out, err = run_repl(session, f"q1\rq2\r/retry\r/undo\r/history\r/load {old.conversation_id}\rq3\r/save new title\r"
                                 "/exit\r")
    assert out == "A1\nA2\nA2 again\nB1\n"
    assert "dropped the last exchange" in err and "the old one" in err
    assert f"continuing conversation {old.conversation_id}" in err
    assert history.get(old.conversation_id).title == "new title"
    assert [t.content for t in history.turns(old.conversation_id)] == ["old question", "Old reply.", "q3", "B1"]


def test_repl_ctrl_c_during_a_reply_returns_to_the_prompt(history: History) -> None:
    session = make_session(history, "one two three four", "next")

    def interrupt(result) -> None:  # noqa: ANN001
        if result.completion_tokens == 2 and session.engine.replies:
            raise KeyboardInterrupt

    session.engine.chunk_hook = interrupt
    out, err = run_repl(session, "story\ragain\r/exit\r")
    assert out == "one two\nnext\n"
    assert "[interrupted]" in err
    assert [t.finish_reason for t in history.turns(session.conversation_id)] == [None, "interrupted", None, "stop"]


def test_tab_completion_offers_the_slash_commands(history: History) -> None:
    from prompt_toolkit.document import Document

    from chatcli.cli.repl import Repl

    repl = Repl(make_session(history), markdown=False)
    completer = repl._prompt_session().completer
    found = {c.text for c in completer.get_completions(Document("/re"), None)}
    assert {"/reset", "/retry"} <= found


# ---------------------------------------------------------------- real llama.cpp, non-TTY


def test_piped_lines_are_answered_in_turn(tiny_llama: Path, home: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "chatcli", "chat", "-m", str(tiny_llama)],
                          input=b"hello\nhow are you\n", capture_output=True, env=os.environ.copy(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    with History() as store:
        conversation = store.latest()
        turns = store.turns(conversation.id)
    assert [t.role for t in turns] == ["user", "assistant", "user", "assistant"]
    assert [t.content for t in turns if t.role == "user"] == ["hello", "how are you"]
    assert proc.stdout == "".join(t.content + "\n" for t in turns if t.role == "assistant").encode()


def test_continue_resumes_the_latest_conversation(chatcli, tiny_llama: Path) -> None:
    assert chatcli("chat", "-m", str(tiny_llama), input="first\n").returncode == 0
    result = chatcli("chat", "--continue", input="second\n")  # the model comes from the conversation
    assert result.returncode == 0, result.stderr
    with History() as store:
        assert [t.content for t in store.turns(store.latest().id) if t.role == "user"] == ["first", "second"]
        assert len(store.list()) == 1


def test_hostile_template_in_a_gguf_falls_back_safely(chatcli, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    hostile = ("{{ cycler.__init__.__globals__.os.popen('touch " + str(marker) + "').read() }}"
               "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    model = make_llama(tmp_path / "hostile.gguf", chat_template=hostile)
    result = chatcli("chat", "-m", str(model), input="hello\n")
    assert result.returncode == 0, result.stderr
    assert "unsafe or invalid" in result.stderr and "chatml" in result.stderr
    assert not marker.exists()


def test_two_chats_writing_history_at_once_lose_nothing(tiny_llama: Path, home: Path, tmp_path: Path) -> None:
    lines = "".join(f"message {i}\n" for i in range(8)).encode()
    procs = []
    for n in range(2):
        with (tmp_path / f"out{n}").open("wb") as out, (tmp_path / f"err{n}").open("wb") as err:
            # one thread each: two llama.cpp processes with a thread per core each slow to a crawl on 2 cores
            # (OpenMP spin-waits), which is not what this test is about
            procs.append(subprocess.Popen([sys.executable, "-m", "chatcli", "chat", "-m", str(tiny_llama)],
                                          stdin=subprocess.PIPE, stdout=out, stderr=err,
                                          env={**os.environ, "CHATCLI_THREADS": "1"}))
    try:
        for proc in procs:
            proc.stdin.write(lines)
            proc.stdin.close()
        for n, proc in enumerate(procs):
            assert proc.wait(timeout=120) == 0, (tmp_path / f"err{n}").read_text()
    finally:
        for proc in procs:  # on a failure, leave no process behind to trip a later test
            proc.kill()
            proc.wait()
    with History() as store:
        conversations = store.list()
        assert len(conversations) == 2
        for summary in conversations:
            turns = store.turns(summary.id)
            assert [t.content for t in turns if t.role == "user"] == [f"message {i}" for i in range(8)]
            assert all(t.finish_reason for t in turns if t.role == "assistant")


def test_history_commands(chatcli, tiny_llama: Path) -> None:
    assert chatcli("chat", "-m", str(tiny_llama), input="hello\n").returncode == 0
    listing = json.loads(chatcli("history", "list", "--json").stdout)
    [row] = listing
    exported = json.loads(chatcli("history", "export", row["id"], "--format", "json").stdout)
    assert [t["content"] for t in exported["turns"]][0] == "hello"
    shown = chatcli("history", "show", row["id"][:5])
    assert shown.returncode == 0 and "### User" in shown.stdout and "hello" in shown.stdout
    assert chatcli("history", "rm", row["id"]).returncode == 1  # no confirmation without a terminal
    assert chatcli("history", "rm", row["id"], "-y").returncode == 0
    missing = chatcli("history", "show", row["id"])
    assert missing.returncode == 1 and "no conversation" in missing.stderr


def test_continue_restores_a_snapshot_with_the_same_answer_as_a_full_prefill(tiny_llama: Path, home: Path,
                                                                              tmp_path: Path) -> None:
    import shutil

    def run(root: Path, lines: str) -> subprocess.CompletedProcess[bytes]:
        env = {**os.environ, "CHATCLI_HOME": str(root)}
        return subprocess.run([sys.executable, "-m", "chatcli", "chat", "--continue"] if "first" not in lines else
                              [sys.executable, "-m", "chatcli", "chat", "-m", str(tiny_llama)],
                              input=lines.encode(), capture_output=True, env=env, timeout=120)

    setup = "/set temperature 0\n/set max_tokens 8\n"
    first = run(home, setup + "first question\n")
    assert first.returncode == 0, first.stderr
    assert list((home / "cache" / "snapshots").glob("*.state"))
    without = tmp_path / "without-snapshots"
    shutil.copytree(home, without)
    shutil.rmtree(without / "cache")

    restored = run(home, "second question\n")
    full = run(without, "second question\n")
    assert restored.returncode == 0 and full.returncode == 0, restored.stderr + full.stderr
    assert b"restored" in restored.stderr and b"from a snapshot" in restored.stderr
    assert b"restored" not in full.stderr
    assert restored.stdout == full.stdout


def test_repl_model_switch_keeps_the_conversation(history: History) -> None:
    session = make_session(history, "from the first model")
    second = FakeEngine(replies=["from the second model"])
    loads: list[str] = []

    def load_model(ref: str):  # noqa: ANN202
        loads.append(ref)
        return second, builtin_format("llama3"), "other-model", "other-id", {"max_tokens": 2}

    import io

    from prompt_toolkit.input import create_pipe_input
    from prompt_toolkit.output import DummyOutput
    from rich.console import Console

    from chatcli.cli.repl import Repl

    out, err = io.StringIO(), io.StringIO()
    with create_pipe_input() as pipe:
        pipe.send_text("hi\r/model other\ragain\r/exit\r")
        Repl(session, out=out, err=Console(file=err, width=200), markdown=False, pt_input=pipe,
             pt_output=DummyOutput(), load_model=load_model).run()
    # the second model's own defaults (here max_tokens 2) apply from the switch on
    assert loads == ["other"] and out.getvalue() == "from the first model\nfrom the\n"
    assert "now chatting with other-model" in err.getvalue()
    assert second.prompts[0].startswith("<|begin_of_text|>") and "hi" in second.prompts[0]  # same conversation
    assert history.get(session.conversation_id).model == "other-model"


def test_a_damaged_history_file_is_refused_and_left_alone(chatcli, tiny_llama: Path, home: Path) -> None:
    db = home / "data" / "history.db"
    db.parent.mkdir(parents=True)
    db.write_bytes(b"not a database at all" * 100)
    before = db.read_bytes()
    result = chatcli("chat", "-m", str(tiny_llama), input="hello\n")
    assert result.returncode == 1
    assert str(db) in result.stderr and "Traceback" not in result.stderr
    assert db.read_bytes() == before
    assert chatcli("chat", "-m", str(tiny_llama), "--no-history", input="hello\n").returncode == 0


def test_repl_copy_sends_the_last_reply_to_the_terminal_clipboard(history: History) -> None:
    import base64

    session = make_session(history, "Copy me.")
    out, err = run_repl(session, "/copy\rhi\r/copy\r/exit\r")
    assert "nothing to copy yet" in err
    assert out == "Copy me.\n" + f"\x1b]52;c;{base64.b64encode(b'Copy me.').decode()}\x07"


def test_context_usage_follows_the_conversation(history: History) -> None:
    session = make_session(history, "a reply", "another reply")
    assert session.context_usage() == (0, 4096)
    "".join(session.send("first"))
    after_one = session.context_usage()[0]
    "".join(session.send("second"))
    after_two = session.context_usage()[0]
    assert 0 < after_one < after_two
    session.undo()
    assert session.context_usage()[0] == after_one
    session.set_system("a long system prompt " * 10)
    assert session.context_usage()[0] > after_one


# ---------------------------------------------------------------- sampling: flags, /set, templates, catalogue


def stored_replies() -> list:
    with History() as store:
        return [t for t in store.turns(store.latest().id) if t.role == "assistant"]


def test_chat_sampling_flags_win_over_a_continued_conversations_settings(chatcli, tiny_llama: Path) -> None:
    bad = chatcli("chat", "-m", str(tiny_llama), "--temperature", "9", input="hello\n")
    assert bad.returncode == 2 and "invalid value for --temperature: must be between 0 and 5" in bad.stderr
    assert chatcli("chat", "-m", str(tiny_llama), "-n", "3", "--temperature", "0", input="hello\n").returncode == 0
    assert [t.completion_tokens for t in stored_replies()] == [3]
    first = chatcli("chat", "-m", str(tiny_llama), "--temperature", "0", input="/set max_tokens 5\nhello\n")
    assert first.returncode == 0, first.stderr
    assert [t.completion_tokens for t in stored_replies()] == [5]
    # --continue restores /set max_tokens 5; the flag wins over it; a /set during the chat changes it again
    again = chatcli("chat", "--continue", "-n", "2", input="again\n/set max_tokens 4\nmore\n")
    assert again.returncode == 0, again.stderr
    assert [(t.completion_tokens, t.finish_reason) for t in stored_replies()] == [(5, "length"), (2, "length"),
                                                                                  (4, "length")]


def test_catalogue_options_are_the_models_defaults_in_chat(chatcli, fake_hub, tiny_llama: Path, home: Path) -> None:
    from conftest import write_user_catalogue

    write_user_catalogue(home, '[models.tiny]\nrepo = "test/tiny-GGUF"\nfiles = { Q8_0 = "tiny.Q8_0.gguf" }\n'
                               "options = { temperature = 0, max_tokens = 5 }\n")
    fake_hub.add_file("test/tiny-GGUF", "tiny.Q8_0.gguf", tiny_llama)
    assert chatcli("pull", "tiny").returncode == 0
    template = home / "config" / "templates" / "short.toml"
    template.parent.mkdir(parents=True)
    template.write_text('prompt = "{input}"\n[options]\nmax_tokens = 3\n')

    runs = [chatcli("chat", "-m", "tiny", "--no-history", input="hello\n").stdout for _ in range(2)]
    greedy = chatcli("chat", "-m", str(tiny_llama), "--no-history", "--temperature", "0", "-n", "5",
                     input="hello\n").stdout
    assert runs == [greedy, greedy]  # the catalogue's temperature 0 and max_tokens 5
    # a prompt template's options win over the catalogue's, /set over both, flags over all
    assert chatcli("chat", "-m", "tiny", input="hello\n").returncode == 0
    assert chatcli("chat", "-m", "tiny", "-t", "short", input="hello\n").returncode == 0
    assert chatcli("chat", "-m", "tiny", "-t", "short", input="/set max_tokens 2\nhello\n").returncode == 0
    assert chatcli("chat", "-m", "tiny", "-t", "short", "-n", "1", input="hello\n").returncode == 0
    with History() as store:
        counts = [[t.completion_tokens for t in store.turns(c.id) if t.role == "assistant"] for c in store.list()]
    assert sorted(counts) == [[1], [2], [3], [5]]


def test_a_model_without_a_chat_template_gets_a_reply_cap_with_a_notice(chatcli, tmp_path: Path) -> None:
    from ggufgen import make_gpt2

    base = make_gpt2(tmp_path / "base-gpt2.gguf", n_ctx=1024)  # no chat template; context room for 256+
    capped = chatcli("chat", "-m", str(base), "--temperature", "0", input="Hello\n")
    assert capped.returncode == 0, capped.stderr
    assert "base model" in capped.stderr
    [notice] = [line for line in capped.stderr.splitlines() if "replies stop at 256 tokens" in line]
    assert "/set max_tokens N" in notice and "-n N" in notice
    [reply] = stored_replies()
    assert (reply.completion_tokens, reply.finish_reason) == (256, "length")

    chosen = chatcli("chat", "-m", str(base), "--temperature", "0", "-n", "300", input="Hello\n")
    assert chosen.returncode == 0 and "replies stop at" not in chosen.stderr
    assert stored_replies()[0].completion_tokens == 300
