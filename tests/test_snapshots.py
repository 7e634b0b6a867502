"""Conversation-state snapshots on real llama.cpp: restore equals a full prefill, damage falls back, LRU cap."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from chatcli import snapshots
from chatcli.engine import LlamaEngine, SamplingOptions
from chatcli.errors import ChatcliError, UsageError
from chatcli.snapshots import SnapshotStore, model_identity

GREEDY = SamplingOptions(max_tokens=12, temperature=0)
REPO = Path(__file__).resolve().parents[1]


def chatml(system: str, user: str) -> str:
    return f"<|im_start|>system\n{system}<|im_end|>\n{turn(user)[len('<|im_end|>'):]}"


def turn(user: str) -> str:
    """What a conversation grows by: the end of the assistant's reply, a user turn and the assistant's cue."""
    return f"<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


PROMPT = chatml("You are terse.", "hello world, tell me the thing in a word or two, then more about the world; "
                 "in the morning the river ran in a lamp of snow, and the world said hello to the thing")
GROWTH = turn("and then? hello again, the world in a minute")


@dataclass
class Run:
    text: str
    evaluated: list[int]  # sizes of the eval() batches: the first is the prompt part actually read
    logits: list[np.ndarray]  # the logits each sampled token came from


def greedy(engine: LlamaEngine, tokens: list[int], options: SamplingOptions = GREEDY) -> Run:
    """Generate greedily, recording (through llama-cpp-python's eval) what was evaluated and the logits."""
    import llama_cpp

    llm = engine._llm
    run = Run("", [], [])
    original = llm.eval

    def eval(batch):  # noqa: ANN001, ANN202
        run.evaluated.append(len(batch))
        original(batch)
        row = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
        run.logits.append(np.ctypeslib.as_array(row, shape=(llm.n_vocab(),)).copy())

    llm.eval = eval
    try:
        run.text = "".join(engine.generate(tokens, options))
    finally:
        del llm.eval
    return run


def assert_same_generation(got: Run, want: Run) -> None:
    """The same text from the same greedy choices (logits differ in their last bits between batch splits)."""
    assert got.text == want.text
    assert [int(row.argmax()) for row in got.logits] == [int(row.argmax()) for row in want.logits]


@pytest.fixture
def engines(tiny_llama: Path) -> Iterator[Callable[..., LlamaEngine]]:
    opened: list[LlamaEngine] = []

    def open_engine(path: Path = tiny_llama, **kwargs: object) -> LlamaEngine:
        opened.append(LlamaEngine(path, n_threads=1, **kwargs))  # type: ignore[arg-type]
        return opened[-1]

    yield open_engine
    for engine in opened:
        engine.close()


@pytest.fixture
def store(home: Path) -> SnapshotStore:
    return SnapshotStore()


def conversation(engine: LlamaEngine, text: str | list[int] = PROMPT) -> tuple[list[int], list[int]]:
    """Generate once on `text`; returns (the tokens now cached, those plus a further user turn)."""
    greedy(engine, engine.tokenize(text) if isinstance(text, str) else text)
    cached = engine.cached_tokens
    return cached, cached + engine.tokenize(GROWTH, add_bos=False)


def check_restore_equals_prefill(open_engine: Callable[..., LlamaEngine], store: SnapshotStore, model_id: str,
                                 grow: bool, prompt: str = PROMPT) -> tuple[Path, dict[str, object]]:
    a = open_engine()
    cached, grown = conversation(a, prompt)
    state = store.save(a, model_id=model_id)
    assert state is not None and state.is_file()
    tokens = grown if grow else cached
    b = open_engine()
    restored = store.restore(b, tokens, model_id=model_id)
    assert restored == len(cached) > 0
    got = greedy(b, tokens)
    want = greedy(open_engine(), tokens)
    assert want.evaluated[0] == len(tokens)
    # Only the new turn was read (the whole prompt is cached: one token is replayed for fresh logits).
    assert got.evaluated[0] == (len(tokens) - restored if grow else 1)
    assert_same_generation(got, want)
    if grow:
        # Bit for bit what the saving engine computes when the conversation goes on in it.
        live = greedy(a, tokens)
        assert live.evaluated == got.evaluated
        assert all(np.array_equal(x, y) for x, y in zip(live.logits, got.logits, strict=True))
    return state, json.loads(state.with_suffix(".json").read_text())


@pytest.mark.parametrize("grow", [True, False], ids=["grown", "exact"])
@pytest.mark.parametrize("compress", [True, False], ids=["zlib", "raw"])
def test_restore_generates_exactly_what_a_full_prefill_does(engines, store, tiny_llama: Path,
                                                            monkeypatch: pytest.MonkeyPatch, grow: bool,
                                                            compress: bool) -> None:
    # How well a state compresses depends on its numbers: make both ways happen here.
    monkeypatch.setattr(snapshots, "MIN_SAVING", 0.0 if compress else 1.0)
    state, meta = check_restore_equals_prefill(engines, store, model_identity(tiny_llama), grow)
    assert meta["compressed"] is compress
    assert meta["size"] == state.stat().st_size and meta["n_tokens"] > 100


def test_compression_is_kept_only_where_it_pays(tmp_path: Path) -> None:
    import zlib

    for name, data, pays in (("random", os.urandom(3 << 20), False), ("zeros", bytes(3 << 20), True),
                             ("small", b"ab" * 100, True), ("empty", b"", False)):
        out = tmp_path / f"{name}.out"
        with open(out, "wb") as f:
            compressed, digest, size, raw_size = snapshots._store(bytearray(data), f)
        kept = out.read_bytes()
        assert compressed or kept == data
        assert (compressed, raw_size, size) == (pays, len(data), len(kept)), name
        assert digest == hashlib.sha256(kept).hexdigest()
        assert not compressed or zlib.decompress(kept) == data


@pytest.mark.real_model
def test_restore_generates_exactly_what_a_full_prefill_does_on_smollm2(smollm2: Path, store) -> None:
    opened: list[LlamaEngine] = []

    def open_engine() -> LlamaEngine:
        opened.append(LlamaEngine(smollm2, n_ctx=1024))
        return opened[-1]

    try:
        story = "The history of the city begins in the Roman era, when a settlement grew along the river. "
        prompt = chatml("You are a helpful assistant.", story * 10 + "What happened next?")
        _, meta = check_restore_equals_prefill(open_engine, store, model_identity(smollm2), True, prompt)
        assert meta["n_tokens"] > 200
    finally:
        for engine in opened:
            engine.close()


def test_metadata_records_what_was_stored(engines, store, tiny_llama: Path) -> None:
    import llama_cpp

    engine = engines()
    cached, _ = conversation(engine)
    state = store.save(engine, model_id="m1")
    assert state is not None
    meta = json.loads(state.with_suffix(".json").read_text())
    assert meta["model_id"] == "m1" and meta["n_ctx"] == engine.n_ctx
    assert meta["lib_version"] == llama_cpp.__version__
    assert meta["tokens"] == cached and meta["n_tokens"] == len(cached)
    assert meta["sha256"] == hashlib.sha256(state.read_bytes()).hexdigest()
    assert meta["size"] == state.stat().st_size and meta["created"] > 0
    # Saving the same state again keeps the one entry.
    assert store.save(engine, model_id="m1") == state
    assert store.info()["count"] == 1


def test_short_states_are_not_worth_a_snapshot(engines, store) -> None:
    engine = engines()
    greedy(engine, engine.tokenize("hello"), SamplingOptions(max_tokens=2, temperature=0))
    assert len(engine.cached_tokens) < snapshots.MIN_TOKENS
    assert store.save(engine, model_id="m") is None
    assert store.info()["count"] == 0


def test_restore_leaves_a_live_cache_that_already_holds_the_prefix(engines, store) -> None:
    engine = engines()
    cached, grown = conversation(engine)
    store.save(engine, model_id="m")
    assert store.restore(engine, grown, model_id="m") == 0
    assert engine.cached_tokens == cached
    assert greedy(engine, grown).evaluated[0] == len(grown) - len(cached)


def test_the_longest_fitting_prefix_wins(engines, store) -> None:
    engine = engines()
    first, grown = conversation(engine)
    store.save(engine, model_id="m")
    second, grown = conversation(engine, grown)
    store.save(engine, model_id="m")
    assert second[: len(first)] == first
    assert store.restore(engines(), grown, model_id="m") == len(second)
    # A conversation that branched after the first snapshot's tokens still gets that one.
    branched = first + engine.tokenize(turn("something else"), add_bos=False)
    assert store.restore(engines(), branched, model_id="m") == len(first)
    # Nothing fits another model, another context size, or a conversation that differs early.
    assert store.restore(engines(), grown, model_id="other") == 0
    assert store.restore(engines(n_ctx=128), grown[:100], model_id="m") == 0
    assert store.restore(engines(), [grown[0], 7, *grown[2:]], model_id="m") == 0
    assert store.info()["count"] == 2  # none of these misses deleted anything


# ---------------------------------------------------------------- damage


def _flip(state: Path, meta: dict, donor: dict) -> None:
    data = bytearray(state.read_bytes())
    for i in range(len(data) // 3, len(data) // 3 + 64):
        data[i] ^= 0xFF
    state.write_bytes(bytes(data))


def _truncate(state: Path, meta: dict, donor: dict) -> None:
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])


