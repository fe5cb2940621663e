"""The KV cache a conversation keeps across turns, and the tokens it holds.

mlx-lm's caches only know how many positions they hold (`offset`), not which
tokens: `PromptCache.tokens` is that record, kept exactly equal to what the
caches hold, so a turn can feed only the tokens past the longest prefix the
cache shares with the new prompt. After every answer the record is re-read
from the caches' offsets (`sync`), so an interrupted answer, a stop token fed
or not, or a speculative rewind can never leave the two out of step.

The caches are the model's layers followed by the draft model's (mlx-lm's
speculative decoding takes them as one list). Nothing here reads or prints.
"""

from typing import List, Optional


def common_prefix(a: List[int], b: List[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class PromptCache:
    """mlx-lm's per-layer KV caches for a model (and its draft), and the tokens they hold.

    Args:
        model, draft_model: the caches are made for both (the draft's after the model's).
        max_kv_size: a rotating cache of this many tokens (mlx-lm's), or None.
        kv_bits, kv_group: a KV cache quantized from the first token, or kv_bits None.
    """

    def __init__(self, model, draft_model=None, max_kv_size: Optional[int] = None,
                 kv_bits: Optional[int] = None, kv_group: int = 64):
        self._models = [model] + ([draft_model] if draft_model is not None else [])
        self._main_layers = len(model.layers)
        self.max_kv_size, self.kv_bits, self.kv_group = max_kv_size, kv_bits, kv_group
        self.clear()

    def clear(self) -> None:
        """Empty caches: nothing read yet."""
        self.caches: list = self._new()
        self.tokens: List[int] = []

    def _new(self) -> list:
        from mlx_lm.models.cache import QuantizedKVCache, make_prompt_cache

        if self.kv_bits:
            # Quantized from the first token (what mlx-lm's quantized_kv_start=0 does);
            # made here because its speculative path would quantize copies of the list.
            return [QuantizedKVCache(self.kv_group, self.kv_bits)
                    for m in self._models for _ in m.layers]
        return [c for m in self._models for c in make_prompt_cache(m, self.max_kv_size)]

    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.caches if not c.empty())

    def held(self) -> int:
        """Tokens the model's caches hold now: all that were read (`tokens`), less
        what a rotating cache (max_kv_size) has let go."""
        from mlx_lm.models.cache import RotatingKVCache

        held = [min(c.offset, c.keys.shape[2]) if isinstance(c, RotatingKVCache) and not c.empty()
                else c.offset for c in self.caches[:self._main_layers]]
        return min(held, default=0)

    def trim_to(self, target: List[int]) -> int:
        """Trim the caches to the prefix they share with `target`; returns its length."""
        # At least one token must be fed for the model to produce the next one.
        keep = min(common_prefix(self.tokens, target), len(target) - 1)
        if keep < len(self.tokens):
            keep = self._cut(keep)
            self.tokens = self.tokens[:keep]
        return keep

    def sync(self, known: List[int]) -> None:
        """Make `tokens` what the caches hold: the first min(offset) of `known`,
        every token the caches may have read, in order."""
        offsets = [c.offset for c in self.caches]
        n = min(min(offsets), len(known))
        if any(o != n for o in offsets):
            n = self._cut(n)
        self.tokens = known[:n]

    def _cut(self, n: int) -> int:
        """Trim every cache to its first `n` tokens, or start new, empty ones where
        that cannot be done (a rotating cache that has wrapped around). Returns the
        tokens the caches now hold."""
        from mlx_lm.models.cache import can_trim_prompt_cache

        if not can_trim_prompt_cache(self.caches):
            self.caches = self._new()
            return 0
        for c in self.caches:
            c.trim(c.offset - n)
        return n
