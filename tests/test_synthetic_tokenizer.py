"""A synthetic checkpoint's tokenizer gives text to every id of its model's
vocabulary (issue 24): a random model samples ids across all of it, and at the
real shape's 128,256 ids a tokenizer holding only what a short text trains left
almost every answer token without text (a chat printed `!!!!!!`)."""

import json
import os
import re
import subprocess
import sys

import pytest
from click.testing import CliRunner
from tokenizers import Tokenizer

from mobilemoe_mlx.chat import cli as chat_cli
from mobilemoe_mlx.checkpoints.config import preset_config
from mobilemoe_mlx.checkpoints.consistency import read_tokenizer_ids
from mobilemoe_mlx.checkpoints.synthetic import BOS_ID, EOS_IDS, SPECIAL_TOKENS, write_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORD = re.compile(r"[A-Za-z]{2}")
HANG = 1200  # writing, converting and loading S on a busy machine; only a hang reaches it


def _decoded(folder, vocab_size):
    """The tokenizer in `folder`, and the text of each id in [0, vocab_size) alone."""
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    return tok, tok.decode_batch([[i] for i in range(vocab_size)], skip_special_tokens=False)


def _assert_covers(folder, vocab_size):
    read_tokenizer_ids(folder / "tokenizer.json", vocab_size)  # the converter's own check
    tok, texts = _decoded(folder, vocab_size)
    assert sorted(tok.get_vocab().values()) == list(range(vocab_size))
    assert [i for i, text in enumerate(texts) if not text] == []
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS[:3]] == [BOS_ID, *EOS_IDS]
    return texts


def test_tiny_synthetic_tokenizer_decodes_every_id(synthetic_qat):
    vocab_size = json.loads((synthetic_qat / "config.json").read_text())["vocab_size"]
    _assert_covers(synthetic_qat, vocab_size)


def test_the_real_shapes_tokenizer_decodes_every_id_to_words(tmp_path):
    vocab_size = preset_config("S")["vocab_size"]
    write_tokenizer(tmp_path, vocab_size)
    texts = _assert_covers(tmp_path, vocab_size)
    # Words, not bytes or punctuation: what a user sees of a random model's answer.
    assert sum(bool(WORD.search(t)) for t in texts) > 0.99 * vocab_size
    # The trained part is unchanged: text still encodes into it, byte by byte at worst.
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert max(tok.encode("Hello! Grüße, 12345").ids) < 500


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
