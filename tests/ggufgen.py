"""Tiny, real GGUF models for tests: random weights, a self-made byte-level BPE vocabulary.

The files load in llama.cpp (through llama-cpp-python) in milliseconds and generate tokens,
so tests can exercise the real engine without downloading anything. Weights are random:
the text is gibberish, but deterministic for a given seed.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import gguf
import numpy as np

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

LICENSE = "apache-2.0"
FILE_TYPE_F16 = 1  # llama_ftype MOSTLY_F16: 2-D weights F16, norms and biases F32

# A few merges so that "hello world" and "the" become whole tokens.
_MERGES = [
    ("h", "e"),
    ("l", "l"),
    ("he", "ll"),
    ("hell", "o"),
    ("Ġ", "w"),
    ("o", "r"),
    ("Ġw", "or"),
    ("l", "d"),
    ("Ġwor", "ld"),
    ("Ġ", "t"),
    ("Ġt", "he"),
    ("i", "n"),
    ("Ġ", "a"),
]
ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

_TOKEN_NORMAL = 1
_TOKEN_CONTROL = 3


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (space -> 'Ġ', newline -> 'Ċ')."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


def make_vocab(specials: list[str]) -> tuple[list[str], list[int], list[str]]:
    """Tokens, token types and merges: 256 byte tokens, the merge results, then the specials."""
    byte_map = bytes_to_unicode()
    tokens = [byte_map[b] for b in range(256)]
    for left, right in _MERGES:
        tokens.append(left + right)
    types = [_TOKEN_NORMAL] * len(tokens)
    for special in specials:
        tokens.append(special)
        types.append(_TOKEN_CONTROL)
    assert len(set(tokens)) == len(tokens)
    return tokens, types, [f"{left} {right}" for left, right in _MERGES]


class _Weights:
    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def matrix(self, rows: int, cols: int) -> np.ndarray[Any, Any]:
        """A ggml (cols x rows) weight, i.e. numpy shape (rows, cols), small enough for finite logits."""
        return (self.rng.standard_normal((rows, cols)) * 0.02).astype(np.float16)

    @staticmethod
    def ones(n: int) -> np.ndarray[Any, Any]:
        return np.ones(n, dtype=np.float32)

    @staticmethod
    def zeros(n: int) -> np.ndarray[Any, Any]:
        return np.zeros(n, dtype=np.float32)


_VT = gguf.GGUFValueType


def _common_kv(
    arch: str,
    *,
    name: str,
    n_ctx: int,
    n_embd: int,
    n_ff: int,
    n_layer: int,
    n_head: int,
    specials: list[str],
    pre: str,
    chat_template: str | None,
) -> tuple[dict[str, tuple[Any, ...]], list[str]]:
    tokens, types, merges = make_vocab(specials)
    eos = tokens.index(ENDOFTEXT)
    kv: dict[str, tuple[Any, ...]] = {
        "general.type": ("model", _VT.STRING),
        "general.name": (name, _VT.STRING),
        "general.license": (LICENSE, _VT.STRING),
        "general.file_type": (FILE_TYPE_F16, _VT.UINT32),
        "general.quantization_version": (2, _VT.UINT32),
        f"{arch}.context_length": (n_ctx, _VT.UINT32),
        f"{arch}.embedding_length": (n_embd, _VT.UINT32),
        f"{arch}.feed_forward_length": (n_ff, _VT.UINT32),
        f"{arch}.block_count": (n_layer, _VT.UINT32),
        f"{arch}.attention.head_count": (n_head, _VT.UINT32),
        "tokenizer.ggml.model": ("gpt2", _VT.STRING),
        "tokenizer.ggml.pre": (pre, _VT.STRING),
        "tokenizer.ggml.tokens": (tokens, _VT.ARRAY, _VT.STRING),
        "tokenizer.ggml.token_type": (types, _VT.ARRAY, _VT.INT32),
        "tokenizer.ggml.merges": (merges, _VT.ARRAY, _VT.STRING),
        "tokenizer.ggml.bos_token_id": (eos, _VT.UINT32),
        "tokenizer.ggml.eos_token_id": (eos, _VT.UINT32),
        "tokenizer.ggml.add_bos_token": (False, _VT.BOOL),
    }
    if chat_template is not None:
        kv["tokenizer.chat_template"] = (chat_template, _VT.STRING)
    return kv, tokens


def _infer(value: Any) -> tuple[Any, ...]:
    """(value, type[, element type]) for an extra_kv value given as a plain Python value."""
    if isinstance(value, tuple):  # already (value, GGUFValueType[, sub type])
        return value
    if isinstance(value, bool):
        return (value, _VT.BOOL)
    if isinstance(value, int):
        return (value, _VT.INT32 if value < 0 else _VT.UINT32)
    if isinstance(value, float):
        return (value, _VT.FLOAT32)
    if isinstance(value, str):
        return (value, _VT.STRING)
    if isinstance(value, list):
        return (value, _VT.ARRAY, _VT.get_type(value[0]))
    raise TypeError(f"cannot infer a GGUF type for {value!r}")


def _write(
    path: str | Path,
    arch: str,
    kv: dict[str, tuple[Any, ...]],
    extra_kv: Mapping[str, Any] | None,
    tensors: dict[str, np.ndarray[Any, Any]],
) -> Path:
    """Write the file. extra_kv overrides defaults; a value of None removes the key."""
    for key, value in (extra_kv or {}).items():
        if value is None:
            kv.pop(key, None)
        else:
            kv[key] = _infer(value)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(path, arch)
    for key, (value, vtype, *sub) in kv.items():
        writer.add_key_value(key, value, vtype, sub[0] if sub else None)
    for tensor_name, array in tensors.items():
        writer.add_tensor(tensor_name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def make_gpt2(
    path: str | Path,
    *,
    n_ctx: int = 256,
    n_embd: int = 64,
    n_layer: int = 2,
    n_head: int = 2,
    chat_template: str | None = None,
    extra_kv: Mapping[str, Any] | None = None,
    name: str = "tiny-gpt2",
    seed: int = 0,
) -> Path:
    """A GPT-2 architecture model (learned positions, LayerNorm with biases, fused QKV, tied output)."""
    n_ff = 4 * n_embd
    kv, tokens = _common_kv(
        "gpt2",
        name=name,
        n_ctx=n_ctx,
        n_embd=n_embd,
        n_ff=n_ff,
        n_layer=n_layer,
        n_head=n_head,
        specials=[ENDOFTEXT],
        pre="gpt-2",
        chat_template=chat_template,
    )
    kv["gpt2.attention.layer_norm_epsilon"] = (1e-5, _VT.FLOAT32)
    w = _Weights(seed)
    # numpy shapes are ggml's reversed: a (rows, cols) array is a ggml tensor of ne = [cols, rows].
    tensors = {
        "token_embd.weight": w.matrix(len(tokens), n_embd),
        "position_embd.weight": w.matrix(n_ctx, n_embd),
        "output_norm.weight": w.ones(n_embd),
        "output_norm.bias": w.zeros(n_embd),
    }
    for i in range(n_layer):
        tensors |= {
            f"blk.{i}.attn_norm.weight": w.ones(n_embd),
            f"blk.{i}.attn_norm.bias": w.zeros(n_embd),
            f"blk.{i}.attn_qkv.weight": w.matrix(3 * n_embd, n_embd),
            f"blk.{i}.attn_qkv.bias": w.zeros(3 * n_embd),
            f"blk.{i}.attn_output.weight": w.matrix(n_embd, n_embd),
            f"blk.{i}.attn_output.bias": w.zeros(n_embd),
            f"blk.{i}.ffn_norm.weight": w.ones(n_embd),
            f"blk.{i}.ffn_norm.bias": w.zeros(n_embd),
            f"blk.{i}.ffn_up.weight": w.matrix(n_ff, n_embd),
            f"blk.{i}.ffn_up.bias": w.zeros(n_ff),
            f"blk.{i}.ffn_down.weight": w.matrix(n_embd, n_ff),
            f"blk.{i}.ffn_down.bias": w.zeros(n_embd),
        }
    return _write(path, "gpt2", kv, extra_kv, tensors)


def make_llama(
    path: str | Path,
    *,
    n_ctx: int = 256,
    n_embd: int = 64,
    n_layer: int = 2,
    n_head: int = 2,
    n_head_kv: int = 2,
    chat_template: str | None = None,
    extra_kv: Mapping[str, Any] | None = None,
    name: str = "tiny-llama",
    seed: int = 0,
) -> Path:
    """A llama architecture model (RMSNorm, RoPE, SwiGLU, GQA when n_head_kv < n_head, tied output).

    Its vocabulary adds ChatML's <|im_start|> and <|im_end|> as control tokens, so a ChatML
    chat_template (CHATML_TEMPLATE) works with it.
    """
    if n_embd % n_head or n_head % n_head_kv:
        raise ValueError("n_embd must be a multiple of n_head, and n_head of n_head_kv")
    n_ff = 2 * n_embd
    head_dim = n_embd // n_head
    kv, tokens = _common_kv(
        "llama",
        name=name,
        n_ctx=n_ctx,
        n_embd=n_embd,
        n_ff=n_ff,
        n_layer=n_layer,
        n_head=n_head,
        specials=[ENDOFTEXT, IM_START, IM_END],
        pre="llama-bpe",
        chat_template=chat_template,
    )
    kv |= {
        "llama.attention.head_count_kv": (n_head_kv, _VT.UINT32),
        "llama.attention.layer_norm_rms_epsilon": (1e-5, _VT.FLOAT32),
        "llama.rope.dimension_count": (head_dim, _VT.UINT32),
        "llama.rope.freq_base": (10000.0, _VT.FLOAT32),
        "llama.vocab_size": (len(tokens), _VT.UINT32),
        "tokenizer.ggml.eos_token_id": (tokens.index(IM_END), _VT.UINT32),
        "tokenizer.ggml.eot_token_id": (tokens.index(IM_END), _VT.UINT32),
        "tokenizer.ggml.padding_token_id": (tokens.index(ENDOFTEXT), _VT.UINT32),
    }
    w = _Weights(seed)
    tensors = {
        "token_embd.weight": w.matrix(len(tokens), n_embd),
        "output_norm.weight": w.ones(n_embd),
    }
    for i in range(n_layer):
        tensors |= {
            f"blk.{i}.attn_norm.weight": w.ones(n_embd),
            f"blk.{i}.attn_q.weight": w.matrix(n_head * head_dim, n_embd),
            f"blk.{i}.attn_k.weight": w.matrix(n_head_kv * head_dim, n_embd),
            f"blk.{i}.attn_v.weight": w.matrix(n_head_kv * head_dim, n_embd),
            f"blk.{i}.attn_output.weight": w.matrix(n_embd, n_head * head_dim),
            f"blk.{i}.ffn_norm.weight": w.ones(n_embd),
            f"blk.{i}.ffn_gate.weight": w.matrix(n_ff, n_embd),
            f"blk.{i}.ffn_up.weight": w.matrix(n_ff, n_embd),
            f"blk.{i}.ffn_down.weight": w.matrix(n_embd, n_ff),
        }
    return _write(path, "llama", kv, extra_kv, tensors)


def make_garbage(path: str | Path, nbytes: int, *, seed: int = 0) -> Path:
    """A file of `nbytes` random bytes (never starting with the GGUF magic)."""
    data = bytearray(np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8).tobytes())
    if data[:4] == b"GGUF":
        data[0] ^= 0xFF
    path = Path(path)
    path.write_bytes(bytes(data))
    return path


def truncate_copy(src: str | Path, dst: str | Path, nbytes: int) -> Path:
    """A copy of the first `nbytes` bytes of src."""
    dst = Path(dst)
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        fout.write(fin.read(nbytes))
    return dst


def tensor_param_count(path: str | Path) -> int:
    """Sum of element counts of a GGUF's tensors, via the gguf package (the reference reader)."""
    reader = gguf.GGUFReader(path)
    return sum(int(t.n_elements) for t in reader.tensors)
