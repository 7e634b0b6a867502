"""Values, not only structure: refuse GGUF files that llama.cpp would crash on, before it sees them.

gguf_info makes sure a header can be read safely. llama.cpp then trusts the values it reads, and some
well-formed but hostile ones abort the whole process (GGML_ASSERT, SIGABRT; with its log muted the user sees
nothing): a block count of 0 or over 512, two equal token strings, expert counts out of range, an unknown
RoPE scaling type; a context length of 2^31 overflows llama-cpp-python's tokenize buffer. Others only make it
fail later with a vague message (tensor shapes that disagree with the hyperparameters) or exhaust memory.

Each problem is one line, `<field> is <value>: <why>; <what to do>`, so `complete`/`chat` can refuse with the
first and `show` can list them all. Everything here works on the parsed header (plus one read of the
vocabulary for duplicates): SmolLM2's 49k tokens take a few milliseconds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from chatcli.errors import GGUFError, GGUFValueError
from chatcli.gguf_info import ArraySummary, GGUFInfo, read_string_array
from chatcli.units import human_bytes

MAX_LAYERS = 512  # LLAMA_MAX_LAYERS: load_hparams asserts 0 < block_count <= 512
MAX_EXPERTS = 1024  # LLAMA_MAX_EXPERTS
# The largest trained context in a real GGUF is Llama 4 Scout's 10,485,760 tokens. llama-cpp-python allocates
# an int32 buffer of n_ctx_train tokens on every tokenize() call: 2^24 keeps that at 64 MiB, where 2^30 costs
# 4.2 GB and 12 s and 2^31 overflows int32 ("Array length must be >= 0").
MAX_CONTEXT = 1 << 24
MAX_EMBEDDING = 1 << 20  # the widest real models are ~16k-25k
MAX_HEAD_SIZE = 1 << 16  # real key/value lengths are 64..576
ROPE_SCALING_TYPES = ("none", "linear", "yarn", "longrope")  # llama_rope_scaling_type_from_string
# Architectures without attention heads (state-space and RWKV models).
RECURRENT = frozenset({"mamba", "mamba2", "rwkv6", "rwkv6qwen2", "rwkv7", "arwkv7"})
# Architectures whose token_embd is not [embedding_length, n_vocab], or that have no text vocabulary.
NO_TOKEN_EMBD_CHECK = frozenset({"eagle3", "clip", "wavtokenizer-dec"})
# Special token ids llama.cpp reads (llama_vocab::impl::load).
SPECIAL_TOKEN_KEYS = tuple(
    f"tokenizer.ggml.{name}_token_id"
    for name in (
        "bos", "eos", "eot", "eom", "unknown", "seperator", "padding", "mask",
        "fim_pre", "fim_suf", "fim_mid", "fim_pad", "fim_rep", "fim_sep", "prefix", "suffix", "middle",
    )
)

DAMAGED = "the file is damaged or hostile; download it again or use another file"
_BLOCK_RE = re.compile(r"(enc\.|dec\.)?blk\.(\d+)\.")  # encoder-decoders (T5) number enc. and dec. blocks apart
# Architectures whose graph asserts that the head size is embedding_length / head_count (gpt2.cpp:61, found by
# fuzzing; others may too, and then the engine's abort handler reports it).
FIXED_HEAD_SIZE = frozenset({"gpt2"})
# Tensor types no model computes with: ggml's binary ops abort on integer operands (found by fuzzing).
INTEGER_TYPES = frozenset({"I8", "I16", "I32", "I64", "F64"})
VECTOR_TYPES = frozenset({"F32", "F16", "BF16"})  # what converters and llama-quantize write for norms and biases


@dataclass(frozen=True)
class Problem:
    """One reason not to hand a file to llama.cpp."""

    field: str
    value: str
    why: str
    todo: str = DAMAGED

    def __str__(self) -> str:
        return f"{self.field} is {self.value}: {self.why}; {self.todo}"

    def line(self, path: Path) -> str:
        return f"{path}: {self}"


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _show(value: object) -> str:
    if value is None:
        return "missing"
    if isinstance(value, ArraySummary):
        return f"an array of {value.length} {value.type}"
    if isinstance(value, tuple):
        return f"an array of {len(value)}" if len(value) > 8 else str(list(value))
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _Checker:
    def __init__(self, info: GGUFInfo) -> None:
        self.info = info
        self.arch = info.architecture or ""
        self.meta = info.metadata
        self.problems: list[Problem] = []

    def add(self, field: str, value: object, why: str, todo: str = DAMAGED, *, shown: str | None = None) -> None:
        self.problems.append(Problem(field, _show(value) if shown is None else shown, why, todo))

    def key(self, suffix: str) -> str:
        return f"{self.arch}.{suffix}"

    def ranged(self, suffix: str, low: int, high: int, why: str) -> int | None:
        """An integer architecture value within [low, high], else a problem and None.

        A missing key is no problem here: llama.cpp refuses a missing required key cleanly, in its own words.
        """
        key = self.key(suffix)
        value = self.meta.get(key)
        if value is None:
            return None
        number = _int(value)
        if number is None:
            self.add(key, value, "must be an integer")
            return None
        if not low <= number <= high:
            self.add(key, value, why)
            return None
        return number

    def per_layer(self, suffix: str, layers: int | None) -> list[int] | None:
        """A value llama.cpp reads as one integer or one per layer: per-layer values, or None (absent/bad)."""
        key = self.key(suffix)
        value = self.meta.get(key)
        if value is None:
            return None
        if isinstance(value, (tuple, ArraySummary)):
            length = len(value) if isinstance(value, tuple) else value.length
            if layers is not None and length != layers:
                self.add(key, value, f"llama.cpp needs one value per layer ({self.key('block_count')} is {layers})")
                return None
            if isinstance(value, ArraySummary):
                return None  # over 256 layers' worth: not kept, not checked further
            numbers = [_int(v) for v in value]
            if any(n is None or n < 0 for n in numbers):
                self.add(key, value, "must hold integers of 0 or more")
                return None
            return numbers  # type: ignore[return-value]
        number = _int(value)
        if number is None or number < 0:
            self.add(key, value, "must be an integer of 0 or more")
            return None
        return [number] * (layers or 1)


# ---------------------------------------------------------------- hyperparameters


def _check_hparams(c: _Checker) -> dict[str, object]:
    """Layer, context, width, head and expert values; returns those later checks build on."""
    layers = c.ranged("block_count", 1, MAX_LAYERS,
                      f"llama.cpp aborts unless it is between 1 and {MAX_LAYERS}")
    ctx = c.ranged("context_length", 1, MAX_CONTEXT,
                   f"a trained context must be between 1 and {MAX_CONTEXT:,} tokens (2^24; the largest real "
                   "model has 10M)")
    embd = c.ranged("embedding_length", 1, MAX_EMBEDDING, f"must be between 1 and {MAX_EMBEDDING:,}")
    nextn = c.ranged("nextn_predict_layers", 0, MAX_LAYERS, "must be 0 or more")
    if nextn is not None and layers is not None and nextn > layers:
        c.add(c.key("nextn_predict_layers"), nextn, f"llama.cpp aborts when it exceeds {c.key('block_count')} "
              f"({layers})")
    ff = c.per_layer("feed_forward_length", layers)
    heads = c.per_layer("attention.head_count", layers)
    kv_heads = c.per_layer("attention.head_count_kv", layers)
    key_len = c.ranged("attention.key_length", 1, MAX_HEAD_SIZE, f"must be between 1 and {MAX_HEAD_SIZE}")
    value_len = c.ranged("attention.value_length", 1, MAX_HEAD_SIZE, f"must be between 1 and {MAX_HEAD_SIZE}")
    head_size: int | None = None
    # An architecture llama.cpp does not know has no keys under its name: llama.cpp names it itself.
    if c.arch not in RECURRENT and c.key("block_count") in c.meta:
        if heads is None and c.key("attention.head_count") not in c.meta:
            c.add(c.key("attention.head_count"), None, "llama.cpp needs the attention head count")
        elif heads is not None and max(heads) == 0:
            c.add(c.key("attention.head_count"), c.meta[c.key("attention.head_count")],
                  "an attention model needs at least one head")
            heads = None
        if heads is not None and kv_heads is None and c.key("attention.head_count_kv") not in c.meta:
            kv_heads = heads  # llama.cpp's default: one KV head per head
        if heads is not None and kv_heads is not None:
            for il, (h, kv) in enumerate(zip(heads, kv_heads, strict=False)):
                if h and (kv == 0 or h % kv):
                    c.add(c.key("attention.head_count_kv"), c.meta.get(c.key("attention.head_count_kv"), kv),
                          f"layer {il} has {h} heads, which {kv} KV heads must divide")
                    kv_heads = None
                    break
        h0 = max(heads) if heads else 0
        if embd is not None and h0 and isinstance(c.meta.get(c.key("attention.head_count")), int):
            if key_len is None or value_len is None:
                if embd % h0:
                    c.add(c.key("embedding_length"), embd,
                          f"must be a multiple of {c.key('attention.head_count')} ({h0}) to give the head size")
                else:
                    head_size = embd // h0
            if c.arch in FIXED_HEAD_SIZE and embd % h0 == 0:
                for suffix, given in (("attention.key_length", key_len), ("attention.value_length", value_len)):
                    if given is not None and given != embd // h0:
                        c.add(c.key(suffix), given, f"{c.arch} needs embedding_length / head_count "
                              f"({embd // h0}); llama.cpp aborts on it")
            key_len = key_len or head_size
            value_len = value_len or head_size
            rope = c.meta.get(c.key("rope.dimension_count"))
            if c.arch in ("llama", "deci", "falcon", "llama-embed") and key_len and rope is not None \
                    and rope != key_len:
                c.add(c.key("rope.dimension_count"), rope, f"llama.cpp needs the head size {key_len} here")
    scaling = c.meta.get(c.key("rope.scaling.type"))
    if scaling is not None and scaling not in ROPE_SCALING_TYPES:
        c.add(c.key("rope.scaling.type"), scaling,
              f"llama.cpp aborts unless it is one of {', '.join(ROPE_SCALING_TYPES)}")
    _check_experts(c, layers)
    return {"layers": layers, "ctx": ctx, "embd": embd, "ff": ff, "heads": heads, "kv_heads": kv_heads,
            "key_len": key_len, "value_len": value_len}


def _check_experts(c: _Checker, layers: int | None) -> None:
    """The GGML_ASSERTs on experts in load_hparams, as refusals."""
    experts = c.ranged("expert_count", 0, MAX_EXPERTS, f"llama.cpp aborts above {MAX_EXPERTS}")
    used = c.per_layer("expert_used_count", layers)
    if experts is None and c.key("expert_count") in c.meta:
        return
    n_exp = experts or 0
    used_max = max(used) if used else 0
    groups = c.ranged("expert_group_count", 0, MAX_EXPERTS, "must be 0 or more")
    group_used = c.ranged("expert_group_used_count", 0, MAX_EXPERTS, "must be 0 or more")
    aborts = "llama.cpp aborts on it"
    if used_max > n_exp:
        c.add(c.key("expert_used_count"), c.meta.get(c.key("expert_used_count")),
              f"more experts used than {c.key('expert_count')} ({n_exp}); {aborts}")
    elif n_exp and not used_max:
        c.add(c.key("expert_used_count"), c.meta.get(c.key("expert_used_count")),
              f"a model with {n_exp} experts must use at least one; {aborts}")
    if groups:
        if not n_exp or groups >= n_exp:
            c.add(c.key("expert_group_count"), groups, f"must be below {c.key('expert_count')} ({n_exp}); {aborts}")
        elif groups > 1 and (n_exp % groups or not group_used or group_used >= groups):
            c.add(c.key("expert_group_count"), groups,
                  f"must divide {n_exp} experts, with 1..{groups - 1} groups used ({group_used}); {aborts}")


# ---------------------------------------------------------------- vocabulary


def _check_vocab(c: _Checker) -> int | None:
    """Token arrays of one length, no two equal tokens, special ids inside the vocabulary; returns n_vocab."""
    key = "tokenizer.ggml.tokens"
    tokens = c.meta.get(key)
    if c.meta.get("tokenizer.ggml.model") == "none":  # LLAMA_VOCAB_TYPE_NONE: a model without a vocabulary
        return None
    if not isinstance(tokens, ArraySummary) or tokens.type != "STRING":
        c.add(key, tokens, "llama.cpp needs the vocabulary as an array of strings")
        return None
    n_vocab = tokens.length
    if n_vocab == 0:
        c.add(key, tokens, "the vocabulary is empty")
        return None
    for other, types in (("tokenizer.ggml.scores", ("FLOAT32", "INT32")), ("tokenizer.ggml.token_type", ("INT32",))):
        value = c.meta.get(other)
        if value is None:
            continue
        length = value.length if isinstance(value, ArraySummary) else len(value) if isinstance(value, tuple) else -1
        vtype = value.type if isinstance(value, ArraySummary) else None
        if vtype not in types:
            c.add(other, value, f"must be an array of {' or '.join(types)}")
        elif length != n_vocab:
            c.add(other, value, f"must have one entry per token ({n_vocab} in {key})")
    model = c.meta.get("tokenizer.ggml.model")
    merges = c.meta.get("tokenizer.ggml.merges")
    if model == "gpt2" and c.meta.get("tokenizer.ggml.pre") != "kimi-k2":
        if not isinstance(merges, ArraySummary) or merges.type != "STRING":
            c.add("tokenizer.ggml.merges", merges, "a BPE (gpt2) tokenizer needs its merges as an array of strings")
    try:
        strings = read_string_array(c.info, key)
    except GGUFError as exc:
        c.add(key, tokens, str(exc).removeprefix(f"{c.info.path}: "))
        return None
    seen: dict[bytes, int] = {}
    for i, text in enumerate(strings):
        if not text:
            text = f"[EMPTY_{i}]".encode()  # what llama.cpp renames an empty token to
        first = seen.setdefault(text, i)
        if first != i:
            shown = text.decode("utf-8", "replace")
            c.add(key, tokens, f"token {i} repeats token {first} ({shown[:40]!r}); llama.cpp aborts on "
                  "equal token strings")
            break
    for special in SPECIAL_TOKEN_KEYS:
        value = c.meta.get(special)
        if value is None:
            continue
        number = _int(value)
        if number is None or not 0 <= number < n_vocab:
            c.add(special, value, f"must be a token id below the vocabulary size {n_vocab}")
    return n_vocab


# ---------------------------------------------------------------- tensors


def _check_tensors(c: _Checker, hp: dict[str, object], n_vocab: int | None) -> None:
    info = c.info
    if not info.tensors:
        c.add("the tensor count", 0, "the file holds no weights (a vocabulary-only file?)",
              "use a model file, not a vocabulary")
        return
    shapes = {t.name: t.shape for t in info.tensors}
    for t in info.tensors:
        unknown = t.n_bytes is None  # a type this table does not know: llama.cpp refuses it cleanly
        if t.type in INTEGER_TYPES or (len(t.shape) <= 1 and t.type not in VECTOR_TYPES and not unknown):
            c.add(f"the type of tensor {t.name}", None, shown=t.type,
                  why="weights are floats or quants, and norms and biases F32, F16 or BF16; llama.cpp aborts on "
                  "other types when it computes")
            return
    layers = hp["layers"]
    if isinstance(layers, int):
        blocks: dict[str, set[int]] = {}
        # T5's decoder may have its own depth (llama.cpp reads {arch}.decoder_block_count, else block_count)
        decoder_layers = _int(c.meta.get(c.key("decoder_block_count"))) or layers
        for name in shapes:
            m = _BLOCK_RE.match(name)
            if m:
                part, index = m.group(1) or "", int(m.group(2))
                blocks.setdefault(part, set()).add(index)
                count, key = (decoder_layers, "decoder_block_count") if part == "dec." else (layers, "block_count")
                if index >= count:
                    c.add(f"tensor {name}", None, shown=f"in block {index}",
                          why=f"{c.key(key)} is {count}, so blocks end at {count - 1}")
                    return
        for part, found in sorted(blocks.items()) or [("", set())]:
            count = decoder_layers if part == "dec." else layers
            missing = sorted(set(range(count)) - found)
            if missing:
                c.add(c.key("decoder_block_count" if part == "dec." else "block_count"), count,
                      f"block {missing[0]} has no tensors ({part}blk.{missing[0]}.*)")
                return
    embd = hp["embd"]
    if not isinstance(embd, int):
        return
    expected: dict[str, tuple[int, ...]] = {}
    if n_vocab and c.arch not in NO_TOKEN_EMBD_CHECK:
        if "token_embd.weight" not in shapes:
            c.add("tensor token_embd.weight", None, "llama.cpp needs the token embeddings")
        expected["token_embd.weight"] = (embd, n_vocab)
        if c.key("embedding_length_out") not in c.meta:
            expected["output.weight"] = (embd, n_vocab)
    ctx = hp["ctx"]
    if c.arch in ("gpt2", "starcoder") and isinstance(ctx, int):
        expected["position_embd.weight"] = (embd, ctx)
    per_block = _block_shapes(c.arch, hp, embd, layers if isinstance(layers, int) else 0)
    for name in per_block:
        if name not in shapes and (".ffn_" not in name or not c.meta.get(c.key("expert_count"))):
            c.add(f"tensor {name}", None, f"block {name.split('.')[1]} needs it ({c.key('block_count')} is {layers})")
            return
    expected |= per_block
    for name, shape in expected.items():
        actual = shapes.get(name)
        if actual is not None and tuple(actual) != shape:
            c.add(f"the shape of tensor {name}", None, shown=str(list(actual)),
                  why=f"the header's hyperparameters make it {list(shape)} (ggml order)")
            return


def _block_shapes(arch: str, hp: dict[str, object], embd: int, layers: int) -> dict[str, tuple[int, ...]]:
    """Per-block weights (all required) and their shapes, for the architectures whose layout is known here."""
    ff, heads, kv_heads = hp["ff"], hp["heads"], hp["kv_heads"]
    k, v = hp["key_len"], hp["value_len"]
    out: dict[str, tuple[int, ...]] = {}
    if not (isinstance(ff, list) and isinstance(heads, list) and isinstance(kv_heads, list)):
        return out
    if not (isinstance(k, int) and isinstance(v, int)):
        return out
    for il in range(layers):
        n_ff, h, kv = ff[il], heads[il], kv_heads[il]
        blk = f"blk.{il}."
        shapes: dict[str, tuple[int, ...]] = {"attn_norm.weight": (embd,), "ffn_norm.weight": (embd,)}
        if arch in ("llama", "qwen2", "qwen3"):
            shapes |= {
                "attn_q.weight": (embd, h * k),
                "attn_k.weight": (embd, kv * k),
                "attn_v.weight": (embd, kv * v),
                "attn_output.weight": (h * k, embd),
                "ffn_gate.weight": (embd, n_ff),
                "ffn_up.weight": (embd, n_ff),
                "ffn_down.weight": (n_ff, embd),
            }
        elif arch == "gpt2":
            shapes |= {
                "attn_qkv.weight": (embd, 3 * embd),
                "attn_output.weight": (embd, embd),
                "ffn_up.weight": (embd, n_ff),
                "ffn_down.weight": (n_ff, embd),
            }
        else:
            return out
        out |= {blk + name: shape for name, shape in shapes.items()}
    return out


# ---------------------------------------------------------------- memory


def kv_cache_bytes_per_token(info: GGUFInfo) -> int:
    """f16 K and V bytes per token of context, from the header's head counts and sizes (0 if unknown)."""
    arch = info.architecture or ""
    meta = info.metadata

    def per_layer(suffix: str, layers: int) -> list[int] | None:
        value = meta.get(f"{arch}.{suffix}")
        if isinstance(value, tuple) and len(value) == layers and all(_int(x) is not None for x in value):
            return [int(x) for x in value]
        number = _int(value)
        return None if number is None else [number] * layers

    layers = _int(meta.get(f"{arch}.block_count")) or 0
    embd = _int(meta.get(f"{arch}.embedding_length")) or 0
    heads = per_layer("attention.head_count", layers)
    if arch in RECURRENT or not layers or not heads:
        return 0
    kv_heads = per_layer("attention.head_count_kv", layers) or heads
    head = embd // max(heads) if max(heads) else 0
    k = _int(meta.get(f"{arch}.attention.key_length")) or head
    v = _int(meta.get(f"{arch}.attention.value_length")) or head
    return sum(kv * (k + v) * 2 for kv in kv_heads)


