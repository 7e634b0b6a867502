"""Commands that run a model: complete, chat, bench (registered on the `cli` group)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import cast

import click

from chatcli.engine import SETTINGS, InvalidSetting, SamplingOptions

_SHORT_FLAGS = {"max_tokens": "-n"}


def model_options(func=None, *, default="`chatcli config show`",  # noqa: ANN001, ANN201 - a click decorator
                  ctx_help="Context window in tokens (default: the model's, capped)."):
    """Options shared by every command that loads a model (`@model_options`, or `@model_options(default=...)`)."""
    if func is None:
        return lambda f: model_options(f, default=default, ctx_help=ctx_help)
    options = [
        click.option("-m", "--model", "model", metavar="REF", help=f"Model to use (default: {default})."),
        click.option("--pull", "pull", is_flag=True, help="Download the model first if it is missing."),
        click.option("-c", "--ctx-size", type=int, help=ctx_help),
        click.option("--threads", type=int, help="CPU threads (default: the physical cores, shared with other "
                     "chatcli processes generating at once)."),
        click.option("--gpu-layers", default=None, metavar="auto|all|N", help="Layers to offload to the GPU."),
        click.option("--flash-attn/--no-flash-attn", default=None, help="Use flash attention."),
        click.option("-v", "--verbose", is_flag=True, help="Show llama.cpp's log and load details on stderr."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def sampling_flags(func):  # noqa: ANN001, ANN201 - a click decorator
    """One flag per sampling setting (SamplingOptions' fields): -n/--max-tokens, --temperature, … --seed."""
    for setting in reversed(SETTINGS):
        names = [*filter(None, [_SHORT_FLAGS.get(setting.name)]), flag(setting.name)]
        func = click.option(*names, setting.name, type=setting.metadata["kind"], default=None,
                            help=str(setting.metadata["help"]))(func)
    return func


def flag(setting: str) -> str:
    return "--" + setting.replace("_", "-")


def _sampling_options(*layers: dict | None, **given: object) -> SamplingOptions:
    """completion.sampling_options, with an out-of-range value named as the flag that sets it."""
    from chatcli import completion
    from chatcli.errors import UsageError

    try:
        return completion.sampling_options(*layers, **given)
    except InvalidSetting as exc:
        raise UsageError(f"invalid value for {flag(exc.name)}: {exc.why}") from None


def _given(sampling: dict[str, object]) -> dict[str, object]:
    """The sampling flags the user gave."""
    return {name: value for name, value in sampling.items() if value is not None}


def _load_options(ctx_size, threads, gpu_layers, flash_attn, verbose):  # noqa: ANN001, ANN202
    from chatcli import config
    from chatcli.loading import LoadOptions

    if ctx_size is not None and ctx_size < 16:
        raise click.BadParameter("must be 16 or more", param_hint="--ctx-size")
    if threads is not None and threads < 1:
        raise click.BadParameter("must be 1 or more", param_hint="--threads")
    settings = {name: setting.value for name, setting in config.effective().items()}  # parsed by config
    return LoadOptions(
        ctx_size=ctx_size or cast("int | None", settings["ctx_size"]),
        threads=threads or cast("int | None", settings["threads"]),
        gpu_layers=gpu_layers or str(settings["gpu_layers"]),
        flash_attn=bool(settings["flash_attn"]) if flash_attn is None else flash_attn,
        verbose=verbose,
    )


def _ask_to_pull(ref) -> bool:  # noqa: ANN001
    """On a terminal, offer to download a missing model once; elsewhere, never ask."""
    if not (sys.stdin.isatty() and sys.stderr.isatty()):
        return False
    from chatcli.cli import console

    size = ""
    mirror = next((m for m in (ref.spec.mirrors if ref.spec else ()) if m.quant == ref.quant and m.size), None)
    if mirror is not None:
        size = f" ({console.size(mirror.size)})"
    return click.confirm(f"{ref.display} is not downloaded. Download it{size} now?", default=True, err=True)


def _present(ref, pull):  # noqa: ANN001, ANN202
    """The local file of a (non-remote) reference: pulled first with --pull, or after asking on a terminal."""
    from chatcli import loading
    from chatcli.cli import console

    def pulled(result) -> None:  # noqa: ANN001
        via = "" if result.source == "hub" else f" from {result.source}"
        console.info(f"pulled {ref.display}{via} ({console.size(result.model.size)}, sha256 verified)")

    return loading.ensure_present(ref, pull=pull, confirm=_ask_to_pull, progress=console.DownloadBar(),
                                  on_pulled=pulled, notice=console.warn)


def _open_engine(model, pull, load_options, *, allow_remote=True):  # noqa: ANN001, ANN202
    """Load the model `model` names (a reference's text, None for the default, or a ModelRef already resolved)."""
    from chatcli import loading
    from chatcli.cli import console
    from chatcli.registry import ModelRef

    ref = model if isinstance(model, ModelRef) else loading.resolve(model)
    if ref.kind == "remote":  # @NAME[/MODEL_ID]: nothing to pull or load; the load options are the server's
        if not allow_remote:
            from chatcli.errors import UsageError

            raise UsageError(f"{ref.display} is a remote model: bench measures models run here")
        remote = loading.open_remote(ref, notice=console.warn)
        if load_options.verbose:
            console.info(f"using {remote.label} at {remote.endpoint.api_base} (found in {remote.load_seconds:.2f}s)")
        return ref, remote

    path = _present(ref, pull)
    engine = loading.load(ref, path, load_options)
    if load_options.verbose:
        from chatcli.engine import gpu_offload_supported

        on_gpu = engine.gpu_layers != 0 and gpu_offload_supported()
        where = f"GPU ({engine.gpu_layers if engine.gpu_layers >= 0 else 'all'} layers)" if on_gpu else \
            "CPU (this llama.cpp build has no GPU offload)" if engine.gpu_layers else "CPU"
        console.info(f"loaded {path.name} in {engine.load_seconds:.2f}s on {where}: "
                     f"ctx {engine.n_ctx}, {engine.n_threads} threads")
    return ref, engine


def _read_stdin() -> str | None:
    if sys.stdin is None or sys.stdin.isatty():
        return None
    data = sys.stdin.buffer.read()
    return data.decode("utf-8", errors="replace")


def _grammar_source(grammar_file: str | None, json_schema: str | None) -> str | None:
    from chatcli.errors import UsageError

    if grammar_file and json_schema:
        raise UsageError("use either --grammar or --json-schema, not both")
    if grammar_file:
        try:
            return Path(grammar_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"invalid value for --grammar: cannot read {grammar_file}: {exc}") from exc
    if json_schema:
        from chatcli.grammars import schema_to_gbnf

        return schema_to_gbnf(json_schema)
    return None


@click.command()
@click.argument("text", required=False)
@model_options
@sampling_flags
@click.option("--stop", multiple=True, help="Stop when this string appears (repeatable).")
@click.option("--echo", is_flag=True, help="Print the prompt before the completion.")
@click.option("--chat", "as_chat", is_flag=True, help="Send the text as a user message through the chat template.")
@click.option("-s", "--system", help="System prompt (with --chat).")
@click.option("--chat-template", "chat_template", help="Chat template (with --chat): auto or a built-in name.")
@click.option("-t", "--template", "prompt_template", metavar="NAME", help="Use one of your prompt templates.")
@click.option("--var", "variables", multiple=True, metavar="NAME=VALUE", help="A prompt template variable.")
@click.option("--grammar", "grammar_file", type=click.Path(dir_okay=False), help="Constrain output with a GBNF file.")
@click.option("--json-schema", help="Constrain output to a JSON schema (a file or inline JSON).")
@click.option("-f", "--file", "files", multiple=True, metavar="PATH",
              help="Put a text file into the prompt, before TEXT, under a line naming it (repeatable).")
@click.option("--truncate", is_flag=True, help="If the prompt is too long, cut the -f files, then keep the prompt's "
              "end, instead of failing.")
@click.option("--cache", is_flag=True, help="Keep the prompt's model state, so a repeated prefix (same stdin) is not "
              "read again.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object at the end (text, tokens, timings).")
@click.option("--jsonl", "as_jsonl", is_flag=True, help="Print one JSON event per chunk, then a summary.")
def complete(text, model, pull, ctx_size, threads, gpu_layers, flash_attn, verbose, stop, echo, as_chat, system,
             chat_template, prompt_template, variables, grammar_file, json_schema, files, truncate, cache, as_json,
             as_jsonl, **sampling) -> None:  # noqa: ANN001
    """Complete TEXT (and/or stdin) and stream the result to stdout.

    \b
    Prompt = TEXT and piped stdin, joined with a blank line.
      chatcli complete "The quick brown fox"
      cat notes.txt | chatcli complete "Summary:" | tee out.txt
      chatcli complete --chat -f notes.txt "Summarise the file."
    """
    from chatcli import completion
    from chatcli.cli import console
    from chatcli.errors import UsageError

    if as_json and as_jsonl:
        raise UsageError("use either --json or --jsonl, not both")
    if variables and not prompt_template:
        raise UsageError("--var needs -t/--template")
    stdin_text = _read_stdin()
    attached = []
    if files:
        from chatcli import attachments

        attached = attachments.read_all(files, truncate=truncate)  # binary or not UTF-8: refused before loading
    prompt = completion.join_prompt(text, stdin_text, allow_empty=prompt_template is not None or bool(attached))
    defaults: dict = {}
    if prompt_template:
        from chatcli import prompt_templates

        template = prompt_templates.load_template(prompt_template)
        template_system, prompt = template.render(prompt or None, prompt_templates.parse_vars(variables))
        system = system or template_system
        as_chat = as_chat or bool(system)
        model = model or template.model
        defaults = dict(template.options)
    if system and not as_chat:
        raise UsageError("--system needs --chat")
    given = {**_given(sampling), "stop": stop or None}
    from chatcli import loading

    resolved = loading.resolve(model)
    remote = resolved.kind == "remote"
    if remote and grammar_file:
        raise UsageError("--grammar (GBNF) works with models run here; for a remote model use --json-schema")
    grammar = None if remote else _grammar_source(grammar_file, json_schema)
    schema = None
    if remote and json_schema:
        from chatcli.grammars import load_schema

        schema = load_schema(json_schema)  # sent as response_format: the server constrains its output
    _sampling_options(defaults, **given)  # a bad flag is a usage error before the model loads
    load_options = _load_options(ctx_size, threads, gpu_layers, flash_attn, verbose)
    ref, engine = _open_engine(resolved, pull, load_options)
    # flags > the prompt template's options > the catalogue's for this model > built-in defaults
    catalogue = ref.spec.options if ref.spec else None
    request = completion.CompletionRequest(
        prompt=prompt,
        options=_sampling_options(catalogue, defaults, grammar=grammar, **given),
        chat=as_chat,
        system=system,
        template=chat_template,
        truncate=truncate,
        cache=cache,
        cache_prefix=stdin_text if stdin_text and text and not (prompt_template or as_chat) else None,
        json_schema=schema,
    )
    if attached:  # the files go first, each in its block; cut to fit with --truncate (a remote server judges itself)
        from chatcli import attachments

        if not remote:
            attached, notes = attachments.fit_completion(engine, ref, request, attached, prompt, truncate=truncate)
            for note in notes:
                console.warn(note)
        request.prompt = attachments.join(attached, prompt)
        if request.cache_prefix is not None:
            request.cache_prefix = attachments.join(attached, request.cache_prefix)
    mode = "json" if as_json else "jsonl" if as_jsonl else "text"
    completion.run(engine, ref, request, completion.Output(sys.stdout, mode=mode, echo=echo, warn=console.warn))


@click.command()
@model_options
@sampling_flags
@click.option("-s", "--system", help="System prompt.")
@click.option("-t", "--template", "prompt_template", metavar="NAME", help="Start from one of your prompt templates.")
@click.option("--var", "variables", multiple=True, metavar="NAME=VALUE", help="A prompt template variable.")
@click.option("--chat-template", "chat_template", help="Chat template: auto (the model's own) or a built-in name.")
@click.option("--continue", "continue_", is_flag=True, help="Continue the latest conversation.")
@click.option("--conversation", "conversation_id", metavar="ID", help="Continue conversation ID.")
@click.option("--no-history", is_flag=True, help="Do not store this conversation.")
@click.option("-f", "--file", "files", multiple=True, metavar="PATH",
              help="Attach a text file to your first message, under a line naming it (repeatable; /file in the chat).")
@click.option("--truncate", is_flag=True, help="Cut attached files that do not fit the context window instead of "
              "refusing them.")
def chat(model, pull, ctx_size, threads, gpu_layers, flash_attn, verbose, system, prompt_template, variables,
         chat_template, continue_, conversation_id, no_history, files, truncate, **sampling) -> None:  # noqa: ANN001
    """Chat with a model in a REPL (or answer each line of piped stdin).

    \b
    Replies stream as Markdown; Ctrl-C stops a reply, Ctrl-D leaves. /help lists the commands.
    Every turn is stored as it happens: `chatcli chat --continue` picks up where you left off.
    Sampling flags win over a continued conversation's /set values, a prompt template's options and the
    model's catalogue options; /set changes them during the chat.
    """
    from chatcli.attachments import read_all
    from chatcli.cli.chat import start as start_chat
    from chatcli.errors import UsageError

    if continue_ and conversation_id:
        raise UsageError("use either --continue or --conversation, not both")
    attached = read_all(files, truncate=truncate)  # binary or not UTF-8: refused before the model loads
    given = _given(sampling)
    _sampling_options(**given)  # a bad flag is a usage error before the model loads
    load_options = _load_options(ctx_size, threads, gpu_layers, flash_attn, verbose)
    code = start_chat(
        model=model, system=system, prompt_template=prompt_template, chat_template=chat_template,
        continue_latest=continue_, conversation_id=conversation_id, history=not no_history, variables=variables,
        settings=given, open_engine=lambda ref_text: _open_engine(ref_text, pull, load_options),
        files=attached, truncate=truncate,
    )
    sys.exit(code)


@click.command()
@click.argument("model", required=False)
@click.option("-p", "--prompt-tokens", "n_prompt", type=click.IntRange(1, 16384), default=512, show_default=True,
              help="Prompt length for the prompt-processing test.")
@click.option("-n", "--gen-tokens", "n_gen", type=click.IntRange(1, 4096), default=128, show_default=True,
              help="Tokens to generate for the generation test.")
@click.option("-r", "--repetitions", type=click.IntRange(1, 100), default=3, show_default=True)
@click.option("-c", "--ctx-size", type=int, help="Context window (default: prompt + generation).")
@click.option("--threads", type=int,
              help="CPU threads (default: the physical cores, shared with other chatcli processes generating at once).")
@click.option("--gpu-layers", default=None, metavar="auto|all|N", help="Layers to offload to the GPU.")
@click.option("--flash-attn/--no-flash-attn", default=None, help="Use flash attention.")
@click.option("--pull", "pull", is_flag=True, help="Download the model first if it is missing.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def bench(model, n_prompt, n_gen, repetitions, ctx_size, threads, gpu_layers, flash_attn, pull,
          as_json) -> None:  # noqa: ANN001
    """Measure prompt processing and generation speed on this machine (like llama-bench)."""
    from chatcli import bench as benchlib
    from chatcli.cli import console

    default_ctx = max(n_prompt + 1, 64 + n_gen) + 16  # pp needs the prompt, tg a short prompt + n_gen
    load_options = _load_options(ctx_size or default_ctx, threads, gpu_layers, flash_attn, False)
    ref, engine = _open_engine(model, pull, load_options, allow_remote=False)
    with console.err().status("benchmarking…") if console.stderr_is_tty() else _nothing():
        report = benchlib.run_bench(engine, prompt_lengths=(n_prompt,), gen_lengths=(n_gen,), repetitions=repetitions)
    if as_json:
        click.echo(json.dumps(benchlib.to_json(report), indent=2))
        return
    from rich.table import Table

    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in benchlib.HEADER:
        table.add_column(column, justify="right" if column in ("t/s", "size", "params", "n_ctx") else "left")
    for row in benchlib.table_rows(report):
        table.add_row(*row)
    console.print_table(table)


def _nothing():  # noqa: ANN202
    from contextlib import nullcontext

    return nullcontext()


COMMANDS = [complete, chat, bench]
