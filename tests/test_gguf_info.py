"""chatcli.gguf_info: reading real, generated, truncated and hostile GGUF headers."""

from __future__ import annotations

import os
import random
import shutil
import struct
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import gguf
import ggufgen  # tests/ is on sys.path (conftest.py)
import pytest

from chatcli.errors import GGUFError
from chatcli.gguf_info import (
    FILE_TYPES,
    QUANT_BITS,
    TENSOR_TYPES,
    VALUE_TYPES,
    ArraySummary,
    GGUFInfo,
    quant_from_filename,
    read_gguf,
)


@pytest.fixture(scope="module")
def models(tiny_gpt2: Path, tiny_llama: Path, models_dir: Path) -> dict[str, Path]:
    """conftest's tiny models, plus a llama with grouped-query attention (2 heads share 1 KV head)."""
    return {
        "gpt2": tiny_gpt2,
        "llama": tiny_llama,
        "llama-gqa": ggufgen.make_llama(models_dir / "tiny-llama-gqa.gguf", n_head_kv=1, seed=1),
    }


# --- hand-made headers ------------------------------------------------------------------

U8, U16, U32, I32, F32, BOOL, STRING, ARRAY, U64 = 0, 2, 4, 5, 6, 7, 8, 9, 10


def s(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    return s(key) + struct.pack("<I", vtype) + payload


def kv_str(key: str, value: str | bytes) -> bytes:
    return kv(key, STRING, s(value))


def kv_u32(key: str, value: int) -> bytes:
    return kv(key, U32, struct.pack("<I", value))


def kv_str_array(key: str, items: list[str]) -> bytes:
    return kv(key, ARRAY, struct.pack("<IQ", STRING, len(items)) + b"".join(s(i) for i in items))


def tensor_info(name: str, dims: tuple[int, ...], ttype: int = 0, offset: int = 0) -> bytes:
    return (
        s(name)
        + struct.pack("<I", len(dims))
        + b"".join(struct.pack("<Q", d) for d in dims)
        + struct.pack("<IQ", ttype, offset)
    )


def gguf_bytes(
    kvs: list[bytes],
    tensors: Sequence[bytes] = (),
    data: bytes = b"",
    *,
    version: int = 3,
    n_kv: int | None = None,
    n_tensors: int | None = None,
) -> bytes:
    head = b"GGUF" + struct.pack(
        "<IQQ", version, len(tensors) if n_tensors is None else n_tensors, len(kvs) if n_kv is None else n_kv
    )
    body = head + b"".join(kvs) + b"".join(tensors)
    if tensors:
        body += b"\0" * (-len(body) % 32)
    return body + data


def write(tmp_path: Path, content: bytes, name: str = "x.gguf") -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


ARCH = kv_str("general.architecture", "llama")


# --- generated models -------------------------------------------------------------------


def test_reads_generated_gpt2(models: dict[str, Path]) -> None:
    info = read_gguf(models["gpt2"])

    assert isinstance(info, GGUFInfo)
    assert info.version == 3
    assert info.architecture == "gpt2"
    assert info.name == "tiny-gpt2"
    assert info.context_length == 256
    assert info.block_count == 2
    assert info.embedding_length == 64
    assert info.feed_forward_length == 256
    assert info.head_count == 2
    assert info.file_type == "F16"
    assert info.license == "apache-2.0"
    assert info.chat_template is None
    assert (info.bos_token, info.eos_token, info.eot_token) == ("<|endoftext|>", "<|endoftext|>", None)
    assert info.bos_token_id == info.eos_token_id == 256 + 13
    assert info.tokenizer_model == "gpt2"
    assert info.vocab_size == 270
    assert info.split is None
    assert info.file_size == models["gpt2"].stat().st_size


def test_n_params_is_the_sum_of_tensor_sizes(models: dict[str, Path]) -> None:
    for path in models.values():
        info = read_gguf(path)
        assert info.n_params == ggufgen.tensor_param_count(path)
        assert info.n_tensors == len(info.tensors) == len(gguf.GGUFReader(path).tensors)
    # By hand for GPT-2: embeddings, positions, final norm, and 2 blocks of 64-wide layers.
    vocab, ctx, e, ff = 270, 256, 64, 256
    block = 2 * e + 3 * e * e + 3 * e + e * e + e + 2 * e + ff * e + ff + e * ff + e
    assert read_gguf(models["gpt2"]).n_params == vocab * e + ctx * e + 2 * e + 2 * block


def test_reads_generated_llama_with_chat_template(models: dict[str, Path]) -> None:
    info = read_gguf(models["llama"])

    assert info.architecture == "llama"
    assert info.chat_template == ggufgen.CHATML_TEMPLATE
    assert info.bos_token == "<|endoftext|>"
    assert info.eos_token == "<|im_end|>"
    assert info.eot_token == "<|im_end|>"
    assert (info.head_count, info.head_count_kv) == (2, 2)
    assert read_gguf(models["llama-gqa"]).head_count_kv == 1
    assert info.arch_value("rope.freq_base") == 10000.0
    assert info.metadata["tokenizer.ggml.add_bos_token"] is False


def test_large_arrays_are_summarised_not_materialised(models: dict[str, Path]) -> None:
    meta = read_gguf(models["llama"]).metadata

    assert meta["tokenizer.ggml.tokens"] == ArraySummary("STRING", 272)
    assert meta["tokenizer.ggml.token_type"] == ArraySummary("INT32", 272)
    assert meta["tokenizer.ggml.merges"] == ArraySummary("STRING", 13)


def test_short_arrays_are_kept(tmp_path: Path) -> None:
    path = ggufgen.make_gpt2(
        tmp_path / "m.gguf", extra_kv={"general.tags": ["chat", "tiny"], "test.sizes": [1, 2, 3]}
    )

    meta = read_gguf(path).metadata
    assert meta["general.tags"] == ("chat", "tiny")
    assert meta["test.sizes"] == (1, 2, 3)


def test_file_type_falls_back_to_the_most_common_weight_type(tmp_path: Path) -> None:
    missing = ggufgen.make_gpt2(tmp_path / "a.gguf", extra_kv={"general.file_type": None})
    unknown = ggufgen.make_gpt2(tmp_path / "b.gguf", extra_kv={"general.file_type": 999})

    assert read_gguf(missing).file_type == "F16"  # the norms and biases (F32) are 1-D
    assert read_gguf(unknown).file_type == "F16"


def test_split_and_missing_fields(tmp_path: Path) -> None:
    path = ggufgen.make_llama(
        tmp_path / "m-00002-of-00003.gguf",
        extra_kv={
            "split.no": (1, gguf.GGUFValueType.UINT16),
            "split.count": (3, gguf.GGUFValueType.UINT16),
            "general.license": None,
            "general.name": None,
            "llama.context_length": None,
        },
    )

    info = read_gguf(path)
    assert info.split == (1, 3)
    assert info.license is None
    assert info.name is None
    assert info.context_length is None


@pytest.mark.parametrize("token_id", [0, 1, 255, 256, 257, 511, 512, 767, 768, 999])
def test_token_text_lookup_across_checkpoints(tmp_path: Path, token_id: int) -> None:
    tokens = [f"tok{i}" for i in range(1000)]
    content = gguf_bytes(
        [
            ARCH,
            kv_str_array("tokenizer.ggml.tokens", tokens),
            kv_str_array("tokenizer.ggml.merges", [f"m {i}" for i in range(300)]),
            kv_u32("tokenizer.ggml.eos_token_id", token_id),
            kv_u32("tokenizer.ggml.bos_token_id", 999 - token_id),
        ]
    )

    info = read_gguf(write(tmp_path, content))
    assert info.eos_token == f"tok{token_id}"
    assert info.bos_token == f"tok{999 - token_id}"


def test_token_ids_outside_the_vocabulary_have_no_text(tmp_path: Path) -> None:
    content = gguf_bytes(
        [
            ARCH,
            kv_str_array("tokenizer.ggml.tokens", ["a", "b"]),
            kv_u32("tokenizer.ggml.eos_token_id", 2),
            kv("tokenizer.ggml.bos_token_id", I32, struct.pack("<i", -1)),
        ]
    )

    info = read_gguf(write(tmp_path, content))
    assert (info.eos_token_id, info.eos_token) == (2, None)
    assert (info.bos_token_id, info.bos_token) == (-1, None)


def test_invalid_utf8_is_replaced(tmp_path: Path) -> None:
    content = gguf_bytes([ARCH, kv_str("general.name", b"caf\xe9 \xff")])

    assert read_gguf(write(tmp_path, content)).name == "caf\ufffd \ufffd"


def test_version_2_is_read(tmp_path: Path) -> None:
    info = read_gguf(write(tmp_path, gguf_bytes([ARCH], version=2)))

    assert (info.version, info.architecture, info.n_tensors, info.n_params) == (2, "llama", 0, 0)


def test_vocab_only_file_has_no_tensors(tmp_path: Path) -> None:
    content = gguf_bytes([ARCH, kv_u32("general.file_type", 1), kv_str_array("tokenizer.ggml.tokens", ["a"])])

    info = read_gguf(write(tmp_path, content))
    assert (info.n_tensors, info.n_params, info.file_type, info.vocab_size) == (0, 0, "F16", 1)


def test_reads_real_smollm2(smollm2: Path) -> None:
    """Through conftest's fixture, which fetches the file when it is not cached (a collection-time skip never ran)."""
    info = read_gguf(smollm2)

    assert info.architecture == "llama"
    assert info.file_type == "Q4_1"
    assert info.chat_template is not None and "<|im_start|>" in info.chat_template
    assert 130e6 < info.n_params < 140e6
    assert info.context_length == 8192
    assert info.eos_token == "<|im_end|>"
    assert info.license == "apache-2.0"
    assert info.vocab_size == 49152


# --- damaged files ----------------------------------------------------------------------


def test_every_truncation_of_the_header_raises(models: dict[str, Path], tmp_path: Path) -> None:
    """Cut points at every byte of the header: magic, version, counts, keys, values, the tokens
    and merges arrays, tensor infos; then a few inside the tensor data."""
    src = models["llama"]
    info = read_gguf(src)
    cuts = [*range(info.data_offset + 1), info.data_offset + 1, info.file_size // 2, info.file_size - 1]
    path = tmp_path / "cut.gguf"
    shutil.copyfile(src, path)
    for n in sorted(cuts, reverse=True):  # truncating in place is much cheaper than copying
        os.truncate(path, n)
        with pytest.raises(GGUFError) as excinfo:
            read_gguf(path)
        message = str(excinfo.value)
        assert message.startswith(f"{path}: ")
        if n >= 4:
            assert f"truncated at byte {n}" in message, (n, message)
        else:
            assert message.endswith("not a GGUF file")


@pytest.mark.parametrize("nbytes", [0, 1, 3, 4, 24, 1000, 100_000])
def test_garbage_is_not_a_gguf_file(tmp_path: Path, nbytes: int) -> None:
    path = ggufgen.make_garbage(tmp_path / "garbage.gguf", nbytes)

    with pytest.raises(GGUFError, match="not a GGUF file"):
        read_gguf(path)


def test_zero_filled_file_is_not_a_gguf_file(tmp_path: Path) -> None:
    with pytest.raises(GGUFError, match="not a GGUF file"):
        read_gguf(write(tmp_path, b"\0" * 4096))


def test_missing_file_directory_and_fifo_raise_gguf_error(tmp_path: Path) -> None:
    with pytest.raises(GGUFError, match="cannot read"):
        read_gguf(tmp_path / "absent.gguf")
    with pytest.raises(GGUFError, match="not a regular file"):
        read_gguf(tmp_path)
    os.mkfifo(tmp_path / "fifo.gguf")
    with pytest.raises(GGUFError, match="not a regular file"):
        read_gguf(tmp_path / "fifo.gguf")


def test_cut_inside_tensor_data_raises(models: dict[str, Path], tmp_path: Path) -> None:
    src = models["gpt2"]
    cut = ggufgen.truncate_copy(src, tmp_path / "cut.gguf", src.stat().st_size - 100)

    with pytest.raises(
        GGUFError, match=r"truncated at byte \d+ \(the data of tensor 'blk\.1\.ffn_down\.bias'"
    ):
        read_gguf(cut)


def test_unknown_tensor_types_are_tolerated(tmp_path: Path) -> None:
    """Types removed upstream (e.g. Q4_0_4_4 = 31) still show, without a byte size."""
    content = gguf_bytes([ARCH], [tensor_info("w", (64, 2), ttype=31)], b"\0" * 64)

    info = read_gguf(write(tmp_path, content))
    assert [(t.name, t.type, t.shape, t.n_bytes) for t in info.tensors] == [("w", "TYPE31", (64, 2), None)]
    assert (info.n_params, info.file_type) == (128, "TYPE31")


@pytest.mark.parametrize(
    ("version_bytes", "match"),
    [
        (struct.pack(">I", 3), "big-endian"),
        (struct.pack("<I", 1), "version 1 is not supported"),
        (struct.pack("<I", 4), "version 4 is not supported"),
        (struct.pack("<I", 0), "version 0 is not supported"),
    ],
)
def test_unsupported_versions(tmp_path: Path, version_bytes: bytes, match: str) -> None:
    content = b"GGUF" + version_bytes + struct.pack("<QQ", 0, 0)

    with pytest.raises(GGUFError, match=match):
        read_gguf(write(tmp_path, content))


_HUGE = 1 << 40
_ONE_KV = b"GGUF" + struct.pack("<IQQ", 3, 0, 1)
# name -> (file content, what the message must say)
HOSTILE: dict[str, tuple[bytes, str]] = {
    "kv count 2^63": (gguf_bytes([ARCH], n_kv=1 << 63), "implausible key-value count"),
    "kv count beyond the file": (gguf_bytes([ARCH], n_kv=1000), "truncated"),
    "tensor count 2^64-1": (gguf_bytes([ARCH], n_tensors=(1 << 64) - 1), "implausible tensor count"),
    "key length 2^40": (_ONE_KV + struct.pack("<Q", _HUGE) + b"k" * 64, "claims 1099511627776 bytes"),
    "key length 2^64-1": (_ONE_KV + struct.pack("<Q", (1 << 64) - 1) + b"k" * 64, "claims"),
    "key length beyond the file": (_ONE_KV + struct.pack("<Q", 1000) + b"k" * 64, "truncated"),
    "string value length 2^40": (
        gguf_bytes([kv("general.name", STRING, struct.pack("<Q", _HUGE) + b"abc")]),
        "claims 1099511627776 bytes",
    ),
    "u8 array length 2^40": (
        gguf_bytes([kv("a", ARRAY, struct.pack("<IQ", U8, _HUGE) + b"\0" * 64)]),
        "array claims 1099511627776 elements",
    ),
    "string array length 2^40": (
        gguf_bytes([kv("a", ARRAY, struct.pack("<IQ", STRING, _HUGE) + s("x"))]),
        "array claims",
    ),
    "string array beyond the file": (
        gguf_bytes([kv("a", ARRAY, struct.pack("<IQ", STRING, 10_000) + s("x"))]),
        "truncated",
    ),
    "huge string inside tokens": (
        gguf_bytes(
            [
                kv(
                    "tokenizer.ggml.tokens",
                    ARRAY,
                    struct.pack("<IQ", STRING, 3) + s("a") + struct.pack("<Q", _HUGE),
                )
            ]
        ),
        "truncated",
    ),
    "nested array": (
        gguf_bytes([kv("a", ARRAY, struct.pack("<IQ", ARRAY, 1) + struct.pack("<IQ", U8, 1) + b"\1")]),
        "nested arrays",
    ),
    "deeply nested arrays": (
        gguf_bytes([kv("a", ARRAY, struct.pack("<IQ", ARRAY, 1) * 100 + struct.pack("<IQ", U8, 0))]),
        "nested arrays",
    ),
    "unknown value type 99": (gguf_bytes([kv("a", 99, b"\0" * 16)]), "unknown value type 99"),
    "array of unknown type 99": (
        gguf_bytes([kv("a", ARRAY, struct.pack("<IQ", 99, 1) + b"\0" * 16)]),
        "array of unknown value type 99",
    ),
    "empty key": (gguf_bytes([kv("", U32, b"\0" * 4)]), "empty key"),
    "duplicate key": (gguf_bytes([ARCH, ARCH]), "duplicate key 'general.architecture'"),
    "alignment not a power of two": (
        gguf_bytes([ARCH, kv_u32("general.alignment", 48)]),
        "not a power of two",
    ),
    "alignment zero": (gguf_bytes([ARCH, kv_u32("general.alignment", 0)]), "not a power of two"),
    "n_dims 1000": (
        gguf_bytes([ARCH], [s("t") + struct.pack("<I", 1000) + struct.pack("<Q", 1) * 1000]),
        "1000 dimensions",
    ),
    "dims overflow": (gguf_bytes([ARCH], [tensor_info("t", (1 << 32, 1 << 32))]), "overflows"),
    "dim above int64": (gguf_bytes([ARCH], [tensor_info("t", (1 << 63,))]), "overflows"),
    "duplicate tensor": (
        gguf_bytes([ARCH], [tensor_info("t", (8,)), tensor_info("t", (8,), offset=32)], b"\0" * 64),
        "duplicate tensor name 't'",
    ),
    "tensor data beyond the file": (
        gguf_bytes([ARCH], [tensor_info("t", (8,), offset=1 << 50)], b"\0" * 32),
        "truncated",
    ),
    "tensor too big for the file": (
        gguf_bytes([ARCH], [tensor_info("t", (1 << 20, 1 << 20))], b"\0" * 32),
        "truncated",
    ),
    "row not a multiple of the block": (
        gguf_bytes([ARCH], [tensor_info("t", (33, 1), ttype=2)], b"\0" * 64),
        "not a multiple of the Q4_0 block size",
    ),
}


@pytest.mark.parametrize(("content", "match"), HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_headers_raise_gguf_error(tmp_path: Path, content: bytes, match: str) -> None:
    path = write(tmp_path, content)

    with pytest.raises(GGUFError) as excinfo:
        read_gguf(path)
    assert str(excinfo.value).startswith(f"{path}: ")
    assert match in str(excinfo.value)


def test_random_corruption_never_raises_anything_else(models: dict[str, Path], tmp_path: Path) -> None:
    """Flip bytes in the header: the result is either read or refused with GGUFError."""
    original = models["gpt2"].read_bytes()
    header_end = read_gguf(models["gpt2"]).data_offset
    rng = random.Random(1234)
    path = tmp_path / "fuzz.gguf"
    refused = 0
    for _ in range(300):
        data = bytearray(original)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(4, header_end)] = rng.randrange(256)
        path.write_bytes(bytes(data))
        try:
            read_gguf(path)
        except GGUFError:
            refused += 1
    assert refused > 0


# --- quant names ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "quant"),
    [
        ("gpt2.Q4_K_M.gguf", "Q4_K_M"),
        ("gpt2.Q8_0.gguf", "Q8_0"),
        ("qwen2.5-0.5b-instruct-q4_k_m.gguf", "Q4_K_M"),
        # A bare "q4" names no llama.cpp quant (Microsoft's file is Q4_K_M inside): unknown.
        ("Phi-3-mini-4k-instruct-q4.gguf", None),
        ("Phi-3-mini-4k-instruct-fp16.gguf", "F16"),
        ("Llama-3.2-1B-Instruct-IQ4_XS.gguf", "IQ4_XS"),
        ("model-Q8_0-00001-of-00003.gguf", "Q8_0"),
        ("smollm2-135m-instruct-q8_0.gguf", "Q8_0"),
        ("model-f16.gguf", "F16"),
        ("x.BF16.gguf", "BF16"),
        ("tinyllama-1.1b-chat-v1.0.Q4_0.gguf", "Q4_0"),
        ("mistral-7b-instruct-v0.2.Q5_K_S.gguf", "Q5_K_S"),
        ("Meta-Llama-3-8B-Instruct.Q2_K.gguf", "Q2_K"),
        ("llama-2-7b.Q3_K_L.gguf", "Q3_K_L"),
        ("model.q6_k.gguf", "Q6_K"),
        ("Qwen2.5-7B-Instruct-IQ2_XXS.gguf", "IQ2_XXS"),
        ("Qwen3-8B-UD-Q4_K_XL.gguf", "Q4_K_XL"),
        ("models/gpt2.Q4_K_M.gguf", "Q4_K_M"),
        ("SmolLM2-135M-Instruct.gguf", None),
        ("Qwen2.5-0.5B-Instruct.gguf", None),
    ],
)
def test_quant_from_filename(name: str, quant: str | None) -> None:
    assert quant_from_filename(name) == quant


def test_quant_bits_order_and_coverage() -> None:
    order = ["IQ2_XXS", "Q2_K", "Q3_K_M", "IQ4_XS", "Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "F16", "F32"]
    assert [QUANT_BITS[q] for q in order] == sorted(QUANT_BITS[q] for q in order)
    assert set(FILE_TYPES.values()) <= set(QUANT_BITS)


def test_tables_match_the_gguf_package() -> None:
    """Our hardcoded tables against gguf/constants.py: fails when a new gguf adds types."""
    assert {t.value: (t.name, *gguf.GGML_QUANT_SIZES[t]) for t in gguf.GGMLQuantizationType} == TENSOR_TYPES
    ours = {k: v for k, v in FILE_TYPES.items() if k not in (4, 33, 34, 35)}  # removed upstream
    theirs = {
        t.value: t.name.removeprefix("MOSTLY_").removeprefix("ALL_")
        for t in gguf.LlamaFileType
        if t.name != "GUESSED"
    }
    assert ours == theirs
    assert {t.value: t.name for t in gguf.GGUFValueType} == {k: v[0] for k, v in VALUE_TYPES.items()}


def test_import_is_light() -> None:
    code = "import sys, chatcli.gguf_info; print(sorted({'numpy', 'gguf', 'llama_cpp'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# --- the generated models run in llama.cpp ----------------------------------------------


@pytest.mark.parametrize("model", ["gpt2", "llama", "llama-gqa"])
def test_generated_models_load_and_generate(models: dict[str, Path], model: str) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(models[model]), n_ctx=256, n_threads=2, verbose=False)
    try:
        tokens = llm.tokenize(b"hello world", add_bos=False)
        assert [llm.detokenize([t]) for t in tokens] == [b"hello", b" world"]

        generated = llm.generate(tokens, temp=0.0)
        first = [next(generated) for _ in range(3)]
        assert all(0 <= t < llm.n_vocab() for t in first)

        out = llm.create_completion("hello world", max_tokens=5, temperature=0.0)
        assert out["usage"]["completion_tokens"] >= 1
        again = llm.create_completion("hello world", max_tokens=5, temperature=0.0)
        assert again["choices"][0]["text"] == out["choices"][0]["text"]
        assert llm.n_ctx() == 256
    finally:
        llm.close()


def test_generated_llama_chats_with_its_chatml_template(models: dict[str, Path]) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(models["llama"]), n_ctx=256, n_threads=2, verbose=False)
    try:
        out = llm.create_chat_completion(
            messages=[{"role": "user", "content": "hello"}], max_tokens=4, temperature=0.0
        )
        choice = out["choices"][0]
        assert choice["message"]["role"] == "assistant"
        assert choice["finish_reason"] in ("stop", "length")
        # The template was rendered through ChatML: the prompt holds the control tokens.
        assert out["usage"]["prompt_tokens"] == len(
            llm.tokenize(
                b"<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n", add_bos=False, special=True
            )
        )
    finally:
        llm.close()
