"""chatcli.gguf_checks and the engine's last words: hostile values never reach llama.cpp, and an abort is never silent.

Each hostile file is a real GGUF from tests/ggufgen.py with one bad value; llama.cpp aborts the whole process
(SIGABRT, nothing printed) on several of them, so `complete` must refuse them before loading.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import ggufgen  # tests/ is on sys.path (conftest.py)
import numpy as np
import pytest

from chatcli.errors import ExitCode, GGUFValueError
from chatcli.gguf_checks import (
    MAX_CONTEXT,
    check_loadable,
    estimate_load_bytes,
    find_problems,
    kv_cache_bytes_per_token,
)
from chatcli.gguf_info import read_gguf, read_string_array

TOKENS = ggufgen.vocab()  # make_llama's 272 tokens


def _dup_tokens() -> list[str]:
    tokens = list(TOKENS)
    tokens[-1] = tokens[256 + 3]  # "hello" twice: llama.cpp's GGML_ASSERT(id_to_token.size() == token_to_id.size())
    return tokens


def _empty_collision() -> list[str]:
    tokens = list(TOKENS)
    tokens[5], tokens[6] = "", "[EMPTY_5]"  # llama.cpp renames an empty token 5 to "[EMPTY_5]"
    return tokens


def _huge_tensor(path: Path) -> Path:
    """A model whose last tensor claims 1 TB (a sparse hole on disk): the load cannot fit in memory."""
    ggufgen.make_llama(path, extra_tensors={"blk.1.zz_extra.weight": np.zeros(32, dtype=np.float32)})
    return ggufgen.set_tensor_dims(path, "blk.1.zz_extra.weight", (1 << 38,))


# name -> (how to write the file, the start of the one-line reason after "<path>: ")
HOSTILE: dict[str, tuple[Callable[[Path], Path], str]] = {
    "block_count 0": (lambda p: ggufgen.make_llama(p, extra_kv={"llama.block_count": 0}),
                      "llama.block_count is 0: llama.cpp aborts unless it is between 1 and 512"),
    "block_count 65536": (lambda p: ggufgen.make_llama(p, extra_kv={"llama.block_count": 65536}),
                          "llama.block_count is 65536: llama.cpp aborts"),
    "block_count 2^31": (lambda p: ggufgen.make_llama(p, extra_kv={"llama.block_count": 1 << 31}),
                         "llama.block_count is 2147483648: llama.cpp aborts"),
    "block_count 2^32-1": (lambda p: ggufgen.make_gpt2(p, extra_kv={"gpt2.block_count": (1 << 32) - 1}),
                           "gpt2.block_count is 4294967295: llama.cpp aborts"),
    "context_length 2^31": (lambda p: ggufgen.make_llama(p, extra_kv={"llama.context_length": 1 << 31}),
                            "llama.context_length is 2147483648: a trained context must be between 1 and 16,777,216"),
    "context_length 2^30": (lambda p: ggufgen.make_llama(p, extra_kv={"llama.context_length": 1 << 30}),
                            "llama.context_length is 1073741824: a trained context must be between 1 and"),
    "context_length 0": (lambda p: ggufgen.make_llama(p, extra_kv={"llama.context_length": 0}),
                         "llama.context_length is 0: "),
    "duplicate token": (lambda p: ggufgen.make_llama(p, extra_kv={"tokenizer.ggml.tokens": _dup_tokens()}),
                        "tokenizer.ggml.tokens is an array of 272 STRING: token 271 repeats token 259 ('hello')"),
    "empty token named like another": (
        lambda p: ggufgen.make_llama(p, extra_kv={"tokenizer.ggml.tokens": _empty_collision()}),
        "tokenizer.ggml.tokens is an array of 272 STRING: token 6 repeats token 5"),
    "token_type shorter than tokens": (
        lambda p: ggufgen.make_llama(p, extra_kv={"tokenizer.ggml.token_type": [1] * 271}),
        "tokenizer.ggml.token_type is an array of 271 INT32: must have one entry per token (272"),
    "scores longer than tokens": (
        lambda p: ggufgen.make_gpt2(p, extra_kv={"tokenizer.ggml.scores": [0.0] * 271}),
        "tokenizer.ggml.scores is an array of 271 FLOAT32: must have one entry per token (270"),
    "eos id outside the vocabulary": (
        lambda p: ggufgen.make_llama(p, extra_kv={"tokenizer.ggml.eos_token_id": 272}),
        "tokenizer.ggml.eos_token_id is 272: must be a token id below the vocabulary size 272"),
    "padding id 2^32-1": (
        lambda p: ggufgen.make_llama(p, extra_kv={"tokenizer.ggml.padding_token_id": (1 << 32) - 1}),
        "tokenizer.ggml.padding_token_id is 4294967295: must be a token id below"),
    "no merges for a BPE vocabulary": (
        lambda p: ggufgen.make_gpt2(p, extra_kv={"tokenizer.ggml.merges": None}),
        "tokenizer.ggml.merges is missing: a BPE (gpt2) tokenizer needs its merges"),
    "head_count 0": (lambda p: ggufgen.make_llama(p, extra_kv={"llama.attention.head_count": 0}),
                     "llama.attention.head_count is 0: an attention model needs at least one head"),
    "kv heads do not divide heads": (
        lambda p: ggufgen.make_llama(p, extra_kv={"llama.attention.head_count_kv": 3}),
        "llama.attention.head_count_kv is 3: layer 0 has 2 heads, which 3 KV heads must divide"),
    "kv heads 0": (lambda p: ggufgen.make_llama(p, extra_kv={"llama.attention.head_count_kv": 0}),
                   "llama.attention.head_count_kv is 0: layer 0 has 2 heads"),
    "embedding not a multiple of heads": (
        lambda p: ggufgen.make_gpt2(p, extra_kv={"gpt2.attention.head_count": 3}),
        "gpt2.embedding_length is 64: must be a multiple of gpt2.attention.head_count (3)"),
    "key_length 0": (lambda p: ggufgen.make_llama(p, extra_kv={"llama.attention.key_length": 0}),
                     "llama.attention.key_length is 0: must be between 1 and 65536"),
    "per-layer head counts of the wrong length": (
        lambda p: ggufgen.make_llama(p, extra_kv={"llama.attention.head_count": [2, 2, 2]}),
        "llama.attention.head_count is [2, 2, 2]: llama.cpp needs one value per layer (llama.block_count is 2)"),
    "unknown rope scaling": (lambda p: ggufgen.make_llama(p, extra_kv={"llama.rope.scaling.type": "bogus"}),
                             "llama.rope.scaling.type is 'bogus': llama.cpp aborts unless it is one of"),
    "expert_count 5000": (lambda p: ggufgen.make_llama(p, extra_kv={"llama.expert_count": 5000}),
                          "llama.expert_count is 5000: llama.cpp aborts above 1024"),
    "experts used without experts": (lambda p: ggufgen.make_llama(p, extra_kv={"llama.expert_used_count": 2}),
                                     "llama.expert_used_count is 2: more experts used than llama.expert_count (0)"),
    "a missing block tensor": (lambda p: ggufgen.make_llama(p, drop_tensors=["blk.1.attn_q.weight"]),
                               "tensor blk.1.attn_q.weight is missing: block 1 needs it (llama.block_count is 2)"),
    "block_count beyond the tensors": (lambda p: ggufgen.make_llama(p, extra_kv={"llama.block_count": 3}),
                                       "llama.block_count is 3: block 2 has no tensors (blk.2.*)"),
    "tensors beyond block_count": (lambda p: ggufgen.make_gpt2(p, extra_kv={"gpt2.block_count": 1}),
                                   "tensor blk.1."),
    "wrong embedding shape": (
        lambda p: ggufgen.make_llama(p, extra_kv={"llama.embedding_length": 32, "llama.rope.dimension_count": 16}),
        "the shape of tensor token_embd.weight is [64, 272]: the header's hyperparameters make it [32, 272]"),
    "position embeddings shorter than the context": (
        lambda p: ggufgen.make_gpt2(p, extra_kv={"gpt2.context_length": 512}),
        "the shape of tensor position_embd.weight is [64, 256]: the header's hyperparameters make it [64, 512]"),
    "absurd memory estimate": (_huge_tensor, "the memory a load needs is ~1.1 TB: weights 1.1 TB + KV cache"),
    # Found by scripts/fuzz_gguf.py (seed 1, 1,000 mutants): aborts our first checks let through.
    "gpt2 key_length not the head size": (
        lambda p: ggufgen.make_gpt2(p, extra_kv={"gpt2.attention.key_length": 255}),
        "gpt2.attention.key_length is 255: gpt2 needs embedding_length / head_count (32); llama.cpp aborts"),
    "an integer norm weight": (
        lambda p: ggufgen.make_llama(p, extra_tensors={"output_norm.weight": np.ones(64, dtype=np.int32)}),
        "the type of tensor output_norm.weight is I32: weights are floats or quants"),
}
# llama.cpp aborts the process on these, while loading (checked by test_llama_cpp_aborts_are_reported_in_one_line).
ABORTING = ["block_count 0", "block_count 65536", "duplicate token", "gpt2 key_length not the head size"]


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("hostile")
    return {name: make(folder / f"{i:02d}.gguf") for i, (name, (make, _)) in enumerate(HOSTILE.items())}


def _memory() -> int:
    return 16 * 1024**3  # fixed, so the outcome does not depend on this machine


# ---------------------------------------------------------------- the checks, in-process


@pytest.mark.parametrize("name", HOSTILE)
def test_each_hostile_value_is_refused_in_one_line(hostile: dict[str, Path], name: str) -> None:
    path = hostile[name]
    with pytest.raises(GGUFValueError) as excinfo:
        check_loadable(read_gguf(path), n_ctx=256, memory=_memory())
    message = str(excinfo.value)
    assert message.startswith(f"{path}: {HOSTILE[name][1]}"), message
    assert "\n" not in message
    assert message.count("; ") >= 1  # ... what to do
    assert excinfo.value.exit_code == ExitCode.ERROR


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_gpt2", "smollm2"])
def test_real_and_generated_models_pass(request: pytest.FixtureRequest, model: str) -> None:
    info = read_gguf(request.getfixturevalue(model))
    started = time.perf_counter()
    problems = find_problems(info, n_ctx=4096, memory=_memory())
    took = time.perf_counter() - started
    assert problems == []
    assert took < 0.5  # SmolLM2: 49,152 tokens read back and compared


def test_gqa_and_per_layer_values_pass(tmp_path: Path) -> None:
    gqa = ggufgen.make_llama(tmp_path / "gqa.gguf", n_head=4, n_head_kv=1)
    per_layer = ggufgen.make_llama(tmp_path / "layers.gguf", extra_kv={
        "llama.attention.head_count": [2, 2], "llama.attention.head_count_kv": [2, 1],
        "llama.feed_forward_length": [128, 128]})
    assert find_problems(read_gguf(gqa)) == []
    assert find_problems(read_gguf(per_layer)) == []


def test_smollm2_vocabulary_reads_back(smollm2: Path) -> None:
    info = read_gguf(smollm2)
    tokens = read_string_array(info, "tokenizer.ggml.tokens")
    assert len(tokens) == len(set(tokens)) == info.vocab_size == 49152
    assert tokens[info.eos_token_id or 0].decode() == info.eos_token


def test_memory_estimate_counts_weights_and_the_kv_cache(tiny_llama: Path) -> None:
    info = read_gguf(tiny_llama)
    # 2 layers x 2 KV heads x (32 + 32) head dims x 2 bytes (f16)
    assert kv_cache_bytes_per_token(info) == 2 * 2 * (32 + 32) * 2
    weights, kv = estimate_load_bytes(info, 1000)
    assert weights == sum(t.n_bytes or 0 for t in info.tensors) > 100_000
    assert kv == 512 * 1000
    assert find_problems(info, n_ctx=1000, memory=weights + kv) == []
    [problem] = find_problems(info, n_ctx=1000, memory=weights + kv - 1)
    assert problem.field == "the memory a load needs"
    assert "a 1,000-token context" in problem.why and "--ctx-size" in problem.todo
    assert find_problems(info, n_ctx=1000, memory=None) == []  # unknown memory (or a GPU): no estimate


def test_context_bound_admits_the_longest_real_context(tmp_path: Path) -> None:
    scout = ggufgen.make_llama(tmp_path / "long.gguf", extra_kv={"llama.context_length": 10_485_760})
    assert MAX_CONTEXT == 1 << 24
    assert find_problems(read_gguf(scout)) == []


def test_unknown_architectures_are_left_to_llama_cpp(tmp_path: Path) -> None:
    odd = ggufgen.make_gpt2(tmp_path / "odd.gguf", extra_kv={"general.architecture": "no-such-arch"})
    assert find_problems(read_gguf(odd)) == []  # no keys under its name to check; llama.cpp names it


# ---------------------------------------------------------------- through the CLI


@pytest.mark.parametrize("name", HOSTILE)
def test_complete_refuses_hostile_files(chatcli, hostile: dict[str, Path], name: str) -> None:  # noqa: ANN001
    path = hostile[name]
    result = chatcli("complete", "-m", str(path), "-n", "4", "--temperature", "0", "hi")
    assert result.returncode == ExitCode.ERROR, result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    expected = HOSTILE[name][1]
    if name == "absurd memory estimate":  # the estimate uses this machine's memory: the numbers differ
        expected = "the memory a load needs is ~1.1 TB"
    assert lines[0].startswith(f"error: {path}: {expected}"), lines[0]


def test_show_lists_the_problems_and_still_describes(chatcli, hostile: dict[str, Path]) -> None:  # noqa: ANN001
    import json

    result = chatcli("show", str(hostile["duplicate token"]), "--json")
    assert result.returncode == 0, result.stderr
    details = json.loads(result.stdout)
    assert details["architecture"] == "llama" and details["layers"] == 2
    assert [p.split(":")[0] for p in details["problems"]] == ["tokenizer.ggml.tokens is an array of 272 STRING"]

    table = chatcli("show", str(hostile["block_count 0"]))
    assert table.returncode == 0, table.stderr
    assert "llama.block_count is 0: llama.cpp aborts" in table.stdout + table.stderr


def test_show_reports_no_problems_for_a_sound_model(chatcli, tiny_llama: Path) -> None:  # noqa: ANN001
    import json

    result = chatcli("show", str(tiny_llama), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["problems"] == []


# ---------------------------------------------------------------- when llama.cpp aborts anyway

# The loader below the checks (engine.load_llama), called directly: what a hostile value our checks missed
# would meet. No flag turns the checks off; the test goes one level down instead.
_LOAD = textwrap.dedent("""
    import sys
    from pathlib import Path
    from chatcli.engine import load_llama
    from chatcli.errors import ChatcliError
    try:
        load_llama(Path(sys.argv[1]), n_ctx=64, n_threads=1)
    except ChatcliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    print("loaded")
