"""The `chatcli` command line: parses, calls the library, renders, maps errors to exit codes.

Nothing heavy is imported at module level: `chatcli --help` must not load llama_cpp, huggingface_hub or rich.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import click

from chatcli import __version__
from chatcli.errors import ChatcliError, ExitCode, OutputClosed

EXIT_CODES_HELP = "Exit codes: 0 ok, 1 error, 2 usage error, 3 context overflow, 130 interrupted."


class _Group(click.Group):
    aliases = {"ls": "list"}

    order = ("chat", "complete", "embed", "similar", "classify", "serve", "pull",
             "list", "show", "doctor", "rm", "endpoint", "bench", "history",
             "templates", "config", "cache")

    # command -> the chatcli.cli module that defines it (in its COMMANDS): only the module of the command that
    # runs is imported, so `chatcli complete` starts without the others (tests/test_lazy_imports.py checks the map)
    modules = {
        "complete": "run", "chat": "run", "bench": "run", "serve": "serve",
        "pull": "models", "list": "models", "show": "models", "rm": "models",
        "config": "manage", "history": "manage", "templates": "manage", "cache": "manage",
        "endpoint": "endpoint", "doctor": "doctor",
        "embed": "embed", "similar": "embed", "classify": "classify",
    }

    def list_commands(self, ctx: click.Context) -> list[str]:
        """Most used first."""
        names = set(self.commands) | set(self.modules)
        return sorted(names, key=lambda name: self.order.index(name) if name in self.order else 99)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        name = self.aliases.get(name, name)
        if name not in self.commands and name in self.modules:
            import importlib

            module = importlib.import_module(f"chatcli.cli.{self.modules[name]}")
            for command in module.COMMANDS:
                self.add_command(command)
        return super().get_command(ctx, name)

    # click's Command.main turns EPIPE into sys.exit(1) before `main` below can see it (even with
    # standalone_mode=False); these two hooks run inside it and hand a closed stdout on as OutputClosed.
    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra: object) -> click.Context:
        with _closed_stdout_is_output_closed():  # --help, --version, usage errors print here
            return super().make_context(info_name, args, parent=parent, **extra)

    def invoke(self, ctx: click.Context) -> object:
        with _closed_stdout_is_output_closed():
            return super().invoke(ctx)


class _OtherBrokenPipe(Exception):
    """EPIPE on something other than stdout: an error to report, not a reader that left."""


@contextmanager
def _closed_stdout_is_output_closed() -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        if exc.errno != errno.EPIPE:
            raise
        if not _stdout_reader_gone():
            raise _OtherBrokenPipe(f"broken pipe: {exc}") from exc
        raise OutputClosed("stdout was closed") from None


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe or socket whose reader went away (poll says POLLERR/POLLHUP on its end)."""
    import select

    if not hasattr(select, "poll"):  # Windows: cannot tell, and stdout is what we write to
        return True
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        events = poller.poll(0)
    except (AttributeError, ValueError, OSError):
        return True
    return any(mask & (select.POLLERR | select.POLLHUP) for _, mask in events)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_CODES_HELP)
@click.version_option(__version__, "-V", "--version", prog_name="chatcli")
@click.option("--debug", is_flag=True, help="Show Python tracebacks for errors.")
def cli(debug: bool) -> None:
    """Chat with and complete text from local GGUF models (llama.cpp)."""



# ---------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; the one place that turns exceptions into messages and exit codes."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args or os.environ.get("CHATCLI_DEBUG", "") not in ("", "0")
    try:
        code = cli.main(args=args, prog_name="chatcli", standalone_mode=False)
    except click.exceptions.Abort as exc:
        if isinstance(exc.__cause__, KeyboardInterrupt):  # click turns Ctrl-C into Abort
            click.echo("interrupted", err=True)
            code = ExitCode.INTERRUPTED
        else:
            click.echo("aborted", err=True)
            code = ExitCode.ERROR
    except click.ClickException as exc:
        exc.show()
        code = exc.exit_code
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except OutputClosed:
        _silence_stdout()
        code = ExitCode.OK
    except ChatcliError as exc:
        _report(exc, debug)
        code = exc.exit_code
    except KeyboardInterrupt:
        click.echo("\ninterrupted", err=True)
        code = ExitCode.INTERRUPTED
    except BrokenPipeError:
        _silence_stdout()
        code = ExitCode.OK
    except Exception as exc:  # noqa: BLE001 - last resort: one line, traceback with --debug
        _report(exc, debug, internal=True)
        code = ExitCode.ERROR
    _flush_stdout()
    sys.exit(int(code or 0))


def _flush_stdout() -> None:
    """Flush what is still buffered now, while a closed reader can be handled quietly (not at interpreter exit)."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _silence_stdout()
    except (AttributeError, ValueError, OSError):  # no stdout, or already closed by someone else
        pass


def _silence_stdout() -> None:
    """The reader went away (`| head`): keep Python from complaining when it flushes stdout at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (AttributeError, ValueError, OSError):  # stdout is not a real file: nothing will flush into a pipe
        pass


def _report(exc: BaseException, debug: bool, internal: bool = False) -> None:
    if debug:
        import traceback

        traceback.print_exception(exc, file=sys.stderr)
    message = str(exc) or type(exc).__name__
    if internal:
        message = f"internal error: {type(exc).__name__}: {message} (run with --debug for the traceback)"
    click.echo(f"error: {message}", err=True)
