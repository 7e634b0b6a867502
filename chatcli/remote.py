"""A model on an OpenAI-compatible server (vLLM, llama-server, ollama, chatcli serve): `@NAME/MODEL_ID` references.

HTTP, server-sent events, error bodies and `Retry-After` parsing are the official `openai` SDK's: every server
here copies OpenAI's wire format, so the vendor's own client is the one that tracks it (stream options, error
shapes, new fields), and it is imported only when a remote model is used (`--help` and local runs never pay for
it). What is ours: one retry policy with a bounded wait, and turning each failure into one line that names the
endpoint, the API-key variable or the models the server has. Replies come back as the same Generation /
GenerationResult a local engine gives, so rendering, `--json` summaries and history do not know the difference.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from chatcli.endpoints import Endpoint
from chatcli.engine import FinishReason, Generation, GenerationResult, SamplingOptions
from chatcli.errors import ChatcliError, ContextOverflowError, RemoteError, UnknownModelError

if TYPE_CHECKING:
    import openai

# 429 / 503 with Retry-After: wait and try again, at most RETRIES times and never longer than MAX_WAIT each
# (the SDK alone would wait up to two minutes per try); a server asking for more is reported at once.
RETRIES = 3
MAX_WAIT = 10.0
_BUSY = {429, 503}
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 600.0  # between two bytes of a reply: a long prompt on a slow server can take minutes to read
_DEFAULTS = SamplingOptions()


@dataclass(frozen=True)
class RemoteModel:
    id: str
    owned_by: str | None = None
    n_ctx: int | None = None  # when the server says (vLLM's max_model_len, llama-server's meta.n_ctx_train)


class RemoteEngine:
    """One model on one endpoint; implements engine.TextEngine. Build it with `RemoteEngine.open`."""

    def __init__(self, endpoint: Endpoint, *, notice: Callable[[str], None] | None = None) -> None:
        import openai  # the SDK: only here, when a remote model is used

        self.endpoint = endpoint
        self.model = ""
        self.label = f"@{endpoint.name}"
        self.n_ctx: int | None = None
        self.load_seconds = 0.0
        self.notice = notice or (lambda message: None)
        self.where = f"{endpoint.api_base} (endpoint {endpoint.name})"
        # A server without keys takes any; the SDK insists on one, and reads OPENAI_API_KEY itself if given None.
        self.client = openai.OpenAI(
            base_url=endpoint.api_base, api_key=endpoint.api_key() or "no-key", max_retries=0,
            timeout=openai.Timeout(READ_TIMEOUT, connect=CONNECT_TIMEOUT),
        )

    @classmethod
    def open(cls, endpoint: Endpoint, model: str | None, *,
             notice: Callable[[str], None] | None = None) -> RemoteEngine:
        """Connect and find the model: MODEL_ID, or the server's first one; an unknown id lists what it has."""
        started = time.monotonic()
        engine = cls(endpoint, notice=notice)
        models = engine.models(missing_ok=True)
        if models is None:  # a server without /v1/models: take the id on trust
            if not model:
                engine.close()
                raise RemoteError(f"{engine.where} does not list its models: name one, @{endpoint.name}/MODEL_ID")
            chosen = RemoteModel(model)
        elif model:
            found = next((m for m in models if m.id == model), None)
            if found is None:
                engine.close()
                raise engine._unknown_model(model, models)
            chosen = found
        elif models:
            chosen = models[0]
        else:
            engine.close()
            raise RemoteError(f"{engine.where} has no models loaded")
        engine.model, engine.n_ctx = chosen.id, chosen.n_ctx
        engine.label = f"@{endpoint.name}/{chosen.id}"
        engine.load_seconds = time.monotonic() - started
        return engine

    def close(self) -> None:
        self.client.close()

    # -------------------------------------------------------- models

    def models(self, *, missing_ok: bool = False) -> list[RemoteModel] | None:
        """The server's /v1/models; None when it has no such route and `missing_ok`."""
        import openai

        try:
            page = self._retrying(lambda: self.client.models.list())
            return [_remote_model(m.model_dump()) for m in page.data]
        except openai.NotFoundError as exc:
            if missing_ok:
                return None
            raise self._status_error(exc) from None
        except openai.APIStatusError as exc:
            raise self._status_error(exc) from None
        except openai.APIConnectionError as exc:
            raise self._connection_error(exc) from None
        except (ValueError, AttributeError, TypeError) as exc:  # a body that is not a model list
            raise RemoteError(f"{self.where} answered /models with something that is not a model list "
                              f"({type(exc).__name__}): is this an OpenAI-compatible server?") from None

    def _unknown_model(self, model: str, models: list[RemoteModel] | None) -> UnknownModelError:
        has = ", ".join(m.id for m in models) if models else "none listed"
        return UnknownModelError(f"{self.where} has no model {model!r}; it has: {has} "
                                 f"(use @{self.endpoint.name}/MODEL_ID)")

    # -------------------------------------------------------- generating

    def complete_text(self, prompt: str, options: SamplingOptions, *,
                      json_schema: dict[str, Any] | None = None) -> Generation:
        """Continue `prompt` as it is (/v1/completions: no chat template)."""
        kwargs, extra = _sampling(options)

        def send(body: dict[str, Any]) -> Any:
            return self.client.completions.create(model=self.model, prompt=prompt, stream=True,
                                                  stream_options={"include_usage": True}, extra_body=body,
                                                  **kwargs)

        return self._generate(send, extra, json_schema, chat=False)

    def chat(self, messages: Sequence[Mapping[str, str]], options: SamplingOptions, *,
             json_schema: dict[str, Any] | None = None) -> Generation:
        """Reply to `messages` (/v1/chat/completions: the server applies its chat template)."""
        kwargs, extra = _sampling(options)
        sent: Any = [dict(m) for m in messages]

        def send(body: dict[str, Any]) -> Any:
            return self.client.chat.completions.create(model=self.model, messages=sent, stream=True,
                                                       stream_options={"include_usage": True}, extra_body=body,
                                                       **kwargs)

        return self._generate(send, extra, json_schema, chat=True)

    def _generate(self, send: Callable[[dict[str, Any]], Any], extra: dict[str, Any],
                  json_schema: dict[str, Any] | None, *, chat: bool) -> Generation:
        """Send the request now (so refusals are raised before anything streams); the reply streams lazily."""
        import openai

        started = time.monotonic()
        # OpenAI's json_schema form first; llama.cpp-family servers that refuse it take {"type": "json_object",
        # "schema": …}. Servers that support neither ignore it or say so.
        formats: list[dict[str, Any] | None] = [None] if json_schema is None else [
            {"type": "json_schema", "json_schema": {"name": "output", "schema": json_schema, "strict": True}},
            {"type": "json_object", "schema": json_schema},
        ]
        for i, response_format in enumerate(formats):
            body = extra if response_format is None else {**extra, "response_format": response_format}
            try:
                stream = self._retrying(lambda body=body: send(body))  # type: ignore[misc]
                break
            except openai.APIStatusError as exc:
                # a refusal of the first form: a 400/422, or whatever status names response_format (llama-cpp-python's
                # server answers its own validation errors with a 500)
                refused = exc.status_code in (400, 422) or "response_format" in _server_message(exc)
                if refused and i + 1 < len(formats) and not _context_error(exc):
                    continue
                raise self._status_error(exc) from None
            except openai.APIConnectionError as exc:
                raise self._connection_error(exc) from None
        result = GenerationResult()
        return Generation(self._chunks(stream, result, started, chat=chat), result)

    def _chunks(self, stream: Any, result: GenerationResult, started: float, *, chat: bool) -> Iterator[str]:
        import openai

        finish: str | None = None
        events = 0
        first = last = 0.0
        usage = None
        try:
            for event in stream:
                if getattr(event, "usage", None) is not None:
                    usage = event.usage
                for choice in event.choices or ():
                    if choice.index not in (0, None):
                        continue
                    text = choice.delta.content if chat else choice.text
                    if text is not None and not choice.finish_reason:
                        events += 1  # one token per event on the servers we know (used when they send no usage)
                    if text:
                        now = time.monotonic()
                        first = first or now
                        last = now
                        result.text += text
                        yield text
                    if choice.finish_reason:
                        finish = str(choice.finish_reason)
        except openai.APIConnectionError as exc:
            raise RemoteError(f"the connection to {self.where} broke mid-reply ({_reason(exc)}): "
                              "what arrived is kept") from None
        except openai.APIError as exc:  # an error event inside the stream
            raise RemoteError(f"{self.where} failed mid-reply: {_one_line(exc.message)}") from None
        except (ValueError, AttributeError, TypeError, IndexError, KeyError) as exc:
            raise RemoteError(f"{self.where} sent a malformed stream ({type(exc).__name__}: "
                              f"{_one_line(str(exc), 120)}): what arrived is kept") from None
        finally:
            stream.close()
            if usage is not None:
                result.prompt_tokens = int(getattr(usage, "prompt_tokens", 0) or 0)
                result.completion_tokens = int(getattr(usage, "completion_tokens", 0) or 0)
            else:
                result.completion_tokens = events
            if first:
                result.prompt_seconds = first - started
                result.decode_seconds = last - first
        if finish is None:
            hint = " (some servers do this when the prompt does not fit their context)" if not result.text else ""
            raise RemoteError(f"{self.where} ended the stream before the reply was finished{hint}")
        result.finish_reason = _finish_reason(finish)

    # -------------------------------------------------------- retries and errors

    def _retrying(self, call: Callable[[], Any]) -> Any:
        """`call()`, again after a 429/503 when the server's Retry-After (or our backoff) is short enough."""
        import openai

        for attempt in range(RETRIES + 1):
            try:
                return call()
            except openai.APIStatusError as exc:
                if exc.status_code not in _BUSY or attempt == RETRIES:
                    raise
                wait = _retry_after(exc.response.headers)
                wait = 0.5 * 2**attempt if wait is None else wait
                if wait > MAX_WAIT:
                    raise RemoteError(f"{self.where} is busy ({exc.status_code}) and asks to wait {wait:.0f}s: "
                                      "try again later") from None
                self.notice(f"{self.where} is busy ({exc.status_code}): retrying in {wait:.1f}s")
                time.sleep(wait)
        raise AssertionError("unreachable")

    def _status_error(self, exc: openai.APIStatusError) -> ChatcliError:
        status, message = exc.status_code, _server_message(exc)
        var = self.endpoint.api_key_env
        if status in (401, 403):
            if var and not self.endpoint.api_key():
                return RemoteError(f"{self.where} needs an API key ({status}): set ${var}")
            if var:
                return RemoteError(f"{self.where} refused the API key in ${var} ({status}: {message})")
            return RemoteError(f"{self.where} needs an API key ({status}): put it in an environment variable and "
                               f"add the endpoint again with --api-key-env VAR (`chatcli endpoint rm "
                               f"{self.endpoint.name}` first)")
        if status == 404 and ("model" in message.lower() or _code(exc) == "model_not_found"):
            return self._unknown_model(self.model, self.models(missing_ok=True))
        if status == 404:
            return RemoteError(f"{self.where} has no {exc.request.url.path} (404): check the URL "
                               "(OpenAI-compatible servers usually serve under /v1)")
        if _context_error(exc):
            return ContextOverflowError(f"the prompt does not fit the context window of {self.label}: {message}")
        if status in _BUSY:
            return RemoteError(f"{self.where} is still busy ({status}) after {RETRIES} retries: try again later")
        if status in (400, 422):
            return RemoteError(f"{self.where} refused the request ({status}): {message}")
        return RemoteError(f"{self.where} failed ({status}): {message}")

    def _connection_error(self, exc: openai.APIConnectionError) -> RemoteError:
        return RemoteError(f"cannot reach {self.where}: {_reason(exc)}; is the server running? "
                           "(`chatcli endpoint list` shows the URLs)")


