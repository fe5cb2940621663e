"""The chat command line: `mobilemoe-chat` once installed, `python chat.py` from a checkout.

    python chat.py --model S                       # facebook/MobileMoE-S-QAT
    python chat.py --model L --kv-bits 8 --draft S
    python chat.py --model mlx/MobileMoE-S --prompt "Name three prime numbers."
    python chat.py --model S --variant base --raw   # plain continuation
    python chat.py --model S < questions.txt        # one message per line
"""

import math
import sys
from typing import TextIO

import click

from ..errors import OneLineCommand, run_cli
from .options import MIN_KV_SIZE, SEED_MAX, ChatOptions


class Finite(click.FloatRange):
    """A FloatRange that also refuses nan and inf: nan passes every range check
    (it compares false with any bound) and would sample garbage without a word."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


@click.command(cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", "-m", default="S", show_default=True,
              help="S, M or L, any case (facebook/MobileMoE-{S,M,L}-QAT), a Hub repo id, a checkpoint "
                   "directory or weights file, or a converted MLX directory.")
@click.option("--variant", type=click.Choice(["qat", "sft", "base"]), default=None,
              help="Release of --model S|M|L: qat (INT4, the default), sft (bf16, quantized "
                   "to INT4 when converted) or base (no chat template: needs --raw).")
@click.option("--revision", default=None, help="Hub branch, tag or commit.")
@click.option("--system", default=None, help="System prompt (not with --raw).")
@click.option("--raw", is_flag=True,
              help="No chat template: each message is continued as plain text.")
@click.option("--temp", type=Finite(min=0), default=0.0, show_default=True,
              help="Sampling temperature; 0 is greedy (the same answer every time).")
@click.option("--top-p", type=Finite(0, 1), default=1.0, show_default=True,
              help="Nucleus sampling; 1 is off.")
@click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True,
              help="Sample among the k most likely tokens; 0 is off.")
@click.option("--min-p", type=Finite(0, 1), default=0.0, show_default=True,
              help="Drop tokens below this fraction of the top token's probability; 0 is off.")
@click.option("--repetition-penalty", type=Finite(min=0, min_open=True), default=None,
              help="Penalise tokens of the last 20; above 1 makes repeating them less likely.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=1024, show_default=True,
              help="Longest answer, in tokens.")
@click.option("--seed", type=click.IntRange(0, SEED_MAX), default=None,
              help="Random seed for sampling (0 to 2**64-1).")
@click.option("--max-kv-size", type=click.IntRange(min=MIN_KV_SIZE), default=None,
              help="Keep only this many tokens in a rotating KV cache (the oldest are "
                   "forgotten, except the first 4).")
@click.option("--kv-bits", type=click.Choice(["4", "8"]), default=None,
              help="Quantize the KV cache to 4 or 8 bits (the paper's memory model assumes 8).")
@click.option("--draft", default=None,
              help="Speculative decoding with a smaller MobileMoE: S, M or a path / repo id.")
@click.option("--num-draft-tokens", type=click.IntRange(min=1), default=3, show_default=True,
              help="Tokens the draft model proposes per step.")
@click.option("--prompt", "-p", default=None, help="Answer this one message and exit.")
@click.option("--verbose", is_flag=True, help="Show tracebacks on errors.")
def main(verbose, model, variant, revision, seed, draft, prompt, system, raw, num_draft_tokens,
         max_kv_size, kv_bits, **sampling):
    """Chat with a MobileMoE model: streamed answers, KV cache kept across turns.

    Inside the chat: /help, /reset, /system TEXT, /stats, /quit. Ctrl-C stops an
    answer, Ctrl-D leaves. Answers go to stdout, everything else to stderr."""
    def run():
        from .options import Sampling, SessionOptions

        session = SessionOptions(
            system=system, raw=raw, sampling=Sampling(**sampling), speculative=draft is not None,
            num_draft_tokens=num_draft_tokens, max_kv_size=max_kv_size,
            kv_bits=int(kv_bits) if kv_bits else None)
        chat(ChatOptions(model=model, variant=variant, revision=revision, session=session,
                         seed=seed, draft=draft, prompt=prompt))

    run_cli(run, verbose)


def chat(options: ChatOptions, stdin: TextIO = None, out: TextIO = None,
         err: TextIO = None) -> None:
    """Load the model (and draft), then chat on the terminal or answer `options.prompt` once.

    Input the user can fix raises UserError, as far as possible before anything is
    loaded; so does a `--prompt` the session refuses (token ids the model lacks)."""
    import mlx.core as mx

    from ..model.runtime import current as current_runtime
    from .loader import activation_dtype, load_models
    from .session import ChatSession
    from .terminal import Terminal, tolerant

    source, draft_source = options.sources()
    if options.seed is not None:
        mx.random.seed(options.seed)
    main_model, tokenizer, draft_model = load_models(options, source, draft_source)
    session = ChatSession(main_model, tokenizer, options.session, draft_model=draft_model)
    terminal = Terminal(session, stdin or tolerant(sys.stdin), out or sys.stdout,
                        err or sys.stderr)
    if options.prompt is not None:
        terminal.answer(options.prompt)
        return
    mode = "raw continuation" if session.raw else "chat"
    terminal.run(
        f"{source} ({mode}, {current_runtime().backend} in {activation_dtype(main_model)}, "
        f"context {session.context} tokens"
        + (f", draft {options.draft}" if options.draft else "")
        + "). /help for commands, Ctrl-D to quit.")