def _garbage_json(state: Path, meta: dict, donor: dict) -> None:
    state.with_suffix(".json").write_text('{"model_id": "m", "tokens": [1, 2')


def _json_not_an_object(state: Path, meta: dict, donor: dict) -> None:
    state.with_suffix(".json").write_text("[]")


def _state_missing(state: Path, meta: dict, donor: dict) -> None:
    state.unlink()


def _adopt(state: Path, meta: dict, donor: dict, data: bytes, compressed: bool, raw_size: int) -> None:
    """Put other bytes in place and make the metadata vouch for them: only later checks can catch it."""
    state.write_bytes(data)
    meta.update(sha256=hashlib.sha256(data).hexdigest(), size=len(data), compressed=compressed, raw_size=raw_size)
    state.with_suffix(".json").write_text(json.dumps(meta))


def _other_models_state_renamed_into_place(state: Path, meta: dict, donor: dict) -> None:
    state.write_bytes(Path(donor["path"]).read_bytes())


def _other_models_state_vouched_for(state: Path, meta: dict, donor: dict) -> None:
    _adopt(state, meta, donor, Path(donor["path"]).read_bytes(), donor["compressed"], donor["raw_size"])


def _not_zlib(state: Path, meta: dict, donor: dict) -> None:
    _adopt(state, meta, donor, os.urandom(5000), True, 20000)


