"""The chat REPL: prompt_toolkit input (history, multi-line, completion, toolbar), rich streaming output.

`Repl.run()` on a terminal; `run_lines()` when stdin is not one (each line is a message, for scripts).
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from chatcli import attachments as attaching
from chatcli.attachments import Attachment
from chatcli.conversation import SETTING_NAMES, ChatSession, Reply
from chatcli.engine import SETTINGS, InvalidSetting
from chatcli.errors import ChatcliError, RemoteError

INTERRUPTED_MARK = "[interrupted]"
MULTILINE_FENCE = '"""'


@dataclass(frozen=True)
class Command:
    name: str
    usage: str
    help: str


COMMANDS = [
    Command("/help", "/help", "show this help"),
    Command("/system", "/system [TEXT]", "set the system prompt (no TEXT: clear it)"),
    Command("/reset", "/reset", "start a new conversation (the old one stays in history)"),
    Command("/undo", "/undo", "drop your last message and its reply"),
    Command("/retry", "/retry", "write the last reply again"),
    Command("/save", "/save [TITLE]", "give this conversation a title (every turn is saved as it happens)"),
    Command("/history", "/history", "list recent conversations"),
    Command("/load", "/load ID", "continue a stored conversation"),
    Command("/model", "/model REF", "switch model, keep the conversation"),
    Command("/set", "/set NAME VALUE", f"change a setting: {', '.join(SETTING_NAMES)}"),
    Command("/show", "/show", "current model, settings and chat template"),
    Command("/tokens", "/tokens", "context used / available"),
    Command("/file", "/file PATH...", "attach text files to your next message (no PATH: list what is attached)"),
    Command("/copy", "/copy", "copy the last reply to the clipboard (terminals that support OSC 52)"),
    Command("/exit", "/exit", "leave (Ctrl-D works too)"),
]
_ALIASES = {"/quit": "/exit", "/q": "/exit", "/?": "/help", "/clear": "/reset"}

# ref -> (engine, chat format, label, model id, the model's default settings)
ModelLoader = Callable[[str], tuple[Any, Any, str, str, dict[str, Any]]]


