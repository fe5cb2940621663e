"""The files of a checkpoint agree with each other: token ids against the
model's vocabulary (issue 19).

A checkpoint is config.json, the weights and up to five tokenizer files. Each
is read by a different library, and none of them checks the others: a token id
at or past config.json's `vocab_size` makes MLX read past the embedding table
(a segmentation fault, no message) in our tools and in mlx-lm's alike. So the
converter checks, before it writes anything, and the loader again, before the
model is built:

- every id tokenizer.json can produce (its vocabulary, its added tokens, the
  ids its post-processor inserts) is below `vocab_size`: a tokenizer with
  fewer ids than the embedding has rows (padding rows) is fine;
- every `*_token_id` field (bos, eos, pad, ...) of config.json (checkpoints/config.py),
  generation_config.json and tokenizer_config.json is null, an id in range or
  a list of them;
- every special token tokenizer_config.json and special_tokens_map.json name
  (`bos_token`, `eos_token`, `pad_token`, ..., as a string or {"content": ...};
  `additional_special_tokens`; `added_tokens_decoder`) is a token of
  tokenizer.json (transformers adds a missing one with a new id, which can lie
  past the embedding), and every `<|...|>` token the chat template writes
  literally is one too;
- the converted weights' embedding (and any output head) has exactly
  `vocab_size` rows (`check_embedding_rows`; at conversion the layout check
  does this).

Files that are absent are not checked; an absent tokenizer.json leaves the
token names unchecked (nothing can produce their ids). Every refusal is one
line naming the file, the field and the id or token.
"""

import heapq
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple

from ..errors import UserError
from .config import TOKEN_ID_FIELD, shown, token_ids_ok
from .reading import TensorInfo, read_json_object, read_text

TOKENIZER = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
GENERATION_CONFIG = "generation_config.json"
CHAT_TEMPLATE_JINJA = "chat_template.jinja"
CHAT_TEMPLATE_JSON = "chat_template.json"

# transformers' special token attributes: each a token (a string or an AddedToken
# {"content": ...}) or null; the lists hold more of them.
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token",
                  "cls_token", "mask_token")
SPECIAL_TOKEN_LISTS = ("additional_special_tokens", "extra_special_tokens")
# A special token written literally in a chat template: <|start_header_id|>, <|eot_id|>, <|im_start|>.
TEMPLATE_TOKEN = re.compile(r"<\|[\w.:-]+\|>")

_ADVICE = "use the tokenizer files that came with the checkpoint"


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


def _is_int(value) -> bool:
    return type(value) is int  # JSON's true is no id


def _out_of_range(where: str, bad: List[Tuple[int, Optional[str]]], vocab_size: int) -> UserError:
    """`where` gives the (id, token) pairs `bad` ids outside config.json's vocab_size."""
    first = heapq.nsmallest(3, bad, key=lambda pair: pair[0])
    named = [f"{i} ({json.dumps(t, ensure_ascii=False)[:40]})" if t is not None else str(i)
             for i, t in first]
    more = (f" and {len(bad) - 3} more, up to {max(i for i, _ in bad)}" if len(bad) > 3 else "")
    return UserError(
        f"{where} holds token id(s) {', '.join(named)}{more}, outside config.json's "
        f"vocab_size of {vocab_size} (ids 0 to {vocab_size - 1}): the tokenizer does not "
        f"belong to this model; {_ADVICE}")


@dataclass
class TokenizerIds:
    """What tokenizer.json holds, read once: its tokens, to look names up in."""

    vocab: Optional[Mapping[str, Any]]  # the model's token -> id; None if it has none we know
    added: Dict[str, int] = field(default_factory=dict)  # added_tokens: content -> id

    def has(self, token: str) -> bool:
        if token in self.added:
            return True
        return True if self.vocab is None else token in self.vocab


def _model_vocab(model: Any) -> Tuple[Optional[Mapping[str, Any]], Optional[int]]:
    """The model's token -> id table and, for a Unigram model (whose ids are
    the positions of its pieces), the number of its pieces."""
    if not isinstance(model, dict):
        raise UserError(f"{TOKENIZER}: its model is {shown(model)}, not an object")
    vocab = model.get("vocab")
    if isinstance(vocab, dict):  # BPE, WordPiece, WordLevel
        return vocab, None
    if isinstance(vocab, list):  # Unigram: [[piece, score], ...], the id is the index
        pieces = {p[0]: i for i, p in enumerate(vocab) if isinstance(p, list) and p
                  and isinstance(p[0], str)}
        return pieces, len(vocab)
    return None, None


def _check_vocab(vocab: Mapping[str, Any], vocab_size: int) -> None:
    """Every id of a token -> id table, at C speed for a 128k-token vocabulary:
    one pass for the types, min and max for the range; Python per entry only
    to name the offenders once something is wrong."""
    values = vocab.values()
    if set(map(type, values)) - {int}:
        token, value = next((t, i) for t, i in vocab.items() if not _is_int(i))
        raise UserError(f"{TOKENIZER}: its vocabulary gives {json.dumps(token)} the id "
                        f"{shown(value)}, which is not an integer")
    if values and (min(values) < 0 or max(values) >= vocab_size):
        raise _out_of_range(f"{TOKENIZER}'s vocabulary",
                            [(i, t) for t, i in vocab.items() if not 0 <= i < vocab_size],
                            vocab_size)


