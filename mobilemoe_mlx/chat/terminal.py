"""The terminal around a chat: it reads lines and prints, nothing more.

The conversation and its KV cache are a ChatSession's (chat.py); what the
/commands do and say is chat/commands.py's. A Terminal reads messages (typed,
with line editing, or piped, one per line; a line opening with triple quotes
starts a multi-line message), streams each answer to stdout, and prints
everything else (banner, prompts, stats, notes, command output) to stderr, so
`python chat.py ... < questions.txt > answers.txt` keeps only the answers, each
ending with a newline (an empty line for a message that was refused). On a
terminal, control characters in an answer are shown as `?`; a pipe gets the
text as generated. Ctrl-C during an answer stops it (through the session's
`request_stop`); at the prompt, twice leaves.
"""

import signal
import threading
from contextlib import contextmanager
from typing import Optional, TextIO

from ..errors import UserError
from .commands import run_command, stats_line
from .options import is_text
from .session import ChatSession, Turn

PROMPT = ">>> "
# What read_line returns for a line a strict stream could not decode: a lone
# surrogate, like the bytes a tolerant stream (surrogateescape) decodes to.
UNREADABLE = "\udcff"

# C0 controls but newline and tab, DEL and C1 controls (\x9b is CSI on some terminals).
_CONTROLS = {c: "?" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0)) if chr(c) not in "\n\t"}


def printable(text: str) -> str:
    """`text` with control characters (escape sequences included) shown as `?`."""
    return text.translate(_CONTROLS)


def tolerant(stream: TextIO) -> TextIO:
    """`stream`, decoding bytes that are not UTF-8 to lone surrogates instead of raising
    (and losing the rest of the read buffer): `Terminal` then skips just that line."""
    try:
        stream.reconfigure(errors="surrogateescape")
    except (AttributeError, ValueError, OSError):  # not a TextIOWrapper, or already read
        pass
    return stream


class Terminal:
    """Reads messages from `stdin` for `session`, answers to `out`, the rest to `err`."""

    def __init__(self, session: ChatSession, stdin: TextIO, out: TextIO, err: TextIO):
        self.session, self.stdin, self.out, self.err = session, stdin, out, err
        self.interactive = stdin.isatty()
        self.dim = err.isatty()

    def info(self, line: str) -> None:
        self.err.write(f"\x1b[2m{line}\x1b[0m\n" if self.dim else line + "\n")
        self.err.flush()

    def answer(self, text: str) -> Turn:
        """Stream one answer; Ctrl-C stops it and keeps the session. A message the
        session refuses outright (UserError) raises before anything is printed."""
        wrote = []
        clean = printable if self.out.isatty() else str

        def show(segment: str) -> None:
            if segment:
                wrote.append(segment)
                self.out.write(clean(segment))
                self.out.flush()

        # Until the stats line is out: a Ctrl-C just after the answer must not end the session.
        with _ctrl_c_stops(self.session):
            turn = self.session.ask(text, show)
            if not wrote or not wrote[-1].endswith("\n"):
                self.out.write("\n")  # one line per message, even a refused one
            self.out.flush()
            for note in turn.notes:
                self.info(note)
            if turn.finish != "skipped":
                self.info(stats_line(turn))
        return turn

    # -- input ---------------------------------------------------------------
    def read_line(self, prompt: str = PROMPT) -> Optional[str]:
        """The next line, without its newline; None at EOF."""
        try:
            if not self.interactive:
                line = self.stdin.readline()
                return line.rstrip("\r\n") if line else None
            if self.out.isatty():
                return input(prompt)
            self.err.write(prompt)  # keep a redirected stdout to answers only
            self.err.flush()
            return input()
        except EOFError:
            self.end_prompt_line()
            return None
        except UnicodeDecodeError:  # a strict stream (chat() makes sys.stdin tolerant)
            return UNREADABLE

    def end_prompt_line(self) -> None:
        """The newline after a prompt left by Ctrl-C or EOF, where the prompt went."""
        stream = self.out if self.out.isatty() else self.err
        stream.write("\n")
        stream.flush()

    def read_message(self, first: str) -> Optional[str]:
        """`first`, or a multi-line message opened with triple quotes."""
        if not first.lstrip().startswith('"""'):
            return first
        text = first.lstrip()[3:]
        lines = []
        while not text.rstrip().endswith('"""'):
            lines.append(text)
            text = self.read_line("... ")
            if text is None:
                return "\n".join(lines) or None
        lines.append(text.rstrip()[:-3])
        return "\n".join(lines).strip("\n")

    # -- the loop ------------------------------------------------------------
    def run(self, banner: str = "") -> None:
        """Read and answer messages until /quit, EOF or a second Ctrl-C at the prompt."""
        if self.interactive:
            try:
                import readline  # noqa: F401 - line editing and history for input()
            except ImportError:
                pass
            if banner:
                self.info(banner)
        interrupted_at_prompt = False
        while True:
            try:
                line = self.read_line()
            except KeyboardInterrupt:
                self.end_prompt_line()
                if interrupted_at_prompt:
                    return
                interrupted_at_prompt = True
                self.info("(Ctrl-C again, Ctrl-D or /quit to leave)")
                continue
            interrupted_at_prompt = False
            if line is None:
                return
            if not line.strip():
                continue
            command = line.startswith("/") and not line.startswith("//")
            if not is_text(line):
                self.unreadable(command)
                continue
            if command:
                reply = run_command(self.session, line)
                if reply is None:
                    return
                for row in reply:
                    self.info(row)
                continue
            try:
                message = self.read_message(line[1:] if line.startswith("//") else line)
            except KeyboardInterrupt:  # at the "... " of a multi-line message
                self.end_prompt_line()
                self.info("(message dropped)")
                continue
            if message and not is_text(message):
                self.unreadable(False)
            elif message:
                try:
                    self.answer(message)
                except UserError as e:  # refused before anything was fed: the session goes on
                    self.out.write("\n")  # one line per message, as for any refused one
                    self.out.flush()
                    self.info(f"{e}; the message is skipped")

    def unreadable(self, command: bool) -> None:
        """A line that is not UTF-8: say so and go on, keeping one stdout line per message."""
        self.info("that line is not valid UTF-8 text: skipped (check the terminal's or the "
                  "file's encoding); the session goes on")
        if not command and not self.interactive:
            self.out.write("\n")
            self.out.flush()


@contextmanager
def _ctrl_c_stops(session: ChatSession):
    """First Ctrl-C: stop the answer after its current token. A second one: at once, if
    tokens are still being generated (the session decides); later ones do nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    presses = 0

    def handler(signum, frame):
        nonlocal presses
        presses += 1
        session.request_stop(now=presses > 1)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
