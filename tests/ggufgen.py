"""Tiny, real GGUF models for tests: random weights, a self-made byte-level BPE vocabulary.

The files load in llama.cpp (through llama-cpp-python) in milliseconds and generate tokens,
so tests can exercise the real engine without downloading anything. Weights are random:
the text is gibberish, but deterministic for a given seed.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Mapping
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


def model_kv(arch: str, *, name: str, n_ctx: int, n_embd: int, n_ff: int, n_layer: int,
             n_head: int) -> dict[str, tuple[Any, ...]]:
    """The general.* keys and the hyperparameters every architecture here writes (F16, this project's licence)."""
    return {
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
    }


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
    kv = model_kv(arch, name=name, n_ctx=n_ctx, n_embd=n_embd, n_ff=n_ff, n_layer=n_layer, n_head=n_head)
    kv |= {
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
    drop_tensors: Iterable[str] = (),
    extra_tensors: Mapping[str, np.ndarray[Any, Any]] | None = None,
) -> Path:
    """Write the file. extra_kv overrides defaults; a value of None removes the key.

    drop_tensors leaves those tensors out and extra_tensors adds (or replaces) some: for files that are
    well-formed but do not match their own hyperparameters.
    """
    for name in drop_tensors:
        del tensors[name]
    tensors |= dict(extra_tensors or {})
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
    drop_tensors: Iterable[str] = (),
    extra_tensors: Mapping[str, np.ndarray[Any, Any]] | None = None,
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
    return _write(path, "gpt2", kv, extra_kv, tensors, drop_tensors, extra_tensors)


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
    drop_tensors: Iterable[str] = (),
    extra_tensors: Mapping[str, np.ndarray[Any, Any]] | None = None,
    extra_specials: Iterable[str] = (),
) -> Path:
    """A llama architecture model (RMSNorm, RoPE, SwiGLU, GQA when n_head_kv < n_head, tied output).

    extra_specials adds more control tokens after ChatML's (e.g. a custom end-of-turn marker).

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
        specials=[ENDOFTEXT, IM_START, IM_END, *extra_specials],
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
    return _write(path, "llama", kv, extra_kv, tensors, drop_tensors, extra_tensors)


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


def vocab(*, llama: bool = True) -> list[str]:
    """The token strings make_llama (or, with llama=False, make_gpt2) writes."""
    return make_vocab([ENDOFTEXT, IM_START, IM_END] if llama else [ENDOFTEXT])[0]


def set_tensor_dims(path: str | Path, name: str, dims: tuple[int, ...]) -> Path:
    """Rewrite one tensor's dimensions in place (same number of dims), growing the file to hold its data.

    The growth is a sparse hole: a "1 TB" tensor costs no disk, so a test can make a model whose load
    would need absurd memory. Give the tensor that lies last in the data section, or others will overlap.
    """
    path = Path(path)
    tensor = next(t for t in gguf.GGUFReader(path).tensors if t.name == name)
    block, type_size = gguf.GGML_QUANT_SIZES[tensor.tensor_type]
    start = int(tensor.data_offset)  # absolute
    raw = name.encode()
    with open(path, "r+b") as f:
        head = f.read(start)
        at = head.find(struct.pack("<Q", len(raw)) + raw)
        pos = at + 8 + len(raw)
        (n_dims,) = struct.unpack_from("<I", head, pos)
        if n_dims != len(dims):
            raise ValueError(f"{name} has {n_dims} dims, not {len(dims)}")
        f.seek(pos + 4)
        f.write(b"".join(struct.pack("<Q", d) for d in dims))
    n_elements = 1
    for d in dims:
        n_elements *= d
    os.truncate(path, max(path.stat().st_size, start + n_elements // block * type_size))
    return path


def make_big_llama(
    path: str | Path,
    tensor_type: str,
    *,
    n_embd: int = 2048,
    n_layer: int = 16,
    n_ff: int = 5632,
    n_head: int = 16,
    n_head_kv: int = 4,
    n_ctx: int = 4096,
    chat_template: str | None = CHATML_TEMPLATE,
    parts: int = 1,
    extra_kv: Mapping[str, Any] | None = None,
) -> list[Path]:
    """A real-sized llama GGUF (~0.4-1.5 GB at the defaults) whose tensor data is a sparse hole of zeros.

    The header is complete and consistent (a reader or llama.cpp's loader sees a 0.7B model of `tensor_type`
    weights); the data costs no disk, so a test can serve "1 GB-class" files. With parts > 1 the tensors are
    spread over `{stem}-0000i-of-0000N.gguf` files carrying gguf-split's split.* keys, metadata in the first.
    """
    qtype = gguf.GGMLQuantizationType[tensor_type]
    head_dim = n_embd // n_head
    kv, tokens = _common_kv("llama", name="big-llama", n_ctx=n_ctx, n_embd=n_embd, n_ff=n_ff, n_layer=n_layer,
                            n_head=n_head, specials=[ENDOFTEXT, IM_START, IM_END], pre="llama-bpe",
                            chat_template=chat_template)
    kv |= {
        "general.file_type": ({"F16": 1, "Q8_0": 7, "Q4_K": 15, "Q5_K": 17, "Q6_K": 18}[tensor_type], _VT.UINT32),
        "llama.attention.head_count_kv": (n_head_kv, _VT.UINT32),
        "llama.attention.layer_norm_rms_epsilon": (1e-5, _VT.FLOAT32),
        "llama.rope.dimension_count": (head_dim, _VT.UINT32),
        "llama.vocab_size": (len(tokens), _VT.UINT32),
        "tokenizer.ggml.eos_token_id": (tokens.index(IM_END), _VT.UINT32),
        "tokenizer.ggml.eot_token_id": (tokens.index(IM_END), _VT.UINT32),
    }
    for key, value in (extra_kv or {}).items():
        if value is None:
            kv.pop(key, None)
        else:
            kv[key] = _infer(value)
    # (name, numpy-order shape, ggml type): matrices in tensor_type, norms F32.
    infos: list[tuple[str, tuple[int, ...], gguf.GGMLQuantizationType]] = [
        ("token_embd.weight", (len(tokens), n_embd), gguf.GGMLQuantizationType.F16),
        ("output_norm.weight", (n_embd,), gguf.GGMLQuantizationType.F32),
    ]
    for i in range(n_layer):
        infos += [
            (f"blk.{i}.attn_norm.weight", (n_embd,), gguf.GGMLQuantizationType.F32),
            (f"blk.{i}.attn_q.weight", (n_head * head_dim, n_embd), qtype),
            (f"blk.{i}.attn_k.weight", (n_head_kv * head_dim, n_embd), qtype),
            (f"blk.{i}.attn_v.weight", (n_head_kv * head_dim, n_embd), qtype),
            (f"blk.{i}.attn_output.weight", (n_embd, n_head * head_dim), qtype),
            (f"blk.{i}.ffn_norm.weight", (n_embd,), gguf.GGMLQuantizationType.F32),
            (f"blk.{i}.ffn_gate.weight", (n_ff, n_embd), qtype),
            (f"blk.{i}.ffn_up.weight", (n_ff, n_embd), qtype),
            (f"blk.{i}.ffn_down.weight", (n_embd, n_ff), qtype),
        ]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if parts == 1:
        targets = [path]
    else:
        stem = path.name.removesuffix(".gguf")
        targets = [path.with_name(f"{stem}-{i + 1:05d}-of-{parts:05d}.gguf") for i in range(parts)]
    share = -(-len(infos) // parts)
    for index, target in enumerate(targets):
        mine = infos[index * share:(index + 1) * share]
        writer = gguf.GGUFWriter(target, "llama")
        if index == 0:
            for key, (value, vtype, *sub) in kv.items():
                writer.add_key_value(key, value, vtype, sub[0] if sub else None)
        if parts > 1:
            writer.add_key_value("split.no", index, _VT.UINT16)
            writer.add_key_value("split.count", parts, _VT.UINT16)
            writer.add_key_value("split.tensors.count", len(infos), _VT.INT32)
        data = 0
        for name, shape, ttype in mine:
            block, type_size = gguf.GGML_QUANT_SIZES[ttype]
            n = 1
            for d in shape:
                n *= d
            nbytes = n // block * type_size
            writer.add_tensor_info(name, shape, np.dtype(np.float32), nbytes, raw_dtype=ttype)
            data += -(-nbytes // 32) * 32
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        writer.close()
        header = target.stat().st_size
        os.truncate(target, -(-header // 32) * 32 + data)  # the data section: a sparse hole
    return targets
