"""`chatcli serve`: an OpenAI-compatible HTTP API (Starlette on uvicorn) over chatcli's own engine.

Why not `llama_cpp.server`: its chat formatter has no time or size budget (hostile GGUF templates) and it
streams through `create_completion(stream=True)`, which is quadratic (DESIGN.md). Here the sandboxed chat
templates, stop strings, grammars and the incremental decoder are the same ones `chatcli complete` uses.

Why Starlette and not FastAPI: every body is checked by hand so that each mistake is answered in OpenAI's
error shape (`{"error": {"message", "type", "code", "param"}}`); FastAPI's pydantic models and 422 answers
would have to be undone, and its OpenAPI pages would be served for nothing.

Concurrency: one llama.cpp context serves one request at a time. Each model has one worker thread and a
bounded FIFO queue; a request takes its place in the queue when it arrives (a full queue answers 503 with
Retry-After), its prompt is rendered and tokenised off the event loop, and the worker runs the head of the
queue once it is ready. Chunks travel back to the event loop through `call_soon_threadsafe`. When a client
goes away (or the server stops) its job is withdrawn from the queue or its Generation closed at the next
token, so the model is free for the next request at once.

This module never prints: it reports through the `log` callback it is handed.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import math
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from chatcli.engine import Engine, GenerationResult, InvalidSetting, SamplingOptions
from chatcli.errors import ChatcliError, ContextOverflowError, TemplateError, UsageError

if TYPE_CHECKING:
    from chatcli.chat_templates import ChatFormat
    from chatcli.registry import ModelRef
    from chatcli.serve_embeddings import ServedEmbedder

Log = Callable[[str], None]
EventKind = Literal["text", "done", "error"]

MAX_BODY_BYTES = 1024 * 1024
MAX_STOP_STRINGS = 16
_SEED_RANGE = 2**32 - 1  # SamplingOptions takes 0 <= seed < this; OpenAI clients send any int


# ---------------------------------------------------------------- errors


class ApiError(Exception):
    """An answer in OpenAI's error shape."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = headers or {}

    def payload(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "code": self.code, "param": self.param}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.payload(), status_code=self.status, headers=self.headers)


