"""Know before you download: `show` on a Hub repo reads only GGUF headers, `pull --quant auto` picks what fits.

The fake Hub serves "1 GB-class" models whose tensor data is a sparse hole (tests/ggufgen.make_big_llama): real
files, real HTTP Range requests through huggingface_hub's session, and the server's own byte counters.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import write_user_catalogue
from fakehub import FakeHub
from ggufgen import make_big_llama, make_llama

from chatcli.gguf_checks import estimate_load_bytes, find_problems
from chatcli.gguf_info import read_gguf

REPO = "someone/Big-0.7B-GGUF"
FIRST_READ = 32 << 10


@pytest.fixture(scope="module")
def big_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FakeHub, dict[str, list[Path]]]]:
    """One fake Hub for the module (hashing GBs of sparse zeros once): four quants, Q8_0 split in two parts."""
    folder = tmp_path_factory.mktemp("big")
    files = {
        quant: make_big_llama(folder / f"big-0.7b-{quant.lower()}.gguf", kind, parts=2 if quant == "Q8_0" else 1)
        for quant, kind in (("Q4_K_M", "Q4_K"), ("Q6_K", "Q6_K"), ("Q8_0", "Q8_0"), ("F16", "F16"))
    }
    with FakeHub() as hub:
        for paths in files.values():
            for path in paths:
                hub.add_file(REPO, path.name, path)
        hub.add_file(REPO, "README.md", b"# big\n", lfs=False)
        yield hub, files


@pytest.fixture
def hub(big_hub: tuple[FakeHub, dict[str, list[Path]]], monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    monkeypatch.setenv("HF_ENDPOINT", big_hub[0].url)
    big_hub[0].reset_stats()
    big_hub[0].reset_faults()
    return big_hub[0]


def test_big_files_are_real_and_sparse(big_hub: tuple[FakeHub, dict[str, list[Path]]]) -> None:
    f16 = big_hub[1]["F16"][0]
    assert f16.stat().st_size > 1_400_000_000 and f16.stat().st_blocks * 512 < 1_000_000
    assert read_gguf(f16).n_params == 722_044_928 and not find_problems(read_gguf(f16))


def test_show_repo_lists_every_quant_reading_only_headers(chatcli, hub: FakeHub, big_hub) -> None:
    files: dict[str, list[Path]] = big_hub[1]
    result = chatcli("show", REPO, "--json", env={"CHATCLI_MEMORY_LIMIT": "1.1GB"})
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    rows = {row["quant"]: row for row in report["quants"]}
    assert list(rows) == ["Q4_K_M", "Q6_K", "Q8_0", "F16"]  # smallest first
    assert report["memory_budget"] == 1_100_000_000 and "memory_limit" in report["memory_source"]
    for quant, paths in files.items():
        row = rows[quant]
        assert row["files"] == [p.name for p in paths]
        assert row["size"] == sum(p.stat().st_size for p in paths)
        assert (row["architecture"], row["parameters"], row["context_length"], row["chat_template"]) == (
            "llama", 722_044_928, 4096, True)  # the split Q8_0's count comes from both parts' headers
        weights = sum(estimate_load_bytes(read_gguf(p), 0)[0] for p in paths)
        kv = estimate_load_bytes(read_gguf(paths[0]), row["n_ctx"])[1]
        assert (row["weights"], row["kv_cache"], row["memory"]) == (weights, kv, weights + kv)
    assert [rows[q]["fit"] for q in rows] == ["fits", "fits", "tight", "too big"]
    # Only header-sized Range reads: one small request per file, nothing near the data.
    served = hub.served
    assert sorted(s.path for s in served) == sorted(p.name for ps in files.values() for p in ps)
    for record in served:
        header = read_gguf(next(p for ps in files.values() for p in ps if p.name == record.path)).data_offset
        assert record.range is not None and record.range.startswith("bytes=0-")
        assert record.nbytes <= max(FIRST_READ, 2 * header)
    assert hub.bytes_served() == report["header_bytes_read"] < 200_000
    total = sum(p.stat().st_size for ps in files.values() for p in ps)
    assert total > 3_000_000_000  # against 3 GB of files

    hub.reset_stats()  # a second look comes from the header cache: no file bytes at all
    again = chatcli("show", REPO, "--json", env={"CHATCLI_MEMORY_LIMIT": "1.1GB"})
    def strip(rows: list[dict]) -> list[dict]:
        return [{k: v for k, v in row.items() if k != "fetched"} for row in rows]

    assert again.returncode == 0 and strip(json.loads(again.stdout)["quants"]) == strip(report["quants"])
    assert json.loads(again.stdout)["header_bytes_read"] == 0
    assert hub.bytes_served() == 0 and hub.served == []


def test_show_table_and_alias_before_download(chatcli, hub: FakeHub, home: Path) -> None:
    write_user_catalogue(home, f'[models.big]\nrepo = "{REPO}"\nfiles = {{ Q4_K_M = "big-0.7b-q4_k_m.gguf" }}\n'
                               'default_quant = "Q4_K_M"\n')
    result = chatcli("show", "big", env={"CHATCLI_MEMORY_LIMIT": "1.1GB"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["QUANT", "SIZE", "ARCH", "PARAMS", "CONTEXT", "TEMPLATE", "MEMORY", "FIT"]
    assert len(lines) == 5 and "Q8_0 (2 parts)" in result.stdout
    assert lines[1].split()[0] == "Q4_K_M" and lines[1].endswith("fits") and lines[4].endswith("too big")
    assert "not downloaded" in result.stderr and "1.1 GB (the memory_limit setting" in result.stderr


def test_show_one_remote_file(chatcli, hub: FakeHub) -> None:
    result = chatcli("show", f"{REPO}/big-0.7b-f16.gguf", "--json")
    assert result.returncode == 0, result.stderr
    assert [row["quant"] for row in json.loads(result.stdout)["quants"]] == ["F16"]
    assert [s.path for s in hub.served] == ["big-0.7b-f16.gguf"]


@pytest.mark.parametrize("defect", ["block_count", "truncated"])
def test_hostile_remote_header_gets_the_local_one_line_refusal(chatcli, fake_hub: FakeHub, tmp_path: Path,
                                                               defect: str) -> None:
    if defect == "block_count":
        bad = make_llama(tmp_path / "bad-Q8_0.gguf", extra_kv={"llama.block_count": 0})
        expected = str(find_problems(read_gguf(bad))[0])
    else:
        good = make_llama(tmp_path / "good.gguf")
        bad = tmp_path / "bad-Q8_0.gguf"
        data = bytearray(good.read_bytes())
        data[16:24] = (1 << 40).to_bytes(8, "little")  # a key-value count far past the file
        bad.write_bytes(bytes(data))
        expected = "implausible key-value count"
    fake_hub.add_file("evil/model-GGUF", "bad-Q8_0.gguf", bad)
    result = chatcli("show", "evil/model-GGUF/bad-Q8_0.gguf")
    assert result.returncode == 1, result.stdout
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: evil/model-GGUF/bad-Q8_0.gguf: ") and expected in result.stderr
    assert fake_hub.bytes_served() <= FIRST_READ


# ---------------------------------------------------------------- pull --quant auto


@pytest.fixture
def tiny_repo(fake_hub: FakeHub, tmp_path: Path) -> dict[str, int]:
    """Three real, loadable models of growing size under quant names; returns each one's load memory."""
    needs = {}
    for quant, width in (("Q4_K_M", 64), ("Q8_0", 128), ("F16", 256)):
        path = make_llama(tmp_path / f"tiny-{quant}.gguf", n_embd=width, n_head=2, n_head_kv=2)
        fake_hub.add_file("someone/tiny-GGUF", path.name, path)
        info = read_gguf(path)
        weights, kv = estimate_load_bytes(info, info.context_length or 0)
        needs[quant] = weights + kv
    return needs