def estimate_load_bytes(info: GGUFInfo, n_ctx: int) -> tuple[int, int]:
    """(weights, KV cache) bytes a load at context n_ctx needs: every tensor is read, the cache is f16."""
    weights = sum(t.n_bytes or 0 for t in info.tensors)
    return weights, kv_cache_bytes_per_token(info) * max(0, n_ctx)


def _cgroup_headroom() -> int | None:
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
    except (OSError, ValueError):
        return None


def available_memory() -> int | None:
    """Bytes a load may use now: MemAvailable plus free swap, capped by a cgroup limit; None if unknown."""
    fields: dict[str, int] = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            name, _, rest = line.partition(":")
            parts = rest.split()
            if parts:
                fields[name] = int(parts[0]) * 1024
    except (OSError, ValueError):
        return None
    if "MemAvailable" not in fields:
        return None
    total = fields["MemAvailable"] + fields.get("SwapFree", 0)
    headroom = _cgroup_headroom()
    return min(total, headroom) if headroom is not None else total


def _check_memory(c: _Checker, n_ctx: int, memory: int) -> None:
    weights, kv = estimate_load_bytes(c.info, n_ctx)
    if weights + kv > memory:
        c.add("the memory a load needs", None, shown=f"~{human_bytes(weights + kv)}",
              why=f"weights {human_bytes(weights)} + KV cache {human_bytes(kv)} at a {n_ctx:,}-token context, but only "
              f"{human_bytes(memory)} is available (free memory and swap)",
              todo="free memory, or use a smaller model or quant, or a smaller --ctx-size")