def _zlib_of_garbage(state: Path, meta: dict, donor: dict) -> None:
    import zlib

    raw = os.urandom(20000)
    _adopt(state, meta, donor, zlib.compress(raw), True, len(raw))


def _state_of_other_tokens(state: Path, meta: dict, donor: dict) -> None:
    _adopt(state, meta, donor, Path(donor["same_model_path"]).read_bytes(), donor["same_model_compressed"],
           donor["same_model_raw_size"])


DAMAGE = [_flip, _truncate, _garbage_json, _json_not_an_object, _state_missing,
          _other_models_state_renamed_into_place, _other_models_state_vouched_for, _not_zlib, _zlib_of_garbage,
          _state_of_other_tokens]


@pytest.mark.parametrize("damage", DAMAGE, ids=[d.__name__.strip("_") for d in DAMAGE])
def test_a_damaged_snapshot_is_deleted_and_the_prefill_happens_as_usual(engines, store, tiny_gpt2: Path,
                                                                       damage) -> None:
    # A donor state from another model with the same shape of context (refused by llama.cpp), and one from
    # the same model for other tokens (accepted by llama.cpp: only our token check can catch it).
    other = engines(tiny_gpt2)
    conversation(other, PROMPT)
    donor_store = SnapshotStore(store.root.parent / "donors")
    donor_state = donor_store.save(other, model_id="gpt2")
    same = engines()
    conversation(same, chatml("Another system prompt entirely.", "short question about the world"))
    same_state = donor_store.save(same, model_id="m")
    assert donor_state is not None and same_state is not None
    donor_meta = json.loads(donor_state.with_suffix(".json").read_text())
    same_meta = json.loads(same_state.with_suffix(".json").read_text())
    donor = {"path": donor_state, "compressed": donor_meta["compressed"], "raw_size": donor_meta["raw_size"],
             "same_model_path": same_state, "same_model_compressed": same_meta["compressed"],
             "same_model_raw_size": same_meta["raw_size"]}

    a = engines()
    _, grown = conversation(a)
    state = store.save(a, model_id="m")
    assert state is not None
    damage(state, json.loads(state.with_suffix(".json").read_text()), donor)

    b = engines()
    assert store.restore(b, grown, model_id="m") == 0
    assert list(store.root.iterdir()) == []  # the entry is gone, and nothing temporary was left behind
    assert b.cached_tokens == []
    got, want = greedy(b, grown), greedy(engines(), grown)
    assert got.evaluated[0] == len(grown)
    assert_same_generation(got, want)


