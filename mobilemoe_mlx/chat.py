"""A chat session over mlx-lm's generation, with the KV cache kept across turns.

`ChatSession.ask()` renders the conversation with the tokenizer's chat
template, feeds the model only the tokens its cache does not hold yet, and
streams the answer through mlx-lm's `stream_generate`: sampling, logits
processors, the prompt cache, the quantized KV cache and speculative decoding
are all mlx-lm's. The terminal around it is chat_commands.py.

How the cache is kept (the part that is easy to get wrong):
- `cache_tokens` is exactly what the KV cache holds; after every answer it is
  re-read from the caches' offsets, so an interrupted answer, a stop token fed
  or not, or a speculative rewind can never leave the two out of step.
- `history_text` / `history_tokens` are the rendered conversation so far and
  the tokens that stand for it: the answer's own tokens, not a re-encoding of
  its text (a re-encoding can differ and would re-prefill the whole answer).
- A turn's prompt is `history_tokens` + the encoded text the template adds for
  the new message. The cache is trimmed to the longest prefix it shares with
  that, and only the rest is prefilled; a changed system prompt or dropped
  turns thus re-prefill only from the first token that differs.
"""

import contextlib
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import mlx.core as mx

from .chat_options import (  # noqa: F401 - MIN_KV_SIZE, SEED_MAX, check_seed: part of the API
    MIN_KV_SIZE,
    SEED_MAX,
    Sampling,
    SessionOptions,
    check_seed,
    kv_group_size,
)
from .errors import UserError
from .planner import PREFILL_CHUNK
from .routing import ExpertRecorder

SIZES = ("S", "M", "L")
VARIANTS = {"qat": "QAT", "sft": "SFT", "base": "Base"}
STOP_TOKENS = ("<|eot_id|>", "<|end_of_text|>")


def model_source(model: str, variant: Optional[str] = None) -> str:
    """`S`, `M` or `L` -> the released repo of `variant` (default qat); anything else as given."""
    if model.upper() in SIZES and not Path(model).exists():
        return f"facebook/MobileMoE-{model.upper()}-{VARIANTS[variant or 'qat']}"
    if variant is not None:
        raise UserError(f"--variant picks a release of --model S, M or L, not of {model}")
    return model


def load_chat_model(source: str, raw: bool = False, revision: Optional[str] = None,
                    progress: bool = True, kv_bits: Optional[int] = None):
    """`load()` plus what chat needs: a chat template (unless `raw`), every stop
    token, and decoding without `clean_up_tokenization_spaces`. Warns first when
    the model at full context will not fit this machine's memory."""
    from .loading import load
    from .planner import fits_warning

    def before_converting(config: dict, folder: Path) -> None:
        # What the loaded model would be refused for, refused before a conversion runs.
        if not raw and not ships_chat_template(folder):
            raise _no_chat_template(source)
        kv_group_size(config["head_dim"], kv_bits)

    model, tokenizer = load(source, revision=revision, lazy=True, progress=progress,
                            before_converting=before_converting)
    # Weights are still on disk (lazy): this is the moment to warn.
    warning = fits_warning(asdict(model.args), model.args.max_position_embeddings, kv_bits=kv_bits,
                           dtype=activation_dtype(model))
    if warning and progress:
        print(f"warning: {warning}; expect swapping or a failed load", file=sys.stderr)
    if not raw and not tokenizer.has_chat_template:
        raise _no_chat_template(source)
    mx.eval(model.parameters())
    vocab = tokenizer.get_vocab()
    for token in STOP_TOKENS:
        if token in vocab:
            tokenizer.add_eos_token(token)
    # `SELECT ?s` must not come out as `SELECT?s` (docs/architecture.md section 3).
    tokenizer._tokenizer.clean_up_tokenization_spaces = False
    # The session measures prompts against the context itself; transformers' warning
    # about encoding more than model_max_length tokens would only be a stray stderr line.
    tokenizer._tokenizer.model_max_length = sys.maxsize
    return model, tokenizer


def _no_chat_template(source: str) -> UserError:
    return UserError(
        f"{source} has no chat template (Base checkpoints have none): add --raw to "
        "continue plain text instead, or pick an instruction-tuned model (--variant qat or sft)")


