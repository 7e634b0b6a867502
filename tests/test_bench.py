"""chatcli.bench on a tiny random-weight GPT-2: what it runs and what it reports (never how fast)."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from chatcli import bench
from chatcli.engine import LlamaEngine, SamplingOptions
from chatcli.errors import UsageError


class RecordingEngine:
    """A real LlamaEngine that notes each reset and each generate call (prompt length, max_tokens)."""

    def __init__(self, engine: LlamaEngine) -> None:
        self.engine = engine
        self.calls: list[tuple[str, int, int | None]] = []

    def __getattr__(self, name: str) -> object:
        return getattr(self.engine, name)

    def reset(self) -> None:
        self.calls.append(("reset", 0, None))
        self.engine.reset()

    def generate(self, prompt: Sequence[int], options: SamplingOptions):  # noqa: ANN201
        self.calls.append(("generate", len(prompt), options.max_tokens))
        return self.engine.generate(prompt, options)


@pytest.fixture(scope="module")
def engine(tiny_gpt2: Path) -> Iterator[LlamaEngine]:
    engine = LlamaEngine(tiny_gpt2, n_ctx=256, n_threads=1, gpu_layers=0)
    yield engine
    engine.close()


def test_runs_requested_prompt_and_generation_lengths(engine: LlamaEngine) -> None:
    recorder = RecordingEngine(engine)
    report = bench.run_bench(recorder, prompt_lengths=(32, 64), gen_lengths=(16,), repetitions=3)  # type: ignore[arg-type]
    assert [row.test for row in report.rows] == ["pp32", "pp64", "tg16"]
    for row in report.rows:
        assert row.repetitions == 3 and len(row.samples_s) == 3
        assert all(rate > 0 for rate in row.samples_ts) and row.mean_ts > 0 and row.stddev_ts >= 0
    pp32, pp64, tg16 = report.rows
    assert pp32.tokens_timed == (32, 32, 32) and pp64.tokens_timed == (64, 64, 64)
    assert tg16.tokens_timed == (15, 15, 15) and tg16.complete  # 16 tokens: 15 decode steps timed
    generates = [(n, max_tokens) for kind, n, max_tokens in recorder.calls if kind == "generate"]
    # pp: one warm-up + 3 timed prefills of exactly P tokens, one token sampled each
    assert generates.count((32, 1)) == 4 and generates.count((64, 1)) == 4
    tg_calls = [(n, m) for n, m in generates if m == 16]
    # choosing a prompt that runs the full 16 tokens is the warm-up (1 to 3 candidates), then 3 timed runs
    assert 4 <= len(tg_calls) <= 6 and all(n < 32 for n, _ in tg_calls)
    # every run starts from an empty context: a reset right before each generate
    for before, call in itertools.pairwise(recorder.calls):
        if call[0] == "generate":
            assert before[0] == "reset"


def test_without_warmup_only_the_repetitions_run(engine: LlamaEngine) -> None:
    recorder = RecordingEngine(engine)
    report = bench.run_bench(recorder, prompt_lengths=(8,), gen_lengths=(4,), repetitions=2,  # type: ignore[arg-type]
                             warmup=False)
    assert [(row.test, row.repetitions) for row in report.rows] == [("pp8", 2), ("tg4", 2)]
    assert sum(1 for call in recorder.calls if call[0] == "generate") == 4


def test_settings_describe_the_loaded_model(engine: LlamaEngine, tiny_gpt2: Path) -> None:
    report = bench.run_bench(engine, prompt_lengths=(16,), gen_lengths=(), repetitions=1, flash_attn=False)
    s = report.settings
    assert (s.model, s.path, s.size_bytes) == (tiny_gpt2.name, str(tiny_gpt2), tiny_gpt2.stat().st_size)
    assert (s.architecture, s.threads, s.n_ctx, s.gpu_layers, s.flash_attn) == ("gpt2", 1, 256, 0, False)
    assert s.quant and s.parameters and s.parameters > 0


def test_rows_and_json_render_every_result(engine: LlamaEngine) -> None:
    report = bench.run_bench(engine, prompt_lengths=(16,), gen_lengths=(8,), repetitions=2)
    rows = bench.table_rows([report, report])
    assert len(rows) == 4 and all(len(row) == len(bench.HEADER) for row in rows)
    assert [row[bench.HEADER.index("test")] for row in rows] == ["pp16", "tg8", "pp16", "tg8"]
    assert " ± " in rows[0][-1]
    [pp, tg] = json.loads(json.dumps(bench.to_json(report)))
    assert (pp["test"], pp["n_prompt"], pp["n_gen"], pp["repetitions"]) == ("pp16", 16, 0, 2)
    assert (tg["test"], tg["n_prompt"], tg["n_gen"]) == ("tg8", 0, 8)
    assert pp["avg_ts"] > 0 and len(pp["samples_ts"]) == 2 and pp["n_ctx"] == 256 and pp["architecture"] == "gpt2"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompt_lengths": (256,)}, "invalid prompt length 256"),
        ({"prompt_lengths": (0,)}, "invalid prompt length 0"),
        ({"gen_lengths": (1,)}, "invalid generation length 1"),
        ({"gen_lengths": (250,)}, "tokens of context"),
        ({"repetitions": 0}, "--repetitions"),
    ],
)
def test_impossible_settings_are_usage_errors(engine: LlamaEngine, kwargs: dict, message: str) -> None:
    options = {"prompt_lengths": (8,), "gen_lengths": (4,), "repetitions": 1, **kwargs}
    with pytest.raises(UsageError, match=message):
        bench.run_bench(engine, **options)


def test_bench_command_json(chatcli, tiny_gpt2) -> None:  # noqa: ANN001
    result = chatcli("bench", str(tiny_gpt2), "-p", "16", "-n", "8", "-r", "2", "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [r["test"] for r in rows] == ["pp16", "tg8"]
    assert all(r["avg_ts"] > 0 and r["repetitions"] == 2 for r in rows)
    table = chatcli("bench", str(tiny_gpt2), "-p", "16", "-n", "8", "-r", "1")
    assert table.returncode == 0 and "pp16" in table.stdout and "tg8" in table.stdout
