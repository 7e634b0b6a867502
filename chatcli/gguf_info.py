"""Safe, fast reading of GGUF headers: metadata and tensor infos, never tensor data.

Pure Python (struct and plain file reads) so that `chatcli list` can read many files in
milliseconds. Every count and length is checked against the bytes left in the file and
against fixed caps before anything is allocated or looped over; any malformed, truncated
or hostile file raises GGUFError and nothing else.
"""

from __future__ import annotations

import stat
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from chatcli.errors import GGUFError
from chatcli.ggml_types import (  # noqa: F401 - re-exported: gguf_info is where callers look
    _FTYPE_GUESSED,
    _QUANT_ALIASES,
    _SCALAR_STRUCTS,
    _T_ARRAY,
    _T_BOOL,
    _T_STRING,
    FILE_TYPES,
    QUANT_BITS,
    TENSOR_TYPES,
    VALUE_TYPES,
    quant_from_filename,
)

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)  # v1 used 32-bit counts and is gone from llama.cpp
DEFAULT_ALIGNMENT = 32

# Caps, no looser than llama.cpp's own gguf.cpp. Real files hold ~50 keys, up to a few
# thousand tensors and vocabularies/merges of up to ~1M strings; the caps bound the time a
# hostile file can cost (every string of an array is visited) and the memory it can take
# (only short values are kept).
MAX_KV = 1 << 16
MAX_TENSORS = 1 << 18
MAX_KEY_LEN = 1 << 16
MAX_STRING_VALUE_LEN = 1 << 24  # one kept string value (chat templates are ~10 KB)
MAX_KEPT_BYTES = 1 << 26  # all kept strings together
MAX_ARRAY_LEN = 1 << 30  # GGUF_MAX_ARRAY_ELEMENTS; numeric arrays are skipped in O(1)
MAX_STRING_ARRAY_LEN = 1 << 24
MAX_DIMS = 4  # GGML_MAX_DIMS: llama.cpp refuses more
INT64_MAX = (1 << 63) - 1
INLINE_ARRAY_MAX = 256  # longer arrays become an ArraySummary
_CHUNK = 1 << 20
_CHECKPOINT_SHIFT = 8  # remember every 256th token's offset to look tokens up later

# Arrays that are never materialised, whatever their length, so metadata looks the same
# for a toy vocabulary and a real one.
_SUMMARISED_KEYS = frozenset(
    {
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.scores",
        "tokenizer.ggml.token_type",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.precompiled_charsmap",
    }
)



@dataclass(frozen=True)
class ArraySummary:
    """A metadata array too large to keep (e.g. the vocabulary): its element type and length."""

    type: str
    length: int


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order: shape[0] is the row length
    type: str  # TENSOR_TYPES name, or "TYPE<n>" for a type this table does not know
    offset: int  # relative to the start of the data section
    n_elements: int
    n_bytes: int | None  # None for an unknown type


@dataclass(frozen=True)
class GGUFInfo:
    path: Path
    file_size: int
    version: int
    architecture: str | None
    name: str | None
    metadata: dict[str, object]
    n_tensors: int
    n_params: int
    file_type: str | None
    context_length: int | None
    chat_template: str | None
    bos_token_id: int | None
    eos_token_id: int | None
    eot_token_id: int | None
    bos_token: str | None
    eos_token: str | None
    eot_token: str | None
    license: str | None
    split: tuple[int, int] | None  # (split.no, split.count); split.no counts from 0
    alignment: int
    data_offset: int  # where tensor data starts
    tensors: tuple[TensorInfo, ...]
    # Byte span [start, end) of each summarised array's elements, so a check can read them back later.
    array_spans: dict[str, tuple[int, int]] = field(default_factory=dict, repr=False, compare=False)

    def arch_value(self, suffix: str) -> object | None:
        """The value of "{architecture}.{suffix}", e.g. arch_value("block_count")."""
        if self.architecture is None:
            return None
        return self.metadata.get(f"{self.architecture}.{suffix}")

    def _arch_int(self, suffix: str) -> int | None:
        value = self.arch_value(suffix)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    @property
    def block_count(self) -> int | None:
        return self._arch_int("block_count")

    @property
    def embedding_length(self) -> int | None:
        return self._arch_int("embedding_length")

    @property
    def feed_forward_length(self) -> int | None:
        return self._arch_int("feed_forward_length")

    @property
    def head_count(self) -> int | None:
        return self._arch_int("attention.head_count")

    @property
    def head_count_kv(self) -> int | None:
        return self._arch_int("attention.head_count_kv")

    @property
    def vocab_size(self) -> int | None:
        tokens = self.metadata.get("tokenizer.ggml.tokens")
        return tokens.length if isinstance(tokens, ArraySummary) else None

    @property
    def tokenizer_model(self) -> str | None:
        value = self.metadata.get("tokenizer.ggml.model")
        return value if isinstance(value, str) else None

    @property
    def size_label(self) -> str | None:
        value = self.metadata.get("general.size_label")
        return value if isinstance(value, str) else None


