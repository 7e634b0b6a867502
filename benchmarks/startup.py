"""Start-up time of `chatcli --help`, `chatcli list` and `chatcli show MODEL` against `python3 -c "import click"`.

Each command runs as a fresh process, the variants interleaved (order reversed every round), medians
reported. The HF cache holds one real model (SmolLM2, pulled from an in-process fake Hub first) so that
`list` and `show` read a real GGUF header. Target: `chatcli --help` <= 2 x the `import click` baseline;
DESIGN.md also asks for `--help` and `list` well under 0.3 s.

    python3 benchmarks/startup.py [--quick] [--model PATH]
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

REPO = "bench/SmolLM2-GGUF"
HEAVY = {"llama_cpp", "huggingface_hub", "rich", "jinja2", "numpy", "prompt_toolkit"}


def main() -> None:
    p = common.parser(__doc__.splitlines()[0], reps=20, quick_reps=8)
    p.add_argument("--model", type=Path, help="GGUF file to list/show (default: SmolLM2 from the tests)")
    args = p.parse_args()
    reps = common.repetitions(args)
    model = (args.model or common.default_model()).resolve()
    ref = f"{REPO}/{model.name}"
    chatcli = common.chatcli_command()
    common.note_machine()
    print(f"chatcli = {' '.join(chatcli)}; python = {sys.executable}; {reps} runs each\n")

    FakeHub = common.load_fakehub()
    with common.scratch("startup") as home, FakeHub() as hub:
        hub.add_file(REPO, model.name, model)
        env = common.clean_env(home, HF_ENDPOINT=hub.url)
        common.run_timed([*chatcli, "pull", ref], env)
        env = common.clean_env(home)  # the runs below must not need the Hub

        def timed(cmd: list[str]):  # noqa: ANN202
            return lambda: common.run_timed(cmd, env)[0]

        variants = {
            'python -c "import click"': timed([sys.executable, "-c", "import click"]),
            "chatcli --help": timed([*chatcli, "--help"]),
            "chatcli list": timed([*chatcli, "list"]),
            "chatcli show": timed([*chatcli, "show", ref]),
            'python -c "pass"': timed([sys.executable, "-c", "pass"]),
        }
        common.interleaved(variants, 1)  # warm-up: page cache, .pyc files
        contention = common.Contention()
        results = common.interleaved(variants, reps, contention)
        imported = subprocess.run([sys.executable, "-X", "importtime", "-m", "chatcli", "--help"], env=env,
                                  capture_output=True, text=True, check=True).stderr
    names = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in imported.splitlines() if "|" in line}
    heavy = sorted(names & HEAVY)

    base_name = 'python -c "import click"'
    base = results[base_name]
    common.print_table(
        ["command", "runs", "median ms", "range s", "x import click", "others %"],
        [[name, len(v), 1000 * common.median(v), common.spread(v), common.median(v) / common.median(base),
          contention.median_percent(name)] for name, v in results.items()],
    )
    contention.warn()
    print(f"\nheavy modules imported by `chatcli --help`: {', '.join(heavy) or 'none'}\n")
    for name, target, limit in (("chatcli --help", "<= 2.0", 2.0), ("chatcli list", "none", None),
                                ("chatcli show", "none", None)):
        values = results[name]
        ratio = common.median(values) / common.median(base)
        common.ratio_line(f"{name}/import click", ratio, target, limit is None or ratio <= limit,
                          common.paired_ratio(values, base))
    for name in ("chatcli --help", "chatcli list"):
        seconds = common.median(results[name])
        print(f"TIME {name}: {seconds:.3f} s (target < 0.3 s) {'ok' if seconds < 0.3 else 'MISSED'}")


if __name__ == "__main__":
    main()
