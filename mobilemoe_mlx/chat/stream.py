"""One answer streamed through mlx-lm's `stream_generate`, and the switch Ctrl-C pulls.

Sampling, logits processors, the prompt cache, the quantized KV cache and
speculative decoding are all mlx-lm's; this module runs one answer through
them until a stop token, the length limit or a stop request, and records what
the model was fed, so the conversation (chat.py) can bring its cache record
and history up to date afterwards. Nothing here reads or prints: the text
goes to a callback.
"""

import contextlib
from dataclasses import dataclass, field
from typing import Callable, ContextManager, List, Optional, Tuple

import mlx.core as mx

from ..model.runtime import current as current_runtime


class _Stop(Exception):
    """Raised from mlx-lm's prefill progress callback to stop between chunks."""


class StopSwitch:
    """How a Ctrl-C reaches a running answer; `request` is safe from a signal handler.

    A first request stops the answer after its current token (or between prefill
    chunks). A second one (`now`) stops at once by raising KeyboardInterrupt, but
    only while tokens are being generated, and only once: never while the cache
    and the conversation are being brought up to date after an answer."""

    def __init__(self):
        self.requested = False
        self.generating = False  # request(now=True) may raise only while this is set

    def request(self, now: bool = False) -> None:
        self.requested = True
        if now and self.generating:
            self.generating = False
            raise KeyboardInterrupt

    def check_prefill(self, processed: int, total: int) -> None:
        # Called by mlx-lm between prefill chunks, when the cache is consistent.
        if self.requested and processed < total:
            raise _Stop


@dataclass
class Turn:
    """One answer and its numbers, as the chat reports them."""

    text: str = ""
    tokens: List[int] = field(default_factory=list)  # the answer's, without the stop token
    prefilled: int = 0  # prompt tokens fed to the model for this turn
    finish: str = ""  # "stop", "length", "interrupted" or "skipped"
    ended: str = "max tokens reached"  # what a "length" finish hit: --max-tokens or the context
    generation_tokens: int = 0
    prompt_tps: float = 0.0
    generation_tps: float = 0.0
    peak_memory_gb: float = 0.0
    accepted: int = 0  # draft tokens accepted
    drafted: int = 0  # draft tokens checked by the model
    experts: Optional[List[Tuple[int, int]]] = None
    notes: List[str] = field(default_factory=list)

    def take(self, run: "Generation", max_tokens: int, num_draft: Optional[int]) -> None:
        """The finish reason and numbers of a finished generation; `num_draft` is
        the tokens a draft model proposes per round, None without one."""
        self.finish = "interrupted"
        if run.response is not None:
            r = run.response
            self.finish = r.finish_reason or "interrupted"
            self.generation_tokens = n = r.generation_tokens
            self.prompt_tps = r.prompt_tps
            # mlx-lm starts the generation clock once the first token is out but counts
            # that token: its rate is n tokens over n - 1 steps. Ours is the steps'.
            self.generation_tps = r.generation_tps * (n - 1) / n if n >= 2 else 0.0
            self.peak_memory_gb = r.peak_memory
        if run.stopped or run.hard_stop:
            self.finish = "interrupted"
        if num_draft is not None:
            self.accepted, self.drafted = draft_acceptance(run.flags, num_draft, max_tokens)


@dataclass
class Generation:
    """What one streamed answer left behind."""

    fed: List[int] = field(default_factory=list)  # every token the model was fed back
    flags: List[bool] = field(default_factory=list)  # from_draft, per token
    tokens: List[int] = field(default_factory=list)  # the answer's, without the stop token
    text: str = ""
    response: object = None  # mlx-lm's last GenerationResponse
    stopped: bool = False  # a first stop request (Ctrl-C) ended it
    hard_stop: bool = False  # a second Ctrl-C broke out: the caches may be mid-update


def stream_answer(model, tokenizer, prompt: List[int], caches: list, max_tokens: int,
                  stop: StopSwitch, on_text: Callable[[str], None], *, sampler,
                  logits_processors=None, draft_model=None, num_draft_tokens: int = 3,
                  recording: Optional[ContextManager] = None) -> Generation:
    """Feed `prompt` (the tokens `caches` do not hold yet) and stream the answer to
    `on_text` until a stop token, `max_tokens` or a stop request. The stream is
    closed, and mlx-lm's cleanup (the speculative cache rewind) run, on return."""
    from mlx_lm.generate import stream_generate

    run = Generation()
    stop.requested = False
    mx.reset_peak_memory()
    stream = stream_generate(
        model, tokenizer, mx.array(prompt), max_tokens=max_tokens,
        draft_model=draft_model, num_draft_tokens=num_draft_tokens,
        sampler=sampler, logits_processors=logits_processors,
        prompt_cache=caches, prompt_progress_callback=stop.check_prefill,
        prefill_step_size=current_runtime().prefill_chunk)
    try:
        with recording or contextlib.nullcontext():
            stop.generating = True  # a second Ctrl-C may raise from here on ...
            try:
                for run.response in stream:
                    run.fed.append(run.response.token)
                    run.flags.append(run.response.from_draft)
                    if run.response.finish_reason != "stop":
                        run.tokens.append(run.response.token)
                    run.text += run.response.text
                    on_text(run.response.text)
                    if stop.requested:
                        break
            except _Stop:
                pass
            finally:
                stop.generating = False  # ... up to here
                run.stopped = stop.requested  # a later Ctrl-C stops nothing
                stream.close()
    except KeyboardInterrupt:  # a second Ctrl-C
        run.hard_stop = True
        stop.generating = False
        stream.close()
    return run


def draft_acceptance(from_draft: List[bool], num_draft: int, max_tokens: int) -> Tuple[int, int]:
    """(accepted, drafted) from the flags of the tokens mlx-lm yielded.

    Each verification round yields the accepted draft tokens, then one token of
    the model's own; a round drafts min(num_draft, tokens still allowed). A last
    round cut off by a stop token counts only the draft tokens seen."""
    accepted = drafted = run = done = 0
    for flag in from_draft:
        if flag:
            run += 1
        else:
            drafted += min(num_draft, max_tokens - done)
            done += run + 1
            run = 0
        accepted += flag
    return accepted, drafted + run
