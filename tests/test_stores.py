"""Other tools' model stores (ollama, LM Studio, llama.cpp, GPT4All): listed, run in place, never removed.

Each store is laid out in a temporary folder exactly as the tool writes it (see the layouts in stores.py's
docstring, read from each tool's source), with a real tiny GGUF where the tool keeps its model file, and found
through the tool's own environment variable or through HOME.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from chatcli import stores
from chatcli.errors import UnknownModelError, UsageError
from chatcli.registry import load_catalogue, parse_ref


@pytest.fixture
def user_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh HOME, with no XDG or tool variables left to point elsewhere (conftest's `home` already made it)."""
    home = tmp_path / "user"
    home.mkdir(exist_ok=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("USERPROFILE", str(home))
    for name in ("XDG_CACHE_HOME", "XDG_DATA_HOME", "XDG_CONFIG_HOME", "OLLAMA_MODELS", "LLAMA_CACHE", "LOCALAPPDATA"):
        monkeypatch.delenv(name, raising=False)
    return home


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def add_ollama_model(root: Path, gguf: Path, name: str, tag: str = "latest", *, host: str = "registry.ollama.ai",
                     namespace: str = "library") -> Path:
    """What `ollama pull` leaves: blobs/sha256-HEX files and a manifest at manifests/HOST/NAMESPACE/MODEL/TAG."""
    blobs = root / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    layers = []
    for media_type, data in (
        ("application/vnd.ollama.image.model", gguf.read_bytes()),
        ("application/vnd.ollama.image.template", b"{{ .Prompt }}"),
        ("application/vnd.ollama.image.params", b'{"stop":["<|im_end|>"]}'),
    ):
        digest = _digest(data)
        (blobs / digest.replace(":", "-")).write_bytes(data)
        layers.append({"mediaType": media_type, "digest": digest, "size": len(data)})
    config = json.dumps({"model_format": "gguf", "model_family": "llama"}).encode()
    (blobs / _digest(config).replace(":", "-")).write_bytes(config)
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": _digest(config),
                   "size": len(config)},
        "layers": layers,
    }
    path = root / "manifests" / host / namespace / name / tag
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest))
    return blobs / layers[0]["digest"].replace(":", "-")


def add_file(folder: Path, name: str, gguf: Path) -> Path:
    target = folder / name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(gguf, target)
    return target