def test_pull_quant_auto_takes_the_largest_that_fits(chatcli, fake_hub: FakeHub, tiny_repo: dict[str, int]) -> None:
    limit = int(tiny_repo["Q8_0"] / 0.8) + 1000  # Q8_0 fits with room to spare; F16 does not
    assert tiny_repo["F16"] > limit
    result = chatcli("pull", "someone/tiny-GGUF", "--quant", "auto", env={"CHATCLI_MEMORY_LIMIT": str(limit)})
    assert result.returncode == 0, result.stderr
    assert "--quant auto: Q8_0 is the largest that fits" in result.stderr and "F16 would need" in result.stderr
    assert "pulled someone/tiny-GGUF/tiny-Q8_0.gguf" in result.stderr
    listed = json.loads(chatcli("list", "--json").stdout)
    assert [row["file"] for row in listed] == ["tiny-Q8_0.gguf"]


def test_pull_quant_setting_auto_and_nothing_fits(chatcli, fake_hub: FakeHub, tiny_repo: dict[str, int]) -> None:
    assert chatcli("config", "set", "pull_quant", "auto").returncode == 0
    small = chatcli("pull", "someone/tiny-GGUF", env={"CHATCLI_MEMORY_LIMIT": str(tiny_repo["Q4_K_M"] + 100)})
    assert small.returncode == 0, small.stderr
    assert "--quant auto: Q4_K_M is the largest that still fits" in small.stderr and "tight" in small.stderr
    none = chatcli("pull", "someone/tiny-GGUF", env={"CHATCLI_MEMORY_LIMIT": "1kB"})
    assert none.returncode == 1 and "no quant of someone/tiny-GGUF fits in" in none.stderr
    bad = chatcli("pull", "someone/tiny-GGUF", env={"CHATCLI_MEMORY_LIMIT": "lots"})
    assert bad.returncode == 2 and "memory_limit 'lots' is not a size" in bad.stderr


