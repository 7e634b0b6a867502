"""The tiny T5, Mamba and RWKV6 GGUFs of tests/ggufgen_families.py load and run in real llama.cpp.

T5 runs through llama-cpp-python's low-level API as an encoder-decoder (llama_encode, then llama_decode from
the decoder start token); Mamba and RWKV6 through Llama.generate and through llama_decode around a saved and
restored recurrent state.
"""

from __future__ import annotations

import ctypes
import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
import pytest
from ggufgen import CHATML_TEMPLATE, IM_END, vocab
from ggufgen_families import T5_EOS, make_mamba, make_rwkv, make_t5, t5_chain, t5_vocab

T5_EOS_ID = t5_vocab()[0].index(T5_EOS)


def _load(path: Path) -> llama_cpp.Llama:
    # One thread: the models are tiny, and on a busy machine ggml's spinning worker threads cost seconds.
    return llama_cpp.Llama(str(path), n_ctx=256, n_threads=1, n_threads_batch=1, verbose=False)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {
        "t5": make_t5(root / "t5.gguf"),
        "t5_eos": make_t5(root / "t5-eos.gguf", eos_after=4),
        "mamba": make_mamba(root / "mamba.gguf"),
        "rwkv": make_rwkv(root / "rwkv.gguf"),
    }


@pytest.fixture(scope="module")
def t5(models: dict[str, Path]) -> Iterator[llama_cpp.Llama]:
    llm = _load(models["t5"])
    yield llm
    llm.close()


def _logits(llm: llama_cpp.Llama) -> np.ndarray[Any, Any]:
    """The last decoded position's logits, checked finite."""
    row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)).copy()
    assert np.isfinite(row).all()
    return row


def _decode(llm: llama_cpp.Llama, tokens: list[int]) -> None:
    array = (llama_cpp.llama_token * len(tokens))(*tokens)
    assert llama_cpp.llama_decode(llm.ctx, llama_cpp.llama_batch_get_one(array, len(tokens))) == 0


def _clear(llm: llama_cpp.Llama) -> None:
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm.ctx), True)


def t5_greedy(llm: llama_cpp.Llama, text: str, max_tokens: int = 16) -> list[int]:
    """Encode `text` (with its </s>), then decode greedily from the decoder start token up to and with </s>."""
    _clear(llm)
    tokens = llm.tokenize(text.encode(), add_bos=True)  # add_bos means "add the specials": here, </s>
    # A batch whose every token is an output: the encoder's result is all of them (llama_batch_get_one would
    # mark only the last, and llama.cpp logs that it overrides that).
    batch = llama_cpp.llama_batch_init(len(tokens), 0, 1)
    try:
        batch.n_tokens = len(tokens)
        for i, token in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, i, 1, True
            batch.seq_id[i][0] = 0
        assert llama_cpp.llama_encode(llm.ctx, batch) == 0
    finally:
        llama_cpp.llama_batch_free(batch)
    token = llama_cpp.llama_model_decoder_start_token(llm.model)
    out: list[int] = []
    while len(out) < max_tokens:
        _decode(llm, [token])
        token = int(np.argmax(_logits(llm)))
        out.append(token)
        if token == T5_EOS_ID:
            break
    return out


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    for make in (make_t5, make_mamba, make_rwkv):
        a, b, c = (make(tmp_path / f"{name}.gguf", seed=seed) for name, seed in (("a", 0), ("b", 0), ("c", 1)))
        assert a.read_bytes() == b.read_bytes() != c.read_bytes(), make.__name__


def test_t5_is_an_encoder_decoder_with_t5_tokens(t5: llama_cpp.Llama) -> None:
    assert llama_cpp.llama_model_has_encoder(t5.model)
    assert llama_cpp.llama_model_has_decoder(t5.model)
    assert llama_cpp.llama_model_decoder_start_token(t5.model) == 0  # <pad>, as in T5
    assert t5.token_eos() == T5_EOS_ID
    tokens = t5.tokenize(b"hello world", add_bos=True)
    assert [t5_vocab()[0][t] for t in tokens] == ["\u2581hello", "\u2581world", T5_EOS]


