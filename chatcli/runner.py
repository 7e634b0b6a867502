"""From a model reference to a loaded engine: default model, pull on first use, chat format, prompt tokens."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from chatcli import config, store
from chatcli.chat_templates import ChatFormat, choose_format
from chatcli.engine import LlamaEngine
from chatcli.errors import ContextOverflowError, ModelNotPresentError, UsageError
from chatcli.listing import resolve_present
from chatcli.registry import ModelRef, load_catalogue, parse_ref


@dataclass
class LoadOptions:
    ctx_size: int | None = None
    threads: int | None = None
    gpu_layers: str = "auto"
    flash_attn: bool = True
    verbose: bool = False


def default_model_ref() -> str:
    ref = config.get("default_model")
    if not ref:
        raise UsageError("no model given and no default set: pass -m MODEL or run `chatcli config set default_model X`")
    return str(ref)


def resolve(ref_text: str | None) -> ModelRef:
    return parse_ref(ref_text or default_model_ref(), load_catalogue())


def ensure_present(
    ref: ModelRef,
    *,
    pull: bool,
    confirm: Callable[[ModelRef], bool] | None,
    progress=None,  # noqa: ANN001 - hub.PullProgress
    on_pulled: Callable[[object], None] | None = None,
    notice: Callable[[str], None] | None = None,
) -> Path:
    """The model file, pulled first when allowed (`pull`, or `confirm` says yes); else a clear error."""
    try:
        path, _model = resolve_present(ref)
        return path
    except ModelNotPresentError:
        if not (pull or config.get("auto_pull") or (confirm is not None and confirm(ref))):
            raise
    from chatcli.pulling import pull_model

    result = pull_model(ref, progress=progress, notice=notice)
    if on_pulled is not None:
        on_pulled(result)
    return result.model.path


def load(ref: ModelRef, path: Path, options: LoadOptions) -> LlamaEngine:
    default_ctx = ref.spec.context if ref.spec else None
    engine = LlamaEngine(
        path,
        n_ctx=options.ctx_size,
        default_ctx=default_ctx,
        n_threads=options.threads,
        gpu_layers=options.gpu_layers,
        flash_attn=options.flash_attn,
        verbose=options.verbose,
    )
    store.mark_used(path)
    return engine


def chat_format(engine: LlamaEngine, ref: ModelRef, requested: str | None = None) -> tuple[ChatFormat, str | None]:
    """The chat template for this model: --template, else the catalogue's, else the GGUF's own (sandboxed)."""
    info = engine.info
    wanted = requested or (ref.spec.template if ref.spec else None) or "auto"
    return choose_format(
        requested=wanted,
        gguf_template=info.chat_template,
        architecture=info.architecture,
        bos_token=info.bos_token or "",
        eos_token=info.eos_token or "",
        eot_token=info.eot_token or "",
    )


def wants_bos(engine: LlamaEngine, text: str) -> bool:
    """Whether to add the model's BOS token: when it uses one and the text (a rendered template) has none."""
    bos = engine.info.bos_token
    return bool(engine.add_bos and not (bos and text.startswith(bos)))


def prompt_tokens(engine: LlamaEngine, text: str, *, reserve: int, truncate: bool) -> list[int]:
    """Tokenise a prompt (no second BOS when the text starts with one); keep its tail if `truncate`."""
    add_bos = wants_bos(engine, text)
    tokens = engine.tokenize(text, add_bos=add_bos)
    limit = engine.n_ctx - max(1, reserve)
    if len(tokens) <= limit:
        return tokens
    if not truncate:
        raise ContextOverflowError(
            f"the prompt is {len(tokens)} tokens but the context window is {engine.n_ctx} "
            f"(with {reserve} kept for the reply): shorten it, raise --ctx-size, or pass --truncate to keep its end"
        )
    head = tokens[:1] if add_bos else []
    return head + tokens[len(tokens) - (limit - len(head)):]