def _bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def _api_error(exc: BaseException) -> ApiError:
    """What a failure inside preparation or generation looks like to the client."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ContextOverflowError):
        return _bad(str(exc), param="messages", code="context_length_exceeded")
    if isinstance(exc, InvalidSetting):
        return _bad(str(exc), param=exc.name)
    if isinstance(exc, UsageError | TemplateError):  # a template may refuse the messages (roles must alternate)
        return _bad(str(exc))
    if isinstance(exc, ChatcliError):
        return ApiError(500, str(exc), type="server_error")
    return ApiError(500, f"internal error: {type(exc).__name__}", type="server_error")


def _shutting_down() -> ApiError:
    return ApiError(503, "the server is shutting down", type="server_error", code="shutting_down")


# ---------------------------------------------------------------- the queue and the worker


@dataclass
class Job:
    """One request's place in a model's queue and the channel its output comes back on."""

    worker: ModelWorker
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[tuple[EventKind, Any]] = field(default_factory=asyncio.Queue)
    tokens: list[int] = field(default_factory=list)
    options: SamplingOptions = field(default_factory=SamplingOptions)
    ready: bool = False  # rendered and tokenised; until then the worker waits for it (arrival order)
    cancelled: threading.Event = field(default_factory=threading.Event)
    _pending: list[tuple[EventKind, Any]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def emit(self, kind: EventKind, value: Any) -> None:
        """From the worker thread: hand an event to the request's coroutine.

        Events gather in `_pending` and the event loop is woken once per batch, not once per token: when it
        is busy, the tokens made meanwhile travel together (one wake-up, one SSE chunk).
        """
        with self._lock:
            self._pending.append((kind, value))
            if len(self._pending) > 1:
                return  # a wake-up is on its way and will take this one too
        try:
            self.loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the event loop is gone (server stopped): nobody is listening
            self.cancelled.set()

    def _deliver(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        texts = [value for kind, value in pending if kind == "text"]
        if texts:
            self.events.put_nowait(("text", "".join(texts)))
        for event in pending:
            if event[0] != "text":
                self.events.put_nowait(event)

    def cancel(self) -> None:
        """Give up the place in the queue, or stop generating at the next token. Harmless when finished."""
        self.worker.withdraw(self)


class ModelWorker:
    """Runs one model's requests one at a time, in arrival order, in its own thread."""

    def __init__(self, engine: Engine, *, name: str, max_waiting: int, log: Log) -> None:
        self.engine = engine
        self.max_waiting = max_waiting
        self._log = log
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._running: Job | None = None
        self._closed = False
        self._seconds_per_job = 1.0  # a running average, for Retry-After
        self._thread = threading.Thread(target=self._serve_forever, name=f"chatcli-serve:{name}", daemon=True)
        self._thread.start()

    def reserve(self, loop: asyncio.AbstractEventLoop) -> Job:
        """A place at the end of the queue, or 503 when it is full."""
        with self._cond:
            if self._closed:
                raise _shutting_down()
            busy = len(self._waiting) + (self._running is not None)
            if busy > self.max_waiting:
                retry = max(1, math.ceil(self._seconds_per_job * busy))
                raise ApiError(503, f"the model is busy and {len(self._waiting)} requests are waiting already: "
                               f"retry in {retry}s", type="server_error", code="queue_full",
                               headers={"Retry-After": str(retry)})
            job = Job(self, loop)
            self._waiting.append(job)
            return job

    def submit(self, job: Job, tokens: list[int], options: SamplingOptions) -> None:
        with self._cond:
            job.tokens, job.options, job.ready = tokens, options, True
            self._cond.notify_all()

    def withdraw(self, job: Job) -> None:
        with self._cond:
            job.cancelled.set()
            if job in self._waiting:
                self._waiting.remove(job)
            self._cond.notify_all()

    def close(self, timeout: float = 5.0) -> None:
        """Refuse new work, end what waits and what runs, stop the thread."""
        with self._cond:
            self._closed = True
            waiting, self._waiting = list(self._waiting), deque()
            running = self._running
            self._cond.notify_all()
        for job in waiting:
            job.cancelled.set()
            job.emit("error", _shutting_down())
        if running is not None:
            running.cancelled.set()
        self._thread.join(timeout)

    def _serve_forever(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not (self._waiting and self._waiting[0].ready):
                    self._cond.wait()
                if self._closed:
                    return
                job = self._running = self._waiting.popleft()
            started = time.monotonic()
            try:
                self._run(job)
            finally:
                with self._cond:
                    self._running = None
                    self._seconds_per_job = 0.8 * self._seconds_per_job + 0.2 * (time.monotonic() - started)

    def _run(self, job: Job) -> None:
        generation = None
        try:
            generation = self.engine.generate(job.tokens, job.options)
            for chunk in generation:  # the first chunk comes only after the grammar and the prompt were accepted
                if job.cancelled.is_set():
                    break
                job.emit("text", chunk)
        except Exception as exc:  # noqa: BLE001 - every failure goes back to its request, the worker lives on
            if not isinstance(exc, ChatcliError):
                self._log(f"error: generation failed: {type(exc).__name__}: {exc}")
            job.emit("error", exc)
            return
        finally:
            if generation is not None:
                generation.close()  # stops llama.cpp at once when we broke out early
        if job.cancelled.is_set() and self._closed:  # cut short by the server stopping: say so, not "stop"
            job.emit("error", _shutting_down())
            return
        job.emit("done", generation.result)


# ---------------------------------------------------------------- models and settings


@dataclass
class ServedModel:
    """A model loaded at start: its public id, what it was resolved from, the engine and its worker."""

    id: str
    ref: ModelRef
    engine: Engine
    worker: ModelWorker
    chat: ChatFormat
    defaults: Mapping[str, object]
    created: int


def serve_model(model_id: str, ref: ModelRef, engine: Engine, *, max_waiting: int, log: Log) -> ServedModel:
    from chatcli.prompting import chat_format

    chat, warning = chat_format(engine, ref)
    if warning:
        log(f"warning: {model_id}: {warning}")
    worker = ModelWorker(engine, name=model_id, max_waiting=max_waiting, log=log)
    defaults = dict(ref.spec.options) if ref.spec else {}
    return ServedModel(model_id, ref, engine, worker, chat, defaults, int(time.time()))


def model_id(ref_text: str, ref: ModelRef) -> str:
    """The id clients name a model by: the reference as given, or a local file's name (never its folder)."""
    if ref.kind == "local" and ref.local_path is not None:
        return ref.local_path.name
    return ref_text.strip()


def is_loopback(host: str) -> bool:
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ServeSettings:
    host: str = "127.0.0.1"
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()
    max_body_bytes: int = MAX_BODY_BYTES
    log_requests: bool = False


# ---------------------------------------------------------------- reading requests


def _number(body: dict[str, Any], name: str, kind: type[int] | type[float]) -> int | float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or (kind is int and not isinstance(value, int)):
        raise _bad(f"'{name}' must be {'an integer' if kind is int else 'a number'}", param=name)
    if isinstance(value, float) and not math.isfinite(value):
        raise _bad(f"'{name}' must be a finite number", param=name)
    return value


def _stop_strings(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise _bad("'stop' must be a non-empty string or a list of them", param="stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise _bad(f"'stop' takes at most {MAX_STOP_STRINGS} strings", param="stop")
    return tuple(stops)


def _grammar(body: dict[str, Any]) -> str | None:
    """GBNF for `response_format` (any JSON object, or one that fits a JSON schema), or llama.cpp's `grammar`."""
    fmt, grammar = body.get("response_format"), body.get("grammar")
    if grammar is not None:
        if not isinstance(grammar, str) or not grammar.strip():
            raise _bad("'grammar' must be a GBNF grammar (a string)", param="grammar")
        if fmt is not None and fmt != {"type": "text"}:
            raise _bad("use either 'grammar' or 'response_format', not both", param="grammar")
        return grammar  # checked by the engine before llama.cpp's sampler sees it
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        from llama_cpp.llama_grammar import JSON_GBNF

        return str(JSON_GBNF)
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise _bad("response_format.json_schema.schema must be a JSON object", param="response_format")
        from chatcli.grammars import schema_to_gbnf

        try:
            return schema_to_gbnf(json.dumps(schema))
        except UsageError as exc:
            raise _bad(str(exc).removeprefix("invalid value for --json-schema: "), param="response_format") from None
    raise _bad("response_format.type must be text, json_object or json_schema", param="response_format")


def sampling(body: dict[str, Any], defaults: Mapping[str, object]) -> SamplingOptions:
    """SamplingOptions from a request (OpenAI's names, plus llama.cpp's top_k, min_p, repeat_penalty)."""
    from chatcli.completion import sampling_options

    given: dict[str, object] = {}
    for name, kind in (("temperature", float), ("top_p", float), ("top_k", int), ("min_p", float),
                       ("repeat_penalty", float), ("seed", int)):
        given[name] = _number(body, name, kind)
    if given["seed"] is not None:
        given["seed"] = int(given["seed"]) % _SEED_RANGE  # type: ignore[call-overload]
    for name in ("max_completion_tokens", "max_tokens"):
        value = _number(body, name, int)
        if value is not None:
            if value < 1:
                raise _bad(f"'{name}' must be 1 or more", param=name)
            given["max_tokens"] = value
            break
    if body.get("n", 1) != 1:
        raise _bad("only n=1 is supported", param="n")
    given["stop"] = _stop_strings(body) or None
    try:
        return sampling_options(dict(defaults), grammar=_grammar(body), **given)
    except InvalidSetting as exc:
        raise _bad(f"'{exc.name}' {exc.why}", param=exc.name) from None


def chat_messages(body: dict[str, Any]) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty list", param="messages")
    out: list[dict[str, str]] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _bad(f"{where} must be an object", param=where)
        role = message.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            raise _bad(f"{where}.role must be system, developer, user or assistant", param=f"{where}.role")
        content = message.get("content")
        if content is None and role == "assistant":
            content = ""
        if isinstance(content, list):
            parts = content
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in parts):
                raise _bad(f"{where}.content: only text parts are supported", param=f"{where}.content")
            content = "".join(p["text"] for p in parts)
        if not isinstance(content, str):
            raise _bad(f"{where}.content must be a string or a list of text parts", param=f"{where}.content")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


def completion_prompt(body: dict[str, Any]) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise _bad("'prompt' must be a non-empty string", param="prompt")
    return prompt


def prompt_tokens(engine: Engine, text: str) -> list[int]:
    from chatcli.prompting import wants_bos

    tokens = engine.tokenize(text, add_bos=wants_bos(engine, text))
    if len(tokens) >= engine.n_ctx:
        raise ContextOverflowError(f"the prompt is {len(tokens)} tokens but this model's context window is "
                                   f"{engine.n_ctx}: shorten it")
    return tokens


def capped(options: SamplingOptions, engine: Engine, n_prompt: int) -> SamplingOptions:
    """max_tokens never asks for more than the context has room for."""
    room = engine.n_ctx - n_prompt
    if options.max_tokens is None or options.max_tokens > room:
        return replace(options, max_tokens=room)
    return options


# ---------------------------------------------------------------- answers


@dataclass
class Reply:
    """How one endpoint shapes its chunks and its final answer."""

    kind: Literal["chat", "text"]
    model: str
    echo: str = ""  # /v1/completions with echo: the prompt comes first
    include_usage: bool = False
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))

    def _head(self, obj: str) -> dict[str, Any]:
        prefix = "chatcmpl-" if self.kind == "chat" else "cmpl-"
        return {"id": prefix + self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None}

    @staticmethod
    def usage(result: GenerationResult) -> dict[str, int]:
        return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                "total_tokens": result.prompt_tokens + result.completion_tokens}

    @staticmethod
    def finish(result: GenerationResult) -> str:
        return "length" if result.finish_reason in ("length", "context") else "stop"

    def chunk(self, text: str | None, finish: str | None = None, role: bool = False) -> dict[str, Any]:
        if self.kind == "chat":
            delta: dict[str, str] = {"role": "assistant", "content": ""} if role else {}
            if text is not None:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return {**self._head("text_completion"), "choices": [choice]}

    def usage_chunk(self, result: GenerationResult) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {**self._head(obj), "choices": [], "usage": self.usage(result)}

    def whole(self, text: str, result: GenerationResult) -> dict[str, Any]:
        finish = self.finish(result)
        if self.kind == "chat":
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                      "logprobs": None, "finish_reason": finish}
            return {**self._head("chat.completion"), "choices": [choice], "usage": self.usage(result)}
        choice = {"index": 0, "text": self.echo + text, "logprobs": None, "finish_reason": finish}
        return {**self._head("text_completion"), "choices": [choice], "usage": self.usage(result)}


