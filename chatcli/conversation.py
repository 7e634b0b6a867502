"""A chat conversation with a loaded model: messages, the chat format, history, context fitting, snapshots.

No terminal here: the REPL (repl.py) and the non-TTY loop drive a ChatSession and render what it yields.
Every turn is written to history as it happens: the user's message before the model starts, the reply
while it streams (a kill mid-reply keeps what was shown), and its counts and timings at the end.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from chatcli.chat_templates import ChatFormat
from chatcli.engine import Engine, GenerationResult, SamplingOptions
from chatcli.errors import ChatcliError, ContextOverflowError, UsageError

Message = dict[str, str]
SETTING_NAMES = ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "max_tokens", "seed")
_INT_SETTINGS = {"top_k", "max_tokens", "seed"}
SAVE_EVERY = 0.5  # seconds between history updates of a streaming reply


def parse_setting(name: str, raw: str) -> int | float | None:
    """A /set value: number, or 'none'/'off' to clear max_tokens/seed."""
    if name not in SETTING_NAMES:
        raise UsageError(f"unknown setting {name!r}; settings: {', '.join(SETTING_NAMES)}")
    if raw.lower() in {"none", "off", "default"} and name in {"max_tokens", "seed"}:
        return None
    try:
        value: int | float = int(raw) if name in _INT_SETTINGS else float(raw)
    except ValueError:
        kind = "a whole number" if name in _INT_SETTINGS else "a number"
        raise UsageError(f"{name} must be {kind}, got {raw!r}") from None
    replace(SamplingOptions(), **{name: value}).validate()
    return value


@dataclass
class Reply:
    """One streamed reply: iterate for text; afterwards `.result` and `.dropped` (turns left out of the context)."""

    chunks: Iterator[str]
    result: GenerationResult
    dropped: int = 0
    restored: int = 0  # tokens restored from a snapshot instead of being read again

    def __iter__(self) -> Iterator[str]:
        return self.chunks


@dataclass
class ChatSession:
    engine: Engine
    fmt: ChatFormat
    model_label: str
    history: Any = None  # chatcli.history.History, or None for no persistence
    system: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    conversation_id: str | None = None
    snapshots: Any = None  # chatcli.snapshots.SnapshotStore, or None
    model_id: str = ""
    template_name: str | None = None
    transform: Callable[[str], str] | None = None  # a prompt template applied to each message
    messages: list[Message] = field(default_factory=list)  # user/assistant turns, oldest first
    interrupted: set[int] = field(default_factory=set)  # indexes of replies cut short
    _reset_cache: bool = True
    _usage: tuple[tuple[Any, ...], tuple[int, int]] | None = None  # (what it was computed for, the answer)

    # -------------------------------------------------------- conversation state

    def load(self, conversation_id: str) -> None:
        """Continue a stored conversation: its system prompt, settings and turns."""
        conversation = self.history.get(conversation_id)
        self.conversation_id = conversation.id
        self.system = conversation.system
        self.settings = {**self.settings, **(conversation.settings or {})}
        self.messages, self.interrupted = [], set()
        for turn in self.history.turns(conversation.id):
            if turn.role in ("user", "assistant"):
                if turn.role == "assistant" and turn.finish_reason in (None, "interrupted"):
                    self.interrupted.add(len(self.messages))
                self.messages.append({"role": turn.role, "content": turn.content})
        self._reset_cache = True

    def reset(self) -> None:
        """Start a new conversation (the old one stays in history)."""
        self.conversation_id = None
        self.messages, self.interrupted = [], set()

    def set_system(self, text: str | None) -> None:
        self.system = text or None
        if self.conversation_id and self.history is not None:
            self.history.set_system(self.conversation_id, self.system)

    def set(self, name: str, raw: str) -> int | float | None:
        value = parse_setting(name, raw)
        if value is None:
            self.settings.pop(name, None)
        else:
            self.settings[name] = value
        return value

    def switch_model(self, engine: Engine, fmt: ChatFormat, label: str, model_id: str) -> None:
        self.engine, self.fmt, self.model_label, self.model_id = engine, fmt, label, model_id
        if self.conversation_id and self.history is not None:
            self.history.set_model(self.conversation_id, label)
        self._reset_cache = True

    def undo(self) -> bool:
        """Drop the last exchange (your message and its reply)."""
        last_user = max((i for i, m in enumerate(self.messages) if m["role"] == "user"), default=None)
        if last_user is None:
            return False
        del self.messages[last_user:]
        self.interrupted = {i for i in self.interrupted if i < last_user}
        if self.conversation_id and self.history is not None:
            self.history.drop_last_exchange(self.conversation_id)
        return True

    def options(self, extra_stop: tuple[str, ...] = ()) -> SamplingOptions:
        values = {k: v for k, v in self.settings.items() if k in SETTING_NAMES}
        return replace(SamplingOptions(), **values, stop=tuple(self.fmt.stop) + extra_stop).validate()

    # -------------------------------------------------------- prompts and context

    def _all_messages(self, turns: list[Message]) -> list[Message]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + turns

    def tokens_for(self, turns: list[Message]) -> list[int]:
        from chatcli.prompting import prompt_tokens

        text = self.fmt.render(self._all_messages(turns), add_generation_prompt=True)
        return prompt_tokens(self.engine, text, reserve=1, truncate=False)  # type: ignore[arg-type]

    def fit(self) -> tuple[list[int], int]:
        """Prompt tokens for the conversation, dropping the oldest turns (never the system prompt) to fit."""
        reserve = min(int(self.settings.get("max_tokens") or 512), self.engine.n_ctx // 4)
        budget = self.engine.n_ctx - max(1, reserve)
        turns = list(self.messages)
        dropped = 0
        while True:
            try:
                tokens = self.tokens_for(turns)
            except ContextOverflowError:
                tokens = None
            if tokens is not None and len(tokens) <= budget:
                return tokens, dropped
            # drop the oldest exchange: a user turn and the replies up to the next user turn
            nxt = next((i for i, m in enumerate(turns) if i > 0 and m["role"] == "user"), None)
            if nxt is None:
                raise ContextOverflowError(
                    f"your message does not fit in the context window ({self.engine.n_ctx} tokens): "
                    "shorten it, or start the chat with a larger --ctx-size"
                )
            turns = turns[nxt:]
            dropped += nxt

    def context_usage(self) -> tuple[int, int]:
        """(tokens the conversation takes now, context window).

        The REPL's toolbar asks on every redraw (each key press): render and tokenise only when the
        conversation, system prompt, settings or model changed since the last answer.
        """
        key = (id(self.engine), self.fmt, self.system, self.conversation_id, len(self.messages),
               self.messages[-1]["content"] if self.messages else None, self.settings.get("max_tokens"))
        if self._usage is not None and self._usage[0] == key:
            return self._usage[1]
        if not self.messages and not self.system:
            usage = (0, self.engine.n_ctx)
        else:
            try:
                tokens, _ = self.fit()
                usage = (len(tokens), self.engine.n_ctx)
            except ContextOverflowError:
                usage = (self.engine.n_ctx, self.engine.n_ctx)
        self._usage = (key, usage)
        return usage

    # -------------------------------------------------------- replies

    def send(self, text: str) -> Reply:
        """Add the user's message and stream the model's reply."""
        if not text.strip():
            raise UsageError("empty message")
        if self.transform is not None:
            text = self.transform(text)
        self.messages.append({"role": "user", "content": text})
        try:
            tokens, dropped = self.fit()
        except ContextOverflowError:
            self.messages.pop()
            raise
        self._ensure_conversation()
        if self.history is not None:
            self.history.add_turn(self.conversation_id, "user", text, model=self.model_label)
        return self._reply(tokens, dropped)

    def retry(self) -> Reply:
        """Regenerate the last reply."""
        if not self.messages or self.messages[-1]["role"] != "assistant":
            raise UsageError("nothing to retry: no reply yet")
        self.messages.pop()
        self.interrupted.discard(len(self.messages))
        if self.conversation_id and self.history is not None:
            self.history.drop_last_reply(self.conversation_id)
        tokens, dropped = self.fit()
        return self._reply(tokens, dropped)

    def _ensure_conversation(self) -> None:
        if self.history is None or self.conversation_id:
            return
        conversation = self.history.new_conversation(
            model=self.model_label, system=self.system, template=self.template_name, settings=dict(self.settings)
        )
        self.conversation_id = conversation.id

    def _restore(self, tokens: list[int]) -> int:
        if self.snapshots is None or not self._reset_cache:
            return 0
        self._reset_cache = False
        return int(self.snapshots.restore(self.engine, tokens, model_id=self.model_id))

    def _reply(self, tokens: list[int], dropped: int) -> Reply:
        restored = self._restore(tokens)
        generation = self.engine.generate(tokens, self.options())
        reply = Reply(iter(()), generation.result, dropped=dropped, restored=restored)
        reply.chunks = self._stream(generation, reply)
        return reply

    def _stream(self, generation: Any, reply: Reply) -> Iterator[str]:
        turn = None
        if self.history is not None:
            turn = self.history.start_reply(self.conversation_id, model=self.model_label, settings=dict(self.settings))
        parts: list[str] = []
        started = last_save = time.monotonic()
        result = reply.result
        finish = "interrupted"
        try:
            for chunk in generation:
                parts.append(chunk)
                yield chunk
                now = time.monotonic()
                if turn is not None and now - last_save >= SAVE_EVERY:
                    self.history.update_reply(turn.id, "".join(parts))
                    last_save = now
            finish = result.finish_reason
        finally:
            generation.close()
            text = "".join(parts)
            if finish == "interrupted":
                result.finish_reason = "interrupted"
                self.interrupted.add(len(self.messages))
            self.messages.append({"role": "assistant", "content": text})
            if turn is not None:
                self.history.update_reply(
                    turn.id, text, finish_reason=finish, prompt_tokens=result.prompt_tokens,
                    completion_tokens=result.completion_tokens, duration=time.monotonic() - started,
                )
        self._save_snapshot()

    def _save_snapshot(self) -> None:
        """Keep the context's state for the conversation so far, so resuming it later skips the prefill.

        Best effort: a snapshot is only a shortcut, so any failure here just means no snapshot.
        """
        if self.snapshots is None:
            return
        try:
            history_tokens = self.tokens_for(self.messages)
        except ChatcliError:  # the whole conversation no longer fits: the next prompt drops turns anyway
            return
        # keep only what a re-rendered conversation starts with: then it is a prefix of the next prompt
        self.snapshots.save_prefix(self.engine, history_tokens, model_id=self.model_id)