# ---------------------------------------------------------------- entry points


def find_problems(info: GGUFInfo, *, n_ctx: int | None = None, memory: int | None = None) -> list[Problem]:
    """Every value in the header that llama.cpp would crash on or refuse, most fundamental first.

    n_ctx is the context window a load would use and memory the bytes it may take; the memory estimate is
    skipped when either is None (e.g. when the weights go to a GPU).
    """
    c = _Checker(info)
    if not info.architecture:
        c.add("general.architecture", None, "not a model file")
        return c.problems
    hp = _check_hparams(c)
    n_vocab = _check_vocab(c)
    if not c.problems:  # shapes only mean something once the values they derive from are sound
        _check_tensors(c, hp, n_vocab)
    if not c.problems and n_ctx is not None and memory is not None:
        _check_memory(c, n_ctx, memory)
    return c.problems


def check_fits(info: GGUFInfo, *, n_ctx: int, memory: int) -> None:
    """Only the memory estimate, for a header whose values passed before (header_cache)."""
    c = _Checker(info)
    _check_memory(c, n_ctx, memory)
    if c.problems:
        raise GGUFValueError(c.problems[0].line(info.path))


def check_loadable(info: GGUFInfo, *, n_ctx: int | None = None, memory: int | None = None) -> None:
    """Raise GGUFValueError with the first problem (one line naming the file and the field), if any."""
    problems = find_problems(info, n_ctx=n_ctx, memory=memory)
    if problems:
        raise GGUFValueError(problems[0].line(info.path))
