"""Recurrent (Mamba, RWKV) and encoder-decoder (T5) models through chatcli's engine, CLI and snapshots.

Tiny generated models (tests/ggufgen_families.py) in real llama.cpp: a recurrent state is extended or started
over, never cut back, and a snapshot of it is restored only where it was taken; T5 encodes, then decodes.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from chatcli.engine import LlamaEngine, SamplingOptions
from chatcli.families import DECODER, ENCODER_DECODER, RECURRENT, family
from chatcli.gguf_info import read_gguf
from chatcli.snapshots import SnapshotStore

GREEDY = SamplingOptions(max_tokens=10, temperature=0)
QUESTIONS = ["hello world, tell me about the river in the morning and the lamp of snow",
             "and then? the world said hello to the thing in a word or two",
             "more about the snow, the lamp and the river, please",
             "one more: the thing, the world, the river"]
CHAT_SETTINGS = {"temperature": 0.0, "max_tokens": 8}


@pytest.fixture(scope="session")
def tiny_mamba(models_dir: Path) -> Path:
    from ggufgen_families import make_mamba

    return make_mamba(models_dir / "tiny-mamba.gguf", n_ctx=2048)


@pytest.fixture(scope="session")
def tiny_rwkv(models_dir: Path) -> Path:
    from ggufgen_families import make_rwkv

    return make_rwkv(models_dir / "tiny-rwkv6.gguf", n_ctx=2048)


@pytest.fixture(scope="session")
def tiny_t5(models_dir: Path) -> Path:
    from ggufgen_families import make_t5

    return make_t5(models_dir / "tiny-t5.gguf")


@pytest.fixture(scope="session")
def tiny_t5_eos(models_dir: Path) -> Path:
    from ggufgen_families import make_t5

    return make_t5(models_dir / "tiny-t5-eos.gguf", eos_after=5)


@pytest.fixture(params=["mamba", "rwkv"])
def recurrent_model(request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue(f"tiny_{request.param}")


@pytest.fixture
def engines() -> Iterator[Callable[[Path], LlamaEngine]]:
    opened: list[LlamaEngine] = []

    def open_engine(path: Path) -> LlamaEngine:
        opened.append(LlamaEngine(path, n_threads=1))
        return opened[-1]

    yield open_engine
    for engine in opened:
        engine.close()


def greedy(engine: LlamaEngine, tokens: list[int]) -> tuple[str, list[int]]:
    """The greedy text, and the sizes of the batches llama.cpp evaluated (the first: the prompt part read)."""
    llm = engine._llm
    sizes: list[int] = []
    original = llm.eval

    def counting_eval(batch):  # noqa: ANN001, ANN202
        sizes.append(len(batch))
        original(batch)

    llm.eval = counting_eval
    try:
        return "".join(engine.generate(tokens, GREEDY)), sizes
    finally:
        del llm.eval


# ---------------------------------------------------------------- families


def test_family_is_read_from_the_header(tiny_mamba: Path, tiny_rwkv: Path, tiny_t5: Path, tiny_llama: Path) -> None:
    assert family(read_gguf(tiny_mamba)).name == RECURRENT
    assert family(read_gguf(tiny_rwkv)).name == RECURRENT
    assert family(read_gguf(tiny_t5)).name == ENCODER_DECODER
    assert family(read_gguf(tiny_llama)).name == DECODER


@pytest.mark.parametrize(("fixture", "words"), [("tiny_mamba", "recurrent (mamba)"),
                                                ("tiny_rwkv", "recurrent (rwkv6)"),
                                                ("tiny_t5", "encoder-decoder (t5)"),
                                                ("tiny_llama", "decoder (llama)")])
def test_show_names_the_family(chatcli, request: pytest.FixtureRequest, fixture: str, words: str) -> None:
    path = request.getfixturevalue(fixture)
    shown = chatcli("show", str(path), "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["family"].startswith(words)


# ---------------------------------------------------------------- recurrent state


def test_a_recurrent_state_is_extended_not_reread(recurrent_model: Path, engines) -> None:
    engine = engines(recurrent_model)
    assert engine.recurrent
    first = engine.tokenize("hello world the morning")
    greedy(engine, first)
    held = engine.cached_tokens
    grown = held + engine.tokenize(" and the world", add_bos=False)
    text, sizes = greedy(engine, grown)
    assert sizes[0] == len(grown) - len(held)  # only the new tokens were read
    fresh_text, fresh_sizes = greedy(engines(recurrent_model), grown)
    assert fresh_sizes[0] == len(grown)
    assert text == fresh_text


def test_a_recurrent_state_is_never_cut_back(recurrent_model: Path, engines) -> None:
    """A prompt that shares only a prefix with the state (a retried reply, an edited turn) is read whole: a
    KV cache would be cut to the shared prefix, a recurrent state cannot be, so the reply must equal a fresh
    engine's and not one that went on from the longer state."""
    engine = engines(recurrent_model)
    base = engine.tokenize("hello world the morning and the river")
    greedy(engine, base)
    other = base[:4] + engine.tokenize(" snow lamp", add_bos=False)
    text, sizes = greedy(engine, other)
    assert sizes[0] == len(other)
    assert text == greedy(engines(recurrent_model), other)[0]
    engine.truncate(3)  # what a KV cache would keep; a recurrent state is dropped instead
    assert engine.cached_tokens == []


