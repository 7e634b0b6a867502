"""The fake Hub speaks enough of the Hub protocol for the real huggingface_hub client, and its faults bite."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import pathlib
import subprocess
import sys
import time
from collections.abc import Iterator
from email.message import Message
from urllib.parse import quote, urlsplit

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from fakehub import FakeHub  # noqa: E402

REPO = "acme/tiny-GGUF"
DATA = bytes(range(256)) * 40  # 10,240 bytes
URL = f"/{REPO}/resolve/main/tiny.gguf"


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    with FakeHub() as fake:
        yield fake


def run_client(hub: FakeHub, tmp_path: pathlib.Path, code: str) -> object:
    """Run `code` with the real huggingface_hub against `hub` in a new process; return its printed JSON."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(
        HF_ENDPOINT=hub.url,
        HF_HOME=str(tmp_path / "hf"),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HF_HUB_DISABLE_XET="1",
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def plain_request(
    hub: FakeHub, method: str, path: str, headers: dict[str, str] | None = None
) -> tuple[int, Message, bytes]:
    """One plain request to the fake Hub: status, headers, whole body."""
    conn = http.client.HTTPConnection(urlsplit(hub.url).netloc, timeout=10)
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.headers, response.read()
    finally:
        conn.close()


def test_hf_hub_download_fills_the_standard_cache(hub: FakeHub, tmp_path: pathlib.Path) -> None:
    on_disk = tmp_path / "big.gguf"
    on_disk.write_bytes(DATA[::-1] * 3)
    sha = hub.add_file(REPO, "tiny.Q8_0.gguf", DATA)
    disk_sha = hub.add_file(REPO, "sub/big.gguf", on_disk)

    got = run_client(
        hub,
        tmp_path,
        f"""
import json, os
from huggingface_hub import hf_hub_download
paths = [hf_hub_download({REPO!r}, name) for name in ("tiny.Q8_0.gguf", "sub/big.gguf")]
print(json.dumps([[p, os.path.realpath(p)] for p in paths]))
""",
    )

    commit = hub.commit_hash(REPO)
    repo_dir = tmp_path / "hf" / "hub" / "models--acme--tiny-GGUF"
    assert got == [
        [str(repo_dir / "snapshots" / commit / "tiny.Q8_0.gguf"), str(repo_dir / "blobs" / sha)],
        [str(repo_dir / "snapshots" / commit / "sub" / "big.gguf"), str(repo_dir / "blobs" / disk_sha)],
    ]
    assert (repo_dir / "blobs" / sha).read_bytes() == DATA
    assert (repo_dir / "blobs" / disk_sha).read_bytes() == on_disk.read_bytes()
    assert (repo_dir / "refs" / "main").read_text() == commit
    assert [(r.method, r.status) for r in hub.requests] == [("HEAD", 200), ("GET", 200)] * 2
    assert hub.body_bytes_sent == len(DATA) + on_disk.stat().st_size


def test_hfapi_lists_files_with_lfs_sha256_across_pages(tmp_path: pathlib.Path) -> None:
    with FakeHub(tree_page_size=2) as hub:
        names = ("a.gguf", "b.gguf", "sub/c.gguf")
        shas = {name: hub.add_file(REPO, name, (name * 50).encode()[:300]) for name in names}
        hub.add_file(REPO, "README.md", b"# tiny\n", lfs=False)

        got = run_client(
            hub,
            tmp_path,
            f"""
import json
from huggingface_hub import HfApi
api = HfApi()
tree = []
for e in api.list_repo_tree({REPO!r}, recursive=True):
    lfs = getattr(e, "lfs", None)
    tree.append([type(e).__name__, e.path, getattr(e, "size", None), lfs and lfs.sha256])
info = api.model_info({REPO!r}, files_metadata=True)
siblings = [[s.rfilename, s.size, s.lfs and s.lfs.sha256] for s in info.siblings]
files = api.list_repo_files({REPO!r})
print(json.dumps({{"tree": tree, "files": files, "sha": info.sha, "siblings": siblings}}))
""",
        )

        expected = [["RepoFile", name, 300, shas[name]] for name in names]
        readme, folder = ["RepoFile", "README.md", 7, None], ["RepoFolder", "sub", None, None]
        assert sorted(got["tree"]) == sorted([*expected, readme, folder])
        assert sorted(got["files"]) == ["README.md", "a.gguf", "b.gguf", "sub/c.gguf"]
        assert got["sha"] == hub.commit_hash(REPO)
        assert sorted(got["siblings"]) == sorted([entry[1:] for entry in expected] + [["README.md", 7, None]])
        tree_pages = [r for r in hub.requests if "/tree/" in r.path]
        assert len(tree_pages) == 6  # 5 entries, 2 per page, listed twice (tree + list_repo_files)