_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class _Reader:
    """Sequential little-endian reads through a window of the file, bounds-checked."""

    __slots__ = ("f", "path", "size", "chunk", "buf", "base", "pos", "where", "kept", "spans")

    def __init__(self, f: BinaryIO, path: Path, size: int, chunk: int = _CHUNK) -> None:
        self.f = f
        self.path = path
        self.size = size
        self.chunk = chunk  # bytes read ahead per refill: small for HTTP Range reads, so no more than needed is fetched
        self.buf = b""
        self.base = 0
        self.pos = 0
        self.where = "header"
        self.kept = 0  # bytes of strings decoded so far
        self.spans: dict[str, tuple[int, int]] = {}  # summarised arrays: key -> [start, end) of the elements

    def error(self, message: str) -> GGUFError:
        return GGUFError(f"{self.path}: {message} (in {self.where})")

    def truncated(self, end: int) -> GGUFError:
        """The file ends before `end`, which reading `where` needs to reach."""
        missing = end - self.size
        return GGUFError(
            f"{self.path}: truncated at byte {self.size} ({self.where} needs at least {missing} more bytes)"
        )

    @property
    def remaining(self) -> int:
        return self.size - self.pos

    def need(self, n: int) -> int:
        """Make bytes [pos, pos+n) available; return their offset in buf."""
        end = self.pos + n
        if end > self.size:
            raise self.truncated(end)
        off = self.pos - self.base
        if off < 0 or end - self.base > len(self.buf):
            self.f.seek(self.pos)
            data = self.f.read(max(n, self.chunk))
            if len(data) < n:  # the file shrank under us
                self.size = self.pos + len(data)
                raise self.truncated(end)
            self.buf = data
            self.base = self.pos
            off = 0
        return off

    def seek(self, pos: int) -> None:
        self.pos = pos

    def skip(self, n: int) -> None:
        if self.pos + n > self.size:
            raise self.truncated(self.pos + n)
        self.pos += n

    def u32(self) -> int:
        off = self.need(4)
        self.pos += 4
        return _U32.unpack_from(self.buf, off)[0]

    def u64(self) -> int:
        off = self.need(8)
        self.pos += 8
        return _U64.unpack_from(self.buf, off)[0]

    def scalar(self, st: struct.Struct) -> object:
        off = self.need(st.size)
        self.pos += st.size
        return st.unpack_from(self.buf, off)[0]

    def raw(self, n: int) -> bytes:
        off = self.need(n)
        self.pos += n
        return self.buf[off : off + n]

    def string(self, cap: int) -> str:
        start = self.pos
        n = self.u64()
        if n > cap:
            raise self.error(f"string at byte {start} claims {n} bytes (limit {cap})")
        if n > self.remaining:
            raise self.truncated(self.pos + n)
        self.kept += n
        if self.kept > MAX_KEPT_BYTES:
            raise self.error(f"more than {MAX_KEPT_BYTES} bytes of metadata strings")
        return self.raw(n).decode("utf-8", errors="replace")

    def skip_strings(self, count: int, checkpoints: list[int] | None = None) -> None:
        """Walk over `count` length-prefixed strings without decoding them.

        The hot loop of the reader (a vocabulary and its merges are 100k+ strings each), so it
        works on buffer-relative offsets and lets an absurd length simply run past the window:
        the next refill or the final size check reports it as truncation.
        """
        unpack = _U64.unpack_from
        step = 1 << _CHECKPOINT_SHIFT
        i = 0
        while i < count:
            self.need(8)
            buf = self.buf
            q = self.pos - self.base
            limit = len(buf) - 8
            if checkpoints is None:
                j = count
                for j in range(i, count):  # noqa: B007 - j is used after the loop
                    if q > limit:
                        break
                    q += unpack(buf, q)[0] + 8
                else:
                    j = count
            else:
                # In blocks of `step` so that each block's first offset can be remembered.
                j = i
                base = self.base
                while j < count and q <= limit:
                    if not j % step:
                        checkpoints.append(base + q)
                    stop = min(count, j - j % step + step)
                    for j in range(j, stop):  # noqa: B007, B020 - j is used after the loop
                        if q > limit:
                            break
                        q += unpack(buf, q)[0] + 8
                    else:
                        j = stop
            i = j
            self.pos = self.base + q
            if self.pos > self.size:
                raise self.truncated(self.pos)


