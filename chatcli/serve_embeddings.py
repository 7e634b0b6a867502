"""`POST /v1/embeddings` for `chatcli serve`: embedding models, in OpenAI's request and response shapes.

An embedding model (families.py) is served by an Embedder instead of a generating engine. Requests to one
model run one at a time (a llama.cpp context is not shared between threads), off the event loop.

Request: {"model", "input": str | [str, ...], "encoding_format": "float" | "base64", "dimensions"?}. The openai
SDK asks for base64 unless told otherwise (little-endian float32, which it decodes itself). Token-id inputs are
refused: send text. `dimensions` keeps the first N components, renormalised (how Matryoshka-trained models such
as nomic-embed are meant to be shortened); for other models it is the caller's choice.
"""

from __future__ import annotations

import base64
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from chatcli.embedding import Embedder, Vector
    from chatcli.registry import ModelRef

MAX_INPUTS = 2048  # OpenAI's own limit per request


class EmbeddingRequestError(ValueError):
    """The body is not a valid embeddings request: (message, param)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class ServedEmbedder:
    """An embedding model loaded at start: its public id, what it was resolved from, the embedder."""

    id: str
    ref: ModelRef
    embedder: Embedder
    created: int = field(default_factory=lambda: int(time.time()))
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def close(self) -> None:
        with self.lock:
            self.embedder.close()


@dataclass(frozen=True)
class EmbeddingsRequest:
    texts: list[str]
    base64: bool
    dimensions: int | None


def parse(body: dict[str, Any]) -> EmbeddingsRequest:
    raw = body.get("input")
    if isinstance(raw, str):
        texts = [raw]
    elif isinstance(raw, list) and raw and all(isinstance(t, str) for t in raw):
        texts = list(raw)
    elif isinstance(raw, list) and raw and all(isinstance(t, int | list) for t in raw):
        raise EmbeddingRequestError("token-id inputs are not accepted here: send the text", "input")
    else:
        raise EmbeddingRequestError("'input' must be a string or a non-empty array of strings", "input")
    if len(texts) > MAX_INPUTS:
        raise EmbeddingRequestError(f"at most {MAX_INPUTS} inputs per request, got {len(texts)}", "input")
    for i, text in enumerate(texts):
        if not text.strip():
            raise EmbeddingRequestError(f"input[{i}] is empty: there is nothing to embed", "input")
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise EmbeddingRequestError("'encoding_format' must be \"float\" or \"base64\"", "encoding_format")
    dimensions = body.get("dimensions")
    if dimensions is not None and (not isinstance(dimensions, int) or isinstance(dimensions, bool)
                                   or dimensions < 1):
        raise EmbeddingRequestError("'dimensions' must be a whole number of 1 or more", "dimensions")
    return EmbeddingsRequest(texts, encoding == "base64", dimensions)


def _shorten(vector: Vector, dimensions: int | None) -> Vector:
    if dimensions is None or dimensions >= len(vector):
        return vector
    head = vector[:dimensions]
    norm = math.sqrt(float((head * head).sum()))
    return head / norm if norm > 0 else head


def _encode(vector: Vector, as_base64: bool) -> str | list[float]:
    import numpy as np

    if as_base64:
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return [float(x) for x in vector]


def embed(model: ServedEmbedder, request: EmbeddingsRequest) -> dict[str, Any]:
    """The response body (runs on a worker thread: tokenising and llama.cpp take time)."""
    embedder = model.embedder
    if request.dimensions is not None and request.dimensions > embedder.width:
        raise EmbeddingRequestError(f"'dimensions' is {request.dimensions} but {model.id} gives "
                                    f"{embedder.width}-wide vectors", "dimensions")
    with model.lock:
        vectors = embedder.embed(request.texts)
        n_tokens = embedder.last_token_count
    data = [{"object": "embedding", "index": i,
             "embedding": _encode(_shorten(v, request.dimensions), request.base64)}
            for i, v in enumerate(vectors)]
    return {"object": "list", "data": data, "model": model.id,
            "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}


def served_ids(models: Sequence[ServedEmbedder]) -> str:
    return ", ".join(m.id for m in models)
