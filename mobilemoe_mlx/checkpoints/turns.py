"""Where a turn ends: the tokenizer a checkpoint or converted directory loads
with, and the tokens generation stops on.

A released checkpoint ends a turn with <|eot|>, and nobody knows whether its
`eos_token_id` lists that id (docs/conversion.md, "What is known about the
released files"). So the end of a turn is read from the checkpoint's own chat
template: render an answer and take the special token that closes it. Every
tokenizer loaded here stops there, besides every id `eos_token_id` lists; a
conversion writes the same list into the converted directory's config.json
(and generation_config.json), where mlx-lm's own tools read it.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from ..errors import UserError
from .consistency import GENERATION_CONFIG
from .reading import read_json_object

# What an answer is rendered with to find what the template writes after it.
_QUESTION, _ANSWER = "Probe question?", "Probe answer."


def _empty_config() -> dict:
    """What keeps transformers from parsing the model's own config.json (transformers 5
    cannot: docs/architecture.md section 6): an empty config handed in."""
    from transformers import PretrainedConfig

    return {"config": PretrainedConfig()}


def end_of_turn(tokenizer) -> Optional[int]:
    """The special token the chat template closes an answer with, or None
    (no template, one that cannot render an answer, or no special token after it).

    `tokenizer`: mlx-lm's TokenizerWrapper or a transformers tokenizer."""
    if getattr(tokenizer, "chat_template", None) is None and not getattr(
            tokenizer, "has_chat_template", False):
        return None
    messages = [{"role": "user", "content": _QUESTION},
                {"role": "assistant", "content": _ANSWER}]
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=False,
                                             tokenize=False)
    except Exception:  # noqa: BLE001 - a template that refuses an answer closes none we can see
        return None
    at = text.rfind(_ANSWER) if isinstance(text, str) else -1
    if at < 0:
        return None
    special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    tail = tokenizer.encode(text[at + len(_ANSWER):], add_special_tokens=False)
    return next((i for i in tail if i in special), None)


def eos_list(eos_token_id) -> List[int]:
    """A config's eos_token_id (an id, a list of them, or null) as a list."""
    if eos_token_id is None:
        return []
    return list(eos_token_id) if isinstance(eos_token_id, list) else [eos_token_id]


def load_tokenizer(path: Path, eos_token_ids=None):
    """mlx-lm's tokenizer wrapper for the tokenizer files in `path` (a
    converted directory or a checkpoint's), stopping on every id of
    `eos_token_ids`, on the tokenizer's eos_token, and on the token the chat
    template closes an answer with."""
    if not (path / "tokenizer.json").exists():
        raise UserError(
            f"{path} has no tokenizer.json; copy the checkpoint's tokenizer files there"
        )
    from mlx_lm.tokenizer_utils import load as load_mlx_tokenizer

    tokenizer = load_mlx_tokenizer(path, _empty_config(), eos_token_ids=eos_token_ids)
    closing = end_of_turn(tokenizer)
    if closing is not None:
        tokenizer.add_eos_token(str(closing))
    return tokenizer


@dataclass(frozen=True)
class Stops:
    """What a conversion writes and says about where generation stops."""

    eos_token_id: List[int]  # for the converted config.json and generation_config.json
    note: Optional[str]  # said once when the template shows no end of a turn


def converted_stops(folder: Path, config: dict) -> Stops:
    """The ids a checkpoint's config.json and generation_config.json list as
    eos_token_id (mlx-lm reads the latter's over the former's), kept in their
    order, then the end of a turn if the chat template in `folder` shows one
    they lack; and, where it shows none, a note of what generation stops on
    instead. Without tokenizer files, the ids as they are and no note (loading
    needs those files anyway, and reads the template then)."""
    ids = eos_list(config.get("eos_token_id"))
    if (folder / GENERATION_CONFIG).is_file():
        ids += [i for i in eos_list(read_json_object(folder / GENERATION_CONFIG).get(
            "eos_token_id")) if i not in ids]
    if not (folder / "tokenizer.json").is_file():
        return Stops(ids, None)
    try:  # transformers' tokenizer alone: mlx-lm's wrapper costs a second a 128k vocabulary
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder, **_empty_config())
    except Exception as e:  # noqa: BLE001 - files the checks pass but transformers cannot load
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        return Stops(ids, f"the tokenizer files cannot be loaded ({reason}), so where a turn "
                          f"ends is not known: generation stops on eos_token_id {ids} only")
    closing = end_of_turn(tokenizer)
    if closing is not None:
        return Stops(ids + ([closing] if closing not in ids else []), None)
    why = ("the checkpoint has no chat template" if tokenizer.chat_template is None
           else "its chat template ends an answer with no special token")
    # mlx-lm stops on the tokenizer's own eos_token too.
    stops = sorted(set(ids) | ({tokenizer.eos_token_id} - {None}))
    if not stops:
        return Stops(ids, f"{why} and names no eos token: generation stops only at its "
                          "length limit")
    names = ", ".join(f"{i} ({json.dumps(tokenizer.convert_ids_to_tokens(i))})" for i in stops)
    return Stops(ids, f"{why}: generation stops on {names} only")
