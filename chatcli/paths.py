"""Where chatcli keeps its files, and where the Hugging Face cache is.

Nothing here imports huggingface_hub: `list`, `show` and `--help` must stay light.
"""

from __future__ import annotations

import os
from pathlib import Path

APP = "chatcli"


def _user_dir(kind: str) -> Path:
    """CHATCLI_HOME/<kind>, else the platform's user <kind> dir for chatcli (platformdirs)."""
    home = os.environ.get("CHATCLI_HOME")
    if home:
        return Path(home).expanduser() / kind
    import platformdirs

    return Path(getattr(platformdirs, f"user_{kind}_dir")(APP))


def config_dir() -> Path:
    """User config: the user catalogue (models.toml), prompt templates, config.toml."""
    return _user_dir("config")


def data_dir() -> Path:
    """User data: history.db, REPL input history, model usage records."""
    return _user_dir("data")


def cache_dir() -> Path:
    """Caches that can be deleted at any time: KV snapshots."""
    return _user_dir("cache")


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
