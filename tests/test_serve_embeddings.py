"""`chatcli serve`'s POST /v1/embeddings: a real server in a subprocess, a tiny real BERT, the official openai SDK."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import openai
import pytest
from ggufgen_bert import make_bert
from test_serve import ServerProcess, _env, start_server, stop_server

BERT = "tiny-bert.gguf"
TINY = "tiny-llama.gguf"


@pytest.fixture(scope="module")
def bert(models_dir: Path) -> Path:
    return make_bert(models_dir / BERT, n_ctx=128)


@pytest.fixture(scope="module")
def server(tiny_llama: Path, bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    env = _env(tmp_path_factory.mktemp("serve-embeddings-home"))
    process = start_server(["-m", str(tiny_llama), "-m", str(bert), "--threads", "1"], env)
    yield process
    stop_server(process)


def test_the_openai_sdk_gets_unit_vectors_of_the_models_width(server: ServerProcess) -> None:
    client = server.client()
    texts = ["hello world", "the cat sat on the mat", "hello world"]
    response = client.embeddings.create(model=BERT, input=texts)  # the SDK asks for base64 and decodes it
    vectors = [np.array(d.embedding) for d in sorted(response.data, key=lambda d: d.index)]
    assert [len(v) for v in vectors] == [64, 64, 64]
    assert all(abs(np.linalg.norm(v) - 1) < 1e-5 for v in vectors)
    assert np.array_equal(vectors[0], vectors[2]) and not np.allclose(vectors[0], vectors[1])
    assert response.model == BERT and response.usage.prompt_tokens > 0
    floats = client.embeddings.create(model=BERT, input="hello world", encoding_format="float")
    assert np.allclose(floats.data[0].embedding, vectors[0], atol=1e-6)


def test_the_vectors_are_those_chatcli_embed_prints(server: ServerProcess, bert: Path, chatcli) -> None:
    served = server.client().embeddings.create(model=BERT, input="the dog and the cat", encoding_format="float")
    local = chatcli("embed", "-m", str(bert), "the dog and the cat")
    assert local.returncode == 0, local.stderr
    assert np.allclose(json.loads(local.stdout)["embedding"], served.data[0].embedding, atol=1e-5)


def test_dimensions_keeps_the_first_components_renormalised(server: ServerProcess) -> None:
    client = server.client()
    full = np.array(client.embeddings.create(model=BERT, input="hello", encoding_format="float").data[0].embedding)
    short = np.array(client.embeddings.create(model=BERT, input="hello", encoding_format="float",
                                              dimensions=16).data[0].embedding)
    assert len(short) == 16 and abs(np.linalg.norm(short) - 1) < 1e-5
    assert np.allclose(short, full[:16] / np.linalg.norm(full[:16]), atol=1e-6)


def test_both_kinds_of_model_are_listed_and_each_refuses_the_others_endpoint(server: ServerProcess) -> None:
    client = server.client()
    assert {m.id for m in client.models.list()} == {TINY, BERT}
    with pytest.raises(openai.BadRequestError) as chat:
        client.chat.completions.create(model=BERT, messages=[{"role": "user", "content": "hi"}])
    assert chat.value.code == "model_not_supported" and "embedding model" in chat.value.message
    with pytest.raises(openai.BadRequestError) as embed:
        client.embeddings.create(model=TINY, input="hi")
    assert embed.value.code == "model_not_supported" and "not an embedding model" in embed.value.message


@pytest.mark.parametrize(("body", "param"), [
    ({"model": BERT, "input": ""}, "input"),
    ({"model": BERT, "input": []}, "input"),
    ({"model": BERT, "input": [1, 2, 3]}, "input"),
    ({"model": BERT, "input": "hi", "encoding_format": "int8"}, "encoding_format"),
    ({"model": BERT, "input": "hi", "dimensions": 0}, "dimensions"),
    ({"model": BERT, "input": "hi", "dimensions": 65}, "dimensions"),
    ({"model": BERT, "input": " ".join(["hello"] * 400)}, "input"),
])
def test_bad_requests_are_400_in_openai_shape(server: ServerProcess, body: dict[str, object], param: str) -> None:
    status, _, raw = server.raw("POST", "/v1/embeddings", json.dumps(body).encode())
    assert status == 400, raw
    error = json.loads(raw)["error"]
    assert error["param"] == param and error["message"]
    # and the model still answers
    assert server.client().embeddings.create(model=BERT, input="still here").data
