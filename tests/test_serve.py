"""`chatcli serve`: a real uvicorn server in a subprocess, real llama.cpp on tiny models, the official openai SDK.

Two tiny models are served: `tiny-llama.gguf` (256-token context) for quick answers, and `roomy-llama.gguf`
(the same shape with a 4,096-token context) for requests that must keep the model busy for seconds. Random
weights end a reply early (EOS) on their own; a grammar that never completes (`FOREVER`) keeps them going to
max_tokens: 4,000 tokens take the roomy model several seconds on one thread.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import openai
import pytest
from ggufgen import CHATML_TEMPLATE, make_llama

from chatcli.engine import LlamaEngine

TINY = "tiny-llama.gguf"
ROOMY = "roomy-llama.gguf"
KEY = "s3cret-test-key"
FOREVER = {"grammar": "root ::= [a-z ] root"}  # llama.cpp's `grammar` extension; no end, so no EOS


@dataclass
class ServerProcess:
    proc: subprocess.Popen[str]
    port: int
    stderr: list[str] = field(default_factory=list)
    clients: list[openai.OpenAI] = field(default_factory=list)
    reader: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def client(self, api_key: str = "none") -> openai.OpenAI:
        """A client closed with the server (one per key: it is thread-safe and keeps a connection pool)."""
        for client in self.clients:
            if client.api_key == api_key:
                return client
        self.clients.append(openai.OpenAI(base_url=self.url, api_key=api_key, max_retries=0, timeout=60))
        return self.clients[-1]

    def raw(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
            ) -> tuple[int, dict[str, str], bytes]:
        """One request on its own connection (http.client: bodies the SDK would never send)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
            response = conn.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            conn.close()


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE", "CHATCLI_"))}
    env.update(CHATCLI_HOME=str(home), HF_HOME=str(home / "hf"), HF_HUB_DISABLE_TELEMETRY="1",
               HF_ENDPOINT="http://127.0.0.1:9")
    return env


