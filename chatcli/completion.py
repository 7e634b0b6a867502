"""`complete`: one prompt in, a streamed completion out, as text, one JSON object, or JSON lines.

The output stream is injected (stdout in the CLI, a buffer in tests); it receives only the product.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from chatcli.engine import SETTINGS, Engine, Generation, GenerationResult, SamplingOptions, TextEngine
from chatcli.errors import OutputClosed, UsageError
from chatcli.registry import ModelRef

# The built-in values of the settings that have one (max_tokens and seed default to none).
DEFAULTS: dict[str, object] = {f.name: f.default for f in SETTINGS if f.default is not None}


def join_prompt(text: str | None, stdin_text: str | None, *, allow_empty: bool = False) -> str:
    """Piped stdin, then TEXT, joined with a blank line; either alone works; neither is a usage error."""
    parts = [p for p in (stdin_text, text) if p is not None and p.strip()]
    if not parts and allow_empty:
        return ""
    if not parts:
        raise UsageError("no prompt: give TEXT or pipe text on stdin (e.g. `echo hi | chatcli complete`)")
    # stdin first: `cat notes.txt | chatcli complete "Summary:"` asks the model to continue after "Summary:"
    return "\n\n".join(p.rstrip("\n") if i < len(parts) - 1 else p for i, p in enumerate(parts))


def reply_reserve(n_ctx: int, options: SamplingOptions) -> int:
    """Tokens of the context kept for the reply: the prompt may use the rest."""
    return min(options.max_tokens or 256, n_ctx // 4) or 1


def sampling_options(*layers: dict[str, object] | None, **given: object) -> SamplingOptions:
    """Options given on the command line (None: not given) over `layers` (later wins) over DEFAULTS; validated.

    The layers are the defaults below the flags, lowest first: the catalogue's for the model, a prompt template's.
    """
    merged: dict[str, object] = dict(DEFAULTS)
    for layer in layers:
        merged.update(layer or {})
    merged.update({k: v for k, v in given.items() if v is not None})
    merged["stop"] = tuple(merged.get("stop") or ())  # type: ignore[arg-type]
    for f in SETTINGS:
        if merged.get(f.name) is not None:
            merged[f.name] = f.metadata["kind"](merged[f.name])
    return SamplingOptions(**merged).validate()  # type: ignore[arg-type]


@dataclass
class CompletionRequest:
    prompt: str
    options: SamplingOptions
    chat: bool = False
    system: str | None = None
    template: str | None = None
    truncate: bool = False
    cache: bool = False  # restore / save the prompt's llama.cpp state (snapshots)
    cache_prefix: str | None = None  # the part of the prompt that repeats (piped stdin): what the snapshot keeps
    json_schema: dict[str, Any] | None = None  # --json-schema for a remote engine (sent as response_format)


@dataclass
class Output:
    stream: TextIO
    mode: str = "text"  # text | json | jsonl
    echo: bool = False
    warn: Callable[[str], None] = field(default=lambda message: None)

    def write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except BrokenPipeError:
            raise OutputClosed("stdout was closed") from None

    def event(self, payload: dict) -> None:
        self.write(json.dumps(payload, ensure_ascii=False) + "\n")


def _summary(ref: ModelRef, result: GenerationResult, load_seconds: float) -> dict:
    return {
        "text": result.text,
        "model": ref.display,
        "finish_reason": result.finish_reason,
        "prompt_tokens": result.prompt_tokens,
        "prompt_cached_tokens": result.prompt_cached_tokens,
        "completion_tokens": result.completion_tokens,
        "timings": {"load_seconds": round(load_seconds, 4), **result.timings()},
    }


def render_prompt(engine: Engine, ref: ModelRef, request: CompletionRequest,
                  warn: Callable[[str], None]) -> tuple[str, tuple[str, ...]]:
    """The text the model reads, and the stop strings the chat template adds."""
    if not request.chat:
        return request.prompt, ()
    from chatcli.prompting import chat_format

    fmt, warning = chat_format(engine, ref, request.template)
    if warning:
        warn(warning)
    return fmt.render(_messages(request), add_generation_prompt=True), fmt.stop


def _messages(request: CompletionRequest) -> list[dict[str, str]]:
    """`--chat`: the system prompt, if any, and the text as the user's message."""
    system = [{"role": "system", "content": request.system}] if request.system else []
    return [*system, {"role": "user", "content": request.prompt}]


