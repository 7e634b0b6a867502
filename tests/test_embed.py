"""embed and similar, on a tiny random-weight BERT (real llama.cpp), a tiny llama, and the real SmolLM2."""

from __future__ import annotations

import json
import math
import sqlite3
import stat
from pathlib import Path

import numpy as np
import pytest
from ggufgen_bert import make_bert

WIDTH = 64
LINES = ["hello world", "the cat is playing in the house", "a dog runs in the park", "hello world",
         "music and a guitar", "the weather is cold and the rain falls"]


@pytest.fixture(scope="session")
def tiny_bert(models_dir: Path) -> Path:
    """A BERT encoder: 64 wide, mean pooling, trained context 128 tokens."""
    return make_bert(models_dir / "tiny-bert.gguf", n_embd=WIDTH, n_ctx=128)


def _records(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]


def _norm(vector: list[float]) -> float:
    return math.sqrt(sum(x * x for x in vector))


# ---------------------------------------------------------------- embed


def test_embed_lines_have_the_model_width_unit_norm_and_equal_vectors_for_equal_text(chatcli, tiny_bert):
    r = chatcli("embed", "-m", str(tiny_bert), input="\n".join(LINES) + "\n")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    records = _records(r.stdout)
    assert [rec["text"] for rec in records] == LINES
    assert all(len(rec["embedding"]) == WIDTH for rec in records)
    assert all(abs(_norm(rec["embedding"]) - 1) < 1e-5 for rec in records)
    assert records[0]["embedding"] == records[3]["embedding"]
    assert records[0]["embedding"] != records[1]["embedding"]


def test_embed_text_argument_and_no_normalize(chatcli, tiny_bert):
    unit = _records(chatcli("embed", "-m", str(tiny_bert), "hello world").stdout)
    raw = chatcli("embed", "-m", str(tiny_bert), "--no-normalize", "hello world")
    assert raw.returncode == 0, raw.stderr
    (rec,) = _records(raw.stdout)
    assert rec["text"] == "hello world"
    assert abs(_norm(rec["embedding"]) - 1) > 0.1  # mean of layer-normed states: about sqrt(64) long
    scaled = np.array(rec["embedding"]) / _norm(rec["embedding"])
    assert np.allclose(scaled, unit[0]["embedding"], atol=1e-6)


def test_embed_skips_blank_lines(chatcli, tiny_bert):
    r = chatcli("embed", "-m", str(tiny_bert), input="one cat\n\n   \r\ntwo dogs\r\n")
    assert r.returncode == 0, r.stderr
    assert [rec["text"] for rec in _records(r.stdout)] == ["one cat", "two dogs"]


def test_embed_formats_json_and_tsv_parse(chatcli, tiny_bert):
    text = "".join(f"{line}\n" for line in LINES[:3])
    jsonl = _records(chatcli("embed", "-m", str(tiny_bert), input=text).stdout)
    r = chatcli("embed", "-m", str(tiny_bert), "--format", "json", input=text)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == jsonl
    r = chatcli("embed", "-m", str(tiny_bert), "--format", "tsv", input=text + "tab\there\n")
    assert r.returncode == 0, r.stderr
    rows = [line.split("\t") for line in r.stdout.splitlines()]
    assert [row[0] for row in rows] == [*LINES[:3], "tab\\there"]
    assert all(len(row) == 1 + WIDTH for row in rows)
    assert [float(x) for x in rows[0][1:]] == jsonl[0]["embedding"]  # the same digits in every format


def test_embed_json_of_no_input_is_an_empty_array(chatcli, tiny_bert):
    r = chatcli("embed", "-m", str(tiny_bert), "--format", "json", input="\n\n")
    assert (r.returncode, json.loads(r.stdout)) == (0, [])


def test_embed_without_input_is_a_usage_error(chatcli, tiny_bert):
    r = chatcli("embed", "-m", str(tiny_bert), "   ")
    assert r.returncode == 2
    assert "nothing to embed" in r.stderr


