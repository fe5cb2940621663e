"""A synthetic checkpoint's tokenizer is the released one in all but, where
Llama 3.2's cannot be had, its words (issue 29), and gives text to every id of
its model's vocabulary (issue 24: a random model samples ids across all of it).

The released facts below are written out from the spec (section 3, pinned by
an independent port that matches Meta's logits on the real files), not read
from the code under test."""

import json
import os
import re
import subprocess
import sys

import mlx.core as mx
import pytest
from checkpoints import tiny_config
from click.testing import CliRunner
from test_released_files import check_written_s_qat
from tokenizers import Tokenizer

from mobilemoe_mlx.chat import cli as chat_cli
from mobilemoe_mlx.chat.options import Sampling
from mobilemoe_mlx.chat.session import ChatSession
from mobilemoe_mlx.checkpoints.config import preset_config
from mobilemoe_mlx.checkpoints.consistency import read_tokenizer_ids
from mobilemoe_mlx.checkpoints.synthetic_tokenizer import (
    LLAMA_MISSING,
    LLAMA_WHEEL,
    llama_tokenizer_file,
    write_tokenizer,
)
from mobilemoe_mlx.checkpoints.turns import load_tokenizer
from mobilemoe_mlx.model.mobilemoe import Model, ModelArgs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORD = re.compile(r"[A-Za-z]{2}")
HANG = 1200  # writing, converting and loading S on a busy machine; only a hang reaches it
S_VOCAB = preset_config("S")["vocab_size"]

# Pinned on the released tokenizer (spec section 3).
HELLO, HELLO_IDS = "Hello, MobileMoE!", [128000, 9906, 11, 13716, 26694, 36, 0]
JVM = "Name one JVM language."
JVM_IDS = [128000, 128005, 882, 128006, 271, 678, 832, 73479, 4221, 13, 128008,
           128005, 78191, 128006, 271]
RELEASED_SPECIALS = {128000: "<|begin_of_text|>", 128005: "<|header_start|>",
                     128006: "<|header_end|>", 128008: "<|eot|>"}
# The protocol as text: BOS, each message, then the assistant's header.
JVM_TEXT = ("<|begin_of_text|><|header_start|>user<|header_end|>\n\nName one JVM language."
            "<|eot|><|header_start|>assistant<|header_end|>\n\n")
# The tiny preset's five special tokens (tests/checkpoints.py relies on 0, 1 and 2).
TINY_SPECIALS = {0: "<|begin_of_text|>", 1: "<|end_of_text|>", 2: "<|eot|>",
                 3: "<|header_start|>", 4: "<|header_end|>"}


def _decoded(folder, vocab_size):
    """The tokenizer in `folder`, and the text of each id in [0, vocab_size) alone."""
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    return tok, tok.decode_batch([[i] for i in range(vocab_size)], skip_special_tokens=False)


def _assert_covers(folder, vocab_size, specials):
    read_tokenizer_ids(folder / "tokenizer.json", vocab_size)  # the converter's own check
    tok, texts = _decoded(folder, vocab_size)
    assert sorted(tok.get_vocab().values()) == list(range(vocab_size))
    assert [i for i, text in enumerate(texts) if not text] == []
    assert {i: tok.id_to_token(i) for i in specials} == specials
    return texts


def _needs_llama():
    if llama_tokenizer_file() is None:
        pytest.skip(LLAMA_MISSING)


@pytest.fixture(scope="module")
def s_tokenizer_dir(tmp_path_factory):
    """The S preset's tokenizer files, as write_synthetic writes them."""
    out = tmp_path_factory.mktemp("s-tokenizer")
    write_tokenizer(out, S_VOCAB)
    return out


@pytest.fixture(scope="module")
def s_tokenizer(s_tokenizer_dir):
    """The S preset's tokenizer as load() and the chat load it (Llama 3.2's words only)."""
    _needs_llama()
    return load_tokenizer(s_tokenizer_dir, preset_config("S")["eos_token_id"])


@pytest.fixture(scope="module")
def made_up_s_dir(tmp_path_factory):
    """The S preset's tokenizer where Llama 3.2's words are not installed."""
    out = tmp_path_factory.mktemp("s-made-up")
    write_tokenizer(out, S_VOCAB, real_vocabulary=False)
    return out


def test_tiny_synthetic_tokenizer_decodes_every_id(synthetic_qat):
    vocab_size = json.loads((synthetic_qat / "config.json").read_text())["vocab_size"]
    _assert_covers(synthetic_qat, vocab_size, TINY_SPECIALS)


def test_the_tiny_tokenizer_speaks_the_released_protocol(synthetic_qat):
    tokenizer = load_tokenizer(synthetic_qat)
    messages = [{"role": "user", "content": JVM}]
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                         tokenize=False) == JVM_TEXT
    # Content is not stripped, and BOS comes first when text is encoded.
    spaced = tokenizer.apply_chat_template([{"role": "user", "content": " hi \n"}],
                                           tokenize=False)
    assert "<|header_end|>\n\n hi \n<|eot|>" in spaced
    assert tokenizer.encode("hi")[0] == 0


