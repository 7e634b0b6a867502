"""Which GGUF file(s) of a repo to use: quant choice and split-file grouping (pure functions, no I/O)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from chatcli.errors import UsageError
from chatcli.gguf_info import QUANT_BITS, quant_from_filename

PREFERRED = "Q4_K_M"
SPLIT_RE = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)


@dataclass(frozen=True)
class Candidate:
    """One model in a repo: a single .gguf file, or every part of a split one."""

    files: tuple[str, ...]
    quant: str | None

    @property
    def name(self) -> str:
        return self.files[0]


def group_files(names: list[str]) -> list[Candidate]:
    """GGUF files of a repo as models; split parts grouped, vision projectors (mmproj) left out."""
    groups: dict[str, list[str]] = {}
    for name in names:
        base = name.rsplit("/", 1)[-1].lower()
        if not base.endswith(".gguf") or "mmproj" in base:
            continue
        key = SPLIT_RE.sub(".gguf", name)
        groups.setdefault(key, []).append(name)
    out = []
    for key, files in sorted(groups.items()):
        files.sort()
        out.append(Candidate(files=tuple(files), quant=quant_from_filename(key.rsplit("/", 1)[-1])))
    return out


def _bits(quant: str | None) -> float | None:
    return QUANT_BITS.get(quant) if quant else None


def choose(candidates: list[Candidate], *, quant: str | None, default_quant: str | None, where: str) -> Candidate:
    """Pick the model to use. Named quant, else the default, else Q4_K_M, else the closest larger, else the only one."""
    if not candidates:
        raise UsageError(f"{where} has no GGUF files")
    available = sorted({c.quant for c in candidates if c.quant}, key=lambda q: (_bits(q) or 99, q))
    if quant:
        for c in candidates:
            if c.quant == quant.upper():
                return c
        listing = ", ".join(available) or "none recognised"
        raise UsageError(f"{where} has no {quant.upper()} file; available quants: {listing}")
    for wanted in (default_quant, PREFERRED):
        for c in candidates:
            if wanted and c.quant == wanted.upper():
                return c
    if len(candidates) == 1:
        return candidates[0]
    target = QUANT_BITS[PREFERRED]
    known = [c for c in candidates if _bits(c.quant) is not None]
    larger = [c for c in known if (_bits(c.quant) or 0) > target]
    if larger:
        return min(larger, key=lambda c: _bits(c.quant) or 0)
    if known:
        return max(known, key=lambda c: _bits(c.quant) or 0)
    names = ", ".join(c.name for c in candidates[:6])
    raise UsageError(f"{where} has several GGUF files and no recognisable quant; name one: {names}")
