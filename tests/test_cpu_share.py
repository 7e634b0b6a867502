"""chatcli engines that generate at the same time split the cores instead of spinning against each other."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from chatcli.cpu_share import CoreShare, share_of


def test_share_is_an_even_split_of_at_least_one() -> None:
    assert [share_of(2, n) for n in (1, 2, 3)] == [2, 1, 1]
    assert [share_of(8, n) for n in (1, 2, 3, 4)] == [8, 4, 2, 2]


def test_engines_see_each_other_only_while_generating(tmp_path: Path) -> None:
    folder = tmp_path / "generating"
    first, second = CoreShare(4, folder), CoreShare(4, folder)
    with first.generating():
        assert first.threads(force=True) == 4  # alone
        with second.generating():
            assert first.others() == 1 and second.others() == 1
            assert first.threads(force=True) == 2 and second.threads(force=True) == 2
        assert first.threads(force=True) == 4  # the other finished
    assert list(folder.iterdir()) == []  # nothing left behind


def test_a_dead_engines_file_is_not_counted_and_is_removed(tmp_path: Path) -> None:
    (tmp_path / "12345-dead.gen").write_text("")  # left by a process that was killed: nobody holds its lock
    share = CoreShare(2, tmp_path)
    with share.generating():
        assert share.others() == 0
    assert not (tmp_path / "12345-dead.gen").exists()


def test_another_process_holding_the_lock_counts(tmp_path: Path) -> None:
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from chatcli.cpu_share import CoreShare\n"
        "share = CoreShare(2, Path(sys.argv[1]))\n"
        "with share.generating():\n"
        "    print('in', flush=True)\n"
        "    sys.stdin.readline()\n"
    )
    with subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True) as child:
        assert child.stdout is not None and child.stdout.readline() == "in\n"
        share = CoreShare(2, tmp_path)
        with share.generating():
            assert share.threads(force=True) == 1
        child.kill()  # dies holding its lock: the kernel drops it
        child.wait(10)
        with share.generating():
            assert share.threads(force=True) == 2


@pytest.mark.skipif(sys.platform == "win32", reason="advisory locks: POSIX only")
def test_two_real_generations_at_once_each_run_on_their_share(tiny_llama: Path, home: Path) -> None:
    """Two engines in two processes with different chatcli homes, generating at the same time: each sees the
    other (the cores are the machine's) and drops to 1 thread of 2."""
    code = (
        "import json, sys, time\n"
        "from chatcli.engine import LlamaEngine, SamplingOptions\n"
        "engine = LlamaEngine(sys.argv[1], n_ctx=256, flash_attn=True)\n"
        "engine._share.cores = 2\n"
        "seen = []\n"
        "use = engine._use_threads\n"
        "engine._use_threads = lambda n: (seen.append(n), use(n))\n"
        "print('ready', flush=True)\n"
        "sys.stdin.readline()\n"
        "start = time.monotonic()\n"
        "while time.monotonic() - start < 60 and (1 not in seen or time.monotonic() - start < 1.5):\n"
        "    for _ in engine.generate(engine.tokenize('hello'), SamplingOptions(max_tokens=200, temperature=0)):\n"
        "        pass\n"
        "print(json.dumps(sorted(set(seen))), flush=True)\n"
    )
    runtime = home / "runtime"
    runtime.mkdir(mode=0o700, parents=True)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime)}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tiny_llama)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    try:
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        seen = [json.loads(proc.communicate(timeout=120)[0].strip().splitlines()[-1]) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
            proc.communicate()
    # both started alone or together, and both ran on one thread while the other was generating
    assert all(1 in threads for threads in seen), seen
    assert list(runtime.glob("chatcli/generating/*")) == []
