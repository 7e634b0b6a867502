"""Headers that passed the checks are remembered per file, exactly, and forgotten when the file changes."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from chatcli import header_cache
from chatcli.engine import LlamaEngine
from chatcli.errors import GGUFError
from chatcli.gguf_info import read_gguf


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_gpt2", "smollm2"])
def test_a_remembered_header_reads_back_exactly(model: str, request: pytest.FixtureRequest) -> None:
    path: Path = request.getfixturevalue(model)
    info = read_gguf(path)
    assert header_cache.lookup(path) is None
    header_cache.remember(info)
    again = header_cache.lookup(path)
    assert again == info
    assert again is not None and again.array_spans == info.array_spans  # not part of ==, used by the checks


def test_a_changed_file_is_read_again(tiny_llama: Path, tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    shutil.copyfile(tiny_llama, path)
    header_cache.remember(read_gguf(path))
    assert header_cache.lookup(path) is not None
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert header_cache.lookup(path) is None


def test_a_damaged_entry_is_a_miss_and_is_removed(tiny_llama: Path) -> None:
    header_cache.remember(read_gguf(tiny_llama))
    [entry] = header_cache._folder().glob("*.json")
    entry.write_text(entry.read_text().replace('"tensors": [[', '"tensors": [["x", "not a shape"], ['))
    assert header_cache.lookup(tiny_llama) is None
    assert not entry.exists()


def test_loading_remembers_only_sound_files(tiny_llama: Path, tmp_path: Path) -> None:
    LlamaEngine(tiny_llama, n_ctx=64).close()
    assert header_cache.lookup(tiny_llama) == read_gguf(tiny_llama)
    LlamaEngine(tiny_llama, n_ctx=64).close()  # from the cache: same model, same context
    hostile = tmp_path / "hostile.gguf"
    data = bytearray(tiny_llama.read_bytes())
    key = b"llama.block_count"
    at = data.index(key) + len(key) + 4  # after the key and its value type: the u32 value
    data[at:at + 4] = (0).to_bytes(4, "little")
    hostile.write_bytes(bytes(data))
    with pytest.raises(GGUFError, match="block_count"):
        LlamaEngine(hostile, n_ctx=64)
    assert header_cache.lookup(hostile) is None