# ---------------------------------------------------------------- helpers


def list_models(endpoint: Endpoint) -> list[RemoteModel]:
    """What `chatcli list --endpoint NAME` shows: the server's /v1/models."""
    engine = RemoteEngine(endpoint)
    try:
        return engine.models() or []
    finally:
        engine.close()


def _sampling(options: SamplingOptions) -> tuple[dict[str, Any], dict[str, Any]]:
    """OpenAI's own parameters, and the ones only llama.cpp/vLLM/ollama know (sent only when set off default,
    since OpenAI itself refuses unknown parameters)."""
    kwargs: dict[str, Any] = {"temperature": options.temperature, "top_p": options.top_p}
    if options.max_tokens is not None:
        kwargs["max_tokens"] = options.max_tokens
    if options.seed is not None:
        kwargs["seed"] = options.seed
    if options.stop:
        kwargs["stop"] = list(options.stop)
    extra: dict[str, Any] = {}
    if options.top_k != _DEFAULTS.top_k:
        extra["top_k"] = options.top_k
    if options.min_p != _DEFAULTS.min_p:
        extra["min_p"] = options.min_p
    if options.repeat_penalty != _DEFAULTS.repeat_penalty:
        # llama.cpp's name, and vLLM's
        extra["repeat_penalty"] = extra["repetition_penalty"] = options.repeat_penalty
    return kwargs, extra


