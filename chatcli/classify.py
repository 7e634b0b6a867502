"""Zero-shot classification with a chat model: every label's exact probability, read from the logits.

The question goes through the model's chat template (system/user messages, then the assistant's turn opening),
and the prompt is read once. Each label is then scored exactly: the sum of the log-probabilities of its tokens
followed by the end-of-turn token, so a label that is a prefix of another ("good" / "good enough") is told apart
by whether the model would stop after it. This is the exact version of decoding under a grammar that allows
only the labels: the label with the highest score is the one a complete grammar-constrained search would pick,
without greedy decoding's first-token error (a greedy walk commits to the likeliest first token, whichever
labels share it). A softmax over the label scores gives probabilities that sum to 1.

Calibration ("Calibrate Before Use", Zhao et al. 2021): small models lean towards some labels whatever the
input. The labels are also scored on content-free inputs ("N/A", "", "[MASK]"), once per run; their mean
probabilities p_cf estimate that lean, and each input's probabilities are divided by p_cf and renormalised.

The KV cache is reused twice: the prompt's prefix that the previous input shares (system part, instructions,
label list) is not read again, and each label's tokens are decoded after the prompt and removed again
(`seq_rm` back to the prompt's length), with logits only for those few tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from chatcli.errors import ChatcliError, ContextOverflowError, UsageError

if TYPE_CHECKING:
    from chatcli.chat_templates import ChatFormat
    from chatcli.engine import Engine, LlamaEngine, TextEngine

Message = dict[str, str]

CONTENT_FREE: tuple[str, ...] = ("N/A", "", "[MASK]")
DEFAULT_INSTRUCTIONS = "Classify the text."


@dataclass(frozen=True)
class Classification:
    """One input's verdict. `probabilities` are calibrated when calibration is on, else equal to `uncalibrated`."""

    text: str
    label: str
    probabilities: dict[str, float]
    uncalibrated: dict[str, float]
    log_scores: dict[str, float]  # log P(label tokens + end of turn | prompt): what the probabilities come from


def check_labels(labels: Iterable[str]) -> tuple[str, ...]:
    """The labels as given, or a UsageError: at least two, distinct, non-empty, one line each."""
    labels = tuple(labels)
    if len(labels) < 2:
        raise UsageError("give at least two labels (-l LABEL -l LABEL)")
    for label in labels:
        if not label.strip():
            raise UsageError("a label must not be empty")
        if "\n" in label or "\r" in label:
            raise UsageError(f"a label must be one line: {label!r}")
    seen: set[str] = set()
    for label in labels:
        if label in seen:
            raise UsageError(f"label {label!r} is given twice: labels must be distinct")
        seen.add(label)
    return labels


def softmax(scores: Sequence[float]) -> list[float]:
    top = max(scores)
    weights = [math.exp(s - top) for s in scores]
    total = sum(weights)
    return [w / total for w in weights]


def calibrated(probabilities: Sequence[float], content_free: Sequence[float]) -> list[float]:
    """Zhao et al.'s calibration with W = diag(p_cf)^-1, b = 0: p / p_cf, renormalised (in log space)."""
    floor = 1e-300  # a label the content-free inputs never pick must not divide by zero
    logs = [math.log(max(p, floor)) - math.log(max(q, floor)) for p, q in zip(probabilities, content_free, strict=True)]
    return softmax(logs)


def build_messages(text: str, labels: Sequence[str], *, instructions: str | None = None,
                   system: str | None = None) -> list[Message]:
    """The question: the task and the labels (one per line) as the system message, the text as the user's.

    The text comes last, so consecutive inputs share the prompt's prefix (read once). With a system prompt of
    the user's own, the task opens the user's message instead. (On SmolLM2-135M this layout scored 36-38 of
    the 40 reviews in tests/data calibrated, in either label order; a comma-separated list, 30-34.)
    """
    task = ((instructions or DEFAULT_INSTRUCTIONS).strip() + "\nAnswer with exactly one of these labels:\n"
            + "\n".join(f"- {label}" for label in labels))
    if system:
        return [{"role": "system", "content": system}, {"role": "user", "content": f"{task}\n\n{text}"}]
    return [{"role": "system", "content": task}, {"role": "user", "content": text}]


def require_local(engine: Engine | TextEngine) -> LlamaEngine:
    """The engine as a LlamaEngine that generates text, or a UsageError that says why classify cannot use it."""
    from chatcli.engine import LlamaEngine, TextEngine
    from chatcli.families import EMBEDDING, ENCODER_DECODER, family

    if isinstance(engine, TextEngine):
        raise UsageError(f"classify reads the model's logits: {engine.label} is a remote model; "
                         "use a model run here (a local GGUF)")
    if not isinstance(engine, LlamaEngine):
        raise UsageError("classify reads the model's logits: it needs a model run here by llama.cpp")
    kind = family(engine.info)
    if kind.name == EMBEDDING:
        raise UsageError(f"{engine.path.name} is an embedding model ({kind.architecture}): it does not generate "
                         "text; classify needs a chat model (use `chatcli similar` to compare texts)")
    if kind.name == ENCODER_DECODER:
        raise UsageError(f"{engine.path.name} is an encoder-decoder model ({kind.architecture}): classify needs a "
                         "decoder-only chat model")
    return engine


