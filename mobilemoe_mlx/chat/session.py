"""The conversation: its messages, the chat template, the KV cache kept across
turns, and one answer at a time. No terminal I/O: chat/terminal.py reads and prints.

`ChatSession.ask()` renders the conversation with the tokenizer's chat
template, feeds the model only the tokens its cache does not hold yet, and
streams the answer (chat/stream.py, over mlx-lm's `stream_generate`).

How the cache is kept (the part that is easy to get wrong):
- `cache_tokens` is exactly what the KV cache holds (chat/cache.py); after
  every answer it is re-read from the caches' offsets.
- `history_text` / `history_tokens` are the rendered conversation so far and
  the tokens that stand for it: the answer's own tokens, not a re-encoding of
  its text (a re-encoding can differ and would re-prefill the whole answer).
- A turn's prompt is `history_tokens` + the encoded text the template adds for
  the new message. The cache is trimmed to the longest prefix it shares with
  that, and only the rest is prefilled; a changed system prompt or dropped
  turns thus re-prefill only from the first token that differs.
- Every prompt is checked against the model's vocabulary before it is fed: an
  id out of range makes MLX read past the embedding table (a crash), not fail.
"""

from typing import Callable, List, Optional, Tuple

from ..checkpoints.consistency import check_token_ids
from ..errors import UserError
from ..model.routing import ExpertRecorder
from .cache import PromptCache
from .options import (  # noqa: F401 - MIN_KV_SIZE, SEED_MAX, check_seed: part of the API
    MIN_KV_SIZE,
    SEED_MAX,
    Sampling,
    SessionOptions,
    check_seed,
    kv_group_size,
)
from .stream import Generation, StopSwitch, Turn, stream_answer


def _smallest_prompt(tokenizer, system: Optional[str]) -> List[int]:
    """The smallest prompt with this system prompt: it, an empty message and the
    assistant header, as the chat template renders them."""
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": ""}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def system_prompt_tokens(tokenizer, system: Optional[str]) -> int:
    """Tokens of the smallest prompt with this system prompt (see _smallest_prompt)."""
    return len(_smallest_prompt(tokenizer, system))


def check_system_fits(tokenizer, system: Optional[str], context: int) -> List[int]:
    """A system prompt that leaves no room for a message and an answer token is refused.
    Returns the smallest prompt's tokens with it (none without a system prompt)."""
    if not system:
        return []
    tokens = _smallest_prompt(tokenizer, system)
    if len(tokens) >= context:
        raise UserError(f"the system prompt alone does not fit the {context}-token context "
                        f"(with the template around it, it takes {len(tokens)} tokens): "
                        "shorten it")
    return tokens


