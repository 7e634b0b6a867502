"""Commands that manage model files: pull, list, show, rm."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING

import click

from chatcli.cli.common import catalogue as _catalogue
from chatcli.cli.common import display as _display
from chatcli.cli.common import model_ref as _ref
from chatcli.errors import ChatcliError, UsageError

if TYPE_CHECKING:
    from chatcli.registry import ModelRef


# ---------------------------------------------------------------- pull


@click.command()
@click.argument("ref")
@click.option("--quant", "-q", help="Quantisation to fetch, e.g. Q4_K_M, or auto: the largest that fits this machine "
              "(default: the pull_quant setting, else the catalogue's, else Q4_K_M).")
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

    model_ref = _auto_quant(ref, quant, revision)
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
@click.option("--endpoint", "endpoint_name", metavar="NAME", help="List the models a remote endpoint serves.")
def list_models(as_json: bool, available: bool, endpoint_name: str | None) -> None:
    """List downloaded models: the Hugging Face cache's, and GGUF models ollama, LM Studio, llama.cpp and GPT4All
    downloaded (SOURCE), usable in place as ollama:NAME[:TAG], lmstudio:PUBLISHER/REPO/FILE.gguf, llamacpp:FILE,
    gpt4all:FILE."""
    from chatcli.cli import console
    from chatcli.inventory import available_rows, local_rows

    if endpoint_name is not None:
        _list_remote(endpoint_name.removeprefix("@"), as_json)
        return
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
        columns = ["name", "kind", "default_quant", "downloaded", "license", "description"]
    else:
        columns = ["reference", "source", "quant", "size", "architecture", "parameters", "context", "last_used"]
    for column in columns:
        # what a user types next (the name, the reference) and the kind are never cut on a narrow terminal
        whole = column in ("name", "reference", "kind")
        width = max((len(_cell(column, row.get(column))) for row in rows), default=0) if whole else None
        table.add_column(column.replace("_", " ").upper(), no_wrap=whole, min_width=width,
                         overflow="ellipsis" if whole else "fold")
    for row in rows:
        table.add_row(*[_cell(column, row.get(column)) for column in columns])
    console.print_table(table)


def _arch_cell(architecture: str | None, family: str | None) -> str:
    """"llama", or "bert (embedding)" for a model that is not a decoder-only transformer."""
    if not architecture:
        return "-"
    return architecture if family in (None, "decoder") else f"{architecture} ({family})"


def _list_remote(name: str, as_json: bool) -> None:
    """`list --endpoint NAME`: the server's /v1/models, as @NAME/MODEL_ID references."""
    from chatcli import endpoints
    from chatcli.cli import console
    from chatcli.remote import list_models as remote_models

    models = remote_models(endpoints.get(name))
    rows = [{"reference": f"@{name}/{m.id}", "id": m.id, "owned_by": m.owned_by, "context": m.n_ctx} for m in models]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        console.info(f"endpoint {name} lists no models")
        return
    from rich.table import Table

    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("REFERENCE", "OWNED BY", "CONTEXT"):
        table.add_column(column)
    for row in rows:
        table.add_row(*[_cell(key, row[key]) for key in ("reference", "owned_by", "context")])
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


def _auto_quant(ref: str, quant: str | None, revision: str) -> ModelRef:
    """The reference to pull: with --quant auto (or pull_quant = auto), the largest quant that fits, said why."""
    from chatcli import config

    if quant is None:
        setting = config.get("pull_quant")
        probe = _ref(ref)
        if setting and probe.kind in ("repo", "alias") and ":" not in ref.rsplit("/", 1)[-1]:
            quant = str(setting)
    if quant is None or quant.lower() != "auto":
        return _ref(ref, quant)
    from chatcli.cli import console
    from chatcli.remote_header import choose_fitting, describe_repo

    base = _ref(ref)
    if base.kind not in ("repo", "alias"):
        raise UsageError("--quant auto chooses among a repo's files: give an alias or owner/repo, not a file")
    choice = choose_fitting(describe_repo(base, revision, only_catalogue=True))
    console.info(f"--quant auto: {choice.reason}")
    row = choice.row
    if base.spec is not None:
        named = [q for q, f in base.spec.files.items() if f == row.files[0]]
        if named:
            return _ref(ref.rsplit(":", 1)[0], named[0])
    return _ref(f"{base.repo}/{row.files[0]}")


@click.command()
@click.argument("ref")
@click.argument("messages", nargs=-1)
@click.option("--template", "print_template", is_flag=True, help="Print the model's embedded chat template.")
@click.option("--quants", "remote", is_flag=True,
              help="List every GGUF in the model's Hub repo with its memory need and fit, read from headers only.")
