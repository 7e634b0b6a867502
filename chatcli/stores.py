"""Models other tools already downloaded: ollama, LM Studio, llama.cpp's `-hf` cache, GPT4All.

People who try chatcli often have gigabytes of GGUF files from those tools already. chatcli lists them (`list`,
SOURCE column) and runs them in place (`-m ollama:NAME[:TAG]`, `lmstudio:PUBLISHER/REPO/FILE.gguf`,
`llamacpp:NAME`, `gpt4all:FILE.gguf`): nothing is copied, and nothing there is ever deleted, because the files
belong to the tool that put them there. Only folder listings, ollama's manifest JSON and the first four bytes of
each file (the GGUF magic) are read here; `list` reads GGUF headers, never weights.

Where each tool keeps its models, as its own source resolves it (read 2026-12):
- ollama (envconfig.Models, manifest/paths.go, types/model/name.go): `OLLAMA_MODELS`, else `~/.ollama/models`
  (`%USERPROFILE%\\.ollama\\models` on Windows), and on Linux also the service's `/usr/share/ollama/.ollama/models`.
  `manifests/HOST/NAMESPACE/MODEL/TAG` is a JSON manifest; its layer of mediaType
  `application/vnd.ollama.image.model` has a digest `sha256:HEX`, stored as the GGUF file `blobs/sha256-HEX`.
  A name is `[HOST/][NAMESPACE/]MODEL[:TAG]`, defaults `registry.ollama.ai`, `library`, `latest`
  (so `hf.co/owner/repo:Q4_K_M` is host hf.co, namespace owner).
- LM Studio (lms-common-server `findLMStudioHome`, lmstudio.ai/docs "import models"): its home is the folder named
  in `~/.lmstudio-home-pointer`, else `~/.cache/lm-studio` when that exists, else `~/.lmstudio`; models are
  `models/PUBLISHER/REPO/FILE.gguf` in it (or in settings.json's `downloadsFolder`, when the user moved them).
- llama.cpp (common.cpp `fs_get_cache_directory`, hf-cache.cpp): `LLAMA_CACHE`, else `~/.cache/llama.cpp`
  (`XDG_CACHE_HOME`), `~/Library/Caches/llama.cpp`, `%LOCALAPPDATA%\\llama.cpp`. Older builds keep flat
  `OWNER_REPO_FILE.gguf` files there (`/` in FILE becomes `_`); newer ones download into the Hugging Face cache
  (listed as hf already), or, with `LLAMA_CACHE` set, into that folder in the same `models--OWNER--REPO` layout.
- GPT4All (gpt4all-chat mysettings.cpp): the `modelPath` setting (`~/.config/nomic.ai/GPT4All.ini` on Linux), else
  `~/.local/share/nomic.ai/GPT4All` (`XDG_DATA_HOME`), `~/Library/Application Support/nomic.ai/GPT4All`,
  `%LOCALAPPDATA%\\nomic.ai\\GPT4All`; its Python bindings use `~/.cache/gpt4all`. Flat `FILE.gguf` files
  (`incomplete-FILE` while downloading).
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from chatcli.errors import UnknownModelError, UsageError

# reference prefix -> source (the SOURCE column of `list`)
PREFIXES = {"ollama": "ollama", "lmstudio": "lmstudio", "llamacpp": "llama.cpp", "gpt4all": "gpt4all"}
PREFIX = {source: prefix for prefix, source in PREFIXES.items()}
TOOLS = {"ollama": "ollama", "lmstudio": "LM Studio", "llama.cpp": "llama.cpp", "gpt4all": "GPT4All"}

OLLAMA_MODEL_LAYER = "application/vnd.ollama.image.model"
_OLLAMA_HOST, _OLLAMA_NAMESPACE, _OLLAMA_TAG = "registry.ollama.ai", "library", "latest"
_DIGEST_RE = re.compile(r"^sha256[:-][0-9a-fA-F]{64}$")
_SPLIT_RE = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)
_MANIFEST_LIMIT = 1 << 20  # an ollama manifest is a few hundred bytes: anything larger is not one


@dataclass(frozen=True)
class StoreModel:
    """A GGUF model in another tool's store (all parts of a split model count as one)."""

    source: str  # ollama | lmstudio | llama.cpp | gpt4all
    name: str  # what follows PREFIX: in a reference
    path: Path  # the file llama.cpp opens (the first part of a split model)
    size: int
    parts: tuple[Path, ...] = ()

    @property
    def reference(self) -> str:
        return f"{PREFIX[self.source]}:{self.name}"

    @property
    def tool(self) -> str:
        return TOOLS[self.source]


