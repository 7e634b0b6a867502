"""User settings: `<config dir>/config.toml`, overridden by CHATCLI_* environment variables.

Each effective setting knows where it came from, so `chatcli config show` can say.
"""

from __future__ import annotations

import os
import re
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

from chatcli import paths
from chatcli.errors import ChatcliError, UsageError

# name -> (environment variable, type, built-in default, help)
SETTINGS: dict[str, tuple[str, type, object, str]] = {
    "default_model": ("CHATCLI_MODEL", str, None, "model used when -m is not given"),
    "auto_pull": ("CHATCLI_AUTO_PULL", bool, False, "download a missing model without asking"),
    "gpu_layers": ("CHATCLI_GPU_LAYERS", str, "auto", "layers to offload to the GPU: auto, all or N"),
    "threads": ("CHATCLI_THREADS", int, None, "CPU threads (default: physical cores)"),
    "ctx_size": ("CHATCLI_CTX_SIZE", int, None, "context window in tokens (default: the model's)"),
    "flash_attn": ("CHATCLI_FLASH_ATTN", bool, True, "use flash attention (faster on CPU here: `chatcli bench`)"),
    "snapshots": ("CHATCLI_SNAPSHOTS", bool, True, "save and restore conversation state (KV cache)"),
    "memory_limit": ("CHATCLI_MEMORY_LIMIT", str, None,
                     "assume this much memory is free (e.g. 8GB) when `show` and `pull --quant auto` judge fit"),
    "pull_quant": ("CHATCLI_PULL_QUANT", str, None,
                   "quant `pull` takes when none is named: auto = the largest that fits this machine"),
}


@dataclass(frozen=True)
class Setting:
    name: str
    value: object
    source: str  # "default", "catalogue", the config file path, or "env CHATCLI_X"


def config_path() -> Path:
    return paths.config_dir() / "config.toml"


def _parse(name: str, kind: type, raw: object, where: str) -> object:
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in {"1", "true", "yes", "on"}:
            return True
        if text in {"0", "false", "no", "off", ""}:
            return False
        raise UsageError(f"{where}: {name} must be true or false, got {raw!r}")
    if kind is int:
        try:
            value = int(str(raw))
        except ValueError:
            raise UsageError(f"{where}: {name} must be a whole number, got {raw!r}") from None
        if value <= 0:
            raise UsageError(f"{where}: {name} must be positive, got {value}")
        return value
    return str(raw)


def _read_file() -> dict[str, object]:
    path = config_path()
    if not path.is_file():
        return {}
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ChatcliError(f"{path}: cannot read the config file: {exc}") from exc
    unknown = sorted(set(data) - set(SETTINGS))
    if unknown:
        raise ChatcliError(f"{path}: unknown setting {unknown[0]!r} (known: {', '.join(SETTINGS)})")
    return data


def effective() -> dict[str, Setting]:
    """Every setting with its value and source: environment > config file > built-in default."""
    from chatcli.registry import load_catalogue

    file_values = _read_file()
    out: dict[str, Setting] = {}
    for name, (env, kind, default, _help) in SETTINGS.items():
        if os.environ.get(env, "") != "":
            out[name] = Setting(name, _parse(name, kind, os.environ[env], f"${env}"), f"env {env}")
        elif name in file_values:
            out[name] = Setting(name, _parse(name, kind, file_values[name], str(config_path())), str(config_path()))
        elif name == "default_model":
            out[name] = Setting(name, load_catalogue().default_model, "catalogue (models.toml)")
        else:
            out[name] = Setting(name, default, "default")
    return out


def get(name: str) -> object:
    return effective()[name].value


def set_value(name: str, raw: str) -> object:
    """Write one setting to the config file (atomically), keeping the others."""
    if name not in SETTINGS:
        raise UsageError(f"unknown setting {name!r}; known: {', '.join(SETTINGS)}")
    _env, kind, _default, _help = SETTINGS[name]
    value = _parse(name, kind, raw, "config set")
    data = _read_file()
    data[name] = value
    _write(data)
    return value


def unset(name: str) -> None:
    if name not in SETTINGS:
        raise UsageError(f"unknown setting {name!r}; known: {', '.join(SETTINGS)}")
    data = _read_file()
    data.pop(name, None)
    _write(data)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    text = str(value)
    return '"' + re.sub(r'(["\\])', r"\\\1", text).replace("\n", "\\n") + '"'


def _write(data: dict[str, object]) -> None:
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    body = "".join(f"{key} = {_toml_value(value)}\n" for key, value in sorted(data.items()))
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".config.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write("# chatcli settings; `chatcli config show` lists them all\n" + body)
    os.replace(tmp, path)