@click.option("--render", is_flag=True, help="Print the prompt MESSAGES become, special tokens marked, and its "
              "token count.")
@click.option("-s", "--system", help="With --render: a system message first.")
@click.option("--chat-template", "chat_template", help="With --render: auto or a built-in template name.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def show(ref: str, messages: tuple[str, ...], print_template: bool, remote: bool, render: bool, system: str | None,
         chat_template: str | None, as_json: bool) -> None:
    """Describe a model from its GGUF header, without loading its weights.

    A model that is not downloaded is described from the Hub: one row per quant, from each file's header
    (read with HTTP Range requests, a few kB to MB per file), with the memory a load needs and whether it fits.
    """
    from chatcli.cli import console
    from chatcli.errors import ModelNotPresentError
    from chatcli.inventory import describe

    if (messages or system or chat_template) and not render:
        raise UsageError("MESSAGE, --system and --chat-template go with --render")
    if render:
        from chatcli.cli.doctor import show_render

        show_render(ref, list(messages), system, chat_template, as_json)
        return
    catalogue = _catalogue()
    model_ref = _ref(ref)
    if remote:
        _show_remote(model_ref, as_json)
        return
    try:
        details = describe(model_ref, catalogue)
    except ModelNotPresentError as missing:
        if model_ref.kind not in ("repo", "alias", "file") or print_template:
            raise
        from chatcli.hub import HubUnreachableError

        try:
            _show_remote(model_ref, as_json)
        except HubUnreachableError:
            raise missing from None
        return
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
        elif key == "problems":  # what `complete` and `chat` would refuse this file for
            value = "\n".join(value) if value else "none found"
        table.add_row(key.replace("_", " "), "-" if value in (None, "") else str(value))
    console.print_table(table)


def _show_remote(model_ref: ModelRef, as_json: bool) -> None:
    """`show` for a model on the Hub: one row per quant, from headers read with Range requests."""
    from chatcli.cli import console
    from chatcli.remote_header import describe_repo

    report = describe_repo(model_ref)
    if all(r.problem for r in report.rows):  # nothing to show: the same one-line refusal as for a local file
        from chatcli.errors import GGUFError

        raise GGUFError(str(report.rows[0].problem))
    if as_json:
        click.echo(json.dumps({"repo": report.repo, "revision": report.revision, "downloaded": False,
                               "memory_budget": report.budget.total, "memory_source": report.budget.source,
                               "header_bytes_read": report.fetched,
                               "quants": [r.as_dict() for r in report.rows]}, indent=2))
        return
    from rich.table import Table

    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("QUANT", "SIZE", "ARCH", "PARAMS", "CONTEXT", "TEMPLATE", "MEMORY", "FIT"):
        table.add_column(column)
    for r in report.rows:
        quant = r.quant or r.files[0]
        if len(r.files) > 1:
            quant += f" ({len(r.files)} parts)"
        if r.problem:
            table.add_row(quant, console.size(r.size), "-", "-", "-", "-", "-", "refused")
            continue
        memory = f"{console.size(r.memory)} @ {r.n_ctx:,}" if r.n_ctx else console.size(r.memory)
        table.add_row(quant, console.size(r.size), _arch_cell(r.architecture, r.family), console.count(r.parameters),
                      f"{r.context_length:,}" if r.context_length else "-", "yes" if r.chat_template else "no",
                      memory, r.fit)
    console.print_table(table)
    budget = console.size(report.budget.total) if report.budget.total is not None else "unknown"
    console.info(f"{report.repo} on the Hub, not downloaded (`chatcli pull {model_ref.raw}` downloads it; "
                 f"--quant auto takes the largest that fits). MEMORY: weights + KV cache at the context a load "
                 f"would use; FIT against {budget} ({report.budget.source}). Read {console.size(report.fetched)} "
                 "of GGUF headers.")
    for r in report.rows:
        if r.problem:
            console.warn(f"refused: {r.problem}")


# ---------------------------------------------------------------- rm


@click.command()
@click.argument("ref")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
def rm(ref: str, yes: bool) -> None:
    """Remove a downloaded model from the Hugging Face cache (never another tool's files)."""
    from chatcli import hub, store, stores
    from chatcli.cli import console

    model_ref = _ref(ref)
    if model_ref.kind == "store":  # ollama's, LM Studio's, …: theirs to remove
        assert model_ref.store is not None and model_ref.store_name is not None
        found = stores.find(model_ref.store, model_ref.store_name)
        raise ChatcliError(stores.removal_refused(found, found.path, found.source))
    if model_ref.kind == "local":
        assert model_ref.local_path is not None
        owner = stores.owner_of(model_ref.local_path)
        if owner is not None:
            raise ChatcliError(stores.removal_refused(None, model_ref.local_path, owner))
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
