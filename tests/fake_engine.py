"""A fake Engine for chat-logic tests: one token per character, replies replayed from a queue."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from chatcli.engine import Generation, GenerationResult, SamplingOptions, StopScanner


@dataclass
class FakeInfo:
    bos_token: str | None = None
    architecture: str = "fake"
    chat_template: str | None = None


@dataclass
class FakeEngine:
    replies: list[str] = field(default_factory=list)
    n_ctx: int = 4096
    path: Path = Path("/fake/model.gguf")
    info: FakeInfo = field(default_factory=FakeInfo)
    add_bos: bool = False
    prompts: list[str] = field(default_factory=list)  # every prompt it was asked to continue, as text
    chunk_hook: object = None  # called after each chunk (tests raise KeyboardInterrupt from it)

    def tokenize(self, text: str, *, add_bos: bool = True) -> list[int]:
        return [ord(c) for c in text]

    def detokenize(self, tokens: Sequence[int]) -> str:
        return "".join(chr(t) for t in tokens)

    def generate(self, prompt: Sequence[int], options: SamplingOptions) -> Generation:
        self.prompts.append(self.detokenize(prompt))
        reply = self.replies.pop(0) if self.replies else "ok"
        result = GenerationResult(prompt_tokens=len(prompt))

        def chunks() -> Iterator[str]:
            scanner = StopScanner(options.stop)
            for word in reply.split(" "):
                piece = word if result.completion_tokens == 0 else " " + word
                result.completion_tokens += 1
                text, stopped = scanner.feed(piece)
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
