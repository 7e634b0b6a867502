"""A fake Engine for chat-logic tests: one token per character, replies replayed from a queue.

It implements the whole `chatcli.engine.Engine` protocol (mypy checks that in `_check` below), state included:
its "KV cache" is the list of tokens it has read, and a state file holds those tokens as JSON.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from chatcli.engine import Engine, Generation, GenerationResult, SamplingOptions, StopScanner, common_prefix


@dataclass
class FakeInfo:
    bos_token: str | None = None
    architecture: str | None = "fake"
    chat_template: str | None = None
    eos_token: str | None = None
    eot_token: str | None = None
    file_size: int | None = None
    n_params: int | None = None
    file_type: str | None = None


@dataclass
class FakeEngine:
    replies: list[str] = field(default_factory=list)
    n_ctx: int = 4096
    path: Path = Path("/fake/model.gguf")
    n_threads: int = 1
    gpu_layers: int = 0
    flash_attn: bool = False
    load_seconds: float = 0.0
    info: FakeInfo = field(default_factory=FakeInfo)
    add_bos: bool = False
    recurrent: bool = False
    encoder_decoder: bool = False
    prompts: list[str] = field(default_factory=list)  # every prompt it was asked to continue, as text
    chunk_hook: object = None  # called after each chunk (tests raise KeyboardInterrupt from it)
    cache: list[int] = field(default_factory=list)  # the tokens "in the KV cache"
    _claim: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def tokenize(self, text: str, *, add_bos: bool = True) -> list[int]:
        return [ord(c) for c in text]

    def detokenize(self, tokens: Sequence[int]) -> str:
        return "".join(chr(t) for t in tokens)

    def generate(self, prompt: Sequence[int], options: SamplingOptions) -> Generation:
        self.prompts.append(self.detokenize(prompt))
        self.cache = list(prompt)
        reply = self.replies.pop(0) if self.replies else "ok"
        result = GenerationResult(prompt_tokens=len(prompt))

        def chunks() -> Iterator[str]:
            scanner = StopScanner(options.stop)
            for word in reply.split(" "):
                piece = word if result.completion_tokens == 0 else " " + word
                result.completion_tokens += 1
                text, stopped = scanner.feed(piece)
                self.cache.extend(self.tokenize(piece))
                if text:
                    result.text += text
                    yield text
                if callable(self.chunk_hook):
                    self.chunk_hook(result)
                if stopped:
                    return
                if options.max_tokens and result.completion_tokens >= options.max_tokens:
                    result.finish_reason = "length"
                    return
            tail = scanner.flush()
            if tail:
                yield tail

        return Generation(chunks(), result)

    def close(self) -> None:
        pass

    @property
    def cached_tokens(self) -> list[int]:
        return list(self.cache)

    def save_state(self, path: Path) -> int:
        path.write_text(json.dumps({"tokens": self.cache}))
        return len(self.cache)

    def load_state(self, path: Path) -> list[int]:
        try:
            self.cache = [int(t) for t in json.loads(path.read_text())["tokens"]]
        except (OSError, ValueError, KeyError, TypeError):
            self.reset()
            raise ValueError(f"not a fake state file: {path}") from None
        return list(self.cache)

    def reset(self) -> None:
        self.cache = []

    def truncate(self, n_tokens: int) -> None:
        del self.cache[n_tokens:]

    def state_file_bytes(self, keep: Sequence[int] | None = None,
                         min_tokens: int = 0) -> tuple[list[int], bytearray] | None:
        tokens = list(self.cache)
        if keep is not None:
            common = common_prefix(tokens, keep)
            if common < max(1, min_tokens):
                return None
            self.truncate(common)
            tokens = tokens[:common]
        if len(tokens) < max(1, min_tokens):
            return None
        return tokens, bytearray(json.dumps({"tokens": tokens}).encode())

    def claim_state(self) -> None:
        self._claim.acquire()

    def release_state(self) -> None:
        self._claim.release()

    def wait_state(self) -> None:
        with self._claim:
            pass


def _check(engine: FakeEngine) -> Engine:
    return engine  # mypy: the fake implements the whole protocol