def chat_session(engine: LlamaEngine, store: SnapshotStore | None, history: object) -> object:
    from chatcli.chat_templates import builtin_format
    from chatcli.conversation import ChatSession

    return ChatSession(engine=engine, fmt=builtin_format("chatml"), model_label="tiny", history=history,
                       system="You are terse.", settings=dict(CHAT_SETTINGS), snapshots=store, model_id="m")


@pytest.fixture
def history(home: Path) -> Iterator[object]:
    from chatcli.history import History

    with History() as store:
        yield store


def test_continue_from_a_recurrent_snapshot_gives_the_same_greedy_reply(recurrent_model: Path, engines,
                                                                        history) -> None:
    store = SnapshotStore()
    session = chat_session(engines(recurrent_model), store, history)
    for question in QUESTIONS[:3]:
        "".join(session.send(question))
    store.close()
    assert store.last_error is None
    states = sorted(store.root.glob("*.state"))
    assert len(states) == 1
    meta = json.loads(states[0].with_suffix(".json").read_text())
    # taken where the context held exactly the conversation's prefix: the tokens a continuation starts with
    assert session.tokens_for(session.messages)[: meta["n_tokens"]] == meta["tokens"]

    resumed = chat_session(engines(recurrent_model), SnapshotStore(), history)
    resumed.load(session.conversation_id)
    reply = resumed.send(QUESTIONS[3])
    restored_text = "".join(reply)
    assert reply.restored == meta["n_tokens"] > 32

    prefilled = chat_session(engines(recurrent_model), None, history)
    prefilled.load(session.conversation_id)
    prefilled.messages = prefilled.messages[:-2]  # as it was before `resumed` answered
    full = prefilled.send(QUESTIONS[3])
    assert full.restored == 0
    assert "".join(full) == restored_text and restored_text


def test_retry_on_a_recurrent_model_equals_a_fresh_reply(recurrent_model: Path, engines, history) -> None:
    session = chat_session(engines(recurrent_model), None, history)
    first = "".join(session.send(QUESTIONS[0]))
    again = "".join(session.retry())  # the state went past the prompt: it is read again, not cut
    assert again == first


def test_chat_and_continue_on_a_recurrent_model_in_the_cli(chatcli, recurrent_model: Path, home: Path) -> None:
    setup = "/set temperature 0\n/set max_tokens 6\n"
    first = chatcli("chat", "-m", str(recurrent_model), input=setup + "\n".join(QUESTIONS[:3]) + "\n")
    assert first.returncode == 0, first.stderr
    again = chatcli("chat", "--continue", input=QUESTIONS[3] + "\n")
    assert again.returncode == 0, again.stderr
    assert "restored" in again.stderr
    off = chatcli("chat", "--continue", input=QUESTIONS[3] + "\n", env={"CHATCLI_SNAPSHOTS": "0"})
    assert off.returncode == 0, off.stderr


