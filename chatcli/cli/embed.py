"""Commands that turn text into vectors: embed, similar (registered on the `cli` group)."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, TextIO

import click

from chatcli.cli.common import stdin_lines
from chatcli.cli.run import _load_options, model_options

if TYPE_CHECKING:
    from chatcli.embed_cache import EmbeddingCache
    from chatcli.embedding import Embedder, Vector
    from chatcli.registry import ModelRef

CHUNK_TEXTS = 1024  # `embed` reads, embeds and writes stdin this many lines at a time
DECODER_NOTE = ("note: {name} is a text-generation model, not an embedding model: its vectors are its hidden states "
                "averaged (mean pooling) and rank worse than a dedicated embedding model's (e.g. -m all-minilm)")


# ---------------------------------------------------------------- the model


def _embedding_ref(model: str | None) -> ModelRef:
    """-m, else the catalogue's default_embedding_model, else the default model."""
    from chatcli import loading
    from chatcli.registry import load_catalogue

    if model is None:
        model = load_catalogue().default_embedding_model
    return loading.resolve(model)


def _open_embedder(model: str | None, pull: bool, ctx_size: int | None, threads: int | None,
                   gpu_layers: str | None, flash_attn: bool | None, verbose: bool) -> tuple[ModelRef, Embedder]:
    """The model -m names (or the default embedding model), present on disk (pulled when allowed), header checked.

    The weights load when the first vector is computed: a run whose vectors are all cached never loads them.
    """
    from chatcli import loading
    from chatcli.cli import console
    from chatcli.cli.run import _present
    from chatcli.errors import UsageError

    # config's ctx_size is a chat window: only an explicit -c sets the longest text here
    load_options = _load_options(ctx_size, threads, gpu_layers, flash_attn, verbose)
    ref = _embedding_ref(model)
    if ref.kind == "remote":
        raise UsageError(f"{ref.display} is a remote model: embed and similar run models here; use a local "
                         "embedding model (e.g. -m all-minilm)")

    path = _present(ref, pull)
    embedder = loading.open_embedder(ref, path, load_options, ctx_size=ctx_size)
    if embedder.pooled_decoder:
        console.info(DECODER_NOTE.format(name=ref.display if ref.kind != "local" else path.name))
    return ref, embedder


def _report_load(embedder: Embedder, verbose: bool) -> None:
    if verbose and embedder.loaded:
        from chatcli.cli import console

        console.info(f"loaded {embedder.path.name} in {embedder.load_seconds:.2f}s: {embedder.width} dims, "
                     f"{embedder.pooling_name} pooling, up to {embedder.max_tokens} tokens per text")


def _cache(enabled: bool) -> EmbeddingCache | None:
    if not enabled:
        return None
    from chatcli.cli import console
    from chatcli.embed_cache import EmbedCacheError, EmbeddingCache

    try:
        return EmbeddingCache()
    except EmbedCacheError as exc:  # a cache: the vectors are computed without it
        console.warn(f"{exc} (going on without the cache)")
        return None


# ---------------------------------------------------------------- input


@dataclass(frozen=True)
class Chunk:
    text: str
    source: str  # a file name, or "-" for stdin
    line: int  # 1-based: the line, or a paragraph's first line


def _lines(stream: Iterable[str], source: str) -> Iterator[Chunk]:
    """One chunk per line that holds more than whitespace (a blank line has nothing to embed)."""
    for number, line in enumerate(stream, 1):
        text = line.rstrip("\r\n")
        if text.strip():
            yield Chunk(text, source, number)


def _paragraphs(stream: Iterable[str], source: str) -> Iterator[Chunk]:
    """One chunk per run of non-blank lines, joined with newlines."""
    lines: list[str] = []
    first = 0
    for number, line in enumerate(stream, 1):
        text = line.rstrip("\r\n")
        if text.strip():
            if not lines:
                first = number
            lines.append(text)
        elif lines:
            yield Chunk("\n".join(lines), source, first)
            lines = []
    if lines:
        yield Chunk("\n".join(lines), source, first)