class ChatSession:
    """A conversation with one model: messages, the KV cache and the settings.

    Args:
        model, tokenizer: from `chat_model.load_chat_model` (or `mobilemoe_mlx.load`).
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
        kv_group = kv_group_size(model.args.head_dim, options.kv_bits)
        self.model, self.tokenizer, self.draft_model = model, tokenizer, draft_model
        self.raw, self.sampling = options.raw, options.sampling
        self.num_draft_tokens = options.num_draft_tokens
        self.max_kv_size, self.kv_bits = options.max_kv_size, options.kv_bits
        self.context = model.args.max_position_embeddings
        self.vocab_size = model.args.vocab_size
        s = self.sampling
        self._sampler = make_sampler(s.temp, s.top_p, s.min_p, top_k=s.top_k)
        self._processors = (make_logits_processors(repetition_penalty=s.repetition_penalty)
                            if s.repetition_penalty else None)
        self.expert_log = ExpertRecorder(model) if hasattr(model.layers[0], "feed_forward") else None
        self._stop = StopSwitch()
        self._kv = PromptCache(model, draft_model, self.max_kv_size, self.kv_bits, kv_group)
        self.system: Optional[str] = None
        self.set_system(options.system)
        self.last: Optional[Turn] = None  # the last answer since the start or /reset
        self.resets = 0
        self._clear()

    # -- state ---------------------------------------------------------------
    @property
    def cache(self) -> list:
        """mlx-lm's KV caches: the model's layers, then the draft model's."""
        return self._kv.caches

    @property
    def cache_tokens(self) -> List[int]:
        """The tokens the KV cache holds (every one read, with a rotating cache)."""
        return self._kv.tokens

    def reset(self) -> None:
        """Forget the conversation, its last answer and the cache; the system prompt stays."""
        self._clear()
        self.last = None
        self.resets += 1

    def _clear(self) -> None:
        self.messages: List[dict] = []
        self.history_text, self.history_tokens = "", []
        self._kv.clear()

    def set_system(self, text: Optional[str]) -> None:
        """A new system prompt; the next turn re-reads the conversation after it.
        One that does not fit the context even alone, or that encodes to ids outside
        the model's vocabulary, raises UserError and changes nothing."""
        text = text or None
        if text and self.raw:
            raise UserError("there is no system prompt in raw mode")
        check_token_ids(check_system_fits(self.tokenizer, text, self.context), self.vocab_size,
                        "the system prompt (with the chat template around it)")
        self.system = text

    def request_stop(self, now: bool = False) -> None:
        """Stop the answer being generated after its current token; safe from a signal
        handler. `now` (a second Ctrl-C) stops at once by raising KeyboardInterrupt, but
        only while tokens are being generated, and only once: never while the cache
        and the conversation are being brought up to date after an answer."""
        self._stop.request(now)

    def kv_bytes(self) -> int:
        return self._kv.nbytes()

    def cache_held(self) -> int:
        """Tokens the model's caches hold now: all that were read (`cache_tokens`), less
        what a rotating cache (--max-kv-size) has let go."""
        return self._kv.held()

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
        """Answer `user`, streaming text to `on_text`; returns the answer and its numbers.
        A prompt holding token ids outside the model's vocabulary (a tokenizer that is
        not the model's) raises UserError before anything is fed or forgotten."""
        turn = Turn()
        before = self.messages
        rendered, target = self._fit(user, turn)
        if len(target) >= self.context:  # even with every earlier exchange dropped
            return self._skip(turn, target)
        try:
            check_token_ids(target, self.vocab_size, "this message's prompt")
        except UserError:
            self.messages = before  # _fit may have dropped exchanges for it
            raise
        max_tokens = min(self.sampling.max_tokens, self.context - len(target))
        had_history = bool(self.messages)
        keep = self._kv.trim_to(target)
        new = target[keep:]
        turn.prefilled = len(new)
        run = stream_answer(
            self.model, self.tokenizer, new, self._kv.caches, max_tokens, self._stop, on_text,
            sampler=self._sampler, logits_processors=self._processors,
            draft_model=self.draft_model, num_draft_tokens=self.num_draft_tokens,
            recording=self.expert_log.record() if self.expert_log else None)
        turn.tokens, turn.text = run.tokens, run.text
        # A KeyboardInterrupt from here on is not our Ctrl-C handler's (it is quiet now),
        # but a library caller's default handler: it must not leave the state half-updated.
        saved = list(self.messages), self.history_text, self.history_tokens
        try:
            self._settle(turn, run, max_tokens, had_history, len(new))
            if run.hard_stop:  # a second Ctrl-C: the cache may be mid-update
                self._kv.clear()
            else:
                self._kv.sync(self._kv.tokens[:keep] + new + run.fed)
            if not self.raw and (turn.tokens or turn.finish != "interrupted"):
                self._remember(user, rendered, target, turn, run.fed)
        except KeyboardInterrupt:
            self.messages, self.history_text, self.history_tokens = saved
            self._kv.clear()
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

    def _settle(self, turn: Turn, run: Generation, max_tokens: int, had_history: bool,
                prompt_tokens: int) -> None:
        """The turn's numbers, finish reason and notes from a finished generation."""
        if self.expert_log:
            # Tokens pass through a layer in order: the first `prompt_tokens` rows are
            # the prompt's. With --draft, rejected draft tokens count as answer.
            turn.experts = list(zip(self.expert_log.distinct(prompt_tokens),
                                    self.expert_log.distinct(0, prompt_tokens)))
        turn.take(run, max_tokens, self.num_draft_tokens if self.draft_model is not None else None)
        if turn.finish == "length" and max_tokens < self.sampling.max_tokens:
            # The context, not --max-tokens, cut it: the stats line says so, once.
            turn.ended = (f"reached the end of the {self.context}-token context ("
                          + ("/reset starts afresh" if had_history else
                             "a shorter message" + (" or system prompt" if self.system else "")
                             + " leaves more room") + ")")

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
        tail = after[len(rendered):]  # e.g. the answer, then <|eot|>
        # Whitespace the template trims off the answer stays as the model wrote it:
        # that is what the cache holds, and a re-encoding would re-prefill the answer.
        shown = answer if tail.startswith(answer) else answer.strip()
        if not tail.startswith(shown):  # the template rewrote the answer: it wins
            self.history_text, self.history_tokens = after, target + self._encode(tail)
            return
        closing = tail[len(shown):]  # what the template adds after it: <|eot|>
        stop = self.tokenizer.decode(fed[-1:]) if turn.finish == "stop" else None
        tokens = fed if closing == stop else turn.tokens + self._encode(closing)
        self.history_text, self.history_tokens = after, target + tokens