class _Vocab:
    """Where tokenizer.ggml.tokens lies, so single tokens can be read back without a list."""

    __slots__ = ("count", "checkpoints")

    def __init__(self) -> None:
        self.count = 0
        self.checkpoints: list[int] = []  # offset of every 2**_CHECKPOINT_SHIFT-th token


def _read_value(r: _Reader, vtype: int, key: str, vocab: _Vocab) -> object:
    if vtype == _T_STRING:
        return r.string(MAX_STRING_VALUE_LEN)
    st = _SCALAR_STRUCTS.get(vtype)
    if st is not None:
        value = r.scalar(st)
        return bool(value) if vtype == _T_BOOL else value
    if vtype != _T_ARRAY:
        raise r.error(f"unknown value type {vtype}")

    etype = r.u32()
    count = r.u64()
    if etype == _T_ARRAY:
        raise r.error("nested arrays are not supported (llama.cpp refuses them too)")
    if etype not in VALUE_TYPES:
        raise r.error(f"array of unknown value type {etype}")
    est = _SCALAR_STRUCTS.get(etype)
    min_size = 8 if est is None else est.size
    limit = MAX_ARRAY_LEN if est is not None else MAX_STRING_ARRAY_LEN
    if count > limit:
        raise r.error(f"array claims {count} elements (limit {limit})")
    if count * min_size > r.remaining:
        raise r.truncated(r.pos + count * min_size)
    type_name = VALUE_TYPES[etype][0]

    if key in _SUMMARISED_KEYS or count > INLINE_ARRAY_MAX:
        start = r.pos
        if est is not None:
            r.skip(count * est.size)
        elif key == "tokenizer.ggml.tokens":
            vocab.count = count
            r.skip_strings(count, vocab.checkpoints)
        else:
            r.skip_strings(count)
        r.spans[key] = (start, r.pos)
        return ArraySummary(type_name, count)
    if est is None:
        return tuple(r.string(MAX_STRING_VALUE_LEN) for _ in range(count))
    values = tuple(r.scalar(est) for _ in range(count))
    if etype == _T_BOOL:
        return tuple(bool(v) for v in values)
    return values


def _token_text(r: _Reader, vocab: _Vocab, token_id: int | None) -> str | None:
    if token_id is None or not 0 <= token_id < vocab.count:
        return None
    r.where = f"token {token_id}"
    r.seek(vocab.checkpoints[token_id >> _CHECKPOINT_SHIFT])
    r.skip_strings(token_id & ((1 << _CHECKPOINT_SHIFT) - 1))
    return r.string(MAX_STRING_VALUE_LEN)


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


