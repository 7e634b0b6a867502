"""Running a GGUF model: the Engine protocol and LlamaEngine on llama-cpp-python (imported lazily).

Streaming goes through `Llama.generate()` with our own incremental UTF-8 decoding and a short stop-string
tail, not `create_completion(stream=True)`, which re-detokenises every token at every step (quadratic).
"""

from __future__ import annotations

import codecs
import ctypes
import os
import re
import sys
import threading
import time
from collections.abc import Generator, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import Field, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from chatcli.errors import ChatcliError, ContextOverflowError, ExitCode, GGUFError, ModelLoadError, UsageError

if TYPE_CHECKING:
    from chatcli.cpu_share import CoreShare
    from chatcli.gguf_info import GGUFInfo

FinishReason = Literal["stop", "length", "context", "interrupted"]


def _setting(kind: type, help: str, example: int | float) -> dict[str, object]:
    """Field metadata of a sampling setting: the CLI makes a flag of it and the REPL a /set name."""
    return {"kind": kind, "help": help, "example": example}


class InvalidSetting(UsageError):
    """A sampling setting out of range; `name` is the field, so each front end can say it its own way."""

    def __init__(self, name: str, why: str) -> None:
        super().__init__(f"{name} {why}")
        self.name, self.why = name, why


@dataclass(frozen=True)
class SamplingOptions:
    """How to pick tokens. temperature 0 = greedy (deterministic). Fields with metadata are user settings."""

    max_tokens: int | None = field(default=None, metadata=_setting(  # None: until EOS or the context is full
        int, "Stop after N tokens (default: until the model ends).", 256))
    temperature: float = field(default=0.8, metadata=_setting(
        float, "Randomness; 0 = always the likeliest token.", 0.7))
    top_p: float = field(default=0.95, metadata=_setting(float, "Nucleus sampling threshold.", 0.9))
    top_k: int = field(default=40, metadata=_setting(int, "Sample from the K likeliest tokens (0 = all).", 40))
    min_p: float = field(default=0.05, metadata=_setting(
        float, "Drop tokens less likely than this times the top one.", 0.05))
    repeat_penalty: float = field(default=1.0, metadata=_setting(
        float, "Penalise repeated tokens (1 = off).", 1.1))
    seed: int | None = field(default=None, metadata=_setting(int, "Random seed, for reproducible sampling.", 42))
    stop: tuple[str, ...] = ()
    grammar: str | None = None  # GBNF source

    def validate(self) -> SamplingOptions:
        """Self, or InvalidSetting naming the first field out of range."""
        checks = [
            ("max_tokens", self.max_tokens is None or self.max_tokens >= 0, "must be 0 or more"),
            ("temperature", 0.0 <= self.temperature <= 5.0, "must be between 0 and 5"),
            ("top_p", 0.0 < self.top_p <= 1.0, "must be in (0, 1]"),
            ("top_k", self.top_k >= 0, "must be 0 (off) or more"),
            ("min_p", 0.0 <= self.min_p <= 1.0, "must be between 0 and 1"),
            ("repeat_penalty", 0.0 < self.repeat_penalty <= 10.0, "must be in (0, 10]"),
            ("seed", self.seed is None or 0 <= self.seed < 2**32 - 1, "must be between 0 and 4294967294"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise InvalidSetting(name, why)
        if any(s == "" for s in self.stop):
            raise InvalidSetting("stop", "must not be empty")
        return self


# The settings a user can give (flags, /set, catalogue and template options), in SamplingOptions' order.
SETTINGS: tuple[Field[object], ...] = tuple(f for f in fields(SamplingOptions) if f.metadata)


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


class ModelHeader(Protocol):
    """What callers read of a model's header (gguf_info.GGUFInfo for a local file)."""

    @property
    def architecture(self) -> str | None: ...
    @property
    def chat_template(self) -> str | None: ...
    @property
    def bos_token(self) -> str | None: ...
    @property
    def eos_token(self) -> str | None: ...
    @property
    def eot_token(self) -> str | None: ...
    @property
    def file_size(self) -> int | None: ...
    @property
    def n_params(self) -> int | None: ...
    @property
    def file_type(self) -> str | None: ...


class Engine(Protocol):
    """Everything the CLI, the REPL and a chat session use of a model runner.

    LlamaEngine implements it; tests/fake_engine.py implements all of it too, so no caller needs
    `hasattr` probes. The state methods serve KV snapshots (snapshots.py).
    """

    path: Path
    n_ctx: int
    n_threads: int
    gpu_layers: int  # -1 all, 0 none
    flash_attn: bool
    load_seconds: float

    @property
    def info(self) -> ModelHeader: ...
    @property
    def add_bos(self) -> bool: ...
    @property
    def recurrent(self) -> bool: ...  # its state is only ever extended or restored whole, never cut back
    @property
    def encoder_decoder(self) -> bool: ...  # T5-style: each prompt is encoded afresh, nothing is cached

    def tokenize(self, text: str, *, add_bos: bool = True) -> list[int]: ...
    def detokenize(self, tokens: Sequence[int]) -> str: ...
    def generate(self, prompt: Sequence[int], options: SamplingOptions) -> Generation: ...
    def close(self) -> None: ...

    # -------------------------------------------------------- state (snapshots)

    @property
    def cached_tokens(self) -> list[int]: ...
    def save_state(self, path: Path) -> int: ...
    def load_state(self, path: Path) -> list[int]: ...
    def reset(self) -> None: ...
    def truncate(self, n_tokens: int) -> None: ...
    def state_file_bytes(self, keep: Sequence[int] | None = None,
                         min_tokens: int = 0) -> tuple[list[int], bytearray] | None: ...
    def claim_state(self) -> None: ...
    def release_state(self) -> None: ...
    def wait_state(self) -> None: ...


@runtime_checkable
class TextEngine(Protocol):
    """A model behind an API (remote.RemoteEngine): text or messages in, text out; no tokens and no state here.

    The server renders its chat template, tokenizes and enforces its context window, so callers send the raw
    prompt or the conversation as it is. Callers branch on `isinstance(engine, TextEngine)`: once in
    completion.run and once in ChatSession._begin.
    """

    label: str  # what errors and notices call it, e.g. "@box/llama-3 at http://box:8000/v1"
    n_ctx: int | None  # the server's context window, when it says
    load_seconds: float  # connecting and finding the model

    def complete_text(self, prompt: str, options: SamplingOptions, *,
                      json_schema: dict[str, Any] | None = None) -> Generation: ...
    def chat(self, messages: Sequence[Mapping[str, str]], options: SamplingOptions, *,
             json_schema: dict[str, Any] | None = None) -> Generation: ...
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


def common_prefix(a: Sequence[object], b: Sequence[object]) -> int:
    """How many leading items two sequences (token lists, strings) share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


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


# ---------------------------------------------------------------- loading: llama.cpp's last words
#
# llama.cpp aborts the process (GGML_ASSERT -> ggml_abort -> abort()) on some values our checks may still
# miss. ggml_abort calls a process-wide callback first (ggml_set_abort_callback, in libggml-base); ours writes
# one line naming the file and llama.cpp's reason to the real stderr (fd 2 may be silenced at that moment) and
# exits with ExitCode.ERROR. It is the one place below the CLI that writes and exits: the process is about to
# die, and nothing above can run any more.


@dataclass
class _AbortState:
    stderr_fd: int = 2
    doing: str = "running a model"
    callback: object = None  # the ctypes function pointer ggml holds: must live as long as the process
    # Several compute threads can assert at once: the first one speaks, the others wait for its exit.
    speaking: threading.Lock = field(default_factory=threading.Lock)


_abort_state = _AbortState()
_ABORT_CALLBACK_TYPE = ctypes.CFUNCTYPE(None, ctypes.c_char_p)


def _on_ggml_abort(message: bytes | None) -> None:
    if not _abort_state.speaking.acquire(blocking=False):
        time.sleep(60)
        os._exit(ExitCode.ERROR)
    text = " ".join((message or b"").decode("utf-8", "replace").split())
    text = re.sub(r"^\S*/(?=[^/\s]+:\d+: )", "", text)  # the build tree's path: keep "llama-model.cpp:1328: "
    line = f"error: llama.cpp aborted while {_abort_state.doing}: {text or 'no reason given'}\n"
    try:
        os.write(_abort_state.stderr_fd, line.encode("utf-8", "replace"))
    finally:
        os._exit(ExitCode.ERROR)


def install_abort_handler() -> bool:
    """Make llama.cpp's aborts print one line and exit 1 instead of a silent SIGABRT; False if unsupported."""
    if _abort_state.callback is not None:
        return True
    for lib in _ggml_base_candidates():
        try:
            setter = ctypes.CDLL(str(lib)).ggml_set_abort_callback
        except (OSError, AttributeError):
            continue  # an older ggml has no such hook: aborts stay silent, our header checks are all there is
        setter.argtypes = [_ABORT_CALLBACK_TYPE]
        setter.restype = ctypes.c_void_p
        callback = _ABORT_CALLBACK_TYPE(_on_ggml_abort)
        setter(callback)
        _abort_state.callback = callback
        return True
    return False


def _ggml_base_candidates() -> list[Path]:
    """The libggml-base that llama.cpp itself uses, first.

    A wheel stores libggml-base.so, .so.0 and .so.0.x.y as three copies (zip has no symlinks): opening the wrong
    one loads a second ggml whose callback llama.cpp never sees. So prefer the copy already mapped into this
    process (libllama's dependency), then the soname, then the rest.
    """
    import llama_cpp

    found: list[Path] = []
    try:
        for line in Path("/proc/self/maps").read_text().splitlines():
            name = line.rsplit(" ", 1)[-1]
            if "/libggml-base." in name and Path(name) not in found:
                found.append(Path(name))
    except OSError:
        pass
    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    for name in ("libggml-base.so.0", "libggml-base.so", "libggml-base.dylib", "ggml-base.dll"):
        if (lib_dir / name).exists() and lib_dir / name not in found:
            found.append(lib_dir / name)
    return found


_LOG_ERROR = 4  # ggml.h's ggml_log_level (NONE, DEBUG, INFO, WARN, ERROR, CONT); llama_cpp._logger's map is older
_LOG_CONT = 5
_LOG_CALLBACK_TYPE = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)


@contextmanager
def _keep_llama_log(verbose: bool) -> Iterator[list[str]]:
    """Collect llama.cpp's error lines while the block runs (and still print its log with --verbose)."""
    import llama_cpp
    from llama_cpp import _logger

    errors: list[str] = []
    last_level = 0

    def on_log(level: int, text: bytes | None, user_data: ctypes.c_void_p) -> None:
        nonlocal last_level
        if level != _LOG_CONT:
            last_level = level
        piece = (text or b"").decode("utf-8", "replace")
        if last_level == _LOG_ERROR:
            if level == _LOG_CONT and errors:
                errors[-1] += piece
            else:
                errors.append(piece)
        if verbose:
            sys.stderr.write(piece)
            sys.stderr.flush()

    callback = _LOG_CALLBACK_TYPE(on_log)
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    try:
        yield errors
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


def llama_error_reason(lines: Sequence[str]) -> str | None:
    """llama.cpp's own reason from its error log lines: the last specific one, without function prefixes."""
    for line in reversed(lines):
        text = " ".join(line.split())
        if not text or "failed to load model" in text:
            continue
        text = re.sub(r"^(\w+: )+", "", text)  # "llama_model_load: "
        return text.removeprefix("error loading model: ")[:300]
    return None


def load_llama(path: Path, *, verbose: bool = False, label: str | None = None,
               **params: object) -> Any:  # a llama_cpp.Llama: imported lazily, so not named here
    """llama_cpp.Llama(model_path=path, **params), with aborts reported and llama.cpp's reason on failure.

    No value checks here: LlamaEngine runs gguf_checks first. Raises ModelLoadError naming `label` (default:
    the path).
    """
    import llama_cpp
    from llama_cpp import _logger

    _logger.set_verbose(verbose)
    if not verbose:
        _logger.logger.setLevel(100)  # above CRITICAL: errors become our own one-line messages
    install_abort_handler()
    _abort_state.doing = f"loading {path}"
    try:
        with _keep_llama_log(verbose) as errors, _quiet_fds(verbose):
            return llama_cpp.Llama(model_path=str(path), verbose=verbose, **params)  # type: ignore[arg-type]
    except (ValueError, RuntimeError, OSError) as exc:
        reason = llama_error_reason(errors) or str(exc)
        raise ModelLoadError(
            f"llama.cpp could not load {label or path}: {reason}; the file may be damaged or use an architecture this "
            "llama.cpp does not support (run with --verbose for llama.cpp's log)"
        ) from exc
    finally:
        _abort_state.doing = f"running {path}"


@contextmanager
def _quiet_fds(verbose: bool) -> Iterator[None]:
    """Keep C-level prints off stdout (it carries only the product) and silence stderr unless --verbose."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved_out = os.dup(1)
    saved_err = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    outer_fd = _abort_state.stderr_fd
    _abort_state.stderr_fd = saved_err  # an abort's last word must reach the user, not /dev/null
    try:
        os.dup2(2 if verbose else devnull, 1)
        if not verbose:
            os.dup2(devnull, 2)
        yield
    finally:
        _abort_state.stderr_fd = outer_fd
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)
        for fd in (saved_out, saved_err, devnull):
            os.close(fd)


def _core_share(cores: int) -> CoreShare:
    from chatcli.cpu_share import CoreShare

    return CoreShare(cores)


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


def checked_header(path: Path) -> GGUFInfo:
    """The file's header, read with bounds checks and its values checked (gguf_checks) before llama.cpp sees it;
    a file that passed before is known by its identity (header_cache) and not checked again."""
    from chatcli import header_cache
    from chatcli.gguf_checks import check_loadable
    from chatcli.gguf_info import read_gguf

    known = header_cache.lookup(path)
    info = known or read_gguf(path)  # bounds-checked: a hostile header never reaches llama.cpp
    if info.split and info.split[0] != 0:
        raise GGUFError(f"{path}: this is part {info.split[0] + 1} of a split model; open the first part")
    if not info.architecture:
        raise GGUFError(f"{path}: no general.architecture in the GGUF header; not a model file")
    if known is None:
        check_loadable(info)  # values llama.cpp would abort on
        header_cache.remember(info)
    return info


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
        from chatcli.families import family as model_family
        from chatcli.gguf_checks import available_memory, check_fits

        self.path = Path(path)
        self._claim = threading.Lock()  # held while another thread copies the context's state (snapshots)
        info = checked_header(self.path)
        if n_ctx is not None and n_ctx < 16:
            raise UsageError("invalid value for --ctx-size: must be 16 or more")
        self.info = info
        self.family = model_family(info)
        if not self.family.generates:
            raise UsageError(
                f"{self.path.name} is an embedding model ({info.architecture}): it turns text into vectors and does "
                "not write text; use it with `chatcli embed` or `chatcli similar`, and a chat model here"
            )
        self.n_ctx = choose_context(n_ctx, default_ctx, info.context_length,
                                    kv_bytes_per_token(info.metadata, info.architecture or ""))
        self.n_threads = n_threads or physical_cores()
        # threads not fixed by the user: share the cores with other chatcli engines generating now
        self._share = None if n_threads else _core_share(self.n_threads)
        self.gpu_layers = resolve_gpu_layers(gpu_layers)
        # A load that cannot fit in memory (weights that go to a GPU are not counted against RAM, so the memory
        # estimate is skipped then).
        memory = available_memory() if self.gpu_layers == 0 else None
        if memory is not None:
            check_fits(info, n_ctx=self.n_ctx, memory=memory)
        self.flash_attn = flash_attn
        self.verbose = verbose
        started = time.perf_counter()
        # llama.cpp encodes a whole input in one ubatch (it aborts otherwise): an encoder's batch is the context
        batch = self.n_ctx if self.encoder_decoder else min(512, self.n_ctx)
        self._llm = load_llama(
            self.path,
            verbose=verbose,
            label=f"{self.path.name} ({info.architecture})",
            n_ctx=self.n_ctx,
            n_batch=batch,
            n_ubatch=batch,
            n_threads=self.n_threads,
            n_threads_batch=self.n_threads,
            n_gpu_layers=self.gpu_layers,
            use_mmap=True,
            flash_attn=flash_attn,
        )
        self.load_seconds = time.perf_counter() - started
        self._vocab = self._llm._model.vocab
        self._threads_now = self.n_threads
        self._pieces: dict[int, bytes] = {}
        # a recurrent model's state just after its last prompt was read: what a later prompt can go on from when
        # the reply does not re-tokenise as it was generated (the live state then holds no prefix of it)
        self._prompt_state: tuple[list[int], bytearray] | None = None

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

    @property
    def recurrent(self) -> bool:
        """The state cannot be cut back to a shorter prefix (Mamba, RWKV, hybrids): only extended or restored
        whole, at exactly the position where it was saved."""
        return self.family.recurrent

    @property
    def encoder_decoder(self) -> bool:
        """T5-style: the prompt is encoded, the decoder writes from its start token; nothing is kept between calls."""
        from chatcli.families import ENCODER_DECODER

        return self.family.name == ENCODER_DECODER

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

    def _start(self, prompt: list[int], sampling: dict[str, Any]) -> tuple[Generator[int, Any, None], int]:
        """llama-cpp-python's token generator for this prompt, and the room left for the reply.

        A decoder reuses the longest prefix the context shares with the prompt (llama-cpp-python cuts the rest).
        A recurrent state cannot be cut: it is extended when it holds a prefix of the prompt, else started over.
        An encoder-decoder encodes the prompt, then decodes from the model's decoder-start token.
        """
        import llama_cpp

        llm = self._llm
        if self.encoder_decoder:
            self._encode(prompt)
            start = llama_cpp.llama_model_decoder_start_token(llm._model.model)
            if start < 0:
                start = llama_cpp.llama_vocab_bos(self._vocab)
            return llm.generate([start], reset=False, **sampling), self.n_ctx - 1
        room = self.n_ctx - len(prompt)
        if self.recurrent:
            held = self.cached_tokens
            if not (held and len(held) < len(prompt) and prompt[: len(held)] == held):
                saved = self._prompt_state
                if saved and len(saved[0]) < len(prompt) and prompt[: len(saved[0])] == saved[0]:
                    self._set_state(*saved)
                elif held:
                    self.reset()
            held = self.cached_tokens
            if held:
                return llm.generate(prompt[len(held):], reset=False, **sampling), room
        return llm.generate(prompt, **sampling), room

    def _set_state(self, tokens: list[int], data: bytearray) -> None:
        """Put back a state copied by state_file_bytes (same model, same context)."""
        import struct

        import llama_cpp

        head = struct.calcsize(f"<III{len(tokens)}i")
        size = len(data) - head
        window = (ctypes.c_uint8 * size).from_buffer(data, head)
        try:
            read = llama_cpp.llama_state_set_data(self._llm._ctx.ctx, window, size)
        finally:
            del window
        if read != size:
            self.reset()
            return
        self._llm.input_ids[: len(tokens)] = tokens
        self._llm.n_tokens = len(tokens)
        self._llm._requires_eval = True

    def _encode(self, prompt: list[int]) -> None:
        """Run the encoder over the prompt (ending with the model's EOS, as T5 was trained); the decoder's cache
        starts empty."""
        import llama_cpp

        llm = self._llm
        eos = llama_cpp.llama_vocab_eos(self._vocab)
        if llama_cpp.llama_vocab_get_add_eos(self._vocab) and eos >= 0 and prompt[-1] != eos \
                and len(prompt) < self.n_ctx:
            prompt = [*prompt, eos]
        llm.reset()
        self._llm._ctx.kv_cache_clear()
        array = (llama_cpp.llama_token * len(prompt))(*prompt)
        with _quiet_fds(self.verbose):  # llama.cpp notes that it marks every input token an output
            code = llama_cpp.llama_encode(llm._ctx.ctx, llama_cpp.llama_batch_get_one(array, len(prompt)))
        if code != 0:
            raise ChatcliError(f"llama.cpp could not encode the prompt (llama_encode returned {code})")

    def _grammar(self, source: str | None):  # noqa: ANN202 - a LlamaGrammar, or None
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
        parts: list[str] = []
        started = time.perf_counter()
        first_at: float | None = None
        result.finish_reason = "stop"
        sharing = self._share.generating() if self._share is not None else nullcontext(None)
        with sharing as share:
            self._use_threads(share.threads(force=True) if share is not None else self.n_threads)
            tokens, room = self._start(prompt, {
                "top_k": options.top_k, "top_p": options.top_p, "min_p": options.min_p,
                "temp": options.temperature, "repeat_penalty": options.repeat_penalty, "grammar": grammar,
            })
            try:
                stopped = limit == 0
                for token in ([] if stopped else tokens):
                    if share is not None:
                        self._use_threads(share.threads())
                    now = time.perf_counter()
                    if first_at is None:
                        first_at = now
                        result.prompt_seconds = now - started
                        if self.recurrent:  # the prompt is read, the first token not yet: a few MB to copy
                            self._prompt_state = self.state_file_bytes()
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

    def _use_threads(self, n: int) -> None:
        if n != self._threads_now:
            import llama_cpp

            llama_cpp.llama_set_n_threads(self._llm._ctx.ctx, n, n)
            self._threads_now = n

    # -------------------------------------------------------- state (KV cache) snapshots
    # A snapshot can be taken on another thread: the owner claims the context (claim_state), the writer copies
    # its state (state_file_bytes) and lets go (release_state). What changes the context waits for that
    # (wait_state): truncate, reset, load_state, save_state and close here, ChatSession before it generates.

    @property
    def cached_tokens(self) -> list[int]:
        """The tokens whose keys and values are in the context now (what a snapshot would hold); none for an
        encoder-decoder, whose context holds its last reply, not a prompt."""
        if self.encoder_decoder:
            return []
        return [int(t) for t in self._llm.input_ids[: self._llm.n_tokens]]

    def claim_state(self) -> None:
        """Reserve the context for a snapshot that another thread takes; it calls release_state when done."""
        self._claim.acquire()

    def release_state(self) -> None:
        self._claim.release()

    def wait_state(self) -> None:
        """Return once no snapshot is being taken of the context (at once when none is)."""
        with self._claim:
            pass

    def state_file_bytes(self, keep: Sequence[int] | None = None,
                         min_tokens: int = 0) -> tuple[list[int], bytearray] | None:
        """Copy the context's state into memory, laid out as llama_state_save_file writes it (load_state reads it).

        With `keep`, the context is first cut to the prefix it shares with it. None (and the context left as
        it was) when fewer than min_tokens would remain. Does not wait for a claim: the claim's holder calls it.
        """
        import struct

        import llama_cpp

        tokens = self.cached_tokens
        if keep is not None:
            common = common_prefix(tokens, keep)
            if common < max(1, min_tokens):
                return None
            if common < len(tokens) and self.recurrent:
                # a recurrent state cannot be cut back: the copy taken when the last prompt was read, if it fits
                saved = self._prompt_state
                if saved and max(1, min_tokens) <= len(saved[0]) <= len(keep) and keep[: len(saved[0])] == saved[0]:
                    return saved
                return None
            if common < len(tokens):
                self._llm._ctx.kv_cache_seq_rm(-1, common, -1)
                self._llm.n_tokens = common
                tokens = tokens[:common]
        if len(tokens) < max(1, min_tokens):
            return None
        ctx = self._llm._ctx.ctx
        size = llama_cpp.llama_state_get_size(ctx)
        head = struct.calcsize(f"<III{len(tokens)}i")
        data = bytearray(head + size)
        struct.pack_into(f"<III{len(tokens)}i", data, 0, llama_cpp.LLAMA_SESSION_MAGIC,
                         llama_cpp.LLAMA_SESSION_VERSION, len(tokens), *tokens)
        window = (ctypes.c_uint8 * size).from_buffer(data, head)
        written = llama_cpp.llama_state_get_data(ctx, window, size)
        del window  # lets go of the bytearray's buffer
        if written != size:
            raise OSError(f"llama.cpp copied {written} bytes of a {size}-byte state")
        return tokens, data

    def save_state(self, path: Path) -> int:
        """Write the context's state for its current tokens to `path`; returns the token count."""
        import llama_cpp

        self.wait_state()
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

        self.wait_state()
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
        self.wait_state()
        self._llm.reset()
        self._llm._ctx.kv_cache_clear()
        self._prompt_state = None

    def truncate(self, n_tokens: int) -> None:
        """Keep only the first n_tokens of the context (a recurrent state cannot be cut: it is reset)."""
        self.wait_state()
        if n_tokens < self._llm.n_tokens and (self.recurrent or self.encoder_decoder):
            self.reset()
        elif n_tokens < self._llm.n_tokens:
            self._llm._ctx.kv_cache_seq_rm(-1, n_tokens, -1)
            self._llm.n_tokens = n_tokens

    def close(self) -> None:
        llm = getattr(self, "_llm", None)
        if llm is not None:
            self.wait_state()  # a snapshot may still be copying the context
            llm.close()
            self._llm = None