# ---------------------------------------------------------------- where each tool keeps its models


def _system() -> str:
    return "windows" if sys.platform == "win32" else "macos" if sys.platform == "darwin" else "linux"


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name, "").strip()
    return Path(value).expanduser() if value else None


def _local_app_data() -> Path:
    return _env_path("LOCALAPPDATA") or Path.home() / "AppData" / "Local"


def ollama_roots() -> list[Path]:
    explicit = _env_path("OLLAMA_MODELS")
    if explicit is not None:
        return [explicit]
    roots = [Path.home() / ".ollama" / "models"]
    if _system() == "linux":  # the official installer's service runs as the `ollama` user, with this home
        roots.append(Path("/usr/share/ollama/.ollama/models"))
    return roots


def lmstudio_home() -> Path:
    home = Path.home()
    try:
        pointer = (home / ".lmstudio-home-pointer").read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        pointer = ""
    if pointer:
        return Path(pointer.splitlines()[0].strip()).expanduser()
    legacy = home / ".cache" / "lm-studio"
    return legacy if legacy.is_dir() else home / ".lmstudio"


def lmstudio_roots() -> list[Path]:
    home = lmstudio_home()
    roots = []
    moved = _read_json(home / "settings.json").get("downloadsFolder")
    if isinstance(moved, str) and moved.strip():
        roots.append(Path(moved.strip()).expanduser())
    roots.append(home / "models")
    return _unique(roots)


def llamacpp_roots() -> list[Path]:
    explicit = _env_path("LLAMA_CACHE")
    if explicit is not None:
        return [explicit]
    system = _system()
    if system == "windows":
        base = _local_app_data()
    elif system == "macos":
        base = Path.home() / "Library" / "Caches"
    else:
        base = _env_path("XDG_CACHE_HOME") or Path.home() / ".cache"
    return [base / "llama.cpp"]


