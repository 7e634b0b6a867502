"""`chatcli complete` on tiny generated models (real llama.cpp underneath): the pipeline contract."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from ggufgen import make_gpt2, truncate_copy

GREEDY = ["--temperature", "0"]


def test_streams_the_completion_and_nothing_else(chatcli, tiny_gpt2: Path) -> None:
    result = chatcli("complete", "-m", str(tiny_gpt2), "hello world", "-n", "8", *GREEDY)
    assert result.returncode == 0, result.stderr
    assert result.stdout != ""
    assert result.stderr == ""  # llama.cpp's log stays quiet without --verbose


def test_verbose_shows_llama_cpp_log_on_stderr_only(chatcli, tiny_gpt2: Path) -> None:
    quiet = chatcli("complete", "-m", str(tiny_gpt2), "hello", "-n", "4", *GREEDY)
    loud = chatcli("complete", "-m", str(tiny_gpt2), "hello", "-n", "4", "--verbose", *GREEDY)
    assert loud.returncode == 0
    assert loud.stdout == quiet.stdout
    assert "llama" in loud.stderr and "loaded tiny-gpt2.gguf" in loud.stderr and "on CPU" in loud.stderr


@pytest.mark.parametrize("model", ["tiny_gpt2", "tiny_llama"])
def test_greedy_is_deterministic(chatcli, model: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(model)
    runs = [chatcli("complete", "-m", str(path), "the world", "-n", "12", *GREEDY).stdout for _ in range(2)]
    assert runs[0] == runs[1] and runs[0]


def test_seed_reproduces_sampling(chatcli, tiny_gpt2: Path) -> None:
    args = ["complete", "-m", str(tiny_gpt2), "hello", "-n", "16", "--temperature", "1.5", "--top-k", "0",
            "--min-p", "0"]
    a = chatcli(*args, "--seed", "7").stdout
    b = chatcli(*args, "--seed", "7").stdout
    c = chatcli(*args, "--seed", "8").stdout
    assert a == b
    assert a != c


def test_max_tokens_caps_the_completion(chatcli, tiny_gpt2: Path) -> None:
    result = chatcli("complete", "-m", str(tiny_gpt2), "hello", "-n", "5", "--json", *GREEDY)
    summary = json.loads(result.stdout)
    assert summary["completion_tokens"] == 5 and summary["finish_reason"] == "length"
    assert summary["prompt_tokens"] >= 1 and summary["model"] == str(tiny_gpt2)
    assert set(summary["timings"]) >= {"prompt_seconds", "decode_seconds", "decode_tokens_per_second"}


def test_jsonl_events_add_up_to_the_json_text(chatcli, tiny_gpt2: Path) -> None:
    whole = json.loads(chatcli("complete", "-m", str(tiny_gpt2), "hello", "-n", "10", "--json", *GREEDY).stdout)
    lines = chatcli("complete", "-m", str(tiny_gpt2), "hello", "-n", "10", "--jsonl", *GREEDY).stdout.splitlines()
    events = [json.loads(line) for line in lines]
    assert [e["type"] for e in events] == ["chunk"] * (len(events) - 1) + ["done"]
    assert "".join(e["text"] for e in events[:-1]) == whole["text"]
    assert events[-1]["completion_tokens"] == 10


def test_stop_string_ends_the_completion_before_it(chatcli, tiny_gpt2: Path) -> None:
    full = chatcli("complete", "-m", str(tiny_gpt2), "hello", "-n", "30", *GREEDY).stdout
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop.strip(), full
    cut = chatcli("complete", "-m", str(tiny_gpt2), "hello", "-n", "30", "--stop", stop, *GREEDY).stdout
    assert cut == full[: full.index(stop)]


def test_echo_prints_stdin_and_text_joined_with_a_blank_line(chatcli, tiny_gpt2: Path) -> None:
    result = chatcli("complete", "-m", str(tiny_gpt2), "Summary:", "--echo", "-n", "3", *GREEDY,
                     input="line one\nline two\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("line one\nline two\n\nSummary:")


def test_stdin_alone_is_a_prompt(chatcli, tiny_gpt2: Path) -> None:
    result = chatcli("complete", "-m", str(tiny_gpt2), "-n", "3", *GREEDY, input="hello world")
    assert result.returncode == 0 and result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "no prompt"),
        (["hi", "-n", "-1"], "--max-tokens"),
        (["hi", "--temperature", "9"], "--temperature"),
        (["hi", "--top-p", "0"], "--top-p"),
        (["hi", "--ctx-size", "4"], "--ctx-size"),
        (["hi", "--grammar", "/nonexistent.gbnf"], "--grammar"),
        (["hi", "--json-schema", "{not json"], "--json-schema"),
        (["hi", "--json-schema", "[1, 2]"], "--json-schema"),
        (["hi", "--json", "--jsonl"], "--json or --jsonl"),
        (["hi", "--gpu-layers", "lots"], "--gpu-layers"),
        (["hi", "--temperature", "warm"], "--temperature"),
    ],
)
def test_bad_input_is_a_usage_error_naming_the_option(chatcli, tiny_gpt2: Path, args: list[str],
                                                      message: str) -> None:
    result = chatcli("complete", "-m", str(tiny_gpt2), *args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert result.stdout == ""


def test_invalid_grammar_file_content(chatcli, tiny_gpt2: Path, tmp_path: Path) -> None:
    grammar = tmp_path / "bad.gbnf"
    grammar.write_text("root ::= (((")
    result = chatcli("complete", "-m", str(tiny_gpt2), "hi", "--grammar", str(grammar))
    assert result.returncode == 2 and "invalid grammar" in result.stderr


def test_grammar_constrains_the_output(chatcli, tiny_gpt2: Path, tmp_path: Path) -> None:
    grammar = tmp_path / "yesno.gbnf"
    grammar.write_text('root ::= ("yes" | "no") "."\n')
    result = chatcli("complete", "-m", str(tiny_gpt2), "Answer:", "--grammar", str(grammar), "-n", "20",
                     "--temperature", "1", "--seed", "3")
    assert result.returncode == 0, result.stderr
    assert result.stdout in {"yes.", "no."}


def test_context_overflow_exits_3_with_the_counts(chatcli, tiny_gpt2: Path) -> None:
    long_prompt = "hello world " * 300  # tiny-gpt2 was trained on 256 positions
    result = chatcli("complete", "-m", str(tiny_gpt2), long_prompt, "-n", "8")
    assert result.returncode == 3
    assert "tokens but the context window is 256" in result.stderr and "--truncate" in result.stderr
    kept = chatcli("complete", "-m", str(tiny_gpt2), long_prompt, "-n", "8", "--truncate", "--json", *GREEDY)
    assert kept.returncode == 0, kept.stderr
    summary = json.loads(kept.stdout)
    assert summary["prompt_tokens"] <= 256 - 8 and summary["completion_tokens"] == 8


def test_generation_stops_at_the_end_of_the_context_window(chatcli, models_dir: Path) -> None:
    """GPT-2 aborts the whole process past its trained context in llama.cpp: we must stop first."""
    short = make_gpt2(models_dir / "gpt2-ctx64.gguf", n_ctx=64)
    result = chatcli("complete", "-m", str(short), "hello world", "--json", "--ctx-size", "4096", *GREEDY)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["finish_reason"] in ("context", "stop")
    assert summary["prompt_tokens"] + summary["completion_tokens"] <= 64


def test_missing_model_names_the_pull_command(chatcli) -> None:
    result = chatcli("complete", "-m", "gpt2", "hello")
    assert result.returncode == 1
    assert result.stderr.strip() == "error: model gpt2:Q8_0 is not downloaded: run `chatcli pull gpt2`"


@pytest.mark.parametrize("cut", [100, 20000, 200000])
def test_truncated_model_fails_to_load_cleanly(chatcli, tiny_gpt2: Path, tmp_path: Path, cut: int) -> None:
    bad = truncate_copy(tiny_gpt2, tmp_path / "cut.gguf", cut)
    result = chatcli("complete", "-m", str(bad), "hello")
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_wrong_architecture_fails_to_load_cleanly(chatcli, tmp_path: Path) -> None:
    odd = make_gpt2(tmp_path / "odd.gguf", extra_kv={"general.architecture": "no-such-arch"})
    result = chatcli("complete", "-m", str(odd), "hello")
    assert result.returncode == 1
    assert "could not load odd.gguf (no-such-arch)" in result.stderr


def test_chat_uses_the_models_template(tiny_llama: Path) -> None:
    """--chat renders the GGUF's own (ChatML) template; asserted on the rendered prompt."""
    from chatcli.completion import CompletionRequest, render_prompt
    from chatcli.engine import LlamaEngine, SamplingOptions
    from chatcli.registry import load_catalogue, parse_ref

    engine = LlamaEngine(tiny_llama)
    try:
        ref = parse_ref(str(tiny_llama), load_catalogue())
        request = CompletionRequest(prompt="hi there", options=SamplingOptions(), chat=True, system="be brief")
        text, stops = render_prompt(engine, ref, request, warn=lambda m: None)
    finally:
        engine.close()
    assert text == "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi there<|im_end|>\n" \
                   "<|im_start|>assistant\n"
    assert "<|im_end|>" in stops