def test_client_errors_match_the_real_hub(hub: FakeHub, tmp_path: pathlib.Path) -> None:
    hub.add_file(REPO, "tiny.gguf", DATA)
    hub.add_file("acme/gated", "tiny.gguf", DATA)
    hub.gate("acme/gated", token="hf_good")

    got = run_client(
        hub,
        tmp_path,
        f"""
import json
from huggingface_hub import hf_hub_download
cases = [
    ("acme/nope", "tiny.gguf", {{}}),
    ({REPO!r}, "nope.gguf", {{}}),
    ({REPO!r}, "tiny.gguf", {{"revision": "nope"}}),
    ("acme/gated", "tiny.gguf", {{}}),
    ("acme/gated", "tiny.gguf", {{"token": "hf_bad"}}),
    ("acme/gated", "tiny.gguf", {{"token": "hf_good"}}),
]
out = []
for repo, name, kwargs in cases:
    try:
        hf_hub_download(repo, name, **kwargs)
        out.append("ok")
    except Exception as e:
        out.append(f"{{type(e).__name__}} {{e.response.status_code}}")
print(json.dumps(out))
""",
    )

    assert got == [
        "RepositoryNotFoundError 404",
        "RemoteEntryNotFoundError 404",
        "RevisionNotFoundError 404",
        "GatedRepoError 401",
        "GatedRepoError 403",
        "ok",
    ]


def test_real_client_resumes_a_dropped_body_with_a_range(hub: FakeHub, tmp_path: pathlib.Path) -> None:
    # huggingface_hub reads bodies in 10 MiB chunks: only bytes past a whole chunk survive a broken transfer
    data = os.urandom(10 * 1024 * 1024 + 5000)
    sha = hub.add_file(REPO, "big.gguf", data)
    hub.drop_after(10 * 1024 * 1024 + 100)

    got = run_client(
        hub,
        tmp_path,
        f"""
import hashlib, json
from huggingface_hub import hf_hub_download
print(json.dumps(hashlib.sha256(open(hf_hub_download({REPO!r}, "big.gguf"), "rb").read()).hexdigest()))
""",
    )

    assert got == sha
    gets = [(r.range, r.status) for r in hub.requests if r.method == "GET"]
    assert gets == [(None, 200), ("bytes=10485760-", 206)]


def test_head_carries_the_metadata_the_client_needs(hub: FakeHub) -> None:
    sha = hub.add_file(REPO, "dir/a b+c.gguf", DATA)
    commit = hub.commit_hash(REPO)

    status, headers, body = plain_request(hub, "HEAD", f"/{REPO}/resolve/{commit}/{quote('dir/a b+c.gguf')}")

    assert (status, body) == (200, b"")
    assert headers["X-Repo-Commit"] == commit
    assert headers["ETag"] == headers["X-Linked-Etag"] == f'"{sha}"'
    assert headers["X-Linked-Size"] == headers["Content-Length"] == str(len(DATA))
    assert headers["Accept-Ranges"] == "bytes"
    assert not [key for key in headers if key.lower().startswith("x-xet")]


