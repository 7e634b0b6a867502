"""Text to vectors: a GGUF model opened for embeddings in llama.cpp (llama-cpp-python, imported lazily).

An embedding model (BERT and kin, or a decoder trained to embed) is pooled as its header says. A plain
decoder (SmolLM2, Llama, ...) still gives vectors, mean-pooled over its hidden states; `pooled_decoder` tells
the caller so, because a dedicated embedding model ranks far better. Recurrent and encoder-decoder models
cannot be pooled this way and are refused before anything loads.

Many texts go into one llama_decode: one sequence id per text, each from position 0, up to BATCH_TOKENS tokens
and the context's n_seq_max sequences per call (llama-cpp-python sizes n_seq_max and a unified KV buffer when
it opens a model with embedding=True). llama.cpp pools each sequence separately, so a batch gives the same
vectors as one text per call. A text must fit one ubatch whole (an encoder aborts otherwise, and a decoder's
pooling would see only its last part), so a text longer than `max_tokens` is an error (ContextOverflowError,
exit 3) unless the caller asks to truncate it.

The header is read and checked (gguf_info, gguf_checks, header_cache) when the Embedder is made; the weights
load on the first `embed` call, so a caller whose vectors are all cached (embed_cache) never loads them.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chatcli.errors import ContextOverflowError, GGUFError, ModelLoadError, UsageError
from chatcli.families import (
    DECODER,
    EMBEDDING,
    ENCODER_DECODER,
    POOLING_CLS,
    POOLING_LAST,
    POOLING_MEAN,
    POOLING_NAMES,
    Family,
    family,
)

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from chatcli.gguf_info import GGUFInfo

    Vector = npt.NDArray[np.float32]

BATCH_TOKENS = 512  # tokens per llama_decode: more makes the attention of an encoder batch grow as its square
DEFAULT_MAX_TOKENS = 2048  # per text, for a model trained on longer ones (and no --ctx-size)
DECODER_MAX_TOKENS = 512  # a decoder is the fallback: a longer window costs KV memory for nothing
POOLED = (POOLING_MEAN, POOLING_CLS, POOLING_LAST)


class TextTooLong(ContextOverflowError):
    """One text has more tokens than the model reads at once; `index` is its place in the texts given."""

    def __init__(self, message: str, *, index: int, n_tokens: int, limit: int) -> None:
        super().__init__(message)
        self.index, self.n_tokens, self.limit = index, n_tokens, limit


def normalize(vector: Vector) -> Vector:
    """Scaled to unit length (L2); a zero vector stays zero."""
    import numpy as np

    norm = float(np.linalg.norm(vector))
    return vector / np.float32(norm) if norm > 0 else vector


def _normalize_all(vectors: Sequence[Vector]) -> list[Vector]:
    """normalize() of each, as one matrix operation (what Embedder.embed calls: its argument hides the name)."""
    import numpy as np

    if not vectors:
        return []
    matrix = np.stack(vectors)
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return list(matrix / np.where(norms > 0, norms, 1).astype(np.float32))


def cosine_scores(query: Vector, vectors: Sequence[Vector]) -> list[float]:
    """Cosine similarity of each vector to the query (vectors need not be normalised)."""
    import numpy as np

    if not vectors:
        return []
    matrix = np.stack(vectors).astype(np.float32)
    norms = np.linalg.norm(matrix, axis=1)
    q = normalize(query.astype(np.float32))
    scores = (matrix @ q) / np.where(norms > 0, norms, 1.0)
    return [float(s) for s in scores]


def _embedding_width(info: GGUFInfo) -> int | None:
    """The width of a pooled vector, from the header (embedding_length_out where a model has one)."""
    for suffix in ("embedding_length_out", "embedding_length"):
        value = info.arch_value(suffix)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


class Embedder:
    """A model opened for embeddings; the header is checked now, the weights load on first use."""

    def __init__(
        self,
        path: Path,
        *,
        ctx_size: int | None = None,
        default_ctx: int | None = None,
        threads: int | None = None,
        gpu_layers: str | int = "auto",
        flash_attn: bool = True,
        verbose: bool = False,
        batch_tokens: int = BATCH_TOKENS,
    ) -> None:
        from chatcli.engine import checked_header

        self.path = Path(path)
        info = checked_header(self.path)
        if ctx_size is not None and ctx_size < 16:
            raise UsageError("invalid value for --ctx-size: must be 16 or more")
        self.info = info
        self.family: Family = family(info)
        self.pooling = self._choose_pooling(self.family)
        # a decoder pooled by us, not trained to embed: the caller says that its vectors are a stand-in
        self.pooled_decoder = self.family.name == DECODER
        width = _embedding_width(info)
        if width is None:
            raise GGUFError(f"{self.path}: no {info.architecture}.embedding_length in the GGUF header")
        self.width = width
        trained = info.context_length or None
        # Without --ctx-size: the catalogue's context for an embedding model, capped (the ubatch's attention grows
        # as the square of this); a decoder's catalogue context is a chat window and is not used.
        fallback = DECODER_MAX_TOKENS if self.pooled_decoder else DEFAULT_MAX_TOKENS
        limit = ctx_size or (fallback if self.pooled_decoder else min(default_ctx or fallback, fallback))
        self.max_tokens = max(16, min(limit, trained) if trained else limit)
        self.batch_tokens = batch_tokens  # texts are packed into one llama_decode up to this many tokens
        self._ubatch = max(self.max_tokens, batch_tokens)  # the most one llama_decode can take: the longest text
        self.threads = threads
        self.gpu_layers = gpu_layers
        self.flash_attn = flash_attn
        self.verbose = verbose
        self.load_seconds = 0.0
        self.last_token_count = 0  # tokens the last embed() read, over all its texts (usage, for serve)
        self._llm: Any = None
        self._share: Any = None
        self._threads_now = 0
        self._identity: str | None = None

    @staticmethod
    def _choose_pooling(fam: Family) -> int:
        name = fam.name
        if name == ENCODER_DECODER:
            raise UsageError(f"{fam.architecture} is an encoder-decoder model (T5-style): chatcli cannot take "
                             "embeddings from it; use an embedding model (e.g. -m all-minilm)")
        if fam.recurrent:
            raise UsageError(f"{fam.architecture} is a recurrent model (Mamba/RWKV-style): it has no per-token "
                             "states to pool into an embedding; use an embedding model (e.g. -m all-minilm)")
        if fam.reranker:
            raise UsageError(f"{fam.architecture} here is a reranker (pooling 'rank'): it scores query-document "
                             "pairs and gives no embeddings; use an embedding model (e.g. -m all-minilm)")
        if name == EMBEDDING and fam.pooling in POOLED:
            assert fam.pooling is not None
            return fam.pooling
        return POOLING_MEAN  # a decoder, or an encoder whose header names no pooling

    @property
    def pooling_name(self) -> str:
        return POOLING_NAMES[self.pooling]

    @property
    def identity(self) -> str:
        """What cached vectors are keyed by: the model file's identity (snapshots.model_identity)."""
        if self._identity is None:
            from chatcli.snapshots import model_identity

            self._identity = model_identity(self.path)
        return self._identity

    # -------------------------------------------------------- loading

    def load(self) -> None:
        """Load the weights (once)."""
        if self._llm is not None:
            return
        import llama_cpp

        from chatcli.engine import _core_share, load_llama, physical_cores, resolve_gpu_layers
        from chatcli.gguf_checks import available_memory, check_fits

        gpu_layers = resolve_gpu_layers(self.gpu_layers)
        memory = available_memory() if gpu_layers == 0 else None
        if memory is not None:
            check_fits(self.info, n_ctx=self._ubatch, memory=memory)
        n_threads = self.threads or physical_cores()
        started = time.perf_counter()
        llm = load_llama(
            self.path,
            verbose=self.verbose,
            label=f"{self.path.name} ({self.info.architecture})",
            embedding=True,
            pooling_type=self.pooling,
            n_ctx=self._ubatch,  # a decoder's KV cache holds one batch; an encoder keeps none
            n_batch=self._ubatch,
            n_ubatch=self._ubatch,
            n_threads=n_threads,
            n_threads_batch=n_threads,
            n_gpu_layers=gpu_layers,
            use_mmap=True,
            flash_attn=self.flash_attn,
        )
        self.load_seconds = time.perf_counter() - started
        width = int(llama_cpp.llama_model_n_embd_out(llm._model.model)) if hasattr(
            llama_cpp, "llama_model_n_embd_out") else int(llm.n_embd())
        if width != self.width:
            llm.close()
            raise ModelLoadError(f"{self.path.name}: llama.cpp gives {width}-wide vectors where the header says "
                                 f"{self.width}; the file may be damaged")
        self._llm = llm
        self._vocab = llm._model.vocab
        self._n_seq_max = max(1, int(llama_cpp.llama_n_seq_max(llm._ctx.ctx)))
        self._add_sep = bool(llama_cpp.llama_vocab_get_add_sep(self._vocab)) or bool(
            llama_cpp.llama_vocab_get_add_eos(self._vocab))
        self._threads_now = n_threads
        self._share = None if self.threads else _core_share(n_threads)

    @property
    def loaded(self) -> bool:
        return self._llm is not None

    def close(self) -> None:
        if self._llm is not None:
            self._llm.close()
            self._llm = None

    def __enter__(self) -> Embedder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------- tokens

    def tokenize(self, text: str) -> list[int]:
        """The tokens llama.cpp reads for `text`, with the model's own specials ([CLS] ... [SEP], BOS)."""
        self.load()
        # special=False: text that spells "[SEP]" or "<|endoftext|>" is text, not a control token
        return list(self._llm.tokenize(text.encode("utf-8"), add_bos=True, special=False))

    def _fit(self, tokens: list[int], index: int, text: str, truncate: bool) -> list[int]:
        if len(tokens) <= self.max_tokens:
            return tokens
        if truncate:  # keep the start, and the closing [SEP]/EOS the model was trained to see
            return [*tokens[: self.max_tokens - 1], tokens[-1]] if self._add_sep else tokens[: self.max_tokens]
        trained = self.info.context_length
        room = f" (the model was trained on up to {trained})" if trained and trained > self.max_tokens else ""
        start = " ".join(text.split())[:40]
        raise TextTooLong(
            f"a text is {len(tokens)} tokens but {self.path.name} reads at most {self.max_tokens} at once{room}: "
            f"\"{start}…\"; shorten it, raise --ctx-size, or pass --truncate to cut it",
            index=index, n_tokens=len(tokens), limit=self.max_tokens)

    # -------------------------------------------------------- embeddings

    def embed(self, texts: Sequence[str], *, normalize: bool = True, truncate: bool = False) -> list[Vector]:
        """One float32 vector of width `width` per text, in order; unit length (L2) unless normalize=False.

        An empty text is a UsageError (it holds nothing to embed: callers skip blank lines). A text longer than
        `max_tokens` raises TextTooLong (exit 3), or is cut to fit with truncate=True.
        """
        if not texts:
            return []
        self.load()
        token_lists: list[list[int]] = []
        for i, text in enumerate(texts):
            if not text or not text.strip():
                raise UsageError("cannot embed an empty text")
            token_lists.append(self._fit(self.tokenize(text), i, text, truncate))
        self.last_token_count = sum(len(tokens) for tokens in token_lists)
        vectors: list[Vector] = []
        sharing = self._share.generating() if self._share is not None else nullcontext(None)
        with sharing as share:
            batch: list[list[int]] = []
            used = 0
            for tokens in token_lists:
                if batch and (used + len(tokens) > self.batch_tokens or len(batch) >= self._n_seq_max):
                    self._use_threads(share)
                    vectors.extend(self._decode(batch))
                    batch, used = [], 0
                batch.append(tokens)
                used += len(tokens)
            if batch:
                self._use_threads(share)
                vectors.extend(self._decode(batch))
        if normalize:
            vectors = _normalize_all(vectors)
        return vectors

    def _use_threads(self, share: Any) -> None:
        if share is None:
            return
        n = share.threads(force=True)
        if n != self._threads_now:
            import llama_cpp

            llama_cpp.llama_set_n_threads(self._llm._ctx.ctx, n, n)
            self._threads_now = n

    def _decode(self, batch: list[list[int]]) -> list[Vector]:
        """One llama_decode of several sequences (seq id i, positions from 0); their pooled vectors.

        The batch's arrays are filled in bulk (numpy, memmove) rather than field by field per token, and the
        pooled vectors are copied into one matrix: at ~15 tokens a line, Python's share of a batched call
        was a third of its time.
        """
        import llama_cpp
        import numpy as np

        from chatcli.engine import _keep_llama_log, _quiet_fds, llama_error_reason

        llm = self._llm
        raw = llm._batch.batch
        lengths = [len(tokens) for tokens in batch]
        n = sum(lengths)
        tokens = np.fromiter((t for seq in batch for t in seq), dtype=np.int32, count=n)
        positions = np.concatenate([np.arange(k, dtype=np.int32) for k in lengths])
        ones32, ones8 = np.ones(n, dtype=np.int32), np.ones(n, dtype=np.int8)  # one seq id each; all outputs
        ctypes.memmove(raw.token, tokens.ctypes.data, 4 * n)
        ctypes.memmove(raw.pos, positions.ctypes.data, 4 * n)
        ctypes.memmove(raw.n_seq_id, ones32.ctypes.data, 4 * n)
        ctypes.memmove(raw.logits, ones8.ctypes.data, n)  # every token an output: llama.cpp pools over them
        seq_ids, j = raw.seq_id, 0
        for seq, k in enumerate(lengths):
            for _ in range(k):
                seq_ids[j][0] = seq
                j += 1
        raw.n_tokens = n
        llm._ctx.kv_cache_clear()  # a decoder's cache: each batch starts empty (an encoder has none)
        with _keep_llama_log(self.verbose) as errors, _quiet_fds(self.verbose):
            code = llama_cpp.llama_decode(llm._ctx.ctx, raw)
        raw.n_tokens = 0
        if code != 0:
            reason = llama_error_reason(errors) or f"llama_decode returned {code}"
            raise ModelLoadError(f"llama.cpp could not embed with {self.path.name}: {reason}")
        out = np.empty((len(batch), self.width), dtype=np.float32)  # a copy: the next decode overwrites them
        row_bytes = 4 * self.width
        for seq in range(len(batch)):
            ptr = llama_cpp.llama_get_embeddings_seq(llm._ctx.ctx, seq)
            if not ptr:
                raise ModelLoadError(f"llama.cpp gave no pooled embedding for {self.path.name}")
            ctypes.memmove(out.ctypes.data + seq * row_bytes, ptr, row_bytes)
        if not np.isfinite(out).all():
            raise ModelLoadError(f"{self.path.name} gave an embedding that is not finite (NaN or inf); the "
                                 "file may be damaged")
        return list(out)

