"""Download speed of `chatcli pull` against plain `hf_hub_download`, from the same in-process fake Hub.

One ~100 MB file (SmolLM2 Q4_1 by default) served over loopback HTTP; each run is a fresh process with a
fresh HF_HOME and the same environment (HF_ENDPOINT = the fake Hub, telemetry, xet and progress bars off);
runs alternate. Throughput = file size / process wall time (start-up included on both sides). chatcli also
computes the sha256 of every byte as it downloads; hf_hub_download checks only the size.
Target: chatcli throughput >= 0.9 x hf_hub_download.

    python3 benchmarks/pull.py [--quick] [--model PATH]
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

REPO = "bench/SmolLM2-GGUF"


def main() -> None:
    p = common.parser(__doc__.splitlines()[0], reps=5, quick_reps=3)
    p.add_argument("--model", type=Path, help="file to serve (default: SmolLM2 from the tests, ~98 MB)")
    args = p.parse_args()
    reps = common.repetitions(args)
    model = (args.model or common.default_model()).resolve()
    size = model.stat().st_size
    common.note_machine()
    print(f"file {model.name}, {size / 1e6:.1f} MB, {reps} runs each\n")

    FakeHub = common.load_fakehub()
    with FakeHub() as hub, common.scratch("pull") as scratch:
        sha256 = hub.add_file(REPO, model.name, model)
        commands = {
            "hf_hub_download": [sys.executable, "-c",
                                "from huggingface_hub import hf_hub_download; "
                                f"print(hf_hub_download({REPO!r}, {model.name!r}))"],
            "chatcli pull": [*common.chatcli_command(), "pull", f"{REPO}/{model.name}"],
        }
        counter = iter(range(1_000_000))

        def timed(name: str):  # noqa: ANN202
            def run() -> float:
                home = scratch / f"run{next(counter)}"
                env = common.clean_env(home, HF_ENDPOINT=hub.url, HF_HUB_DISABLE_PROGRESS_BARS="1")
                hub.reset_stats()
                seconds, _proc = common.run_timed(commands[name], env)
                sent = hub.body_bytes_sent
                blob = home / "hf" / "hub" / ("models--" + REPO.replace("/", "--")) / "blobs" / sha256
                if sent != size or not blob.is_file() or blob.stat().st_size != size:
                    raise SystemExit(f"{name}: sent {sent} bytes, blob {blob} missing or of the wrong size")
                shutil.rmtree(home)
                return seconds
            return run

        variants = {name: timed(name) for name in commands}
        common.interleaved(variants, 1)  # warm-up: page cache of the served file, .pyc files
        contention = common.Contention()
        results = common.interleaved(variants, reps, contention)

    base = results["hf_hub_download"]
    common.print_table(
        ["client", "runs", "median s", "range s", "MB/s (median)", "others %"],
        [[name, len(v), common.median(v), common.spread(v), size / 1e6 / common.median(v),
          contention.median_percent(name)] for name, v in results.items()],
    )
    contention.warn()
    print()
    ours = results["chatcli pull"]
    ratio = common.median(base) / common.median(ours)  # throughput ratio = inverse time ratio
    paired = common.paired_ratio(base, ours)
    common.ratio_line("throughput chatcli/hf_hub_download", ratio, ">= 0.9 (chatcli also checks sha256)",
                      ratio >= 0.9, paired)


if __name__ == "__main__":
    main()
