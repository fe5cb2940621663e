"""The terminal around a ChatSession: input, commands, Ctrl-C, and what is printed.

Answers go to stdout and everything else (banner, stats, notices, command
output) to stderr, so `python chat.py ... < questions.txt > answers.txt` keeps
only the answers. Piped input is one message per line.
"""

import signal
import sys
import threading
from contextlib import contextmanager
from typing import List, Optional, TextIO

from .chat import ChatSession, Turn

PROMPT = ">>> "
HELP = """\
/help            this list
/reset           forget the conversation and empty the KV cache (the system prompt stays)
/system [TEXT]   show the system prompt, or replace it (the conversation stays)
/stats           the last answer's numbers, the context used, distinct experts per layer
/quit            leave (also /exit, /bye, Ctrl-D)
Ctrl-C stops an answer and keeps the session. A line starting with \"\"\" begins a
multi-line message that ends at a line ending with \"\"\". //text sends /text."""


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
    lines = [f"context: {len(session.cache_tokens)} of {session.context} tokens in the KV cache "
             f"({session.kv_bytes() / 2**20:.1f} MiB"
             + (f", {session.kv_bits}-bit" if session.kv_bits else "") + "), "
             f"{len(session.messages) // 2} exchange(s)"]
    turn = session.last
    if turn is None:
        return lines + ["no answer yet"]
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

        def show(segment: str) -> None:
            if segment:
                wrote.append(segment)
                self.out.write(segment)
                self.out.flush()

        with _ctrl_c_stops(self.session):
            turn = self.session.ask(text, show)
        if wrote and not wrote[-1].endswith("\n"):
            self.out.write("\n")
        elif not wrote and turn.finish != "skipped":
            self.out.write("\n")  # one line per answer, even an empty one
        self.out.flush()
        for note in turn.notes:
            self.info(note)
        if turn.finish != "skipped":
            self.info(stats_line(turn))
        return turn

    # -- input ---------------------------------------------------------------
    def read_line(self) -> Optional[str]:
        """The next line, without its newline; None at EOF."""
        if not self.interactive:
            line = self.stdin.readline()
            return line.rstrip("\r\n") if line else None
        try:
            if self.out.isatty():
                return input(PROMPT)
            self.err.write(PROMPT)  # keep a redirected stdout to answers only
            self.err.flush()
            return input()
        except EOFError:
            self.out.write("\n")
            return None

    def read_message(self, first: str) -> Optional[str]:
        """`first`, or a multi-line message opened with triple quotes."""
        if not first.lstrip().startswith('"""'):
            return first
        text = first.lstrip()[3:]
        lines = []
        while not text.rstrip().endswith('"""'):
            lines.append(text)
            text = self.read_line() if not self.interactive else self._continuation()
            if text is None:
                return "\n".join(lines) or None
        lines.append(text.rstrip()[:-3])
        return "\n".join(lines).strip("\n")

    def _continuation(self) -> Optional[str]:
        try:
            return input("... ")
        except EOFError:
            return None

    # -- the loop ------------------------------------------------------------
    def run(self, banner: str = "") -> int:
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
                if interrupted_at_prompt:
                    self.out.write("\n")
                    return 0
                interrupted_at_prompt = True
                self.out.write("\n")
                self.info("(Ctrl-C again, Ctrl-D or /quit to leave)")
                continue
            interrupted_at_prompt = False
            if line is None:
                return 0
            if not line.strip():
                continue
            if line.startswith("/") and not line.startswith("//"):
                if not self.command(line):
                    return 0
                continue
            message = self.read_message(line[1:] if line.startswith("//") else line)
            if message:
                self.answer(message)

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
                session.set_system(arg)
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
    """First Ctrl-C: stop the answer after its current token. A second one: at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    presses = 0

    def handler(signum, frame):
        nonlocal presses
        presses += 1
        if presses > 1:
            raise KeyboardInterrupt
        session.request_stop()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def chat(model: str = "S", variant: Optional[str] = None, revision: Optional[str] = None,
         system: Optional[str] = None, raw: bool = False, temp: float = 0.0,
         top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
         repetition_penalty: Optional[float] = None, max_tokens: int = 1024,
         seed: Optional[int] = None, max_kv_size: Optional[int] = None,
         kv_bits: Optional[int] = None, draft: Optional[str] = None,
         num_draft_tokens: int = 3, prompt: Optional[str] = None,
         stdin: TextIO = None, out: TextIO = None, err: TextIO = None) -> int:
    """Load the model (and draft), then chat on the terminal or answer `prompt` once.

    Returns the exit code (0); input the user can fix raises UserError."""
    import mlx.core as mx

    from .chat import SIZES, Sampling, check_cache_options, load_chat_model, model_source
    from .errors import UserError

    stdin, out, err = stdin or sys.stdin, out or sys.stdout, err or sys.stderr
    check_cache_options(bool(draft), max_kv_size, kv_bits)  # before any download
    if model.upper() in SIZES and variant == "base" and not raw:
        raise UserError(f"MobileMoE-{model.upper()}-Base has no chat template: add --raw to "
                        "continue plain text, or chat with --variant qat or sft")
    source = model_source(model, variant)
    if seed is not None:
        mx.random.seed(seed)
    main_model, tokenizer = load_chat_model(source, raw=raw, revision=revision, kv_bits=kv_bits)
    draft_model = None
    if draft:
        draft_source = model_source(draft, variant if draft.upper() in SIZES else None)
        draft_model, draft_tokenizer = load_chat_model(draft_source, raw=True)
        if (draft_model.args.vocab_size != main_model.args.vocab_size
                or draft_tokenizer.get_vocab() != tokenizer.get_vocab()):
            raise UserError(f"--draft {draft} does not share {source}'s tokenizer; "
                            "speculative decoding needs the same one")
    session = ChatSession(
        main_model, tokenizer, system=system, raw=raw,
        sampling=Sampling(temp, top_p, top_k, min_p, repetition_penalty, max_tokens),
        draft_model=draft_model, num_draft_tokens=num_draft_tokens,
        max_kv_size=max_kv_size, kv_bits=kv_bits)
    terminal = Terminal(session, stdin, out, err)
    if prompt is not None:
        terminal.answer(prompt)
        return 0
    mode = "raw continuation" if raw else "chat"
    return terminal.run(
        f"{source} ({mode}, context {session.context} tokens"
        + (f", draft {draft}" if draft else "") + "). /help for commands, Ctrl-D to quit.")
