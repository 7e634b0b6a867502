"""The `chatcli` command line: parses, calls the library, renders, maps errors to exit codes.

Nothing heavy is imported at module level: `chatcli --help` must not load llama_cpp, huggingface_hub or rich.
"""

from __future__ import annotations

import json
import os
import sys

import click

from chatcli import __version__
from chatcli.errors import ChatcliError, ExitCode, OutputClosed

EXIT_CODES_HELP = "Exit codes: 0 ok, 1 error, 2 usage error, 3 context overflow, 130 interrupted."


class _Group(click.Group):
    aliases = {"ls": "list"}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)  # in the order they were added: most used first

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        return super().get_command(ctx, self.aliases.get(name, name))


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_CODES_HELP)
@click.version_option(__version__, "-V", "--version", prog_name="chatcli")
@click.option("--debug", is_flag=True, help="Show Python tracebacks for errors.")
def cli(debug: bool) -> None:
    """Chat with and complete text from local GGUF models (llama.cpp)."""


def _catalogue():
    from chatcli.registry import load_catalogue

    return load_catalogue()


def _ref(text: str, quant: str | None = None):
    from chatcli.registry import parse_ref

    return parse_ref(text, _catalogue(), quant=quant)


def _display(model, catalogue) -> str:
    """How `list` names a cached model: alias:QUANT for catalogue repos, else owner/repo:QUANT or the file."""
    alias = catalogue.alias_for_repo(model.repo)
    quant = model.quant
    if alias and quant and catalogue.get(alias).file_for(quant) == model.filename:
        return f"{alias}:{quant}"
    if quant:
        return f"{model.repo}:{quant}"
    return f"{model.repo}/{model.filename}"


# ---------------------------------------------------------------- pull


@cli.command()
@click.argument("ref")
@click.option("--quant", "-q", help="Quantisation to fetch, e.g. Q4_K_M (default: the catalogue's, else Q4_K_M).")
@click.option("--revision", default="main", show_default=True, help="Branch, tag or commit on the Hub.")
@click.option("--refresh", is_flag=True, help="Check the Hub for a newer revision even if the model is present.")
def pull(ref: str, quant: str | None, revision: str, refresh: bool) -> None:
    """Download a model (alias, owner/repo[:QUANT] or owner/repo/file.gguf) into the Hugging Face cache.

    Interrupted downloads resume where they stopped; every file is checked against the Hub's sha256.
    """
    import time

    from chatcli import console
    from chatcli.pulling import pull_model

    model_ref = _ref(ref, quant)
    started = time.monotonic()
    result = pull_model(model_ref, revision=revision, refresh=refresh, progress=console.DownloadBar())
    name = model_ref.display
    where = result.model.path
    if result.already_present:
        console.info(f"{name} is already downloaded and verified ({console.size(result.model.size)}): {where}")
    else:
        took = time.monotonic() - started
        via = "" if result.source == "hub" else f" from {result.source}"
        console.info(
            f"pulled {name}{via}: {console.size(result.downloaded)} in {took:.1f}s, sha256 verified: {where}"
        )


# ---------------------------------------------------------------- list


@cli.command("list")  # also `ls`
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.option("--available", is_flag=True, help="List the catalogue's models instead of the downloaded ones.")
def list_models(as_json: bool, available: bool) -> None:
    """List downloaded models (also those other Hub tools put in the Hugging Face cache)."""
    from chatcli import console
    from chatcli.listing import available_rows, local_rows

    catalogue = _catalogue()
    rows = available_rows(catalogue) if available else local_rows(catalogue, _display)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        console.info("no models downloaded yet: try `chatcli pull smollm2` (see `chatcli list --available`)")
        return
    from rich.table import Table

    table = Table(box=None, pad_edge=False, header_style="bold")
    if available:
        columns = ["name", "default_quant", "downloaded", "license", "description"]
    else:
        columns = ["reference", "quant", "size", "architecture", "parameters", "context", "last_used"]
    for column in columns:
        table.add_column(column.replace("_", " ").upper())
    for row in rows:
        table.add_row(*[_cell(column, row.get(column)) for column in columns])
    console.out().print(table)


