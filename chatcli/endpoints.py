"""Remote endpoints: named OpenAI-compatible servers (vLLM, llama-server, ollama, chatcli serve) in endpoints.toml.

A name is what `@NAME/MODEL_ID` model references point at. The file holds the URL and, at most, the *name* of
the environment variable that carries the API key, never a key: config files get copied, synced and shown, and
a key read from the environment at run time can be rotated without touching chatcli. `OPENAI_BASE_URL` /
`OPENAI_API_KEY` make an implicit endpoint named `openai`, as the openai SDK and most tools read them.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from chatcli import paths
from chatcli.errors import ChatcliError, UnknownModelError, UsageError

# No '/' (it separates the model id), no '@', no spaces: safe in a reference and as a TOML key.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
IMPLICIT = "openai"
OPENAI_DEFAULT_URL = "https://api.openai.com/v1"


@dataclass(frozen=True)
class Endpoint:
    name: str
    url: str
    api_key_env: str | None = None
    implicit: bool = False  # from OPENAI_BASE_URL / OPENAI_API_KEY, not from the file

    @property
    def api_base(self) -> str:
        """The base URL the OpenAI SDK wants: a bare server URL gets `/v1`, any other path is kept as given."""
        parts = urlsplit(self.url)
        return self.url + "/v1" if parts.path in ("", "/") else self.url

    def api_key(self) -> str | None:
        if not self.api_key_env:
            return None
        return os.environ.get(self.api_key_env) or None


def endpoints_path() -> Path:
    return paths.config_dir() / "endpoints.toml"


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise UsageError(f"invalid endpoint name {name!r}: use letters, digits, '.', '_' or '-' (e.g. `gpu-box`)")
    return name


def check_url(url: str) -> str:
    """The URL, without a trailing '/'; only http(s), a host, and no credentials, query or fragment."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port  # raises on a port that is not a number
    except ValueError as exc:
        raise UsageError(f"invalid endpoint URL {url!r}: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or any(c.isspace() for c in url.strip()):
        raise UsageError(f"invalid endpoint URL {url!r}: expected http://HOST[:PORT][/PATH] or https://…")
    if parts.username or parts.password:
        raise UsageError("an endpoint URL must not hold credentials: put the key in an environment variable and "
                         "pass --api-key-env VAR")
    if parts.query or parts.fragment:
        raise UsageError(f"invalid endpoint URL {url!r}: no ?query or #fragment")
    del port
    return url.strip().rstrip("/")


def check_env_name(var: str) -> str:
    if not _ENV_RE.match(var):
        raise UsageError(f"invalid --api-key-env {var!r}: give the NAME of an environment variable (e.g. VLLM_KEY), "
                         "not the key itself")
    return var


def _read() -> dict[str, Endpoint]:
    path = endpoints_path()
    if not path.is_file():
        return {}
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ChatcliError(f"{path}: cannot read the endpoints file: {exc}") from exc
    table = data.get("endpoints", {})
    if not isinstance(table, dict):
        raise ChatcliError(f"{path}: 'endpoints' must be a table of [endpoints.NAME] entries")
    out: dict[str, Endpoint] = {}
    for name, raw in table.items():
        if not isinstance(raw, dict) or not isinstance(raw.get("url"), str):
            raise ChatcliError(f"{path}: [endpoints.{name}] needs url = \"http://…\"")
        env = raw.get("api_key_env")
        if env is not None and not isinstance(env, str):
            raise ChatcliError(f"{path}: [endpoints.{name}] api_key_env must be a string")
        try:
            out[name] = Endpoint(check_name(name), check_url(raw["url"]), check_env_name(env) if env else None)
        except UsageError as exc:
            raise ChatcliError(f"{path}: [endpoints.{name}]: {exc}") from None
    return out


def _implicit() -> Endpoint | None:
    base, key = os.environ.get("OPENAI_BASE_URL", "").strip(), os.environ.get("OPENAI_API_KEY", "")
    if not base and not key:
        return None
    try:
        url = check_url(base) if base else OPENAI_DEFAULT_URL
    except UsageError as exc:
        raise UsageError(f"OPENAI_BASE_URL: {exc}") from None
    return Endpoint(IMPLICIT, url, "OPENAI_API_KEY", implicit=True)


def load() -> dict[str, Endpoint]:
    """Every endpoint, by name: the file's, and `openai` from the environment unless the file names one so."""
    endpoints = _read()
    implicit = _implicit()
    if implicit is not None and IMPLICIT not in endpoints:
        endpoints[IMPLICIT] = implicit
    return dict(sorted(endpoints.items()))


def get(name: str) -> Endpoint:
    endpoints = load()
    if name in endpoints:
        return endpoints[name]
    known = f" (configured: {', '.join(endpoints)})" if endpoints else ""
    raise UnknownModelError(f"no endpoint named {name!r}{known}: add it with `chatcli endpoint add {name} URL`")


def add(name: str, url: str, api_key_env: str | None = None) -> Endpoint:
    endpoint = Endpoint(check_name(name), check_url(url), check_env_name(api_key_env) if api_key_env else None)
    endpoints = _read()
    if name in endpoints:
        raise UsageError(f"endpoint {name!r} already exists ({endpoints[name].url}): "
                         f"`chatcli endpoint rm {name}` first to replace it")
    endpoints[name] = endpoint
    _write(endpoints)
    return endpoint


def remove(name: str) -> Endpoint:
    endpoints = _read()
    if name not in endpoints:
        implicit = _implicit()
        if name == IMPLICIT and implicit is not None:
            raise UsageError("endpoint 'openai' comes from OPENAI_BASE_URL / OPENAI_API_KEY: unset them to remove it")
        known = f" (configured: {', '.join(sorted(endpoints))})" if endpoints else ""
        raise UsageError(f"no endpoint named {name!r}{known}")
    removed = endpoints.pop(name)
    _write(endpoints)
    return removed


def _write(endpoints: dict[str, Endpoint]) -> None:
    """Atomically (a temporary file renamed over the old one), private (0600): a reader never sees half a file."""
    path = endpoints_path()
    lines = ["# chatcli remote endpoints (`chatcli endpoint add/list/rm`); API keys stay in environment variables\n"]
    for endpoint in sorted(endpoints.values(), key=lambda e: e.name):
        lines.append(f"\n[endpoints.{json.dumps(endpoint.name)}]\nurl = {json.dumps(endpoint.url)}\n")
        if endpoint.api_key_env:
            lines.append(f"api_key_env = {json.dumps(endpoint.api_key_env)}\n")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".endpoints.", suffix=".tmp")  # mkstemp: mode 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write("".join(lines))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    paths.make_private(path)
