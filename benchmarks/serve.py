"""`chatcli serve` against local `chatcli complete`, in one run: decode speed, and warm vs cold time to first token.

- decode tokens/s: a streamed /v1/completions through the official openai SDK (first to last chunk, counted
  with the usage chunk) against `chatcli complete --json` (its own decode timing). Same model, threads,
  greedy sampling and prompt. Target: serve >= 0.9 x complete (HTTP, JSON and SSE cost little per token).
- time to first token: the SDK's request to the first chunk on the warm server, against a cold `complete`
  process from its start to the first byte on stdout (what a user waits for). Target: warm <= 0.5 x cold.

Runs alternate (serve, complete, complete, serve, ...) and medians are compared.

    python3 benchmarks/serve.py [--quick] [--model PATH] [--tokens N] [--threads N]
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402

PROMPT = (
    "The history of the city begins with a small settlement on the bank of a wide river, where traders "
    "stopped to rest their animals and exchange grain, salt and cloth. Over the centuries"
)


class Server:
    def __init__(self, model: Path, threads: int, env: dict[str, str]) -> None:
        import openai  # before the server starts: a failed import must not leave it running

        cmd = [*common.chatcli_command(), "serve", "-m", str(model), "--port", "0", "--threads", str(threads)]
        self.proc = subprocess.Popen(cmd, env=env, text=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            match = re.search(r"at (http://\S+/v1)", line)
            if match:
                self.url = match.group(1)
                break
        else:
            self.proc.kill()
            raise SystemExit("the server did not start")
        self.client = openai.OpenAI(base_url=self.url, api_key="none", max_retries=0, timeout=600)
        self.model_id = model.name

    def stream(self, tokens: int) -> tuple[float, float, int]:
        """(seconds to the first chunk, decode tokens/s, completion tokens)."""
        started = time.perf_counter()
        stamps: list[float] = []
        count = 0
        for chunk in self.client.completions.create(model=self.model_id, prompt=PROMPT, max_tokens=tokens,
                                                    temperature=0, stream=True,
                                                    stream_options={"include_usage": True}):
            if chunk.choices and chunk.choices[0].text:
                stamps.append(time.perf_counter())
            if chunk.usage is not None:
                count = chunk.usage.completion_tokens
        first = stamps[0] - started
        # chunks may carry several tokens: time from the first token to the last, over the tokens after the first
        tps = (count - 1) / (stamps[-1] - stamps[0]) if count > 1 and stamps[-1] > stamps[0] else 0.0
        return first, tps, count

    def close(self) -> None:
        self.client.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stderr is not None:
            self.proc.stderr.close()


def complete_decode(model: Path, threads: int, tokens: int, env: dict[str, str]) -> tuple[float, int]:
    cmd = [*common.chatcli_command(), "complete", "-m", str(model), "--threads", str(threads), "--temperature", "0",
           "-n", str(tokens), "--json", PROMPT]
    _, proc = common.run_timed(cmd, env)
    data = json.loads(proc.stdout)
    return data["timings"]["decode_tokens_per_second"] or 0.0, data["completion_tokens"]


def cold_first_byte(model: Path, threads: int, env: dict[str, str]) -> float:
    """Seconds from starting `chatcli complete` to the first byte of its answer on stdout."""
    cmd = [*common.chatcli_command(), "complete", "-m", str(model), "--threads", str(threads), "--temperature", "0",
           "-n", "4", PROMPT]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    proc.stdout.read(1)
    first = time.perf_counter() - started
    proc.stdout.read()
    proc.stdout.close()
    if proc.wait() != 0:
        raise SystemExit("chatcli complete failed")
    return first


def main() -> None:
    p = common.parser(__doc__.splitlines()[0], reps=5, quick_reps=3)
    p.add_argument("--model", type=Path, default=None, help="GGUF file (default: the tests' SmolLM2-135M)")
    p.add_argument("--tokens", type=int, default=128, help="tokens to generate in the decode runs")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for both (default: physical cores)")
    args = p.parse_args()
    from chatcli.engine import physical_cores

    model = args.model or common.default_model()
    threads = args.threads or physical_cores()
    reps = common.repetitions(args)
    common.note_machine()
    contention = common.Contention()
    with common.scratch("serve") as home:
        env = common.clean_env(home)
        server = Server(model, threads, env)
        try:
            server.stream(8)  # the first request pays for the template and the first graph: not a warm number
            decode = common.interleaved({
                "serve": lambda: server.stream(args.tokens),
                "complete": lambda: complete_decode(model, threads, args.tokens, env),
            }, reps, contention)
            ttft = common.interleaved({
                "warm serve": lambda: server.stream(4)[0],
                "cold complete": lambda: cold_first_byte(model, threads, env),
            }, reps, contention)
        finally:
            server.close()
    serve_tps = [tps for _, tps, _ in decode["serve"]]
    local_tps = [tps for tps, _ in decode["complete"]]
    print(f"model {model.name}, {threads} threads, {args.tokens} tokens, {reps} repetitions\n")
    common.print_table(["measure", "median", "spread"], [
        ["serve decode tok/s (openai SDK, streamed)", common.median(serve_tps), common.spread(serve_tps)],
        ["complete decode tok/s", common.median(local_tps), common.spread(local_tps)],
        ["serve TTFT, warm (s)", common.median(ttft["warm serve"]), common.spread(ttft["warm serve"])],
        ["complete first byte, cold (s)", common.median(ttft["cold complete"]), common.spread(ttft["cold complete"])],
    ])
    print()
    decode_ratio = common.median(serve_tps) / common.median(local_tps)
    common.ratio_line("serve decode / complete decode", decode_ratio, ">= 0.9", decode_ratio >= 0.9,
                      common.paired_ratio(serve_tps, local_tps))
    ttft_ratio = common.median(ttft["warm serve"]) / common.median(ttft["cold complete"])
    common.ratio_line("warm serve TTFT / cold complete first byte", ttft_ratio, "<= 0.5", ttft_ratio <= 0.5,
                      common.paired_ratio(ttft["warm serve"], ttft["cold complete"]))
    contention.warn()


if __name__ == "__main__":
    main()
