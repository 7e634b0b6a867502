"""Prompt templates from the command line: `templates list|show|edit`, `complete -t`, `chat -t`."""

from __future__ import annotations

import os
from pathlib import Path

from chatcli.history import History

SUMMARY = '''description = "Summarise in N bullets"
system = "You are terse."
prompt = "Summarise in {bullets} bullets:\\n\\n{input}"
[defaults]
bullets = "3"
[options]
temperature = 0.0
max_tokens = 4
'''


def write_template(home: Path, name: str, text: str) -> Path:
    path = home / "config" / "templates" / f"{name}.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_templates_list_and_show(chatcli, home: Path) -> None:
    empty = chatcli("templates", "list")
    assert empty.returncode == 0 and "templates edit NAME" in empty.stderr
    write_template(home, "summary", SUMMARY)
    write_template(home, "broken", "prompt = [")
    listing = chatcli("templates", "list")
    assert "summary" in listing.stdout and "Summarise in N bullets" in listing.stdout
    assert "broken" in listing.stdout and "BROKEN" in listing.stdout
    assert chatcli("templates", "show", "summary").stdout == SUMMARY
    missing = chatcli("templates", "show", "sumary")
    assert missing.returncode == 1 and "did you mean 'summary'" in missing.stderr


def test_templates_edit_validates_before_saving(chatcli, home: Path, tmp_path: Path) -> None:
    editor = tmp_path / "editor.sh"
    editor.write_text('#!/bin/sh\nprintf \'prompt = "Translate: {input}"\\ncolour = 1\\n\' > "$1"\n')
    editor.chmod(0o755)
    bad = chatcli("templates", "edit", "tr", env={"EDITOR": str(editor)})
    assert bad.returncode == 1 and "unknown key 'colour'" in bad.stderr
    assert not (home / "config/templates/tr.toml").exists()
    editor.write_text('#!/bin/sh\nprintf \'prompt = "Translate: {input}"\\n\' > "$1"\n')
    good = chatcli("templates", "edit", "tr", env={"EDITOR": str(editor)})
    assert good.returncode == 0, good.stderr
    saved = home / "config/templates/tr.toml"
    assert saved.read_text() == 'prompt = "Translate: {input}"\n'
    if os.name != "nt":
        assert saved.stat().st_mode & 0o077 == 0  # private from the moment it is written


def test_complete_with_a_template_and_vars(chatcli, home: Path, tiny_gpt2: Path) -> None:
    write_template(home, "summary", SUMMARY)
    result = chatcli("complete", "-m", str(tiny_gpt2), "-t", "summary", "--var", "bullets=5", "--echo",
                     input="The cat sat.")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Summarise in 5 bullets:\n\nThe cat sat.")
    bad = chatcli("complete", "-m", str(tiny_gpt2), "-t", "summary", "--var", "colour=red", input="x")
    assert bad.returncode == 2 and "has no variable 'colour'" in bad.stderr
    novar = chatcli("complete", "-m", str(tiny_gpt2), "--var", "a=b", "hi")
    assert novar.returncode == 2 and "--var needs -t" in novar.stderr


def test_chat_with_a_template(chatcli, home: Path, tiny_llama: Path) -> None:
    write_template(home, "summary", SUMMARY)
    result = chatcli("chat", "-m", str(tiny_llama), "-t", "summary", "--var", "bullets=2", input="Long text here.\n")
    assert result.returncode == 0, result.stderr
    with History() as store:
        conversation = store.latest()
        turns = store.turns(conversation.id)
    assert conversation.system == "You are terse." and conversation.template == "summary"
    assert turns[0].content == "Summarise in 2 bullets:\n\nLong text here."
    assert turns[1].completion_tokens <= 4  # the template's max_tokens