def gpt4all_roots() -> list[Path]:
    system = _system()
    roots = []
    configured = _gpt4all_setting() if system == "linux" else None  # macOS keeps it in a plist, Windows in the registry
    if configured is not None:
        roots.append(configured)
    if system == "windows":
        roots.append(_local_app_data() / "nomic.ai" / "GPT4All")
    elif system == "macos":
        roots.append(Path.home() / "Library" / "Application Support" / "nomic.ai" / "GPT4All")
    else:
        roots.append((_env_path("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "nomic.ai" / "GPT4All")
    roots.append(Path.home() / ".cache" / "gpt4all")  # the gpt4all Python package's default
    return _unique(roots)


def _gpt4all_setting() -> Path | None:
    """The desktop app's `modelPath` (Qt writes the ini as [General] modelPath=...)."""
    ini = (_env_path("XDG_CONFIG_HOME") or Path.home() / ".config") / "nomic.ai" / "GPT4All.ini"
    import configparser  # only when GPT4All's settings file is read

    parser = configparser.ConfigParser(interpolation=None, strict=False)
    try:
        parser.read_string(ini.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, configparser.Error):
        return None
    value = parser.get("General", "modelpath", fallback="").strip().strip('"')
    return Path(value).expanduser() if value else None


def roots(source: str) -> list[Path]:
    """Where `source` keeps its models on this machine (the folders need not exist)."""
    return {"ollama": ollama_roots, "lmstudio": lmstudio_roots, "llama.cpp": llamacpp_roots,
            "gpt4all": gpt4all_roots}[source]()


def _unique(paths: Iterable[Path]) -> list[Path]:
    seen: set[str] = set()
    out = []
    for path in paths:
        key = os.path.normcase(os.path.abspath(path))
        if key not in seen:
            seen.add(key)
            out.append(path)
    return out


def _read_json(path: Path, limit: int = _MANIFEST_LIMIT) -> dict:
    try:
        with path.open("rb") as f:
            data = f.read(limit + 1)
        value = json.loads(data) if len(data) <= limit else None
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _is_gguf(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _is_projector(name: str) -> bool:
    """A vision model's image projector (mmproj-*.gguf) sits next to the model, but is not one to chat with."""
    return "mmproj" in name.lower()


# ---------------------------------------------------------------- scanning


def scan(source: str | None = None) -> list[StoreModel]:
    """Every GGUF model in the other tools' stores (or in one tool's)."""
    scanners = {"ollama": _scan_ollama, "lmstudio": _scan_lmstudio, "llama.cpp": _scan_llamacpp,
                "gpt4all": _scan_gpt4all}
    out: list[StoreModel] = []
    for name, scanner in scanners.items():
        if source is None or source == name:
            out.extend(scanner())
    return out


def _scan_ollama() -> list[StoreModel]:
    found: dict[str, StoreModel] = {}
    for root in ollama_roots():
        manifests = root / "manifests"
        try:
            candidates = sorted(manifests.glob("*/*/*/*"))  # HOST/NAMESPACE/MODEL/TAG, as ollama globs them
        except OSError:
            continue
        for manifest in candidates:
            if not manifest.is_file():
                continue
            host, namespace, model, tag = manifest.relative_to(manifests).parts
            name = _ollama_short(host, namespace, model, tag)
            blob = _ollama_blob(root, manifest)
            if name.lower() in found or blob is None or not _is_gguf(blob):
                continue
            found[name.lower()] = StoreModel("ollama", name, blob, blob.stat().st_size, (blob,))
    return list(found.values())


def _ollama_blob(root: Path, manifest: Path) -> Path | None:
    layers = _read_json(manifest).get("layers")
    for layer in layers if isinstance(layers, list) else ():
        if isinstance(layer, dict) and layer.get("mediaType") == OLLAMA_MODEL_LAYER:
            digest = layer.get("digest")
            if not isinstance(digest, str) or not _DIGEST_RE.match(digest):
                return None
            blob = root / "blobs" / digest.replace(":", "-")
            return blob if blob.is_file() else None
    return None  # e.g. a model of ollama's own safetensors engine: no GGUF to run


def _ollama_short(host: str, namespace: str, model: str, tag: str) -> str:
    """ollama's DisplayShortest: the host and namespace only when they are not the defaults."""
    if host.lower() != _OLLAMA_HOST:
        return f"{host}/{namespace}/{model}:{tag}"
    if namespace.lower() != _OLLAMA_NAMESPACE:
        return f"{namespace}/{model}:{tag}"
    return f"{model}:{tag}"


def ollama_name(text: str) -> tuple[str, str, str, str]:
    """(host, namespace, model, tag) for `[scheme://][HOST/][NAMESPACE/]MODEL[:TAG]`, as ollama's ParseName."""
    name = text.strip()
    if "@" in name:
        raise UsageError(f"ollama:{text}: name a model by NAME[:TAG], not by digest")
    name = name.split("://", 1)[-1]
    tag = _OLLAMA_TAG
    if name.rfind(":") > name.rfind("/"):  # "/" is not allowed in a tag, so a ":" after the last "/" starts one
        name, tag = name.rsplit(":", 1)
    parts = name.split("/")
    if not tag or len(parts) > 3 or any(not p or p in (".", "..") for p in parts):
        raise UsageError(f"ollama:{text} is not an ollama model name: expected [HOST/][NAMESPACE/]MODEL[:TAG], "
                         "e.g. ollama:llama3.2:1b")
    host = parts[-3] if len(parts) == 3 else _OLLAMA_HOST
    namespace = parts[-2] if len(parts) >= 2 else _OLLAMA_NAMESPACE
    return host, namespace, parts[-1], tag


def _scan_lmstudio() -> list[StoreModel]:
    out: list[StoreModel] = []
    seen: set[str] = set()
    for root in lmstudio_roots():
        for model in _group(root, "*/*/*.gguf", "lmstudio"):  # PUBLISHER/REPO/FILE.gguf
            if model.name.lower() not in seen:
                seen.add(model.name.lower())
                out.append(model)
    return out


def _scan_llamacpp() -> list[StoreModel]:
    from chatcli import paths, store

    out: list[StoreModel] = []
    hf_cache = os.path.realpath(paths.hf_hub_cache())
    for root in llamacpp_roots():
        out.extend(_group(root, "*.gguf", "llama.cpp"))  # the flat OWNER_REPO_FILE.gguf files of older builds
        if os.path.realpath(root) == hf_cache:  # LLAMA_CACHE pointed at the Hugging Face cache: listed as hf
            continue
        try:
            folders = sorted(root.glob("models--*--*"))
        except OSError:
            continue
        for folder in folders:  # newer builds with LLAMA_CACHE set: the Hugging Face layout, in that folder
            repo = folder.name[len("models--"):].replace("--", "/")
            for model in store.models_in_repo(repo, folder):
                if not _is_projector(model.filename) and _is_gguf(model.path):
                    out.append(StoreModel("llama.cpp", f"{repo}/{model.filename}", model.path, model.size,
                                          tuple(model.parts)))
    return out


def _scan_gpt4all() -> list[StoreModel]:
    out: list[StoreModel] = []
    seen: set[str] = set()
    for root in gpt4all_roots():
        for model in _group(root, "*.gguf", "gpt4all"):
            if model.name.lower() not in seen and not model.path.name.startswith("incomplete-"):
                seen.add(model.name.lower())
                out.append(model)
    return out


def _group(root: Path, pattern: str, source: str) -> list[StoreModel]:
    """The GGUF files under `root` matching `pattern`, the parts of a split model (-0000N-of-0000M) as one."""
    try:
        files = sorted(p for p in root.glob(pattern) if p.is_file() and not _is_projector(p.name))
    except OSError:
        return []
    groups: dict[str, list[Path]] = {}
    for file in files:
        rel = file.relative_to(root).as_posix()
        groups.setdefault(_SPLIT_RE.sub(".gguf", rel).lower(), []).append(file)
    out = []
    for parts in groups.values():
        first = parts[0]  # sorted: -00001-of- comes first
        split = _SPLIT_RE.search(first.name)
        if split is not None and (split.group(1) != "00001" or len(parts) != int(split.group(2))):
            continue  # an incomplete split model: llama.cpp could not open it
        if not _is_gguf(first):
            continue
        size = sum(p.stat().st_size for p in parts)
        out.append(StoreModel(source, first.relative_to(root).as_posix(), first, size, tuple(parts)))
    return out


# ---------------------------------------------------------------- references


def split_reference(text: str) -> tuple[str, str] | None:
    """(source, name) for `ollama:NAME[:TAG]`, `lmstudio:P/R/F.gguf`, `llamacpp:NAME`, `gpt4all:F.gguf`; else None.

    An ollama name comes back in its short canonical form, tag included (`ollama:llama3.2` -> llama3.2:latest).
    """
    prefix, sep, name = text.partition(":")
    source = PREFIXES.get(prefix.lower()) if sep else None
    if source is None:
        return None
    name = name.strip()
    if not name:
        example = {"ollama": "ollama:llama3.2:1b", "lmstudio": "lmstudio:PUBLISHER/REPO/FILE.gguf",
                   "llama.cpp": "llamacpp:FILE.gguf", "gpt4all": "gpt4all:FILE.gguf"}[source]
        raise UsageError(f"{text!r}: name a model after '{prefix}:' (e.g. {example}; `chatcli list` shows them)")
    if source == "ollama":
        return source, _ollama_short(*ollama_name(name))
    return source, name


def find(source: str, name: str) -> StoreModel:
    """The model `name` in `source`'s store; UnknownModelError naming where we looked."""
    models = scan(source)
    if source == "ollama":
        wanted = tuple(p.lower() for p in ollama_name(name))
        match = next((m for m in models if tuple(p.lower() for p in ollama_name(m.name)) == wanted), None)
    else:
        match = next((m for m in models if m.name == name), None) or next(
            (m for m in models if m.name.lower() == name.lower()), None)
    if match is not None:
        return match
    where = " or ".join(str(r) for r in roots(source))
    have = ", ".join(m.name for m in models[:5])
    hint = f"it has: {have}{', …' if len(models) > 5 else ''}" if models else "it has no GGUF models there"
    raise UnknownModelError(f"{TOOLS[source]} has no model {name!r} in {where} ({hint}; see `chatcli list`)")


def owner_of(path: Path) -> str | None:
    """The tool whose store holds `path`, if any: chatcli leaves such files alone."""
    try:
        target = path.resolve()
    except OSError:
        return None
    for source in TOOLS:
        for root in roots(source):
            try:
                if target.is_relative_to(root.resolve()):
                    return source
            except OSError:
                continue
    return None


def removal_refused(model: StoreModel | None, path: Path, source: str) -> str:
    """The one line `rm` answers for another tool's file."""
    how = {"ollama": f"`ollama rm {model.name}`" if model else "`ollama rm`",
           "lmstudio": "LM Studio's My Models tab"}.get(source, "that tool, or delete the file yourself")
    what = model.reference if model else str(path)
    return f"not removing {what}: it belongs to {TOOLS[source]} ({path}); chatcli never deletes another tool's " \
           f"files (use {how})"
