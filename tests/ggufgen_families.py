"""Tiny, real GGUFs of the non-transformer-decoder families: T5 (encoder-decoder), Mamba and RWKV6 (recurrent).

Each file loads in llama.cpp (through llama-cpp-python) in milliseconds and runs: T5 through llama_encode plus
llama_decode from the decoder start token, Mamba and RWKV6 through plain llama_decode with a recurrent state
instead of a KV cache. Weights are random and seeded (same seed, same bytes); the text is gibberish.

Layouts follow llama.cpp's src/models/{t5,mamba,rwkv6}.cpp load_arch_tensors (numpy shapes are ggml's
reversed) and gguf's MODEL_TENSORS. Mamba and RWKV6 use tests/ggufgen.py's byte-level BPE vocabulary with
ChatML's specials, so a ChatML chat template works; T5 uses its own tokenizer model, "t5" (SentencePiece
unigram, llama.cpp's UGM), with T5's fixed ids: <pad> 0 (also the decoder start), </s> 1, <unk> 2.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
from ggufgen import (
    _VT,
    CHATML_TEMPLATE,
    ENDOFTEXT,
    IM_END,
    IM_START,
    _common_kv,
    _Weights,
    _write,
    model_kv,
)

PHANTOM = "\u2581"  # SentencePiece's visible space
T5_PAD, T5_EOS, T5_UNK = "<pad>", "</s>", "<unk>"
T5_WORDS = "hello world the a an and of to in is it cat dog".split()
T5_CHARS = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [chr(c) for c in range(ord("A"), ord("Z") + 1)]
T5_CHARS += [str(d) for d in range(10)] + list(".,!?;:'\"()-")

_TOKEN_NORMAL, _TOKEN_UNKNOWN, _TOKEN_CONTROL = 1, 2, 3


def t5_vocab() -> tuple[list[str], list[float], list[int]]:
    """Tokens, unigram scores (log-probabilities) and token types; <pad> 0, </s> 1, <unk> 2 as in T5.

    Whole words ("▁hello") score higher than the characters that spell them, so the unigram Viterbi search
    keeps a known word in one piece; a character outside the vocabulary becomes <unk>.
    """
    tokens = [T5_PAD, T5_EOS, T5_UNK]
    scores = [0.0, 0.0, 0.0]
    types = [_TOKEN_CONTROL, _TOKEN_CONTROL, _TOKEN_UNKNOWN]
    pieces = [(PHANTOM + w, -5.0) for w in T5_WORDS] + [(PHANTOM, -8.0)]
    pieces += [(PHANTOM + c, -9.0) for c in T5_CHARS] + [(c, -10.0) for c in T5_CHARS]
    for piece, score in pieces:
        if piece not in tokens:  # llama.cpp refuses two equal token strings ("▁a" is a word and a letter)
            tokens.append(piece)
            scores.append(score)
            types.append(_TOKEN_NORMAL)
    return tokens, scores, types


def _f32(array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    return np.ascontiguousarray(array, dtype=np.float32)


def make_t5(
    path: str | Path,
    *,
    seed: int = 0,
    chat_template: str | None = None,
    eos_after: int | None = None,
    n_embd: int = 64,
    n_layer: int = 2,
    n_head: int = 2,
    n_ctx: int = 256,
    n_rel_buckets: int = 32,
    name: str = "tiny-t5",
) -> Path:
    """A flan-T5 style model (arch "t5": RMSNorm, relative position buckets, gated-GELU FFN, untied output).

    Greedy decoding of the default model does not pick </s> (its output row is zero while the best random logit
    is positive; checked for 100 tokens over 8 seeds), so generation runs to its token limit.

    With eos_after=N the output layer is rebuilt so that greedy decoding from the decoder start token emits
    exactly N ordinary tokens (t5_chain(N)) and then </s>, whatever the encoder input: each token's embedding
    selects the next token of a fixed chain (checked for N up to 30 over 8 seeds).
    """
    if n_embd % n_head:
        raise ValueError("n_embd must be a multiple of n_head")
    tokens, scores, types = t5_vocab()
    n_vocab = len(tokens)
    n_ff = 2 * n_embd
    kv = model_kv("t5", name=name, n_ctx=n_ctx, n_embd=n_embd, n_ff=n_ff, n_layer=n_layer, n_head=n_head)
    kv |= {
        "t5.attention.key_length": (n_embd // n_head, _VT.UINT32),
        "t5.attention.value_length": (n_embd // n_head, _VT.UINT32),
        "t5.attention.layer_norm_epsilon": (1e-6, _VT.FLOAT32),
        "t5.attention.layer_norm_rms_epsilon": (1e-6, _VT.FLOAT32),
        "t5.attention.relative_buckets_count": (n_rel_buckets, _VT.UINT32),
        "t5.decoder_start_token_id": (tokens.index(T5_PAD), _VT.UINT32),
        "tokenizer.ggml.model": ("t5", _VT.STRING),
        "tokenizer.ggml.pre": ("default", _VT.STRING),
        "tokenizer.ggml.tokens": (tokens, _VT.ARRAY, _VT.STRING),
        "tokenizer.ggml.scores": (scores, _VT.ARRAY, _VT.FLOAT32),
        "tokenizer.ggml.token_type": (types, _VT.ARRAY, _VT.INT32),
        "tokenizer.ggml.add_space_prefix": (True, _VT.BOOL),
        "tokenizer.ggml.remove_extra_whitespaces": (True, _VT.BOOL),
        "tokenizer.ggml.eos_token_id": (tokens.index(T5_EOS), _VT.UINT32),
        "tokenizer.ggml.unknown_token_id": (tokens.index(T5_UNK), _VT.UINT32),
        "tokenizer.ggml.padding_token_id": (tokens.index(T5_PAD), _VT.UINT32),
        "tokenizer.ggml.add_bos_token": (False, _VT.BOOL),
        "tokenizer.ggml.add_eos_token": (True, _VT.BOOL),
    }
    if chat_template is not None:
        kv["tokenizer.chat_template"] = (chat_template, _VT.STRING)
    w = _Weights(seed)
    # Embeddings of unit scale, layers at 0.02: the residual stream stays close to the input token's embedding,
    # which is what lets eos_after steer greedy decoding.
    embd = w.rng.standard_normal((n_vocab, n_embd)).astype(np.float32)
    output = w.matrix(n_vocab, n_embd).astype(np.float32)
    output[tokens.index(T5_EOS)] = 0.0
    if eos_after is not None:
        chain = [tokens.index(T5_PAD), *t5_chain(eos_after), tokens.index(T5_EOS)]
        for current, following in itertools.pairwise(chain):
            unit = embd[current] / np.sqrt(np.mean(embd[current] ** 2))  # what the final RMSNorm sees
            output[following] = 0.2 * unit  # a logit of ~0.2 * n_embd against ~0.2 * sqrt(n_embd) for the rest
    tensors: dict[str, np.ndarray[Any, Any]] = {
        "token_embd.weight": embd.astype(np.float16),
        "output.weight": output.astype(np.float16),
        "enc.output_norm.weight": w.ones(n_embd),
        "dec.output_norm.weight": w.ones(n_embd),
    }
    # Relative position biases: only block 0 has them; the other blocks reuse block 0's (as in HF T5).
    rel_bias = _f32(w.rng.standard_normal((n_rel_buckets, n_head)) * 0.1)  # ggml {n_head, n_rel_buckets}
    for i in range(n_layer):
        for part in ("enc", "dec"):
            blk = f"{part}.blk.{i}"
            tensors |= {
                f"{blk}.attn_norm.weight": w.ones(n_embd),
                f"{blk}.attn_q.weight": w.matrix(n_embd, n_embd),
                f"{blk}.attn_k.weight": w.matrix(n_embd, n_embd),
                f"{blk}.attn_v.weight": w.matrix(n_embd, n_embd),
                f"{blk}.attn_o.weight": w.matrix(n_embd, n_embd),
                f"{blk}.ffn_norm.weight": w.ones(n_embd),
                f"{blk}.ffn_gate.weight": w.matrix(n_ff, n_embd),
                f"{blk}.ffn_up.weight": w.matrix(n_ff, n_embd),
                f"{blk}.ffn_down.weight": w.matrix(n_embd, n_ff),
            }
            if i == 0:
                tensors[f"{blk}.attn_rel_b.weight"] = rel_bias.copy()
        tensors |= {
            f"dec.blk.{i}.cross_attn_norm.weight": w.ones(n_embd),
            f"dec.blk.{i}.cross_attn_q.weight": w.matrix(n_embd, n_embd),
            f"dec.blk.{i}.cross_attn_k.weight": w.matrix(n_embd, n_embd),
            f"dec.blk.{i}.cross_attn_v.weight": w.matrix(n_embd, n_embd),
            f"dec.blk.{i}.cross_attn_o.weight": w.matrix(n_embd, n_embd),
        }
    return _write(path, "t5", kv, None, tensors)


def t5_chain(n: int) -> list[int]:
    """The n token ids that make_t5(eos_after=n) generates before </s>: its whole words, then its letters."""
    tokens = t5_vocab()[0]
    chain = [tokens.index(PHANTOM + word) for word in T5_WORDS] + [tokens.index(c) for c in T5_CHARS]
    if not 0 <= n <= len(chain):
        raise ValueError(f"eos_after must be between 0 and {len(chain)}")
    return chain[:n]


def _chatml_kv(arch: str, *, name: str, n_ctx: int, n_embd: int, n_ff: int, n_layer: int,
               chat_template: str | None) -> tuple[dict[str, tuple[Any, ...]], list[str]]:
    """make_llama's vocabulary and special tokens (ChatML's, <|im_end|> ends a turn) for another arch."""
    kv, tokens = _common_kv(arch, name=name, n_ctx=n_ctx, n_embd=n_embd, n_ff=n_ff, n_layer=n_layer, n_head=0,
                            specials=[ENDOFTEXT, IM_START, IM_END], pre="llama-bpe", chat_template=chat_template)
    kv |= {
        f"{arch}.vocab_size": (len(tokens), _VT.UINT32),
        "tokenizer.ggml.eos_token_id": (tokens.index(IM_END), _VT.UINT32),
        "tokenizer.ggml.eot_token_id": (tokens.index(IM_END), _VT.UINT32),
        "tokenizer.ggml.padding_token_id": (tokens.index(ENDOFTEXT), _VT.UINT32),
    }
    return kv, tokens


def make_mamba(
    path: str | Path,
    *,
    seed: int = 0,
    chat_template: str | None = CHATML_TEMPLATE,
    n_embd: int = 64,
    n_layer: int = 2,
    d_state: int = 16,
    d_conv: int = 4,
    n_ctx: int = 256,
    name: str = "tiny-mamba",
) -> Path:
    """A Mamba 1 model (arch "mamba": selective SSM blocks, RMSNorm, untied output), ChatML vocabulary.

    llama.cpp supports only an expansion factor of 2 (d_inner = 2 * n_embd); dt_rank is ceil(n_embd / 16).
    """
    d_inner = 2 * n_embd
    dt_rank = -(-n_embd // 16)
    kv, tokens = _chatml_kv("mamba", name=name, n_ctx=n_ctx, n_embd=n_embd, n_ff=0, n_layer=n_layer,
                            chat_template=chat_template)
    kv |= {
        "mamba.ssm.conv_kernel": (d_conv, _VT.UINT32),
        "mamba.ssm.inner_size": (d_inner, _VT.UINT32),
        "mamba.ssm.state_size": (d_state, _VT.UINT32),
        "mamba.ssm.time_step_rank": (dt_rank, _VT.UINT32),
        "mamba.attention.layer_norm_rms_epsilon": (1e-5, _VT.FLOAT32),
    }
    w = _Weights(seed)
    tensors: dict[str, np.ndarray[Any, Any]] = {
        "token_embd.weight": w.matrix(len(tokens), n_embd),
        "output_norm.weight": w.ones(n_embd),
        "output.weight": w.matrix(len(tokens), n_embd),
    }
    # Mamba's own initialisation: A = -[1..d_state] per channel (stored as A, not A_log), D = 1, and a dt bias
    # of softplus^-1(0.1). ssm_out is 0.2 rather than 0.02 so that the state, not only the current token,
    # moves the logits: a different prompt gives a different greedy continuation.
    ssm_a = _f32(-np.tile(np.arange(1, d_state + 1, dtype=np.float32), (d_inner, 1)))
    dt_bias = float(np.log(np.expm1(0.1)))
    for i in range(n_layer):
        tensors |= {
            f"blk.{i}.attn_norm.weight": w.ones(n_embd),
            f"blk.{i}.ssm_in.weight": w.matrix(2 * d_inner, n_embd),
            f"blk.{i}.ssm_conv1d.weight": _f32(w.rng.standard_normal((d_inner, d_conv)) * 0.2),
            f"blk.{i}.ssm_conv1d.bias": w.zeros(d_inner),
            f"blk.{i}.ssm_x.weight": w.matrix(dt_rank + 2 * d_state, d_inner),
            f"blk.{i}.ssm_dt.weight": w.matrix(d_inner, dt_rank),
            f"blk.{i}.ssm_dt.bias": _f32(np.full(d_inner, dt_bias)),
            f"blk.{i}.ssm_a": ssm_a.copy(),
            f"blk.{i}.ssm_d": w.ones(d_inner),
            f"blk.{i}.ssm_out.weight": w.matrix(n_embd, d_inner) * 10,
        }
    return _write(path, "mamba", kv, None, tensors)


def make_rwkv(
    path: str | Path,
    *,
    seed: int = 0,
    chat_template: str | None = CHATML_TEMPLATE,
    n_embd: int = 64,
    n_layer: int = 2,
    head_size: int = 32,
    n_ctx: int = 256,
    name: str = "tiny-rwkv6",
) -> Path:
    """An RWKV-6 "Finch" model (arch "rwkv6": time mix with data-dependent decay, channel mix, LayerNorm).

    ChatML vocabulary (byte-level BPE, not RWKV's own "rwkv" tokenizer). head_count is written as 0, as
    convert_hf_to_gguf.py does: the WKV heads are n_embd / head_size.
    """
    if n_embd % head_size:
        raise ValueError("n_embd must be a multiple of head_size")
    n_ff = 2 * n_embd
    mix_extra, decay_extra = 8, 16  # the LoRA ranks of the token-shift mix and of the decay
    kv, tokens = _chatml_kv("rwkv6", name=name, n_ctx=n_ctx, n_embd=n_embd, n_ff=n_ff, n_layer=n_layer,
                            chat_template=chat_template)
    kv |= {
        "rwkv6.attention.layer_norm_epsilon": (1e-5, _VT.FLOAT32),
        "rwkv6.wkv.head_size": (head_size, _VT.UINT32),
        "rwkv6.time_mix_extra_dim": (mix_extra, _VT.UINT32),
        "rwkv6.time_decay_extra_dim": (decay_extra, _VT.UINT32),
        "rwkv6.rescale_every_n_layers": (6, _VT.UINT32),
        "rwkv6.token_shift_count": (2, _VT.UINT32),
    }
    w = _Weights(seed)

    def small(*shape: int, scale: float = 0.02) -> np.ndarray[Any, Any]:
        return _f32(w.rng.standard_normal(shape) * scale)

    def lerp(*shape: int) -> np.ndarray[Any, Any]:  # token-shift mix factors in (0, 1)
        return _f32(w.rng.uniform(0.2, 0.8, shape))

    # Gate and output of the time mix are 0.2 rather than 0.02 so that the WKV state, not only the current
    # token, moves the logits: a different prompt gives a different greedy continuation.
    tensors: dict[str, np.ndarray[Any, Any]] = {
        "token_embd.weight": w.matrix(len(tokens), n_embd),
        "token_embd_norm.weight": w.ones(n_embd),
        "token_embd_norm.bias": w.zeros(n_embd),
        "output_norm.weight": w.ones(n_embd),
        "output_norm.bias": w.zeros(n_embd),
        "output.weight": w.matrix(len(tokens), n_embd),
    }
    for i in range(n_layer):
        blk = f"blk.{i}"
        tensors |= {
            f"{blk}.attn_norm.weight": w.ones(n_embd),
            f"{blk}.attn_norm.bias": w.zeros(n_embd),
            f"{blk}.attn_norm_2.weight": w.ones(n_embd),
            f"{blk}.attn_norm_2.bias": w.zeros(n_embd),
            f"{blk}.time_mix_w1.weight": small(5 * mix_extra, n_embd),  # ggml {n_embd, 5 * extra}
            f"{blk}.time_mix_w2.weight": small(5, n_embd, mix_extra),  # ggml {extra, n_embd, 5}
            f"{blk}.time_mix_lerp_x.weight": lerp(1, 1, n_embd),
            f"{blk}.time_mix_lerp_fused.weight": lerp(5, 1, 1, n_embd),  # w, k, v, r, g
            f"{blk}.time_mix_first.weight": small(n_embd // head_size, head_size, scale=0.1),
            # decay: w = exp(-exp(decay)), so -1 keeps ~70% of the state per token
            f"{blk}.time_mix_decay.weight": _f32(np.full(n_embd, -1.0)),
            f"{blk}.time_mix_decay_w1.weight": small(decay_extra, n_embd),
            f"{blk}.time_mix_decay_w2.weight": small(n_embd, decay_extra),
            f"{blk}.time_mix_key.weight": w.matrix(n_embd, n_embd),
            f"{blk}.time_mix_value.weight": w.matrix(n_embd, n_embd),
            f"{blk}.time_mix_receptance.weight": w.matrix(n_embd, n_embd),
            f"{blk}.time_mix_gate.weight": w.matrix(n_embd, n_embd) * 10,
            f"{blk}.time_mix_ln.weight": w.ones(n_embd),
            f"{blk}.time_mix_ln.bias": w.zeros(n_embd),
            f"{blk}.time_mix_output.weight": w.matrix(n_embd, n_embd) * 10,
            f"{blk}.channel_mix_lerp_k.weight": lerp(1, 1, n_embd),
            f"{blk}.channel_mix_lerp_r.weight": lerp(1, 1, n_embd),
            f"{blk}.channel_mix_key.weight": w.matrix(n_ff, n_embd),
            f"{blk}.channel_mix_value.weight": w.matrix(n_embd, n_ff),
            f"{blk}.channel_mix_receptance.weight": w.matrix(n_embd, n_embd),
        }
    return _write(path, "rwkv6", kv, None, tensors)
