"""`complete`: one prompt in, a streamed completion out, as text, one JSON object, or JSON lines.

The output stream is injected (stdout in the CLI, a buffer in tests); it receives only the product.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

from chatcli.engine import GenerationResult, LlamaEngine, SamplingOptions
from chatcli.errors import OutputClosed, UsageError
from chatcli.registry import ModelRef

DEFAULTS = {"temperature": 0.8, "top_p": 0.95, "top_k": 40, "min_p": 0.05, "repeat_penalty": 1.0}


def join_prompt(text: str | None, stdin_text: str | None, *, allow_empty: bool = False) -> str:
    """Piped stdin, then TEXT, joined with a blank line; either alone works; neither is a usage error."""
    parts = [p for p in (stdin_text, text) if p is not None and p.strip()]
    if not parts and allow_empty:
        return ""
    if not parts:
        raise UsageError("no prompt: give TEXT or pipe text on stdin (e.g. `echo hi | chatcli complete`)")
    # stdin first: `cat notes.txt | chatcli complete "Summary:"` asks the model to continue after "Summary:"
    return "\n\n".join(p.rstrip("\n") if i < len(parts) - 1 else p for i, p in enumerate(parts))


def sampling_options(*, defaults: dict[str, float] | None = None, **given: object) -> SamplingOptions:
    """Options given on the command line, else the model's catalogue defaults, else ours; validated."""
    merged: dict[str, object] = {**DEFAULTS, **(defaults or {})}
    merged.update({k: v for k, v in given.items() if v is not None})
    merged["stop"] = tuple(merged.get("stop") or ())
    for key in ("top_k", "max_tokens", "seed"):
        if merged.get(key) is not None:
            merged[key] = int(merged[key])  # type: ignore[call-overload]
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


def render_prompt(engine: LlamaEngine, ref: ModelRef, request: CompletionRequest,
                  warn: Callable[[str], None]) -> tuple[str, tuple[str, ...]]:
    """The text the model reads, and the stop strings the chat template adds."""
    if not request.chat:
        return request.prompt, ()
    from chatcli.prompting import chat_format

    fmt, warning = chat_format(engine, ref, request.template)
    if warning:
        warn(warning)
    messages = ([{"role": "system", "content": request.system}] if request.system else []) + [
        {"role": "user", "content": request.prompt}
    ]
    return fmt.render(messages, add_generation_prompt=True), fmt.stop


def run(engine: LlamaEngine, ref: ModelRef, request: CompletionRequest, out: Output) -> GenerationResult:
    from chatcli.prompting import prompt_tokens

    text, template_stops = render_prompt(engine, ref, request, out.warn)
    options = request.options
    if template_stops:
        options = SamplingOptions(**{**options.__dict__, "stop": tuple(options.stop) + template_stops})
    reserve = min(options.max_tokens or 256, engine.n_ctx // 4) or 1
    tokens = prompt_tokens(engine, text, reserve=reserve, truncate=request.truncate)
    snapshots, restored = _restore(engine, tokens) if request.cache else (None, 0)
    generation = engine.generate(tokens, options)
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
    if snapshots is not None:
        _save(engine, snapshots, tokens, request)
    _finish(out, ref, result, engine, request.prompt)
    return result


def _restore(engine: LlamaEngine, tokens: list[int]):  # noqa: ANN202
    from chatcli.snapshots import SnapshotStore, model_identity

    store = SnapshotStore()
    return store, store.restore(engine, tokens, model_id=model_identity(engine.path))


def _save(engine: LlamaEngine, store, tokens: list[int], request: CompletionRequest) -> None:  # noqa: ANN001
    """Snapshot the prompt's state: only its repeating part (stdin) when there is one, so the next question hits."""
    from chatcli.snapshots import model_identity

    target, margin = tokens, 0
    if request.cache_prefix:
        from chatcli.prompting import wants_bos

        target = engine.tokenize(request.cache_prefix, add_bos=wants_bos(engine, request.cache_prefix))
        margin = 1  # the last token of a prefix may merge differently with what follows
    store.save_prefix(engine, target, model_id=model_identity(engine.path), margin=margin)


def _finish(out: Output, ref: ModelRef, result: GenerationResult, engine: LlamaEngine, prompt: str) -> None:
    summary = _summary(ref, result, getattr(engine, "load_seconds", 0.0))
    if out.mode == "json":
        if out.echo:
            summary = {"prompt": prompt, **summary}
        out.write(json.dumps(summary, ensure_ascii=False) + "\n")
    elif out.mode == "jsonl":
        out.event({"type": "done", **{k: v for k, v in summary.items() if k != "text"}})
    elif out.stream.isatty() and result.text and not result.text.endswith("\n"):
        out.write("\n")