def test_a_damaged_longest_snapshot_falls_back_to_the_next_longest(engines, store) -> None:
    engine = engines()
    first, grown = conversation(engine)
    store.save(engine, model_id="m")
    second, grown = conversation(engine, grown)
    longest = store.save(engine, model_id="m")
    assert longest is not None
    _flip(longest, {}, {})
    b = engines()
    assert store.restore(b, grown, model_id="m") == len(first)
    assert not longest.exists()
    assert_same_generation(greedy(b, grown), greedy(engines(), grown))


# ---------------------------------------------------------------- eviction, atomicity, info


def prompts(count: int) -> list[str]:
    words = ["hello", "world", "the", "in", "a", "snow", "river", "lamp"]
    return [chatml("You are terse.", " ".join(words[(i + j) % len(words)] for j in range(20)))
            for i in range(count)]


def test_eviction_keeps_the_cap_and_the_recently_used(engines, home: Path) -> None:
    engine = engines()
    texts = prompts(4)
    probe = SnapshotStore(home / "probe")
    conversation(engine, texts[0])
    probe.save(engine, model_id="m")
    one = probe.info()["total_bytes"]
    store = SnapshotStore(max_bytes=int(one * 2.5))

    saved = []
    for text in texts[:3]:
        cached, _ = conversation(engine, text)
        store.save(engine, model_id="m")
        saved.append(cached)
        assert store.info()["total_bytes"] <= store.max_bytes
    assert store.info()["count"] == 2
    assert store.restore(engines(), saved[0], model_id="m") == 0  # the oldest went first
    assert store.restore(engines(), saved[1], model_id="m") == len(saved[1])  # now the most recent
    conversation(engine, texts[3])
    store.save(engine, model_id="m")
    assert store.info()["total_bytes"] <= store.max_bytes and store.info()["count"] == 2
    assert store.restore(engines(), saved[2], model_id="m") == 0  # saved after, but used before
    assert store.restore(engines(), saved[1], model_id="m") == len(saved[1])


def test_a_snapshot_larger_than_the_cap_is_not_written(engines, home: Path) -> None:
    engine = engines()
    conversation(engine)
    store = SnapshotStore(max_bytes=1000)
    assert store.save(engine, model_id="m") is None
    assert store.info()["count"] == 0 and not any(store.root.iterdir())


def test_max_bytes_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch, home: Path) -> None:
    assert SnapshotStore().max_bytes == 2048 * 1024 * 1024
    assert SnapshotStore().root == home / "cache" / "snapshots"
    monkeypatch.setenv("CHATCLI_SNAPSHOT_MAX_MB", "1.5")
    assert SnapshotStore().max_bytes == 1536 * 1024
    for bad in ("lots", "-1", "nan", "inf"):
        monkeypatch.setenv("CHATCLI_SNAPSHOT_MAX_MB", bad)
        with pytest.raises(UsageError, match="CHATCLI_SNAPSHOT_MAX_MB"):
            SnapshotStore()


