"""Chat settings and the checks on them that need no model: sampling values,
the seed, the option pairs mlx-lm's caches cannot serve, and text that is not
UTF-8. chat.py's click options check the same ranges; these are the checks for
library callers and the one place the limits are written down. `SessionOptions`
(a conversation's settings) and `ChatOptions` (everything chat.py's command
line sets) run them when they are made, so a settings object that exists has
passed them, once, before any model is fetched or loaded."""

import math
from dataclasses import dataclass, field
from typing import Optional, Tuple

from ..errors import UserError

SEED_MAX = 2**64 - 1  # mx.random.seed takes an unsigned 64-bit integer
MIN_KV_SIZE = 8  # a rotating cache keeps the first 4 tokens: fewer leaves nothing to rotate


@dataclass
class Sampling:
    temp: float = 0.0  # greedy: the same answer every time
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: Optional[float] = None
    max_tokens: int = 1024


def check_options(draft: bool, max_kv_size: Optional[int], kv_bits: Optional[int],
                  raw: bool = False, system: Optional[str] = None) -> None:
    """The option pairs that cannot work together: what mlx-lm's caches cannot
    serve, and a system prompt where there is no template to put it in."""
    if raw and system is not None:
        raise UserError("--system has no effect with --raw (plain continuation has no "
                        "system prompt): leave one of them out")
    if draft and max_kv_size is not None:
        raise UserError("--draft needs a cache it can rewind: leave out --max-kv-size")
    if kv_bits is not None and max_kv_size is not None:
        raise UserError("mlx-lm has no quantized rotating cache: use --kv-bits or --max-kv-size")
    if max_kv_size is not None and max_kv_size < MIN_KV_SIZE:  # click checks the CLI
        raise UserError(f"--max-kv-size must be at least {MIN_KV_SIZE} tokens (the rotating "
                        f"cache always keeps the first 4), not {max_kv_size}")


def check_sampling(s: Sampling) -> None:
    """Sampling settings mlx-lm would take without a word but cannot sample with:
    NaN or infinite values (which pass any range check), and out-of-range ones.
    chat.py's options check the same; this is for library callers."""
    floats = {"--temp": s.temp, "--top-p": s.top_p, "--min-p": s.min_p,
              "--repetition-penalty": s.repetition_penalty}
    for option, value in floats.items():
        if value is not None and not math.isfinite(value):
            raise UserError(f"{option} must be a finite number, not {value}")
    if s.temp < 0 or not 0 <= s.top_p <= 1 or not 0 <= s.min_p <= 1:
        raise UserError("--temp must be 0 or more, --top-p and --min-p between 0 and 1")
    if s.repetition_penalty is not None and s.repetition_penalty <= 0:
        raise UserError(f"--repetition-penalty must be above 0, not {s.repetition_penalty}")
    if s.top_k < 0 or s.max_tokens < 1:
        raise UserError("--top-k must be 0 or more and --max-tokens at least 1")


def check_seed(seed: Optional[int]) -> None:
    """mx.random.seed takes an unsigned 64-bit integer; anything else is a TypeError there."""
    if seed is not None and not 0 <= seed <= SEED_MAX:
        raise UserError(f"--seed must be between 0 and 2**64-1, not {seed}")


def kv_group_size(head_dim: int, kv_bits: Optional[int]) -> int:
    if kv_bits is None:
        return 64
    if kv_bits not in (4, 8):  # click checks --kv-bits; this is for library callers
        raise UserError(f"--kv-bits must be 4 or 8, not {kv_bits}")
    for group in (64, 32):  # the group sizes MLX's quantized attention takes
        if head_dim % group == 0:
            return group
    raise UserError(f"--kv-bits needs a head_dim divisible by 32; this model's is {head_dim}")


@dataclass(frozen=True)
class SessionOptions:
    """How a ChatSession is set up; checked when made (a bad value raises UserError)."""

    system: Optional[str] = None  # system prompt
    raw: bool = False  # no chat template: each message is continued as plain text
    sampling: Optional[Sampling] = field(default_factory=Sampling)
    speculative: bool = False  # a draft model proposes tokens (chat's --draft)
    num_draft_tokens: int = 3
    max_kv_size: Optional[int] = None  # a rotating KV cache of this many tokens
    kv_bits: Optional[int] = None  # 4 or 8: a quantized KV cache

    def __post_init__(self):
        if self.sampling is None:  # what library callers passed for "the defaults"
            object.__setattr__(self, "sampling", Sampling())
        check_options(self.speculative, self.max_kv_size, self.kv_bits, self.raw, self.system)
        check_sampling(self.sampling)
        if self.num_draft_tokens < 1:  # click checks the CLI
            raise UserError(f"--num-draft-tokens must be at least 1, not {self.num_draft_tokens}")


def is_text(text: str) -> bool:
    """False for a string holding lone surrogates: bytes that were not valid UTF-8
    (Python decodes command-line arguments and, in the chat, stdin with surrogateescape)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


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
        from ..checkpoints.hub import release_repo

        check_seed(self.seed)
        for option, text in (("--prompt", self.prompt), ("--system", self.session.system)):
            if text is not None and not is_text(text):
                raise UserError(f"{option} is not valid UTF-8 text: check the terminal's or "
                                "the shell's encoding")
        if self.prompt is not None and not self.prompt.strip():
            raise UserError("--prompt is empty: give a message, or leave --prompt out to chat")
        base = release_repo(self.model, "base") if self.variant == "base" else None
        if base is not None and not self.session.raw:
            raise UserError(f"{base.split('/')[1]} has no chat template: add "
                            "--raw to continue plain text, or chat with --variant qat or sft")
        if self.session.speculative != (self.draft is not None):
            raise ValueError("session.speculative must say whether there is a draft")

    def sources(self) -> Tuple[str, Optional[str]]:
        """The model's source and the draft's (None without --draft), each checked
        to be a path or a repo id before anything is fetched."""
        from ..checkpoints.hub import model_source, release_repo
        from ..checkpoints.loading import check_source_argument

        source = model_source(self.model, self.variant)
        check_source_argument(source, "--model")
        if self.draft is None:
            return source, None
        draft = model_source(self.draft, self.variant if release_repo(self.draft) else None)
        check_source_argument(draft, "--draft")
        return source, draft
