"""Write the tiny random-weight GGUF models the tests use, one per family, to try chatcli without a download.

    python3 scripts/tiny_models.py /tmp/tiny
    chatcli complete -m /tmp/tiny/gpt2.gguf -n 50 "The quick brown fox"

Their weights are random (the text is gibberish) but they are real models: llama.cpp loads and runs them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from ggufgen import CHATML_TEMPLATE, make_gpt2, make_llama  # noqa: E402
from ggufgen_bert import make_bert  # noqa: E402
from ggufgen_families import make_mamba, make_rwkv, make_t5  # noqa: E402

MODELS = {
    "gpt2": lambda path: make_gpt2(path),
    "llama": lambda path: make_llama(path, n_ctx=2048, chat_template=CHATML_TEMPLATE),
    "bert": lambda path: make_bert(path),
    "t5": lambda path: make_t5(path),
    "mamba": lambda path: make_mamba(path, n_ctx=2048),
    "rwkv6": lambda path: make_rwkv(path, n_ctx=2048),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--only", choices=sorted(MODELS), action="append", help="just these (repeatable)")
    args = parser.parse_args()
    args.folder.mkdir(parents=True, exist_ok=True)
    for name in args.only or MODELS:
        path = MODELS[name](args.folder / f"{name}.gguf")
        print(path)


if __name__ == "__main__":
    main()
