"""Commands that manage settings and stored things: config, history, templates, cache."""

from __future__ import annotations

import json

import click

from chatcli.cli.common import model_ref as _ref


@click.group("config")
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
    from chatcli import config
    from chatcli.cli import console

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


# ---------------------------------------------------------------- history


@click.group("history")
def history_group() -> None:
    """List, show, export or delete stored conversations."""


def _history():  # noqa: ANN202
    from chatcli.history import History

    return History()


@history_group.command("list")
@click.option("-n", "--limit", type=click.IntRange(1, 10000), default=20, show_default=True)
@click.option("-q", "--search", help="Only conversations whose title or text contains this.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def history_list(limit: int, search: str | None, as_json: bool) -> None:
    """Recent conversations, newest first."""
    from chatcli.cli import console

    with _history() as store:
        rows = store.list(limit=limit, search=search)
    if as_json:
        click.echo(json.dumps([row.__dict__ for row in rows], indent=2))
        return
    if not rows:
        console.info("no conversations yet: start one with `chatcli chat`")
        return
    for row in rows:
        click.echo(f"{row.id}  {console.ago(row.updated):>14}  {row.n_turns:>3} turns  {row.model or '-'}  {row.title}")


@history_group.command("show")
@click.argument("conversation_id")
def history_show(conversation_id: str) -> None:
    """Print a conversation as a Markdown transcript (ID or a unique prefix of it)."""
    with _history() as store:
        click.echo(store.export(conversation_id, "md"))


@history_group.command("export")
@click.argument("conversation_id")
@click.option("--format", "fmt", type=click.Choice(["md", "json"]), default="md", show_default=True)
def history_export(conversation_id: str, fmt: str) -> None:
    """Write a conversation to stdout as Markdown or JSON."""
    with _history() as store:
        click.echo(store.export(conversation_id, fmt))


@history_group.command("rm")
@click.argument("conversation_id")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
def history_rm(conversation_id: str, yes: bool) -> None:
    """Delete a conversation."""
    import sys

    from chatcli.cli import console
    from chatcli.errors import ChatcliError

    with _history() as store:
        conversation = store.get(conversation_id)
        label = f"conversation {conversation.id} ({conversation.title or 'untitled'})"
        if not yes:
            if not sys.stdin.isatty():
                raise ChatcliError(f"not deleting {label} without confirmation: pass -y")
            click.confirm(f"Delete {label}?", abort=True, err=True)
        store.delete(conversation.id)
    console.info(f"deleted {label}")


# ---------------------------------------------------------------- prompt templates


@click.group("templates")
def templates_group() -> None:
    """Your prompt templates: a system prompt, a prompt with {input} and variables, default options."""


@templates_group.command("list")
def templates_list() -> None:
    """List your prompt templates."""
    from chatcli import prompt_templates
    from chatcli.cli import console

    templates = prompt_templates.list_templates()
    if not templates:
        where = prompt_templates.templates_dir()
        console.info(f"no templates yet: `chatcli templates edit NAME` creates one in {where}")
    for template in templates:
        about = template.description if template.error is None else f"BROKEN: {template.error}"
        click.echo(f"{template.name:<20} {about}")


@templates_group.command("show")
@click.argument("name")
def templates_show(name: str) -> None:
    """Print a template's file."""
    from chatcli import prompt_templates

    click.echo(prompt_templates.load_template(name).path.read_text(encoding="utf-8"), nl=False)


@templates_group.command("edit")
@click.argument("name")
def templates_edit(name: str) -> None:
    """Create or edit a template in $EDITOR (checked when you save)."""
    from chatcli import paths, prompt_templates
    from chatcli.cli import console

    path = prompt_templates.template_path(name)
    original = path.read_text(encoding="utf-8") if path.exists() else prompt_templates.new_template_text(name)
    edited = click.edit(original, extension=".toml", require_save=True)
    if edited is None or edited == original and path.exists():
        console.info("no changes")
        return
    candidate = paths.private_file(path.with_name(f".{path.name}.new"))  # 0600 before the text is in it
    candidate.write_text(edited, encoding="utf-8")
    try:
        prompt_templates.validate_file(candidate, name=name)
    except Exception:
        candidate.unlink()
        raise
    candidate.replace(path)
    console.info(f"saved {path}")


# ---------------------------------------------------------------- caches: snapshots, embeddings


@click.group("cache")
def cache_group() -> None:
    """Conversation state snapshots (so `chat --continue` does not re-read the whole history), and computed
    embeddings (so `similar` over the same lines does not run the model again)."""


@cache_group.command("info")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def cache_info(as_json: bool) -> None:
    """How many snapshots and embeddings, how much disk they take, and the cap."""
    from chatcli.cli import console
    from chatcli.embed_cache import EmbeddingCache
    from chatcli.snapshots import SnapshotStore

    info = SnapshotStore().info()
    with EmbeddingCache() as embeddings:
        stats = embeddings.stats()
    info |= {"embeddings": stats.rows, "embeddings_bytes": stats.bytes, "embeddings_path": str(stats.path)}
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
        return
    for key, value in info.items():
        shown = console.size(value) if "bytes" in key and isinstance(value, int) else value
        click.echo(f"{key.replace('_', ' '):<16} {shown}")


@cache_group.command("clear")
def cache_clear() -> None:
    """Delete every snapshot and every cached embedding."""
    from chatcli.cli import console
    from chatcli.embed_cache import EmbeddingCache
    from chatcli.snapshots import SnapshotStore

    freed = SnapshotStore().clear()
    with EmbeddingCache() as embeddings:
        before = embeddings.stats().bytes
        rows = embeddings.clear()
        freed += max(0, before - embeddings.stats().bytes)
    console.info(f"freed {console.size(freed)} (snapshots, and {rows:,} cached embeddings)")


COMMANDS = [config_group, history_group, templates_group, cache_group]