def test_the_made_up_real_shape_tokenizer_decodes_every_id_to_words(made_up_s_dir):
    texts = _assert_covers(made_up_s_dir, S_VOCAB, RELEASED_SPECIALS)
    # Words, not bytes or punctuation: what a user sees of a random model's answer.
    assert sum(bool(WORD.search(t)) for t in texts) > 0.99 * S_VOCAB
    # The trained part is unchanged: text still encodes into it, byte by byte at worst.
    tok = Tokenizer.from_file(str(made_up_s_dir / "tokenizer.json"))
    assert max(tok.encode("Hello! Grüße, 12345", add_special_tokens=False).ids) < 500


def test_the_made_up_tokenizer_keeps_the_released_specials_and_template(made_up_s_dir):
    tokenizer = load_tokenizer(made_up_s_dir)
    assert tokenizer.encode(HELLO)[0] == 128000
    ids = tokenizer.apply_chat_template([{"role": "user", "content": JVM}],
                                        add_generation_prompt=True)
    assert tokenizer.decode(ids) == JVM_TEXT
    assert [i for i in ids if i >= 128000] == [i for i in JVM_IDS if i >= 128000]


def test_the_s_presets_tokenizer_encodes_the_pinned_ids(s_tokenizer):
    assert s_tokenizer.encode(HELLO) == HELLO_IDS
    assert s_tokenizer.apply_chat_template([{"role": "user", "content": JVM}],
                                           add_generation_prompt=True) == JVM_IDS
    assert {i: s_tokenizer.convert_ids_to_tokens(i) for i in RELEASED_SPECIALS} == RELEASED_SPECIALS
    assert len(s_tokenizer.get_vocab()) == S_VOCAB


def test_the_chat_sends_the_pinned_prompt_for_one_message(s_tokenizer):
    """What the model reads (the KV cache's tokens) for the message, through the
    chat's own session; the model is any one of the S vocabulary (random, tiny)."""
    config = dict(tiny_config(), vocab_size=S_VOCAB)
    model = Model(ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    session = ChatSession(model, s_tokenizer, sampling=Sampling(max_tokens=1))
    session.ask(JVM)
    assert session.cache_tokens[:len(JVM_IDS)] == JVM_IDS


def test_made_up_and_llama_tokenizers_share_every_special_token(s_tokenizer_dir, made_up_s_dir):
    _needs_llama()
    real, made_up = (json.loads((d / "tokenizer.json").read_text())["added_tokens"]
                     for d in (s_tokenizer_dir, made_up_s_dir))
    assert real == made_up and len(real) == 256
    assert ((s_tokenizer_dir / "tokenizer_config.json").read_text()
            == (made_up_s_dir / "tokenizer_config.json").read_text())
    # The wheel's own names, bar MobileMoE's three and the vision model's <|image|>.
    wheel = {t["id"]: t["content"] for t in
             json.loads(llama_tokenizer_file().read_text())["added_tokens"]}
    ours = {t["id"]: t["content"] for t in real}
    assert {i for i in wheel if wheel[i] != ours.get(i)} == {128005, 128006, 128008, 128256}


def test_the_wheel_named_in_messages_is_pyprojects():
    tomllib = pytest.importorskip("tomllib", reason="Python 3.10 has no tomllib")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        extra = tomllib.load(f)["project"]["optional-dependencies"]["llama-tokenizer"]
    assert [r.split(";")[0].strip() for r in extra] == [LLAMA_WHEEL]


def test_chat_on_a_synthetic_model_prints_words(synthetic_tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("MOBILEMOE_MLX_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = CliRunner().invoke(chat_cli.main, ["--model", str(synthetic_tiny), "--prompt", "Hello",
                                           "--max-tokens", "24", "--temp", "1", "--seed", "0"])
    assert r.exit_code == 0, r.stderr
    assert WORD.search(r.stdout), r.stdout


@pytest.mark.e2e
def test_the_full_size_demo_chats_in_words(tmp_path):
    """The README's try-it path at the real S shape, as a user runs it."""
    env = dict(os.environ, MOBILEMOE_MLX_HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1")
    model = tmp_path / "s"
    for command in ([sys.executable, "-m", "mobilemoe_mlx.checkpoints.synthetic", "--preset", "S",
                     "--out", str(model)],
                    [sys.executable, "chat.py", "--model", str(model), "--max-tokens", "12",
                     "--prompt", "Hello"]):
        r = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=HANG)
        assert r.returncode == 0, r.stderr[-2000:]
    assert len(WORD.findall(r.stdout)) >= 6, r.stdout  # 12 tokens, nearly all words
    check_written_s_qat(model / "model.safetensors")  # the tensors the released file holds