def start_server(args: list[str], env: dict[str, str], timeout: float = 60) -> ServerProcess:
    proc = subprocess.Popen([sys.executable, "-m", "chatcli", "serve", "--port", "0", *args], env=env, text=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    port = None
    while port is None:
        line = proc.stderr.readline()
        if not line or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("the server did not start:\n" + "".join(lines) + (proc.stderr.read() or ""))
        lines.append(line)
        match = re.search(r"at http://127\.0\.0\.1:(\d+)/v1", line)
        port = int(match.group(1)) if match else None
    server = ServerProcess(proc, port, lines)
    stream = proc.stderr
    server.reader = threading.Thread(target=lambda: server.stderr.extend(iter(stream.readline, "")), daemon=True)
    server.reader.start()
    return server


def stop_server(server: ServerProcess) -> None:
    for client in server.clients:
        client.close()
    alive = server.proc.poll() is None
    server.proc.terminate()
    try:
        server.proc.wait(10)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait()
    if server.reader is not None:
        server.reader.join(5)
    assert server.proc.stderr is not None
    server.proc.stderr.close()
    assert alive, "the server died during the tests:\n" + "".join(server.stderr)


@pytest.fixture(scope="module")
def roomy_llama(models_dir: Path) -> Path:
    return make_llama(models_dir / ROOMY, n_ctx=8192, chat_template=CHATML_TEMPLATE, name="roomy-llama")


@pytest.fixture(scope="module")
def server(tiny_llama: Path, roomy_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    env = _env(tmp_path_factory.mktemp("serve-home"))
    process = start_server(["-m", str(tiny_llama), "-m", str(roomy_llama), "--threads", "1"], env)
    yield process
    stop_server(process)


@pytest.fixture(scope="module")
def keyed_server(roomy_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """An API key, and room for one waiting request only."""
    env = _env(tmp_path_factory.mktemp("serve-home-keyed"))
    process = start_server(["-m", str(roomy_llama), "--threads", "1", "--queue", "1"], {**env, "CHATCLI_API_KEY": KEY})
    yield process
    stop_server(process)


def chat_text(client: openai.OpenAI, content: str, model: str = TINY, **kwargs: object) -> str:
    kwargs.setdefault("temperature", 0)
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                            stream=True, **kwargs)  # type: ignore[call-overload]
    return "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)


# ---------------------------------------------------------------- the OpenAI API, through the SDK


def test_lists_the_models_served_by_their_given_names(server: ServerProcess) -> None:
    models = server.client().models.list()
    assert [m.id for m in models.data] == [TINY, ROOMY]
    assert {m.owned_by for m in models.data} == {"chatcli"}
    assert server.client().models.retrieve(TINY).id == TINY


def test_streams_a_chat_completion_the_same_as_a_whole_one(server: ServerProcess) -> None:
    client = server.client()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    chunks = list(client.chat.completions.create(model=TINY, messages=messages, stream=True, temperature=0,  # type: ignore
                                                 max_tokens=12, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert len({c.id for c in chunks}) == 1
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert chunks[-1].usage is not None and not chunks[-1].choices

    whole = client.chat.completions.create(model=TINY, messages=messages, temperature=0, max_tokens=12)  # type: ignore
    assert whole.object == "chat.completion"
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].message.content == streamed
    assert finishes == [whole.choices[0].finish_reason]
    assert whole.usage is not None
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert 0 < whole.usage.completion_tokens <= 12


def test_completion_reports_usage_and_finish_reason(server: ServerProcess, roomy_llama: Path) -> None:
    result = server.client().completions.create(model=ROOMY, prompt="Once upon a time", max_tokens=5,
                                                temperature=0)
    assert result.object == "text_completion"
    usage = result.usage
    assert usage is not None
    engine = LlamaEngine(roomy_llama, n_ctx=64, n_threads=1)
    try:
        assert usage.prompt_tokens == len(engine.tokenize("Once upon a time"))  # with the BOS token
    finally:
        engine.close()
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    choice = result.choices[0]
    assert (choice.finish_reason, usage.completion_tokens) in (("length", 5), ("stop", usage.completion_tokens))
    streamed = server.client().completions.create(model=ROOMY, prompt="Once upon a time", max_tokens=5,
                                                  temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == choice.text


def test_honours_max_tokens_and_stop_strings(server: ServerProcess) -> None:
    client = server.client()
    full = client.completions.create(model=ROOMY, prompt="The weather today", max_tokens=24, temperature=0)
    text = full.choices[0].text
    assert full.choices[0].finish_reason == "length" and full.usage and full.usage.completion_tokens == 24
    short = client.completions.create(model=ROOMY, prompt="The weather today", max_tokens=3, temperature=0)
    assert short.usage and short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"
    assert text.startswith(short.choices[0].text)

    stop = text[len(text) // 2:len(text) // 2 + 3]
    assert stop.strip(), f"pick another prompt: {text!r}"
    stopped = client.completions.create(model=ROOMY, prompt="The weather today", max_tokens=24, temperature=0,
                                        stop=[stop, "never appears"])
    assert stopped.choices[0].text == text[:text.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"


def test_response_format_json_schema_constrains_the_reply(server: ServerProcess) -> None:
    schema = {"type": "object", "properties": {"colour": {"enum": ["red", "green"]}}, "required": ["colour"],
              "additionalProperties": False}
    reply = server.client().chat.completions.create(
        model=TINY, messages=[{"role": "user", "content": "Pick a colour"}], temperature=0, max_tokens=40,
        response_format={"type": "json_schema", "json_schema": {"name": "pick", "schema": schema}})
    assert json.loads(reply.choices[0].message.content or "")["colour"] in ("red", "green")


def test_unknown_model_is_404_naming_the_served_ones(server: ServerProcess) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        server.client().chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    error = caught.value.body
    assert isinstance(error, dict)
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert TINY in error["message"] and ROOMY in error["message"]


def test_wrong_types_are_400_in_openai_shape(server: ServerProcess) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        server.client().chat.completions.create(model=TINY, messages=[{"role": "user", "content": "hi"}],
                                                temperature="hot")  # type: ignore[arg-type]
    assert isinstance(caught.value.body, dict) and caught.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as caught:
        server.client().chat.completions.create(model=TINY, messages=[{"role": "user", "content": "hi"}],
                                                temperature=9)
    assert isinstance(caught.value.body, dict) and caught.value.body["param"] == "temperature"


def test_bad_json_is_400_in_openai_shape(server: ServerProcess) -> None:
    status, headers, body = server.raw("POST", "/v1/chat/completions", b'{"model": "tiny-llama.gguf", "messages": [')
    assert status == 400
    assert headers["content-type"] == "application/json"
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "code", "param"}
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_json"


def test_serves_nothing_else_and_sends_no_cors_headers(server: ServerProcess) -> None:
    for path in ("/", "/v1/../etc/passwd", "/static/x", "/docs", "/openapi.json"):
        status, _, body = server.raw("GET", path)
        assert status == 404 and json.loads(body)["error"]["code"] == "not_found", path
    status, headers, _ = server.raw("GET", "/v1/models", headers={"Origin": "https://evil.example"})
    assert status == 200 and not any(h.startswith("access-control-") for h in headers)
    # DNS rebinding: a page whose name resolves to 127.0.0.1 still sends its own Host
    status, _, _ = server.raw("GET", "/v1/models", headers={"Host": "evil.example:8080"})
    assert status == 403


def test_a_wrong_api_key_is_401(keyed_server: ServerProcess) -> None:
    with pytest.raises(openai.AuthenticationError) as caught:
        keyed_server.client(api_key="wrong").models.list()
    assert isinstance(caught.value.body, dict) and caught.value.body["code"] == "invalid_api_key"
    status, _, _ = keyed_server.raw("GET", "/v1/models")
    assert status == 401
    assert [m.id for m in keyed_server.client(api_key=KEY).models.list().data] == [ROOMY]


# ---------------------------------------------------------------- one model, many clients


def test_concurrent_streams_get_their_own_output_in_arrival_order(server: ServerProcess) -> None:
    client = server.client()
    prompts = [f"Client {i} asks about topic {i * 7}" for i in range(8)]
    # Random weights answer every prompt with the same greedy text: each client's grammar makes its answer
    # start with its own name, then go on for 100 tokens (~0.1 s, long enough for the order to show in the
    # clients' clocks). Greedy, because a sampled token can flip on the last bits of a logit, and those depend
    # on where earlier requests left things in the KV cache.
    sampling: list[dict] = [dict(temperature=0, max_tokens=100,
                                 extra_body={"grammar": f'root ::= "client {i} says " tail\ntail ::= [a-z ] tail'})
                            for i in range(8)]
    alone = [chat_text(client, p, model=ROOMY, **sampling[i]) for i, p in enumerate(prompts)]
    assert len(set(alone)) == 8, alone

    results: dict[int, str] = {}
    first_at: dict[int, float] = {}

    def read(i: int, stream: openai.Stream) -> None:
        parts = []
        for chunk in stream:
            first_at.setdefault(i, time.monotonic())
            parts.append(chunk.choices[0].delta.content or "" if chunk.choices else "")
        results[i] = "".join(parts)

    # A long request holds the model while the eight arrive and wait. A stream's headers come back once the
    # request has its place in the queue, so each is sent after the one before it has arrived.
    blocker = client.chat.completions.create(model=ROOMY, messages=[{"role": "user", "content": "go on"}],
                                             stream=True, temperature=0, max_tokens=4000, extra_body=FOREVER)
    next(iter(blocker))
    threads = []
    for i, prompt in enumerate(prompts):
        stream = client.chat.completions.create(model=ROOMY, messages=[{"role": "user", "content": prompt}],
                                                stream=True, **sampling[i])
        threads.append(threading.Thread(target=read, args=(i, stream)))
        threads[-1].start()
    assert not first_at  # all eight are waiting
    blocker.close()
    for thread in threads:
        thread.join(60)
    assert all(alone[i].startswith(f"client {i} says ") for i in range(8))
    assert [results.get(i) for i in range(8)] == alone
    # Each begins ~0.1 s of generation after the one before it (the ends show less: a client's thread parses
    # its chunks later than the server sends them).
    assert sorted(range(8), key=lambda i: first_at[i]) == list(range(8))


def test_a_full_queue_answers_503_with_retry_after(keyed_server: ServerProcess) -> None:
    client = keyed_server.client(api_key=KEY)
    messages = [{"role": "user", "content": "go on"}]
    running = client.chat.completions.create(model=ROOMY, messages=messages, stream=True, max_tokens=4000,  # type: ignore
                                             extra_body=FOREVER)
    next(iter(running))
    waiting_result: list[str] = []
    waiter = threading.Thread(target=lambda: waiting_result.append(chat_text(client, "hi", model=ROOMY, max_tokens=2)))
    waiter.start()
    time.sleep(0.3)
    try:
        with pytest.raises(openai.APIStatusError) as caught:
            client.chat.completions.create(model=ROOMY, messages=messages, max_tokens=2)  # type: ignore
        assert caught.value.status_code == 503
        assert int(caught.value.response.headers["retry-after"]) >= 1
        assert isinstance(caught.value.body, dict) and caught.value.body["code"] == "queue_full"
    finally:
        running.close()
    waiter.join(30)
    assert len(waiting_result) == 1  # the one that waited was served once the model was free


def test_a_client_that_disconnects_frees_the_model_within_a_second(server: ServerProcess) -> None:
    client = server.client()
    stream = client.chat.completions.create(model=ROOMY, messages=[{"role": "user", "content": "go on"}],
                                            stream=True, temperature=0, max_tokens=4000, extra_body=FOREVER)
    chunks = iter(stream)
    for _ in range(3):
        next(chunks)
    stream.close()  # the connection closes with 8,000 tokens still to generate (several seconds of work)
    started = time.monotonic()
    reply = client.chat.completions.create(model=ROOMY, messages=[{"role": "user", "content": "hi"}], max_tokens=1)
    assert reply.usage and reply.usage.completion_tokens <= 1
    assert time.monotonic() - started < 1.0


# ---------------------------------------------------------------- hostile input


def _malformed_requests() -> list[tuple[str, bytes]]:
    chat, comp = "/v1/chat/completions", "/v1/completions"
    ok_messages = [{"role": "user", "content": "hi"}]

    def chat_body(**fields: object) -> bytes:
        return json.dumps({"model": TINY, "messages": ok_messages, **fields}).encode()

    cases = [
        (chat, b"{"), (chat, b"not json"), (chat, b""), (chat, b"[]"), (chat, b"null"), (chat, b"\xff\xfe"),
        (chat, b"[" * 100_000 + b"]" * 100_000), (comp, b'{"prompt": 5}'), (comp, b'{"model": "tiny-llama.gguf"}'),
        (comp, json.dumps({"model": TINY, "prompt": ["a", "b"]}).encode()),
        (chat, json.dumps({"model": TINY}).encode()),
        (chat, json.dumps({"model": 7, "messages": ok_messages}).encode()),
        (chat, json.dumps({"model": TINY, "messages": "hi"}).encode()),
        (chat, json.dumps({"model": TINY, "messages": [{"role": "wizard", "content": "hi"}]}).encode()),
        (chat, json.dumps({"model": TINY, "messages": [{"role": "user", "content": 3}]}).encode()),
        (chat, chat_body(messages=[{"role": "user", "content": [{"type": "image_url"}]}])),
        (chat, chat_body(temperature="hot")), (chat, chat_body(temperature=-1)), (chat, chat_body(top_p=0)),
        (chat, chat_body(max_tokens="many")), (chat, chat_body(max_tokens=-5)), (chat, chat_body(max_tokens=1.5)),
        (chat, chat_body(seed="x")), (chat, chat_body(stop=7)), (chat, chat_body(stop=[""])),
        (chat, chat_body(stop=["x"] * 100)), (chat, chat_body(stream="yes")), (chat, chat_body(n=3)),
        (chat, chat_body(top_k=True)), (chat, chat_body(response_format={"type": "xml"})),
        (chat, chat_body(response_format={"type": "json_schema", "json_schema": {"schema": 5}})),
        (chat, chat_body(messages=[{"role": "user", "content": "word " * 5000}])),  # longer than the context
    ]
    return [cases[i % len(cases)] for i in range(200)]


def test_survives_200_malformed_requests_with_4xx_answers(server: ServerProcess) -> None:
    for path, body in _malformed_requests():
        status, headers, answer = server.raw("POST", path, body)
        assert 400 <= status < 500, (path, body[:80], status, answer[:200])
        assert set(json.loads(answer)["error"]) == {"message", "type", "code", "param"}
    assert chat_text(server.client(), "still there?", max_tokens=2) is not None


def test_a_huge_max_tokens_is_capped_to_the_context(server: ServerProcess) -> None:
    reply = server.client().completions.create(model=TINY, prompt="Count:", max_tokens=10**12, temperature=0)
    assert reply.usage is not None
    assert reply.usage.prompt_tokens + reply.usage.completion_tokens <= 256


def test_a_10_mb_body_is_413_and_the_server_keeps_serving(server: ServerProcess) -> None:
    size = 10 * 1024 * 1024
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {size}\r\n\r\n".encode() + b" " * 65536)
        head = b""
        while b"request_too_large" not in head and (data := sock.recv(65536)):
            head += data
    assert head.startswith(b"HTTP/1.1 413"), head[:200]
    assert b'"request_too_large"' in head
    # Chunked, so no Content-Length to refuse it by: the body is counted as it comes.
    status, _, answer = server.raw("POST", "/v1/chat/completions", iter([b" " * 65536] * 160))  # type: ignore
    assert status == 413 and json.loads(answer)["error"]["code"] == "request_too_large"
    assert server.client().models.list().data


# ---------------------------------------------------------------- starting


def test_binding_all_interfaces_without_a_key_is_refused(chatcli, tiny_llama: Path) -> None:  # noqa: ANN001
    result = chatcli("serve", "-m", str(tiny_llama), "--host", "0.0.0.0", "--port", "0", timeout=30)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: refusing to listen on 0.0.0.0 without an API key")


def test_a_model_not_downloaded_is_refused_with_the_pull_hint(chatcli) -> None:  # noqa: ANN001
    result = chatcli("serve", "-m", "smollm2", "--port", "0", timeout=30)
    assert result.returncode == 1
    assert "chatcli pull smollm2" in result.stderr


@pytest.mark.real_model
def test_smollm2_stream_matches_complete(smollm2: Path, chatcli, home: Path) -> None:  # noqa: ANN001
    message = "What is the capital of France?"
    local = chatcli("complete", "-m", str(smollm2), "--chat", "--temperature", "0", "-n", "16", message)
    assert local.returncode == 0, local.stderr
    process = start_server(["-m", str(smollm2)], {**os.environ})
    try:
        served = chat_text(process.client(), message, model=smollm2.name, max_tokens=16)
    finally:
        stop_server(process)
    assert served and served == local.stdout
