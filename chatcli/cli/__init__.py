"""The `chatcli` command line: parses, calls the library, renders, maps errors to exit codes.

Nothing heavy is imported at module level: `chatcli --help` must not load llama_cpp, huggingface_hub or rich.
"""

from __future__ import annotations

import os
import sys

import click

from chatcli import __version__
from chatcli.errors import ChatcliError, ExitCode, OutputClosed

EXIT_CODES_HELP = "Exit codes: 0 ok, 1 error, 2 usage error, 3 context overflow, 130 interrupted."


class _Group(click.Group):
    aliases = {"ls": "list"}

    order = ("chat", "complete", "pull", "list", "show", "rm", "bench", "history", "templates", "config", "cache")

    def list_commands(self, ctx: click.Context) -> list[str]:
        """Most used first."""
        return sorted(self.commands, key=lambda name: self.order.index(name) if name in self.order else 99)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        return super().get_command(ctx, self.aliases.get(name, name))


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_CODES_HELP)
@click.version_option(__version__, "-V", "--version", prog_name="chatcli")
@click.option("--debug", is_flag=True, help="Show Python tracebacks for errors.")
def cli(debug: bool) -> None:
    """Chat with and complete text from local GGUF models (llama.cpp)."""


def _register(group: click.Group) -> None:
    """Each command module defines its commands; the group is made here and imports them (no cycle)."""
    from chatcli.cli import manage, models, run

    for module in (models, run, manage):
        for command in module.COMMANDS:
            group.add_command(command)


_register(cli)


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
    sys.exit(int(code or 0))


def _silence_stdout() -> None:
    """The reader went away (`| head`): keep Python from complaining when it flushes stdout at exit."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def _report(exc: BaseException, debug: bool, internal: bool = False) -> None:
    if debug:
        import traceback

        traceback.print_exception(exc, file=sys.stderr)
    message = str(exc) or type(exc).__name__
    if internal:
        message = f"internal error: {type(exc).__name__}: {message} (run with --debug for the traceback)"
    click.echo(f"error: {message}", err=True)
