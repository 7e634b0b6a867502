"""Decode speed of `chatcli complete` against a raw llama-cpp-python `Llama.generate()` loop, in one run.

Same model, threads, context, batch, GPU layers, flash attention and greedy sampling on both sides;
runs alternate (raw, chatcli, chatcli, raw, ...). chatcli runs as a user runs it (a subprocess, `--json`),
its decode tokens/s and time to first token read from its JSON timings; the raw loop runs in this process.
Target: chatcli decode tokens/s >= 0.95 x raw.

With --stream it also times `create_completion(stream=True)` on a long generation, to show why chatcli
does not use it (llama-cpp-python re-detokenises every completion token at each step: quadratic).

    python3 benchmarks/decode.py [--quick] [--model PATH] [--tokens N] [--stream [--long-tokens N]]
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

PROMPT = (
    "The history of the city begins with a small settlement on the bank of a wide river, where traders "
    "stopped to rest their animals and exchange grain, salt and cloth. Over the centuries"
)


@dataclass
class Run:
    decode_tps: float
    ttft: float  # seconds from the start of generation to the first token (prompt processing)
    wall: float  # chatcli: the whole process; raw: load + prompt + decode in this process
    completion_tokens: int
    prompt_tokens: int
    tail_tps: float | None = None  # tokens/s over the last quarter of the tokens (in-process runs only)


@dataclass(frozen=True)
class Setup:
    model: Path
    n_ctx: int
    threads: int
    gpu_layers: int
    flash_attn: bool
    prompt: str

    @property
    def n_batch(self) -> int:
        return min(512, self.n_ctx)  # what LlamaEngine uses

    def llama(self):  # noqa: ANN201 - llama_cpp.Llama
        from llama_cpp import Llama

        return Llama(model_path=str(self.model), n_ctx=self.n_ctx, n_batch=self.n_batch, n_ubatch=self.n_batch,
                     n_threads=self.threads, n_threads_batch=self.threads, n_gpu_layers=self.gpu_layers,
                     flash_attn=self.flash_attn, verbose=False)


SAMPLING = {"temp": 0.0, "top_k": 40, "top_p": 0.95, "min_p": 0.05, "repeat_penalty": 1.0}  # chatcli's, greedy


def _rates(stamps: list[float], count: int) -> tuple[float, float | None]:
    """tokens/s from the first to the last token, and over the last quarter of them."""
    if count < 2 or len(stamps) < 2 or stamps[-1] <= stamps[0]:
        return 0.0, None
    k = len(stamps) // 4
    tail = k / (stamps[-1] - stamps[-1 - k]) if k and stamps[-1] > stamps[-1 - k] else None
    return (count - 1) / (stamps[-1] - stamps[0]), tail


def raw_decode(llm, tokens: list[int], n: int) -> tuple[float, float, int, float | None]:  # noqa: ANN001
    """The baseline loop: (seconds to first token, tokens/s first to last, tokens generated, last-quarter tok/s)."""
    eos = llm.token_eos()
    count = 0
    stamps: list[float] = []
    llm.reset()
    started = time.perf_counter()
    for token in llm.generate(tokens, **SAMPLING):
        stamps.append(time.perf_counter())
        if token == eos:
            break
        count += 1
        if count >= n:
            break
    tps, tail = _rates(stamps, count)
    return (stamps[0] - started if stamps else 0.0), tps, count, tail


def run_raw(setup: Setup, n: int) -> Run:
    started = time.perf_counter()
    llm = setup.llama()
    try:
        tokens = llm.tokenize(setup.prompt.encode("utf-8"), add_bos=True, special=True)
        ttft, tps, count, tail = raw_decode(llm, tokens, n)
    finally:
        llm.close()
    return Run(tps, ttft, time.perf_counter() - started, count, len(tokens), tail)


def run_chatcli(setup: Setup, n: int, env: dict[str, str]) -> Run:
    cmd = [*common.chatcli_command(), "complete", "-m", str(setup.model), "--json", "--temperature", "0",
           "-n", str(n), "-c", str(setup.n_ctx), "--threads", str(setup.threads),
           "--gpu-layers", str(setup.gpu_layers), "--flash-attn" if setup.flash_attn else "--no-flash-attn",
           setup.prompt]
    wall, proc = common.run_timed(cmd, env)
    out = json.loads(proc.stdout)
    timings = out["timings"]
    return Run(timings["decode_tokens_per_second"] or 0.0, timings["prompt_seconds"], wall,
               out["completion_tokens"], out["prompt_tokens"])


def run_stream(llm, tokens: list[int], n: int) -> tuple[float, float, int, float | None]:  # noqa: ANN001
    """create_completion(stream=True), timed per chunk (about one per token), as raw_decode."""
    llm.reset()
    stamps: list[float] = []
    finish = None
    started = time.perf_counter()
    for chunk in llm.create_completion(tokens, max_tokens=n, stream=True, temperature=0.0, top_k=40, top_p=0.95,
                                       min_p=0.05, repeat_penalty=1.0):
        stamps.append(time.perf_counter())
        finish = chunk["choices"][0]["finish_reason"] or finish
    count = n if finish == "length" else max(0, llm.n_tokens - len(tokens))
    tps, tail = _rates(stamps, count)
    return (stamps[0] - started if stamps else 0.0), tps, count, tail


def summarise(results: dict[str, list[Run]], contention: common.Contention) -> None:
    rows = []
    for name, runs in results.items():
        tps = [r.decode_tps for r in runs]
        rows.append([name, len(runs), common.median(tps), common.spread(tps),
                     1000 * common.median([r.ttft for r in runs]), common.median([r.wall for r in runs]),
                     "/".join(sorted({str(r.prompt_tokens) for r in runs})),
                     "/".join(sorted({str(r.completion_tokens) for r in runs})), contention.median_percent(name)])
        tails = [r.tail_tps for r in runs if r.tail_tps]
        rows[-1].insert(4, common.median(tails) if tails else None)
    common.print_table(["variant", "runs", "decode tok/s", "range", "last 1/4 tok/s", "TTFT ms", "wall s",
                        "prompt tok", "gen tok", "others %"], rows)
    contention.warn()


def main() -> None:
    p = common.parser(__doc__.splitlines()[0], reps=5, quick_reps=3)
    p.add_argument("--model", type=Path, help="GGUF file (default: SmolLM2-135M-Instruct Q4_1 from the tests)")
    p.add_argument("--tokens", "-n", type=int, default=128, help="tokens to generate per run (default 128)")
    p.add_argument("--ctx", type=int, default=2048, help="context window on both sides (default 2048)")
    p.add_argument("--threads", type=int, default=None, help="threads on both sides (default: physical cores)")
    p.add_argument("--gpu-layers", type=int, default=0, help="layers offloaded on both sides (default 0)")
    p.add_argument("--flash-attn", action="store_true", help="flash attention on both sides")
    p.add_argument("--stream", action="store_true", help="also compare create_completion(stream=True)")
    p.add_argument("--long-tokens", type=int, default=1000, help="tokens for the --stream comparison")
    args = p.parse_args()
    reps = common.repetitions(args)
    from chatcli.engine import physical_cores

    setup = Setup(model=(args.model or common.default_model()).resolve(), n_ctx=args.ctx,
                  threads=args.threads or physical_cores(), gpu_layers=args.gpu_layers,
                  flash_attn=args.flash_attn, prompt=PROMPT)
    common.note_machine()
    print(f"model {setup.model.name}, n_ctx {setup.n_ctx}, n_batch {setup.n_batch}, threads {setup.threads}, "
          f"gpu_layers {setup.gpu_layers}, flash_attn {setup.flash_attn}, greedy, {args.tokens} tokens, {reps} reps\n")
    import llama_cpp  # noqa: F401 - imported before any timing: the raw side's wall time is load + run

    with common.scratch("decode") as home:
        env = common.clean_env(home)
        variants = {
            "raw generate()": lambda: run_raw(setup, args.tokens),
            "chatcli complete": lambda: run_chatcli(setup, args.tokens, env),
        }
        common.interleaved(variants, 1)  # warm-up, not counted: page cache, first-run costs
        contention = common.Contention()
        results = common.interleaved(variants, reps, contention)
        summarise(results, contention)
        raw, ours = results["raw generate()"], results["chatcli complete"]
        if {r.completion_tokens for r in raw} != {r.completion_tokens for r in ours}:
            print("warning: the two sides generated different token counts (an end-of-generation token?)")
        print()
        for label, attr, target, ok in (
            ("decode tok/s chatcli/raw", "decode_tps", ">= 0.95", lambda r: r >= 0.95),
            ("TTFT chatcli/raw", "ttft", "none: lower is better", lambda r: True),
            ("wall chatcli process/raw in-process load+run", "wall",
             "none: chatcli's includes Python start-up and imports", lambda r: True),
        ):
            ours_v = [getattr(r, attr) for r in ours]
            raw_v = [getattr(r, attr) for r in raw]
            ratio = common.median(ours_v) / common.median(raw_v)
            common.ratio_line(label, ratio, target, ok(ratio), common.paired_ratio(ours_v, raw_v))

        if args.stream:
            long_n = args.long_tokens
            if setup.n_ctx < long_n + 100:
                raise SystemExit(f"--ctx {setup.n_ctx} is too small for --long-tokens {long_n}")
            long_reps = min(reps, 3)
            print(f"\n# {long_n} tokens: one loaded Llama for raw generate() and create_completion(stream=True); "
                  f"{long_reps} reps\n")
            llm = setup.llama()
            tokens = llm.tokenize(setup.prompt.encode("utf-8"), add_bos=True, special=True)

            def in_process(fn) -> Run:  # noqa: ANN001
                started = time.perf_counter()
                ttft, tps, count, tail = fn(llm, tokens, long_n)
                return Run(tps, ttft, time.perf_counter() - started, count, len(tokens), tail)

            long_contention = common.Contention()
            try:
                long = common.interleaved({
                    "raw generate()": lambda: in_process(raw_decode),
                    "create_completion(stream)": lambda: in_process(run_stream),
                    "chatcli complete": lambda: run_chatcli(setup, long_n, env),
                }, long_reps, long_contention)
            finally:
                llm.close()
            summarise(long, long_contention)
            print()
            base = [r.decode_tps for r in long["raw generate()"]]
            stream = [r.decode_tps for r in long["create_completion(stream)"]]
            ours_long = [r.decode_tps for r in long["chatcli complete"]]
            ratio = common.median(stream) / common.median(base)
            common.ratio_line(f"decode tok/s create_completion(stream)/raw at {long_n}", ratio,
                              "none: shows why chatcli streams from generate()", True,
                              common.paired_ratio(stream, base))
            base_tail = [r.tail_tps or 0.0 for r in long["raw generate()"]]
            stream_tail = [r.tail_tps or 0.0 for r in long["create_completion(stream)"]]
            ratio = common.median(stream_tail) / common.median(base_tail)
            common.ratio_line(f"last-quarter tok/s create_completion(stream)/raw at {long_n}", ratio,
                              "none: the gap grows with the length (quadratic)", True,
                              common.paired_ratio(stream_tail, base_tail))
            ratio = common.median(ours_long) / common.median(base)
            common.ratio_line(f"decode tok/s chatcli/raw at {long_n}", ratio, ">= 0.95", ratio >= 0.95,
                              common.paired_ratio(ours_long, base))


if __name__ == "__main__":
    main()