def _sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


class JobResponse(Response):
    """Waits for a queued job and answers with its output (SSE or one JSON body), watching for the client
    to go away the whole time: then the job leaves the queue or stops generating at once."""

    def __init__(self, job: Job, reply: Reply, *, stream: bool, on_done: Callable[[int, GenerationResult | None],
                 None]) -> None:
        self.job, self.reply, self.stream = job, reply, stream
        self._on_done, self._answered = on_done, False
        self.status_code = 200
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._scope, self._receive = scope, receive
        try:
            async with anyio.create_task_group() as group:

                async def watch() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    self.job.cancel()
                    group.cancel_scope.cancel()

                group.start_soon(watch)
                await (self._stream(send) if self.stream else self._whole(send))
                group.cancel_scope.cancel()
        finally:
            self.job.cancel()
            if not self._answered:
                self.on_done(499, None)  # nginx's number for "the client went away first"

    def on_done(self, status: int, result: GenerationResult | None) -> None:
        self._answered = True
        self._on_done(status, result)

    async def _next_events(self) -> list[tuple[EventKind, Any]]:
        """The next event, with any that queued behind it (many small chunks become one write)."""
        events = [await self.job.events.get()]
        while events[-1][0] == "text" and not self.job.events.empty():
            events.append(self.job.events.get_nowait())
        return events

    async def _send_error(self, send: Send, exc: BaseException) -> None:
        error = _api_error(exc)
        await error.response()(self._scope, self._receive, send)
        self.on_done(error.status, None)

    async def _whole(self, send: Send) -> None:
        parts: list[str] = []
        while True:
            for kind, value in await self._next_events():
                if kind == "text":
                    parts.append(value)
                elif kind == "error":
                    await self._send_error(send, value)
                    return
                else:
                    await JSONResponse(self.reply.whole("".join(parts), value))(self._scope, self._receive, send)
                    self.on_done(200, value)
                    return

    async def _stream(self, send: Send) -> None:
        # The headers go out as soon as the request has its place in the queue: the client knows it was
        # accepted, and what it waits for from then on is its turn. Errors from here on are SSE events.
        headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                   (b"x-accel-buffering", b"no")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        events = await self._next_events()
        reply = self.reply
        body = _sse(reply.chunk(reply.echo if reply.kind == "text" else None, role=reply.kind == "chat"))
        while True:
            texts = [value for kind, value in events if kind == "text"]
            if texts:
                body += _sse(reply.chunk("".join(texts)))
            kind, value = events[-1]
            if kind == "error":
                body += _sse(_api_error(value).payload()) + _sse("[DONE]")
                self.on_done(_api_error(value).status, None)
                break
            if kind == "done":
                body += _sse(reply.chunk(None if reply.kind == "chat" else "", finish=reply.finish(value)))
                if reply.include_usage:
                    body += _sse(reply.usage_chunk(value))
                body += _sse("[DONE]")
                self.on_done(200, value)
                break
            await send({"type": "http.response.body", "body": body, "more_body": True})
            body = b""
            events = await self._next_events()
        await send({"type": "http.response.body", "body": body, "more_body": False})


