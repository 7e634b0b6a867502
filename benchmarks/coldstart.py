"""Cold `chatcli complete -n 1` against a bare llama-cpp-python script doing the same, each a fresh process.

Both sides load the same model with the same settings (n_ctx, n_batch/n_ubatch, threads, flash attention, no GPU
layers), tokenise the same prompt, greedily generate one token and write it to stdout. Measured from the spawn:
time to first token (the first byte on stdout) and wall time (until the process has exited). Also shown, as the
floor both sides share: `python -c "import llama_cpp"` and `python -c "pass"`. Target (DESIGN.md): chatcli's
time to first token <= 1.15 x the bare script's.

After the timings, `-X importtime` of one chatcli run lists the modules chatcli loads on top of what the bare
script loads, by cumulative import time.

    python3 benchmarks/coldstart.py [--quick] [--model PATH] [--threads N] [--ctx N] [--no-flash-attn]
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

PROMPT = "The capital of France is"

BARE = """\
import sys
from llama_cpp import Llama

path, n_ctx, threads, flash_attn, prompt = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1", \\
    sys.argv[5]
llm = Llama(model_path=path, n_ctx=n_ctx, n_batch=min(512, n_ctx), n_ubatch=min(512, n_ctx), n_threads=threads,
            n_threads_batch=threads, n_gpu_layers=0, use_mmap=True, flash_attn=flash_attn, verbose=False)
tokens = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
for token in llm.generate(tokens, temp=0.0, top_k=1):
    sys.stdout.write(llm.detokenize([token]).decode("utf-8", errors="replace"))
    sys.stdout.flush()
    break