def read_gguf(path: str | Path) -> GGUFInfo:
    """Read a GGUF file's header; raise GGUFError for anything that is not a sound GGUF."""
    path = Path(path)
    try:
        if not stat.S_ISREG(path.stat().st_mode):  # a FIFO would block open() forever
            raise GGUFError(f"{path}: not a regular file")
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            f.seek(0)
            return _parse(_Reader(f, path, size))
    except OSError as exc:
        raise GGUFError(f"{path}: cannot read: {exc.strerror or exc}") from exc


def read_gguf_from(source: BinaryIO, name: Path, size: int, *, chunk: int = _CHUNK) -> GGUFInfo:
    """The same checked parse from any seekable byte source of `size` bytes (a remote file read by HTTP Range).

    `name` labels errors and becomes GGUFInfo.path; read_string_array reads from that path, so a caller whose
    source is not that file must point it at a copy of the header (remote_header keeps one in the cache).
    """
    try:
        return _parse(_Reader(source, name, size, chunk))
    except OSError as exc:
        raise GGUFError(f"{name}: cannot read: {exc.strerror or exc}") from exc


def _parse(r: _Reader) -> GGUFInfo:
    path = r.path
    if r.size < 4 or r.raw(4) != GGUF_MAGIC:
        raise GGUFError(f"{path}: not a GGUF file")
    r.where = "version"
    version = r.u32()
    if version & 0xFFFF == 0 and (version >> 16) != 0:
        raise GGUFError(f"{path}: big-endian GGUF files are not supported")
    if version not in SUPPORTED_VERSIONS:
        raise GGUFError(f"{path}: GGUF version {version} is not supported (only versions 2 and 3)")

    r.where = "counts"
    n_tensors = r.u64()
    n_kv = r.u64()
    if n_kv > MAX_KV:
        raise GGUFError(f"{path}: implausible key-value count {n_kv} (limit {MAX_KV})")
    if n_tensors > MAX_TENSORS:
        raise GGUFError(f"{path}: implausible tensor count {n_tensors} (limit {MAX_TENSORS})")
    # Smallest possible KV: 8 (key length) + 1 (key) + 4 (type) + 1 (u8 value); smallest
    # tensor info: 8 + 1 (name) + 4 (n_dims) + 4 (type) + 8 (offset).
    r.where = f"the header ({n_kv} key-value pairs, {n_tensors} tensors)"
    if n_kv * 14 + n_tensors * 25 > r.remaining:
        raise r.truncated(r.pos + n_kv * 14 + n_tensors * 25)

    metadata: dict[str, object] = {}
    vocab = _Vocab()
    for i in range(n_kv):
        r.where = f"key-value pair {i}"
        key = r.string(MAX_KEY_LEN)
        if not key:
            raise r.error("empty key")
        if key in metadata:
            raise r.error(f"duplicate key {key!r}")
        r.where = f"key {key!r}"
        metadata[key] = _read_value(r, r.u32(), key, vocab)

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise GGUFError(f"{path}: general.alignment {alignment!r} is not a power of two")

    tensors: list[TensorInfo] = []
    seen: set[str] = set()
    n_params = 0
    for i in range(n_tensors):
        r.where = f"tensor info {i}"
        name = r.string(MAX_KEY_LEN)
        if name in seen:
            raise r.error(f"duplicate tensor name {name!r}")
        seen.add(name)
        r.where = f"tensor {name!r}"
        n_dims = r.u32()
        if n_dims > MAX_DIMS:
            raise r.error(f"tensor has {n_dims} dimensions (at most {MAX_DIMS})")
        shape = tuple(r.u64() for _ in range(n_dims))
        n_elements = 1
        for dim in shape:
            n_elements *= dim
            if dim > INT64_MAX or n_elements > INT64_MAX:
                raise r.error(f"tensor shape {shape} overflows 64 bits")
        type_id = r.u32()
        offset = r.u64()
        known = TENSOR_TYPES.get(type_id)
        if known is None:
            type_name, n_bytes = f"TYPE{type_id}", None
        else:
            type_name, block, type_size = known
            if shape and shape[0] % block:
                raise r.error(
                    f"row length {shape[0]} is not a multiple of the {type_name} block size {block}"
                )
            n_bytes = n_elements // block * type_size
        tensors.append(TensorInfo(name, shape, type_name, offset, n_elements, n_bytes))
        n_params += n_elements

    data_offset = r.pos
    if n_tensors:
        data_offset += -data_offset % alignment
    data_size = r.size - data_offset
    for t in tensors:
        if t.n_bytes is not None and t.offset + t.n_bytes > data_size:
            r.where = f"the data of tensor {t.name!r}"
            raise r.truncated(data_offset + t.offset + t.n_bytes)

    bos_id = _int_or_none(metadata.get("tokenizer.ggml.bos_token_id"))
    eos_id = _int_or_none(metadata.get("tokenizer.ggml.eos_token_id"))
    eot_id = _int_or_none(metadata.get("tokenizer.ggml.eot_token_id"))
    bos, eos, eot = (_token_text(r, vocab, t) for t in (bos_id, eos_id, eot_id))

    arch = _str_or_none(metadata.get("general.architecture"))
    split_no = _int_or_none(metadata.get("split.no"))
    split_count = _int_or_none(metadata.get("split.count"))
    return GGUFInfo(
        path=path,
        file_size=r.size,
        version=version,
        architecture=arch,
        name=_str_or_none(metadata.get("general.name")),
        metadata=metadata,
        n_tensors=n_tensors,
        n_params=n_params,
        file_type=_file_type(metadata.get("general.file_type"), tensors),
        context_length=_int_or_none(metadata.get(f"{arch}.context_length")) if arch else None,
        chat_template=_str_or_none(metadata.get("tokenizer.chat_template")),
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        eot_token_id=eot_id,
        bos_token=bos,
        eos_token=eos,
        eot_token=eot,
        license=_str_or_none(metadata.get("general.license")),
        split=(split_no, split_count) if split_no is not None and split_count is not None else None,
        alignment=alignment,
        data_offset=data_offset,
        tensors=tuple(tensors),
        array_spans=r.spans,
    )