def ships_chat_template(folder: Path) -> bool:
    """Whether a checkpoint directory has a chat template in a file the converter
    copies (chat_template.jinja or .json, or tokenizer_config.json's chat_template).
    A tokenizer_config.json that cannot be read counts as yes: the loaded
    tokenizer then decides (and its reader says what is wrong)."""
    if any((folder / name).is_file() for name in ("chat_template.jinja", "chat_template.json")):
        return True
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return False
    except (OSError, ValueError):
        return True
    return not isinstance(config, dict) or bool(config.get("chat_template"))


@dataclass
class Turn:
    """One answer and its numbers."""

    text: str = ""
    tokens: List[int] = field(default_factory=list)  # the answer's, without the stop token
    prefilled: int = 0  # prompt tokens fed to the model for this turn
    finish: str = ""  # "stop", "length", "interrupted" or "skipped"
    generation_tokens: int = 0
    prompt_tps: float = 0.0
    generation_tps: float = 0.0
    peak_memory_gb: float = 0.0
    accepted: int = 0  # draft tokens accepted
    drafted: int = 0  # draft tokens checked by the model
    experts: Optional[List[Tuple[int, int]]] = None
    notes: List[str] = field(default_factory=list)


def system_prompt_tokens(tokenizer, system: Optional[str]) -> int:
    """Tokens of the smallest prompt with this system prompt: it, an empty
    message and the assistant header, as the chat template renders them."""
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": ""}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return len(tokenizer.encode(text, add_special_tokens=False))


def check_system_fits(tokenizer, system: Optional[str], context: int) -> None:
    """A system prompt that leaves no room for a message and an answer token is refused."""
    if system and (n := system_prompt_tokens(tokenizer, system)) >= context:
        raise UserError(f"the system prompt alone does not fit the {context}-token context "
                        f"(with the template around it, it takes {n} tokens): shorten it")


class _Stop(Exception):
    pass


