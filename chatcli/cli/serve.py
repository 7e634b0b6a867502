"""`chatcli serve`: parse the options, refuse unsafe binds, load the models once, hand them to chatcli.serve.

The checks that need no model (the bind address, the key, duplicate ids, missing downloads) run before
anything loads, so a mistake is reported in a second rather than after minutes of loading.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from chatcli.cli.run import _load_options

if TYPE_CHECKING:
    from pathlib import Path

    from chatcli.registry import ModelRef
    from chatcli.serve import ServedModel


@click.command()
@click.option("-m", "--model", "models", multiple=True, metavar="REF",
              help="A model to serve (repeatable; default: `chatcli config show`). Clients name it by REF as "
                   "given, or by its file name for a local path.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; anything but loopback needs an API key.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True,
              help="Port to listen on (0: any free port).")
@click.option("--api-key", envvar="CHATCLI_API_KEY", metavar="KEY",
              help="Require `Authorization: Bearer KEY` (prefer the CHATCLI_API_KEY variable: arguments show in ps).")
@click.option("--pull", "pull", is_flag=True, help="Download missing models before serving.")
@click.option("--queue", "max_waiting", type=click.IntRange(0, 4096), default=16, show_default=True,
              help="Requests that may wait per model while one runs; more get 503 with Retry-After.")
@click.option("--cors", "cors_origins", multiple=True, metavar="ORIGIN",
              help="Let web pages from ORIGIN call the API (repeatable; default: none).")
@click.option("-c", "--ctx-size", type=int, help="Context window in tokens (default: the model's, capped).")
@click.option("--threads", type=int, help="CPU threads (default: physical cores).")
@click.option("--gpu-layers", default=None, metavar="auto|all|N", help="Layers to offload to the GPU.")
@click.option("--flash-attn/--no-flash-attn", default=None, help="Use flash attention.")
@click.option("-v", "--verbose", is_flag=True, help="Log each request, and llama.cpp's log, on stderr.")
def serve(models: tuple[str, ...], host: str, port: int, api_key: str | None, pull: bool, max_waiting: int,
          cors_origins: tuple[str, ...], ctx_size: int | None, threads: int | None, gpu_layers: str | None,
          flash_attn: bool | None, verbose: bool) -> None:
    """Serve models over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models;
    /v1/embeddings for embedding models).

    \b
    Models load once and stay warm; each serves one request at a time, the rest wait in arrival order.
      chatcli serve -m smollm2
      OPENAI_BASE_URL=http://127.0.0.1:8080/v1 OPENAI_API_KEY=none python my_app.py
    """
    from chatcli import loading
    from chatcli import serve as server_lib
    from chatcli.cli import console
    from chatcli.errors import UsageError
    from chatcli.serve_embeddings import ServedEmbedder

    api_key = api_key or None
    if not api_key and not server_lib.is_loopback(host):
        raise UsageError(f"refusing to listen on {host} without an API key: anyone who can reach it could use "
                         "this machine; pass --api-key KEY or set CHATCLI_API_KEY, or keep --host 127.0.0.1")
    load_options = _load_options(ctx_size, threads, gpu_layers, flash_attn, verbose)

    wanted: list[tuple[str, ModelRef]] = []
    ids: set[str] = set()
    for text in models or (loading.default_model_ref(),):
        ref = loading.resolve(text)
        model_id = server_lib.model_id(text, ref)
        if model_id in ids:
            raise UsageError(f"model id {model_id!r} is given twice: each model is served under one name")
        ids.add(model_id)
        wanted.append((model_id, ref))
    # Every file is found (or pulled, with --pull) before the first load: a missing second model fails fast.
    paths = [loading.ensure_present(ref, pull=pull, confirm=None, progress=console.DownloadBar(),
                                    notice=console.warn) for _, ref in wanted]
    sock = server_lib.bind(host, port)

    served: list[ServedModel] = []
    embedders: list[ServedEmbedder] = []
    try:
        for (model_id, ref), path in zip(wanted, paths, strict=True):
            file = "" if path.name == model_id else f" ({path.name})"
            if _is_embedding_model(path):  # served on /v1/embeddings
                embedder = loading.open_embedder(ref, path, load_options, ctx_size=ctx_size)
                embedder.load()
                console.info(f"loaded {model_id}{file} in {embedder.load_seconds:.2f}s: embeddings, "
                             f"{embedder.width} dimensions, {embedder.pooling_name} pooling, texts up to "
                             f"{embedder.max_tokens} tokens")
                embedders.append(ServedEmbedder(model_id, ref, embedder))
                continue
            engine = loading.load(ref, path, load_options)
            console.info(f"loaded {model_id}{file} in {engine.load_seconds:.2f}s: ctx {engine.n_ctx}, "
                         f"{engine.n_threads} threads")
            served.append(server_lib.serve_model(model_id, ref, engine, max_waiting=max_waiting,
                                                 log=console.info))
        settings = server_lib.ServeSettings(host=host, api_key=api_key, cors_origins=cors_origins,
                                            log_requests=verbose)
        server = server_lib.Server(served, settings, log=console.info, embedders=embedders)
    except BaseException:
        sock.close()
        for model in served:
            model.worker.close()
        for embedding_model in embedders:
            embedding_model.close()
        raise
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host

    def ready() -> None:
        key = " (API key required)" if api_key else ""
        names = [model.id for model in served] + [f"{model.id} (embeddings)" for model in embedders]
        console.info(f"serving {', '.join(names)} at http://{shown}:{bound_port}/v1{key}; Ctrl-C stops")

    try:
        server_lib.run(server, sock, on_ready=ready)
    finally:
        for model in served:
            model.engine.close()
        for embedding_model in embedders:
            embedding_model.close()


def _is_embedding_model(path: Path) -> bool:
    from chatcli.engine import checked_header
    from chatcli.families import EMBEDDING, family

    # checked (and remembered) once here: the engine or embedder that opens the file next finds it in the cache
    return family(checked_header(path)).name == EMBEDDING


COMMANDS = [serve]