class Repl:
    """Drives a ChatSession from a terminal (or prompt_toolkit's pipe input in tests)."""

    def __init__(
        self,
        session: ChatSession,
        *,
        out: TextIO | None = None,
        err: Any = None,  # a rich Console for notices
        markdown: bool | None = None,
        load_model: ModelLoader | None = None,
        input_history: Path | None = None,
        pt_input: Any = None,
        pt_output: Any = None,
        attachments: Sequence[Attachment] = (),
        truncate: bool = False,
    ) -> None:
        from chatcli.cli import console

        self.session = session
        self.out = out or sys.stdout
        self.err = err or console.err()
        self.markdown = self.out.isatty() if markdown is None else markdown
        self.load_model = load_model
        self.input_history = input_history
        self.pt_input, self.pt_output = pt_input, pt_output
        self.done = False
        self.interactive = False  # set by run(): then Ctrl-C stops a reply; in a script it stops everything
        self.attachments = list(attachments)  # files for the next message (chat -f, /file)
        self.truncate = truncate  # cut attached files that do not fit, instead of refusing them

    # -------------------------------------------------------- notices

    def notice(self, text: str, style: str = "dim") -> None:
        self.err.print(text, style=style, markup=False, highlight=False)

    # -------------------------------------------------------- input

    def _prompt_session(self):  # noqa: ANN202
        from prompt_toolkit import PromptSession
        from prompt_toolkit.completion import WordCompleter
        from prompt_toolkit.history import FileHistory, History, InMemoryHistory
        from prompt_toolkit.key_binding import KeyBindings

        bindings = KeyBindings()

        @bindings.add("escape", "enter")  # Alt+Enter (or Esc then Enter): a new line inside the message
        def _newline(event) -> None:  # noqa: ANN001
            event.current_buffer.insert_text("\n")

        history: History
        if self.input_history is not None:
            self.input_history.parent.mkdir(parents=True, exist_ok=True)
            history = FileHistory(str(self.input_history))
        else:
            history = InMemoryHistory()
        words = [c.name for c in COMMANDS] + [f"/set {name}" for name in SETTING_NAMES]
        return PromptSession(
            history=history,
            completer=WordCompleter(words, sentence=True, match_middle=False),
            complete_while_typing=False,
            key_bindings=bindings,
            bottom_toolbar=self._toolbar,
            input=self.pt_input,
            output=self.pt_output,
        )

    @property
    def model_name(self) -> str:
        """The model as people say it: an alias or repo, or a local file's name."""
        label = self.session.model_label
        return Path(label).name if label.startswith(("/", "./", "~")) else label

    def _toolbar(self) -> str:
        used, total = self.session.context_usage()
        conversation = self.session.conversation_id or "new"
        return f" {self.model_name} · context {used}/{total} · {conversation} · /help · Alt+Enter: new line"

    def _read(self, prompt_session) -> str:  # noqa: ANN001
        text = prompt_session.prompt("> ")
        if text.strip() == MULTILINE_FENCE:  # a """ block: lines until the closing """
            lines = []
            while True:
                line = prompt_session.prompt("… ")
                if line.strip() == MULTILINE_FENCE:
                    break
                lines.append(line)
            return "\n".join(lines)
        return text

    # -------------------------------------------------------- main loops

    def run(self) -> int:
        self.interactive = True
        prompt_session = self._prompt_session()
        self._greet()
        while not self.done:
            try:
                text = self._read(prompt_session)
            except KeyboardInterrupt:
                continue  # Ctrl-C at the prompt clears the line
            except EOFError:
                break
            self.handle(text)
        return 0

    def run_lines(self, lines: Iterable[str]) -> int:
        """Non-TTY chat: each input line is a message (or a slash command); replies are plain text."""
        for line in lines:
            self.handle(line.rstrip("\n"))
            if self.done:
                break
        return 0

    def _greet(self) -> None:
        session = self.session
        if session.messages:
            self.notice(f"continuing conversation {session.conversation_id} ({len(session.messages)} turns)")
            for message in session.messages[-4:]:
                who = "you" if message["role"] == "user" else self.model_name
                self.notice(f"{who}: {_one_line(message['content'])}")
        else:
            self.notice(f"chatting with {self.model_name}; /help for commands, Ctrl-D to leave")
        if self.attachments:
            self.notice(f"attached {attaching.describe(self.attachments, self.session.engine)}: "
                        "it goes with your next message")

    def handle(self, text: str) -> None:
        """One line of input: a slash command or a message."""
        if not text.strip():
            return
        try:
            if text.lstrip().startswith("/"):
                self.command(text.strip())
            else:
                self.stream(self._send(text))
        except RemoteError as exc:
            if not self.interactive:  # a script's later lines would be answered without this reply: stop, exit 1
                raise
            self.notice(f"error: {exc}", style="red")
        except ChatcliError as exc:
            self.notice(f"error: {exc}", style="red")
        except KeyboardInterrupt:  # e.g. while /model loads: back to the prompt, not out of the chat
            if not self.interactive:
                raise
            self.notice(INTERRUPTED_MARK, style="yellow")

    def _send(self, text: str) -> Reply:
        """Send a message, with the files attached to it (each in a block before the text); they go once."""
        files, self.attachments = self.attachments, []
        if not files:
            return self.session.send(text)
        files, notes = attaching.fit_message(self.session, files, text, truncate=self.truncate)
        for note in notes:
            self.notice(note, style="yellow")
        return self.session.send(attaching.join(files, text))

    # -------------------------------------------------------- replies

    def stream(self, reply: Reply) -> None:
        """Show a reply as it streams; Ctrl-C stops it, keeps what was written, and marks it."""
        if reply.restored:
            self.notice(f"(restored {reply.restored} tokens of context from a snapshot)")
        if reply.dropped:
            self.notice(f"(the {reply.dropped} oldest turns no longer fit the context: the model does not see them; "
                        "history keeps them)")
        text = ""
        try:
            if self.markdown:
                text = self._stream_markdown(reply.chunks)
            else:
                for chunk in reply.chunks:
                    text += chunk
                    self.out.write(chunk)
                    self.out.flush()
                self.out.write("\n")
                self.out.flush()
        except KeyboardInterrupt:
            reply.chunks.close()  # type: ignore[attr-defined]
            if not self.markdown:
                self.out.write("\n")
            self.notice(INTERRUPTED_MARK, style="yellow")
            if not self.interactive:
                raise
            return
        if reply.result.finish_reason in ("length", "context"):
            self.notice(f"(reply cut at {reply.result.completion_tokens} tokens: {reply.result.finish_reason})")

    def _stream_markdown(self, chunks: Iterable[str]) -> str:
        from rich.console import Console
        from rich.live import Live
        from rich.markdown import Markdown

        console = Console(file=self.out, highlight=False)
        parts: list[str] = []
        tail = _Tail(parts)
        try:
            with _keys_not_echoed(sys.stdin), \
                    Live(tail, console=console, refresh_per_second=12, transient=True, auto_refresh=True):
                for chunk in chunks:
                    parts.append(chunk)
        finally:
            console.print(Markdown("".join(parts)) if parts else "")
        return "".join(parts)

    # -------------------------------------------------------- commands

    def command(self, line: str) -> None:
        name, _, arg = line.partition(" ")
        name = _ALIASES.get(name.lower(), name.lower())
        arg = arg.strip()
        handler = getattr(self, "cmd_" + name[1:], None)
        if handler is None or name not in {c.name for c in COMMANDS}:
            close = [c.name for c in COMMANDS if c.name.startswith(name[:3])]
            hint = f"; did you mean {' or '.join(close)}?" if close and name[:3] != "/" else ""
            self.notice(f"unknown command {name}{hint} (/help lists them)", style="red")
            return
        handler(arg)

    def cmd_help(self, arg: str) -> None:
        width = max(len(c.usage) for c in COMMANDS)
        for c in COMMANDS:
            self.notice(f"{c.usage:<{width}}  {c.help}", style="")
        self.notice(f'Multi-line input: Alt+Enter for a new line, or a {MULTILINE_FENCE} line to open and close a '
                    "block. Ctrl-C stops a reply; Ctrl-D leaves.", style="")

    def cmd_exit(self, arg: str) -> None:
        self.done = True

    def cmd_system(self, arg: str) -> None:
        self.session.set_system(arg or None)
        self.notice("system prompt set" if arg else "system prompt cleared")

    def cmd_reset(self, arg: str) -> None:
        self.session.reset()
        self.notice("new conversation")

    def cmd_undo(self, arg: str) -> None:
        self.notice("dropped the last exchange" if self.session.undo() else "nothing to undo")

    def cmd_retry(self, arg: str) -> None:
        self.stream(self.session.retry())

    def cmd_save(self, arg: str) -> None:
        session = self.session
        if session.history is None:
            self.notice("history is off", style="red")
            return
        if not session.conversation_id:
            self.notice("nothing to save yet: say something first")
            return
        if arg:
            session.history.set_title(session.conversation_id, arg)
        self.notice(f"saved as {session.conversation_id}" + (f": {arg}" if arg else "")
                    + f" (chatcli chat --conversation {session.conversation_id})")

    def cmd_history(self, arg: str) -> None:
        from chatcli.cli import console

        if self.session.history is None:
            self.notice("history is off", style="red")
            return
        rows = self.session.history.list(limit=15)
        if not rows:
            self.notice("no conversations yet")
        for row in rows:
            mark = "*" if row.id == self.session.conversation_id else " "
            self.notice(f"{mark} {row.id}  {console.ago(row.updated):>14}  {row.n_turns:>3} turns  {row.title}",
                        style="")

    def cmd_load(self, arg: str) -> None:
        if not arg:
            self.notice("usage: /load ID (see /history)", style="red")
            return
        self.session.load(arg)
        self._greet()

    def cmd_model(self, arg: str) -> None:
        if not arg:
            self.notice(f"model: {self.session.model_label} (usage: /model REF)")
            return
        if self.load_model is None:
            self.notice("switching models is not available here", style="red")
            return
        with self.err.status(f"loading {arg}…"):
            engine, fmt, label, model_id, model_defaults = self.load_model(arg)
        old = self.session.engine
        self.session.switch_model(engine, fmt, label, model_id, model_defaults)
        if old is not engine:
            old.close()
        self.notice(f"now chatting with {label}; the conversation continues")

    def cmd_set(self, arg: str) -> None:
        try:
            name, raw = shlex.split(arg)
        except ValueError:
            self.notice(f"usage: /set NAME VALUE (NAME: {', '.join(SETTING_NAMES)})", style="red")
            return
        try:
            value = self.session.set(name, raw)
        except InvalidSetting as exc:  # the library names the setting; here it is said as the command that sets it
            example = next(f.metadata["example"] for f in SETTINGS if f.name == exc.name)
            self.notice(f"{exc.name} {exc.why} (/set {exc.name} {example})", style="red")
            return
        self.notice(f"{name} = {'default' if value is None else value}")

    def cmd_show(self, arg: str) -> None:
        session = self.session
        options = session.options()
        used, total = session.context_usage()
        lines = [
            f"model        {session.model_label}",
            f"template     {session.fmt.name}",
            f"system       {session.system or '-'}",
            f"conversation {session.conversation_id or '(new)'}",
            f"context      {used}/{total} tokens",
            f"temperature  {options.temperature}   top_p {options.top_p}   top_k {options.top_k}   "
            f"min_p {options.min_p}   repeat_penalty {options.repeat_penalty}",
            f"max_tokens   {options.max_tokens or 'until the model stops'}   seed {options.seed or 'random'}",
            f"stop         {', '.join(repr(s) for s in options.stop) or '-'}",
        ]
        for line in lines:
            self.notice(line, style="")

    def cmd_copy(self, arg: str) -> None:
        import base64

        reply = next((m["content"] for m in reversed(self.session.messages) if m["role"] == "assistant"), None)
        if reply is None:
            self.notice("nothing to copy yet")
            return
        # OSC 52: the terminal (also over ssh and in tmux with set-clipboard on) puts the text on the clipboard
        self.out.write(f"\x1b]52;c;{base64.b64encode(reply.encode()).decode()}\x07")
        self.out.flush()
        self.notice(f"copied the last reply ({len(reply)} characters)")

    def cmd_file(self, arg: str) -> None:
        if not arg:
            if self.attachments:
                attached = attaching.describe(self.attachments, self.session.engine)
                self.notice(f"attached for your next message: {attached}")
            else:
                self.notice("usage: /file PATH... (attaches text files to your next message)")
            return
        try:
            names = shlex.split(arg)
        except ValueError:  # an unmatched quote: take the line as one path
            names = [arg]
        for name in names:
            file = attaching.read(name, truncate=self.truncate)
            # refused now, not with the next message, if it could never fit (--truncate: cut when sent)
            attaching.fit_message(self.session, [*self.attachments, file], "", truncate=self.truncate)
            self.attachments.append(file)
            self.notice(f"attached {attaching.describe([file], self.session.engine)}: it goes with your next message")

    def cmd_tokens(self, arg: str) -> None:
        used, total = self.session.context_usage()
        self.notice(f"{used} of {total} tokens used ({100 * used / max(1, total):.0f}%)", style="")


