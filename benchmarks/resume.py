"""Time to first token of `chatcli chat --continue`: with conversation snapshots vs without, by history length.

For each target length (tokens of stored conversation), a conversation is written into two chatcli homes
(the same history in both); one `chat --continue` turn in the snapshot home warms its snapshot. Then
`chat --continue` is run as a user would (a subprocess, one piped message, greedy, a few reply tokens),
alternating the home with snapshots on and the one with CHATCLI_SNAPSHOTS=0, and the time from start to the
first byte of the reply on stdout is taken. Targets: ratio <= 0.15 at ~1,500 tokens, and flat from 200 to 1,500.

    python3 benchmarks/resume.py [--quick] [--model PATH] [--lengths 200,500,1000,1500]
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    Contention,
    chatcli_command,
    clean_env,
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
)

PARAGRAPH = ("The river ran past the old mill, where the miller's daughter kept a ledger of every sack of grain "
             "that came through the door. ")


def seed_history(home: Path, model: Path, target_tokens: int) -> int:
    """Write a conversation of about target_tokens (as the model's template renders it) into home's history."""
    env = {**os.environ, "CHATCLI_HOME": str(home)}
    code = f"""
import sys
from pathlib import Path
from chatcli.engine import LlamaEngine
from chatcli.chat_templates import choose_format
from chatcli.history import History
engine = LlamaEngine(Path({str(model)!r}), n_ctx=4096)
info = engine.info
fmt, _ = choose_format(requested="auto", gguf_template=info.chat_template, architecture=info.architecture,
                       bos_token=info.bos_token or "", eos_token=info.eos_token or "", eot_token=info.eot_token or "")
messages = []
i = 0
while True:
    text = fmt.render(messages, add_generation_prompt=True)
    if len(engine.tokenize(text, add_bos=False)) >= {target_tokens}:
        break
    messages.append({{"role": "user", "content": f"Tell me part {{i}} of the story."}})
    messages.append({{"role": "assistant", "content": {PARAGRAPH!r} * 2}})
    i += 1
with History() as store:
    conversation = store.new_conversation(model={str(model)!r}, settings={{"temperature": 0.0, "max_tokens": 4}})
    for m in messages:
        finish = "stop" if m["role"] == "assistant" else None
        store.add_turn(conversation.id, m["role"], m["content"], finish_reason=finish)
print(len(engine.tokenize(fmt.render(messages, add_generation_prompt=True), add_bos=False)))
"""
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def first_byte_seconds(env: dict[str, str], message: str) -> float:
    """Start `chat --continue`, send one message, return the seconds until the reply's first byte."""
    started = time.perf_counter()
    proc = subprocess.Popen([*chatcli_command(), "chat", "--continue"], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(message.encode() + b"\n")
    proc.stdin.close()
    first = proc.stdout.read(1)
    took = time.perf_counter() - started
    proc.stdout.read()
    err = proc.stderr.read() if proc.stderr else b""
    if proc.wait() != 0 or not first:
        raise SystemExit(f"chat --continue failed: {err.decode(errors='replace')[-1000:]}")
    return took


def main() -> None:
    args_parser = parser(__doc__.split("\n")[0], reps=5, quick_reps=2)
    args_parser.add_argument("--model", type=Path, default=None)
    args_parser.add_argument("--lengths", default="200,500,1000,1500")
    args = args_parser.parse_args()
    reps = repetitions(args)
    model = args.model or default_model()
    lengths = [int(x) for x in args.lengths.split(",")]
    note_machine()
    contention = Contention()
    rows = []
    on_medians: dict[int, float] = {}
    ratios: dict[int, tuple[float, float]] = {}
    with scratch("resume") as root:
        for target in lengths:
            on_home, off_home = root / f"on-{target}", root / f"off-{target}"
            on_env = clean_env(on_home)
            off_env = clean_env(off_home, CHATCLI_SNAPSHOTS="0")
            tokens = seed_history(Path(on_env["CHATCLI_HOME"]), model, target)
            shutil.copytree(on_home, off_home)
            first_byte_seconds(on_env, "Go on.")  # warms the snapshot (and the page cache), not timed
            first_byte_seconds(off_env, "Go on.")
            results = interleaved({
                "snapshots": lambda env=on_env: first_byte_seconds(env, "And then?"),
                "no snapshots": lambda env=off_env: first_byte_seconds(env, "And then?"),
            }, reps, contention)
            on, off = results["snapshots"], results["no snapshots"]
            on_medians[target] = median(on)
            ratios[target] = (median(on) / median(off), paired_ratio(on, off))
            rows.append([tokens, median(on), median(off), ratios[target][0]])
    print_table(["history tokens", "TTFT snapshots (s)", "TTFT no snapshots (s)", "ratio"], rows)
    print()
    longest = max(lengths)
    ratio_line(f"chat --continue TTFT at ~{longest} tokens, snapshots/none", ratios[longest][0], "<= 0.15",
               ratios[longest][0] <= 0.15, ratios[longest][1])
    flat = on_medians[longest] / on_medians[min(lengths)]
    ratio_line(f"snapshot TTFT at {longest} vs {min(lengths)} tokens (flatness)", flat, "<= 1.5", flat <= 1.5)
    contention.warn()


if __name__ == "__main__":
    main()