def test_chat_on_a_model_without_template_warns(chatcli, tiny_gpt2: Path) -> None:
    result = chatcli("complete", "-m", str(tiny_gpt2), "hi", "--chat", "-n", "3", *GREEDY)
    assert result.returncode == 0, result.stderr
    assert "base model" in result.stderr


def test_cache_restores_a_repeated_stdin_prefix_with_the_same_output(chatcli, tiny_llama: Path) -> None:
    document = "hello world the " * 40
    args = ["complete", "-m", str(tiny_llama), "-n", "6", "--json", *GREEDY]
    first = json.loads(chatcli(*args, "--cache", "first question", input=document).stdout)
    assert first["prompt_cached_tokens"] == 0
    cached = json.loads(chatcli(*args, "--cache", "second question", input=document).stdout)
    plain = json.loads(chatcli(*args, "second question", input=document).stdout)
    assert 0 < cached["prompt_cached_tokens"] < cached["prompt_tokens"]
    assert plain["prompt_cached_tokens"] == 0
    assert cached["text"] == plain["text"]


def test_pull_gpt2_then_complete(chatcli, fake_hub, tiny_gpt2: Path) -> None:
    """The first thing people try: `chatcli pull gpt2 && chatcli complete "The quick brown fox"` (a tiny GPT-2
    stands in for the real one on the fake Hub, under the catalogue's repo and file name)."""
    fake_hub.add_file("QuantFactory/gpt2-GGUF", "gpt2.Q8_0.gguf", tiny_gpt2)
    fake_hub.add_file("QuantFactory/gpt2-GGUF", "gpt2.Q4_K_M.gguf", tiny_gpt2)
    pulled = chatcli("pull", "gpt2")
    assert pulled.returncode == 0, pulled.stderr
    result = chatcli("complete", "-m", "gpt2", "The quick brown fox", "-n", "6", "--json", *GREEDY)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["model"] == "gpt2:Q8_0" and summary["completion_tokens"] == 6
    chat = chatcli("complete", "-m", "gpt2", "hello", "--chat", "-n", "3", "--echo", *GREEDY)
    assert chat.returncode == 0 and chat.stderr == ""  # the catalogue names the 'plain' template: no warning