class Classifier:
    """Picks one of `labels` for each text with a local chat model; see the module docstring for the method."""

    def __init__(self, engine: Engine | TextEngine, labels: Iterable[str], fmt: ChatFormat, *,
                 instructions: str | None = None, system: str | None = None, calibrate: bool = True,
                 content_free: Sequence[str] = CONTENT_FREE,
                 build: Callable[..., list[Message]] = build_messages) -> None:
        self.engine = require_local(engine)
        self.labels = check_labels(labels)
        self.fmt = fmt
        self.instructions = instructions
        self.system = system
        self.calibrate = calibrate
        self.content_free = tuple(content_free)
        self._build = build
        self._scorer = _LabelScorer(self.engine)
        self._end: list[int] | None = None
        self._baseline: list[float] | None = None

    # -------------------------------------------------------- public

    def classify(self, text: str) -> Classification:
        return list(self.classify_all([text]))[0]

    def classify_all(self, texts: Iterable[str]) -> Iterator[Classification]:
        """One Classification per text, in order (lazily: texts may be a stream such as stdin's lines)."""
        share = self.engine._share
        with share.generating() if share is not None else nullcontext(None) as counted:
            try:
                for text in texts:
                    if counted is not None:
                        self.engine._use_threads(counted.threads())
                    yield self._classify(text)
            finally:
                self._scorer.done()

    def content_free_probabilities(self) -> list[float]:
        """The labels' mean probabilities on the content-free inputs (computed once), in label order."""
        if self._baseline is None:
            rows = [softmax(self.scores(text)) for text in self.content_free]
            self._baseline = [sum(column) / len(rows) for column in zip(*rows, strict=True)]
        return self._baseline

    def scores(self, text: str) -> list[float]:
        """log P(label, then end of turn | prompt for text) for each label, in label order."""
        prompt_text = self.fmt.render(self.messages(text), add_generation_prompt=True)
        from chatcli.prompting import wants_bos

        add_bos = wants_bos(self.engine, prompt_text)
        prompt = self.engine.tokenize(prompt_text, add_bos=add_bos)
        end = self._end_tokens()
        sequences = [self.label_tokens(label, prompt_text, prompt, add_bos) + end for label in self.labels]
        longest = max(len(s) for s in sequences)
        if len(prompt) + longest > self.engine.n_ctx:
            raise ContextOverflowError(
                f"the prompt is {len(prompt)} tokens and the longest label {longest} more, but the context window "
                f"is {self.engine.n_ctx}: shorten the text or raise --ctx-size")
        return self._scorer.score(prompt, sequences)

    def messages(self, text: str) -> list[Message]:
        return self._build(text, self.labels, instructions=self.instructions, system=self.system)

    # -------------------------------------------------------- inside

    def _classify(self, text: str) -> Classification:
        logs = self.scores(text)
        raw = softmax(logs)
        final = calibrated(raw, self.content_free_probabilities()) if self.calibrate else raw
        best = max(range(len(self.labels)), key=lambda i: final[i])
        return Classification(
            text=text, label=self.labels[best],
            probabilities=dict(zip(self.labels, final, strict=True)),
            uncalibrated=dict(zip(self.labels, raw, strict=True)),
            log_scores=dict(zip(self.labels, logs, strict=True)),
        )

    def label_tokens(self, label: str, prompt_text: str, prompt: list[int], add_bos: bool) -> list[int]:
        """The tokens the model would write for `label` right after the prompt.

        Cut from the tokenization of prompt + label, so the boundary is tokenized as in the real text (a
        SentencePiece model would otherwise get a word-initial space).
        """
        whole = self.engine.tokenize(prompt_text + label, add_bos=add_bos)
        if whole[:len(prompt)] == prompt and len(whole) > len(prompt):
            return whole[len(prompt):]
        # the label merged with the prompt's last token: tokenize it on its own
        tokens = self.engine._llm.tokenize(label.encode("utf-8"), add_bos=False, special=False)
        if not tokens:
            raise UsageError(f"label {label!r} has no tokens for this model")
        return [int(t) for t in tokens]

    def _end_tokens(self) -> list[int]:
        """What closes the assistant's turn after a label, up to its end-of-generation token.

        Read from the template itself (an assistant message holding a label, rendered after the same question):
        ChatML's `<|im_end|>`, Llama 3's `<|eot_id|>`, … Where the template does not show it plainly, the
        vocabulary's end-of-turn token, else its end-of-sequence token.
        """
        if self._end is not None:
            return self._end
        engine = self.engine
        question = self.messages("x")
        label = self.labels[0]
        end: list[int] = []
        try:
            asked = self.fmt.render(question, add_generation_prompt=True)
            answered = self.fmt.render([*question, {"role": "assistant", "content": label}],
                                       add_generation_prompt=False)
        except Exception:  # noqa: BLE001 - a template may refuse an assistant turn: use the vocabulary's token
            asked, answered = "", ""
        if asked and answered.startswith(asked + label):
            tail = engine.tokenize(answered[len(asked) + len(label):], add_bos=False)
            for i, token in enumerate(tail):
                if engine.is_end_of_generation(token):
                    end = tail[:i + 1]
                    break
        if not end:
            import llama_cpp

            vocab = engine._vocab
            for token in (llama_cpp.llama_vocab_eot(vocab), llama_cpp.llama_vocab_eos(vocab)):
                if token >= 0:
                    end = [int(token)]
                    break
        if not end:
            raise UsageError(f"{engine.path.name} has no end-of-turn or end-of-sequence token: classify cannot "
                             "tell where a label ends")
        self._end = end
        return end