"""


def first_byte_and_exit(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Seconds from spawn to the first byte on stdout, and to the exit (fails loudly on a non-zero exit)."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    first = os.read(proc.stdout.fileno(), 1)
    ttft = time.perf_counter() - started
    _rest, err = proc.communicate(timeout=600)
    wall = time.perf_counter() - started
    if proc.returncode != 0 or not first:
        raise SystemExit(f"benchmark command failed ({proc.returncode}): {' '.join(cmd)}\n{err.decode()[-2000:]}")
    return ttft, wall


def import_tree(stderr: str) -> list[tuple[int, int, str]]:
    """(cumulative µs, depth, module) from `-X importtime` output."""
    rows = []
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line or "cumulative" in line:
            continue
        _self, cumulative, name = line[len("import time:"):].split("|")
        depth = (len(name) - len(name.lstrip(" "))) // 2
        rows.append((int(cumulative), depth, name.strip()))
    return rows


def main() -> None:
    p = common.parser(__doc__.splitlines()[0], reps=15, quick_reps=6)
    p.add_argument("--model", type=Path, help="GGUF file (default: SmolLM2 from the tests)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads, both sides (default: physical cores)")
    p.add_argument("--ctx", type=int, default=2048, help="context window, both sides")
    p.add_argument("--no-flash-attn", action="store_true", help="flash attention off on both sides")
    args = p.parse_args()
    reps = common.repetitions(args)
    model = (args.model or common.default_model()).resolve()
    if args.threads is None:
        from chatcli.engine import physical_cores

        args.threads = physical_cores()
    flash = not args.no_flash_attn
    chatcli = common.chatcli_command()
    common.note_machine()
    print(f"model {model.name}; threads {args.threads}; ctx {args.ctx}; flash attention {flash}; {reps} runs each")
    print(f"chatcli = {' '.join(chatcli)}; python = {sys.executable}\n")

    with common.scratch("coldstart") as home:
        bare = home / "bare.py"
        bare.write_text(BARE)
        env = common.clean_env(home)
        # as installed: Python keeps compiled modules (.pyc); without them chatcli's own modules would be compiled
        # from source on every run while llama_cpp's were compiled by pip at install time
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        chatcli_cmd = [*chatcli, "complete", "-m", str(model), "-n", "1", "--temperature", "0",
                       "--threads", str(args.threads), "--ctx-size", str(args.ctx), "--gpu-layers", "0",
                       "--flash-attn" if flash else "--no-flash-attn", PROMPT]
        bare_cmd = [sys.executable, str(bare), str(model), str(args.ctx), str(args.threads), "1" if flash else "0",
                    PROMPT]
        variants = {
            "chatcli complete -n 1": lambda: first_byte_and_exit(chatcli_cmd, env),
            "bare llama-cpp-python": lambda: first_byte_and_exit(bare_cmd, env),
            'python -c "import llama_cpp"': lambda: (float("nan"), common.run_timed(
                [sys.executable, "-c", "import llama_cpp"], env)[0]),
            'python -c "pass"': lambda: (float("nan"), common.run_timed([sys.executable, "-c", "pass"], env)[0]),
        }
        common.interleaved(variants, 1)  # warm-up: page cache, .pyc files
        contention = common.Contention()
        results = common.interleaved(variants, reps, contention)
        chatcli_imports = subprocess.run([sys.executable, "-X", "importtime", "-m", "chatcli",
                                          *chatcli_cmd[len(chatcli):]],
                                         env=env, capture_output=True, text=True, check=True).stderr
        bare_imports = subprocess.run([sys.executable, "-X", "importtime", *bare_cmd[1:]], env=env,
                                      capture_output=True, text=True, check=True).stderr

    ttft = {name: [r[0] for r in rows] for name, rows in results.items()}
    wall = {name: [r[1] for r in rows] for name, rows in results.items()}
    common.print_table(
        ["variant", "runs", "first token ms", "wall ms", "wall range s", "others %"],
        [[name, len(rows), None if name.startswith("python") else 1000 * common.median(ttft[name]),
          1000 * common.median(wall[name]), common.spread(wall[name]), contention.median_percent(name)]
         for name, rows in results.items()],
    )
    contention.warn()

    ours, theirs = "chatcli complete -n 1", "bare llama-cpp-python"
    floor = common.median(wall['python -c "import llama_cpp"'])
    python = common.median(wall['python -c "pass"'])
    bare_ttft = common.median(ttft[theirs])
    print(f"\nfloor: `python -c 'import llama_cpp'` takes {1000 * floor:.0f} ms of the bare script's "
          f"{1000 * bare_ttft:.0f} ms to its first token ({100 * floor / bare_ttft:.0f}%); "
          f"`python -c pass` {1000 * python:.0f} ms")
    extra = common.median(ttft[ours]) - common.median(ttft[theirs])
    print(f"chatcli adds {1000 * extra:.0f} ms to the first token\n")

    bare_modules = {name for _c, _d, name in import_tree(bare_imports)}
    added = [(c, name) for c, d, name in import_tree(chatcli_imports) if d == 0 and name not in bare_modules]
    print("top-level imports chatcli adds over the bare script (cumulative ms):")
    for cumulative, name in sorted(added, reverse=True)[:15]:
        print(f"  {cumulative / 1000:7.1f}  {name}")
    print()
    heavy = {"jinja2", "rich", "huggingface_hub", "prompt_toolkit", "sqlite3", "httpx", "httpx2"}
    loaded = {name.split(".")[0] for _c, _d, name in import_tree(chatcli_imports)}
    print(f"heavy modules in chatcli's run: {', '.join(sorted(loaded & heavy)) or 'none'} "
          f"(jinja2 comes with llama_cpp itself: {'jinja2' in bare_modules})\n")

    ratio = common.median(ttft[ours]) / common.median(ttft[theirs])
    common.ratio_line("cold complete first token/bare llama-cpp-python", ratio, "<= 1.15", ratio <= 1.15,
                      common.paired_ratio(ttft[ours], ttft[theirs]))
    wall_ratio = common.median(wall[ours]) / common.median(wall[theirs])
    common.ratio_line("cold complete wall/bare llama-cpp-python", wall_ratio, "none", True,
                      common.paired_ratio(wall[ours], wall[theirs]))


if __name__ == "__main__":
    main()