@contextmanager
def _keys_not_echoed(keys: TextIO) -> Iterator[None]:
    """While a reply streams, the terminal echoes no key (Ctrl-C's "^C", an Enter pressed ahead).

    rich's live view erases itself by moving up as many lines as it drew. Markdown pads its lines to the full
    width, so the cursor waits at the last column, and any echoed character there wraps and scrolls the screen:
    one line of the view then stays above the final text. Keys typed meanwhile stay queued for the next prompt.
    NOFLSH: Ctrl-C must not discard output already written (the terminal would miss part of a redraw).
    """
    try:
        import termios
    except ImportError:  # Windows
        yield
        return
    try:
        fd = keys.fileno()
        saved = termios.tcgetattr(fd)
    except (AttributeError, ValueError, OSError, termios.error):  # not a terminal
        yield
        return
    quiet = list(saved)
    quiet[3] = (quiet[3] & ~(termios.ECHO | getattr(termios, "ECHOCTL", 0))) | getattr(termios, "NOFLSH", 0)
    termios.tcsetattr(fd, termios.TCSANOW, quiet)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, saved)


class _Tail:
    """A rich renderable: the Markdown so far, cut to what fits the screen (so Live never scrolls or flickers)."""

    def __init__(self, parts: list[str]) -> None:
        self.parts = parts

    def __rich_console__(self, console, options):  # noqa: ANN001, ANN204
        from rich.markdown import Markdown
        from rich.segment import Segment

        lines = console.render_lines(Markdown("".join(self.parts)), options, pad=False)
        # Strictly shorter than the screen (Live cannot erase a view as tall as the terminal), with rows to spare
        # for the line Live ends on and the prompt's toolbar.
        height = max(1, console.size.height - 3)
        for line in lines[-height:]:
            yield from line
            yield Segment.line()


def _one_line(text: str, width: int = 100) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"
