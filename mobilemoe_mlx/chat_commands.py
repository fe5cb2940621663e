"""The terminal around a ChatSession: input, commands, Ctrl-C, and what is printed.

Answers go to stdout and everything else (banner, prompts, stats, notices,
command output) to stderr, so `python chat.py ... < questions.txt > answers.txt`
keeps only the answers, each ending with a newline (an empty line for a message
that was refused). Piped input is one message per line. On a terminal, control
characters in an answer are shown as `?`; a pipe gets the text as generated.
"""

import signal
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import List, Optional, TextIO, Tuple

from .chat import ChatSession, Turn, activation_dtype
from .chat_options import SessionOptions, check_seed
from .errors import UserError
from .runtime import current as current_runtime

PROMPT = ">>> "
# What read_line returns for a line a strict stream could not decode: a lone
# surrogate, like the bytes a tolerant stream (surrogateescape) decodes to.
UNREADABLE = "\udcff"
HELP = """\
/help            this list
/reset           forget the conversation and empty the KV cache (the system prompt stays)
/system [TEXT]   show the system prompt, or replace it (the conversation stays)
/stats           the last answer's numbers, the context used, distinct experts per layer
/quit            leave (also /exit, /bye, Ctrl-D)
Ctrl-C stops an answer and keeps the session. A line starting with \"\"\" begins a
multi-line message that ends at a line ending with \"\"\". //text sends /text."""


# C0 controls but newline and tab, DEL and C1 controls (\x9b is CSI on some terminals).
_CONTROLS = {c: "?" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0)) if chr(c) not in "\n\t"}


def printable(text: str) -> str:
    """`text` with control characters (escape sequences included) shown as `?`."""
    return text.translate(_CONTROLS)


def stats_line(turn: Turn) -> str:
    """The one line printed after each answer."""
    if turn.finish == "interrupted" and not turn.generation_tokens:
        return f"stopped while reading the {turn.prefilled}-token prompt (the message is not kept)"
    parts = [f"{turn.generation_tokens} tokens",
             f"prompt {turn.prefilled} tok at {turn.prompt_tps:.1f} tok/s",
             f"generation {turn.generation_tps:.1f} tok/s",
             f"peak memory {_size(turn.peak_memory_gb)}"]
    if turn.drafted or turn.accepted:
        parts.append(f"draft accepted {turn.accepted}/{turn.drafted} "
                     f"({100 * turn.accepted / max(turn.drafted, 1):.0f}%)")
    if turn.finish in ("interrupted", "length"):
        parts.append("stopped" if turn.finish == "interrupted" else "max tokens reached")
    return ", ".join(parts)


def _size(gb: float) -> str:
    return f"{gb:.2f} GB" if gb >= 1 else f"{gb * 1000:.1f} MB"


def stats_report(session: ChatSession) -> List[str]:
    """What /stats prints."""
    size = f"{session.kv_bytes() / 2**20:.1f} MiB" + (
        f", {session.kv_bits}-bit" if session.kv_bits else "")
    read = len(session.cache_tokens)
    if session.max_kv_size:
        held = (f"{session.cache_held()} kept of {read} tokens read (rotating KV cache of "
                f"{session.max_kv_size}, {size})")
    else:
        held = f"{read} of {session.context} tokens in the KV cache ({size})"
    lines = [f"context: {held}, {len(session.messages) // 2} exchange(s)"]
    turn = session.last
    if turn is None:
        return lines + ["no answer since /reset" if session.resets else "no answer yet"]
    lines.append("last answer: " + stats_line(turn))
    if turn.experts and session.expert_log:
        total = session.expert_log.num_experts
        lines.append(f"distinct routed experts per layer (of {total}), answer / prompt tokens:")
        cells = [f"L{i}: {a}/{p}" for i, (a, p) in enumerate(turn.experts)]
        lines += ["  " + "  ".join(cells[i:i + 8]) for i in range(0, len(cells), 8)]
    return lines


class Terminal:
    def __init__(self, session: ChatSession, stdin: TextIO, out: TextIO, err: TextIO):
        self.session, self.stdin, self.out, self.err = session, stdin, out, err
        self.interactive = stdin.isatty()
        self.dim = err.isatty()

    def info(self, line: str) -> None:
        self.err.write(f"\x1b[2m{line}\x1b[0m\n" if self.dim else line + "\n")
        self.err.flush()

    def answer(self, text: str) -> Turn:
        """Stream one answer; Ctrl-C stops it and keeps the session."""
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
                if not self.command(line):
                    return
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
                self.answer(message)

    def unreadable(self, command: bool) -> None:
        """A line that is not UTF-8: say so and go on, keeping one stdout line per message."""
        self.info("that line is not valid UTF-8 text: skipped (check the terminal's or the "
                  "file's encoding); the session goes on")
        if not command and not self.interactive:
            self.out.write("\n")
            self.out.flush()

    def command(self, line: str) -> bool:
        """Run a /command; False means leave."""
        name, _, arg = line.partition(" ")
        name, arg, session = name.lower(), arg.strip(), self.session
        if name in ("/quit", "/exit", "/bye"):
            return False
        if name in ("/help", "/?"):
            self.info(HELP)
        elif name == "/reset":
            session.reset()
            self.info("conversation and KV cache cleared")
        elif name == "/system":
            if session.raw:
                self.info("there is no system prompt in --raw mode")
            elif arg:
                try:
                    session.set_system(arg)
                except UserError as e:
                    self.info(f"{e}; the system prompt stays as it was")
                else:
                    self.info("system prompt replaced; the next answer re-reads the conversation")
            else:
                self.info(f"system prompt: {session.system!r}" if session.system
                          else "no system prompt (/system TEXT sets one)")
        elif name == "/stats":
            for row in stats_report(session):
                self.info(row)
        else:
            self.info(f"unknown command {name}; /help lists them (//text sends /text)")
        return True


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


