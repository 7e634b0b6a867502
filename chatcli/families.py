"""Which family a GGUF model belongs to, from its header alone: what chatcli can do with it.

llama.cpp runs four families of language models, and each is used differently:

- decoder: a decoder-only transformer (llama, qwen, gpt2, ...): `complete`, `chat`; `embed` with mean pooling.
- embedding: an encoder (BERT and its kin) or a decoder trained to embed (its header names a pooling type):
  `embed`, `similar`, `serve`'s /v1/embeddings; not `complete` or `chat`.
- recurrent: Mamba, RWKV: a fixed-size state instead of a KV cache. `complete`, `chat`; a state cannot be cut
  back to a shorter prefix, so a snapshot is only restored at exactly the position where it was taken.
  Hybrids (Jamba, Falcon-H1, ...) carry such a state beside their attention layers, with the same rule.
- encoder-decoder: T5 / Flan-T5: the prompt is encoded once and the decoder writes the reply from the model's
  decoder-start token: `complete`; `chat` only where the model has a chat template.

Names follow llama.cpp's src/llama-arch.cpp.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

DECODER = "decoder"
EMBEDDING = "embedding"
RECURRENT = "recurrent"
ENCODER_DECODER = "encoder-decoder"

ENCODER_ARCHS = frozenset({
    "bert", "nomic-bert", "nomic-bert-moe", "neo-bert", "jina-bert-v2", "jina-bert-v3", "modern-bert",
    "t5encoder", "gemma-embedding",
})
RECURRENT_ARCHS = frozenset({"mamba", "mamba2", "rwkv6", "rwkv6qwen2", "rwkv7", "arwkv7"})
HYBRID_ARCHS = frozenset({"jamba", "falcon-h1", "granitehybrid", "lfm2", "lfm2moe", "nemotron_h", "plamo2",
                          "qwen3next"})
ENCODER_DECODER_ARCHS = frozenset({"t5"})

# llama.cpp's enum llama_pooling_type
POOLING_NONE, POOLING_MEAN, POOLING_CLS, POOLING_LAST, POOLING_RANK = 0, 1, 2, 3, 4
POOLING_NAMES = {POOLING_NONE: "none", POOLING_MEAN: "mean", POOLING_CLS: "cls", POOLING_LAST: "last",
                 POOLING_RANK: "rank"}

_DESCRIPTIONS = {
    DECODER: "decoder-only transformer: complete, chat",
    EMBEDDING: "embedding model: embed, similar",
    RECURRENT: "recurrent: complete, chat",
    ENCODER_DECODER: "encoder-decoder: complete",
}


class _Header(Protocol):
    @property
    def architecture(self) -> str | None: ...

    def arch_value(self, suffix: str) -> object | None: ...


@dataclass(frozen=True)
class Family:
    name: str  # DECODER, EMBEDDING, RECURRENT or ENCODER_DECODER
    architecture: str
    pooling: int | None  # the header's {arch}.pooling_type, when it names one
    hybrid: bool = False  # attention layers beside a recurrent state

    @property
    def generates(self) -> bool:
        """Can write text (complete, chat)."""
        return self.name != EMBEDDING

    @property
    def recurrent(self) -> bool:
        """Keeps a state that cannot be cut back to a shorter prefix (recurrent or hybrid)."""
        return self.name == RECURRENT

    @property
    def reranker(self) -> bool:
        return self.pooling == POOLING_RANK

    def describe(self) -> str:
        """One phrase for `show`: "recurrent (mamba): complete, chat"."""
        kind = "hybrid recurrent" if self.hybrid else self.name
        text = f"{kind} ({self.architecture}): {_DESCRIPTIONS[self.name].split(': ', 1)[1]}"
        if self.reranker:
            text = f"reranker ({self.architecture}): scores query-document pairs; chatcli does not run rerankers"
        return text


def family(info: _Header) -> Family:
    """The family of a model from its header (an unknown architecture is taken for a decoder)."""
    arch = info.architecture or "unknown"
    raw = info.arch_value("pooling_type")
    pooling = raw if isinstance(raw, int) and not isinstance(raw, bool) and raw in POOLING_NAMES else None
    if arch in ENCODER_DECODER_ARCHS:
        return Family(ENCODER_DECODER, arch, pooling)
    if arch in RECURRENT_ARCHS or arch in HYBRID_ARCHS:
        return Family(RECURRENT, arch, pooling, hybrid=arch in HYBRID_ARCHS)
    if arch in ENCODER_ARCHS or (pooling is not None and pooling != POOLING_NONE):
        return Family(EMBEDDING, arch, pooling)
    return Family(DECODER, arch, pooling)