@pytest.fixture
def four_stores(user_home: Path, tmp_path: Path, tiny_llama: Path, tiny_gpt2: Path,
                monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """One model in each tool's store: ollama and llama.cpp through their variables, the others through HOME."""
    ollama_root = tmp_path / "ollama-models"
    monkeypatch.setenv("OLLAMA_MODELS", str(ollama_root))
    llama_cache = tmp_path / "llama-cache"
    monkeypatch.setenv("LLAMA_CACHE", str(llama_cache))
    flat = "bartowski_Tiny-GGUF_tiny-Q8_0.gguf"  # llama.cpp's OWNER_REPO_FILE naming
    add_file(llama_cache, flat, tiny_gpt2)
    (llama_cache / f"{flat}.etag").write_text('"abc"')
    (llama_cache / "manifest=bartowski=Tiny-GGUF=latest.json").write_text(
        json.dumps({"ggufFile": {"rfilename": "tiny-Q8_0.gguf"}}))
    gpt4all = user_home / ".local" / "share" / "nomic.ai" / "GPT4All"
    add_file(gpt4all, "incomplete-half.gguf", tiny_gpt2)  # a download in progress: not a model yet
    return {
        "ollama": add_ollama_model(ollama_root, tiny_llama, "tiny"),
        "lmstudio": add_file(user_home / ".lmstudio" / "models", "lmstudio-community/Tiny-GGUF/tiny-Q8_0.gguf",
                             tiny_llama),
        "llama.cpp": llama_cache / flat,
        "gpt4all": add_file(gpt4all, "tiny-gpt2.Q8_0.gguf", tiny_gpt2),
    }


# ---------------------------------------------------------------- list


def test_list_shows_the_models_of_all_four_stores_with_their_source(chatcli, four_stores: dict[str, Path]) -> None:
    result = chatcli("list", "--json")
    assert result.returncode == 0, result.stderr
    rows = {row["source"]: row for row in json.loads(result.stdout)}
    assert set(rows) == {"ollama", "lmstudio", "llama.cpp", "gpt4all"}
    assert rows["ollama"]["reference"] == "ollama:tiny:latest"
    assert rows["lmstudio"]["reference"] == "lmstudio:lmstudio-community/Tiny-GGUF/tiny-Q8_0.gguf"
    assert rows["llama.cpp"]["reference"] == "llamacpp:bartowski_Tiny-GGUF_tiny-Q8_0.gguf"
    assert rows["gpt4all"]["reference"] == "gpt4all:tiny-gpt2.Q8_0.gguf"
    for source, path in four_stores.items():
        assert Path(rows[source]["path"]) == path  # the file itself, in place
        assert rows[source]["size"] == path.stat().st_size
    assert rows["ollama"]["architecture"] == "llama" and rows["gpt4all"]["architecture"] == "gpt2"  # from the header

    table = chatcli("list")
    assert table.returncode == 0, table.stderr
    assert "SOURCE" in table.stdout
    for reference in ("ollama:tiny:latest", "lmstudio:lmstudio-community/Tiny-GGUF/tiny-Q8_0.gguf"):
        assert reference in table.stdout


def test_hf_cache_models_are_listed_with_source_hf(chatcli, four_stores: dict[str, Path], home: Path,
                                                   tiny_gpt2: Path) -> None:
    snapshot = home / "hf" / "hub" / "models--acme--tiny-GGUF" / "snapshots" / ("a" * 40)
    add_file(snapshot, "tiny.Q8_0.gguf", tiny_gpt2)
    rows = json.loads(chatcli("list", "--json").stdout)
    assert [r["source"] for r in rows if r["reference"] == "acme/tiny-GGUF:Q8_0"] == ["hf"]
    assert len(rows) == 5


def test_the_default_locations_under_home(user_home: Path, tiny_llama: Path) -> None:
    """No variables set: each tool's default folder (Linux) under HOME."""
    add_ollama_model(user_home / ".ollama" / "models", tiny_llama, "tiny", "1b")
    add_file(user_home / ".cache" / "llama.cpp", "o_r_tiny.gguf", tiny_llama)
    add_file(user_home / ".lmstudio" / "models", "pub/repo/tiny.gguf", tiny_llama)
    add_file(user_home / ".cache" / "gpt4all", "tiny.gguf", tiny_llama)  # the gpt4all Python package's folder
    found = {m.reference for m in stores.scan() if user_home in m.path.parents}
    assert found == {"ollama:tiny:1b", "llamacpp:o_r_tiny.gguf", "lmstudio:pub/repo/tiny.gguf", "gpt4all:tiny.gguf"}


def test_xdg_variables_move_the_linux_defaults(user_home: Path, tmp_path: Path, tiny_llama: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg-data"))
    add_file(tmp_path / "xdg-cache" / "llama.cpp", "a_b_tiny.gguf", tiny_llama)
    add_file(tmp_path / "xdg-data" / "nomic.ai" / "GPT4All", "tiny.gguf", tiny_llama)
    assert {m.reference for m in stores.scan()} >= {"llamacpp:a_b_tiny.gguf", "gpt4all:tiny.gguf"}


def test_lmstudio_home_pointer_and_gpt4all_model_path_setting(user_home: Path, tmp_path: Path,
                                                              tiny_llama: Path) -> None:
    """LM Studio moved by its ~/.lmstudio-home-pointer; GPT4All's folder changed in its settings (GPT4All.ini)."""
    lm_home = tmp_path / "elsewhere" / "lmstudio"
    (user_home / ".lmstudio-home-pointer").write_text(f"{lm_home}\n")
    add_file(lm_home / "models", "pub/repo/moved.gguf", tiny_llama)
    add_file(user_home / ".lmstudio" / "models", "pub/repo/stale.gguf", tiny_llama)  # not LM Studio's home now
    ini = user_home / ".config" / "nomic.ai" / "GPT4All.ini"
    ini.parent.mkdir(parents=True)
    ini.write_text(f"[General]\nmodelPath={tmp_path / 'my-models'}/\nthreadCount=4\n")
    add_file(tmp_path / "my-models", "chosen.gguf", tiny_llama)
    found = {m.reference for m in stores.scan()}
    assert {"lmstudio:pub/repo/moved.gguf", "gpt4all:chosen.gguf"} <= found
    assert "lmstudio:pub/repo/stale.gguf" not in found


def test_split_models_projectors_and_non_gguf_files(user_home: Path, tmp_path: Path, tiny_llama: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    models = user_home / ".lmstudio" / "models" / "pub" / "big-GGUF"
    for i in (1, 2):
        add_file(models, f"big-Q4_K_M-0000{i}-of-00002.gguf", tiny_llama)
    add_file(models, "half-00001-of-00002.gguf", tiny_llama)  # its second part is missing
    add_file(models, "mmproj-big-f16.gguf", tiny_llama)  # a vision projector, not a model
    (models / "notes.gguf").write_text("not a GGUF at all")
    [model] = stores.scan("lmstudio")
    assert model.name == "pub/big-GGUF/big-Q4_K_M-00001-of-00002.gguf"
    assert len(model.parts) == 2 and model.size == 2 * tiny_llama.stat().st_size


def test_ollama_manifests_without_a_gguf_model_layer_are_skipped(user_home: Path, tmp_path: Path, tiny_llama: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "ollama"
    monkeypatch.setenv("OLLAMA_MODELS", str(root))
    add_ollama_model(root, tiny_llama, "good")
    not_gguf = tmp_path / "weights.safetensors"
    not_gguf.write_bytes(b"safetensors, say")
    add_ollama_model(root, not_gguf, "notgguf")  # a model layer llama.cpp cannot open
    no_model = root / "manifests" / "registry.ollama.ai" / "library" / "embeddings-only" / "latest"
    no_model.parent.mkdir(parents=True)
    no_model.write_text(json.dumps({"schemaVersion": 2, "layers": [
        {"mediaType": "application/vnd.ollama.image.tensor", "digest": "sha256:" + "0" * 64, "size": 1}]}))
    broken = root / "manifests" / "registry.ollama.ai" / "library" / "broken" / "latest"
    broken.parent.mkdir(parents=True)
    broken.write_text("{not json")
    assert [m.name for m in stores.scan("ollama")] == ["good:latest"]


# ---------------------------------------------------------------- references


def test_ollama_references_follow_ollamas_naming(user_home: Path, tmp_path: Path, tiny_llama: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "ollama"
    monkeypatch.setenv("OLLAMA_MODELS", str(root))
    blob = add_ollama_model(root, tiny_llama, "llama3.2", "1b")
    hf_blob = add_ollama_model(root, tiny_llama, "Tiny-GGUF", "Q8_0", host="hf.co", namespace="bartowski")
    add_ollama_model(root, tiny_llama, "tiny", namespace="someone")
    catalogue = load_catalogue()
    ref = parse_ref("ollama:llama3.2:1b", catalogue)
    assert (ref.kind, ref.store, ref.display) == ("store", "ollama", "ollama:llama3.2:1b")
    assert stores.find("ollama", "LLAMA3.2:1B").path == blob  # ollama's names are case-insensitive
    assert parse_ref("ollama:tiny", catalogue).display == "ollama:tiny:latest"  # the tag defaults to latest
    hf_ref = parse_ref("ollama:hf.co/bartowski/Tiny-GGUF:Q8_0", catalogue)
    assert stores.find("ollama", str(hf_ref.store_name)).path == hf_blob
    assert {m.name for m in stores.scan("ollama")} == {
        "llama3.2:1b", "hf.co/bartowski/Tiny-GGUF:Q8_0", "someone/tiny:latest"}
    with pytest.raises(UnknownModelError, match=r"ollama has no model 'llama3.2:3b' in .*ollama \(it has: "):
        stores.find("ollama", "llama3.2:3b")
    for bad in ("ollama:", "ollama:a/b/c/d", "ollama:x@sha256:abc"):
        with pytest.raises(UsageError):
            parse_ref(bad, catalogue)
    with pytest.raises(UsageError, match="--quant does not apply"):
        parse_ref("ollama:tiny", catalogue, quant="Q4_K_M")


def test_complete_runs_the_ollama_blob_in_place(chatcli, four_stores: dict[str, Path], home: Path,
                                                tiny_llama: Path) -> None:
    args = ("complete", "Once upon a time", "-n", "8", "--temperature", "0", "--json")
    result = chatcli(*args, "-m", "ollama:tiny")
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    assert reply["model"] == "ollama:tiny:latest" and reply["completion_tokens"] > 0
    direct = json.loads(chatcli(*args, "-m", str(tiny_llama)).stdout)
    assert reply["text"] == direct["text"]  # the same weights, read from ollama's blob
    assert not list((home / "hf").rglob("*.gguf"))  # nothing was copied into the Hugging Face cache
    for source, reference in (("lmstudio", "lmstudio:lmstudio-community/Tiny-GGUF/tiny-Q8_0.gguf"),
                              ("gpt4all", "gpt4all:tiny-gpt2.Q8_0.gguf"),
                              ("llama.cpp", "llamacpp:bartowski_Tiny-GGUF_tiny-Q8_0.gguf")):
        other = chatcli("complete", "hi", "-n", "2", "-m", reference)
        assert other.returncode == 0, (source, other.stderr)


def test_a_missing_store_model_is_one_line_naming_the_tool(chatcli, four_stores: dict[str, Path]) -> None:
    result = chatcli("complete", "hi", "-m", "ollama:llama3.2:1b")
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert "ollama has no model 'llama3.2:1b'" in line and "tiny:latest" in line


def test_rm_never_deletes_another_tools_files(chatcli, four_stores: dict[str, Path]) -> None:
    for reference in ("ollama:tiny", "lmstudio:lmstudio-community/Tiny-GGUF/tiny-Q8_0.gguf",
                      "llamacpp:bartowski_Tiny-GGUF_tiny-Q8_0.gguf", "gpt4all:tiny-gpt2.Q8_0.gguf",
                      str(four_stores["lmstudio"])):  # also when named by its path
        result = chatcli("rm", reference, "-y")
        assert result.returncode == 1, reference
        [line] = result.stderr.strip().splitlines()
        assert "not removing" in line and "never deletes another tool's files" in line
    assert "belongs to ollama" in chatcli("rm", "ollama:tiny", "-y").stderr
    assert "`ollama rm tiny:latest`" in chatcli("rm", "ollama:tiny", "-y").stderr
    assert "belongs to LM Studio" in chatcli("rm", str(four_stores["lmstudio"]), "-y").stderr
    for path in four_stores.values():
        assert path.is_file()


def test_pull_of_another_tools_model_is_a_usage_error(chatcli, four_stores: dict[str, Path]) -> None:
    result = chatcli("pull", "ollama:tiny")
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: ollama:tiny:latest belongs to ollama: chatcli uses it in place, nothing to pull")


def test_show_reads_a_store_models_header(chatcli, four_stores: dict[str, Path]) -> None:
    result = chatcli("show", "ollama:tiny", "--json")
    assert result.returncode == 0, result.stderr
    details = json.loads(result.stdout)
    assert details["architecture"] == "llama" and details["path"] == str(four_stores["ollama"])


def test_llama_cpp_hf_layout_under_llama_cache(user_home: Path, tmp_path: Path, tiny_llama: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Newer llama.cpp builds with LLAMA_CACHE set download there in the Hugging Face layout."""
    cache = tmp_path / "llama-cache"
    monkeypatch.setenv("LLAMA_CACHE", str(cache))
    folder = cache / "models--ggml-org--tiny-GGUF"
    data = tiny_llama.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    (folder / "blobs").mkdir(parents=True)
    (folder / "blobs" / sha).write_bytes(data)
    snapshot = folder / "snapshots" / ("b" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "tiny-Q8_0.gguf").symlink_to(Path("../../blobs") / sha)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("b" * 40)
    [model] = stores.scan("llama.cpp")
    assert model.reference == "llamacpp:ggml-org/tiny-GGUF/tiny-Q8_0.gguf"
    assert model.path.resolve() == (folder / "blobs" / sha)
