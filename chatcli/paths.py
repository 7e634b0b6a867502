"""Where chatcli keeps its files, and where the Hugging Face cache is.

Nothing here imports huggingface_hub: `list`, `show` and `--help` must stay light.
"""

from __future__ import annotations

import os
from pathlib import Path

APP = "chatcli"


def _home_override() -> Path | None:
    home = os.environ.get("CHATCLI_HOME")
    return Path(home).expanduser() if home else None


def config_dir() -> Path:
    """User config: the user catalogue (models.toml), prompt templates, config.toml."""
    home = _home_override()
    if home is not None:
        return home / "config"
    import platformdirs

    return Path(platformdirs.user_config_dir(APP))


def data_dir() -> Path:
    """User data: history.db, REPL input history, model usage records."""
    home = _home_override()
    if home is not None:
        return home / "data"
    import platformdirs

    return Path(platformdirs.user_data_dir(APP))


def cache_dir() -> Path:
    """Caches that can be deleted at any time: KV snapshots."""
    home = _home_override()
    if home is not None:
        return home / "cache"
    import platformdirs

    return Path(platformdirs.user_cache_dir(APP))


def hf_hub_cache() -> Path:
    """The Hugging Face Hub cache, resolved exactly as huggingface_hub does it."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    hf_home = os.environ.get("HF_HOME")
    if hf_home:
        return Path(hf_home).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "huggingface" / "hub"


def hf_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hf_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
