"""From messages or text to prompt tokens: the chat format for a model, BOS handling, the context limit."""

from __future__ import annotations

from typing import TYPE_CHECKING

from chatcli.errors import ContextOverflowError

if TYPE_CHECKING:  # chat_templates brings jinja2: a raw prompt (`complete` without --chat) never needs it
    from chatcli.chat_templates import ChatFormat
    from chatcli.engine import Engine
    from chatcli.registry import ModelRef


def chat_format(engine: Engine, ref: ModelRef, requested: str | None = None) -> tuple[ChatFormat, str | None]:
    """The chat template for this model: --template, else the catalogue's, else the GGUF's own (sandboxed)."""
    from chatcli.chat_templates import choose_format

    info = engine.info
    wanted = requested or (ref.spec.template if ref.spec else None) or "auto"
    return choose_format(
        requested=wanted,
        gguf_template=info.chat_template,
        architecture=info.architecture,
        bos_token=info.bos_token or "",
        eos_token=info.eos_token or "",
        eot_token=info.eot_token or "",
    )


def wants_bos(engine: Engine, text: str) -> bool:
    """Whether to add the model's BOS token: when it uses one and the text (a rendered template) has none."""
    bos = engine.info.bos_token
    return bool(engine.add_bos and not (bos and text.startswith(bos)))


def prompt_tokens(engine: Engine, text: str, *, reserve: int, truncate: bool) -> list[int]:
    """Tokenise a prompt (no second BOS when the text starts with one); keep its tail if `truncate`."""
    add_bos = wants_bos(engine, text)
    tokens = engine.tokenize(text, add_bos=add_bos)
    limit = engine.n_ctx - max(1, reserve)
    if len(tokens) <= limit:
        return tokens
    if not truncate:
        raise ContextOverflowError(
            f"the prompt is {len(tokens)} tokens but the context window is {engine.n_ctx} "
            f"(with {reserve} kept for the reply): shorten it, raise --ctx-size, or pass --truncate to keep its end"
        )
    head = tokens[:1] if add_bos else []
    return head + tokens[len(tokens) - (limit - len(head)):]