def _file_type(ftype: object, tensors: list[TensorInfo]) -> str | None:
    """general.file_type's quant name, else the most common type among the weight matrices."""
    if isinstance(ftype, int) and not isinstance(ftype, bool):
        name = FILE_TYPES.get(ftype & ~_FTYPE_GUESSED)
        if name is not None:
            return name
    # 1-D tensors (norms, biases) stay F32 in every quant, so they do not count.
    counts = Counter(t.type for t in tensors if len(t.shape) >= 2) or Counter(t.type for t in tensors)
    return counts.most_common(1)[0][0] if counts else None


MAX_READ_BACK_BYTES = 1 << 27  # a real vocabulary is a few MB (Gemma 3's 262k tokens: ~5 MB)


def read_string_array(info: GGUFInfo, key: str) -> list[bytes]:
    """The raw strings of a summarised string array (e.g. the vocabulary), read back from the file.

    Bytes, not str: llama.cpp compares token strings byte for byte, and decoding with replacement
    would make two different invalid sequences look equal.
    """
    summary = info.metadata.get(key)
    span = info.array_spans.get(key)
    if not isinstance(summary, ArraySummary) or summary.type != "STRING" or span is None:
        raise GGUFError(f"{info.path}: {key} is not an array of strings")
    start, end = span
    if end - start > MAX_READ_BACK_BYTES:
        raise GGUFError(f"{info.path}: {key} takes {end - start} bytes (limit {MAX_READ_BACK_BYTES})")
    try:
        with open(info.path, "rb") as f:
            f.seek(start)
            data = f.read(end - start)
    except OSError as exc:
        raise GGUFError(f"{info.path}: cannot read: {exc.strerror or exc}") from exc
    unpack = _U64.unpack_from
    out: list[bytes] = []
    pos = 0
    for _ in range(summary.length):
        if pos + 8 > len(data):
            raise GGUFError(f"{info.path}: {key} changed while it was read")
        n = unpack(data, pos)[0]
        pos += 8
        if pos + n > len(data):
            raise GGUFError(f"{info.path}: {key} changed while it was read")
        out.append(data[pos : pos + n])
        pos += n
    return out