def _added_tokens(data: dict, vocab_size: int) -> Dict[str, int]:
    added = data.get("added_tokens")
    if added is None:
        return {}
    if not isinstance(added, list):
        raise UserError(f"{TOKENIZER}: added_tokens must be a list, got {shown(added)}")
    out, bad = {}, []
    for n, token in enumerate(added):
        if (not isinstance(token, dict) or not _is_int(token.get("id"))
                or not isinstance(token.get("content"), str)):
            raise UserError(f"{TOKENIZER}: added_tokens[{n}] must have an integer id and a "
                            f"string content, got {shown(token)}")
        if not 0 <= token["id"] < vocab_size:
            bad.append((token["id"], token["content"]))
        out[token["content"]] = token["id"]
    if bad:
        raise _out_of_range(f"{TOKENIZER}'s added_tokens", bad, vocab_size)
    return out


def _processor_ids(processor: Any, where: str) -> Iterator[Tuple[int, Optional[str], str]]:
    """(id, token, where) for every id a post-processor inserts: a
    TemplateProcessing's special_tokens, Bert's and Roberta's sep and cls, and
    those of a Sequence's processors."""
    if not isinstance(processor, dict):
        return
    for n, inner in enumerate(processor.get("processors") or []):
        yield from _processor_ids(inner, f"{where}.processors[{n}]")
    specials = processor.get("special_tokens")
    if isinstance(specials, dict):
        for name, special in specials.items():
            ids = special.get("ids") if isinstance(special, dict) else None
            for i in ids if isinstance(ids, list) else [ids]:
                yield i, name, f"{where}.special_tokens"
    for key in ("sep", "cls"):
        pair = processor.get(key)
        if isinstance(pair, list) and len(pair) == 2:
            yield pair[1], pair[0] if isinstance(pair[0], str) else None, f"{where}.{key}"


def read_tokenizer_ids(path: Path, vocab_size: int) -> TokenizerIds:
    """tokenizer.json read once, every id it can produce checked against vocab_size."""
    data = read_json_object(path)
    vocab, pieces = _model_vocab(data.get("model"))
    if pieces is not None:  # Unigram: ids 0 .. pieces - 1
        if pieces > vocab_size:
            raise _out_of_range(f"{TOKENIZER}'s vocabulary", [(pieces - 1, None)], vocab_size)
        unk = data["model"].get("unk_id")
        if unk is not None and not (_is_int(unk) and 0 <= unk < pieces):
            raise UserError(f"{TOKENIZER}: the model's unk_id must be the id of one of its "
                            f"{pieces} pieces, got {shown(unk)}")
    elif vocab is not None:
        _check_vocab(vocab, vocab_size)
    ids = TokenizerIds(vocab, _added_tokens(data, vocab_size))
    for i, token, where in _processor_ids(data.get("post_processor"), "post_processor"):
        if not _is_int(i):
            raise UserError(f"{TOKENIZER}: {where} gives {json.dumps(token)} the id "
                            f"{shown(i)}, which is not an integer")
        if not 0 <= i < vocab_size:
            raise _out_of_range(f"{TOKENIZER}'s {where}", [(i, token)], vocab_size)
    return ids


def _check_id_fields(name: str, data: dict, vocab_size: int) -> None:
    """bos_token_id, eos_token_id, pad_token_id, ...: null, an id or a list of ids."""
    for key in sorted(k for k in data if TOKEN_ID_FIELD.search(k)):
        if not token_ids_ok(data[key], vocab_size):
            raise UserError(f"{name}: {key} must be a token id below config.json's vocab_size "
                            f"({vocab_size}) or a list of them, got {shown(data[key])}")