def test_show_of_a_model_not_downloaded_with_the_hub_unreachable_says_pull(chatcli) -> None:
    result = chatcli("show", "gpt2")
    assert result.returncode == 1
    assert result.stderr.strip() == "error: model gpt2:Q8_0 is not downloaded: run `chatcli pull gpt2`"


def test_show_of_a_downloaded_model_stays_local_and_light(chatcli, home: Path, tiny_llama: Path) -> None:
    """A model in the cache is described from its file: no Hub request, no huggingface_hub import."""
    import subprocess
    import sys

    from test_models import _put_in_cache

    _put_in_cache(home, "someone/llama-GGUF", "tiny-llama-F16.gguf", tiny_llama)
    code = ("import sys\nfrom chatcli.cli import main\ntry:\n    main(['show', 'someone/llama-GGUF', '--json'])\n"
            "except SystemExit:\n    pass\n"
            "print('HEAVY', [m for m in ('llama_cpp', 'huggingface_hub') if m in sys.modules], file=sys.stderr)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert json.loads(proc.stdout)["architecture"] == "llama" and "HEAVY []" in proc.stderr


def _huge_header(path: Path, n_strings: int = 3, length: int = 15 << 20) -> Path:
    """A well-formed GGUF whose header is ~45 MB of long string values (sparse zeros: valid UTF-8, no disk)."""
    import struct

    with path.open("wb") as f:
        f.write(b"GGUF" + struct.pack("<IQQ", 3, 0, n_strings + 1))
        arch = b"llama"
        f.write(struct.pack("<Q", 20) + b"general.architecture" + struct.pack("<IQ", 8, len(arch)) + arch)
        for i in range(n_strings):
            key = f"junk.{i}".encode()
            f.write(struct.pack("<Q", len(key)) + key + struct.pack("<IQ", 8, length))
            f.seek(length, 1)
        f.truncate()
    return path


def test_a_header_past_the_cap_is_not_read_further(chatcli, fake_hub: FakeHub, tmp_path: Path) -> None:
    huge = _huge_header(tmp_path / "huge-Q8_0.gguf")
    assert huge.stat().st_size > 45_000_000 and read_gguf(huge).metadata["general.architecture"] == "llama"
    fake_hub.add_file("evil/huge-GGUF", huge.name, huge)
    result = chatcli("show", "evil/huge-GGUF")
    assert result.returncode == 1
    assert result.stderr.strip() == ("error: evil/huge-GGUF/huge-Q8_0.gguf: its GGUF header does not end within "
                                     "32 MiB; not read further")
    assert fake_hub.bytes_served() <= 32 << 20


def test_a_server_that_ignores_range_is_cut_off(chatcli, hub: FakeHub, big_hub) -> None:
    """A 200 with the whole 1.4 GB body: the header is read from its start and the connection dropped."""
    hub.ignore_ranges()
    result = chatcli("show", f"{REPO}/big-0.7b-f16.gguf", "--json")
    assert result.returncode == 0, result.stderr
    row = json.loads(result.stdout)["quants"][0]
    assert row["parameters"] == 722_044_928 and row["fit"] != "unknown"
    assert [s.range for s in hub.served] == ["bytes=0-32767"]
    assert hub.bytes_served() < 16_000_000  # what socket buffers took before the client hung up, not 1.4 GB


def test_pull_quant_auto_on_an_alias_keeps_to_its_catalogue_files(chatcli, fake_hub: FakeHub, home: Path,
                                                                  tiny_repo: dict[str, int]) -> None:
    write_user_catalogue(home, '[models.tiny]\nrepo = "someone/tiny-GGUF"\n'
                               'files = { Q4_K_M = "tiny-Q4_K_M.gguf", Q8_0 = "tiny-Q8_0.gguf" }\n'
                               'default_quant = "Q4_K_M"\n')
    result = chatcli("pull", "tiny", "--quant", "auto", env={"CHATCLI_MEMORY_LIMIT": "64GB"})
    assert result.returncode == 0, result.stderr
    assert "--quant auto: Q8_0 is the largest that fits" in result.stderr and "pulled tiny:Q8_0" in result.stderr
    local = json.loads(chatcli("show", "tiny:Q8_0", "--json").stdout)
    assert local["file"] == "tiny-Q8_0.gguf" and local["path"]  # a downloaded model: described from its file
    remote = json.loads(chatcli("show", "tiny", "--quants", "--json").stdout)
    assert [row["quant"] for row in remote["quants"]] == ["Q4_K_M", "Q8_0", "F16"]  # --quants: the whole repo
