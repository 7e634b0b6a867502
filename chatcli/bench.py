"""`chatcli bench`: prompt processing (pp) and text generation (tg) speed of a loaded model, like llama-bench.

pp<P>: a prompt of exactly P tokens read from an empty context, timed until its first token is sampled.
tg<N>: N tokens generated greedily after a short prompt, timed from the first token to the last (N - 1 steps),
through the same `LlamaEngine.generate` path that `chat` and `complete` use (sampling and detokenising included).
The library only measures; the CLI prints.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from chatcli.engine import Engine, GenerationResult, SamplingOptions
from chatcli.errors import ChatcliError, UsageError

# Ordinary prose: it tokenises the way real prompts do, and greedy decoding after it rarely ends at once.
_FILLER = (
    "The history of the city begins with a small settlement on the bank of a wide river, where traders "
    "stopped to rest their animals and exchange grain, salt, cloth and tools. Over the centuries the "
    "village grew into a market town, then into a walled city with bridges, mills, schools and a harbour. "
)
# Tried in order for tg: the first after which the model generates the whole N tokens greedily.
_TG_PROMPTS = (
    "The history of the city begins",
    "Here is a long list of numbers: 1, 2, 3,",
    "Chapter 1\n\nIt was a cold morning when",
)

Kind = Literal["pp", "tg"]


@dataclass(frozen=True)
class BenchSettings:
    """How the model ran: the columns llama-bench prints next to each result."""

    model: str  # file name
    path: str
    size_bytes: int | None
    architecture: str | None
    parameters: int | None
    quant: str | None
    threads: int | None
    n_ctx: int
    gpu_layers: int | None  # -1 = all
    flash_attn: bool | None  # None: not known

    def to_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class BenchRow:
    """One test (pp512, tg128, ...) repeated: tokens/s of every run, and the tokens each run timed."""

    kind: Kind
    n_tokens: int  # asked for: prompt length for pp, tokens to generate for tg
    samples_ts: tuple[float, ...]  # tokens per second, one per repetition
    samples_s: tuple[float, ...]  # seconds timed, one per repetition
    tokens_timed: tuple[int, ...]  # tokens each timing covers (tg: generated - 1; fewer if the model ended early)
    settings: BenchSettings = field(repr=False)

    @property
    def test(self) -> str:
        return f"{self.kind}{self.n_tokens}"

    @property
    def repetitions(self) -> int:
        return len(self.samples_ts)

    @property
    def mean_ts(self) -> float:
        return statistics.fmean(self.samples_ts)

    @property
    def stddev_ts(self) -> float:
        return statistics.stdev(self.samples_ts) if len(self.samples_ts) > 1 else 0.0

    @property
    def complete(self) -> bool:
        """False when a tg run ended (end-of-generation token) before its N tokens."""
        wanted = self.n_tokens if self.kind == "pp" else self.n_tokens - 1
        return all(n == wanted for n in self.tokens_timed)

    def to_dict(self) -> dict[str, object]:
        return {
            "test": self.test,
            "n_prompt": self.n_tokens if self.kind == "pp" else 0,
            "n_gen": self.n_tokens if self.kind == "tg" else 0,
            "repetitions": self.repetitions,
            "avg_ts": round(self.mean_ts, 3),
            "stddev_ts": round(self.stddev_ts, 3),
            "samples_ts": [round(v, 3) for v in self.samples_ts],
            "samples_s": [round(v, 6) for v in self.samples_s],
            "tokens_timed": list(self.tokens_timed),
            "complete": self.complete,
            **self.settings.to_dict(),
        }


@dataclass(frozen=True)
class BenchReport:
    settings: BenchSettings
    rows: tuple[BenchRow, ...]

    def to_dict(self) -> dict[str, object]:
        return {"settings": self.settings.to_dict(), "results": [row.to_dict() for row in self.rows]}


def settings_of(engine: Engine, *, flash_attn: bool | None = None) -> BenchSettings:
    """The settings an engine runs with; flash_attn as given, else the engine's."""
    info = engine.info
    return BenchSettings(
        model=engine.path.name,
        path=str(engine.path),
        size_bytes=info.file_size,
        architecture=info.architecture,
        parameters=info.n_params or None,
        quant=info.file_type,
        threads=engine.n_threads,
        n_ctx=engine.n_ctx,
        gpu_layers=engine.gpu_layers,
        flash_attn=engine.flash_attn if flash_attn is None else flash_attn,
    )


def prompt_of(engine: Engine, n_tokens: int) -> list[int]:
    """Exactly n_tokens tokens of prose (starting with BOS when the model adds one)."""
    copies = 1
    tokens = engine.tokenize(_FILLER)
    while len(tokens) < n_tokens:
        copies *= 2
        tokens = engine.tokenize(_FILLER * copies)
    return tokens[:n_tokens]


def _generate(engine: Engine, prompt: Sequence[int], options: SamplingOptions) -> GenerationResult:
    engine.reset()  # from an empty context: no prefix of an earlier run is reused
    generation = engine.generate(prompt, options)
    try:
        for _chunk in generation:
            pass
    finally:
        generation.close()
    return generation.result


