"""`complete` on a raw prompt loads only what it needs: cold start is mostly llama_cpp's own import and the load.

Read from `python -X importtime`, which lists every module a process imports with its nesting, so a module
can also be traced to whoever imported it first (llama_cpp imports jinja2 itself; chatcli must not need it).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import click

# Nothing on the raw-prompt `complete` path needs these: templates, terminal rendering, the REPL, the Hub client,
# history. llama_cpp itself imports jinja2 and sqlite3 (through diskcache): allowed, as long as it is llama_cpp.
NOT_ON_THE_COMPLETE_PATH = {
    "jinja2", "sqlite3", "rich", "prompt_toolkit", "huggingface_hub", "httpx", "httpx2",
    "chatcli.jinja_sandbox", "chatcli.chat_templates", "chatcli.history", "chatcli.pulling", "chatcli.hub",
}


def import_tree(*args: str) -> list[tuple[int, str]]:
    """(depth, module) for every import of `python -X importtime -m chatcli ARGS`, in completion order."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "chatcli", *args], capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, env=os.environ.copy(), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = []
    for line in proc.stderr.splitlines():
        if line.startswith("import time:") and "|" in line and "cumulative" not in line:
            name = line.rsplit("|", 1)[1]
            rows.append(((len(name) - len(name.lstrip(" "))) // 2, name.strip()))
    assert rows, "no -X importtime output"
    return rows


def importers(rows: list[tuple[int, str]], module: str) -> list[str]:
    """The chain of modules whose import first pulled `module` in (innermost first)."""
    index = next(i for i, (_d, name) in enumerate(rows) if name == module)
    depth, chain = rows[index][0], []
    for d, name in rows[index + 1:]:  # a module is listed after everything it imported
        if d < depth:
            chain.append(name)
            depth = d
    return chain


def loaded(rows: list[tuple[int, str]]) -> set[str]:
    return {name for _d, name in rows} | {name.split(".")[0] for _d, name in rows}


def test_raw_complete_imports_nothing_it_does_not_need(tiny_gpt2: Path) -> None:
    rows = import_tree("complete", "-m", str(tiny_gpt2), "hello", "-n", "2", "--temperature", "0")
    assert "llama_cpp" in loaded(rows)  # it did run the model
    for module in sorted(loaded(rows) & NOT_ON_THE_COMPLETE_PATH):
        chain = importers(rows, module)
        assert any(name.startswith("llama_cpp") for name in chain), f"{module} imported by {chain}"


def test_chat_complete_does_load_the_template_sandbox(tiny_llama: Path) -> None:
    """The other side of the check above: with --chat the template modules are needed, and show up."""
    rows = import_tree("complete", "-m", str(tiny_llama), "hello", "--chat", "-n", "2", "--temperature", "0")
    assert {"chatcli.jinja_sandbox", "chatcli.chat_templates", "jinja2"} <= loaded(rows)


def test_help_imports_no_model_runtime() -> None:
    rows = import_tree("--help")
    assert loaded(rows) & ({"llama_cpp", "numpy", "jinja2"} | NOT_ON_THE_COMPLETE_PATH) == set()


def test_the_lazy_command_map_names_every_command_of_every_module() -> None:
    """A command added to a module's COMMANDS but not to the group's map would silently not exist."""
    import importlib

    from chatcli.cli import _Group

    folder = Path(importlib.import_module("chatcli.cli").__file__).parent  # type: ignore[arg-type]
    defined = {}
    for path in sorted(folder.glob("*.py")):
        module = importlib.import_module(f"chatcli.cli.{path.stem}")
        for command in getattr(module, "COMMANDS", []):
            if isinstance(command, click.Command):
                defined[command.name] = path.stem
    assert defined == _Group.modules
