"""From a model reference to a loaded engine: the default model, the file on disk (pulled on first use), loading."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from chatcli import config, store
from chatcli.engine import LlamaEngine
from chatcli.errors import ModelNotPresentError, UsageError
from chatcli.registry import ModelRef, load_catalogue, parse_ref

if TYPE_CHECKING:
    from chatcli.embedding import Embedder
    from chatcli.remote import RemoteEngine


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


def resolve_present(ref: ModelRef, revision: str = "main") -> tuple[Path, store.LocalModel | None]:
    """The file to open for a reference, or ModelNotPresentError naming the pull command."""
    if ref.kind == "remote":
        raise UsageError(f"{ref.display} is a model on a remote endpoint: there is no file here to pull, show or "
                         f"remove (`chatcli list --endpoint {ref.endpoint}` lists its models)")
    if ref.kind == "local":
        assert ref.local_path is not None
        return ref.local_path, None
    if ref.kind == "store":  # another tool's file (ollama, LM Studio, …), used in place: never pulled or copied
        from chatcli import stores

        assert ref.store is not None and ref.store_name is not None
        return stores.find(ref.store, ref.store_name).path, None
    from chatcli import hub  # not for a local file: `complete -m ./x.gguf` starts without it

    model = hub.locate(ref, revision)
    if model is None:
        raise ModelNotPresentError(f"model {ref.display} is not downloaded: run `chatcli pull {ref.raw}`")
    return model.path, model


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


def open_remote(ref: ModelRef, *, notice: Callable[[str], None] | None = None) -> RemoteEngine:
    """A model on a remote endpoint (`@NAME[/MODEL_ID]`): connects and finds the model; nothing is loaded here."""
    from chatcli import endpoints
    from chatcli.remote import RemoteEngine

    assert ref.kind == "remote" and ref.endpoint is not None
    return RemoteEngine.open(endpoints.get(ref.endpoint), ref.remote_model, notice=notice)


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


def open_embedder(ref: ModelRef, path: Path, options: LoadOptions, *, ctx_size: int | None = None) -> Embedder:
    """An Embedder for the file (header checked; weights load on first use). Only `ctx_size` given here sets the
    longest text: the configured ctx_size is a chat window. The catalogue's context counts for embedding models."""
    from chatcli.embedding import Embedder

    spec = ref.spec
    embedder = Embedder(
        path,
        ctx_size=ctx_size,
        default_ctx=spec.context if spec is not None and spec.kind == "embedding" else None,
        threads=options.threads,
        gpu_layers=options.gpu_layers,
        flash_attn=options.flash_attn,
        verbose=options.verbose,
    )
    store.mark_used(path)
    return embedder
