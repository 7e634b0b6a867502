"""Text files in a prompt: `-f PATH` on complete and chat, `/file PATH` in the REPL.

Each file goes in before the message, as a block between two lines that name it:

    --- file: notes.txt ---
    (the file's text)
    --- end of file: notes.txt ---

so the model can tell the files apart, and from the question after them, and the stored conversation shows
exactly what was sent. Only UTF-8 text is taken: a binary file or another encoding is refused in one line
rather than fed to the model as noise. A file that does not fit the context window is refused with its token
count (exit 3), or, with --truncate, cut to what fits (its end line then says so, and the caller is told).
Whether a prompt fits is asked of the same code that later refuses or fits it (completion, ChatSession), so the
two cannot disagree.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from chatcli.errors import ContextOverflowError, UsageError

if TYPE_CHECKING:
    from chatcli.completion import CompletionRequest
    from chatcli.conversation import ChatSession
    from chatcli.engine import Engine
    from chatcli.registry import ModelRef

MAX_BYTES = 16 * 1024 * 1024  # far beyond any context window: reading more would only fill memory


@dataclass(frozen=True)
class Attachment:
    name: str  # the path as the user typed it: what the model and the history see
    text: str
    cut: tuple[int, int] | None = None  # (tokens kept, tokens in the file) when --truncate cut it

    def block(self) -> str:
        body = self.text if not self.text or self.text.endswith("\n") else self.text + "\n"
        note = f" (cut: its first {self.cut[0]:,} of {self.cut[1]:,} tokens)" if self.cut else ""
        return f"--- file: {self.name} ---\n{body}--- end of file: {self.name}{note} ---"


def read(name: str, *, truncate: bool = False) -> Attachment:
    """A text file to attach; UsageError (one line) for what is not UTF-8 text."""
    path = Path(name).expanduser()
    try:
        with path.open("rb") as f:  # also a pipe: `-f <(git diff)`
            data = f.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise UsageError(f"cannot attach {name}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"cannot attach {name}: it is a folder (attach its files one by one)") from None
    except OSError as exc:
        raise UsageError(f"cannot attach {name}: {exc.strerror or exc}") from None
    too_big = len(data) > MAX_BYTES
    if too_big and not truncate:
        raise ContextOverflowError(f"{name} is over {MAX_BYTES // 2**20} MiB, far more than a context window holds: "
                                   "attach a part of it, or pass --truncate to keep its beginning")
    data = data[:MAX_BYTES]
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise UsageError(f"cannot attach {name}: it is UTF-16 text; convert it to UTF-8 first "
                         f"(iconv -f UTF-16 -t UTF-8 {name})")
    if b"\x00" in data:
        raise UsageError(f"cannot attach {name}: it is a binary file, not text")
    try:  # not final when cut: a character split at the cut is dropped, not an error
        text = codecs.getincrementaldecoder("utf-8")().decode(data, final=not too_big)
    except UnicodeDecodeError as exc:
        raise UsageError(f"cannot attach {name}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset "
                         f"{exc.start:,}); convert it first, e.g. iconv -f latin1 -t UTF-8") from None
    return Attachment(name=name, text=text.removeprefix("\ufeff"))


def read_all(names: Sequence[str], *, truncate: bool = False) -> list[Attachment]:
    return [read(name, truncate=truncate) for name in names]


def join(files: Sequence[Attachment], text: str | None) -> str:
    """The files' blocks, then the text, a blank line apart."""
    parts = [f.block() for f in files]
    if text and text.strip():
        parts.append(text)
    return "\n\n".join(parts)


