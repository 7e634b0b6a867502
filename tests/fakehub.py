"""A local fake Hugging Face Hub: the download and listing protocol of huggingface_hub 2.4, plus faults.

Point the real client at it with `HF_ENDPOINT=hub.url`, set before huggingface_hub is imported (so in
practice in a subprocess). Everything is served as plain HTTP: no xet headers, no redirects to a CDN.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import pathlib
import socket
import struct
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any, BinaryIO, NamedTuple

_CHUNK = 256 * 1024
_FLIP = bytes(255 - i for i in range(256))
_DATE = "2024-01-01T00:00:00.000Z"


class Served(NamedTuple):
    """One resolve GET's body: the file's path in its repo, the Range asked for, the bytes written."""

    path: str
    range: str | None
    nbytes: int


class RequestRecord(NamedTuple):
    """One answered request: method, URL-decoded path (no query), Range header, status."""

    method: str
    path: str
    range: str | None
    status: int


@dataclass(frozen=True)
class _Blob:
    """One file of one revision: its content (in memory or on disk) and the hashes the Hub reports."""

    sha256: str
    size: int
    git_oid: str
    lfs: bool
    pointer_size: int
    data: bytes | None
    source: pathlib.Path | None

    def open(self) -> BinaryIO:
        """Open the content for reading (a file on disk is streamed, never read whole)."""
        if self.source is not None:
            return self.source.open("rb")
        return io.BytesIO(self.data or b"")


_Snapshot = tuple[str, dict[str, _Blob]]  # (commit, files by path)


@dataclass
class _Repo:
    revisions: dict[str, dict[str, _Blob]]
    gated: bool = False
    token: str | None = None


@dataclass
class _Failure:
    status: int
    remaining: int
    path_substring: str | None


def _blob_from(data: bytes | pathlib.Path, lfs: bool) -> _Blob:
    """Hash the content once: sha256 (the LFS oid) and, for non-LFS files, the git blob oid."""
    sha = hashlib.sha256()
    if isinstance(data, pathlib.Path):
        size = data.stat().st_size
        git = hashlib.sha1(b"blob %d\0" % size)
        with data.open("rb") as f:
            while chunk := f.read(1 << 20):
                sha.update(chunk)
                if not lfs:  # an LFS file's git oid is its pointer's: skip hashing GBs twice
                    git.update(chunk)
        content, source = None, data
    else:
        content, source, size = bytes(data), None, len(data)
        sha.update(content)
        git = hashlib.sha1(b"blob %d\0" % size + content)
    digest = sha.hexdigest()
    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{digest}\nsize {size}\n".encode()
    if lfs:  # the git blob of an LFS file is its pointer file
        git = hashlib.sha1(b"blob %d\0" % len(pointer) + pointer)
    return _Blob(digest, size, git.hexdigest(), lfs, len(pointer), content, source)


def _fake_sha1(*parts: str) -> str:
    """A stable 40-hex id derived from its parts (commits, tree oids)."""
    return hashlib.sha1("\0".join(parts).encode()).hexdigest()


def _parse_range(header: str | None, size: int) -> tuple[int, int] | None | bool:
    """(start, end inclusive) of a single `bytes=` range; None: ignore the header; False: unsatisfiable."""
    if not header or not header.strip().lower().startswith("bytes=") or "," in header:
        return None
    first, _, last = header.strip()[6:].partition("-")
    try:
        if first.strip() == "":  # suffix range: the last N bytes
            n = int(last)
            return (max(size - n, 0), size - 1) if n > 0 and size > 0 else False
        start = int(first)
        end = int(last) if last.strip() else size - 1
    except ValueError:
        return None
    if start >= size:
        return False
    if end < start:
        return None
    return start, min(end, size - 1)


class FakeHub:
    """A Hub on 127.0.0.1 (ephemeral port), served from a thread from construction until `close()`."""

    def __init__(self, *, tree_page_size: int = 1000) -> None:
        self.tree_page_size = tree_page_size
        self._lock = threading.Lock()
        self._repos: dict[str, _Repo] = {}
        self._failures: list[_Failure] = []
        self._drops: list[tuple[int, bool]] = []
        self._corrupt: list[str] = []
        self._throttle: float | None = None
        self._ignore_ranges = False
        self._requests: list[RequestRecord] = []
        self._body_bytes_sent = 0
        self._served: list[Served] = []
        self._server = _Server(self)
        host, port = self._server.server_address[:2]
        self.url = f"http://{host}:{port}"
        self._closed = False
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="fakehub", daemon=True
        )
        self._thread.start()

    def __enter__(self) -> FakeHub:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop serving, cut open connections and join every server thread."""
        if self._closed:
            return
        self._closed = True
        self._server.shutdown()
        self._server.cut_connections()
        self._server.server_close()  # joins the handler threads
        self._thread.join()

    # -- content

    def add_file(
        self, repo_id: str, path: str, data: bytes | pathlib.Path, revision: str = "main", *, lfs: bool = True
    ) -> str:
        """Publish a file (bytes, or a file on disk streamed per request) and return its sha256 hex."""
        blob = _blob_from(data, lfs)
        with self._lock:
            repo = self._repos.setdefault(repo_id, _Repo(revisions={}))
            repo.revisions.setdefault(revision, {})[path.strip("/")] = blob
        return blob.sha256

    def gate(self, repo_id: str, token: str | None = None) -> None:
        """Gate a repo's files: 401 without a token, 403 with another token, served with `token`."""
        with self._lock:
            repo = self._repos.setdefault(repo_id, _Repo(revisions={}))
            repo.gated, repo.token = True, token

    def commit_hash(self, repo_id: str, revision: str = "main") -> str:
        """The fake 40-hex commit a revision resolves to (stable for repo + revision)."""
        return _fake_sha1("commit", repo_id, revision)

    # -- faults: thread-safe, may change while a client is downloading

    def fail(self, status: int, times: int = 1, path_substring: str | None = None) -> None:
        """Answer `status` to the next `times` requests (any method) whose path contains `path_substring`."""
        with self._lock:
            self._failures.append(_Failure(status, times, path_substring))

    def drop_after(self, nbytes: int, times: int = 1, *, reset: bool = False) -> None:
        """Cut the next `times` resolve GET bodies after `nbytes`: close (FIN), or send a TCP reset."""
        with self._lock:
            self._drops.extend([(nbytes, reset)] * times)

    def corrupt(self, path_substring: str) -> None:
        """Serve inverted bytes of the right length for matching files (headers keep the true sha256/size)."""
        with self._lock:
            self._corrupt.append(path_substring)

    def throttle(self, bytes_per_second: float | None) -> None:
        """Limit resolve body streaming to about `bytes_per_second` (None: full speed)."""
        with self._lock:
            self._throttle = bytes_per_second

    def ignore_ranges(self, ignore: bool = True) -> None:
        """Answer every resolve GET with 200 and the whole body, as a server without Range support does."""
        with self._lock:
            self._ignore_ranges = ignore

    def reset_faults(self) -> None:
        """Forget every pending failure, drop, corruption, throttle and ignore_ranges."""
        with self._lock:
            self._ignore_ranges = False
            self._failures.clear()
            self._drops.clear()
            self._corrupt.clear()
            self._throttle = None

    # -- stats

    @property
    def body_bytes_sent(self) -> int:
        """Resolve GET body bytes actually written to sockets."""
        with self._lock:
            return self._body_bytes_sent

    @property
    def requests(self) -> list[RequestRecord]:
        """A copy of the answered requests, oldest first."""
        with self._lock:
            return list(self._requests)

    @property
    def served(self) -> list[Served]:
        """Every resolve GET body, oldest first: which file, which Range, how many bytes went out."""
        with self._lock:
            return list(self._served)

    def bytes_served(self, path_substring: str = "") -> int:
        """Body bytes written for resolve GETs of files whose path contains `path_substring`."""
        return sum(s.nbytes for s in self.served if path_substring in s.path)

    def reset_stats(self) -> None:
        """Clear `requests`, `served` and `body_bytes_sent`."""
        with self._lock:
            self._requests.clear()
            self._served.clear()
            self._body_bytes_sent = 0

    # -- internals used by the handler

    def _take_failure(self, path: str) -> int | None:
        with self._lock:
            for failure in self._failures:
                if failure.remaining > 0 and (failure.path_substring or "") in path:
                    failure.remaining -= 1
                    return failure.status
        return None

    def _lookup(self, repo_id: str) -> _Repo | None:
        with self._lock:
            return self._repos.get(repo_id)

    def _resolve_revision(self, repo_id: str, repo: _Repo, revision: str) -> _Snapshot | None:
        """(commit, files) for a branch name or for the commit hash itself."""
        with self._lock:
            for name, files in repo.revisions.items():
                if revision in (name, self.commit_hash(repo_id, name)):
                    return self.commit_hash(repo_id, name), dict(files)
        return None