def test_t5_greedy_decoding_is_deterministic_and_runs_to_its_limit(t5: llama_cpp.Llama) -> None:
    first = t5_greedy(t5, "hello world", max_tokens=12)
    assert first == t5_greedy(t5, "hello world", max_tokens=12)
    assert len(first) == 12 and T5_EOS_ID not in first


def test_t5_decoding_depends_on_the_encoder_input(t5: llama_cpp.Llama) -> None:
    outputs = {tuple(t5_greedy(t5, text, max_tokens=8)) for text in ("hello world", "the cat", "a dog is it")}
    assert len(outputs) > 1


def test_t5_eos_after_stops_at_its_end_token(models: dict[str, Path]) -> None:
    llm = _load(models["t5_eos"])
    try:
        for text in ("hello world", "the cat and the dog"):
            assert t5_greedy(llm, text) == [*t5_chain(4), T5_EOS_ID]
        assert llm.detokenize(t5_chain(4)) == b" hello world the a"
    finally:
        llm.close()


@pytest.mark.parametrize("family", ["mamba", "rwkv"])
def test_recurrent_model_generates_deterministically(models: dict[str, Path], family: str) -> None:
    runs = []
    for _ in range(2):
        llm = _load(models[family])
        try:
            assert llama_cpp.llama_model_is_recurrent(llm.model)
            assert not llama_cpp.llama_model_has_encoder(llm.model)
            prompt = llm.tokenize(b"hello world, the", add_bos=False)
            for _ in range(2):  # twice in one Llama: generate resets the recurrent state
                runs.append(list(itertools.islice(llm.generate(prompt, temp=0.0), 10)))
        finally:
            llm.close()
    assert len(runs[0]) == 10 and all(run == runs[0] for run in runs)


@pytest.mark.parametrize("family", ["mamba", "rwkv"])
def test_recurrent_model_chats_in_chatml(models: dict[str, Path], family: str) -> None:
    llm = _load(models[family])
    try:
        assert llm.metadata["tokenizer.chat_template"] == CHATML_TEMPLATE
        assert llm.token_eos() == vocab().index(IM_END)
        reply = llm.create_chat_completion([{"role": "user", "content": "hello"}], max_tokens=6, temperature=0.0)
        assert isinstance(reply, dict)  # not a stream
        assert reply["choices"][0]["message"]["role"] == "assistant"
    finally:
        llm.close()


def _greedy_steps(llm: llama_cpp.Llama, token: int, n: int) -> tuple[list[int], np.ndarray[Any, Any]]:
    """Feed `token`, then n - 1 more greedy picks: the n tokens picked and the logits they were picked from."""
    picked, rows = [], []
    for _ in range(n):
        _decode(llm, [token])
        rows.append(_logits(llm))
        token = int(np.argmax(rows[-1]))
        picked.append(token)
    return picked, np.stack(rows)


@pytest.mark.parametrize("family", ["mamba", "rwkv"])
def test_recurrent_state_round_trip_continues_identically(models: dict[str, Path], family: str) -> None:
    llm = _load(models[family])
    try:
        _clear(llm)
        _decode(llm, llm.tokenize(b"hello world, the", add_bos=False))
        following = int(np.argmax(_logits(llm)))
        size = llama_cpp.llama_state_get_size(llm.ctx)
        state = (ctypes.c_uint8 * size)()
        written = llama_cpp.llama_state_get_data(llm.ctx, state, size)
        assert 0 < written <= size
        straight, straight_logits = _greedy_steps(llm, following, 8)

        _clear(llm)
        _decode(llm, llm.tokenize(b"something else entirely", add_bos=False))
        other_logits = _greedy_steps(llm, following, 8)[1]
        assert not np.allclose(other_logits, straight_logits, atol=1e-4)  # the state carries the prompt
        assert llama_cpp.llama_state_set_data(llm.ctx, state, written) == written
        restored, restored_logits = _greedy_steps(llm, following, 8)
        assert restored == straight
        np.testing.assert_allclose(restored_logits, straight_logits, rtol=0, atol=1e-5)
    finally:
        llm.close()