def test_non_lfs_files_have_a_git_etag_and_no_linked_headers(hub: FakeHub) -> None:
    hub.add_file(REPO, "README.md", b"# hi\n", lfs=False)

    status, headers, _ = plain_request(hub, "HEAD", f"/{REPO}/resolve/main/README.md")

    assert status == 200
    assert headers["ETag"] == '"' + hashlib.sha1(b"blob 5\0# hi\n").hexdigest() + '"'
    assert headers["X-Linked-Etag"] is None and headers["X-Linked-Size"] is None


@pytest.mark.parametrize(
    ("range_header", "start", "end"),
    [
        ("bytes=10-19", 10, 19),
        ("bytes=10000-", 10000, len(DATA) - 1),
        ("bytes=-5", len(DATA) - 5, len(DATA) - 1),
    ],
)
def test_range_get_returns_206_and_the_slice(hub: FakeHub, range_header: str, start: int, end: int) -> None:
    hub.add_file(REPO, "tiny.gguf", DATA)

    status, headers, body = plain_request(hub, "GET", URL, {"Range": range_header})

    assert status == 206
    assert headers["Content-Range"] == f"bytes {start}-{end}/{len(DATA)}"
    assert body == DATA[start : end + 1]
    assert hub.requests[-1] == ("GET", URL, range_header, 206)


def test_unsatisfiable_range_is_416(hub: FakeHub) -> None:
    hub.add_file(REPO, "tiny.gguf", DATA)

    status, headers, body = plain_request(hub, "GET", URL, {"Range": f"bytes={len(DATA)}-"})

    assert (status, headers["Content-Range"], body) == (416, f"bytes */{len(DATA)}", b"")


def test_drop_after_cuts_the_body_once(hub: FakeHub) -> None:
    hub.add_file(REPO, "tiny.gguf", DATA)
    hub.drop_after(1000)

    with pytest.raises(http.client.IncompleteRead) as cut:
        plain_request(hub, "GET", URL)

    assert len(cut.value.partial) == 1000
    assert hub.body_bytes_sent == 1000
    assert plain_request(hub, "GET", URL)[2] == DATA


def test_drop_after_with_reset_resets_the_connection(hub: FakeHub) -> None:
    hub.add_file(REPO, "tiny.gguf", DATA)
    hub.drop_after(0, reset=True)

    with pytest.raises(ConnectionResetError):
        plain_request(hub, "GET", URL)


def test_fail_answers_the_status_to_matching_requests_only(hub: FakeHub) -> None:
    hub.add_file(REPO, "tiny.gguf", DATA)
    hub.fail(500, times=2, path_substring="tiny.gguf")

    assert plain_request(hub, "GET", f"/api/models/{REPO}")[0] == 200
    assert [plain_request(hub, "HEAD", URL)[0] for _ in range(3)] == [500, 500, 200]
    hub.fail(503)
    hub.reset_faults()
    assert plain_request(hub, "GET", URL)[0] == 200


def test_corrupt_serves_wrong_bytes_of_the_right_length(hub: FakeHub) -> None:
    sha = hub.add_file(REPO, "tiny.gguf", DATA)
    hub.corrupt("tiny.gguf")

    status, headers, body = plain_request(hub, "GET", URL)

    assert status == 200 and headers["X-Linked-Etag"] == f'"{sha}"'
    assert len(body) == len(DATA) and hashlib.sha256(body).hexdigest() != sha


def test_throttle_slows_the_body_down(hub: FakeHub) -> None:
    hub.add_file(REPO, "tiny.gguf", DATA)
    hub.throttle(40_000)

    started = time.monotonic()
    body = plain_request(hub, "GET", URL)[2]

    assert body == DATA
    assert time.monotonic() - started >= 0.2  # 10 KiB at 40 kB/s: about 0.25 s


def test_reset_stats_forgets_requests_and_bytes(hub: FakeHub) -> None:
    hub.add_file(REPO, "tiny.gguf", DATA)
    plain_request(hub, "GET", URL)
    assert hub.body_bytes_sent == len(DATA) and len(hub.requests) == 1

    hub.reset_stats()

    assert (hub.body_bytes_sent, hub.requests) == (0, [])