def _common_prefix(a: List[int], b: List[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


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


class ChatSession:
    """A conversation with one model: messages, the KV cache and the settings.

    Args:
        model, tokenizer: from `load_chat_model` (or `mobilemoe_mlx.load`).
        options: a SessionOptions (checked when it was made), or its fields as
            keywords: system prompt, `raw` (no template: each message is continued
            as text), sampling, num_draft_tokens, max_kv_size (a rotating cache,
            mlx-lm's), kv_bits (4 or 8: the KV cache quantized from the first token).
        draft_model: a smaller model with the same tokenizer for speculative decoding.
    """

    def __init__(self, model, tokenizer, options: Optional[SessionOptions] = None,
                 draft_model=None, **settings):
        from mlx_lm.sample_utils import make_logits_processors, make_sampler

        if options is None:
            options = SessionOptions(speculative=draft_model is not None, **settings)
        elif settings or options.speculative != (draft_model is not None):
            raise TypeError("pass options or keyword settings, not both, and a draft_model "
                            "exactly when options.speculative is set")
        self.kv_group = kv_group_size(model.args.head_dim, options.kv_bits)
        self.model, self.tokenizer, self.draft_model = model, tokenizer, draft_model
        self.raw, self.sampling = options.raw, options.sampling
        self.num_draft_tokens = options.num_draft_tokens
        self.max_kv_size, self.kv_bits = options.max_kv_size, options.kv_bits
        self.context = model.args.max_position_embeddings
        s = self.sampling
        self._sampler = make_sampler(s.temp, s.top_p, s.min_p, top_k=s.top_k)
        self._processors = (make_logits_processors(repetition_penalty=s.repetition_penalty)
                            if s.repetition_penalty else None)
        self.expert_log = ExpertRecorder(model) if hasattr(model.layers[0], "feed_forward") else None
        self.system: Optional[str] = None
        self.set_system(options.system)
        self.last: Optional[Turn] = None  # the last answer since the start or /reset
        self.resets = 0
        self._stop_requested = self._generating = False
        self._clear()

    # -- state ---------------------------------------------------------------
    def reset(self) -> None:
        """Forget the conversation, its last answer and the cache; the system prompt stays."""
        self._clear()
        self.last = None
        self.resets += 1

    def _clear(self) -> None:
        self.messages: List[dict] = []
        self.history_text, self.history_tokens = "", []
        self.cache, self.cache_tokens = self._new_cache(), []

    def set_system(self, text: Optional[str]) -> None:
        """A new system prompt; the next turn re-reads the conversation after it.
        One that does not fit the context even alone raises UserError and changes nothing."""
        text = text or None
        if text and self.raw:
            raise UserError("there is no system prompt in raw mode")
        check_system_fits(self.tokenizer, text, self.context)
        self.system = text

    def request_stop(self, now: bool = False) -> None:
        """Stop the answer being generated after its current token; safe from a signal
        handler. `now` (a second Ctrl-C) stops at once by raising KeyboardInterrupt, but
        only while tokens are being generated, and only once: never while the cache
        and the conversation are being brought up to date after an answer."""
        self._stop_requested = True
        if now and self._generating:
            self._generating = False
            raise KeyboardInterrupt

    def kv_bytes(self) -> int:
        return sum(c.nbytes for c in self.cache if not c.empty())

    def cache_held(self) -> int:
        """Tokens the model's caches hold now: all that were read (`cache_tokens`), less
        what a rotating cache (--max-kv-size) has let go."""
        from mlx_lm.models.cache import RotatingKVCache

        held = [min(c.offset, c.keys.shape[2]) if isinstance(c, RotatingKVCache) and not c.empty()
                else c.offset for c in self.cache[:len(self.model.layers)]]
        return min(held, default=0)

    def _new_cache(self) -> list:
        from mlx_lm.models.cache import QuantizedKVCache, make_prompt_cache

        models = [self.model] + ([self.draft_model] if self.draft_model is not None else [])
        if self.kv_bits:
            # Quantized from the first token (what mlx-lm's quantized_kv_start=0 does);
            # made here because its speculative path would quantize copies of the list.
            return [QuantizedKVCache(self.kv_group, self.kv_bits)
                    for m in models for _ in m.layers]
        return [c for m in models for c in make_prompt_cache(m, self.max_kv_size)]

    # -- prompts -------------------------------------------------------------
    def conversation(self, user: Optional[str] = None) -> List[dict]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        new = [{"role": "user", "content": user}] if user is not None else []
        return system + self.messages + new

    def _render(self, messages, add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=False)

    def _encode(self, text: str) -> List[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _chat_prompt(self, user: str) -> Tuple[str, List[int]]:
        text = self._render(self.conversation(user), True)
        if self.history_text and text.startswith(self.history_text):
            return text, self.history_tokens + self._encode(text[len(self.history_text):])
        return text, self._encode(text)

    def _raw_prompt(self, text: str) -> List[int]:
        tokens = self.tokenizer.encode(text)
        bos = self.tokenizer.bos_token_id
        return tokens if bos is None or tokens[:1] == [bos] else [bos] + tokens

    def _fit(self, user: str, turn: Turn) -> Tuple[str, List[int]]:
        """The turn's prompt, dropping the oldest exchanges while it and room for an
        answer would not fit the context. The system prompt always stays; a message
        that cannot fit even alone drops nothing (the caller skips it)."""
        if self.raw:
            return "", self._raw_prompt(user)
        kept, self.messages = self.messages, []
        text, tokens = self._chat_prompt(user)
        self.messages = kept
        if len(tokens) >= self.context:
            return text, tokens
        reserve = min(self.sampling.max_tokens, self.context // 4)
        dropped = 0
        while True:
            text, tokens = self._chat_prompt(user)
            if len(tokens) + reserve <= self.context or not self.messages:
                break
            self.messages = self.messages[2:]  # the oldest user message and its answer
            dropped += 1
        if dropped:
            turn.notes.append(
                f"the conversation would pass the {self.context}-token context: dropped the "
                f"oldest {dropped} exchange(s), the system prompt stays (/reset starts afresh)")
        return text, tokens

    # -- a turn --------------------------------------------------------------
    def ask(self, user: str, on_text: Callable[[str], None] = lambda s: None) -> Turn:
        """Answer `user`, streaming text to `on_text`; returns the answer and its numbers."""
        turn = Turn()
        rendered, target = self._fit(user, turn)
        if len(target) >= self.context:  # even with every earlier exchange dropped
            return self._skip(turn, target)
        max_tokens = min(self.sampling.max_tokens, self.context - len(target))
        had_history = bool(self.messages)
        keep = self._trim_cache_to(target)
        new = target[keep:]
        turn.prefilled = len(new)
        run = self._generate(new, max_tokens, turn, on_text)
        # A KeyboardInterrupt from here on is not our Ctrl-C handler's (it is quiet now),
        # but a library caller's default handler: it must not leave the state half-updated.
        saved = list(self.messages), self.history_text, self.history_tokens
        try:
            self._settle(turn, run, max_tokens, had_history, len(new))
            if run.hard_stop:  # a second Ctrl-C: the cache may be mid-update
                self.cache, self.cache_tokens = self._new_cache(), []
            else:
                self._sync_cache(self.cache_tokens[:keep] + new + run.fed)
            if not self.raw and (turn.tokens or turn.finish != "interrupted"):
                self._remember(user, rendered, target, turn, run.fed)
        except KeyboardInterrupt:
            self.messages, self.history_text, self.history_tokens = saved
            self.cache, self.cache_tokens = self._new_cache(), []
            turn.finish = "interrupted"
        self.last = turn
        return turn

    def _skip(self, turn: Turn, target: List[int]) -> Turn:
        """A message that cannot fit even alone: /reset cannot help, only a shorter one."""
        turn.finish = "skipped"
        system = (f" ({system_prompt_tokens(self.tokenizer, self.system)} of them the "
                  "system prompt and the template)" if self.system and not self.raw else "")
        turn.notes.append(f"this message makes a {len(target)}-token prompt{system} and the "
                          f"context holds {self.context}: shorten it")
        return turn

    def _generate(self, new: List[int], max_tokens: int, turn: Turn,
                  on_text: Callable[[str], None]) -> "_Generation":
        """Feed `new` and stream the answer into `turn` until a stop, the length
        limit or a Ctrl-C; the stream is closed (and mlx-lm's cleanup run) on return."""
        from mlx_lm.generate import stream_generate

        run = _Generation()
        self._stop_requested = False
        mx.reset_peak_memory()
        recording = self.expert_log.record() if self.expert_log else contextlib.nullcontext()
        stream = stream_generate(
            self.model, self.tokenizer, mx.array(new), max_tokens=max_tokens,
            draft_model=self.draft_model, num_draft_tokens=self.num_draft_tokens,
            sampler=self._sampler, logits_processors=self._processors,
            prompt_cache=self.cache, prompt_progress_callback=self._check_stop,
            prefill_step_size=PREFILL_CHUNK)
        try:
            with recording:
                self._generating = True  # request_stop(now=True) may raise from here on
                try:
                    for run.response in stream:
                        run.fed.append(run.response.token)
                        run.flags.append(run.response.from_draft)
                        if run.response.finish_reason != "stop":
                            turn.tokens.append(run.response.token)
                        turn.text += run.response.text
                        on_text(run.response.text)
                        if self._stop_requested:
                            break
                except _Stop:
                    pass
                finally:
                    self._generating = False  # ... up to here
                    run.stopped = self._stop_requested  # a later Ctrl-C stops nothing
                    stream.close()  # runs mlx-lm's cleanup (the speculative cache rewind) now
        except KeyboardInterrupt:  # a second Ctrl-C
            run.hard_stop = True
            self._generating = False
            stream.close()
        return run

    def _settle(self, turn: Turn, run: "_Generation", max_tokens: int, had_history: bool,
                prompt_tokens: int) -> None:
        """The turn's numbers, finish reason and notes from a finished generation."""
        if self.expert_log:
            # Tokens pass through a layer in order: the first `prompt_tokens` rows are
            # the prompt's. With --draft, rejected draft tokens count as answer.
            turn.experts = list(zip(self.expert_log.distinct(prompt_tokens),
                                    self.expert_log.distinct(0, prompt_tokens)))
        response = run.response
        turn.finish = "interrupted"
        if response is not None:
            turn.finish = response.finish_reason or "interrupted"
            turn.generation_tokens = response.generation_tokens
            turn.prompt_tps, turn.generation_tps = response.prompt_tps, response.generation_tps
            turn.peak_memory_gb = response.peak_memory
        if run.stopped or run.hard_stop:
            turn.finish = "interrupted"
        if turn.finish == "length" and max_tokens < self.sampling.max_tokens:
            turn.notes.append(
                f"the answer reached the end of the {self.context}-token context; "
                + ("/reset starts afresh" if had_history else
                   "a shorter message" + (" or system prompt" if self.system else "")
                   + " leaves more room"))
        if self.draft_model is not None:
            turn.accepted, turn.drafted = draft_acceptance(run.flags, self.num_draft_tokens,
                                                           max_tokens)

    def _check_stop(self, processed: int, total: int) -> None:
        # Called by mlx-lm between prefill chunks, when the cache is consistent.
        if self._stop_requested and processed < total:
            raise _Stop

    def _remember(self, user: str, rendered: str, target: List[int], turn: Turn,
                  fed: List[int]) -> None:
        """Add the exchange to the history, and the tokens that stand for it."""
        answer = self.tokenizer.decode(turn.tokens)
        self.messages += [{"role": "user", "content": user},
                          {"role": "assistant", "content": answer}]
        after = self._render(self.conversation(), False)
        if not after.startswith(rendered):  # a template that rewrites earlier turns
            self.history_text, self.history_tokens = "", []
            return
        tail = after[len(rendered):]  # e.g. the answer, trimmed, then <|eot_id|>
        # Whitespace the template trims off the answer stays as the model wrote it:
        # that is what the cache holds, and a re-encoding would re-prefill the answer.
        shown = answer if tail.startswith(answer) else answer.strip()
        if not tail.startswith(shown):  # the template rewrote the answer: it wins
            self.history_text, self.history_tokens = after, target + self._encode(tail)
            return
        closing = tail[len(shown):]  # what the template adds after it: <|eot_id|>
        stop = self.tokenizer.decode(fed[-1:]) if turn.finish == "stop" else None
        tokens = fed if closing == stop else turn.tokens + self._encode(closing)
        self.history_text, self.history_tokens = after, target + tokens

    def _trim_cache_to(self, target: List[int]) -> int:
        """Trim the cache to the prefix it shares with `target`; returns its length."""
        # At least one token must be fed for the model to produce the next one.
        keep = min(_common_prefix(self.cache_tokens, target), len(target) - 1)
        if keep < len(self.cache_tokens):
            keep = self._cut_cache(keep)
            self.cache_tokens = self.cache_tokens[:keep]
        return keep

    def _sync_cache(self, known: List[int]) -> None:
        """Make `cache_tokens` what the caches hold: the first min(offset) of `known`."""
        offsets = [c.offset for c in self.cache]
        n = min(min(offsets), len(known))
        if any(o != n for o in offsets):
            n = self._cut_cache(n)
        self.cache_tokens = known[:n]

    def _cut_cache(self, n: int) -> int:
        """Trim every cache to its first `n` tokens, or start a new, empty one where
        that cannot be done (a rotating cache that has wrapped around). Returns the
        tokens the caches now hold."""
        from mlx_lm.models.cache import can_trim_prompt_cache

        if not can_trim_prompt_cache(self.cache):
            self.cache = self._new_cache()
            return 0
        for c in self.cache:
            c.trim(c.offset - n)
        return n


@dataclass
class _Generation:
    """What one streamed answer left behind, for `ChatSession._settle`."""

    fed: List[int] = field(default_factory=list)  # every token the model was fed back
    flags: List[bool] = field(default_factory=list)  # from_draft, per token
    response: object = None  # mlx-lm's last GenerationResponse
    stopped: bool = False  # a first Ctrl-C (request_stop) ended it
    hard_stop: bool = False  # a second Ctrl-C broke out of the generation


def activation_dtype(model) -> str:
    """The dtype the model computes (and caches keys and values) in: its norms'."""
    import mlx.nn as nn

    norm = next((m for m in model.modules() if isinstance(m, nn.RMSNorm)), None)
    dtype = norm.weight.dtype if norm is not None else mx.float32
    return {mx.float16: "float16", mx.bfloat16: "bfloat16"}.get(dtype, "float32")