def _token_name(name: str, key: str, value: Any) -> Optional[str]:
    """The text of a special token as a tokenizer config spells it: a string or
    an AddedToken object {"content": ...}; None for null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise UserError(f"{name}: {key} must be a token (a string or an object with a string "
                    f"\"content\") or null, got {shown(value)}")


def _named_tokens(name: str, data: dict) -> Iterator[Tuple[str, str]]:
    """(key, token) for every special token a tokenizer config or special tokens map names."""
    for key in SPECIAL_TOKENS:
        if (token := _token_name(name, key, data.get(key))) is not None:
            yield key, token
    for key in SPECIAL_TOKEN_LISTS:
        tokens = data.get(key)
        if isinstance(tokens, dict):  # transformers 5's extra_special_tokens: {name: token}
            tokens = [tokens[k] for k in sorted(tokens)]
        if tokens is None:
            continue
        if not isinstance(tokens, list):
            raise UserError(f"{name}: {key} must be a list of tokens, got {shown(tokens)}")
        for token in tokens:
            if (text := _token_name(name, key, token)) is not None:
                yield key, text


def _decoder_tokens(data: dict, vocab_size: int) -> Iterator[Tuple[str, str]]:
    """tokenizer_config.json's added_tokens_decoder {"id": {"content": ...}}: the ids
    in range, and (key, token) for each, to be found in tokenizer.json."""
    decoder = data.get("added_tokens_decoder")
    if decoder is None:
        return
    if not isinstance(decoder, dict):
        raise UserError(f"{TOKENIZER_CONFIG}: added_tokens_decoder must be an object, "
                        f"got {shown(decoder)}")
    bad = []
    for key, token in decoder.items():
        if not re.fullmatch(r"-?\d{1,12}", key):
            raise UserError(f"{TOKENIZER_CONFIG}: added_tokens_decoder has the key "
                            f"{json.dumps(key)}, not a token id")
        text = _token_name(TOKENIZER_CONFIG, f"added_tokens_decoder[{key}]", token)
        if not 0 <= int(key) < vocab_size:
            bad.append((int(key), text))
        elif text is not None:
            yield f"added_tokens_decoder[{key}]", text
    if bad:
        raise _out_of_range(f"{TOKENIZER_CONFIG}'s added_tokens_decoder", bad, vocab_size)


def _templates(where: str, value: Any) -> Iterator[Tuple[str, str]]:
    """(where, text) of a chat_template value: a string, or a list of named
    templates [{"name": ..., "template": ...}]."""
    if value is None:
        return
    if isinstance(value, str):
        yield where, value
        return
    if isinstance(value, list) and all(isinstance(t, dict) and isinstance(t.get("template"), str)
                                       for t in value):
        for t in value:
            yield f"{where} {json.dumps(t.get('name'))}", t["template"]
        return
    raise UserError(f"{where} must be a template (a string, or a list of objects with a "
                    f"\"template\" string), got {shown(value)}")


def _check_named(tokenizer: Optional[TokenizerIds], named: Iterable[Tuple[str, str, str]]) -> None:
    """(where, token, what its absence does): each token must be one of tokenizer.json's."""
    for where, token, why in named:
        if tokenizer is not None and not tokenizer.has(token):
            raise UserError(f"{where} names {json.dumps(token, ensure_ascii=False)}, which is "
                            f"not a token of {TOKENIZER} ({why}); {_ADVICE}")


# Why a name tokenizer.json lacks is refused, for the message.
_ADDED = "transformers would add it under a new id, which the embedding may not have"
_SPELLED = "the prompt would spell it out in pieces instead"


def check_checkpoint_files(folder: Path, config: dict) -> None:
    """Refuse (UserError, one line) a checkpoint or converted directory whose
    tokenizer files disagree with its config.json (already checked by
    config.validate_config): see the module's docstring for what is checked."""
    vocab_size = config["vocab_size"]
    tokenizer = (read_tokenizer_ids(folder / TOKENIZER, vocab_size)
                 if (folder / TOKENIZER).is_file() else None)
    named: List[Tuple[str, str, str]] = []  # (where, token, why) of every token a file names
    templates: List[Tuple[str, str]] = []  # (where, text) of every chat template
    for name in (GENERATION_CONFIG, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP):
        if not (folder / name).is_file():
            continue
        data = read_json_object(folder / name)
        _check_id_fields(name, data, vocab_size)
        if name == GENERATION_CONFIG:
            continue
        named += [(f"{name}: {key}", token, _ADDED) for key, token in _named_tokens(name, data)]
        if name == TOKENIZER_CONFIG:
            named += [(f"{name}: {key}", token, _ADDED)
                      for key, token in _decoder_tokens(data, vocab_size)]
            templates += _templates(f"{name}'s chat_template", data.get("chat_template"))
    if (folder / CHAT_TEMPLATE_JINJA).is_file():
        templates.append((CHAT_TEMPLATE_JINJA, read_text(folder / CHAT_TEMPLATE_JINJA)))
    if (folder / CHAT_TEMPLATE_JSON).is_file():
        data = read_json_object(folder / CHAT_TEMPLATE_JSON)
        templates += _templates(f"{CHAT_TEMPLATE_JSON}'s chat_template", data.get("chat_template"))
    for where, text in templates:
        named += [(where, token, _SPELLED) for token in dict.fromkeys(TEMPLATE_TOKEN.findall(text))]
    _check_named(tokenizer, named)


def check_embedding_rows(tensors: Mapping[str, TensorInfo], vocab_size: int, where: str) -> None:
    """The embedding (and an output head, if there is one) of converted weights
    has one row per id of config.json's vocab_size: fewer, and ids the config
    allows would read past the table."""
    rows = {name: info.shape[0] if info.shape else 0 for name, info in tensors.items()
            if name.startswith(("model.embed_tokens.", "lm_head."))}
    for name in sorted(rows, key=lambda n: (not n.endswith(".weight"), n)):  # weight, then scales
        if rows[name] != vocab_size:
            raise UserError(
                f"{where}: {name} has {rows[name]} rows but config.json's vocab_size is "
                f"{vocab_size}: the config does not belong to these weights; convert the "
                "checkpoint again")
