"""`chatcli doctor MODEL` and `chatcli show MODEL --render`: the chat template checked against the tokenizer."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from chatcli.cli.common import model_ref as _ref

if TYPE_CHECKING:
    from chatcli.registry import ModelRef


def _model_path(ref: str) -> tuple[Path, ModelRef]:
    from chatcli.loading import resolve_present

    model_ref = _ref(ref)
    path, _model = resolve_present(model_ref)
    return path, model_ref


def show_render(ref: str, messages: list[str], system: str | None, chat_template: str | None, as_json: bool) -> None:
    """Print the prompt exactly as the model receives it; special tokens marked, token count on stderr."""
    from chatcli.cli import console
    from chatcli.doctor import marked, plain_marked, render

    path, model_ref = _model_path(ref)
    turns = [{"role": "system", "content": system}] if system else []
    turns += [{"role": "user" if i % 2 == 0 else "assistant", "content": m} for i, m in enumerate(messages or ["Hi"])]
    requested = chat_template or (model_ref.spec.template if model_ref.spec else None)
    rendered = render(path, turns, requested=requested)
    if rendered.warning:
        console.warn(rendered.warning)
    if as_json:
        click.echo(json.dumps(rendered.as_dict(), indent=2, ensure_ascii=False))
        return
    if sys.stdout.isatty():
        from rich.text import Text

        text = Text()
        if rendered.added_bos:
            text.append(rendered.added_bos, style="reverse dim")
        for piece, special in marked(rendered):
            text.append(piece, style="reverse bold" if special else None)
        console.out().print(text, end="", soft_wrap=True, highlight=False, markup=False)
        click.echo()
    else:
        click.echo(plain_marked(rendered), nl=False)  # exactly the prompt (plus marks): no newline of our own
    added = f"; the tokenizer adds BOS {rendered.added_bos!r}" if rendered.added_bos else ""
    console.info(f"{len(rendered.tokens)} tokens ({rendered.template} template{added}); special tokens are shown "
                 "⟨like this⟩ (highlighted on a terminal), ⟨+X⟩ is one the tokenizer adds")


@click.command()
@click.argument("ref")
@click.option("--chat-template", "chat_template", help="Check this template instead: auto or a built-in name.")
@click.option("--offline", is_flag=True, help="Do not ask the Hub for the template of the model it was converted from.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def doctor(ref: str, chat_template: str | None, offline: bool, as_json: bool) -> None:
    """Check a model's chat template against its tokenizer: one line per problem, with the fix.

    Finds a BOS written twice, an end-of-turn marker that is not a special token or that nothing stops on, a
    missing generation prompt, a system message that raises or is dropped, and turns that do not end with the
    model's EOS/EOT. When the GGUF names the model it was converted from, that model's own template (from the
    Hub) is rendered on the same conversations and any difference reported. Exit status 0 when clean, 1 with
    findings.
    """
    from chatcli.cli import console
    from chatcli.doctor import diagnose

    path, model_ref = _model_path(ref)
    findings = diagnose(path, requested=chat_template,
                        catalogue_template=model_ref.spec.template if model_ref.spec and
                        model_ref.spec.template != "auto" else None, online=not offline)
    if as_json:
        click.echo(json.dumps({"model": model_ref.display, "clean": not findings,
                               "findings": [{"code": f.code, "message": f.message, "fix": f.fix} for f in findings]},
                              indent=2))
    else:
        for finding in findings:
            click.echo(finding.line())
        if not findings:
            console.info(f"{model_ref.display}: the chat template and the tokenizer agree; no problems found")
    if findings:
        raise click.exceptions.Exit(1)


COMMANDS = [doctor]
