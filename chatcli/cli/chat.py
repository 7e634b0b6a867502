"""Putting a chat together: model, chat format, history, snapshots, prompt template; then the REPL or a line loop."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

from chatcli import config, paths
from chatcli.attachments import Attachment
from chatcli.cli import console
from chatcli.conversation import BASE_MODEL_REPLY_CAP, ChatSession
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
    settings: dict[str, Any] | None = None,
    open_engine: Callable[[str | None], tuple[Any, Any]],
    files: Sequence[Attachment] = (),
    truncate: bool = False,
) -> int:
    """`settings`: the sampling flags given; they win over a template's options and a continued conversation's.

    `files` (chat -f) go with the first message; one that cannot fit the context is refused here, before the chat
    starts (exit 3), or, with `truncate`, cut to fit when that message goes.
    """
    from chatcli.history import History
    from chatcli.prompting import chat_format

    flags = dict(settings or {})
    settings = {}
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
    settings.update(flags)
    session: ChatSession | None = None

    def load(ref_text: str | None) -> tuple[Any, Any, str, str, dict[str, Any]]:
        ref, engine = open_engine(ref_text)
        if ref.kind == "remote":  # the server applies its own chat template and stop strings; no snapshots
            from chatcli.chat_templates import ChatFormat

            if chat_template:
                console.warn(f"--chat-template does not apply to {ref.display}: the server uses its own")
            return engine, ChatFormat(name="the server's", source=""), ref.display, "", {}
        if engine.encoder_decoder and not engine.info.chat_template and not chat_template:
            from chatcli.errors import UsageError

            engine.close()
            raise UsageError(f"{ref.display} is an encoder-decoder model ({engine.info.architecture}) without a chat "
                             "template: it answers single prompts; use `chatcli complete -m "
                             f"{ref.display} \"...\"` (or give chat a --chat-template)")
        fmt, warning = chat_format(engine, ref, chat_template)
        if warning:
            console.warn(warning)
        model_defaults: dict[str, Any] = dict(ref.spec.options) if ref.spec else {}
        if warning and "max_tokens" not in model_defaults:  # a built-in by fallback: maybe a base model
            model_defaults["max_tokens"] = BASE_MODEL_REPLY_CAP
            stored = (resume.settings or {}) if resume is not None else {}
            current = session.settings if session is not None else {**stored, **settings}
            if current.get("max_tokens") is None:
                console.info(f"replies stop at {BASE_MODEL_REPLY_CAP} tokens for a model without a chat template "
                             "(change it with /set max_tokens N, or chat -n N)")
        return engine, fmt, ref.display, model_identity(engine.path), model_defaults

    engine, fmt, label, model_id, model_defaults = load(model)
    snapshots = None
    if store is not None and config.get("snapshots"):
        from chatcli.snapshots import SnapshotStore

        snapshots = SnapshotStore()
    session = ChatSession(engine=engine, fmt=fmt, model_label=label, history=store, system=system,
                          settings=settings, overrides=flags, model_defaults=model_defaults, snapshots=snapshots,
                          model_id=model_id, template_name=prompt_template, transform=transform)
    if resume is not None:
        session.load(resume.id)
        if system:  # -s given with --continue: it replaces the stored system prompt
            session.set_system(system)
    if files and not truncate:  # with --truncate they are cut to fit when the first message goes
        from chatcli.attachments import fit_message

        fit_message(session, files, "", truncate=False)
    from chatcli.cli.repl import Repl

    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    repl = Repl(session, load_model=load,
                input_history=paths.private_file(paths.data_dir() / "input_history") if interactive else None,
                attachments=files, truncate=truncate)
    try:
        if interactive:
            return repl.run()
        return repl.run_lines(sys.stdin)
    finally:
        if snapshots is not None:
            snapshots.close()  # the last reply's snapshot may still be being written
        if store is not None:
            store.close()
        session.engine.close()