""")


def _load_directly(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", _LOAD, str(path)], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("name", ABORTING)
def test_llama_cpp_aborts_are_reported_in_one_line(hostile: dict[str, Path], name: str) -> None:
    pytest.importorskip("llama_cpp")
    path = hostile[name]
    result = _load_directly(path)
    assert result.returncode == ExitCode.ERROR, (result.returncode, result.stderr)  # not -6 (SIGABRT)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: llama.cpp aborted while loading {path}: "), lines[0]
    assert "GGML_ASSERT(" in lines[0] and ".cpp:" in lines[0]
    assert "/tmp/" not in lines[0].split(": ", 2)[2]  # the build tree's path is cut
    assert result.stdout == ""


# Load, then decode with two compute threads (both can hit the assert: still one line).
_GENERATE = textwrap.dedent("""
    import sys
    from pathlib import Path
    from chatcli.engine import load_llama
    llm = load_llama(Path(sys.argv[1]), n_ctx=64, n_threads=2, n_threads_batch=2)
    next(llm.generate(llm.tokenize(b"hi"), temp=0.0))
    print("generated")
""")


def test_an_abort_while_generating_is_reported_too(hostile: dict[str, Path]) -> None:
    """An integer norm weight loads, then ggml's binary op aborts at the first decode."""
    pytest.importorskip("llama_cpp")
    path = hostile["an integer norm weight"]
    result = subprocess.run([sys.executable, "-c", _GENERATE, str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == ExitCode.ERROR, (result.returncode, result.stderr)
    [line] = result.stderr.splitlines()
    assert line.startswith(f"error: llama.cpp aborted while running {path}: "), line
    assert "unsupported types" in line


def test_a_sound_model_loads_directly(tiny_llama: Path) -> None:
    pytest.importorskip("llama_cpp")
    result = _load_directly(tiny_llama)
    assert (result.returncode, result.stdout.strip()) == (0, "loaded"), result.stderr


def test_load_failures_quote_llama_cpps_reason(chatcli, tmp_path: Path) -> None:  # noqa: ANN001
    """A file our checks pass but llama.cpp refuses cleanly: the message carries llama.cpp's own words."""
    odd = ggufgen.make_gpt2(tmp_path / "odd.gguf", extra_kv={"general.architecture": "no-such-arch"})
    result = chatcli("complete", "-m", str(odd), "hi")
    assert result.returncode == ExitCode.ERROR
    [line] = result.stderr.splitlines()
    assert "could not load odd.gguf (no-such-arch): unknown model architecture: 'no-such-arch'" in line

    no_ctx = ggufgen.make_llama(tmp_path / "noctx.gguf", extra_kv={"llama.context_length": None})
    result = chatcli("complete", "-m", str(no_ctx), "hi")
    [line] = result.stderr.splitlines()
    assert "key not found in model: llama.context_length" in line, line
