"""Embeddings: batched against one text per llama_decode, and `similar` run again over the same lines.

The model is a random-weight BERT made here (tests/ggufgen_bert.py) with the shape of all-MiniLM-L6-v2, the
catalogue's default embedding model (384 wide, 6 layers, 12 heads, 1,536 feed-forward: compute matters); the
texts are 1,000 lines of 6-20 words from its vocabulary.

- throughput, in this process: `Embedder.embed(lines)` (many sequences per llama_decode) against
  `Embedder.embed([line])` for each line; lines/s of each, interleaved. Target: batched / one >= 3.
- `similar` rerun: `chatcli similar -m MODEL QUERY -f lines.txt` as a user runs it (a fresh process each
  time), first with an empty cache (a fresh CHATCLI_HOME each round), then again over the same lines.
  Wall seconds; target: first / rerun >= 10.

    python3 benchmarks/embed.py [--quick] [--reps N] [--lines 1000] [--embd 384] [--layers 6] [--threads N]
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import (  # noqa: E402
    TESTS,
    Contention,
    chatcli_command,
    clean_env,
    interleaved,
    median,
    note_machine,
    paired_ratio,
    parser,
    print_table,
    ratio_line,
    repetitions,
    run_timed,
    scratch,
    spread,
)

QUERY = "the cat is playing in the house"


def make_lines(n: int, seed: int = 0) -> list[str]:
    sys.path.insert(0, str(TESTS))
    from ggufgen_bert import WORDS

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 20))) for _ in range(n)]


def throughput(model: Path, lines: list[str], reps: int, threads: int | None,
               contention: Contention) -> tuple[dict[str, list[float]], float]:
    from chatcli.embedding import Embedder

    embedder = Embedder(model, threads=threads)
    embedder.embed(lines[:8])  # load, and one warm-up decode

    def batched() -> float:
        started = time.perf_counter()
        embedder.embed(lines)
        return len(lines) / (time.perf_counter() - started)

    def one_by_one() -> float:
        started = time.perf_counter()
        for line in lines:
            embedder.embed([line])
        return len(lines) / (time.perf_counter() - started)

    batched(), one_by_one()  # an uncounted warm-up round
    results = interleaved({"batched": batched, "one per call": one_by_one}, reps, contention)
    tokens = sum(len(embedder.tokenize(line)) for line in lines)
    embedder.close()
    return results, tokens / len(lines)


def similar_rerun(model: Path, lines_file: Path, root: Path, reps: int, threads: int | None,
                  contention: Contention) -> dict[str, list[float]]:
    command = [*chatcli_command(), "similar", "-m", str(model), QUERY, "-f", str(lines_file), "-k", "5"]
    if threads:
        command += ["--threads", str(threads)]
    results: dict[str, list[float]] = {"first run": [], "rerun": []}
    for i in range(reps + 1):  # round 0 is a warm-up (page cache, compiled modules)
        env = clean_env(root / f"round-{i}")
        first, out1 = contention.measure("first run", lambda env=env: run_timed(command, env))
        again, out2 = contention.measure("rerun", lambda env=env: run_timed(command, env))
        if out1.stdout != out2.stdout:
            raise SystemExit("the rerun ranked the lines differently from the first run")
        if i:
            results["first run"].append(first)
            results["rerun"].append(again)
    return results


def main() -> None:
    p = parser(__doc__.split("\n", 1)[0], reps=5, quick_reps=3)
    p.add_argument("--lines", type=int, default=1000, help="lines to embed and rank")
    p.add_argument("--embd", type=int, default=384, help="the model's width (a multiple of 64)")
    p.add_argument("--layers", type=int, default=6, help="the model's layers")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: chatcli's, physical cores)")
    args = p.parse_args()
    reps = repetitions(args)
    note_machine()
    sys.path.insert(0, str(TESTS))
    from ggufgen_bert import make_bert

    with scratch("embed") as root:
        model = make_bert(root / "bert.gguf", n_embd=args.embd, n_layer=args.layers, n_head=max(1, args.embd // 32),
                          n_ctx=512)
        lines = make_lines(args.lines)
        lines_file = root / "lines.txt"
        lines_file.write_text("\n".join(lines) + "\n")
        contention = Contention()

        speed, tokens_per_line = throughput(model, lines, reps, args.threads, contention)
        print(f"## embed throughput: {len(lines)} lines (~{tokens_per_line:.0f} tokens each), "
              f"BERT {args.embd} wide x {args.layers} layers, {model.stat().st_size / 1e6:.1f} MB\n")
        print_table(["variant", "lines/s (median)", "range", "others' CPU %"],
                    [[name, median(v), spread(v), contention.median_percent(name)] for name, v in speed.items()])
        print()
        ratio_line("batched / one per call (lines/s)", median(speed["batched"]) / median(speed["one per call"]),
                   ">= 3", median(speed["batched"]) >= 3 * median(speed["one per call"]),
                   paired_ratio(speed["batched"], speed["one per call"]))

        times = similar_rerun(model, lines_file, root, reps, args.threads, contention)
        print(f"\n## `chatcli similar` over the same {len(lines)} lines: first run (empty cache) vs rerun\n")
        print_table(["variant", "wall s (median)", "range", "others' CPU %"],
                    [[name, median(v), spread(v), contention.median_percent(name)] for name, v in times.items()])
        print()
        ratio_line("similar first run / rerun (wall)", median(times["first run"]) / median(times["rerun"]),
                   ">= 10", median(times["first run"]) >= 10 * median(times["rerun"]),
                   paired_ratio(times["first run"], times["rerun"]))
        contention.warn()


if __name__ == "__main__":
    main()