def test_catalogue_options_are_the_models_defaults_below_flags_and_templates(chatcli, fake_hub, tiny_gpt2: Path,
                                                                             home: Path) -> None:
    from conftest import write_user_catalogue

    write_user_catalogue(home, '[models.tiny]\nrepo = "test/tiny-GGUF"\nfiles = { Q8_0 = "tiny.Q8_0.gguf" }\n'
                               "options = { temperature = 0, max_tokens = 5 }\n")
    fake_hub.add_file("test/tiny-GGUF", "tiny.Q8_0.gguf", tiny_gpt2)
    assert chatcli("pull", "tiny").returncode == 0
    template = home / "config" / "templates" / "short.toml"
    template.parent.mkdir(parents=True)
    template.write_text('prompt = "{input}"\n[options]\nmax_tokens = 3\n')

    def run(*args: str) -> dict:
        result = chatcli("complete", "hello", "--json", *args)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    by_catalogue = [run("-m", "tiny") for _ in range(2)]
    greedy = run("-m", str(tiny_gpt2), "-n", "5", *GREEDY)
    assert [s["completion_tokens"] for s in by_catalogue] == [5, 5]
    assert by_catalogue[0]["text"] == by_catalogue[1]["text"] == greedy["text"]  # temperature 0 from the catalogue
    assert run("-m", "tiny", "-t", "short")["completion_tokens"] == 3  # the template's options win
    assert run("-m", "tiny", "-t", "short", "-n", "2")["completion_tokens"] == 2  # flags win over both


def test_the_catalogue_refuses_options_out_of_range(chatcli, home: Path) -> None:
    from conftest import write_user_catalogue

    path = write_user_catalogue(home, '[models.tiny]\nrepo = "test/tiny-GGUF"\nfiles = { Q8_0 = "t.gguf" }\n'
                                      "options = { temperature = 9 }\n")
    result = chatcli("complete", "-m", "tiny", "hello")
    assert result.returncode == 1
    assert f"{path}: [models.tiny]: option 'temperature' must be between 0 and 5" in result.stderr