def run(engine: Engine | TextEngine, ref: ModelRef, request: CompletionRequest, out: Output) -> GenerationResult:
    local: Engine | None = None
    tokens: list[int] = []
    snapshots, restored = None, 0
    if isinstance(engine, TextEngine):  # the server renders, tokenizes and fits: it gets the text or messages
        generation = _remote_generation(engine, request, out.warn)
    else:
        from chatcli.prompting import prompt_tokens

        local = engine
        text, template_stops = render_prompt(local, ref, request, out.warn)
        options = request.options
        if template_stops:
            options = SamplingOptions(**{**options.__dict__, "stop": tuple(options.stop) + template_stops})
        reserve = reply_reserve(local.n_ctx, options)
        tokens = prompt_tokens(local, text, reserve=reserve, truncate=request.truncate)
        snapshots, restored = _restore(local, tokens) if request.cache else (None, 0)
        generation = local.generate(tokens, options)
    result = generation.result
    result.prompt_cached_tokens = restored
    if out.echo and out.mode == "text":
        out.write(request.prompt)
    try:
        for chunk in generation:
            if out.mode == "text":
                out.write(chunk)
            elif out.mode == "jsonl":
                out.event({"type": "chunk", "text": chunk})
    except KeyboardInterrupt:
        result.finish_reason = "interrupted"
        _finish(out, ref, result, engine, request.prompt)
        raise
    finally:
        generation.close()  # stop generating at once, e.g. when the reader went away
    if snapshots is not None and local is not None:
        _save(local, snapshots, tokens, request)
    _finish(out, ref, result, engine, request.prompt)
    return result


def _remote_generation(engine: TextEngine, request: CompletionRequest, warn: Callable[[str], None]) -> Generation:
    """`complete` sends the raw prompt to /v1/completions; `--chat` sends messages to /v1/chat/completions."""
    for given, flag in ((request.truncate, "--truncate"), (request.cache, "--cache"),
                        (request.chat and request.template, "--chat-template")):
        if given:
            warn(f"{flag} does not apply to a remote model (the server tokenizes, fits and templates): ignored")
    if not request.chat:
        return engine.complete_text(request.prompt, request.options, json_schema=request.json_schema)
    return engine.chat(_messages(request), request.options, json_schema=request.json_schema)


def _restore(engine: Engine, tokens: list[int]):  # noqa: ANN202
    from chatcli.snapshots import SnapshotStore, model_identity

    store = SnapshotStore()
    return store, store.restore(engine, tokens, model_id=model_identity(engine.path))


def _save(engine: Engine, store, tokens: list[int], request: CompletionRequest) -> None:  # noqa: ANN001
    """Snapshot the prompt's state: only its repeating part (stdin) when there is one, so the next question hits."""
    from chatcli.snapshots import model_identity

    target, margin = tokens, 0
    if request.cache_prefix:
        from chatcli.prompting import wants_bos

        target = engine.tokenize(request.cache_prefix, add_bos=wants_bos(engine, request.cache_prefix))
        margin = 1  # the last token of a prefix may merge differently with what follows
    store.save_prefix(engine, target, model_id=model_identity(engine.path), margin=margin)


def _finish(out: Output, ref: ModelRef, result: GenerationResult, engine: Engine | TextEngine, prompt: str) -> None:
    summary = _summary(ref, result, engine.load_seconds)
    if out.mode == "json":
        if out.echo:
            summary = {"prompt": prompt, **summary}
        out.write(json.dumps(summary, ensure_ascii=False) + "\n")
    elif out.mode == "jsonl":
        out.event({"type": "done", **{k: v for k, v in summary.items() if k != "text"}})
    elif out.stream.isatty() and result.text and not result.text.endswith("\n"):
        out.write("\n")
