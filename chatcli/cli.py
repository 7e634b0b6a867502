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

    order = ("chat", "complete", "pull", "list", "show", "rm", "bench", "history", "templates", "config", "cache")

    def list_commands(self, ctx: click.Context) -> list[str]:
        """Most used first."""
        return sorted(self.commands, key=lambda name: self.order.index(name) if name in self.order else 99)

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
    from chatcli.errors import Interrupted
    from chatcli.pulling import pull_model

    model_ref = _ref(ref, quant)
    started = time.monotonic()
    try:
        result = pull_model(model_ref, revision=revision, refresh=refresh, progress=console.DownloadBar(),
                            notice=console.warn)
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted: what was downloaded is kept; `chatcli pull {ref}` resumes it") from None
    name = model_ref.display
    if model_ref.kind == "repo":
        name += f" ({result.model.filename})"
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
    if not available and console.stderr_is_tty():
        from chatcli.store import partial_downloads

        partial = partial_downloads()
        if partial:
            held = console.size(sum(p.stat().st_size for p in partial))
            console.info(f"{len(partial)} unfinished download(s) ({held}) in the cache: pulling the model again "
                         "resumes it")
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
    console.print_table(table)


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
    console.print_table(table)


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


# ---------------------------------------------------------------- entry point


def _register() -> None:
    """The other command modules add themselves to `cli` on import (all light: click only)."""
    from chatcli import cli_manage, cli_run  # noqa: F401


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; the one place that turns exceptions into messages and exit codes."""
    _register()
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