class _Server(http.server.ThreadingHTTPServer):
    """Non-daemon handler threads, tracked connections: `close()` can end and join all of them."""

    daemon_threads = False
    block_on_close = True

    def __init__(self, hub: FakeHub) -> None:
        self.hub = hub
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)

    def process_request(self, request: socket.socket, client_address: Any) -> None:  # type: ignore[override]
        with self._conns_lock:
            self._conns.add(request)
        super().process_request(request, client_address)  # type: ignore[arg-type]

    def shutdown_request(self, request: socket.socket) -> None:  # type: ignore[override]
        with self._conns_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def cut_connections(self) -> None:
        """Shut down every open connection so idle keep-alive handlers return."""
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request: object, client_address: object) -> None:  # type: ignore[override]
        if isinstance(sys.exc_info()[1], OSError):  # the client went away: not our problem
            return
        super().handle_error(request, client_address)  # type: ignore[arg-type]


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves one connection's requests (keep-alive): resolve, model info and tree routes."""

    protocol_version = "HTTP/1.1"
    timeout = 30
    server: _Server

    # -- plumbing

    def log_message(self, format: str, *args: object) -> None:
        pass

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        record = RequestRecord(
            getattr(self, "command", None) or "",
            urllib.parse.unquote(getattr(self, "path", "").split("?", 1)[0]),
            self.headers.get("Range") if getattr(self, "headers", None) else None,
            int(code) if str(code).isdigit() else 0,
        )
        with self.server.hub._lock:
            self.server.hub._requests.append(record)

    def _send(self, status: int, headers: dict[str, str] | None = None, body: bytes = b"") -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, payload: object, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(payload).encode()
        self._send(status, {"Content-Type": "application/json; charset=utf-8", **(headers or {})}, body)

    def _error(
        self, status: int, code: str | None, message: str, headers: dict[str, str] | None = None
    ) -> None:
        extra = {"X-Error-Message": message, **(headers or {})}
        if code:
            extra["X-Error-Code"] = code
        self._json(status, {"error": message}, extra)

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_GET(self) -> None:
        self._dispatch()

    # -- routing

    def _dispatch(self) -> None:
        raw_path, _, query = self.path.partition("?")
        status = self.server.hub._take_failure(urllib.parse.unquote(raw_path))
        if status is not None:
            self._error(status, None, f"fakehub: injected failure {status}")
            return
        segments = [urllib.parse.unquote(s) for s in raw_path.split("/")[1:]]
        params = {k: v[-1] for k, v in urllib.parse.parse_qs(query).items()}
        if segments[:2] == ["api", "models"]:
            self._api(segments[2:], params, raw_path)
        elif len(segments) >= 4 and segments[2] == "resolve":
            self._resolve("/".join(segments[:2]), segments[3], "/".join(segments[4:]))
        elif len(segments) >= 3 and segments[1] == "resolve":
            self._resolve(segments[0], segments[2], "/".join(segments[3:]))
        else:
            self._error(404, None, "fakehub: no such route")

    def _repo_or_404(self, repo_id: str) -> _Repo | None:
        repo = self.server.hub._lookup(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", f"Repository not found: {repo_id}")
        return repo

    def _revision_or_404(self, repo_id: str, repo: _Repo, revision: str) -> _Snapshot | None:
        found = self.server.hub._resolve_revision(repo_id, repo, revision)
        if found is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return found

    def _api(self, rest: list[str], params: dict[str, str], raw_path: str) -> None:
        for i in (2, 1):  # owner/name first, then legacy one-part repo ids
            if len(rest) > i + 1 and rest[i] in ("tree", "revision"):
                repo_id, kind, revision, tail = "/".join(rest[:i]), rest[i], rest[i + 1], rest[i + 2 :]
                break
        else:
            if len(rest) not in (1, 2):
                self._error(404, None, "fakehub: no such route")
                return
            repo_id, kind, revision, tail = "/".join(rest), "revision", "main", []
        if kind == "revision" and tail:
            self._error(404, None, "fakehub: no such route")
            return
        repo = self._repo_or_404(repo_id)
        if repo is None:
            return
        found = self._revision_or_404(repo_id, repo, revision)
        if found is None:
            return
        commit, files = found
        if kind == "revision":
            self._json(200, self._model_info(repo_id, repo, commit, files, _true(params.get("blobs"))))
        else:
            self._tree(commit, files, "/".join(tail).strip("/"), params, raw_path)

    def _model_info(
        self, repo_id: str, repo: _Repo, commit: str, files: dict[str, _Blob], blobs: bool
    ) -> dict[str, object]:
        siblings: list[dict[str, object]] = []
        for path, blob in sorted(files.items()):
            sibling: dict[str, object] = {"rfilename": path}
            if blobs:
                sibling.update(size=blob.size, blobId=blob.git_oid)
                if blob.lfs:
                    sibling["lfs"] = {
                        "sha256": blob.sha256,
                        "size": blob.size,
                        "pointerSize": blob.pointer_size,
                    }
            siblings.append(sibling)
        return {
            "_id": _fake_sha1("id", repo_id)[:24],
            "id": repo_id,
            "modelId": repo_id,
            "author": repo_id.split("/")[0] if "/" in repo_id else None,
            "sha": commit,
            "lastModified": _DATE,
            "createdAt": _DATE,
            "private": False,
            "gated": "manual" if repo.gated else False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": ["gguf"],
            "library_name": "gguf",
            "siblings": siblings,
        }

    def _tree(
        self, commit: str, files: dict[str, _Blob], base: str, params: dict[str, str], raw_path: str
    ) -> None:
        recursive, expand = _true(params.get("recursive")), _true(params.get("expand"))
        prefix = base + "/" if base else ""
        dirs: set[str] = set()
        entries: list[dict[str, object]] = []
        for path, blob in files.items():
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix) :].split("/")
            if len(parts) > 1:
                depth = len(parts) if recursive else 2
                dirs.update(prefix + "/".join(parts[:i]) for i in range(1, depth))
                if not recursive:
                    continue
            entry: dict[str, object] = {"type": "file", "oid": blob.git_oid, "size": blob.size, "path": path}
            if blob.lfs:
                entry["lfs"] = {"oid": blob.sha256, "size": blob.size, "pointerSize": blob.pointer_size}
            entries.append(entry)
        if base and not entries and not dirs:
            self._error(404, "EntryNotFound", f"{base} does not exist on {commit}", {"X-Repo-Commit": commit})
            return
        for d in dirs:
            entries.append({"type": "directory", "oid": _fake_sha1("tree", commit, d), "size": 0, "path": d})
        entries.sort(key=lambda e: str(e["path"]))
        if expand:
            for entry in entries:
                entry["lastCommit"] = {"id": commit, "title": "fakehub commit", "date": _DATE}
        page_size = max(1, self.server.hub.tree_page_size)
        start = int(params.get("cursor", "0") or 0)
        headers = {}
        if start + page_size < len(entries):
            next_params = {**params, "cursor": str(start + page_size)}
            next_url = f"{self.server.hub.url}{raw_path}?{urllib.parse.urlencode(next_params)}"
            headers["Link"] = f'<{next_url}>; rel="next"'
        self._json(200, entries[start : start + page_size], headers)

    # -- file content

    def _resolve(self, repo_id: str, revision: str, path: str) -> None:
        repo = self._repo_or_404(repo_id)
        if repo is None:
            return
        if repo.gated:
            auth = self.headers.get("Authorization", "")
            token = auth[7:].strip() if auth.lower().startswith("bearer ") else None
            if token is None:
                message = f"Access to model {repo_id} is restricted. You must be authenticated to access it."
                self._error(401, "GatedRepo", message)
                return
            if token != repo.token:
                message = f"Access to model {repo_id} is restricted and you are not in the authorized list."
                self._error(403, "GatedRepo", message)
                return
        found = self._revision_or_404(repo_id, repo, revision)
        if found is None:
            return
        commit, files = found
        blob = files.get(path)
        if blob is None:
            self._error(404, "EntryNotFound", f"Entry not found: {path}", {"X-Repo-Commit": commit})
            return
        etag = f'"{blob.sha256}"' if blob.lfs else f'"{blob.git_oid}"'
        name = urllib.parse.quote(path.rsplit("/", 1)[-1])
        headers = {
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
            "ETag": etag,
            "X-Repo-Commit": commit,
            "Content-Disposition": f"inline; filename*=UTF-8''{name}; filename=\"{name}\"",
        }
        if blob.lfs:
            headers.update({"X-Linked-Etag": etag, "X-Linked-Size": str(blob.size)})
        with self.server.hub._lock:
            ignore = self.server.hub._ignore_ranges
        span = None if ignore else _parse_range(self.headers.get("Range"), blob.size)
        if span is False:
            self._send(416, {**headers, "Content-Range": f"bytes */{blob.size}"})
            return
        start, end = span if isinstance(span, tuple) else (0, blob.size - 1)
        status = 206 if isinstance(span, tuple) else 200
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{end}/{blob.size}"
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        if self.command == "GET":
            sent = self._stream(blob, start, end - start + 1)
            with self.server.hub._lock:
                self.server.hub._served.append(Served(path, self.headers.get("Range"), sent))

    def _stream(self, blob: _Blob, start: int, length: int) -> int:
        """Write the body; returns the bytes that went out."""
        hub = self.server.hub
        request_path = urllib.parse.unquote(self.path.split("?", 1)[0])
        with hub._lock:
            cut, reset = hub._drops.pop(0) if hub._drops else (None, False)
            corrupt = any(s in request_path for s in hub._corrupt)
        sent = 0
        with blob.open() as source:
            source.seek(start)
            while sent < length:
                if cut is not None and sent >= cut:
                    self._hard_close(reset)
                    return sent
                with hub._lock:
                    rate = hub._throttle
                size = min(_CHUNK, length - sent)
                if rate:
                    size = min(size, max(1, int(rate / 20)))
                if cut is not None:
                    size = min(size, cut - sent)
                chunk = source.read(size)
                if not chunk:  # the file on disk shrank under us
                    self._hard_close(reset=False)
                    return sent
                if corrupt:
                    chunk = chunk.translate(_FLIP)
                with hub._lock:  # counted before the write: a client may see the bytes before we return
                    hub._body_bytes_sent += len(chunk)
                try:
                    self.wfile.write(chunk)
                except OSError:  # the client went away: this chunk did not make it
                    with hub._lock:
                        hub._body_bytes_sent -= len(chunk)
                    self.close_connection = True
                    return sent
                sent += len(chunk)
                if rate:
                    time.sleep(len(chunk) / rate)
        return sent

    def _hard_close(self, reset: bool) -> None:
        """End the connection mid-body, no more bytes: FIN now, or RST when the handler closes the socket."""
        self.close_connection = True
        if reset:  # linger 0: the close in finish() (rfile holds the last reference) sends RST, not FIN
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
            return
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _true(value: str | None) -> bool:
    return (value or "").lower() in ("1", "true", "yes")
