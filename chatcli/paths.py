"""Where chatcli keeps its files, and where the Hugging Face cache is.

Nothing here imports huggingface_hub: `list`, `show` and `--help` must stay light.
chatcli's own folders hold conversations, prompts and model states: on POSIX they are private to the user
(folders 0700, files 0600), made so when created and, for what an older chatcli or a umask left open,
on the first use in each process. The Hugging Face cache is shared with other tools and left alone.
"""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

APP = "chatcli"
PRIVATE = os.name != "nt"  # Windows has no mode bits worth setting: its folders are per-user by ACL
DIR_MODE, FILE_MODE = 0o700, 0o600

_tightened: set[str] = set()
_lock = threading.Lock()


def _user_dir(kind: str) -> Path:
    """CHATCLI_HOME/<kind>, else the platform's user <kind> dir for chatcli (platformdirs); made private."""
    home = os.environ.get("CHATCLI_HOME")
    if home:
        path = Path(home).expanduser() / kind
    else:
        import platformdirs

        path = Path(getattr(platformdirs, f"user_{kind}_dir")(APP))
    return private_dir(path)


def private_dir(path: Path) -> Path:
    """Create `path` 0700; the first time in this process also tighten what is in it (dirs 0700, files 0600).

    Symlinks are not followed and a Hugging Face cache inside it is skipped: shared places keep their modes.
    """
    if not PRIVATE:
        return path
    key = str(path)
    if key in _tightened:
        return path
    with _lock:
        if key in _tightened:
            return path
        try:
            path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            _tighten(path, DIR_MODE)
            shared = {os.path.realpath(hf_hub_cache()), os.path.realpath(os.environ.get("HF_HOME") or hf_hub_cache())}
            for root, dirs, files in os.walk(path):
                dirs[:] = [name for name in dirs if os.path.realpath(os.path.join(root, name)) not in shared]
                for name in dirs:
                    _tighten(Path(root, name), DIR_MODE)
                for name in files:
                    _tighten(Path(root, name), FILE_MODE)
        except OSError:
            return path  # e.g. a read-only home: whoever writes there next reports the real error
        _tightened.add(key)
    return path


def private_file(path: Path) -> Path:
    """Make sure `path` exists and is 0600 (creating its folder 0700), so that what opens it later keeps that."""
    if not PRIVATE or path.is_symlink():  # a link the user made points where they chose: leave it
        return path
    path.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, FILE_MODE)
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) != FILE_MODE:
            os.fchmod(fd, FILE_MODE)
    finally:
        os.close(fd)
    return path


def make_private(path: Path) -> None:
    """chmod a file chatcli wrote (through a library that chose its mode) to 0600; nothing on Windows."""
    if PRIVATE:
        _tighten(path, FILE_MODE)


def _tighten(path: Path, mode: int) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:  # removed meanwhile (e.g. another chatcli evicting a snapshot)
        return
    if stat.S_ISLNK(st.st_mode) or stat.S_IMODE(st.st_mode) & ~mode == 0:
        return
    try:
        os.chmod(path, stat.S_IMODE(st.st_mode) & mode)
    except FileNotFoundError:
        return


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