# ---------------------------------------------------------------- the application


class Server:
    """The HTTP application over the models loaded at start."""

    def __init__(self, models: Sequence[ServedModel], settings: ServeSettings, log: Log,
                 embedders: Sequence[ServedEmbedder] = ()) -> None:
        if not models and not embedders:
            raise UsageError("no model to serve")
        if not settings.api_key and not is_loopback(settings.host):
            raise UsageError(f"refusing to listen on {settings.host} without an API key")
        self.models = {m.id: m for m in models}
        self.embedders = {m.id: m for m in embedders}
        self.settings = settings
        self.log = log
        self._key = settings.api_key.encode() if settings.api_key else None

    def app(self) -> Starlette:
        routes = [
            Route("/v1/models", self.list_models, methods=["GET"]),
            Route("/v1/models/{model_id:path}", self.get_model, methods=["GET"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/embeddings", self.embeddings, methods=["POST"]),
            Route("/health", self.health, methods=["GET"]),
        ]
        middleware = []
        if self.settings.cors_origins:
            middleware.append(Middleware(CORSMiddleware, allow_origins=list(self.settings.cors_origins),
                                         allow_methods=["GET", "POST"],
                                         allow_headers=["Authorization", "Content-Type"]))
        return Starlette(routes=routes, middleware=middleware, exception_handlers={
            ApiError: self._on_api_error, HTTPException: self._on_http_error, Exception: self._on_crash})

    def close(self) -> None:
        for model in self.models.values():
            model.worker.close()
        for embedder in self.embedders.values():
            embedder.close()

    # -------------------------------------------------------- checks

    def _check(self, request: Request) -> None:
        if self._key is not None:
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self._key):
                raise ApiError(401, "invalid or missing API key: send the header `Authorization: Bearer KEY`",
                               code="invalid_api_key")
        else:
            # Without a key we listen on loopback only; a browser page that resolves its own name to 127.0.0.1
            # (DNS rebinding) still sends its own Host, so only loopback names are answered.
            host = request.headers.get("host", "")
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if host and not is_loopback(name) and name != self.settings.host:
                raise ApiError(403, f"host {host!r} is not served: use 127.0.0.1 or localhost",
                               code="host_not_allowed")

    async def _json_body(self, request: Request) -> dict[str, Any]:
        self._check(request)
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type and not (content_type == "application/json" or content_type.endswith("+json")):
            raise ApiError(415, "send the body as JSON with `Content-Type: application/json`",
                           code="unsupported_media_type")
        limit = self.settings.max_body_bytes
        too_large = ApiError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise _bad(f"the body is not valid JSON: {exc}", code="invalid_json") from None
        except RecursionError:
            raise _bad("the body is nested too deeply", code="invalid_json") from None
        if not isinstance(body, dict):
            raise _bad("the body must be a JSON object", code="invalid_json")
        return body

    def _name(self, body: dict[str, Any]) -> str | None:
        name = body.get("model")
        if name is not None and not isinstance(name, str):
            raise _bad("'model' must be a string", param="model")
        if name is not None and name not in self.models and name not in self.embedders:
            served = ", ".join([*self.models, *self.embedders])
            raise ApiError(404, f"model {name!r} is not served here; this server serves: {served}",
                           param="model", code="model_not_found")
        return name

    def _model(self, body: dict[str, Any]) -> ServedModel:
        """The generating model a completion asks for (the only one, when it names none)."""
        name = self._name(body)
        if name is None and self.models:
            return next(iter(self.models.values()))  # a single-model server needs no name (curl users)
        if name is None or name in self.embedders:
            what = f"{name} is an embedding model" if name else "this server serves only embedding models"
            raise _bad(f"{what}: it gives vectors (POST /v1/embeddings), not text", param="model",
                       code="model_not_supported")
        return self.models[name]

    def _embedder(self, body: dict[str, Any]) -> ServedEmbedder:
        name = self._name(body)
        if name is None and self.embedders:
            return next(iter(self.embedders.values()))
        if name is None or name in self.models:
            what = f"{name} is not an embedding model" if name else "no embedding model is served here"
            raise _bad(f"{what}: serve one for /v1/embeddings, e.g. `chatcli serve -m smollm2 -m all-minilm`",
                       param="model", code="model_not_supported")
        return self.embedders[name]

    # -------------------------------------------------------- endpoints

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    def _model_entry(self, model: ServedModel | ServedEmbedder) -> dict[str, Any]:
        return {"id": model.id, "object": "model", "created": model.created, "owned_by": "chatcli"}

    async def list_models(self, request: Request) -> Response:
        self._check(request)
        entries = [self._model_entry(m) for m in self.models.values()]
        entries += [self._model_entry(m) for m in self.embedders.values()]
        return JSONResponse({"object": "list", "data": entries})

    async def get_model(self, request: Request) -> Response:
        self._check(request)
        name = self._name({"model": request.path_params["model_id"]})
        assert name is not None
        return JSONResponse(self._model_entry(self.models.get(name) or self.embedders[name]))

    async def embeddings(self, request: Request) -> Response:
        from chatcli import serve_embeddings

        body = await self._json_body(request)
        model = self._embedder(body)
        started = time.monotonic()
        try:
            wanted = serve_embeddings.parse(body)
            answer = await anyio.to_thread.run_sync(serve_embeddings.embed, model, wanted)
        except serve_embeddings.EmbeddingRequestError as exc:
            raise _bad(str(exc), param=exc.param) from None
        except ContextOverflowError as exc:
            raise _bad(str(exc), param="input", code="context_length_exceeded") from None
        if self.settings.log_requests:
            self.log(f"{request.method} {request.url.path} {model.id} 200 {len(answer['data'])} inputs, "
                     f"{answer['usage']['prompt_tokens']} tokens {time.monotonic() - started:.2f}s")
        return JSONResponse(answer)

    async def chat_completions(self, request: Request) -> Response:
        body = await self._json_body(request)
        model = self._model(body)
        messages = chat_messages(body)

        def prepare() -> tuple[list[int], SamplingOptions]:
            options = sampling(body, model.defaults)
            options = replace(options, stop=tuple(options.stop) + tuple(model.chat.stop))
            tokens = prompt_tokens(model.engine, model.chat.render(messages, add_generation_prompt=True))
            return tokens, capped(options, model.engine, len(tokens))

        return await self._enqueue(request, body, model, prepare, Reply("chat", model.id))

    async def completions(self, request: Request) -> Response:
        body = await self._json_body(request)
        model = self._model(body)
        prompt = completion_prompt(body)
        echo = body.get("echo") is True

        def prepare() -> tuple[list[int], SamplingOptions]:
            options = sampling(body, model.defaults)
            tokens = prompt_tokens(model.engine, prompt)
            return tokens, capped(options, model.engine, len(tokens))

        return await self._enqueue(request, body, model, prepare, Reply("text", model.id, echo=prompt if echo else ""))

    async def _enqueue(self, request: Request, body: dict[str, Any], model: ServedModel,
                       prepare: Callable[[], tuple[list[int], SamplingOptions]], reply: Reply) -> Response:
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise _bad("'stream' must be true or false", param="stream")
        stream_options = body.get("stream_options")
        reply.include_usage = isinstance(stream_options, dict) and stream_options.get("include_usage") is True
        job = model.worker.reserve(asyncio.get_running_loop())  # our place in the queue: arrival order
        try:
            # Templates and tokenising take time on long prompts: not on the event loop, and beside generation.
            tokens, options = await anyio.to_thread.run_sync(prepare)
        except BaseException:
            job.cancel()
            raise
        model.worker.submit(job, tokens, options)
        started = time.monotonic()

        def on_done(status: int, result: GenerationResult | None) -> None:
            if self.settings.log_requests:
                counts = f" {result.prompt_tokens}+{result.completion_tokens} tokens" if result else ""
                self.log(f"{request.method} {request.url.path} {model.id} {status}{counts} "
                         f"{time.monotonic() - started:.2f}s")

        return JobResponse(job, reply, stream=stream, on_done=on_done)

    # -------------------------------------------------------- error answers

    async def _on_api_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        if self.settings.log_requests:
            self.log(f"{request.method} {request.url.path} {exc.status} {exc.message}")
        return exc.response()

    async def _on_http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code,
                        headers=dict(exc.headers or {})).response()

    async def _on_crash(self, request: Request, exc: Exception) -> Response:
        self.log(f"error: {request.method} {request.url.path}: {type(exc).__name__}: {exc}")
        return _api_error(exc).response()


# ---------------------------------------------------------------- running it


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the models load so that a taken port fails at once."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        raise ChatcliError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def run(server: Server, sock: socket.socket, *, on_ready: Callable[[], None] | None = None) -> None:
    """Serve until Ctrl-C or SIGTERM; then end the queued and running requests and stop the workers."""
    import uvicorn

    class _Uvicorn(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if on_ready is not None and self.started:
                on_ready()

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            server.close()  # streams end now instead of after the graceful-shutdown timeout
            await super().shutdown(sockets)

    config = uvicorn.Config(server.app(), log_config=None, access_log=False, lifespan="off", server_header=False,
                            timeout_graceful_shutdown=3, limit_concurrency=512)
    try:
        _Uvicorn(config).run(sockets=[sock])
    finally:
        server.close()

