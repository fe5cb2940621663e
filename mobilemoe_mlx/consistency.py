"""The files of a checkpoint agree with each other: token ids against the
model's vocabulary (issue 19). Filled in by the consistency work; the host-side
id check below is the one every caller of the model uses."""

from typing import Iterable

from .errors import UserError


def check_token_ids(ids: Iterable[int], vocab_size: int, source: str) -> None:
    """Refuse, on the host, any token id outside [0, vocab_size): MLX reads past
    the embedding table (a segmentation fault) instead of failing. `source`
    names where the ids came from, for the message."""
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        shown = ", ".join(str(i) for i in bad[:5]) + (", ..." if len(bad) > 5 else "")
        raise UserError(
            f"{source} holds token id(s) {shown} outside this model's vocabulary "
            f"(0 to {vocab_size - 1}); use the tokenizer that came with the model"
        )