def _cell(column: str, value: object) -> str:
    from chatcli import console

    if column == "size":
        return console.size(value)  # type: ignore[arg-type]
    if column == "parameters":
        return console.count(value)  # type: ignore[arg-type]
    if column == "last_used":
        return console.ago(value)  # type: ignore[arg-type]
    if isinstance(value, bool):
        return "yes" if value else "no"
    return "-" if value is None else str(value)


# ---------------------------------------------------------------- show


@cli.command()
@click.argument("ref")
@click.option("--template", "print_template", is_flag=True, help="Print the model's embedded chat template.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def show(ref: str, print_template: bool, as_json: bool) -> None:
    """Describe a model from its GGUF header, without loading its weights."""
    from chatcli import console
    from chatcli.listing import describe

    catalogue = _catalogue()
    details = describe(_ref(ref), catalogue)
    if print_template:
        template = details.get("chat_template")
        if not template:
            raise ChatcliError(f"{ref} has no embedded chat template (chatcli will use a built-in one)")
        click.echo(template)
        return
    if as_json:
        click.echo(json.dumps(details, indent=2))
        return
    from rich.table import Table

    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    for key, value in details.items():
        if key == "chat_template":
            value = "yes (`chatcli show --template` prints it)" if value else "no (a built-in will be used)"
        elif key in ("size",):
            value = f"{console.size(value)} ({value:,} bytes)"
        elif key == "parameters":
            value = console.count(value)
        elif key == "last_used":
            value = console.ago(value)
        table.add_row(key.replace("_", " "), "-" if value in (None, "") else str(value))
    console.out().print(table)


# ---------------------------------------------------------------- rm


@cli.command()
@click.argument("ref")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
def rm(ref: str, yes: bool) -> None:
    """Remove a downloaded model from the Hugging Face cache."""
    from chatcli import console, hub, store

    model_ref = _ref(ref)
    if model_ref.kind == "local":
        raise ChatcliError(f"{model_ref.local_path} is not in the model cache; delete the file yourself if you mean to")
    model = hub.locate(model_ref)
    if model is None:
        raise ChatcliError(f"{model_ref.display} is not downloaded (see `chatcli list`)")
    label = f"{model_ref.display} ({console.size(model.size)}, {len(model.parts)} file(s) in {model.repo})"
    if not yes:
        if not sys.stdin.isatty():
            raise ChatcliError(f"not removing {label} without confirmation: pass -y")
        click.confirm(f"Remove {label}?", abort=True, err=True)
    freed = store.remove(model)
    console.info(f"removed {model_ref.display}: freed {console.size(freed)}")


# ---------------------------------------------------------------- running models


def model_options(func):  # noqa: ANN001, ANN201 - a click decorator
    """Options shared by every command that loads a model."""
    options = [
        click.option("-m", "--model", "model", metavar="REF", help="Model to use (default: `chatcli config show`)."),
        click.option("--pull", "pull", is_flag=True, help="Download the model first if it is missing."),
        click.option("-c", "--ctx-size", type=int, help="Context window in tokens (default: the model's, capped)."),
        click.option("--threads", type=int, help="CPU threads (default: physical cores)."),
        click.option("--gpu-layers", default=None, metavar="auto|all|N", help="Layers to offload to the GPU."),
        click.option("--flash-attn/--no-flash-attn", default=None, help="Use flash attention."),
        click.option("-v", "--verbose", is_flag=True, help="Show llama.cpp's log and load details on stderr."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _load_options(ctx_size, threads, gpu_layers, flash_attn, verbose):  # noqa: ANN001, ANN202
    from chatcli import config
    from chatcli.runner import LoadOptions

    if ctx_size is not None and ctx_size < 16:
        raise click.BadParameter("must be 16 or more", param_hint="--ctx-size")
    if threads is not None and threads < 1:
        raise click.BadParameter("must be 1 or more", param_hint="--threads")
    settings = config.effective()
    return LoadOptions(
        ctx_size=ctx_size or settings["ctx_size"].value,
        threads=threads or settings["threads"].value,
        gpu_layers=gpu_layers or settings["gpu_layers"].value,
        flash_attn=settings["flash_attn"].value if flash_attn is None else flash_attn,
        verbose=verbose,
    )


def _ask_to_pull(ref) -> bool:  # noqa: ANN001
    """On a terminal, offer to download a missing model once; elsewhere, never ask."""
    if not (sys.stdin.isatty() and sys.stderr.isatty()):
        return False
    from chatcli import console

    size = ""
    mirror = next((m for m in (ref.spec.mirrors if ref.spec else ()) if m.quant == ref.quant and m.size), None)
    if mirror is not None:
        size = f" ({console.size(mirror.size)})"
    return click.confirm(f"{ref.display} is not downloaded. Download it{size} now?", default=True, err=True)


def _open_engine(model_ref_text, pull, load_options):  # noqa: ANN001, ANN202
    from chatcli import console, runner

    ref = runner.resolve(model_ref_text)

    def pulled(result) -> None:  # noqa: ANN001
        via = "" if result.source == "hub" else f" from {result.source}"
        console.info(f"pulled {ref.display}{via} ({console.size(result.model.size)}, sha256 verified)")

    path = runner.ensure_present(ref, pull=pull, confirm=_ask_to_pull, progress=console.DownloadBar(),
                                 on_pulled=pulled)
    engine = runner.load(ref, path, load_options)
    if load_options.verbose:
        where = f"GPU ({engine.gpu_layers if engine.gpu_layers >= 0 else 'all'} layers)" \
            if engine.gpu_layers else "CPU"
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
            return open(grammar_file, encoding="utf-8").read()  # noqa: SIM115
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"invalid value for --grammar: cannot read {grammar_file}: {exc}") from exc
    if json_schema:
        from chatcli.grammars import schema_to_gbnf

        return schema_to_gbnf(json_schema)
    return None


@cli.command()
@click.argument("text", required=False)
@model_options
@click.option("-n", "--max-tokens", type=int, default=None, help="Stop after N tokens (default: until the model ends).")
@click.option("--temperature", type=float, default=None, help="Randomness; 0 = always the likeliest token.")
@click.option("--top-p", type=float, default=None, help="Nucleus sampling threshold.")
@click.option("--top-k", type=int, default=None, help="Sample from the K likeliest tokens (0 = all).")
@click.option("--min-p", type=float, default=None, help="Drop tokens less likely than this times the top one.")
@click.option("--repeat-penalty", type=float, default=None, help="Penalise repeated tokens (1 = off).")
@click.option("--seed", type=int, default=None, help="Random seed, for reproducible sampling.")
@click.option("--stop", multiple=True, help="Stop when this string appears (repeatable).")
@click.option("--echo", is_flag=True, help="Print the prompt before the completion.")
@click.option("--chat", "as_chat", is_flag=True, help="Send the text as a user message through the chat template.")
@click.option("-s", "--system", help="System prompt (with --chat).")
@click.option("--template", "chat_template", help="Chat template (with --chat): a built-in name, default auto.")
@click.option("--grammar", "grammar_file", type=click.Path(dir_okay=False), help="Constrain output with a GBNF file.")
@click.option("--json-schema", help="Constrain output to a JSON schema (a file or inline JSON).")
@click.option("--truncate", is_flag=True, help="If the prompt is too long, keep its end instead of failing.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object at the end (text, tokens, timings).")
@click.option("--jsonl", "as_jsonl", is_flag=True, help="Print one JSON event per chunk, then a summary.")
def complete(text, model, pull, ctx_size, threads, gpu_layers, flash_attn, verbose, max_tokens, temperature,
             top_p, top_k, min_p, repeat_penalty, seed, stop, echo, as_chat, system, chat_template, grammar_file,
             json_schema, truncate, as_json, as_jsonl) -> None:  # noqa: ANN001
    """Complete TEXT (and/or stdin) and stream the result to stdout.

    \b
    Prompt = TEXT and piped stdin, joined with a blank line.
      chatcli complete "The quick brown fox"
      cat notes.txt | chatcli complete "Summary:" | tee out.txt
    """
    from chatcli import completing, console
    from chatcli.errors import UsageError

    if as_json and as_jsonl:
        raise UsageError("use either --json or --jsonl, not both")
    if system and not as_chat:
        raise UsageError("--system needs --chat")
    request = completing.CompletionRequest(
        prompt=completing.join_prompt(text, _read_stdin()),
        options=completing.sampling_options(
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
            repeat_penalty=repeat_penalty, seed=seed, stop=stop, grammar=_grammar_source(grammar_file, json_schema),
        ),
        chat=as_chat,
        system=system,
        template=chat_template,
        truncate=truncate,
    )
    load_options = _load_options(ctx_size, threads, gpu_layers, flash_attn, verbose)
    ref, engine = _open_engine(model, pull, load_options)
    mode = "json" if as_json else "jsonl" if as_jsonl else "text"
    completing.run(engine, ref, request, completing.Output(sys.stdout, mode=mode, echo=echo, warn=console.warn))


# ---------------------------------------------------------------- config


@cli.group("config")
def config_group() -> None:
    """Show or change settings (the config file, overridden by CHATCLI_* variables)."""


@config_group.command("show")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def config_show(as_json: bool) -> None:
    """Print every effective setting and where it came from."""
    from chatcli import config, paths

    settings = config.effective()
    places = {"config_file": str(config.config_path()), "config_dir": str(paths.config_dir()),
              "data_dir": str(paths.data_dir()), "cache_dir": str(paths.cache_dir()),
              "models_dir": str(paths.hf_hub_cache())}
    if as_json:
        payload = {name: {"value": s.value, "source": s.source} for name, s in settings.items()}
        click.echo(json.dumps({"settings": payload, "paths": places}, indent=2))
        return
    width = max(len(name) for name in [*settings, *places])
    for name, setting in settings.items():
        value = "-" if setting.value is None else setting.value
        click.echo(f"{name:<{width}}  {value}  ({setting.source})")
    for name, place in places.items():
        click.echo(f"{name:<{width}}  {place}")


@config_group.command("set")
@click.argument("name")
@click.argument("value")
def config_set(name: str, value: str) -> None:
    """Set NAME to VALUE in the config file (e.g. `chatcli config set default_model qwen2.5`)."""
    from chatcli import config, console

    if name == "default_model":
        _ref(value)  # refuse a reference that cannot work
    stored = config.set_value(name, value)
    console.info(f"{name} = {stored} (in {config.config_path()})")


@config_group.command("unset")
@click.argument("name")
def config_unset(name: str) -> None:
    """Remove NAME from the config file (back to its default)."""
    from chatcli import config

    config.unset(name)


# ---------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; the one place that turns exceptions into messages and exit codes."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args or os.environ.get("CHATCLI_DEBUG", "") not in ("", "0")
    try:
        code = cli.main(args=args, prog_name="chatcli", standalone_mode=False)
    except click.exceptions.Abort as exc:
        if isinstance(exc.__cause__, KeyboardInterrupt):  # click turns Ctrl-C into Abort
            click.echo("interrupted", err=True)
            code = ExitCode.INTERRUPTED
        else:
            click.echo("aborted", err=True)
            code = ExitCode.ERROR
    except click.ClickException as exc:
        exc.show()
        code = exc.exit_code
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except OutputClosed:
        _silence_stdout()
        code = ExitCode.OK
    except ChatcliError as exc:
        _report(exc, debug)
        code = exc.exit_code
    except KeyboardInterrupt:
        click.echo("\ninterrupted", err=True)
        code = ExitCode.INTERRUPTED
    except BrokenPipeError:
        _silence_stdout()
        code = ExitCode.OK
    except Exception as exc:  # noqa: BLE001 - last resort: one line, traceback with --debug
        _report(exc, debug, internal=True)
        code = ExitCode.ERROR
    sys.exit(int(code or 0))


def _silence_stdout() -> None:
    """The reader went away (`| head`): keep Python from complaining when it flushes stdout at exit."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def _report(exc: BaseException, debug: bool, internal: bool = False) -> None:
    if debug:
        import traceback

        traceback.print_exception(exc, file=sys.stderr)
    message = str(exc) or type(exc).__name__
    if internal:
        message = f"internal error: {type(exc).__name__}: {message} (run with --debug for the traceback)"
    click.echo(f"error: {message}", err=True)