def _read_chunks(files: tuple[str, ...], paragraphs: bool) -> list[Chunk]:
    from chatcli.errors import UsageError

    split = _paragraphs if paragraphs else _lines
    if not files:
        stdin = stdin_lines()
        if stdin is None:
            raise UsageError("nothing to rank: pipe lines into `chatcli similar`, or give files with -f")
        return list(split(stdin, "-"))
    chunks: list[Chunk] = []
    for name in files:
        if name == "-":
            stdin = stdin_lines()
            chunks.extend(split(stdin, "-") if stdin is not None else ())
            continue
        try:
            with open(name, encoding="utf-8", errors="strict", newline=None) as f:
                chunks.extend(split(f, name))
        except UnicodeDecodeError:
            raise UsageError(f"invalid value for -f: {name} is not UTF-8 text") from None
        except OSError as exc:
            raise UsageError(f"invalid value for -f: cannot read {name}: {exc.strerror or exc}") from None
    return chunks


def _batches(chunks: Iterable[Chunk], size: int) -> Iterator[list[Chunk]]:
    batch: list[Chunk] = []
    for chunk in chunks:
        batch.append(chunk)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


# ---------------------------------------------------------------- output


def _numbers(vector: Vector) -> str:
    """The vector's values, comma-separated; 9 significant digits give each float32 back exactly."""
    return ",".join(f"{x:.9g}" for x in vector.tolist())


def _tsv_text(text: str) -> str:
    """A text as one TSV field: backslash, tab, newline and carriage return escaped as \\\\, \\t, \\n, \\r."""
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


class _Writer:
    """Writes embeddings to stdout as they come: jsonl (one object a line), json (one array) or tsv."""

    def __init__(self, fmt: str, out: TextIO) -> None:
        self.fmt, self.out, self.count = fmt, out, 0

    def write(self, text: str, vector: Vector) -> None:
        if self.fmt == "tsv":
            line = _tsv_text(text) + "\t" + _numbers(vector).replace(",", "\t")
        else:
            line = f'{{"text": {json.dumps(text, ensure_ascii=False)}, "embedding": [{_numbers(vector)}]}}'
            if self.fmt == "json":
                line = ("[\n" if self.count == 0 else ",\n") + line
        self.out.write(line if self.fmt == "json" else line + "\n")
        self.count += 1

    def flush(self) -> None:
        self.out.flush()

    def close(self) -> None:
        if self.fmt == "json":
            self.out.write("[]\n" if self.count == 0 else "\n]\n")
        self.out.flush()


def _overflow(exc: Exception, where: str) -> Exception:
    """A TextTooLong from the library, named by where the text came from."""
    from chatcli.errors import ContextOverflowError

    return ContextOverflowError(f"{where}: {exc}")


# ---------------------------------------------------------------- commands


@click.command()
@click.argument("text", required=False)
@model_options(default="the catalogue's default_embedding_model, all-minilm",
               ctx_help="Longest text read at once, in tokens (default: the model's, capped at 2048).")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "json", "tsv"]), default="jsonl", show_default=True,
              help="jsonl: {\"text\", \"embedding\"} per line; json: one array of them; tsv: text, then the values.")
@click.option("--normalize/--no-normalize", default=True, show_default=True,
              help="Scale each vector to unit length (L2), so a dot product is the cosine similarity.")
@click.option("--truncate", is_flag=True, help="Cut a text longer than the model reads at once (-c, default: the "
              "model's) instead of failing with exit code 3.")
@click.option("--cache/--no-cache", "use_cache", default=True, show_default=True,
              help="Reuse vectors computed before for the same model and text (in the user cache dir).")
def embed(text, model, pull, ctx_size, threads, gpu_layers, flash_attn, verbose, fmt, normalize, truncate,
          use_cache) -> None:  # noqa: ANN001
    """Print the embedding (a vector) of TEXT, or of each line of stdin.

    \b
    Blank lines are skipped: they hold nothing to embed (each record carries its text).
    Without -m, the catalogue's default embedding model is used (`chatcli list --available`).
      chatcli embed "The quick brown fox"
      cat notes.txt | chatcli embed --format tsv > vectors.tsv
    """
    from chatcli.embed_cache import embed_cached
    from chatcli.embedding import TextTooLong
    from chatcli.errors import UsageError

    if text is not None:
        if not text.strip():
            raise UsageError("nothing to embed: TEXT is empty")
        chunks: Iterable[Chunk] = [Chunk(text, "TEXT", 1)]
    else:
        stdin = stdin_lines()
        if stdin is None:
            raise UsageError("nothing to embed: give TEXT, or pipe lines on stdin")
        chunks = _lines(stdin, "-")
    _ref, embedder = _open_embedder(model, pull, ctx_size, threads, gpu_layers, flash_attn, verbose)
    cache = _cache(use_cache)
    writer = _Writer(fmt, sys.stdout)
    try:
        for batch in _batches(chunks, CHUNK_TEXTS):
            try:
                vectors = embed_cached(embedder, [c.text for c in batch], cache, normalize=normalize,
                                       truncate=truncate)
            except TextTooLong as exc:
                where = "TEXT" if text is not None else f"line {batch[exc.index].line} of stdin"
                raise _overflow(exc, where) from None
            for chunk, vector in zip(batch, vectors, strict=True):
                writer.write(chunk.text, vector)
            writer.flush()
        writer.close()
    finally:
        if cache is not None:
            cache.close()
        _report_load(embedder, verbose)
        embedder.close()


