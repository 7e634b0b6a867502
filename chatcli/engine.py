"""Running a GGUF model: the Engine protocol and LlamaEngine on llama-cpp-python (imported lazily).

Streaming goes through `Llama.generate()` with our own incremental UTF-8 decoding and a short stop-string
tail, not `create_completion(stream=True)`, which re-detokenises every token at every step (quadratic).
"""

from __future__ import annotations

import codecs
import ctypes
import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from chatcli.errors import ContextOverflowError, GGUFError, ModelLoadError, UsageError

FinishReason = Literal["stop", "length", "context", "interrupted"]


@dataclass(frozen=True)
class SamplingOptions:
    """How to pick tokens. temperature 0 = greedy (deterministic)."""

    max_tokens: int | None = None  # None: until EOS or the context window is full
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    grammar: str | None = None  # GBNF source

    def validate(self) -> SamplingOptions:
        checks = [
            ("--max-tokens", self.max_tokens is None or self.max_tokens >= 0, "must be 0 or more"),
            ("--temperature", 0.0 <= self.temperature <= 5.0, "must be between 0 and 5"),
            ("--top-p", 0.0 < self.top_p <= 1.0, "must be in (0, 1]"),
            ("--top-k", self.top_k >= 0, "must be 0 (off) or more"),
            ("--min-p", 0.0 <= self.min_p <= 1.0, "must be between 0 and 1"),
            ("--repeat-penalty", 0.0 < self.repeat_penalty <= 10.0, "must be in (0, 10]"),
            ("--seed", self.seed is None or 0 <= self.seed < 2**32 - 1, "must be between 0 and 4294967294"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise UsageError(f"invalid value for {name}: {why}")
        if any(s == "" for s in self.stop):
            raise UsageError("invalid value for --stop: must not be empty")
        return self


@dataclass
class GenerationResult:
    text: str = ""
    finish_reason: FinishReason = "stop"
    prompt_tokens: int = 0
    prompt_cached_tokens: int = 0  # of those, restored from a snapshot instead of being read
    completion_tokens: int = 0
    prompt_seconds: float = 0.0  # prompt processing, until the first token is sampled
    decode_seconds: float = 0.0  # from the first token to the last

    @property
    def decode_tokens_per_second(self) -> float | None:
        if self.completion_tokens < 2 or self.decode_seconds <= 0:
            return None
        return (self.completion_tokens - 1) / self.decode_seconds

    def timings(self) -> dict[str, float | None]:
        tps = self.decode_tokens_per_second
        return {
            "prompt_seconds": round(self.prompt_seconds, 4),
            "decode_seconds": round(self.decode_seconds, 4),
            "prompt_tokens_per_second": round(self.prompt_tokens / self.prompt_seconds, 2)
            if self.prompt_seconds > 0 else None,
            "decode_tokens_per_second": round(tps, 2) if tps else None,
        }


class Engine(Protocol):
    """What the CLI and REPL need from a model runner (a fake one serves the unit tests)."""

    path: Path
    n_ctx: int

    def tokenize(self, text: str, *, add_bos: bool = True) -> list[int]: ...
    def detokenize(self, tokens: Sequence[int]) -> str: ...
    def generate(self, prompt: Sequence[int], options: SamplingOptions) -> Generation: ...
    def close(self) -> None: ...


class Generation:
    """Iterate for text chunks as they are produced; `.result` holds counts and timings (complete after)."""

    def __init__(self, chunks: Iterator[str], result: GenerationResult) -> None:
        self._chunks = chunks
        self.result = result

    def __iter__(self) -> Iterator[str]:
        return self._chunks

    def close(self) -> None:
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()


class StopScanner:
    """Finds stop strings in streamed text, holding back only a tail that could still begin one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=0)
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit now, stopped)."""
        buf = self.pending + text
        if not self.stops:
            self.pending = ""
            return buf, False
        cut = min((i for i in (buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.pending = ""
            return buf[:cut], True
        keep = 0
        for n in range(min(self.hold - 1, len(buf)), 0, -1):
            tail = buf[-n:]
            if any(s.startswith(tail) for s in self.stops):
                keep = n
                break
        self.pending = buf[len(buf) - keep:] if keep else ""
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


# ---------------------------------------------------------------- llama.cpp


def physical_cores() -> int:
    """Physical cores we may run on: llama.cpp's decode gets slower with hyper-threads."""
    try:
        allowed = sorted(os.sched_getaffinity(0))
    except AttributeError:
        allowed = list(range(os.cpu_count() or 1))
    cores = set()
    for cpu in allowed:
        try:
            siblings = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read_text().strip()
        except OSError:
            return max(1, len(allowed))
        cores.add(siblings)
    return max(1, len(cores))


@contextmanager
def _quiet_fds(verbose: bool) -> Iterator[None]:
    """Keep C-level prints off stdout (it carries only the product) and silence stderr unless --verbose."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved_out = os.dup(1)
    saved_err = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(2 if verbose else devnull, 1)
        if not verbose:
            os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)
        for fd in (saved_out, saved_err, devnull):
            os.close(fd)


def gpu_offload_supported() -> bool:
    import llama_cpp

    return bool(llama_cpp.llama_supports_gpu_offload())


def resolve_gpu_layers(setting: str | int) -> int:
    """'auto' = every layer when this llama.cpp build can offload, else CPU; 'all' = -1; N = N layers."""
    if isinstance(setting, int):
        if setting < -1:
            raise UsageError("invalid value for --gpu-layers: use auto, all or a number >= 0")
        return setting
    text = str(setting).strip().lower()
    if text == "auto":
        return -1 if gpu_offload_supported() else 0
    if text == "all":
        return -1
    try:
        return resolve_gpu_layers(int(text))
    except ValueError:
        raise UsageError("invalid value for --gpu-layers: use auto, all or a number >= 0") from None


def kv_bytes_per_token(meta: dict[str, object], arch: str) -> int | None:
    """f16 K+V cache bytes per token of context, from the GGUF header."""
    try:
        layers = int(meta[f"{arch}.block_count"])  # type: ignore[call-overload]
        embd = int(meta[f"{arch}.embedding_length"])  # type: ignore[call-overload]
        heads = int(meta[f"{arch}.attention.head_count"])  # type: ignore[call-overload]
        kv_heads = int(meta.get(f"{arch}.attention.head_count_kv", heads))  # type: ignore[call-overload]
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None
    if heads <= 0:
        return None
    return 2 * layers * (embd // heads) * kv_heads * 2


def _available_memory() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def choose_context(requested: int | None, default: int | None, n_ctx_train: int | None,
                   kv_per_token: int | None) -> int:
    """The context window: asked for, else the catalogue's, else 4096; never past training, memory-capped."""
    n_ctx = requested or default or 4096
    if n_ctx_train:
        # GPT-2 in llama.cpp aborts the process when generation passes its trained context.
        n_ctx = min(n_ctx, n_ctx_train)
    if requested is None and kv_per_token:
        memory = _available_memory()
        if memory:
            budget = memory // 4  # leave room for weights and everything else
            n_ctx = max(512, min(n_ctx, budget // kv_per_token))
            if n_ctx_train:
                n_ctx = min(n_ctx, n_ctx_train)
    return max(16, int(n_ctx))


class LlamaEngine:
    """A GGUF model loaded once in llama.cpp, mmap'd."""

    def __init__(
        self,
        path: Path,
        *,
        n_ctx: int | None = None,
        default_ctx: int | None = None,
        n_threads: int | None = None,
        gpu_layers: str | int = "auto",
        flash_attn: bool = True,
        verbose: bool = False,
    ) -> None:
        from chatcli.gguf_info import read_gguf

        self.path = Path(path)
        info = read_gguf(self.path)  # bounds-checked: a hostile header never reaches llama.cpp
        if info.split and info.split[0] != 0:
            raise GGUFError(f"{self.path}: this is part {info.split[0] + 1} of a split model; open the first part")
        if not info.architecture:
            raise GGUFError(f"{self.path}: no general.architecture in the GGUF header; not a model file")
        if n_ctx is not None and n_ctx < 16:
            raise UsageError("invalid value for --ctx-size: must be 16 or more")
        self.info = info
        self.n_ctx = choose_context(n_ctx, default_ctx, info.context_length,
                                    kv_bytes_per_token(info.metadata, info.architecture))
        self.n_threads = n_threads or physical_cores()
        self.gpu_layers = resolve_gpu_layers(gpu_layers)
        self.flash_attn = flash_attn
        self.verbose = verbose
        started = time.perf_counter()
        import llama_cpp
        from llama_cpp import _logger

        _logger.set_verbose(verbose)
        if not verbose:
            _logger.logger.setLevel(100)  # above CRITICAL: errors become our own one-line messages
        try:
            with _quiet_fds(verbose):
                self._llm = llama_cpp.Llama(
                    model_path=str(self.path),
                    n_ctx=self.n_ctx,
                    n_batch=min(512, self.n_ctx),
                    n_ubatch=min(512, self.n_ctx),
                    n_threads=self.n_threads,
                    n_threads_batch=self.n_threads,
                    n_gpu_layers=self.gpu_layers,
                    use_mmap=True,
                    flash_attn=flash_attn,
                    verbose=verbose,
                )
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelLoadError(
                f"llama.cpp could not load {self.path.name} ({info.architecture}): {exc}; "
                "the file may be damaged or use an architecture this llama.cpp does not support "
                "(run with --verbose for llama.cpp's log)"
            ) from exc
        self.load_seconds = time.perf_counter() - started
        self._vocab = self._llm._model.vocab
        self._pieces: dict[int, bytes] = {}

    # -------------------------------------------------------- tokens

    def tokenize(self, text: str, *, add_bos: bool = True) -> list[int]:
        return self._llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)

    def piece(self, token: int) -> bytes:
        cached = self._pieces.get(token)
        if cached is None:
            import llama_cpp

            buf = ctypes.create_string_buffer(256)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
            cached = buf.raw[:n] if n >= 0 else b""
            self._pieces[token] = cached
        return cached

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(self.piece(t) for t in tokens).decode("utf-8", errors="replace")

    def is_end_of_generation(self, token: int) -> bool:
        import llama_cpp

        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))

    @property
    def add_bos(self) -> bool:
        return bool(self._llm._model.add_bos_token())

    # -------------------------------------------------------- generation

    def generate(self, prompt: Sequence[int], options: SamplingOptions) -> Generation:
        prompt = list(prompt)
        if not prompt:
            raise UsageError("empty prompt")
        if len(prompt) >= self.n_ctx:
            raise ContextOverflowError(
                f"the prompt is {len(prompt)} tokens but the context window is {self.n_ctx}: "
                "shorten it, raise --ctx-size, or pass --truncate to keep its end"
            )
        result = GenerationResult(prompt_tokens=len(prompt))
        return Generation(self._run(prompt, options, result), result)

    def _grammar(self, source: str | None):  # type: ignore[no-untyped-def]
        """A LlamaGrammar, checked first: llama.cpp's sampler crashes on a grammar that does not parse."""
        if source is None:
            return None
        import tempfile

        import llama_cpp
        from llama_cpp import LlamaGrammar

        with tempfile.TemporaryFile() as log:
            sys.stderr.flush()
            saved = os.dup(2)
            os.dup2(log.fileno(), 2)
            try:
                sampler = llama_cpp.llama_sampler_init_grammar(self._vocab, source.encode("utf-8"), b"root")
            finally:
                os.dup2(saved, 2)
                os.close(saved)
            if not sampler:
                log.seek(0)
                reason = " ".join(log.read().decode("utf-8", "replace").split())[:200] or "it does not parse"
                raise UsageError(f"invalid grammar: {reason}")
        llama_cpp.llama_sampler_free(sampler)
        return LlamaGrammar.from_string(source, verbose=self.verbose)

    def _run(self, prompt: list[int], options: SamplingOptions, result: GenerationResult) -> Iterator[str]:
        llm = self._llm
        llm.set_seed(options.seed if options.seed is not None else int.from_bytes(os.urandom(4), "little") % (2**31))
        grammar = self._grammar(options.grammar)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        scanner = StopScanner(options.stop)
        limit = options.max_tokens
        room = self.n_ctx - len(prompt)
        parts: list[str] = []
        started = time.perf_counter()
        first_at: float | None = None
        result.finish_reason = "stop"
        tokens = llm.generate(
            prompt,
            top_k=options.top_k,
            top_p=options.top_p,
            min_p=options.min_p,
            temp=options.temperature,
            repeat_penalty=options.repeat_penalty,
            grammar=grammar,
        )
        try:
            stopped = limit == 0
            for token in ([] if stopped else tokens):
                now = time.perf_counter()
                if first_at is None:
                    first_at = now
                    result.prompt_seconds = now - started
                result.decode_seconds = now - first_at
                if self.is_end_of_generation(token):
                    break
                result.completion_tokens += 1
                text, stopped = scanner.feed(decoder.decode(self.piece(token)))
                if text:
                    parts.append(text)
                    yield text
                if stopped:
                    break
                if limit is not None and result.completion_tokens >= limit:
                    result.finish_reason = "length"
                    break
                if result.completion_tokens >= room:
                    result.finish_reason = "context"
                    break
            if not stopped:
                text, stopped = scanner.feed(decoder.decode(b"", final=True))
                text += "" if stopped else scanner.flush()
                if text:
                    parts.append(text)
                    yield text
        except GeneratorExit:
            result.finish_reason = "interrupted"
            raise
        except KeyboardInterrupt:
            result.finish_reason = "interrupted"
            raise
        finally:
            tokens.close()
            result.text = "".join(parts)

    # -------------------------------------------------------- state (KV cache) snapshots

    @property
    def cached_tokens(self) -> list[int]:
        """The tokens whose keys and values are in the context now (what a snapshot would hold)."""
        return [int(t) for t in self._llm.input_ids[: self._llm.n_tokens]]

    def save_state(self, path: Path) -> int:
        """Write the context's state for its current tokens to `path`; returns the token count."""
        import llama_cpp

        tokens = self.cached_tokens
        array = (llama_cpp.llama_token * len(tokens))(*tokens)
        if not llama_cpp.llama_state_save_file(self._llm._ctx.ctx, str(path).encode(), array, len(tokens)):
            raise OSError(f"llama.cpp could not write a state file to {path}")
        return len(tokens)

    def load_state(self, path: Path) -> list[int]:
        """Restore a state written by save_state (same model and context size); returns its tokens.

        Raises ValueError when llama.cpp refuses the file (other model, damaged); the context is then reset.
        """
        import llama_cpp

        capacity = self.n_ctx
        array = (llama_cpp.llama_token * capacity)()
        count = ctypes.c_size_t(0)
        with _quiet_fds(self.verbose):
            ok = llama_cpp.llama_state_load_file(self._llm._ctx.ctx, str(path).encode(), array, capacity,
                                                 ctypes.byref(count))
        if not ok or count.value > capacity:
            self.reset()
            raise ValueError(f"llama.cpp refused the state file {path}")
        tokens = list(array[: count.value])
        self._llm.input_ids[: len(tokens)] = tokens
        self._llm.n_tokens = len(tokens)
        self._llm._requires_eval = True  # the restored logits are not trusted: re-read the last token
        return tokens

    def reset(self) -> None:
        """Forget the context (the next generation reads its whole prompt)."""
        self._llm.reset()
        self._llm._ctx.kv_cache_clear()

    def truncate(self, n_tokens: int) -> None:
        """Keep only the first n_tokens of the context."""
        if n_tokens < self._llm.n_tokens:
            self._llm._ctx.kv_cache_seq_rm(-1, n_tokens, -1)
            self._llm.n_tokens = n_tokens

    def close(self) -> None:
        llm = getattr(self, "_llm", None)
        if llm is not None:
            llm.close()
            self._llm = None
