"""`classify`: one label per input line, picked by a local chat model from its logits (chatcli/classify.py)."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator

import click

from chatcli.cli.common import stdin_lines
from chatcli.cli.run import _load_options, _open_engine, model_options


@click.command()
@click.argument("text", required=False)
@click.option("-l", "--label", "labels", multiple=True, metavar="LABEL",
              help="A label to choose from (repeat: at least two, distinct).")
@model_options
@click.option("--instructions", metavar="TEXT", help="Say what the labels mean or what to judge "
              "(default: \"Classify the text.\"); the label list follows it.")
@click.option("-s", "--system", help="System prompt (the instructions then open the user's message).")
@click.option("--chat-template", "chat_template", help="Chat template: auto (the model's own) or a built-in name.")
@click.option("--calibrate/--no-calibrate", default=True, show_default=True,
              help="Correct the model's lean towards some labels, measured on content-free inputs "
              "(\"N/A\", \"\", \"[MASK]\").")
@click.option("--json", "as_json", is_flag=True,
              help="One JSON object per input: text, label, probabilities (and uncalibrated ones).")
def classify(text, labels, model, pull, ctx_size, threads, gpu_layers, flash_attn, verbose, instructions, system,
             chat_template, calibrate, as_json) -> None:  # noqa: ANN001
    """Pick one of the labels for TEXT, or for each line of stdin, with a chat model.

    \b
    Every label is scored exactly from the model's logits (its tokens, then the end of the turn), as
    decoding constrained to the labels would, and the scores become probabilities that sum to 1.
    One label per line goes to stdout, so it fits `paste` and `sort | uniq -c`:
      chatcli classify -l positive -l negative "Great battery, fast delivery."
      cut -f2 reviews.tsv | chatcli classify -l positive -l negative | sort | uniq -c
      chatcli classify -l bug -l feature -l question --json < issues.txt
    """
    from chatcli import loading
    from chatcli.classify import Classifier, check_labels, require_local
    from chatcli.cli import console
    from chatcli.errors import UsageError
    from chatcli.prompting import chat_format

    chosen = check_labels(labels)  # a usage error before anything loads
    if text is not None:
        inputs: Iterator[str] = iter([text])
    elif (lines := stdin_lines()) is not None:
        inputs = lines
    else:
        raise UsageError("no input: give TEXT or pipe lines on stdin "
                         "(e.g. `cut -f2 reviews.tsv | chatcli classify -l positive -l negative`)")
    ref = loading.resolve(model)
    if ref.kind == "remote":
        raise UsageError(f"classify reads the model's logits: {ref.display} is a remote model; use a model run here")
    load_options = _load_options(ctx_size, threads, gpu_layers, flash_attn, verbose)
    ref, engine = _open_engine(ref, pull, load_options, allow_remote=False)
    require_local(engine)  # an encoder-decoder is refused before any word on its chat template
    fmt, warning = chat_format(engine, ref, chat_template)
    if warning:
        console.warn(warning)
    classifier = Classifier(engine, chosen, fmt, instructions=instructions, system=system, calibrate=calibrate)
    for result in classifier.classify_all(inputs):  # a closed stdout (`| head`) ends quietly: the group sees to it
        if not as_json:
            sys.stdout.write(result.label + "\n")
            sys.stdout.flush()
            continue
        record: dict[str, object] = {
            "text": result.text,
            "label": result.label,
            "probabilities": {label: round(p, 6) for label, p in result.probabilities.items()},
        }
        if calibrate:
            record["uncalibrated"] = {label: round(p, 6) for label, p in result.uncalibrated.items()}
        sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
        sys.stdout.flush()


COMMANDS = [classify]
