#!/usr/bin/env python3
"""Structure-aware fuzzing of chatcli's model loading: hostile GGUF files must never kill it silently.

Why: llama.cpp trusts the values in a GGUF header and aborts the whole process on some of them; chatcli
checks headers before loading (gguf_info, gguf_checks) and reports an abort it missed in one line
(engine's abort handler). This script mutates tiny generated models (tests/ggufgen.py) where it hurts:
header counts, string and array lengths, value types, tensor dims/types/offsets, hyperparameters, the
tokenizer arrays, the architecture, truncation and byte flips; runs `chatcli show FILE` and
`chatcli complete -m FILE ...` on each, in a fresh CHATCLI_HOME, and classifies what happened:

  ok            exit 0
  refused       exit 1/2/3 and stderr is exactly one `error: ` line (no traceback, no internal error)
  abort caught  a refusal whose line says llama.cpp aborted: clean for the user, but a check is missing
  crash         killed by a signal (rc < 0, 134, 139, ...)
  hang          no exit within --timeout
  traceback     a Python traceback on stderr
  silent exit   non-zero exit with nothing on stderr
  bad refusal   any other failure (several lines, `internal error`, an unexpected exit code)

It prints a table and exits 1 if any outcome is bad (crash, hang, traceback, silent exit, bad refusal).
Mutant N of seed S is the same file whatever --jobs is, so a failure can be replayed with --only N.

    python scripts/fuzz_gguf.py --count 1000 --seed 1 --jobs 2 --out /tmp/fuzz
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BAD = ("crash", "hang", "traceback", "silent exit", "bad refusal")
OUTCOMES = ("ok", "refused", "abort caught", *BAD)

# GGUF value types
U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
_SCALAR = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<?",
           U64: "<Q", I64: "<q", F64: "<d"}
_INTS = (U8, I8, U16, I16, U32, I32, U64, I64)


def _load_ggufgen() -> Any:
    spec = importlib.util.spec_from_file_location("ggufgen", ROOT / "tests" / "ggufgen.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------- a GGUF we can rewrite at will


@dataclass
class KV:
    key: str
    vtype: int
    value: Any  # scalar, str, or list (for ARRAY)
    etype: int | None = None  # element type of an ARRAY


@dataclass
class Tensor:
    name: str
    dims: list[int]
    ttype: int
    offset: int  # relative to the data section


@dataclass
class Model:
    version: int
    kvs: list[KV]
    tensors: list[Tensor]
    data: bytes
    alignment: int = 32
    # Lies told while writing: kv index -> a wrong length for its string or array; header count overrides.
    length_lies: dict[int, int] = field(default_factory=dict)
    count_lies: dict[str, int] = field(default_factory=dict)
    type_lies: dict[int, int] = field(default_factory=dict)  # kv index -> a wrong type id, payload unchanged

    def kv(self, key: str) -> KV | None:
        return next((k for k in self.kvs if k.key == key), None)

    def index(self, key: str) -> int:
        return next(i for i, k in enumerate(self.kvs) if k.key == key)

    @property
    def arch(self) -> str:
        kv = self.kv("general.architecture")
        return kv.value if kv else "llama"


def _read_value(buf: bytes, pos: int, vtype: int) -> tuple[Any, int]:
    if vtype == STRING:
        (n,) = struct.unpack_from("<Q", buf, pos)
        return buf[pos + 8 : pos + 8 + n].decode("utf-8", "surrogateescape"), pos + 8 + n
    fmt = _SCALAR[vtype]
    return struct.unpack_from(fmt, buf, pos)[0], pos + struct.calcsize(fmt)


def parse(buf: bytes) -> Model:
    """Parse a sound GGUF (one of ours): no checks needed."""
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
    pos = 24
    kvs = []
    for _ in range(n_kv):
        key, pos = _read_value(buf, pos, STRING)
        (vtype,) = struct.unpack_from("<I", buf, pos)
        pos += 4
        if vtype == ARRAY:
            etype, count = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            items = []
            for _ in range(count):
                item, pos = _read_value(buf, pos, etype)
                items.append(item)
            kvs.append(KV(key, vtype, items, etype))
        else:
            value, pos = _read_value(buf, pos, vtype)
            kvs.append(KV(key, vtype, value))
    tensors = []
    for _ in range(n_tensors):
        name, pos = _read_value(buf, pos, STRING)
        (n_dims,) = struct.unpack_from("<I", buf, pos)
        dims = list(struct.unpack_from(f"<{n_dims}Q", buf, pos + 4))
        pos += 4 + 8 * n_dims
        ttype, offset = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        tensors.append(Tensor(name, dims, ttype, offset))
    align = next((k.value for k in kvs if k.key == "general.alignment"), 32)
    pos += -pos % align
    return Model(version, kvs, tensors, buf[pos:], align)


def _pack_string(text: str, lie: int | None = None) -> bytes:
    raw = text.encode("utf-8", "surrogateescape")
    return struct.pack("<Q", len(raw) if lie is None else lie) + raw


def _pack_value(vtype: int, value: Any) -> bytes:
    if vtype == STRING:
        return _pack_string(str(value))
    fmt = _SCALAR[vtype]
    if vtype in _INTS:
        bits = struct.calcsize(fmt) * 8
        value = int(value) & ((1 << bits) - 1)
        if fmt.islower():  # signed: back into range
            value = value - (1 << bits) if value >= 1 << (bits - 1) else value
    elif vtype == BOOL:
        value = bool(value)
    else:
        value = float(value)
    return struct.pack(fmt, value)


def serialize(m: Model) -> bytes:
    out = [b"GGUF", struct.pack("<I", m.version),
           struct.pack("<Q", m.count_lies.get("tensors", len(m.tensors)) & (2**64 - 1)),
           struct.pack("<Q", m.count_lies.get("kv", len(m.kvs)) & (2**64 - 1))]
    for i, kv in enumerate(m.kvs):
        out.append(_pack_string(kv.key))
        out.append(struct.pack("<I", m.type_lies.get(i, kv.vtype)))
        lie = m.length_lies.get(i)
        if kv.vtype == ARRAY:
            assert kv.etype is not None
            out.append(struct.pack("<IQ", kv.etype, (len(kv.value) if lie is None else lie) & (2**64 - 1)))
            out.extend(_pack_value(kv.etype, v) for v in kv.value)
        elif kv.vtype == STRING:
            out.append(_pack_string(str(kv.value), None if lie is None else lie & (2**64 - 1)))
        else:
            out.append(_pack_value(kv.vtype, kv.value))
    for t in m.tensors:
        out.append(_pack_string(t.name))
        out.append(struct.pack("<I", len(t.dims) & 0xFFFFFFFF))
        out.extend(struct.pack("<Q", d & (2**64 - 1)) for d in t.dims)
        out.append(struct.pack("<IQ", t.ttype & 0xFFFFFFFF, t.offset & (2**64 - 1)))
    head = b"".join(out)
    head += b"\0" * (-len(head) % m.alignment)
    return head + m.data


# ---------------------------------------------------------------- mutations

INTERESTING = [0, 1, 2, 3, 7, 255, 256, 511, 512, 513, 1023, 1024, 1025, 65535, 65536, 1 << 24, (1 << 24) + 1,
               1 << 30, (1 << 31) - 1, 1 << 31, (1 << 32) - 1, 1 << 32, (1 << 63) - 1, (1 << 64) - 1, -1, -2]
HPARAMS = ["block_count", "context_length", "embedding_length", "feed_forward_length", "attention.head_count",
           "attention.head_count_kv", "attention.key_length", "attention.value_length", "rope.dimension_count",
           "expert_count", "expert_used_count", "expert_group_count", "expert_group_used_count",
           "nextn_predict_layers", "vocab_size", "attention.sliding_window", "embedding_length_out"]
FLOAT_HPARAMS = ["attention.layer_norm_rms_epsilon", "attention.layer_norm_epsilon", "rope.freq_base",
                 "rope.scaling.factor", "attention.scale", "logit_scale"]
SPECIAL_IDS = ["bos", "eos", "eot", "eom", "unknown", "seperator", "padding", "mask", "fim_pre", "fim_suf"]
ARCHS = ["llama", "gpt2", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "falcon", "mamba", "rwkv6",
         "bert", "t5", "starcoder2", "mistral3", "olmo2", "deepseek2", "qwen3moe", "clip", "gptneox", "", "nope"]
TOKENIZER_MODELS = ["llama", "gpt2", "bert", "t5", "rwkv", "none", "plamo2", "ugm", "nope", ""]


def _int_kv(m: Model, key: str, value: int) -> None:
    vtype = I32 if -(1 << 31) <= value < 0 else I64 if value < 0 else U32 if value < 1 << 32 else U64
    kv = m.kv(key)
    if kv is None:
        m.kvs.append(KV(key, vtype, value))
    else:
        kv.vtype, kv.value, kv.etype = vtype, value, None


def _interesting(rng: random.Random, around: int | None = None) -> int:
    if around is not None and rng.random() < 0.3:
        return around + rng.choice([-1, 1, 2, -2]) if around > 2 else around * rng.choice([2, 3])
    return rng.choice(INTERESTING) if rng.random() < 0.85 else rng.randrange(1 << rng.choice([8, 16, 32, 64]))


def m_header_counts(rng: random.Random, m: Model) -> str:
    which = rng.choice(["tensors", "kv"])
    real = len(m.tensors) if which == "tensors" else len(m.kvs)
    m.count_lies[which] = rng.choice([0, real - 1, real + 1, real * 2, 1 << 32, (1 << 64) - 1, _interesting(rng)])
    return f"{which} count {real} -> {m.count_lies[which]}"


def m_lengths(rng: random.Random, m: Model) -> str:
    candidates = [i for i, kv in enumerate(m.kvs) if kv.vtype in (STRING, ARRAY)]
    i = rng.choice(candidates)
    kv = m.kvs[i]
    real = len(kv.value) if kv.vtype == ARRAY else len(str(kv.value).encode("utf-8", "surrogateescape"))
    if rng.random() < 0.5:
        m.length_lies[i] = rng.choice([0, real - 1, real + 1, real + 8, 1 << 24, 1 << 31, 1 << 32, (1 << 64) - 1])
        return f"{kv.key} length {real} -> {m.length_lies[i]}"
    # A real change in length: an array grows or shrinks (the other arrays keep theirs).
    if kv.vtype == ARRAY and kv.value:
        n = rng.choice([0, 1, len(kv.value) - 1, len(kv.value) + 1])
        kv.value = (kv.value * (n // len(kv.value) + 1))[:n]
        return f"{kv.key} resized {real} -> {n}"
    kv.value = str(kv.value) * rng.choice([0, 2, 1000])
    return f"{kv.key} string x{len(str(kv.value))}"


def m_value_types(rng: random.Random, m: Model) -> str:
    i = rng.randrange(len(m.kvs))
    kv = m.kvs[i]
    if rng.random() < 0.4:
        m.type_lies[i] = rng.choice([*range(13), 13, 99, 1 << 31])
        return f"{kv.key} type id {kv.vtype} -> {m.type_lies[i]} (payload kept)"
    new = rng.choice([U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, U64, I64, F64, ARRAY])
    old = kv.vtype
    if new == ARRAY:
        kv.etype = rng.choice([U32, I32, STRING, F32])
        item = str(kv.value)[:100] if kv.etype == STRING else 1
        kv.vtype, kv.value = ARRAY, [item] * rng.choice([0, 1, 2, 3])
    elif new == STRING:
        kv.vtype, kv.etype, kv.value = STRING, None, str(kv.value)[:100]
    else:
        try:
            number = float(kv.value) if not isinstance(kv.value, list) else len(kv.value)
        except (TypeError, ValueError):
            number = 1
        if number != number or number in (float("inf"), float("-inf")):
            number = 1
        kv.vtype, kv.etype = new, None
        kv.value = number if new in (F32, F64) else int(number)
    return f"{kv.key} retyped {old} -> {new}"


def m_tensor_dims(rng: random.Random, m: Model) -> str:
    t = rng.choice(m.tensors)
    old = list(t.dims)
    op = rng.choice(["swap", "double", "zero", "one", "huge", "add", "drop", "ndims5", "random"])
    if op == "swap" and len(t.dims) > 1:
        t.dims.reverse()
    elif op == "double":
        t.dims[rng.randrange(len(t.dims))] *= 2
    elif op == "zero":
        t.dims[rng.randrange(len(t.dims))] = 0
    elif op == "one":
        t.dims = [1] * len(t.dims)
    elif op == "huge":
        t.dims[rng.randrange(len(t.dims))] = rng.choice([1 << 32, 1 << 40, (1 << 63) - 1, (1 << 64) - 1])
    elif op == "add":
        t.dims.append(rng.choice([1, 2, 64]))
    elif op == "drop" and len(t.dims) > 1:
        t.dims.pop()
    elif op == "ndims5":
        t.dims = t.dims + [1] * (5 - len(t.dims))
    else:
        t.dims[rng.randrange(len(t.dims))] = _interesting(rng, t.dims[0])
    return f"{t.name} dims {old} -> {t.dims}"


def m_tensor_types(rng: random.Random, m: Model) -> str:
    t = rng.choice(m.tensors)
    old = t.ttype
    t.ttype = rng.choice([0, 1, 2, 8, 10, 12, 14, 24, 26, 28, 30, 31, 33, 36, 39, 41, 42, 99, 1 << 31, (1 << 32) - 1])
    return f"{t.name} type {old} -> {t.ttype}"


def m_tensor_offsets(rng: random.Random, m: Model) -> str:
    t = rng.choice(m.tensors)
    old = t.offset
    other = rng.choice(m.tensors).offset
    t.offset = rng.choice([0, other, old + 1, old + m.alignment, old - m.alignment, len(m.data), len(m.data) - 1,
                           1 << 32, (1 << 63) - 1, (1 << 64) - 1])
    return f"{t.name} offset {old} -> {t.offset}"


def m_hyperparameters(rng: random.Random, m: Model) -> str:
    arch = m.arch
    if rng.random() < 0.2:
        key = f"{arch}.{rng.choice(FLOAT_HPARAMS)}"
        value = rng.choice([0.0, -1.0, float("nan"), float("inf"), -float("inf"), 1e-30, 1e30, 3.4e38])
        kv = m.kv(key)
        if kv is None:
            m.kvs.append(KV(key, F32, value))
        else:
            kv.vtype, kv.value, kv.etype = F32, value, None
        return f"{key} = {value}"
    if rng.random() < 0.1:
        key = f"{arch}.rope.scaling.type"
        value = rng.choice(["none", "linear", "yarn", "longrope", "bogus", ""])
        m.kvs = [k for k in m.kvs if k.key != key]
        m.kvs.append(KV(key, STRING, value))
        return f"{key} = {value!r}"
    if rng.random() < 0.15:  # a per-layer array instead of one value
        key = f"{arch}.{rng.choice(['attention.head_count', 'attention.head_count_kv', 'feed_forward_length'])}"
        kv = m.kv(key)
        base = kv.value if kv and isinstance(kv.value, int) else 2
        n = rng.choice([0, 1, 2, 3, 600])
        values = [rng.choice([base, 0, 1, base * 2]) for _ in range(n)]
        if kv is None:
            m.kvs.append(KV(key, ARRAY, values, U32))
        else:
            kv.vtype, kv.value, kv.etype = ARRAY, values, U32
        return f"{key} = per-layer {values[:6]}{'...' if n > 6 else ''}"
    key = f"{arch}.{rng.choice(HPARAMS)}"
    kv = m.kv(key)
    if kv is not None and rng.random() < 0.1:
        m.kvs.remove(kv)
        return f"{key} removed"
    value = _interesting(rng, kv.value if kv and isinstance(kv.value, int) else None)
    _int_kv(m, key, value)
    return f"{key} = {value}"


def m_tokenizer(rng: random.Random, m: Model) -> str:
    tokens = m.kv("tokenizer.ggml.tokens")
    assert tokens is not None
    n = len(tokens.value)
    op = rng.choice(["duplicate", "empty", "empty-collide", "drop-scores", "short-types", "long-types",
                     "short-tokens", "special", "special", "add-bos", "merges", "model", "pre", "types-values"])
    if op == "duplicate":
        i, j = rng.sample(range(n), 2)
        tokens.value[j] = tokens.value[i]
        return f"token {j} = token {i} ({tokens.value[i]!r})"
    if op == "empty":
        i = rng.randrange(n)
        tokens.value[i] = ""
        return f"token {i} empty"
    if op == "empty-collide":
        i, j = rng.sample(range(n), 2)
        tokens.value[i], tokens.value[j] = "", f"[EMPTY_{i}]"
        return f"token {i} empty and token {j} = '[EMPTY_{i}]'"
    if op in ("short-types", "long-types", "types-values", "drop-scores"):
        key = "tokenizer.ggml.token_type"
        kv = m.kv(key)
        if kv is None:
            kv = KV(key, ARRAY, [1] * n, I32)
            m.kvs.append(kv)
        if op == "short-types":
            kv.value = kv.value[: rng.choice([0, 1, n - 1])]
        elif op == "long-types":
            kv.value = kv.value + [1] * rng.choice([1, 100])
        elif op == "types-values":
            kv.value = [rng.choice([-1, 0, 1, 2, 3, 4, 5, 6, 7, 1 << 20]) for _ in kv.value]
        else:
            m.kvs.append(KV("tokenizer.ggml.scores", ARRAY, [0.0] * rng.choice([0, n - 1, n + 1]), F32))
        return f"{key}: {op}"
    if op == "short-tokens":
        tokens.value = tokens.value[: rng.choice([0, 1, 10, n - 1])]
        return f"tokens cut to {len(tokens.value)}"
    if op == "special":
        key = f"tokenizer.ggml.{rng.choice(SPECIAL_IDS)}_token_id"
        value = rng.choice([n, n + 1, 1 << 31, (1 << 32) - 1, -1, 0, n - 1])
        _int_kv(m, key, value)
        return f"{key} = {value}"
    if op == "add-bos":
        for key in ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"):
            if rng.random() < 0.5 and m.kv(key):
                m.kvs.remove(m.kv(key))  # type: ignore[arg-type]
        m.kvs = [k for k in m.kvs if k.key != "tokenizer.ggml.add_bos_token"]
        m.kvs.append(KV("tokenizer.ggml.add_bos_token", BOOL, True))
        m.kvs.append(KV("tokenizer.ggml.add_eos_token", BOOL, rng.random() < 0.5))
        return "add_bos/add_eos with bos/eos maybe removed"
    if op == "merges":
        kv = m.kv("tokenizer.ggml.merges")
        choice = rng.choice(["remove", "garbage", "empty", "many"])
        if kv is None or choice == "remove":
            m.kvs = [k for k in m.kvs if k.key != "tokenizer.ggml.merges"]
            return "merges removed"
        if choice == "garbage":
            kv.value = [rng.choice(["", " ", "a", "a b c", "Ġ Ġ", "\x00 \x00", "h e"]) for _ in kv.value]
        elif choice == "empty":
            kv.value = []
        else:
            kv.value = kv.value * 50
        return f"merges {choice}"
    if op == "model":
        value = rng.choice(TOKENIZER_MODELS)
        m.kv("tokenizer.ggml.model").value = value  # type: ignore[union-attr]
        return f"tokenizer.ggml.model = {value!r}"
    value = rng.choice(["default", "llama3", "gpt-2", "qwen2", "kimi-k2", "bogus", ""])
    kv = m.kv("tokenizer.ggml.pre")
    if kv is not None:
        kv.value = value
    return f"tokenizer.ggml.pre = {value!r}"


def m_architecture(rng: random.Random, m: Model) -> str:
    old = m.arch
    new = rng.choice(ARCHS)
    m.kv("general.architecture").value = new  # type: ignore[union-attr]
    if rng.random() < 0.8:  # carry the hyperparameters over, so the new architecture's loader runs further
        for kv in m.kvs:
            if kv.key.startswith(old + "."):
                kv.key = new + kv.key[len(old):]
    return f"architecture {old} -> {new!r}"


MUTATIONS: dict[str, Callable[[random.Random, Model], str]] = {
    "header counts": m_header_counts,
    "lengths": m_lengths,
    "value types": m_value_types,
    "tensor dims": m_tensor_dims,
    "tensor types": m_tensor_types,
    "tensor offsets": m_tensor_offsets,
    "hyperparameters": m_hyperparameters,
    "tokenizer": m_tokenizer,
    "architecture": m_architecture,
}
CLASSES = [*MUTATIONS, "truncation", "byte flips"]


def mutate(rng: random.Random, base: bytes, cls: str) -> tuple[bytes, str]:
    if cls == "truncation":
        cut = rng.choice([rng.randrange(len(base)), rng.randrange(min(len(base), 4096)), len(base) - 1])
        return base[:cut], f"cut at {cut} of {len(base)}"
    if cls == "byte flips":
        data = bytearray(base)
        header_end = len(base) - len(parse(base).data)
        flips = []
        for _ in range(rng.randint(1, 8)):
            at = rng.randrange(4, header_end) if rng.random() < 0.9 else rng.randrange(len(data))
            data[at] = rng.randrange(256)
            flips.append(at)
        return bytes(data), f"bytes set at {sorted(flips)}"
    model = parse(base)
    what = [MUTATIONS[cls](rng, model)]
    if rng.random() < 0.25:  # a second mutation of any structured class
        extra = rng.choice(list(MUTATIONS))
        what.append(MUTATIONS[extra](rng, model))
    return serialize(model), "; ".join(what)


# ---------------------------------------------------------------- running chatcli


@dataclass
class Run:
    outcome: str
    rc: int | None
    stderr: str
    seconds: float


def classify(rc: int | None, stderr: str) -> str:
    if rc is None:
        return "hang"
    if rc < 0 or rc >= 128 and rc != 130:
        return "crash"
    if "Traceback (most recent call last)" in stderr:
        return "traceback"
    if rc == 0:
        return "ok"
    lines = stderr.strip().splitlines()
    if not lines:
        return "silent exit"
    if rc in (1, 2, 3) and len(lines) == 1 and lines[0].startswith("error: ") and "internal error" not in lines[0]:
        return "abort caught" if "llama.cpp aborted" in lines[0] else "refused"
    return "bad refusal"


def run_chatcli(args: list[str], home: Path, timeout: float) -> Run:
    env = {**os.environ, "CHATCLI_HOME": str(home), "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
           "HF_HOME": str(home / "hf"), "HF_ENDPOINT": "http://127.0.0.1:9", "PYTHONPATH": str(ROOT)}
    env.pop("CHATCLI_DEBUG", None)
    started = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, "-m", "chatcli", *args], capture_output=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, env=env, cwd=home)
    except subprocess.TimeoutExpired as exc:
        stderr = (exc.stderr or b"").decode("utf-8", "replace")
        return Run("hang", None, stderr, time.monotonic() - started)
    stderr = proc.stderr.decode("utf-8", "replace")
    return Run(classify(proc.returncode, stderr), proc.returncode, stderr, time.monotonic() - started)


COMMANDS = {
    "show": lambda f: ["show", str(f)],
    "complete": lambda f: ["complete", "-m", str(f), "-n", "4", "--temperature", "0", "hi"],
}


@dataclass
class Case:
    index: int
    base: str
    cls: str
    what: str
    path: Path
    runs: dict[str, Run] = field(default_factory=dict)

    @property
    def bad(self) -> bool:
        return any(r.outcome in BAD for r in self.runs.values())


def make_case(index: int, seed: int, bases: dict[str, bytes], out: Path) -> Case:
    rng = random.Random(f"{seed}:{index}")
    base = rng.choice(sorted(bases))
    cls = CLASSES[index % len(CLASSES)] if index < len(CLASSES) else rng.choice(CLASSES)
    data, what = mutate(rng, bases[base], cls)
    path = out / f"mutant-{seed}-{index:05d}.gguf"
    path.write_bytes(data)
    return Case(index, base, cls, what, path)


def run_case(case: Case, timeout: float) -> Case:
    with tempfile.TemporaryDirectory(prefix="fuzz-home-") as home:
        for name, argv in COMMANDS.items():
            case.runs[name] = run_chatcli(argv(case.path), Path(home), timeout)
    return case


# ---------------------------------------------------------------- main


def table(cases: list[Case]) -> str:
    counts = {name: Counter(c.runs[name].outcome for c in cases if name in c.runs) for name in COMMANDS}
    rows = [f"{'outcome':<14}" + "".join(f"{name:>10}" for name in COMMANDS)]
    for outcome in OUTCOMES:
        cells = [counts[name][outcome] for name in COMMANDS]
        if any(cells) or outcome in ("ok", "refused"):
            mark = "  <- bad" if outcome in BAD and any(cells) else ""
            rows.append(f"{outcome:<14}" + "".join(f"{n:>10}" for n in cells) + mark)
    by_class: dict[str, Counter[str]] = defaultdict(Counter)
    for c in cases:
        for r in c.runs.values():
            by_class[c.cls][r.outcome] += 1
    rows.append("")
    rows.append(f"{'class':<16}{'runs':>6}  outcomes")
    for cls in CLASSES:
        if by_class[cls]:
            detail = ", ".join(f"{k} {v}" for k, v in sorted(by_class[cls].items(), key=lambda kv: -kv[1]))
            rows.append(f"{cls:<16}{sum(by_class[cls].values()):>6}  {detail}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=200, help="mutants to try (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="seed: the same seed makes the same files")
    parser.add_argument("--seconds", type=float, default=0, help="stop starting mutants after this long (0: no limit)")
    parser.add_argument("--out", type=Path, help="folder for the base models, kept bad mutants and report.json "
                        "(default: a temporary folder, removed)")
    parser.add_argument("--jobs", type=int, default=2, help="mutants run at once (default 2)")
    parser.add_argument("--timeout", type=float, default=60, help="seconds one command may take (default 60)")
    parser.add_argument("--only", type=int, action="append", help="run only mutant N (repeatable): replay a failure")
    parser.add_argument("--keep-all", action="store_true", help="keep every mutant, not only the bad ones")
    args = parser.parse_args(argv)

    temp = None
    if args.out is None:
        temp = tempfile.TemporaryDirectory(prefix="fuzz-gguf-")
        out = Path(temp.name)
    else:
        out = args.out
        out.mkdir(parents=True, exist_ok=True)
    work = out / "mutants"
    work.mkdir(exist_ok=True)
    ggufgen = _load_ggufgen()
    bases = {
        "llama": ggufgen.make_llama(out / "base-llama.gguf", chat_template=ggufgen.CHATML_TEMPLATE).read_bytes(),
        "gpt2": ggufgen.make_gpt2(out / "base-gpt2.gguf").read_bytes(),
    }
    started = time.monotonic()
    indices = args.only or list(range(args.count))
    cases: list[Case] = []

    def work_on(i: int) -> Case | None:
        if args.seconds and time.monotonic() - started > args.seconds:
            return None
        case = run_case(make_case(i, args.seed, bases, work), args.timeout)
        if not (case.bad or args.keep_all):
            case.path.unlink()
        return case

    try:
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            for done, case in enumerate(pool.map(work_on, indices), 1):
                if case is None:
                    continue
                cases.append(case)
                if case.bad:
                    shown = {n: (r.outcome, r.rc, r.stderr.strip()[-300:]) for n, r in case.runs.items()}
                    print(f"BAD mutant {case.index} [{case.cls}] {case.what}: {shown}", file=sys.stderr)
                if done % 50 == 0:
                    print(f"... {done}/{len(indices)} in {time.monotonic() - started:.0f}s", file=sys.stderr)
        elapsed = time.monotonic() - started
        bad = [c for c in cases if c.bad]
        print(f"fuzz_gguf: {len(cases)} mutants x {len(COMMANDS)} commands, seed {args.seed}, "
              f"jobs {args.jobs}, {elapsed:.0f}s")
        print(table(cases))
        caught = [c for c in cases if any(r.outcome == "abort caught" for r in c.runs.values())]
        for c in caught[:10]:
            print(f"abort caught: mutant {c.index} [{c.cls}] {c.what}: "
                  f"{next(r.stderr.strip() for r in c.runs.values() if r.outcome == 'abort caught')[:200]}")
        for c in bad:
            print(f"BAD: mutant {c.index} [{c.cls}] {c.what} ({c.path})")
        report = [{"index": c.index, "base": c.base, "class": c.cls, "mutation": c.what, "bad": c.bad,
                   "runs": {n: {"outcome": r.outcome, "rc": r.rc, "stderr": r.stderr[-2000:],
                                "seconds": round(r.seconds, 2)} for n, r in c.runs.items()}}
                  for c in cases]
        (out / "report.json").write_text(json.dumps({"seed": args.seed, "seconds": round(elapsed, 1),
                                                      "cases": report}, indent=1))
        return 1 if bad else 0
    finally:
        if temp is not None:
            if any(c.bad for c in cases):  # keep the evidence
                kept = Path(tempfile.mkdtemp(prefix="fuzz-gguf-bad-"))
                for c in cases:
                    if c.bad and c.path.exists():
                        shutil.copy(c.path, kept / c.path.name)
                print(f"bad mutants kept in {kept}", file=sys.stderr)
            temp.cleanup()


if __name__ == "__main__":
    sys.exit(main())