def test_writes_are_atomic(engines, store, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = engines()
    conversation(engine)
    store_data = snapshots._store

    def half_then(error: BaseException):  # noqa: ANN202
        def write(data, out):  # noqa: ANN001, ANN202
            out.write(bytes(data[: len(data) // 2]))  # as a Ctrl-C or a full disk would leave it
            raise error
        return write

    monkeypatch.setattr(snapshots, "_store", half_then(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        store.save(engine, model_id="m")
    assert list(store.root.iterdir()) == []
    monkeypatch.setattr(snapshots, "_store", half_then(OSError(28, "No space left on device")))
    with pytest.raises(ChatcliError, match="could not save"):
        store.save(engine, model_id="m")
    assert list(store.root.iterdir()) == []
    monkeypatch.setattr(snapshots, "_store", store_data)

    replace = os.replace
    calls = []

    def fail_on_metadata(src, dst):  # noqa: ANN001, ANN202
        calls.append(dst)
        if str(dst).endswith(".json"):
            raise OSError(28, "No space left on device")
        replace(src, dst)

    monkeypatch.setattr(os, "replace", fail_on_metadata)
    with pytest.raises(ChatcliError):
        store.save(engine, model_id="m")
    assert len(calls) == 2  # the state was in place before the metadata failed ...
    assert list(store.root.iterdir()) == []  # ... and was taken away again
    monkeypatch.setattr(os, "replace", replace)

    state = store.save(engine, model_id="m")
    assert state is not None
    assert sorted(p.name for p in store.root.iterdir()) == sorted([state.name, state.with_suffix(".json").name])


def test_leftovers_of_dead_processes_are_swept(engines, store) -> None:
    engine = engines()
    conversation(engine)
    store.root.mkdir(parents=True)
    old = store.root / ".tmp-1-dead.raw"
    fresh = store.root / ".tmp-2-busy.raw"  # a save in progress in another process
    orphan = store.root / "0123456789abcdef-40-dead.state"
    for path in (old, fresh, orphan):
        path.write_bytes(b"x" * 100)
    os.utime(old, (1, 1))
    os.utime(orphan, (1, 1))
    state = store.save(engine, model_id="m")
    assert state is not None
    assert not old.exists() and not orphan.exists() and fresh.exists()


def test_info_and_clear(engines, store) -> None:
    assert store.info() == {"count": 0, "total_bytes": 0, "max_bytes": store.max_bytes, "root": str(store.root),
                            "models": {}}
    assert store.clear() == 0
    engine = engines()
    for model_id, text in (("m1", PROMPT), ("m1", prompts(1)[0]), ("m2", PROMPT)):
        conversation(engine, text)
        store.save(engine, model_id=model_id)
    info = store.info()
    on_disk = sum(p.stat().st_size for p in store.root.iterdir())
    assert info["count"] == 3 and info["total_bytes"] == on_disk
    assert info["models"] == {"m1": 2, "m2": 1}
    assert store.clear() == on_disk
    assert store.info()["count"] == 0 and list(store.root.iterdir()) == []


SAVER = """
import sys
from pathlib import Path
from chatcli.engine import LlamaEngine, SamplingOptions
from chatcli.snapshots import SnapshotStore
root, model, order = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
engine = LlamaEngine(model, n_threads=1)
store = SnapshotStore(root, max_bytes=1 << 30)
for text in order:
    "".join(engine.generate(engine.tokenize(text), SamplingOptions(max_tokens=4, temperature=0)))
    store.save(engine, model_id="m")
"""


def test_two_processes_saving_at_once_do_not_corrupt_each_other(engines, store, tiny_llama: Path) -> None:
    texts = prompts(4)
    procs = [subprocess.Popen([sys.executable, "-c", SAVER, str(store.root), str(tiny_llama), *order], cwd=REPO)
             for order in (texts, texts[::-1])]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    assert store.info()["count"] == 4
    assert not [p for p in store.root.iterdir() if p.name.startswith(".")]
    for name in store.root.glob("*.json"):
        tokens = json.loads(name.read_text())["tokens"]
        assert store.restore(engines(), tokens, model_id="m") == len(tokens)


def test_a_snapshot_is_not_used_across_flash_attention_settings(engines, store, tiny_llama: Path) -> None:
    """The KV cache layout differs with flash attention: such a state must never be restored."""
    model_id = model_identity(tiny_llama)
    saver = engines(flash_attn=False)
    _, grown = conversation(saver)
    assert store.save(saver, model_id=model_id) is not None
    assert store.restore(engines(flash_attn=True), grown, model_id=model_id) == 0
    assert store.restore(engines(flash_attn=False), grown, model_id=model_id) > 0


# ---------------------------------------------------------------- one snapshot per conversation, in the background

CHAT_SETTINGS = {"temperature": 0, "max_tokens": 8}
QUESTIONS = ["hello world, tell me about the river in the morning and the lamp of snow",
             "and then? the world said hello to the thing in a word or two",
             "more about the snow, the lamp and the river, please",
             "in a minute the morning ran in the world; what next?",
             "one more: the thing, the world, the river"]


@pytest.fixture(scope="session")
def long_llama(models_dir: Path) -> Path:
    """tiny_llama with room for a chat of several turns (its 256-token window drops turns after two)."""
    from ggufgen import CHATML_TEMPLATE, make_llama

    return make_llama(models_dir / "tiny-llama-2k.gguf", n_ctx=2048, chat_template=CHATML_TEMPLATE)


def chat_session(engine: LlamaEngine, snapshot_store: SnapshotStore | None, history: object) -> object:
    from chatcli.chat_templates import builtin_format
    from chatcli.conversation import ChatSession

    return ChatSession(engine=engine, fmt=builtin_format("chatml"), model_label="tiny", history=history,
                       system="You are terse.", settings=dict(CHAT_SETTINGS), snapshots=snapshot_store,
                       model_id="m")


@pytest.fixture
def history(home: Path) -> Iterator[object]:
    from chatcli.history import History

    with History() as store:
        yield store


def state_files(root: Path) -> list[Path]:
    """Committed snapshot states (not the writer's temporary files)."""
    return sorted(p for p in root.glob("*.state") if not p.name.startswith(snapshots.TMP)) if root.is_dir() else []


class Gate:
    """Holds the snapshot writer at its first write until opened: a slow disk, with the real writer behind."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import threading

        self.open, self.waiting = threading.Event(), threading.Event()
        real = snapshots._store

        def store_data(data, out):  # noqa: ANN001, ANN202
            self.waiting.set()
            assert self.open.wait(60)
            return real(data, out)

        monkeypatch.setattr(snapshots, "_store", store_data)


def test_a_conversation_keeps_one_snapshot_and_deletes_the_superseded(engines, store, history, long_llama) -> None:
    session = chat_session(engines(long_llama), store, history)
    seen: list[Path] = []
    for question in QUESTIONS:
        assert "".join(session.send(question))
        store.flush()
        assert store.last_error is None
        files = state_files(store.root)
        assert len(files) == 1  # this conversation's newest state, and nothing else
        seen += [files[0]] if files[0] not in seen else []
        assert sorted(p.name for p in store.root.iterdir()) == sorted([files[0].name, files[0].stem + ".json"])
    # Turns replaced the snapshot before them (a random model's reply may not re-tokenise as it was generated:
    # then the snapshot ends where the reply diverged, and a turn can leave it as it was).
    assert len(seen) >= 3
    assert not any(p.exists() for p in seen[:-1])
    meta = json.loads(seen[-1].with_suffix(".json").read_text())
    assert meta["conversation"] == session.conversation_id
    assert meta["tokens"] == session.engine.cached_tokens  # the context was cut to the rendered history
    assert session.tokens_for(session.messages)[: meta["n_tokens"]] == meta["tokens"]
    # Another conversation gets its own snapshot and leaves this one alone.
    session.reset()
    "".join(session.send(QUESTIONS[0]))
    store.flush()
    assert len(state_files(store.root)) == 2 and seen[-1].exists()


def test_continue_restores_the_single_snapshot_with_the_same_greedy_reply(engines, store, history, long_llama) -> None:
    session = chat_session(engines(long_llama), store, history)
    for question in QUESTIONS[:3]:
        "".join(session.send(question))
    store.close()
    assert len(state_files(store.root)) == 1
    n_saved = json.loads(state_files(store.root)[0].with_suffix(".json").read_text())["n_tokens"]

    resumed = chat_session(engines(long_llama), SnapshotStore(), history)
    resumed.load(session.conversation_id)
    reply = resumed.send(QUESTIONS[3])
    restored_text = "".join(reply)
    assert reply.restored == n_saved > 100

    prefilled = chat_session(engines(long_llama), None, history)
    prefilled.load(session.conversation_id)
    prefilled.messages = prefilled.messages[:-2]  # as it was before `resumed` answered
    full = prefilled.send(QUESTIONS[3])
    assert full.restored == 0
    assert "".join(full) == restored_text and restored_text


def test_the_snapshot_is_written_off_the_path_to_the_next_prompt(engines, store, history, long_llama,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    gate = Gate(monkeypatch)
    session = chat_session(engines(long_llama), store, history)
    first = "".join(session.send(QUESTIONS[0]))
    assert gate.waiting.wait(30)  # the writer has the state and is held at the disk ...
    assert state_files(store.root) == []
    # ... and the chat goes on meanwhile: replies stream and come back, and the context is usable.
    second = "".join(session.send(QUESTIONS[1]))
    third = "".join(session.send(QUESTIONS[2]))
    assert first and second and third
    assert state_files(store.root) == []
    gate.open.set()
    store.flush()
    assert store.last_error is None
    [state] = state_files(store.root)  # the first write went through; the second was superseded unwritten
    meta = json.loads(state.with_suffix(".json").read_text())
    assert meta["tokens"] == session.engine.cached_tokens
    assert len(session.messages) == 6


def test_undo_and_retry_reuse_the_live_context_after_a_snapshot(engines, store, history, long_llama) -> None:
    engine = engines(long_llama)
    session = chat_session(engine, store, history)
    for question in QUESTIONS[:3]:
        "".join(session.send(question))
    store.flush()
    evaluated: list[int] = []
    original = engine._llm.eval
    engine._llm.eval = lambda batch: (evaluated.append(len(batch)), original(batch))[1]
    try:
        prompt, _ = session.fit()
        "".join(session.retry())
        assert evaluated[0] < len(prompt) // 4, (evaluated[0], len(prompt))  # no prefill of the conversation
        store.flush()
        evaluated.clear()
        assert session.undo()
        prompt, _ = session.fit()
        "".join(session.send("and a different question now"))
        assert evaluated[0] < len(prompt) // 2, (evaluated[0], len(prompt))
    finally:
        del engine._llm.eval
    assert store.last_error is None


def test_a_write_in_flight_at_close_is_finished_and_valid(engines, store, history, long_llama,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    gate = Gate(monkeypatch)
    session = chat_session(engines(long_llama), store, history)
    "".join(session.send(QUESTIONS[0]))
    assert gate.waiting.wait(30) and state_files(store.root) == []
    threading.Timer(0.3, gate.open.set).start()
    store.close()  # waits for the held write
    assert gate.open.is_set()
    [state] = state_files(store.root)
    meta = json.loads(state.with_suffix(".json").read_text())
    assert hashlib.sha256(state.read_bytes()).hexdigest() == meta["sha256"]
    fresh = engines(long_llama)
    assert SnapshotStore().restore(fresh, meta["tokens"], model_id="m") == meta["n_tokens"]
    assert not [p for p in store.root.iterdir() if p.name.startswith(snapshots.TMP)]


def test_chat_process_waits_for_its_snapshot_and_continue_uses_it(chatcli, long_llama: Path, home: Path) -> None:
    setup = "/set temperature 0\n/set max_tokens 8\n"
    first = chatcli("chat", "-m", str(long_llama), input=setup + "\n".join(QUESTIONS[:4]) + "\n")
    assert first.returncode == 0, first.stderr
    [state] = state_files(home / "cache" / "snapshots")
    meta = json.loads(state.with_suffix(".json").read_text())
    assert hashlib.sha256(state.read_bytes()).hexdigest() == meta["sha256"]
    again = chatcli("chat", "--continue", input=QUESTIONS[4] + "\n")
    assert again.returncode == 0, again.stderr
    assert f"restored {meta['n_tokens']} tokens" in again.stderr
    assert len(state_files(home / "cache" / "snapshots")) == 1
