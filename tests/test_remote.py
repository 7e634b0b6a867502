"""Remote endpoints: `endpoint add/list/rm`, `@NAME/MODEL_ID` in complete/chat/list, and the faults a network brings.

Interop runs against a server we did not write (`python -m llama_cpp.server`, llama-cpp-python's own) on loopback.
Faults run against a small server written here (stdlib http.server in a thread) that misbehaves on cue: killed
mid-stream, 401, unknown model, 429/503 with Retry-After, a garbled stream, a slow stream for Ctrl-C.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from conftest import run_chatcli

from chatcli.errors import UsageError
from chatcli.registry import load_catalogue, parse_ref

# ---------------------------------------------------------------- a server that misbehaves on cue

Step = Callable[["_Handler", bool], None]


def _event(text: str | None, chat: bool, finish: str | None = None) -> bytes:
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
    if chat:
        choice["delta"] = {} if text is None else {"content": text}
    else:
        choice["text"] = text or ""
    body = {"id": "x", "object": "chat.completion.chunk" if chat else "text_completion", "created": 0,
            "model": "m", "choices": [choice]}
    return f"data: {json.dumps(body)}\n\n".encode()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - keep test output quiet
        pass

    def send_json(self, status: int, body: object, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def start_sse(self, chunked: bool = True) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:  # the body ends when the connection closes (HTTP/1.0 style)
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()

    def chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def end_chunks(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _authorized(self) -> bool:
        key = self.server.fault.key
        return key is None or self.headers.get("Authorization") == f"Bearer {key}"

    def do_GET(self) -> None:  # noqa: N802
        fault = self.server.fault
        if not self._authorized():
            self.send_json(401, {"error": {"message": "Invalid API key", "type": "invalid_request_error",
                                           "code": "invalid_api_key"}})
        elif self.path == "/v1/models":
            self.send_json(200, {"object": "list", "data": [{"id": m, "object": "model", "owned_by": "fault"}
                                                             for m in fault.models]})
        else:
            self.send_json(404, {"error": {"message": "no such route"}})

    def do_POST(self) -> None:  # noqa: N802
        fault = self.server.fault
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        fault.requests.append({"path": self.path, "body": body, "time": time.monotonic(),
                               "authorization": self.headers.get("Authorization")})
        if not self._authorized():
            self.send_json(401, {"error": {"message": "Invalid API key", "type": "invalid_request_error"}})
            return
        step = fault.plan.pop(0) if fault.plan else stream(["Hello", " world", "!"])
        try:
            step(self, self.path.endswith("/chat/completions"))
        except (BrokenPipeError, ConnectionResetError):  # the client went away (Ctrl-C): expected
            self.close_connection = True


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    fault: FaultServer


class FaultServer:
    """An OpenAI-compatible server on 127.0.0.1 that answers each POST with the next step of `plan`."""

    def __init__(self, models: tuple[str, ...] = ("m1", "m2"), key: str | None = None) -> None:
        self.models, self.key = list(models), key
        self.plan: list[Step] = []
        self.requests: list[dict[str, Any]] = []

    def __enter__(self) -> FaultServer:
        self.httpd = _Server(("127.0.0.1", 0), _Handler)
        self.httpd.fault = self
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def stream(parts: list[str], delay: float = 0.0, finish: str = "stop") -> Step:
    def step(h: _Handler, chat: bool) -> None:
        h.start_sse()
        for part in parts:
            h.chunk(_event(part, chat))
            time.sleep(delay)
        h.chunk(_event(None, chat, finish))
        h.chunk(b"data: [DONE]\n\n")
        h.end_chunks()
    return step


def status(code: int, body: object, headers: dict[str, str] | None = None) -> Step:
    return lambda h, chat: h.send_json(code, body, headers)


def killed_after(parts: list[str], chunked: bool) -> Step:
    """Some chunks, then the connection drops as when the server process dies (no end of body, no [DONE])."""
    def step(h: _Handler, chat: bool) -> None:
        h.start_sse(chunked)
        for part in parts:
            data = _event(part, chat)
            h.chunk(data) if chunked else (h.wfile.write(data), h.wfile.flush())
        time.sleep(0.1)
        h.connection.shutdown(socket.SHUT_RDWR)
        h.close_connection = True
    return step


def raw_stream(text: str) -> Step:
    def step(h: _Handler, chat: bool) -> None:
        h.start_sse()
        h.chunk(_event("Hel", chat))
        h.chunk(text.encode())
        h.chunk(b"data: [DONE]\n\n")
        h.end_chunks()
    return step


@pytest.fixture
def fault() -> Iterator[FaultServer]:
    with FaultServer() as server:
        assert run_chatcli("endpoint", "add", "f", server.url).returncode == 0
        yield server


def turns_of_latest() -> list[Any]:
    from chatcli.history import History

    with History() as history:
        latest = history.latest()
        assert latest is not None
        return history.turns(latest.id)


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


# ---------------------------------------------------------------- endpoint add / list / rm


def test_endpoint_add_list_rm_round_trip_keeps_no_key(chatcli, home: Path) -> None:
    added = chatcli("endpoint", "add", "box", "http://gpu-box:8000/", "--api-key-env", "BOX_KEY",
                    env={"BOX_KEY": "sk-secret-123"})
    assert added.returncode == 0, added.stderr
    path = home / "config" / "endpoints.toml"
    assert path.stat().st_mode & 0o777 == 0o600
    assert "sk-secret-123" not in path.read_text() and "BOX_KEY" in path.read_text()
    listed = chatcli("endpoint", "list", "--json", env={"BOX_KEY": "sk-secret-123"})
    assert json.loads(listed.stdout) == [{"name": "box", "url": "http://gpu-box:8000", "api_base":
                                          "http://gpu-box:8000/v1", "api_key_env": "BOX_KEY", "api_key_set": True,
                                          "source": "endpoints.toml"}]
    assert "sk-secret" not in listed.stdout
    assert chatcli("endpoint", "add", "box", "http://other:1").returncode == 2  # no silent replacement
    assert chatcli("endpoint", "rm", "box").returncode == 0
    assert json.loads(chatcli("endpoint", "list", "--json").stdout) == []
    gone = chatcli("endpoint", "rm", "box")
    assert gone.returncode == 2 and "no endpoint named 'box'" in one_error_line(gone.stderr)


@pytest.mark.parametrize("name, url, says", [
    ("a/b", "http://x:1", "invalid endpoint name"),
    ("@x", "http://x:1", "invalid endpoint name"),
    ("ok", "ftp://x", "expected http://"),
    ("ok", "x:8000", "expected http://"),
    ("ok", "http://user:pw@x:1", "must not hold credentials"),
    ("ok", "http://x:port", "invalid endpoint URL"),
    ("ok", "http://x:1/v1?key=1", "no ?query"),
])
def test_endpoint_add_refuses_bad_names_and_urls(chatcli, name: str, url: str, says: str) -> None:
    result = chatcli("endpoint", "add", name, url)
    assert result.returncode == 2 and says in one_error_line(result.stderr)


def test_endpoint_add_refuses_a_key_where_a_variable_name_belongs(chatcli) -> None:
    result = chatcli("endpoint", "add", "box", "http://x:1", "--api-key-env", "sk-abc123")
    assert result.returncode == 2 and "NAME of an environment variable" in one_error_line(result.stderr)


def test_remote_references_parse() -> None:
    catalogue = load_catalogue()
    ref = parse_ref("@box/meta-llama/Llama-3.1-8B:q4", catalogue)
    assert (ref.kind, ref.endpoint, ref.remote_model, ref.display) == (
        "remote", "box", "meta-llama/Llama-3.1-8B:q4", "@box/meta-llama/Llama-3.1-8B:q4")
    assert parse_ref("@box", catalogue).remote_model is None
    with pytest.raises(UsageError):
        parse_ref("@bad name/x", catalogue)


def test_openai_variables_make_an_implicit_endpoint(chatcli) -> None:
    with FaultServer(key="sk-env") as server:
        env = {"OPENAI_BASE_URL": server.url + "/v1", "OPENAI_API_KEY": "sk-env"}
        listed = json.loads(chatcli("endpoint", "list", "--json", env=env).stdout)
        assert [(e["name"], e["api_base"], e["source"]) for e in listed] == [
            ("openai", server.url + "/v1", "environment")]
        result = chatcli("complete", "-m", "@openai/m2", "Say hi", env=env)
        assert result.returncode == 0, result.stderr
        assert result.stdout == "Hello world!"
        assert server.requests[-1]["body"]["model"] == "m2"
        assert server.requests[-1]["authorization"] == "Bearer sk-env"


def test_unknown_endpoint_says_how_to_add_it(chatcli) -> None:
    result = chatcli("complete", "-m", "@nowhere/x", "hi")
    assert result.returncode == 1 and "chatcli endpoint add nowhere URL" in one_error_line(result.stderr)


# ---------------------------------------------------------------- what reaches the server


def test_complete_sends_the_raw_prompt_flags_stop_and_schema(fault: FaultServer, chatcli) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    # The first form of response_format (OpenAI's json_schema) refused, as llama-cpp-python's server does: the
    # llama.cpp form follows.
    fault.plan = [status(422, {"detail": [{"loc": ["body", "response_format"], "msg": "bad"}]}),
                  stream(['{"a": 1}'])]
    result = chatcli("complete", "-m", "@f/m1", "-n", "5", "--temperature", "0", "--top-k", "7", "--seed", "3",
                     "--stop", "END", "--json-schema", json.dumps(schema), "--json", input="stdin text")
    assert result.returncode == 0, result.stderr
    first, second = (r["body"] for r in fault.requests)
    assert fault.requests[0]["path"] == "/v1/completions"
    assert first["prompt"] == "stdin text" and first["model"] == "m1" and first["stream"] is True
    assert (first["max_tokens"], first["temperature"], first["top_k"], first["seed"], first["stop"]) == (
        5, 0.0, 7, 3, ["END"])
    assert "min_p" not in first  # left at chatcli's default: not sent, so OpenAI itself would not refuse it
    assert first["response_format"]["type"] == "json_schema"
    assert second["response_format"] == {"type": "json_object", "schema": schema}
    summary = json.loads(result.stdout)
    assert summary["text"] == '{"a": 1}' and summary["model"] == "@f/m1" and summary["finish_reason"] == "stop"


def test_complete_chat_sends_messages_not_a_rendered_prompt(fault: FaultServer, chatcli) -> None:
    result = chatcli("complete", "-m", "@f", "--chat", "-s", "Be brief.", "Hi there")
    assert result.returncode == 0, result.stderr
    request = fault.requests[-1]
    assert request["path"] == "/v1/chat/completions"
    assert request["body"]["messages"] == [{"role": "system", "content": "Be brief."},
                                           {"role": "user", "content": "Hi there"}]
    assert request["body"]["model"] == "m1"  # @f alone: the server's first model
    assert result.stdout == "Hello world!"


def test_context_overflow_exits_3_and_chat_drops_the_oldest_exchange(fault: FaultServer, chatcli) -> None:
    too_long = status(400, {"error": {"message": "This model's maximum context length is 64 tokens",
                                      "type": "invalid_request_error", "code": "context_length_exceeded"}})
    fault.plan = [too_long]
    result = chatcli("complete", "-m", "@f/m1", "long prompt")
    assert result.returncode == 3 and "maximum context length" in one_error_line(result.stderr)

    fault.plan = [stream(["one"]), too_long, stream(["two"])]
    chat = chatcli("chat", "-m", "@f/m1", input="first\nsecond\n")
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.splitlines() == ["one", "two"]
    sent = [r["body"]["messages"] for r in fault.requests[1:]]
    assert [len(m) for m in sent] == [1, 3, 1]  # the second try leaves out the first exchange
    assert "oldest turns no longer fit" in chat.stderr


# ---------------------------------------------------------------- faults


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked-body-cut", "stream-closed-without-finish"])
def test_server_killed_mid_stream_keeps_the_partial_reply(fault: FaultServer, chatcli, chunked: bool) -> None:
    fault.plan = [killed_after(["Hello", " wor"], chunked)]
    result = chatcli("chat", "-m", "@f/m1", input="hi\nnever sent\n")
    assert result.returncode == 1
    line = one_error_line(result.stderr)
    assert fault.url in line and ("broke mid-reply" in line or "before the reply was finished" in line)
    assert result.stdout.startswith("Hello wor")
    turns = turns_of_latest()
    assert [(t.role, t.content) for t in turns] == [("user", "hi"), ("assistant", "Hello wor")]
    assert turns[-1].finish_reason == "interrupted"
    assert len(fault.requests) == 1  # the piped chat stopped there


def test_connection_refused_names_the_url(chatcli) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert chatcli("endpoint", "add", "gone", f"http://127.0.0.1:{port}").returncode == 0
    for args in (["complete", "-m", "@gone/x", "hi"], ["chat", "-m", "@gone"], ["list", "--endpoint", "gone"]):
        result = chatcli(*args, input="hi\n")
        assert result.returncode == 1, args
        line = one_error_line(result.stderr)
        assert f"http://127.0.0.1:{port}/v1" in line and "connection refused" in line


def test_401_names_the_api_key_variable(chatcli) -> None:
    with FaultServer(key="right") as server:
        assert chatcli("endpoint", "add", "k", server.url, "--api-key-env", "BOX_KEY").returncode == 0
        wrong = chatcli("complete", "-m", "@k/m1", "hi", env={"BOX_KEY": "wrong"})
        assert wrong.returncode == 1 and "refused the API key in $BOX_KEY" in one_error_line(wrong.stderr)
        unset = chatcli("complete", "-m", "@k/m1", "hi")
        assert unset.returncode == 1 and "set $BOX_KEY" in one_error_line(unset.stderr)
        right = chatcli("complete", "-m", "@k/m1", "hi", env={"BOX_KEY": "right"})
        assert right.returncode == 0 and right.stdout == "Hello world!"
        assert chatcli("endpoint", "add", "nokey", server.url).returncode == 0
        none = chatcli("complete", "-m", "@nokey/m1", "hi")
        assert none.returncode == 1 and "--api-key-env VAR" in one_error_line(none.stderr)


def test_unknown_model_lists_what_the_server_has(fault: FaultServer, chatcli) -> None:
    result = chatcli("complete", "-m", "@f/nope", "hi")
    assert result.returncode == 1
    assert "has no model 'nope'; it has: m1, m2" in one_error_line(result.stderr)
    assert fault.requests == []  # found out before sending anything


def test_busy_server_is_retried_after_retry_after(fault: FaultServer, chatcli) -> None:
    busy = {"error": {"message": "busy"}}
    fault.plan = [status(429, busy, {"Retry-After": "0.3"}), status(503, busy, {"Retry-After": "0.3"})]
    result = chatcli("complete", "-m", "@f/m1", "hi")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "Hello world!"
    times = [r["time"] for r in fault.requests]
    assert len(times) == 3 and all(b - a >= 0.3 for a, b in zip(times, times[1:], strict=False))
    assert "retrying in 0.3s" in result.stderr


def test_busy_server_gives_up_after_bounded_retries(fault: FaultServer, chatcli) -> None:
    busy = {"error": {"message": "busy"}}
    fault.plan = [status(503, busy, {"Retry-After": "0"}) for _ in range(10)]
    result = chatcli("complete", "-m", "@f/m1", "hi")
    assert result.returncode == 1 and "still busy (503) after 3 retries" in one_error_line(result.stderr)
    assert len(fault.requests) == 4
    fault.plan, fault.requests = [status(429, busy, {"Retry-After": "3600"})], []
    started = time.monotonic()
    result = chatcli("complete", "-m", "@f/m1", "hi")
    assert result.returncode == 1 and "asks to wait 3600s" in one_error_line(result.stderr)
    assert len(fault.requests) == 1 and time.monotonic() - started < 60


@pytest.mark.parametrize("garbage", ["data: {not json\n\n", 'data: {"choices": 5}\n\n'])
def test_malformed_stream_is_one_clear_error(fault: FaultServer, chatcli, garbage: str) -> None:
    fault.plan = [raw_stream(garbage)]
    result = chatcli("complete", "-m", "@f/m1", "hi")
    assert result.returncode == 1 and "malformed stream" in one_error_line(result.stderr)
    assert result.stdout == "Hel"  # what arrived before it is kept


def _interrupt_when(proc: subprocess.Popen[bytes], marker: bytes, deadline: float = 60) -> bytes:
    """Read the child's stdout until `marker` shows, then send it SIGINT (a user's Ctrl-C)."""
    assert proc.stdout is not None
    seen = b""
    end = time.monotonic() + deadline
    while marker not in seen and time.monotonic() < end:
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            data = os.read(proc.stdout.fileno(), 4096)
            if not data:
                break
            seen += data
    assert marker in seen, seen
    proc.send_signal(signal.SIGINT)
    return seen


@pytest.mark.parametrize("command", ["chat", "complete"])
def test_ctrl_c_mid_stream_exits_130_and_keeps_the_partial_reply(fault: FaultServer, command: str) -> None:
    fault.plan = [stream(["tick "] * 400, delay=0.05)]
    args = ["chat", "-m", "@f/m1"] if command == "chat" else ["complete", "-m", "@f/m1", "hi"]
    with subprocess.Popen([sys.executable, "-m", "chatcli", *args], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=os.environ.copy()) as proc:
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        proc.stdin.write(b"hello\n")
        proc.stdin.close()
        seen = _interrupt_when(proc, b"tick tick ")
        rest, stderr = proc.stdout.read(), proc.stderr.read()
        assert proc.wait(timeout=30) == 130, stderr
    assert b"Traceback" not in stderr and b"interrupted" in stderr
    shown = (seen + rest).decode().strip()
    assert shown.startswith("tick tick") and shown.count("tick") < 400
    if command == "chat":
        reply = turns_of_latest()[-1]
        assert reply.role == "assistant" and reply.finish_reason == "interrupted"
        assert reply.content.startswith("tick tick") and reply.content.count("tick") < 400


def test_local_runs_and_help_never_import_the_sdk(tiny_gpt2: Path) -> None:
    from test_lazy_imports import import_tree, loaded

    assert "openai" not in loaded(import_tree("--help"))
    assert "openai" not in loaded(import_tree("complete", "-m", str(tiny_gpt2), "hi", "-n", "2"))


# ---------------------------------------------------------------- against llama-cpp-python's own server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _llama_server(model: Path, log: Path, n_ctx: int = 512) -> Iterator[str]:
    """`python -m llama_cpp.server` on a free loopback port; its log goes to a file (a pipe nobody reads fills up
    with llama.cpp's load log and blocks the server)."""
    import urllib.request

    port = _free_port()
    log_file = log.open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--host", "127.0.0.1",
                             "--port", str(port), "--n_ctx", str(n_ctx)],
                            stdout=log_file, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(url + "/v1/models", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                if proc.poll() is not None or time.monotonic() > end:
                    pytest.fail(f"llama_cpp.server did not start: {log.read_text(errors='replace')[-2000:]}")
                time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log_file.close()


@pytest.fixture(scope="module")
def llama_server(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from _llama_server(tiny_llama, tmp_path_factory.mktemp("llama-server") / "log")


@pytest.fixture
def local(llama_server: str) -> str:
    assert run_chatcli("endpoint", "add", "local", llama_server).returncode == 0
    return llama_server


def test_complete_streams_llama_cpp_servers_answer(local: str, chatcli) -> None:
    import openai

    result = chatcli("complete", "-m", "@local", "-n", "12", "--temperature", "0", "--json", "Once upon a time")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["finish_reason"] == "length" and summary["completion_tokens"] == 12
    client = openai.OpenAI(base_url=local + "/v1", api_key="x")
    model = client.models.list().data[0].id
    direct = client.completions.create(model=model, prompt="Once upon a time", max_tokens=12, temperature=0)
    assert summary["text"] == direct.choices[0].text  # the streamed pieces add up to the server's own answer
    text = chatcli("complete", "-m", f"@local/{model}", "-n", "12", "--temperature", "0", "Once upon a time")
    assert text.returncode == 0 and text.stdout == direct.choices[0].text


def test_chat_with_llama_cpp_server_is_stored_and_continued(local: str, chatcli) -> None:
    result = chatcli("chat", "-m", "@local", "-n", "6", "--temperature", "0", input="hello\nand again\n")
    assert result.returncode == 0, result.stderr
    turns = turns_of_latest()
    assert [t.role for t in turns] == ["user", "assistant"] * 2
    assert [t.content for t in turns if t.role == "user"] == ["hello", "and again"]
    assert all(t.finish_reason in ("stop", "length") and t.model == "@local" for t in turns if t.role == "assistant")
    again = chatcli("chat", "--continue", "-n", "4", "--temperature", "0", input="third\n")
    assert again.returncode == 0, again.stderr
    assert [t.content for t in turns_of_latest() if t.role == "user"] == ["hello", "and again", "third"]


def test_list_endpoint_shows_the_servers_model(local: str, tiny_llama: Path, chatcli) -> None:
    rows = json.loads(chatcli("list", "--endpoint", "local", "--json").stdout)
    assert [r["id"] for r in rows] == [str(tiny_llama)]
    assert rows[0]["reference"] == f"@local/{tiny_llama}"
    table = chatcli("list", "--endpoint", "@local")
    assert table.returncode == 0 and str(tiny_llama) in table.stdout


@pytest.mark.real_model
def test_smollm2_behind_llama_cpp_server_answers_in_chat_and_json(smollm2: Path, tmp_path: Path, chatcli) -> None:
    for url in _llama_server(smollm2, tmp_path / "log", n_ctx=2048):
        assert chatcli("endpoint", "add", "smol", url).returncode == 0
        answer = chatcli("complete", "-m", "@smol", "--chat", "-n", "20", "--temperature", "0",
                         "What is the capital of France? Answer in one word.")
        assert answer.returncode == 0, answer.stderr
        assert "Paris" in answer.stdout
        schema = {"type": "object", "properties": {"capital": {"type": "string"}}, "required": ["capital"]}
        shaped = chatcli("complete", "-m", "@smol", "--chat", "-n", "40", "--temperature", "0",
                         "--json-schema", json.dumps(schema), "What is the capital of France? Reply in JSON.")
        assert shaped.returncode == 0, shaped.stderr
        assert isinstance(json.loads(shaped.stdout)["capital"], str)