# ---------------------------------------------------------------- encoder-decoder


def test_t5_complete_is_deterministic_at_temperature_0(chatcli, tiny_t5: Path) -> None:
    runs = [chatcli("complete", "-m", str(tiny_t5), "-n", "12", "--temperature", "0", "hello world the cat")
            for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr
    assert runs[0].stdout == runs[1].stdout and runs[0].stdout.strip()
    other = chatcli("complete", "-m", str(tiny_t5), "-n", "12", "--temperature", "0", "a dog")
    assert other.returncode == 0


def test_t5_stops_at_its_end_token(chatcli, tiny_t5_eos: Path) -> None:
    from ggufgen_families import t5_chain

    result = chatcli("complete", "-m", str(tiny_t5_eos), "-n", "50", "--temperature", "0", "--json", "the cat")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["finish_reason"] == "stop"
    assert out["completion_tokens"] == len(t5_chain(5)) == 5


def test_t5_streams_like_any_model(tiny_t5: Path, engines) -> None:
    engine = engines(tiny_t5)
    assert engine.encoder_decoder and engine.cached_tokens == []
    chunks = list(engine.generate(engine.tokenize("hello world"), GREEDY))
    assert len(chunks) > 1
    assert "".join(chunks) == "".join(engine.generate(engine.tokenize("hello world"), GREEDY))


def test_t5_chat_without_a_template_says_it_takes_single_prompts(chatcli, tiny_t5: Path) -> None:
    result = chatcli("chat", "-m", str(tiny_t5), input="hello\n")
    assert result.returncode == 2
    assert "single prompts" in result.stderr and "chatcli complete" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_t5_with_a_chat_template_chats(chatcli, models_dir: Path) -> None:
    from ggufgen import CHATML_TEMPLATE
    from ggufgen_families import make_t5

    path = make_t5(models_dir / "tiny-t5-chatml.gguf", chat_template=CHATML_TEMPLATE)
    result = chatcli("chat", "-m", str(path), input="/set temperature 0\n/set max_tokens 5\nhello\nthe cat\n")
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------- embedding models do not write text


@pytest.fixture(scope="session")
def bert_for_refusal(models_dir: Path) -> Path:
    from ggufgen_bert import make_bert

    return make_bert(models_dir / "tiny-bert-refusal.gguf")


@pytest.mark.parametrize("command", [["complete", "hello"], ["chat"]])
def test_an_embedding_model_given_to_complete_or_chat_says_what_it_is_for(chatcli, bert_for_refusal: Path,
                                                                          command: list[str]) -> None:
    result = chatcli(command[0], "-m", str(bert_for_refusal), *command[1:], input="hello\n")
    assert result.returncode == 2
    assert result.stdout == ""
    [line] = result.stderr.strip().splitlines()
    assert "embedding model (bert)" in line and "chatcli embed" in line
    assert family(read_gguf(bert_for_refusal)).describe().startswith("embedding (bert)")


def test_classify_on_a_recurrent_model_scores_each_line_as_if_alone(chatcli, tiny_mamba: Path) -> None:
    """classify reuses the prompt's cache between labels and lines; a recurrent state must be re-read, not cut."""
    lines = ["hello world", "the river in the morning", "snow"]
    together = chatcli("classify", "-m", str(tiny_mamba), "-l", "yes", "-l", "no", "--json",
                       input="\n".join(lines) + "\n")
    assert together.returncode == 0, together.stderr
    rows = [json.loads(line) for line in together.stdout.splitlines()]
    assert [r["text"] for r in rows] == lines
    for row in rows:
        assert row["label"] in ("yes", "no") and abs(sum(row["probabilities"].values()) - 1) < 0.01
        alone = chatcli("classify", "-m", str(tiny_mamba), "-l", "yes", "-l", "no", "--json", row["text"])
        assert alone.returncode == 0, alone.stderr
        answer = json.loads(alone.stdout)
        assert answer["uncalibrated"] == pytest.approx(row["uncalibrated"], abs=1e-4)
        assert answer["probabilities"] == pytest.approx(row["probabilities"], abs=1e-4)