def test_too_long_text_exits_3_and_truncate_cuts_it(chatcli, tiny_bert):
    long_line = "hello world " * 100  # 200 words: over the model's 128 tokens
    r = chatcli("embed", "-m", str(tiny_bert), input=f"short one\n{long_line}\n")
    assert r.returncode == 3
    assert "line 2 of stdin" in r.stderr and "--truncate" in r.stderr
    assert r.stderr.count("\n") == 1
    r = chatcli("embed", "-m", str(tiny_bert), "--truncate", input=f"short one\n{long_line}\n")
    assert r.returncode == 0, r.stderr
    records = _records(r.stdout)
    assert len(records) == 2 and len(records[1]["embedding"]) == WIDTH
    # --ctx-size lowers the limit below the model's
    r = chatcli("embed", "-m", str(tiny_bert), "-c", "16", "hello world " * 10)
    assert r.returncode == 3 and "at most 16" in r.stderr


def test_decoder_model_works_with_a_note(chatcli, tiny_llama):
    r = chatcli("embed", "-m", str(tiny_llama), input="hello world\nthe cat\n")
    assert r.returncode == 0, r.stderr
    records = _records(r.stdout)
    assert len(records) == 2 and all(len(rec["embedding"]) == 64 for rec in records)
    assert r.stderr.count("note:") == 1
    assert "not an embedding model" in r.stderr and "mean pooling" in r.stderr


def test_default_model_is_the_catalogues_embedding_model(chatcli):
    r = chatcli("embed", "hello")
    assert r.returncode == 1
    assert "all-minilm" in r.stderr and "chatcli pull" in r.stderr


# ---------------------------------------------------------------- similar


def test_similar_ranks_an_exact_duplicate_of_the_query_first(chatcli, tiny_bert):
    query = "the weather is cold and the rain falls"
    r = chatcli("similar", "-m", str(tiny_bert), query, input="\n".join(LINES) + "\n")
    assert r.returncode == 0, r.stderr
    rows = [line.split("\t", 1) for line in r.stdout.splitlines()]
    assert len(rows) == len(LINES)
    assert rows[0][1] == query and float(rows[0][0]) == pytest.approx(1.0, abs=1e-4)
    scores = [float(score) for score, _ in rows]
    assert scores == sorted(scores, reverse=True)


