"""Prompt token ids: real text, random ids, or one id repeated.

Real prompts are the texts under bench/prompts/ (code, knowledge, math),
concatenated and cycled to any length. A model with a tokenizer encodes them
with it; synthetic models have none, so the text is split into word pieces of
at most six characters (about one BPE token each) and every distinct piece gets
a fixed id from a hash. That keeps what matters for routing: real text reuses
common tokens and varies the rest, unlike `random` (uniform ids) and `repeat`
(the dummy prompt of one token repeated, which the paper warns understates
MoE memory because it touches few experts).
"""

import re
import zlib
from functools import lru_cache
from pathlib import Path

import mlx.core as mx

PROMPT_DIR = Path(__file__).parent / "prompts"
KINDS = ("real", "random", "repeat")
_PIECE = re.compile(r" ?[A-Za-z]+| ?[0-9]| ?[^\sA-Za-z0-9]+|\s+")


@lru_cache(maxsize=1)
def real_text() -> str:
    return "\n\n".join(p.read_text() for p in sorted(PROMPT_DIR.glob("*.txt")))


def hash_encode(text: str, vocab_size: int) -> list:
    """Word pieces -> stable ids in [0, vocab_size) (low ids left for specials when possible)."""
    low = 256 if vocab_size > 1024 else 0
    out = []
    for m in _PIECE.finditer(text):
        piece = m.group()
        for i in range(0, len(piece), 6):
            out.append(low + zlib.crc32(piece[i:i + 6].encode()) % (vocab_size - low))
    return out


def tokenizer_encode(tokenizer, text: str) -> list:
    """`tokenizer.encode(text)`, one paragraph at a time: each piece stays under the
    tokenizer's model_max_length, so transformers does not warn that the "sequence
    length is longer than the specified maximum" (the ids are only cycled into
    prompts, never fed whole). Special tokens (BOS) come with the first piece only."""
    ids = []
    for i, piece in enumerate(p for p in re.split(r"(?<=\n\n)", text) if p):
        ids += tokenizer.encode(piece) if i == 0 else tokenizer.encode(
            piece, add_special_tokens=False)
    return ids


@lru_cache(maxsize=8)
def _real_ids(vocab_size: int, tokenizer_id: int, tokenizer=None) -> tuple:
    text = real_text()
    ids = (tokenizer_encode(tokenizer, text) if tokenizer is not None
           else hash_encode(text, vocab_size))
    return tuple(i for i in ids if i < vocab_size)


def prompt_tokens(kind: str, n: int, vocab_size: int, tokenizer=None, seed: int = 0) -> mx.array:
    """`n` token ids of a `kind` prompt (real, random or repeat), as a 1-D array."""
    if kind == "random":
        return mx.random.randint(0, vocab_size, (n,), key=mx.random.key(seed))
    if kind == "repeat":
        return mx.full((n,), min(1000, vocab_size - 1), dtype=mx.int32)
    if kind != "real":
        raise ValueError(f"prompt kind must be one of {KINDS}")
    ids = _real_ids(vocab_size, id(tokenizer), tokenizer)
    reps = -(-n // len(ids))
    return mx.array((ids * reps)[:n], dtype=mx.int32)


def real_token_count(vocab_size: int = 128256) -> int:
    return len(_real_ids(vocab_size, 0, None))