def _pp_once(engine: Engine, prompt: Sequence[int]) -> tuple[float, int]:
    result = _generate(engine, prompt, SamplingOptions(temperature=0.0, max_tokens=1))
    if result.prompt_seconds <= 0:
        raise ChatcliError("the engine produced no token: cannot time prompt processing")
    return result.prompt_seconds, len(prompt)


def _tg_once(engine: Engine, prompt: Sequence[int], n_gen: int) -> tuple[float, int]:
    result = _generate(engine, prompt, SamplingOptions(temperature=0.0, max_tokens=n_gen))
    return result.decode_seconds, max(0, result.completion_tokens - 1)


def _tg_prompt(engine: Engine, n_gen: int, try_all: bool) -> list[int]:
    """The first candidate prompt after which greedy decoding runs the full n_gen tokens (else the best)."""
    best: tuple[int, list[int]] | None = None
    for text in _TG_PROMPTS:
        prompt = engine.tokenize(text)
        if not try_all:
            return prompt
        _seconds, timed = _tg_once(engine, prompt, n_gen)
        if timed == n_gen - 1:
            return prompt
        if best is None or timed > best[0]:
            best = (timed, prompt)
    assert best is not None
    return best[1]


def run_bench(
    engine: Engine,
    *,
    prompt_lengths: Sequence[int] = (512,),
    gen_lengths: Sequence[int] = (128,),
    repetitions: int = 5,
    warmup: bool = True,
    flash_attn: bool | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> BenchReport:
    """Run pp<P> for each P and tg<N> for each N, `repetitions` times each, and return one row per test.

    `progress(test, done, total)` is called before each timed run (and once per finished test) for a status line.
    """
    if repetitions < 1:
        raise UsageError("invalid value for --repetitions: must be 1 or more")
    for p in prompt_lengths:
        if not 1 <= p < engine.n_ctx:
            raise UsageError(f"invalid prompt length {p}: must be between 1 and {engine.n_ctx - 1} (the context)")
    longest_tg_prompt = max(len(engine.tokenize(text)) for text in _TG_PROMPTS)
    for n in gen_lengths:
        if n < 2:
            raise UsageError(f"invalid generation length {n}: must be 2 or more")
        if longest_tg_prompt + n > engine.n_ctx:
            raise UsageError(
                f"tg{n} needs {longest_tg_prompt + n} tokens of context but the window is {engine.n_ctx}: "
                "raise --ctx-size or generate fewer tokens"
            )
    settings = settings_of(engine, flash_attn=flash_attn)
    rows: list[BenchRow] = []

    def measure(kind: Kind, n: int, once: Callable[[], tuple[float, int]], warm: bool) -> None:
        name = f"{kind}{n}"
        if warm:
            once()
        seconds: list[float] = []
        timed: list[int] = []
        for i in range(repetitions):
            if progress is not None:
                progress(name, i, repetitions)
            s, t = once()
            seconds.append(s)
            timed.append(t)
        if progress is not None:
            progress(name, repetitions, repetitions)
        rates = tuple(t / s if s > 0 and t > 0 else 0.0 for s, t in zip(seconds, timed, strict=True))
        rows.append(BenchRow(kind, n, rates, tuple(seconds), tuple(timed), settings))

    for p in prompt_lengths:
        prompt = prompt_of(engine, p)
        measure("pp", p, lambda prompt=prompt: _pp_once(engine, prompt), warmup)  # type: ignore[misc]
    for n in gen_lengths:
        # with warm-up, choosing the prompt runs the model once per candidate tried: that is the warm-up
        prompt = _tg_prompt(engine, n, try_all=warmup)
        measure("tg", n, lambda prompt=prompt, n=n: _tg_once(engine, prompt, n), False)  # type: ignore[misc]
    return BenchReport(settings, tuple(rows))


# ---------------------------------------------------------------- rendering (no printing here)

HEADER = ("model", "size", "params", "quant", "threads", "gpu_layers", "fa", "n_ctx", "test", "t/s")


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return "-"  # pragma: no cover


def _count(n: int | None) -> str:
    if not n:
        return "-"
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return str(n)


def table_rows(reports: BenchReport | Sequence[BenchReport]) -> list[tuple[str, ...]]:
    """One row of strings per result, in HEADER's columns (t/s as 'mean ± stddev', '*' when a tg run ended early)."""
    if isinstance(reports, BenchReport):
        reports = [reports]
    out: list[tuple[str, ...]] = []
    for report in reports:
        s = report.settings
        gpu = "-" if s.gpu_layers is None else ("all" if s.gpu_layers < 0 else str(s.gpu_layers))
        fa = "-" if s.flash_attn is None else ("1" if s.flash_attn else "0")
        for row in report.rows:
            mark = "" if row.complete else " *"
            out.append((
                s.model, _size(s.size_bytes), _count(s.parameters), s.quant or "-",
                "-" if s.threads is None else str(s.threads), gpu, fa, str(s.n_ctx), row.test,
                f"{row.mean_ts:.2f} ± {row.stddev_ts:.2f}{mark}",
            ))
    return out


def to_json(reports: BenchReport | Sequence[BenchReport]) -> list[dict[str, object]]:
    """llama-bench-like JSON: one flat object per result, settings included."""
    if isinstance(reports, BenchReport):
        reports = [reports]
    return [row.to_dict() for report in reports for row in report.rows]