@dataclass(frozen=True)
class ChatOptions:
    """Everything chat.py's command line sets, checked once, when made: what
    needs no model is refused before anything is downloaded, converted or loaded."""

    model: str = "S"  # S, M, L, a Hub repo id, or a path
    variant: Optional[str] = None  # the release of S, M or L: qat, sft or base
    revision: Optional[str] = None
    session: SessionOptions = field(default_factory=SessionOptions)  # checked when it was made
    seed: Optional[int] = None
    draft: Optional[str] = None  # the draft model: S, M, a Hub repo id, or a path
    prompt: Optional[str] = None  # answer this one message and exit

    def __post_init__(self):
        from .chat import SIZES

        check_seed(self.seed)
        for option, text in (("--prompt", self.prompt), ("--system", self.session.system)):
            if text is not None and not is_text(text):
                raise UserError(f"{option} is not valid UTF-8 text: check the terminal's or "
                                "the shell's encoding")
        if self.prompt is not None and not self.prompt.strip():
            raise UserError("--prompt is empty: give a message, or leave --prompt out to chat")
        if self.model.upper() in SIZES and self.variant == "base" and not self.session.raw:
            raise UserError(f"MobileMoE-{self.model.upper()}-Base has no chat template: add "
                            "--raw to continue plain text, or chat with --variant qat or sft")
        if self.session.speculative != (self.draft is not None):
            raise ValueError("session.speculative must say whether there is a draft")

    def sources(self) -> Tuple[str, Optional[str]]:
        """The model's source and the draft's (None without --draft), each checked
        to be a path or a repo id before anything is fetched."""
        from .chat import SIZES, model_source
        from .loading import check_source_argument

        source = model_source(self.model, self.variant)
        check_source_argument(source, "--model")
        if self.draft is None:
            return source, None
        draft = model_source(self.draft, self.variant if self.draft.upper() in SIZES else None)
        check_source_argument(draft, "--draft")
        return source, draft


def chat(options: ChatOptions, stdin: TextIO = None, out: TextIO = None,
         err: TextIO = None) -> None:
    """Load the model (and draft), then chat on the terminal or answer `options.prompt` once.

    Input the user can fix raises UserError, as far as possible before anything is loaded."""
    import mlx.core as mx

    source, draft_source = options.sources()
    if options.seed is not None:
        mx.random.seed(options.seed)
    main_model, tokenizer, draft_model = _load_models(options, source, draft_source)
    session = ChatSession(main_model, tokenizer, options.session, draft_model=draft_model)
    stdin = stdin or _tolerant(sys.stdin)
    terminal = Terminal(session, stdin, out or sys.stdout, err or sys.stderr)
    if options.prompt is not None:
        terminal.answer(options.prompt)
        return
    mode = "raw continuation" if session.raw else "chat"
    terminal.run(
        f"{source} ({mode}, {current_runtime().backend} in {activation_dtype(main_model)}, "
        f"context {session.context} tokens"
        + (f", draft {options.draft}" if options.draft else "")
        + "). /help for commands, Ctrl-D to quit.")


def _load_models(options: ChatOptions, source: str, draft_source: Optional[str]):
    """(model, tokenizer, draft model or None), the system prompt checked against the
    model's context before the draft model loads."""
    from .chat import check_system_fits, load_chat_model

    raw, system, kv_bits = options.session.raw, options.session.system, options.session.kv_bits
    main_model, tokenizer = load_chat_model(source, raw=raw, revision=options.revision,
                                            kv_bits=kv_bits)
    if not raw:
        check_system_fits(tokenizer, system, main_model.args.max_position_embeddings)
    if draft_source is None:
        return main_model, tokenizer, None
    draft_model, draft_tokenizer = load_chat_model(draft_source, raw=True)
    if (draft_model.args.vocab_size != main_model.args.vocab_size
            or draft_tokenizer.get_vocab() != tokenizer.get_vocab()):
        raise UserError(f"--draft {options.draft} does not share {source}'s tokenizer; "
                        "speculative decoding needs the same one")
    return main_model, tokenizer, draft_model


def _tolerant(stream: TextIO) -> TextIO:
    """`stream`, decoding bytes that are not UTF-8 to lone surrogates instead of raising
    (and losing the rest of the read buffer): `Terminal` then skips just that line."""
    try:
        stream.reconfigure(errors="surrogateescape")
    except (AttributeError, ValueError, OSError):  # not a TextIOWrapper, or already read
        pass
    return stream


def is_text(text: str) -> bool:
    """False for a string holding lone surrogates: bytes that were not valid UTF-8
    (Python decodes command-line arguments and, here, stdin with surrogateescape)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
