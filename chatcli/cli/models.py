"""Commands that manage model files: pull, list, show, rm."""

from __future__ import annotations

import json
import sys

import click

from chatcli.cli.common import catalogue as _catalogue
from chatcli.cli.common import display as _display
from chatcli.cli.common import model_ref as _ref
from chatcli.errors import ChatcliError


# ---------------------------------------------------------------- pull


@click.command()
@click.argument("ref")
@click.option("--quant", "-q", help="Quantisation to fetch, e.g. Q4_K_M (default: the catalogue's, else Q4_K_M).")
@click.option("--revision", default="main", show_default=True, help="Branch, tag or commit on the Hub.")
@click.option("--refresh", is_flag=True, help="Check the Hub for a newer revision even if the model is present.")
def pull(ref: str, quant: str | None, revision: str, refresh: bool) -> None:
    """Download a model (alias, owner/repo[:QUANT] or owner/repo/file.gguf) into the Hugging Face cache.

    Interrupted downloads resume where they stopped; every file is checked against the Hub's sha256.
    """
    import time

    from chatcli.cli import console
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


@click.command("list")  # also `ls`
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.option("--available", is_flag=True, help="List the catalogue's models instead of the downloaded ones.")
def list_models(as_json: bool, available: bool) -> None:
    """List downloaded models (also those other Hub tools put in the Hugging Face cache)."""
    from chatcli.cli import console
    from chatcli.inventory import available_rows, local_rows

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
    from chatcli.cli import console

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


@click.command()
@click.argument("ref")
@click.option("--template", "print_template", is_flag=True, help="Print the model's embedded chat template.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def show(ref: str, print_template: bool, as_json: bool) -> None:
    """Describe a model from its GGUF header, without loading its weights."""
    from chatcli.cli import console
    from chatcli.inventory import describe

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


@click.command()
@click.argument("ref")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
def rm(ref: str, yes: bool) -> None:
    """Remove a downloaded model from the Hugging Face cache."""
    from chatcli import hub, store
    from chatcli.cli import console

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




COMMANDS = [pull, list_models, show, rm]
