"""Putting a chat together: model, chat format, history, snapshots, prompt template; then the REPL or a line loop."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from chatcli import config, paths
from chatcli.cli import console
from chatcli.conversation import ChatSession
from chatcli.errors import HistoryError
from chatcli.snapshots import model_identity


def start(
    *,
    model: str | None,
    system: str | None,
    prompt_template: str | None,
    chat_template: str | None,
    continue_latest: bool,
    conversation_id: str | None,
    history: bool,
    variables: tuple[str, ...] = (),
    open_engine: Callable[[str | None], tuple[Any, Any]],
) -> int:
    from chatcli.prompting import chat_format
    from chatcli.history import History

    settings: dict[str, Any] = {}
    transform = None
    if prompt_template:
        from chatcli import prompt_templates

        template = prompt_templates.load_template(prompt_template)
        values = prompt_templates.parse_vars(variables)
        template_system, _ = template.render("", values)  # checks the variables before the model loads
        system = system or template_system
        model = model or template.model
        settings.update({k: v for k, v in template.options.items() if k != "stop"})
        if template.prompt and template.prompt.strip() != "{input}":
            transform = lambda text: template.render(text, values)[1]  # noqa: E731
    elif variables:
        from chatcli.errors import UsageError

        raise UsageError("--var needs -t/--template")

    store = History() if history else None
    resume = None
    if store is not None and (continue_latest or conversation_id):
        resume = store.get(conversation_id) if conversation_id else store.latest()
        if resume is None:
            raise HistoryError("no conversation to continue yet: start one with `chatcli chat`")
        model = model or resume.model

    def load(ref_text: str | None) -> tuple[Any, Any, str, str]:
        ref, engine = open_engine(ref_text)
        fmt, warning = chat_format(engine, ref, chat_template)
        if warning:
            console.warn(warning)
        return engine, fmt, ref.display, model_identity(engine.path)

    engine, fmt, label, model_id = load(model)
    snapshots = None
    if store is not None and config.get("snapshots"):
        from chatcli.snapshots import SnapshotStore

        snapshots = SnapshotStore()
    session = ChatSession(engine=engine, fmt=fmt, model_label=label, history=store, system=system,
                          settings=settings, snapshots=snapshots, model_id=model_id, template_name=prompt_template,
                          transform=transform)
    if resume is not None:
        session.load(resume.id)
        if system:  # -s given with --continue: it replaces the stored system prompt
            session.set_system(system)
    from chatcli.cli.repl import Repl

    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    repl = Repl(session, load_model=load,
                input_history=paths.data_dir() / "input_history" if interactive else None)
    try:
        if interactive:
            return repl.run()
        return repl.run_lines(sys.stdin)
    finally:
        if store is not None:
            store.close()
        engine = session.engine
        if hasattr(engine, "close"):
            engine.close()
