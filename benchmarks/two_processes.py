"""Two chatcli processes generating at once: does each keep a fair share of its solo speed?

Variants, interleaved, on the real SmolLM2 (or --model):
- solo: one `chatcli complete` alone (threads automatic: the engine shares cores with other chatcli engines);
- solo-fixed: the same with `--threads` set to the core count (the old behaviour: no sharing);
- pair: two `complete` processes started together; each one's decode tok/s;
- pair-fixed: the same with threads fixed at the core count in both (the collapse this fixes).

Targets (issue 10): pair >= 0.35 x solo tok/s each; solo >= 0.95 x solo-fixed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

PROMPT = "Once upon a time, in a lighthouse by the sea, there lived"


def _command(model: Path, n_tokens: int, threads: int | None) -> list[str]:
    cmd = [*common.chatcli_command(), "complete", "-m", str(model), "-n", str(n_tokens), "--temperature", "0",
           "-c", "1024", "--json", PROMPT]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    return cmd


def _tps(stdout: str) -> float:
    timings = json.loads(stdout)["timings"]
    return float(timings["decode_tokens_per_second"] or 0.0)


def solo(model: Path, env: dict[str, str], n_tokens: int, threads: int | None) -> float:
    _, proc = common.run_timed(_command(model, n_tokens, threads), env)
    return _tps(proc.stdout)


def pair(model: Path, env: dict[str, str], n_tokens: int, threads: int | None) -> float:
    """The slower of two processes started together (both must keep a fair share)."""
    procs = [subprocess.Popen(_command(model, n_tokens, threads), env=env, text=True, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    speeds = []
    for proc in procs:
        out, err = proc.communicate(timeout=900)
        if proc.returncode != 0:
            raise SystemExit(f"complete failed ({proc.returncode}): {err[-2000:]}")
        speeds.append(_tps(out))
    return min(speeds)


def main() -> None:
    p = common.parser(__doc__.splitlines()[0], reps=5, quick_reps=3)
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("-n", "--tokens", type=int, default=128)
    p.add_argument("--skip-fixed-pair", action="store_true",
                   help="skip the fixed-threads pair (it can take minutes when it collapses)")
    args = p.parse_args()
    model = args.model or common.default_model()
    sys.path.insert(0, str(common.ROOT))
    from chatcli.engine import physical_cores

    cores = physical_cores()
    common.note_machine()
    contention = common.Contention()
    with common.scratch("concurrent") as home:
        env = common.clean_env(home)
        variants = {
            "solo": lambda: solo(model, env, args.tokens, None),
            "solo-fixed": lambda: solo(model, env, args.tokens, cores),
            "pair": lambda: pair(model, env, args.tokens, None),
        }
        if not args.skip_fixed_pair:
            variants["pair-fixed"] = lambda: pair(model, env, args.tokens, cores)
        results = common.interleaved(variants, common.repetitions(args), contention)
    rows = [(name, common.median(values), common.spread(values)) for name, values in results.items()]
    common.print_table(["variant", "decode tok/s (median; pair: the slower one)", "min..max"], rows)
    print()
    solo_tps = common.median(results["solo"])
    pair_ratio = common.median(results["pair"]) / solo_tps
    common.ratio_line("pair / solo (each of two at once)", pair_ratio, ">= 0.35", pair_ratio >= 0.35,
                      common.paired_ratio(results["pair"], results["solo"]))
    solo_ratio = solo_tps / common.median(results["solo-fixed"])
    common.ratio_line("solo / solo with fixed threads", solo_ratio, ">= 0.95", solo_ratio >= 0.95,
                      common.paired_ratio(results["solo"], results["solo-fixed"]))
    if "pair-fixed" in results:
        fixed = common.median(results["pair-fixed"]) / common.median(results["solo-fixed"])
        print(f"(before: two at once with fixed threads, each {fixed:.2f} x solo)")
    contention.warn()


if __name__ == "__main__":
    main()
