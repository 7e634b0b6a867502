"""Catalogue, model references, and the local store commands: list, show, rm."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_user_catalogue
from ggufgen import make_garbage, truncate_copy

from chatcli.errors import CatalogueError, UnknownModelError, UsageError
from chatcli.registry import load_catalogue, parse_ref

# ---------------------------------------------------------------- catalogue


def test_shipped_catalogue_has_the_promised_aliases() -> None:
    catalogue = load_catalogue()
    for alias in ("gpt2", "smollm2", "smollm2-360m", "smollm2-1.7b", "qwen2.5", "qwen2.5-1.5b", "llama3.2",
                  "llama3.2-3b", "tinyllama", "phi3", "gemma3"):
        spec = catalogue.get(alias)
        assert spec is not None, alias
        assert spec.repo and spec.description and spec.license and spec.default_quant in spec.files
    assert catalogue.default_model == "smollm2"


def test_user_catalogue_adds_and_overrides(home: Path) -> None:
    write_user_catalogue(home, """
[models.mine]
repo = "me/mine-GGUF"
files = { Q4_K_M = "mine-q4.gguf" }

[models.gpt2]
repo = "someone/gpt2-better-GGUF"
files = { Q8_0 = "gpt2.gguf" }
""")
    catalogue = load_catalogue()
    assert catalogue.get("mine").file_for("q4_k_m") == "mine-q4.gguf"
    assert catalogue.get("gpt2").repo == "someone/gpt2-better-GGUF"
    assert catalogue.get("smollm2") is not None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[models.x\nrepo = 1", "invalid TOML: Expected ']' at the end of a table declaration (at line 1, column 10)"),
        ('[models.x]\nrepo = "a/b"\nfiles = { Q4_0 = "x.gguf" }\ncolour = "red"', "[models.x]: unknown key 'colour'"),
        ('[models.x]\nfiles = { Q4_0 = "x.gguf" }', "[models.x]: missing 'repo'"),
        ('[models.x]\nrepo = "not a repo"\nfiles = { Q4_0 = "x.gguf" }', "'repo' must look like 'owner/name'"),
        ('[models.x]\nrepo = "a/b"', "needs 'files' or 'file_pattern' + 'quants'"),
        ('[models.x]\nrepo = "a/b"\nfiles = { Q4_0 = "x.gguf" }\ndefault_quant = "Q8_0"', "default_quant 'Q8_0'"),
        ('[models.x]\nrepo = "a/b"\nfiles = { Q4_0 = "../x.gguf" }', "must be a path inside the repo"),
        ('[models.x]\nrepo = "a/b"\nfiles = { Q4_0 = "x.gguf" }\ncontext = "big"', "'context' must be"),
        ('[models.x]\nrepo = "a/b"\nfiles = { Q4_0 = "x.gguf" }\n[[models.x.mirrors]]\ntype = "ftp"', "'type'"),
        ('[models.x]\nrepo = "a/b"\nfiles = { Q4_0 = "x.gguf" }\n[[models.x.mirrors]]\ntype = "pypi"\n'
         'quant = "Q4_0"\npackage = "p"\nversion = "1"\npath = "p/x.gguf"\nsha256 = "abc"', "'sha256' must be 64"),
        ("colour = 1", "unknown top-level key 'colour'"),
    ],
)
def test_malformed_user_catalogue_is_rejected_with_file_and_entry(home: Path, text: str, message: str) -> None:
    path = write_user_catalogue(home, text)
    with pytest.raises(CatalogueError) as info:
        load_catalogue()
    assert str(info.value).startswith(f"{path}: ")
    assert message in str(info.value)


def test_malformed_catalogue_through_the_cli_is_one_line(chatcli, home: Path) -> None:
    write_user_catalogue(home, '[models.x]\nrepo = "a/b"\nfiles = { Q4_0 = "x.gguf" }\noops = 1\n')
    result = chatcli("list", "--available")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "unknown key 'oops'" in result.stderr


# ---------------------------------------------------------------- references


@pytest.mark.parametrize(
    ("ref", "kind", "repo", "quant", "filename"),
    [
        ("gpt2", "alias", "QuantFactory/gpt2-GGUF", "Q8_0", "gpt2.Q8_0.gguf"),
        ("GPT2:q4_k_m", "alias", "QuantFactory/gpt2-GGUF", "Q4_K_M", "gpt2.Q4_K_M.gguf"),
        ("owner/repo", "repo", "owner/repo", None, None),
        ("owner/repo:Q5_K_M", "repo", "owner/repo", "Q5_K_M", None),
        ("hf.co/owner/repo:q8_0", "repo", "owner/repo", "Q8_0", None),
        ("https://huggingface.co/owner/repo", "repo", "owner/repo", None, None),
        ("owner/repo/sub/file.gguf", "file", "owner/repo", None, "sub/file.gguf"),
    ],
)
def test_references(ref: str, kind: str, repo: str, quant: str | None, filename: str | None) -> None:
    parsed = parse_ref(ref, load_catalogue())
    assert (parsed.kind, parsed.repo, parsed.quant, parsed.filename) == (kind, repo, quant, filename)


def test_local_path_reference(tmp_path: Path, tiny_gpt2: Path) -> None:
    parsed = parse_ref(str(tiny_gpt2), load_catalogue())
    assert parsed.kind == "local" and parsed.local_path == tiny_gpt2.resolve()
    with pytest.raises(UnknownModelError, match="no such model file"):
        parse_ref(str(tmp_path / "missing.gguf"), load_catalogue())


@pytest.mark.parametrize("ref", ["owner/repo/notes.txt", "a/b/../c.gguf", "owner/repo/file.gguf:Q4_0", "bad repo/x",
                                 "gpt2:"])
def test_bad_references_are_usage_errors(ref: str) -> None:
    with pytest.raises(UsageError):
        parse_ref(ref, load_catalogue())


def test_did_you_mean() -> None:
    with pytest.raises(UnknownModelError, match="did you mean 'qwen2.5'"):
        parse_ref("qwen", load_catalogue())


# ---------------------------------------------------------------- list / show / rm on a populated cache


def _put_in_cache(home: Path, repo: str, filename: str, source: Path, commit: str = "a" * 40) -> Path:
    """Lay a file out as huggingface_hub does (blobs/<sha256>, snapshots/<commit>/<file>, refs/main)."""
    import hashlib

    folder = home / "hf" / "hub" / ("models--" + repo.replace("/", "--"))
    data = source.read_bytes()
    blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    link = folder / "snapshots" / commit / filename
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(blob, link.parent))
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(commit)
    return link


def test_list_finds_models_other_tools_downloaded(chatcli, home: Path, tiny_gpt2: Path, tiny_llama: Path) -> None:
    _put_in_cache(home, "QuantFactory/gpt2-GGUF", "gpt2.Q8_0.gguf", tiny_gpt2)
    _put_in_cache(home, "someone/llama-GGUF", "tiny-llama-F16.gguf", tiny_llama)
    _put_in_cache(home, "someone/not-a-model", "config.json", tiny_gpt2)  # not a GGUF: not listed
    result = chatcli("list", "--json")
    assert result.returncode == 0, result.stderr
    rows = {r["reference"]: r for r in json.loads(result.stdout)}
    assert set(rows) == {"gpt2:Q8_0", "someone/llama-GGUF:F16"}
    assert rows["gpt2:Q8_0"]["architecture"] == "gpt2"
    assert rows["gpt2:Q8_0"]["size"] == tiny_gpt2.stat().st_size
    assert rows["someone/llama-GGUF:F16"]["context"] == 256
    assert rows["gpt2:Q8_0"]["parameters"] > 0 and rows["gpt2:Q8_0"]["last_used"] is None
    table = chatcli("ls")
    assert table.returncode == 0 and "gpt2:Q8_0" in table.stdout and "someone/llama-GGUF:F16" in table.stdout


def test_list_empty_says_what_to_do(chatcli) -> None:
    result = chatcli("list")
    assert result.returncode == 0 and result.stdout == ""
    assert "chatcli pull" in result.stderr


def test_show_reads_the_header(chatcli, home: Path, tiny_llama: Path) -> None:
    _put_in_cache(home, "someone/llama-GGUF", "tiny-llama-F16.gguf", tiny_llama)
    result = chatcli("show", "someone/llama-GGUF", "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["architecture"] == "llama" and info["context_length"] == 256 and info["quant"] == "F16"
    assert info["repo"] == "someone/llama-GGUF" and info["revision"] == "a" * 40
    assert len(info["sha256"]) == 64 and info["license"] == "apache-2.0"
    template = chatcli("show", "someone/llama-GGUF", "--template")
    assert template.returncode == 0 and "<|im_start|>" in template.stdout
    human = chatcli("show", str(tiny_llama))
    assert human.returncode == 0 and "llama" in human.stdout and "chat template" in human.stdout


def test_show_template_when_there_is_none(chatcli, tiny_gpt2: Path) -> None:
    result = chatcli("show", str(tiny_gpt2), "--template")
    assert result.returncode == 1 and "no embedded chat template" in result.stderr


@pytest.mark.parametrize("cut", [3, 20, 100, 5000])
def test_show_truncated_file_is_a_clear_error(chatcli, tmp_path: Path, tiny_llama: Path, cut: int) -> None:
    bad = truncate_copy(tiny_llama, tmp_path / "cut.gguf", cut)
    result = chatcli("show", str(bad))
    assert result.returncode == 1
    assert result.stderr.startswith(f"error: {bad}") and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_show_garbage_file_is_a_clear_error(chatcli, tmp_path: Path) -> None:
    bad = make_garbage(tmp_path / "garbage.gguf", 4096)
    result = chatcli("show", str(bad))
    assert result.returncode == 1 and "not a GGUF file" in result.stderr


def test_show_missing_model_names_the_pull_command(chatcli) -> None:
    result = chatcli("show", "gpt2")
    assert result.returncode == 1
    assert result.stderr.strip() == "error: model gpt2:Q8_0 is not downloaded: run `chatcli pull gpt2`"


def test_rm_removes_only_that_model(chatcli, home: Path, tiny_gpt2: Path, tiny_llama: Path) -> None:
    keep = _put_in_cache(home, "someone/llama-GGUF", "tiny-llama-F16.gguf", tiny_llama)
    _put_in_cache(home, "QuantFactory/gpt2-GGUF", "gpt2.Q8_0.gguf", tiny_gpt2)
    refused = chatcli("rm", "gpt2")
    assert refused.returncode == 1 and "pass -y" in refused.stderr
    result = chatcli("rm", "gpt2", "-y")
    assert result.returncode == 0, result.stderr
    assert f"freed {tiny_gpt2.stat().st_size / 1e3:.1f} kB" in result.stderr
    assert not (home / "hf/hub/models--QuantFactory--gpt2-GGUF").exists()
    assert keep.resolve().read_bytes() == tiny_llama.read_bytes()
    assert [r["reference"] for r in json.loads(chatcli("list", "--json").stdout)] == ["someone/llama-GGUF:F16"]
    again = chatcli("rm", "gpt2", "-y")
    assert again.returncode == 1 and "not downloaded" in again.stderr


def test_rm_keeps_a_blob_another_snapshot_still_uses(home: Path, tiny_gpt2: Path) -> None:
    from chatcli import store

    _put_in_cache(home, "o/r-GGUF", "m-Q8_0.gguf", tiny_gpt2, commit="a" * 40)
    _put_in_cache(home, "o/r-GGUF", "m-Q8_0.gguf", tiny_gpt2, commit="b" * 40)
    models = store.models_in_repo("o/r-GGUF")
    assert len(models) == 1  # the same blob in two snapshots is one model
    victim = store.LocalModel(repo="o/r-GGUF", filename="m-Q8_0.gguf",
                              path=home / "hf/hub/models--o--r-GGUF/snapshots" / ("b" * 40) / "m-Q8_0.gguf",
                              commit="b" * 40)
    victim.parts.append(victim.path)
    assert store.remove(victim) == 0
    assert store.models_in_repo("o/r-GGUF")[0].path.resolve().is_file()


# ---------------------------------------------------------------- start-up


def test_help_lists_the_commands_and_imports_nothing_heavy() -> None:
    code = (
        "import sys\n"
        "from chatcli.cli import main\n"
        "try:\n    main(['--help'])\n"
        "except SystemExit:\n    pass\n"
        "heavy = [m for m in ('llama_cpp', 'huggingface_hub', 'rich', 'numpy', 'jinja2') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out
    for command in ("pull", "list", "show", "rm", "complete"):
        assert f"  {command} " in out


# `show gpt2` of a model not downloaded asks the Hub (tests/test_show_remote.py): --template stays local.
@pytest.mark.parametrize("command", [["list"], ["list", "--available"], ["show", "gpt2", "--template"]])
def test_list_and_show_import_neither_llama_cpp_nor_huggingface_hub(command: list[str]) -> None:
    code = (
        "import sys\n"
        "from chatcli.cli import main\n"
        f"try:\n    main({command!r})\n"
        "except SystemExit:\n    pass\n"
        "print('HEAVY', [m for m in ('llama_cpp', 'huggingface_hub') if m in sys.modules], file=sys.stderr)\n"
    )
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stderr
    assert "HEAVY []" in err
