"""scripts/fuzz_gguf.py: its GGUF rewriting is exact, its verdicts are right, and a bounded run finds nothing bad."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import ggufgen  # tests/ is on sys.path (conftest.py)
import pytest

from chatcli.errors import GGUFError
from chatcli.gguf_info import read_gguf

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "fuzz_gguf.py"


@pytest.fixture(scope="module")
def fuzz():  # noqa: ANN201
    spec = importlib.util.spec_from_file_location("fuzz_gguf", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["fuzz_gguf"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_parse_and_serialize_round_trip(fuzz, tiny_llama: Path, tiny_gpt2: Path) -> None:  # noqa: ANN001
    for path in (tiny_llama, tiny_gpt2):
        data = path.read_bytes()
        assert fuzz.serialize(fuzz.parse(data)) == data


@pytest.mark.parametrize(
    ("rc", "stderr", "outcome"),
    [
        (0, "", "ok"),
        (1, "error: x.gguf: llama.block_count is 0: ...\n", "refused"),
        (2, "error: invalid value\n", "refused"),
        (1, "error: llama.cpp aborted while loading x.gguf: llama-model.cpp:1: GGML_ASSERT(x) failed\n",
         "abort caught"),
        (-6, "", "crash"),
        (134, "", "crash"),
        (139, "whatever\n", "crash"),
        (None, "", "hang"),
        (1, "Traceback (most recent call last):\n  File ...\nValueError: x\n", "traceback"),
        (1, "", "silent exit"),
        (1, "error: internal error: ValueError: x (run with --debug for the traceback)\n", "bad refusal"),
        (1, "warning: something\nerror: x\n", "bad refusal"),
        (1, "x.gguf is bad\n", "bad refusal"),
        (4, "error: x\n", "bad refusal"),
    ],
)
def test_classify(fuzz, rc: int | None, stderr: str, outcome: str) -> None:  # noqa: ANN001
    assert fuzz.classify(rc, stderr) == outcome


def test_every_mutation_class_makes_files_and_the_reader_copes(fuzz, tmp_path: Path) -> None:  # noqa: ANN001
    """All classes run, mutants differ from their base, and reading them raises nothing but GGUFError."""
    bases = {"llama": ggufgen.make_llama(tmp_path / "l.gguf").read_bytes(),
             "gpt2": ggufgen.make_gpt2(tmp_path / "g.gguf").read_bytes()}
    seen = set()
    for i in range(3 * len(fuzz.CLASSES)):
        case = fuzz.make_case(i, 3, bases, tmp_path)
        seen.add(case.cls)
        assert case.path.read_bytes() != bases[case.base] or "->" in case.what
        try:
            read_gguf(case.path)
        except GGUFError:
            pass
    assert seen == set(fuzz.CLASSES)


def test_mutations_are_deterministic_per_index(fuzz, tmp_path: Path) -> None:  # noqa: ANN001
    bases = {"llama": ggufgen.make_llama(tmp_path / "l.gguf").read_bytes()}
    a = tmp_path / "a"
    b = tmp_path / "b"
    a.mkdir()
    b.mkdir()
    for i in range(20):
        assert fuzz.make_case(i, 9, bases, a).path.read_bytes() == fuzz.make_case(i, 9, bases, b).path.read_bytes()


def test_bounded_fuzz_run_finds_no_bad_outcome(tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp")
    out = tmp_path / "fuzz"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--count", "30", "--seed", "7", "--jobs", "2", "--timeout", "60",
         "--seconds", "100", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    summary = result.stdout
    assert result.returncode == 0, summary + result.stderr[-3000:]
    assert "fuzz_gguf: " in summary and "<- bad" not in summary
    assert (out / "report.json").is_file()
    # The run exercised both verdicts that matter: files that load and files that are refused.
    rows = {line.split()[0]: line.split()[1:] for line in summary.splitlines() if line.startswith(("ok ", "refused "))}
    assert int(rows["ok"][1]) > 0 and int(rows["refused"][1]) > 0