@click.command()
@click.argument("query")
@model_options(default="the catalogue's default_embedding_model, all-minilm",
               ctx_help="Longest text read at once, in tokens (default: the model's, capped at 2048).")
@click.option("-f", "--file", "files", multiple=True, metavar="PATH",
              help="Rank the lines (or paragraphs) of this file instead of stdin (repeatable; - is stdin).")
@click.option("-k", "--top", "top_k", type=click.IntRange(min=0), default=10, show_default=True,
              help="Show the K best (0: all).")
@click.option("--paragraphs", is_flag=True, help="Rank paragraphs (runs of lines between blank lines), not lines.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON array: score, text, source, line.")
@click.option("--truncate", is_flag=True, help="Cut a line or paragraph longer than the model reads at once "
              "instead of failing with exit code 3.")
@click.option("--cache/--no-cache", "use_cache", default=True, show_default=True,
              help="Reuse vectors computed before for the same model and text (in the user cache dir).")
def similar(query, model, pull, ctx_size, threads, gpu_layers, flash_attn, verbose, files, top_k, paragraphs,
            as_json, truncate, use_cache) -> None:  # noqa: ANN001
    """Rank the lines of stdin (or of -f files) by how similar their meaning is to QUERY.

    \b
    Prints `score<TAB>line`, best first (cosine similarity of the embeddings, -1..1). Blank lines are
    skipped. Vectors are cached: ranking the same lines again does not run the model.
      grep -h . notes/*.md | chatcli similar "deadline for the report" -k 5
      chatcli similar "how do I reset it" -f faq.txt --paragraphs --json
    """
    from chatcli.cli import console
    from chatcli.embed_cache import embed_cached
    from chatcli.embedding import TextTooLong, cosine_scores
    from chatcli.errors import UsageError

    if not query.strip():
        raise UsageError("QUERY is empty")
    chunks = _read_chunks(files, paragraphs)
    _ref, embedder = _open_embedder(model, pull, ctx_size, threads, gpu_layers, flash_attn, verbose)
    if not chunks:
        console.info("nothing to rank: the input has no text")
        if as_json:
            click.echo("[]")
        return
    cache = _cache(use_cache)
    try:
        texts = [query, *(c.text for c in chunks)]
        try:
            vectors = embed_cached(embedder, texts, cache, normalize=True, truncate=truncate)
        except TextTooLong as exc:
            where = "QUERY" if exc.index == 0 else _where(chunks[exc.index - 1])
            raise _overflow(exc, where) from None
    finally:
        if cache is not None:
            cache.close()
        _report_load(embedder, verbose)
        embedder.close()
    scores = cosine_scores(vectors[0], vectors[1:])
    order = sorted(range(len(chunks)), key=lambda i: (-scores[i], i))
    if top_k:
        order = order[:top_k]
    if as_json:
        rows = [{"score": round(scores[i], 6), "text": chunks[i].text, "source": chunks[i].source,
                 "line": chunks[i].line} for i in order]
        click.echo(json.dumps(rows, ensure_ascii=False, indent=2))
        return
    out = sys.stdout
    for i in order:
        out.write(f"{scores[i]:.4f}\t{' '.join(chunks[i].text.splitlines())}\n")
    out.flush()


def _where(chunk: Chunk) -> str:
    what = "paragraph at line" if "\n" in chunk.text else "line"
    return f"{what} {chunk.line} of {'stdin' if chunk.source == '-' else chunk.source}"


COMMANDS = [embed, similar]
