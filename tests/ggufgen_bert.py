"""A tiny, real BERT GGUF for embedding tests: random seeded weights, a small WordPiece vocabulary.

llama.cpp loads it as an encoder (arch "bert", tokenizer model "bert") and, with `embedding=True`, returns
one vector of width n_embd per text, pooled as the header says (mean by default). The weights are random,
so the vectors carry no meaning, but they are finite, deterministic for a seed, and depend on every token:
equal texts give equal vectors, different texts different ones.

Layout as in llama.cpp's src/llama-model.cpp (LLM_ARCH_BERT) and gguf's MODEL_TENSORS[BERT]: token_embd,
token_types ([n_embd, token_type_count]), position_embd ([n_embd, n_ctx_train]), token_embd_norm (+bias);
per block attn_q/k/v (+bias), attn_output (+bias), attn_output_norm (+bias), ffn_up/ffn_down (+bias),
layer_output_norm (+bias). numpy shapes are ggml's reversed.

The vocabulary is written as convert_hf_to_gguf.py writes a BERT one: a word-initial piece carries the
phantom space U+2581 ("▁the"), a "##" continuation loses its "##" ("ing"), and the [BRACKETED] specials stay
as they are. llama.cpp's WordPiece tokenizer lower-cases, splits on spaces and punctuation, and matches the
longest piece; a word it cannot spell becomes [UNK].
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from ggufgen import _VT, _Weights, _write, model_kv

PHANTOM = "\u2581"
PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIALS = [PAD, UNK, CLS, SEP, MASK]

# Whole words (written "▁word"), then "##" continuations (written bare). Letters and digits both ways, so any
# lower-case ASCII word can be spelt; punctuation as words (the tokenizer splits it off).
WORDS = """
the a an and or of to in on at for with from by is are was were be been it this that these those i you he she
we they my your his her our their what which who how why when where not no yes all some any one two three
cat cats dog dogs bird fish animal animals pet pets kitten puppy horse cow
car cars bus train plane bike road drive driving engine wheel
apple apples banana fruit food eat eating bread cheese pizza soup cook cooking kitchen
rain sun snow weather cloud wind storm hot cold warm
computer code program python software bug data file network server
music song sing guitar piano play playing
house home room door window table chair bed
city town street river sea lake mountain tree forest park
happy sad good bad big small new old fast slow
quick brown fox jumps over lazy hello world
""".split()
CONTINUATIONS = ["s", "es", "ed", "ing", "er", "ly", "est", "ion", "ness"]
LETTERS = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
PUNCTUATION = list(".,!?;:'\"()-")

TOKEN_NORMAL, TOKEN_CONTROL = 1, 3


def bert_vocab() -> tuple[list[str], list[int]]:
    """Tokens and token types, specials first: [PAD] 0, [UNK] 1, [CLS] 2, [SEP] 3, [MASK] 4."""
    tokens = list(SPECIALS)
    seen = set(tokens)
    pieces = [PHANTOM + w for w in [*WORDS, *LETTERS, *PUNCTUATION]] + CONTINUATIONS + LETTERS
    for piece in pieces:
        if piece not in seen:  # llama.cpp aborts on two equal token strings
            seen.add(piece)
            tokens.append(piece)
    types = [TOKEN_CONTROL] * len(SPECIALS) + [TOKEN_NORMAL] * (len(tokens) - len(SPECIALS))
    return tokens, types


def make_bert(
    path: str | Path,
    *,
    seed: int = 0,
    n_embd: int = 64,
    n_layer: int = 2,
    n_head: int = 2,
    n_ff: int | None = None,
    n_ctx: int = 128,
    pooling: int = 1,  # llama_pooling_type: 1 mean, 2 cls, 3 last
    name: str = "tiny-bert",
    extra_kv: Mapping[str, Any] | None = None,
    drop_tensors: Iterable[str] = (),
    extra_tensors: Mapping[str, np.ndarray[Any, Any]] | None = None,
) -> Path:
    """Write a BERT encoder GGUF (F16 weights, F32 norms and biases) to `path`; n_ctx is its trained context."""
    if n_embd % n_head:
        raise ValueError("n_embd must be a multiple of n_head")
    n_ff = n_ff or 4 * n_embd
    n_types = 2
    tokens, types = bert_vocab()
    arch = "bert"
    kv = model_kv(arch, name=name, n_ctx=n_ctx, n_embd=n_embd, n_ff=n_ff, n_layer=n_layer, n_head=n_head)
    kv |= {
        f"{arch}.attention.layer_norm_epsilon": (1e-12, _VT.FLOAT32),
        f"{arch}.attention.causal": (False, _VT.BOOL),
        f"{arch}.pooling_type": (pooling, _VT.UINT32),
        "tokenizer.ggml.model": ("bert", _VT.STRING),
        "tokenizer.ggml.pre": ("default", _VT.STRING),
        "tokenizer.ggml.tokens": (tokens, _VT.ARRAY, _VT.STRING),
        "tokenizer.ggml.token_type": (types, _VT.ARRAY, _VT.INT32),
        "tokenizer.ggml.token_type_count": (n_types, _VT.UINT32),
        "tokenizer.ggml.bos_token_id": (tokens.index(CLS), _VT.UINT32),
        "tokenizer.ggml.seperator_token_id": (tokens.index(SEP), _VT.UINT32),
        "tokenizer.ggml.unknown_token_id": (tokens.index(UNK), _VT.UINT32),
        "tokenizer.ggml.padding_token_id": (tokens.index(PAD), _VT.UINT32),
        "tokenizer.ggml.mask_token_id": (tokens.index(MASK), _VT.UINT32),
        "tokenizer.ggml.add_bos_token": (True, _VT.BOOL),
        "tokenizer.ggml.add_sep_token": (True, _VT.BOOL),
    }
    w = _Weights(seed)

    def embedding(rows: int) -> np.ndarray[Any, Any]:
        # wider than the 0.02 of the other matrices: the tokens, not the noise, should set the vector
        return (w.rng.standard_normal((rows, n_embd)) * 0.5).astype(np.float16)

    def bias(n: int) -> np.ndarray[Any, Any]:
        return (w.rng.standard_normal(n) * 0.02).astype(np.float32)

    tensors = {
        "token_embd.weight": embedding(len(tokens)),
        "token_types.weight": w.matrix(n_types, n_embd).astype(np.float32),
        "position_embd.weight": w.matrix(n_ctx, n_embd).astype(np.float32),
        "token_embd_norm.weight": w.ones(n_embd),
        "token_embd_norm.bias": w.zeros(n_embd),
    }
    for i in range(n_layer):
        blk = f"blk.{i}."
        tensors |= {
            blk + "attn_q.weight": w.matrix(n_embd, n_embd),
            blk + "attn_q.bias": bias(n_embd),
            blk + "attn_k.weight": w.matrix(n_embd, n_embd),
            blk + "attn_k.bias": bias(n_embd),
            blk + "attn_v.weight": w.matrix(n_embd, n_embd),
            blk + "attn_v.bias": bias(n_embd),
            blk + "attn_output.weight": w.matrix(n_embd, n_embd),
            blk + "attn_output.bias": bias(n_embd),
            blk + "attn_output_norm.weight": w.ones(n_embd),
            blk + "attn_output_norm.bias": w.zeros(n_embd),
            blk + "ffn_up.weight": w.matrix(n_ff, n_embd),
            blk + "ffn_up.bias": bias(n_ff),
            blk + "ffn_down.weight": w.matrix(n_embd, n_ff),
            blk + "ffn_down.bias": bias(n_embd),
            blk + "layer_output_norm.weight": w.ones(n_embd),
            blk + "layer_output_norm.bias": w.zeros(n_embd),
        }
    return _write(path, arch, kv, extra_kv, tensors, drop_tensors, extra_tensors)
