"""The errors the library raises; each carries the exit code the CLI uses for it."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    ERROR = 1  # runtime error: also a model llama.cpp refused, or aborted on (engine's abort handler)
    USAGE = 2
    CONTEXT_OVERFLOW = 3
    INTERRUPTED = 130


class ChatcliError(Exception):
    """A user-facing failure: the message says what went wrong and what to do next."""

    exit_code: int = ExitCode.ERROR


class UsageError(ChatcliError):
    exit_code = ExitCode.USAGE


class CatalogueError(ChatcliError):
    """models.toml (shipped or the user's) is malformed."""


class UnknownModelError(ChatcliError):
    """A reference names no alias, repo, file or local path we can use."""


class ModelNotPresentError(ChatcliError):
    """The model is known but not downloaded."""


class DownloadError(ChatcliError):
    """A pull failed: network, server, auth, disk or checksum."""


class GGUFError(ChatcliError):
    """A GGUF file is truncated, malformed or hostile."""


class GGUFValueError(GGUFError):
    """A GGUF header reads fine but holds values llama.cpp would crash on or cannot load (see gguf_checks)."""


class ModelLoadError(ChatcliError):
    """llama.cpp could not load the model."""


class ContextOverflowError(ChatcliError):
    exit_code = ExitCode.CONTEXT_OVERFLOW


class TemplateError(ChatcliError):
    """A chat or prompt template could not be rendered."""


class HistoryError(ChatcliError):
    """The conversation store could not be read or written."""


class OutputClosed(ChatcliError):
    """stdout's reader went away (`| head`): stop quietly, successfully."""

    exit_code = ExitCode.OK


class Interrupted(ChatcliError):
    """Ctrl-C, with a word on what was kept."""

    exit_code = ExitCode.INTERRUPTED


class RemoteError(ChatcliError):
    """A remote endpoint failed: unreachable, refused, busy, or it broke off or garbled a reply (remote.py).

    In a piped chat it ends the run (exit 1) instead of moving on to the next line: the lines after it would be
    answered without the reply that failed.
    """