def fit(files: Sequence[Attachment], fits: Callable[[list[Attachment]], bool], engine: Engine, *,
        truncate: bool) -> tuple[list[Attachment], list[str]]:
    """The files as they can go into the prompt, and what to tell the user about cutting them.

    `fits` says whether the prompt with those files fits the context. Without `truncate`, files that do not fit
    are a ContextOverflowError with the largest one's token count; with it, the files keep as many of their first
    tokens as fit (in order: a later file is cut or left out before an earlier one is).
    """
    files = list(files)
    if not files or fits(files):
        return files, []
    counts = [len(engine.tokenize(f.text, add_bos=False)) for f in files]
    whole = [f.cut[1] if f.cut else n for f, n in zip(files, counts, strict=True)]  # a file cut before: all of it
    if not truncate:
        i = max(range(len(files)), key=counts.__getitem__)
        others = f" (with {len(files) - 1} more file(s))" if len(files) > 1 else ""
        raise ContextOverflowError(
            f"{files[i].name} is {counts[i]:,} tokens{others}: that does not fit the context window "
            f"({engine.n_ctx:,} tokens, less room for the reply); attach less, raise --ctx-size, or pass --truncate "
            "to cut it"
        )
    tokens = [engine.tokenize(f.text, add_bos=False)[: engine.n_ctx] for f in files]  # no file keeps more

    def keep(budget: int) -> list[Attachment | None]:  # one per file: None for a file left out
        kept: list[Attachment | None] = []
        for file, toks, count, total in zip(files, tokens, counts, whole, strict=True):
            take = min(len(toks), budget)
            budget -= take
            if take == count:
                kept.append(file)
            elif take:
                text = engine.detokenize(toks[:take]).rstrip("\ufffd")  # a character cut in two
                kept.append(Attachment(name=file.name, text=text, cut=(take, total)))
            else:
                kept.append(None)
        return kept

    def fits_kept(budget: int) -> bool:
        return fits([f for f in keep(budget) if f is not None])

    low, high = 0, sum(len(t) for t in tokens)  # invariant: fits_kept(low), once keep(0) is known to fit
    if fits_kept(0):
        while low < high:
            middle = (low + high + 1) // 2
            if fits_kept(middle):
                low = middle
            else:
                high = middle - 1
    notes = []
    for file, total, now in zip(files, whole, keep(low), strict=True):
        if now is None:
            notes.append(f"{file.name} ({total:,} tokens) left out: no room for it in the context window (--truncate)")
        elif now.cut is not None:
            notes.append(f"{file.name} cut to its first {now.cut[0]:,} of {total:,} tokens to fit the context window "
                         "(--truncate)")
    return [f for f in keep(low) if f is not None], notes


# ---------------------------------------------------------------- the two places a prompt is built


def fit_completion(engine: Engine, ref: ModelRef, request: CompletionRequest, files: Sequence[Attachment],
                   rest: str, *, truncate: bool) -> tuple[list[Attachment], list[str]]:
    """`complete -f`: the prompt is the files, then `rest` (TEXT and stdin), rendered as completion.run does."""
    from chatcli.completion import render_prompt, reply_reserve
    from chatcli.prompting import wants_bos

    limit = engine.n_ctx - max(1, reply_reserve(engine.n_ctx, request.options))

    def fits(chosen: list[Attachment]) -> bool:
        text, _ = render_prompt(engine, ref, replace(request, prompt=join(chosen, rest)), lambda message: None)
        return len(engine.tokenize(text, add_bos=wants_bos(engine, text))) <= limit

    return fit(files, fits, engine, truncate=truncate)


def fit_message(session: ChatSession, files: Sequence[Attachment], text: str, *,
                truncate: bool) -> tuple[list[Attachment], list[str]]:
    """`chat -f`, `/file`: whether the message with these files fits even alone (older turns can be left out)."""
    from chatcli.engine import TextEngine

    engine = session.engine
    if isinstance(engine, TextEngine):  # a remote server tokenizes and judges for itself
        return list(files), []

    def fits(chosen: list[Attachment]) -> bool:
        message = join(chosen, text)
        if session.transform is not None:
            message = session.transform(message)
        alone = replace(session, messages=[{"role": "user", "content": message}], history=None, snapshots=None)
        try:
            alone.fit()
        except ContextOverflowError:
            return False
        return True

    return fit(files, fits, engine, truncate=truncate)


def describe(files: Sequence[Attachment], engine: object) -> str:
    """`README.md (1,234 tokens)`: what was attached, counted by the model's tokenizer when there is one."""
    from chatcli.engine import TextEngine

    out = []
    for file in files:
        if isinstance(engine, TextEngine) or not hasattr(engine, "tokenize"):
            size = f"{len(file.text.encode()):,} bytes"
        else:
            size = f"{len(engine.tokenize(file.text, add_bos=False)):,} tokens"
        out.append(f"{file.name} ({size})")
    return ", ".join(out)
