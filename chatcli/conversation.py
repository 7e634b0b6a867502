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
from chatcli.engine import SETTINGS, Engine, Generation, GenerationResult, SamplingOptions, TextEngine
from chatcli.errors import ChatcliError, ContextOverflowError, UsageError

Message = dict[str, str]
SETTING_NAMES = tuple(f.name for f in SETTINGS)
_INT_SETTINGS = {f.name for f in SETTINGS if f.metadata["kind"] is int}
# A model with no chat template of its own (a built-in chosen by fallback) is often a base model that
# never ends its turn: its replies stop here unless max_tokens is set.
BASE_MODEL_REPLY_CAP = 256
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
    checked: dict[str, Any] = {name: value}
    replace(SamplingOptions(), **checked).validate()  # InvalidSetting names the field
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
    engine: Engine | TextEngine  # a TextEngine (remote) gets messages: the server templates, tokenizes and fits
    fmt: ChatFormat
    model_label: str
    history: Any = None  # chatcli.history.History, or None for no persistence
    system: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)  # the user's (/set, a template's): stored per conversation
    # Given when the session started (command-line flags): they win over a loaded conversation's settings.
    overrides: dict[str, Any] = field(default_factory=dict)
    # The model's own defaults, below the settings: its catalogue options, a reply cap for a base model.
    model_defaults: dict[str, Any] = field(default_factory=dict)
    conversation_id: str | None = None
    snapshots: Any = None  # chatcli.snapshots.SnapshotStore, or None
    model_id: str = ""
    template_name: str | None = None
    transform: Callable[[str], str] | None = None  # a prompt template applied to each message
    messages: list[Message] = field(default_factory=list)  # user/assistant turns, oldest first
    interrupted: set[int] = field(default_factory=set)  # indexes of replies cut short
    _reset_cache: bool = True
    _usage: tuple[tuple[Any, ...], tuple[int, int]] | None = None  # (what it was computed for, the answer)
    _last_remote: GenerationResult | None = None  # a remote engine's last reply: its usage is the context used

    # -------------------------------------------------------- conversation state

    def load(self, conversation_id: str) -> None:
        """Continue a stored conversation: its system prompt, settings and turns."""
        conversation = self.history.get(conversation_id)
        self.conversation_id = conversation.id
        self.system = conversation.system
        self.settings = {**self.settings, **(conversation.settings or {}), **self.overrides}
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

    def switch_model(self, engine: Engine, fmt: ChatFormat, label: str, model_id: str,
                     model_defaults: dict[str, Any] | None = None) -> None:
        self.engine, self.fmt, self.model_label, self.model_id = engine, fmt, label, model_id
        self.model_defaults = dict(model_defaults or {})
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
        """The settings over the model's defaults over the built-in ones."""
        values = {k: v for k, v in {**self.model_defaults, **self.settings}.items() if k in SETTING_NAMES}
        return replace(SamplingOptions(), **values, stop=tuple(self.fmt.stop) + extra_stop).validate()

    # -------------------------------------------------------- prompts and context

    def _all_messages(self, turns: list[Message]) -> list[Message]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + turns

    def _local(self) -> Engine:
        if isinstance(self.engine, TextEngine):
            raise UsageError(f"{self.model_label} is a remote model: the server tokenizes, chatcli cannot count here")
        return self.engine

    def tokens_for(self, turns: list[Message]) -> list[int]:
        from chatcli.prompting import prompt_tokens

        text = self.fmt.render(self._all_messages(turns), add_generation_prompt=True)
        return prompt_tokens(self._local(), text, reserve=1, truncate=False)

    def fit(self) -> tuple[list[int], int]:
        """Prompt tokens for the conversation, dropping the oldest turns (never the system prompt) to fit."""
        engine = self._local()
        reserve = min(int(self.options().max_tokens or 512), engine.n_ctx // 4)
        budget = engine.n_ctx - max(1, reserve)
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
            nxt = _next_exchange(turns)
            if nxt is None:
                raise ContextOverflowError(
                    f"your message does not fit in the context window ({engine.n_ctx} tokens): "
                    "shorten it, or start the chat with a larger --ctx-size"
                )
            turns = turns[nxt:]
            dropped += nxt

    def context_usage(self) -> tuple[int, int]:
        """(tokens the conversation takes now, context window).

        The REPL's toolbar asks on every redraw (each key press): render and tokenise only when the
        conversation, system prompt, settings or model changed since the last answer.
        """
        if isinstance(self.engine, TextEngine):  # what the server counted for the last reply
            last = self._last_remote
            return ((last.prompt_tokens + last.completion_tokens) if last and self.messages else 0,
                    self.engine.n_ctx or 0)
        key = (id(self.engine), self.fmt, self.system, self.conversation_id, len(self.messages),
               self.messages[-1]["content"] if self.messages else None, self.options().max_tokens)
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
            reply = self._begin()
        except ChatcliError:  # nothing was generated (too long, a server that refused): the message is not kept
            self.messages.pop()
            raise
        self._ensure_conversation()
        if self.history is not None:
            self.history.add_turn(self.conversation_id, "user", text, model=self.model_label)
        return reply

    def retry(self) -> Reply:
        """Regenerate the last reply."""
        if not self.messages or self.messages[-1]["role"] != "assistant":
            raise UsageError("nothing to retry: no reply yet")
        self.messages.pop()
        self.interrupted.discard(len(self.messages))
        if self.conversation_id and self.history is not None:
            self.history.drop_last_reply(self.conversation_id)
        return self._begin()

    def _ensure_conversation(self) -> None:
        if self.history is None or self.conversation_id:
            return
        conversation = self.history.new_conversation(
            model=self.model_label, system=self.system, template=self.template_name, settings=dict(self.settings)
        )
        self.conversation_id = conversation.id

    def _restore(self, tokens: list[int]) -> int:
        if self.snapshots is None:
            return 0
        self.snapshots.wait_captured(self.engine)  # a snapshot still copying the context goes first
        if not self._reset_cache:
            return 0
        self._reset_cache = False
        self.snapshots.flush()  # e.g. /load of the conversation whose snapshot is being written
        return int(self.snapshots.restore(self.engine, tokens, model_id=self.model_id))

    def _begin(self) -> Reply:
        """Start the reply to the conversation as it stands: the one place local and remote engines part ways."""
        if isinstance(self.engine, TextEngine):
            generation, dropped = self._remote_generation(self.engine)
            self._last_remote = generation.result
            reply = Reply(iter(()), generation.result, dropped=dropped)
        else:
            tokens, dropped = self.fit()
            restored = self._restore(tokens)
            generation = self.engine.generate(tokens, self.options())
            reply = Reply(iter(()), generation.result, dropped=dropped, restored=restored)
        reply.chunks = self._stream(generation, reply)
        return reply

    def _remote_generation(self, engine: TextEngine) -> tuple[Generation, int]:
        """Send the messages; the server's verdict decides what fits: on a context error, drop the oldest exchange
        (never the system prompt) and ask again. Exact for every server, and no tokenizer needed here."""
        turns, dropped = list(self.messages), 0
        while True:
            try:
                return engine.chat(self._all_messages(turns), self.options()), dropped
            except ContextOverflowError:
                nxt = _next_exchange(turns)
                if nxt is None:
                    raise
                turns = turns[nxt:]
                dropped += nxt

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
        if not isinstance(self.engine, TextEngine):  # a remote model's state lives on its server
            self._save_snapshot()

    def _save_snapshot(self) -> None:
        """Keep the context's state for the conversation so far, so resuming it later skips the prefill.

        Best effort: a snapshot is only a shortcut, so any failure here just means no snapshot.
        """
        if self.snapshots is None:
            return
        # A copy of the conversation as it is now: the snapshot's thread renders it while this one goes on.
        now = replace(self, messages=list(self.messages), settings=dict(self.settings), history=None, snapshots=None)

        def next_prompt_start() -> list[int] | None:
            try:
                return now.fit()[0]  # with the turns the next prompt would drop dropped here too
            except ChatcliError:
                return None

        # Written in the background, off the path to the next prompt; it keeps only what the conversation
        # re-rendered starts with, so it is a prefix of the next prompt. One per conversation.
        self.snapshots.save_later(self.engine, next_prompt_start, model_id=self.model_id,
                                  conversation_id=self.conversation_id)


def _next_exchange(turns: list[Message]) -> int | None:
    """Where the second exchange starts (the oldest one is a user turn and the replies up to the next user turn)."""
    return next((i for i, m in enumerate(turns) if i > 0 and m["role"] == "user"), None)