class _LabelScorer:
    """Reads prompts and label continuations into llama.cpp's context, keeping the KV cache's shared prefixes.

    The Llama object's `input_ids`/`n_tokens` are kept equal to what the cache holds, so the engine's other users
    (generate, snapshots) still see the truth; its logits are marked stale when we are done.
    """

    def __init__(self, engine: LlamaEngine) -> None:
        import llama_cpp
        import numpy as np

        self._np = np
        self._lib = llama_cpp
        self.engine = engine
        self.llm = engine._llm
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(engine._vocab))
        self.n_batch = int(self.llm.n_batch)

    def score(self, prompt: list[int], sequences: list[list[int]]) -> list[float]:
        """For each sequence, the sum of log P(token | prompt, the tokens before it)."""
        self.engine.wait_state()  # a snapshot being copied on another thread must finish first
        first = self._hold(prompt)
        scores = []
        for sequence in sequences:
            total = float(first[sequence[0]])
            if len(sequence) > 1:
                if self._cached() != prompt:  # a recurrent model: the prompt had to be read again
                    self._hold(prompt)
                rows = self._decode(sequence[:-1], len(prompt), logits_from=0)
                total += sum(float(row[token]) for row, token in zip(rows, sequence[1:], strict=True))
                self._cut(len(prompt))
            scores.append(total)
        return scores

    def done(self) -> None:
        self.llm._requires_eval = True  # the context's logits are a label's, not the prompt's

    def _cached(self) -> list[int]:
        return [int(t) for t in self.llm.input_ids[: self.llm.n_tokens]]

    def _hold(self, prompt: list[int]) -> Any:
        """Make the cache hold exactly `prompt`, reading only what it does not share; the last token's log-probs."""
        from chatcli.engine import common_prefix

        # the last token is read again: its logits are what we need
        common = min(common_prefix(self._cached(), prompt), len(prompt) - 1)
        self._cut(common)
        start = self.llm.n_tokens  # 0 when the cut was refused (recurrent state)
        return self._decode(prompt[start:], start, logits_from=len(prompt) - start - 1)[-1]

    def _cut(self, n_tokens: int) -> None:
        """Keep the first n_tokens of the cache; a state that cannot be cut back (recurrent) is cleared."""
        if n_tokens >= self.llm.n_tokens:
            return
        if not self.llm._ctx.kv_cache_seq_rm(-1, n_tokens, -1):
            self.llm._ctx.kv_cache_clear()
            n_tokens = 0
        self.llm.n_tokens = n_tokens

    def _decode(self, tokens: list[int], start: int, *, logits_from: int) -> list[Any]:
        """Read `tokens` at positions start…; the log-softmax rows of tokens[logits_from:], in order."""
        np, lib = self._np, self._lib
        batch = self.llm._batch.batch
        rows = []
        for offset in range(0, len(tokens), self.n_batch):
            chunk = tokens[offset: offset + self.n_batch]
            batch.n_tokens = len(chunk)
            wanted = []
            for j, token in enumerate(chunk):
                batch.token[j] = token
                batch.pos[j] = start + offset + j
                batch.seq_id[j][0] = 0
                batch.n_seq_id[j] = 1
                batch.logits[j] = offset + j >= logits_from
                if offset + j >= logits_from:
                    wanted.append(j)
            code = lib.llama_decode(self.llm._ctx.ctx, batch)
            if code != 0:
                raise ChatcliError(f"llama.cpp could not read the prompt (llama_decode returned {code})")
            self.llm.input_ids[start + offset: start + offset + len(chunk)] = chunk
            self.llm.n_tokens = start + offset + len(chunk)
            for j in wanted:
                logits = np.ctypeslib.as_array(lib.llama_get_logits_ith(self.llm._ctx.ctx, j),
                                               shape=(self.n_vocab,)).astype(np.float64)
                top = logits.max()
                rows.append(logits - (top + math.log(float(np.exp(logits - top).sum()))))
        return rows
