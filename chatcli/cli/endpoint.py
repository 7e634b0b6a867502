"""`chatcli endpoint add/list/rm`: name the OpenAI-compatible servers that `@NAME/MODEL_ID` references point at."""

from __future__ import annotations

import json
import os

import click


@click.group()
def endpoint() -> None:
    """Remote OpenAI-compatible servers (vLLM, llama-server, ollama, chatcli serve), used as -m @NAME/MODEL_ID.

    \b
      chatcli endpoint add box http://gpu-box:8000 --api-key-env BOX_KEY
      chatcli list --endpoint box
      chatcli chat -m @box/meta-llama/Llama-3.1-8B-Instruct
    OPENAI_BASE_URL / OPENAI_API_KEY, when set, make an endpoint named `openai`.
    """


@endpoint.command("add")
@click.argument("name")
@click.argument("url")
@click.option("--api-key-env", metavar="VAR", help="Environment variable holding the API key (the key itself is "
              "never stored).")
def add(name: str, url: str, api_key_env: str | None) -> None:
    """Add endpoint NAME at URL (http or https; `/v1` is added to a URL without a path)."""
    from chatcli import endpoints
    from chatcli.cli import console

    added = endpoints.add(name, url, api_key_env)
    key = f", key from ${added.api_key_env}" if added.api_key_env else ""
    console.info(f"added endpoint {added.name}: {added.api_base}{key}; use it as -m @{added.name}/MODEL_ID "
                 f"(`chatcli list --endpoint {added.name}` lists its models)")
    if added.api_key_env and not os.environ.get(added.api_key_env):
        console.warn(f"${added.api_key_env} is not set in this shell")


@endpoint.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def list_endpoints(as_json: bool) -> None:
    """List the endpoints (no server is contacted)."""
    from chatcli import endpoints
    from chatcli.cli import console

    rows = [
        {"name": e.name, "url": e.url, "api_base": e.api_base, "api_key_env": e.api_key_env,
         "api_key_set": bool(e.api_key_env and os.environ.get(e.api_key_env)),
         "source": "environment" if e.implicit else "endpoints.toml"}
        for e in endpoints.load().values()
    ]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        console.info("no endpoints yet: `chatcli endpoint add NAME URL`")
        return
    from rich.table import Table

    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("NAME", "URL", "API KEY", "SOURCE"):
        table.add_column(column)
    for row in rows:
        key = "-" if not row["api_key_env"] else f"${row['api_key_env']}" + ("" if row["api_key_set"] else " (unset)")
        table.add_row(str(row["name"]), str(row["api_base"]), key, str(row["source"]))
    console.print_table(table)


@endpoint.command("rm")
@click.argument("name")
def rm(name: str) -> None:
    """Remove endpoint NAME (the server is not touched)."""
    from chatcli import endpoints
    from chatcli.cli import console

    removed = endpoints.remove(name)
    console.info(f"removed endpoint {removed.name} ({removed.url})")


COMMANDS = [endpoint]
