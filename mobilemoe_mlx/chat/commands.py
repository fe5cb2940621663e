"""What the chat's /commands do to the conversation, and the text they and the
stats line say. Nothing here reads or prints: `run_command` returns the lines
for the terminal (chat/terminal.py) to print."""

from typing import List, Optional

from ..errors import UserError
from .session import ChatSession, Turn

HELP = """\
/help            this list
/reset           forget the conversation and empty the KV cache (the system prompt stays)
/system [TEXT]   show the system prompt, or replace it (the conversation stays)
/stats           the last answer's numbers, the context used, distinct experts per layer
/quit            leave (also /exit, /bye, Ctrl-D)
Ctrl-C stops an answer and keeps the session. A line starting with \"\"\" begins a
multi-line message that ends at a line ending with \"\"\". //text sends /text."""


def run_command(session: ChatSession, line: str) -> Optional[List[str]]:
    """Run the /command `line` on `session`: the lines to show, or None to leave."""
    name, _, arg = line.partition(" ")
    name, arg = name.lower(), arg.strip()
    if name in ("/quit", "/exit", "/bye"):
        return None
    if name in ("/help", "/?"):
        return [HELP]
    if name == "/reset":
        session.reset()
        return ["conversation and KV cache cleared"]
    if name == "/system":
        return [_system(session, arg)]
    if name == "/stats":
        return stats_report(session)
    return [f"unknown command {name}; /help lists them (//text sends /text)"]


def _system(session: ChatSession, text: str) -> str:
    if session.raw:
        return "there is no system prompt in --raw mode"
    if not text:
        return (f"system prompt: {session.system!r}" if session.system
                else "no system prompt (/system TEXT sets one)")
    try:
        session.set_system(text)
    except UserError as e:
        return f"{e}; the system prompt stays as it was"
    return "system prompt replaced; the next answer re-reads the conversation"


def stats_line(turn: Turn) -> str:
    """The one line printed after each answer."""
    if turn.finish == "interrupted" and not turn.generation_tokens:
        return f"stopped while reading the {turn.prefilled}-token prompt (the message is not kept)"
    parts = [f"{turn.generation_tokens} tokens",
             f"prompt {turn.prefilled} tok" + _at(rate(turn.prefilled, turn.prompt_tps)),
             (f"generation {rate(turn.generation_tokens, turn.generation_tps)}"
              if turn.generation_tokens >= 2 else "no generation rate from one token"),
             f"peak memory {_size(turn.peak_memory_gb)}"]
    if turn.drafted or turn.accepted:
        parts.append(f"draft accepted {turn.accepted}/{turn.drafted} "
                     f"({100 * turn.accepted / max(turn.drafted, 1):.0f}%)")
    if turn.finish in ("interrupted", "length"):
        parts.append("stopped" if turn.finish == "interrupted" else turn.ended)
    return ", ".join(parts)


def rate(tokens: int, per_second: float) -> str:
    """"N tok/s", or "" from fewer than two tokens: no rate is shown from one
    token (a one-token answer's generation clock runs over next to no time:
    it read 4044.8 tok/s). bench's decode rates follow the same rule."""
    return f"{per_second:.1f} tok/s" if tokens >= 2 else ""


def _at(shown: str) -> str:
    return f" at {shown}" if shown else ""


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
