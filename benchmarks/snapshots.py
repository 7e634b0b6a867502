"""Conversation snapshots in a chat: disk use after a 14-turn chat, and the time from a reply to the next prompt.

A 14-turn greedy chat (~1,500 tokens) on the real SmolLM2 runs in this process through ChatSession with a
real LlamaEngine and a real SQLite history, as `chatcli chat` drives it, three ways, interleaved:
- `snapshots`: as chatcli does now (one snapshot per conversation, written in the background);
- `no snapshots`: the baseline (CHATCLI_SNAPSHOTS=0);
- `old (sync)`: what chatcli did before, for reference: a prefix snapshot per turn, written before the prompt.
Per turn it takes the turn-to-prompt latency (from the reply's last chunk to the reply loop's end, when the
REPL shows its prompt) and the next reply's time to first token (which would wait for a state copy still
running). After each chat, with the writes finished, it weighs the snapshot folder against one state.
Targets: bytes on disk / one state <= 1.1; turn-to-prompt latency snapshots / none <= 1.05.

    python3 benchmarks/snapshots.py [--quick] [--reps N] [--model PATH] [--turns 14] [--reply-tokens 64]
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import (  # noqa: E402
    Contention,
    default_model,
    interleaved,
    median,
    note_machine,
    paired_ratio,
    parser,
    print_table,
    ratio_line,
    repetitions,
    scratch,
    spread,
)

QUESTION = ("Tell me part {i} of the story about the river, the old mill and the miller's daughter who kept a "
            "ledger of every sack of grain; keep it short.")


def folder_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.iterdir()) if root.is_dir() else 0


def one_chat(engine: Any, fmt: Any, root: Path, mode: str, turns: int, reply_tokens: int) -> dict[str, float]:
    """One chat of `turns` turns in a fresh history (and snapshot folder); its medians and disk use."""
    from chatcli.conversation import ChatSession
    from chatcli.history import History
    from chatcli.snapshots import SnapshotStore, model_identity

    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    store = SnapshotStore(root / "snapshots") if mode != "no snapshots" else None
    engine.reset()
    with History(root / "history.db") as history:
        session = ChatSession(engine=engine, fmt=fmt, model_label="smollm2", history=history,
                              system="You are a storyteller.", snapshots=store, model_id=model_identity(engine.path),
                              settings={"temperature": 0, "max_tokens": reply_tokens})
        if mode == "old (sync)":  # the code before: a snapshot per prefix, written before the next prompt
            def old_save() -> None:
                assert store is not None
                store.save_prefix(session.engine, session.tokens_for(session.messages), model_id=session.model_id)

            session._save_snapshot = old_save  # type: ignore[method-assign]
        to_prompt, first_token = [], []
        for i in range(turns):
            started = time.perf_counter()
            last = first = None
            for _chunk in session.send(QUESTION.format(i=i + 1)):
                last = time.perf_counter()
                first = first or last
            ready = time.perf_counter()
            if last is not None and first is not None:
                to_prompt.append(ready - last)
                first_token.append(first - started)
        tokens = len(session.tokens_for(session.messages))
    result = {"to_prompt_ms": 1000 * median(to_prompt), "ttft_ms": 1000 * median(first_token[1:]),
              "tokens": tokens}
    if store is not None:
        store.close()
        if store.last_error is not None:
            raise SystemExit(f"a snapshot failed: {store.last_error!r}")
        states = sorted((store.root).glob("*.state"), key=lambda p: p.stat().st_mtime_ns)
        newest = states[-1]
        one = newest.stat().st_size + newest.with_suffix(".json").stat().st_size
        result.update(files=len(states), disk_mb=folder_bytes(store.root) / 1e6, one_mb=one / 1e6,
                      disk_ratio=folder_bytes(store.root) / one)
    print(f"  {mode}: {result}", file=sys.stderr, flush=True)
    return result


def main() -> None:
    args_parser = parser(__doc__.split("\n")[0], reps=5, quick_reps=2)
    args_parser.add_argument("--model", type=Path, default=None)
    args_parser.add_argument("--turns", type=int, default=14)
    args_parser.add_argument("--reply-tokens", type=int, default=64)
    args_parser.add_argument("--ctx", type=int, default=4096)
    args_parser.add_argument("--threads", type=int, default=1,
                             help="llama.cpp threads (default 1: steady on a small shared machine; same for all)")
    args = args_parser.parse_args()
    reps = repetitions(args)
    model = args.model or default_model()

    from chatcli.chat_templates import choose_format
    from chatcli.engine import LlamaEngine

    note_machine()
    engines = {mode: LlamaEngine(model, n_ctx=args.ctx, n_threads=args.threads)
               for mode in ("snapshots", "no snapshots", "old (sync)")}
    info = engines["snapshots"].info
    fmt, _ = choose_format(requested="auto", gguf_template=info.chat_template, architecture=info.architecture,
                           bos_token=info.bos_token or "", eos_token=info.eos_token or "",
                           eot_token=info.eot_token or "")
    contention = Contention()
    with scratch("snapshots") as root:
        for mode, engine in engines.items():  # one uncounted round: page cache, lazy allocations
            one_chat(engine, fmt, root / "warm", mode, 2, args.reply_tokens)
        results = interleaved({
            mode: (lambda mode=mode, engine=engine: one_chat(engine, fmt, root / mode.split()[0], mode, args.turns,
                                                            args.reply_tokens))
            for mode, engine in engines.items()
        }, reps, contention)
    for engine in engines.values():
        engine.close()

    rows = []
    for mode, runs in results.items():
        col = lambda key, runs=runs: [r[key] for r in runs] if key in runs[0] else []  # noqa: E731
        rows.append([mode, median(col("tokens")), median(col("to_prompt_ms")), spread(col("to_prompt_ms")),
                     median(col("ttft_ms")), median(col("files")) if col("files") else None,
                     median(col("disk_mb")) if col("disk_mb") else None,
                     median(col("one_mb")) if col("one_mb") else None])
    print_table(["variant", "chat tokens", "reply->prompt ms", "range", "next TTFT ms", "state files",
                 "disk MB", "one state MB"], rows)
    print()
    on, off, old = results["snapshots"], results["no snapshots"], results["old (sync)"]
    disk = median([r["disk_ratio"] for r in on])
    ratio_line("snapshot bytes on disk after the chat / one state", disk, "<= 1.1", disk <= 1.1)
    latency = [r["to_prompt_ms"] for r in on], [r["to_prompt_ms"] for r in off]
    value = median(latency[0]) / median(latency[1])
    ratio_line("reply->prompt latency, snapshots/none", value, "<= 1.05", value <= 1.05,
               paired_ratio(*latency))
    ttft = [r["ttft_ms"] for r in on], [r["ttft_ms"] for r in off]
    print(f"info: next-reply TTFT snapshots/none {median(ttft[0]) / median(ttft[1]):.2f}; "
          f"old (sync) reply->prompt {median([r['to_prompt_ms'] for r in old]):.1f} ms, "
          f"old disk/one state {median([r['disk_ratio'] for r in old]):.2f}")
    contention.warn()


if __name__ == "__main__":
    main()