def test_similar_top_k_json_and_files(chatcli, tiny_bert, tmp_path):
    a = tmp_path / "a.txt"
    a.write_text("the cat is playing in the house\n\nmusic and a guitar\n")
    b = tmp_path / "b.txt"
    b.write_text("a dog runs in the park\nhello world\n")
    r = chatcli("similar", "-m", str(tiny_bert), "hello world", "-f", str(a), "-f", str(b), "-k", "2", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert len(rows) == 2
    assert rows[0] == {"score": pytest.approx(1.0, abs=1e-4), "text": "hello world", "source": str(b), "line": 2}
    assert rows[1]["score"] <= rows[0]["score"]


def test_similar_paragraphs(chatcli, tiny_bert, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text("the cat is playing\nin the house\n\n\nhello world\nand the sun\n\nmusic\n")
    r = chatcli("similar", "-m", str(tiny_bert), "hello world\nand the sun", "-f", str(doc), "--paragraphs",
                "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [(row["text"], row["line"]) for row in rows][0] == ("hello world\nand the sun", 5)
    assert len(rows) == 3
    text = chatcli("similar", "-m", str(tiny_bert), "music", "-f", str(doc), "--paragraphs", "-k", "0")
    assert "1.0000\tmusic\n" in text.stdout and "the cat is playing in the house" in text.stdout


def test_similar_rerun_reads_the_cache_and_does_not_load_the_model(chatcli, tiny_bert, home):
    text = "\n".join(LINES) + "\n"
    first = chatcli("similar", "-m", str(tiny_bert), "hello world", "-v", input=text)
    assert first.returncode == 0, first.stderr
    assert "loaded tiny-bert.gguf" in first.stderr
    db = home / "cache" / "embeddings.db"
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT count(*) FROM embeddings").fetchone()[0]
    assert rows == len(set(LINES) | {"hello world"})
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    again = chatcli("similar", "-m", str(tiny_bert), "hello world", "-v", input=text)
    assert again.returncode == 0, again.stderr
    assert "loaded" not in again.stderr  # every vector came from the cache: the model never loaded
    assert again.stdout == first.stdout
    # --no-cache computes again
    fresh = chatcli("similar", "-m", str(tiny_bert), "hello world", "-v", "--no-cache", input=text)
    assert "loaded tiny-bert.gguf" in fresh.stderr and fresh.stdout == first.stdout


def test_similar_too_long_line_names_its_place(chatcli, tiny_bert, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text("short\n" + "cat " * 200 + "\n")
    r = chatcli("similar", "-m", str(tiny_bert), "cat", "-f", str(doc))
    assert r.returncode == 3
    assert f"line 2 of {doc}" in r.stderr and "--truncate" in r.stderr
    r = chatcli("similar", "-m", str(tiny_bert), "cat", "-f", str(doc), "--truncate")
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 2


def test_similar_on_empty_input_prints_nothing_and_a_missing_file_is_a_usage_error(chatcli, tiny_bert):
    r = chatcli("similar", "-m", str(tiny_bert), "cat")  # stdin is /dev/null: not a TTY, but empty
    assert r.returncode == 0 and r.stdout == ""
    r = chatcli("similar", "-m", str(tiny_bert), "cat", "-f", "/nonexistent/file.txt")
    assert r.returncode == 2 and "cannot read" in r.stderr


# ---------------------------------------------------------------- the library


def test_batched_vectors_equal_one_at_a_time(tiny_bert, tiny_llama):
    from chatcli.embedding import Embedder

    texts = [f"{line} {i}" for i in range(6) for line in LINES]
    for path in (tiny_bert, tiny_llama):
        with Embedder(path, threads=1) as embedder:
            calls = []
            decode = embedder._decode

            def counting(batch, decode=decode, calls=calls):  # noqa: ANN001, ANN202
                calls.append(len(batch))
                return decode(batch)

            embedder._decode = counting  # type: ignore[method-assign]
            together = embedder.embed(texts)
            assert max(calls) > 1 and len(calls) < len(texts)  # several sequences per llama_decode
            alone = [embedder.embed([t])[0] for t in texts]
        for a, b in zip(together, alone, strict=True):
            assert a.shape == (embedder.width,)
            assert float(np.abs(a - b).max()) < 1e-4


def test_cls_pooling_from_the_header(models_dir):
    from chatcli.embedding import Embedder

    path = make_bert(models_dir / "tiny-bert-cls.gguf", pooling=2)
    with Embedder(path, threads=1) as embedder:
        assert embedder.pooling_name == "cls"
        (vector,) = embedder.embed(["hello world"])
        assert vector.shape == (64,) and np.isfinite(vector).all()


def test_recurrent_encoder_decoder_and_reranker_models_are_refused():
    from chatcli.embedding import Embedder
    from chatcli.errors import UsageError
    from chatcli.families import ENCODER_DECODER, POOLING_RANK, RECURRENT, Family

    for fam, word in ((Family(RECURRENT, "mamba", None), "recurrent"), (Family(ENCODER_DECODER, "t5", None),
                      "encoder-decoder"), (Family("embedding", "bert", POOLING_RANK), "reranker")):
        with pytest.raises(UsageError, match=word):
            Embedder._choose_pooling(fam)


def test_cache_recomputes_a_damaged_row(tmp_path):
    from chatcli.embed_cache import EmbeddingCache, model_key, text_key

    model = model_key("some-model", 1)
    with EmbeddingCache(tmp_path / "e.db") as cache:
        cache.put_many(model, [("a", np.arange(4, dtype=np.float32)), ("b", np.ones(4, dtype=np.float32))])
        cache._db.execute("UPDATE embeddings SET vector = ? WHERE text = ?", (b"\0" * 12, text_key("a")))
        cache._db.execute("UPDATE embeddings SET vector = ? WHERE text = ?",
                          (np.array([1, np.nan, 0, 0], dtype="<f4").tobytes(), text_key("b")))
        assert cache.get_many(model, ["a", "b"], 4) == [None, None]
        assert cache.stats().rows == 0  # both deleted: computed again next time
        cache.put_many(model, [("a", np.arange(4, dtype=np.float32))])
        got = cache.get_many(model, ["a", "a", "c"], 4)
        assert got[0] is not None and got[0].tolist() == [0, 1, 2, 3] and got[1] is not None and got[2] is None
        assert cache.get_many(model, ["a"], 8) == [None]  # another width: not this model's vector
        assert cache.get_many(model_key("other-model", 1), ["a"], 4) == [None]


def test_cache_stays_within_its_budget_and_clears(tmp_path):
    from chatcli.embed_cache import EmbeddingCache, model_key

    model = model_key("m", 1)
    with EmbeddingCache(tmp_path / "e.db", max_bytes=256 << 10) as cache:
        for batch in range(20):
            cache.put_many(model, [(f"{batch}-{i}", np.full(256, i, dtype=np.float32)) for i in range(50)])
        stats = cache.stats()
        assert stats.bytes <= 256 << 10 and 0 < stats.rows < 1000
        assert cache.get_many(model, ["19-49"], 256)[0] is not None  # the newest rows stay
        assert cache.clear() == stats.rows
        assert cache.stats().rows == 0


def test_cache_two_processes_write_at_once(tmp_path):
    import subprocess
    import sys

    script = (
        "import sys, numpy as np\n"
        "from chatcli.embed_cache import EmbeddingCache, model_key\n"
        "with EmbeddingCache(__import__('pathlib').Path(sys.argv[1])) as c:\n"
        "    m = model_key('m', 1)\n"
        "    for n in range(40):\n"
        "        c.put_many(m, [(f'{sys.argv[2]}-{n}-{i}', np.ones(8, np.float32)) for i in range(5)])\n"
        "        c.get_many(m, [f'{sys.argv[2]}-{n}-0'], 8)\n"
    )
    db = tmp_path / "shared.db"
    procs = [subprocess.Popen([sys.executable, "-c", script, str(db), tag], stderr=subprocess.PIPE, text=True)
             for tag in ("a", "b")]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    from chatcli.embed_cache import EmbeddingCache

    with EmbeddingCache(db) as cache:
        assert cache.stats().rows == 2 * 40 * 5


# ---------------------------------------------------------------- the real model


@pytest.mark.real_model
def test_smollm2_ranks_the_line_on_the_querys_topic_first(chatcli, smollm2):
    """SmolLM2 mean-pooled is a weak embedder (every pair scores 0.6-0.95), but on four lines about four unrelated
    topics each query's own topic comes first, by 0.05-0.12, also without shared words ("feline napping")."""
    from chatcli.embedding import Embedder, cosine_scores

    lines = [
        "The stock market fell sharply today as investors sold shares.",
        "My cat loves to sleep on the warm windowsill in the afternoon.",
        "Add two cups of flour and a pinch of salt to the bowl.",
        "The football team won the championship after a penalty shootout.",
    ]
    queries = {"Shares dropped on Wall Street.": 0, "A feline napping by the window.": 1,
               "Baking bread needs flour.": 2, "The soccer match ended in penalties.": 3}
    with Embedder(smollm2) as embedder:
        assert embedder.pooled_decoder and embedder.pooling_name == "mean"
        vectors = embedder.embed([*queries, *lines])
    for (query, expected), vector in zip(queries.items(), vectors, strict=False):
        scores = cosine_scores(vector, vectors[len(queries):])
        assert max(range(len(lines)), key=scores.__getitem__) == expected, (query, scores)
    r = chatcli("similar", "-m", str(smollm2), "Kittens and cats like sleeping in the sun.", "-k", "1",
                input="\n".join(lines) + "\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\t", 1)[1] == lines[1] + "\n"
    assert "not an embedding model" in r.stderr


def test_cache_info_counts_embeddings_and_clear_empties_them(chatcli, tiny_bert):
    ran = chatcli("embed", "-m", str(tiny_bert), input="one line\nanother line\n")
    assert ran.returncode == 0, ran.stderr
    info = json.loads(chatcli("cache", "info", "--json").stdout)
    assert info["embeddings"] == 2 and info["embeddings_bytes"] > 0
    cleared = chatcli("cache", "clear")
    assert cleared.returncode == 0 and "2 cached embeddings" in cleared.stderr
    assert json.loads(chatcli("cache", "info", "--json").stdout)["embeddings"] == 0


def test_similar_offers_to_pull_after_reading_stdin(chatcli):
    """stdin is read before the model is looked up: the lookup must still find stdin open (not a traceback)."""
    result = chatcli("similar", "-m", "smollm2", "install", input="a line\n")
    assert result.returncode == 1
    assert "chatcli pull smollm2" in result.stderr and "internal error" not in result.stderr


def test_a_damaged_cache_file_is_warned_about_and_the_vectors_still_come(chatcli, tiny_bert, home):
    cache = home / "cache" / "embeddings.db"
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_bytes(b"not a database" * 100)
    result = chatcli("similar", "-m", str(tiny_bert), "the cat", input="the cat\na dog\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].endswith("\tthe cat")
    assert "going on without the cache" in result.stderr