def _remote_model(card: dict[str, Any]) -> RemoteModel:
    meta = card.get("meta") if isinstance(card.get("meta"), dict) else {}
    n_ctx = next((v for v in (card.get("max_model_len"), card.get("context_length"), card.get("context_window"),
                              (meta or {}).get("n_ctx"), (meta or {}).get("n_ctx_train"))
                  if isinstance(v, int) and v > 0), None)
    owner = card.get("owned_by")
    return RemoteModel(id=str(card["id"]), owned_by=str(owner) if owner else None, n_ctx=n_ctx)


def _finish_reason(reason: str) -> FinishReason:
    return "length" if reason == "length" else "stop"


def _retry_after(headers: Mapping[str, str]) -> float | None:
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is not None:
            try:
                return max(0.0, float(value) * scale)
            except ValueError:
                pass
    return None  # an HTTP date: rare from these servers; our backoff instead


def _code(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        for key in ("code", "type"):
            if isinstance(body.get(key), str):
                return str(body[key])
    return ""


def _server_message(exc: openai.APIStatusError) -> str:
    """The server's own words: OpenAI's {"error": {"message"}}, FastAPI's {"detail"}, or the status."""
    body: Any = exc.body
    if isinstance(body, dict):
        body = body.get("message") or body.get("detail") or body.get("error") or body
        if isinstance(body, dict):
            body = body.get("message") or body
        if isinstance(body, list) and body and isinstance(body[0], dict):
            body = "; ".join(f"{'.'.join(map(str, d.get('loc', ())))}: {d.get('msg')}" for d in body[:3])
    text = body if isinstance(body, str) else ""
    return _one_line(text) or f"HTTP {exc.status_code}"


def _context_error(exc: openai.APIStatusError) -> bool:
    """OpenAI/vLLM/llama-cpp-python say context_length_exceeded or "maximum context length"; llama-server says
    exceed_context_size_error."""
    if exc.status_code not in (400, 413, 422):
        return False
    text = (_code(exc) + " " + _server_message(exc)).lower()
    return any(s in text for s in ("context_length_exceeded", "exceed_context", "context length",
                                   "context window", "context size"))


def _reason(exc: BaseException) -> str:
    """Why a connection failed, in a few words (the innermost cause: "connection refused", a timeout…)."""
    import openai

    if isinstance(exc, openai.APITimeoutError):
        return "no answer in time"
    cause: BaseException | None = exc
    text = ""
    while cause is not None:
        text = str(cause) or text
        cause = cause.__cause__ or cause.__context__
    lowered = text.lower()
    for words in ("connection refused", "name or service not known", "nodename nor servname",
                  "temporary failure in name resolution", "connection reset", "network is unreachable",
                  "incomplete chunked read", "peer closed connection", "server disconnected"):
        if words in lowered:
            return words
    return _one_line(text, 120) or type(exc).__name__


def _one_line(text: str, width: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"
