"""A turn ends where the chat template ends a message (issue 29).

The released checkpoints end a turn with <|eot|>, and nobody knows whether
their eos_token_id lists it. The checkpoints here list only <|end_of_text|>,
and their model's next token is always <|eot|>: the chat, `load()` and mlx-lm's
own tools on the converted directory must all stop there at once."""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from checkpoints import Bf16, Checkpoint, bf16_tensors, save_safetensors, tiny_config
from checkpoints import write_tokenizer_files as write_checkpoint_tokenizer
from click.testing import CliRunner
from mlx_lm.utils import load as mlx_lm_load
from test_convert_cli import run_convert

import mobilemoe_mlx
from mobilemoe_mlx.chat import cli as chat_cli
from mobilemoe_mlx.checkpoints.convert import convert
from mobilemoe_mlx.checkpoints.synthetic_tokenizer import write_tokenizer
from mobilemoe_mlx.checkpoints.turns import end_of_turn, load_tokenizer

# The tiny tokenizer's ids (tests/test_synthetic_tokenizer.py pins its names).
END_OF_TEXT, EOT = 1, 2


def _bf16_bits(a: np.ndarray) -> Bf16:
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    return Bf16(((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16))


def write_eot_model(out: Path) -> Checkpoint:
    """A bf16 checkpoint whose next token is <|eot|> whatever it reads, with
    eos_token_id [<|end_of_text|>] in config.json and generation_config.json.

    Every layer's output projections are zero, so the residual stream stays the
    last token's embedding row; every row points one positive way, <|eot|>'s
    twice as far as any other. The tied head's logit of token i is then row i
    times the normed stream (norm weights are positive): the largest for <|eot|>."""
    config = tiny_config()
    config.update(eos_token_id=[END_OF_TEXT])
    tensors, _ = bf16_tensors(config, seed=3)
    for name, t in tensors.items():
        if name.endswith(("o_proj.weight", "down_proj.weight", "experts.down_proj")):
            tensors[name] = Bf16(np.zeros_like(t.bits))
    rng = np.random.default_rng(3)
    way = rng.uniform(0.5, 1.0, config["hidden_size"])
    lengths = rng.uniform(0.2, 1.0, config["vocab_size"])
    lengths[EOT] = 2.0
    tensors["model.embed_tokens.weight"] = _bf16_bits(np.outer(lengths, way))
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    write_checkpoint_tokenizer(out, config)
    save_safetensors(tensors, out / "model.safetensors")
    return Checkpoint(out, config, {})


@pytest.fixture(scope="module")
def eot_model(tmp_path_factory) -> Checkpoint:
    return write_eot_model(tmp_path_factory.mktemp("eot") / "ckpt")


@pytest.fixture(scope="module")
def eot_converted(eot_model, tmp_path_factory) -> Path:
    return convert(str(eot_model.path), str(tmp_path_factory.mktemp("eot-mlx") / "mlx"),
                   dtype="float32", progress=False)


def test_the_checkpoint_lists_only_end_of_text_and_predicts_eot(eot_model, eot_converted):
    # The premise of the tests below, checked on the model itself.
    assert eot_model.config["eos_token_id"] == [END_OF_TEXT]
    model, _ = mobilemoe_mlx.load(str(eot_converted))
    tokens = mx.array(np.random.default_rng(0).integers(0, 512, (3, 12)))
    assert (np.array(model(tokens).argmax(-1)) == EOT).all()


def test_the_chat_answer_ends_at_once_with_an_empty_reply(eot_model, tmp_path, monkeypatch):
    monkeypatch.setenv("MOBILEMOE_MLX_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = CliRunner().invoke(chat_cli.main, ["--model", str(eot_model.path), "--prompt",
                                           "Hello", "--max-tokens", "20"])
    assert r.exit_code == 0, r.stderr
    assert r.stdout == "\n"
    assert "max tokens reached" not in r.stderr


def test_mlx_lm_generate_on_the_converted_directory_stops_after_one_token(eot_converted):
    model, tokenizer = mlx_lm_load(str(eot_converted), trust_remote_code=True)
    steps = list(mlx_lm.stream_generate(model, tokenizer, "Hello", max_tokens=20))
    assert [(s.token, s.finish_reason) for s in steps] == [(EOT, "stop")]
    assert mlx_lm.generate(model, tokenizer, "Hello", max_tokens=20) == ""


def test_the_converted_directory_keeps_its_eos_ids_and_adds_the_end_of_a_turn(eot_converted):
    # mlx-lm's loader reads generation_config.json's eos_token_id over config.json's.
    for name in ("config.json", "generation_config.json"):
        assert json.loads((eot_converted / name).read_text())["eos_token_id"] == [
            END_OF_TEXT, EOT], name


def test_load_stops_at_the_end_of_a_turn_whatever_the_directory_lists(eot_converted, tmp_path):
    """A directory converted before this rule (its config lists <|end_of_text|>
    only) still stops at <|eot|> through load()."""
    old = tmp_path / "old"
    old.mkdir()
    for f in eot_converted.iterdir():
        (old / f.name).symlink_to(f)
    for name in ("config.json", "generation_config.json"):
        data = json.loads((eot_converted / name).read_text())
        data["eos_token_id"] = [END_OF_TEXT]
        (old / name).unlink()
        (old / name).write_text(json.dumps(data))
    model, tokenizer = mobilemoe_mlx.load(str(old))
    assert set(tokenizer.eos_token_ids) == {END_OF_TEXT, EOT}
    steps = list(mlx_lm.stream_generate(model, tokenizer, "Hello", max_tokens=20))
    assert [(s.token, s.finish_reason) for s in steps] == [(EOT, "stop")]


# -- the end of a turn, read from templates of every kind -----------------------

ADDED = ["<|im_start|>", "<|im_end|>", "<end_of_turn>", "<start_of_turn>", "</s>"]
TEMPLATES = {
    "released": ("{{ bos_token }}{% for m in messages %}<|header_start|>{{ m['role'] }}"
                 "<|header_end|>\n\n{{ m['content'] }}<|eot|>{% endfor %}", "<|eot|>"),
    "ChatML, a newline after the closing token": (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}", "<|im_end|>"),
    "Gemma": ("{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}"
              "<end_of_turn>\n{% endfor %}", "<end_of_turn>"),
    "eos_token after the answer only": (
        "{% for m in messages %}{{ m['content'] }}{% if m['role'] == 'assistant' %}"
        "{{ eos_token }}{% endif %}{% endfor %}", "<|end_of_text|>"),
    "text before the closing token": (
        "{% for m in messages %}{{ m['content'] }} (end)\n</s>{% endfor %}", "</s>"),
}
WITHOUT = {
    "a newline only": "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}",
    "answers refused": ("{% for m in messages %}{% if m['role'] == 'assistant' %}"
                        "{{ raise_exception('no answers here') }}{% endif %}"
                        "{{ m['content'] }}<|eot|>{% endfor %}"),
    "the answer left out": "{% for m in messages %}<|eot|>{% endfor %}",
    "no template": None,
}


def _tokenizer_dir(folder: Path, template) -> Path:
    folder.mkdir()
    write_tokenizer(folder, 512 - len(ADDED), with_chat_template=False)
    data = json.loads((folder / "tokenizer.json").read_text())
    data["added_tokens"] += [{"id": 512 - len(ADDED) + k, "content": t, "single_word": False, "lstrip": False,
                              "rstrip": False, "normalized": False, "special": True}
                             for k, t in enumerate(ADDED)]
    (folder / "tokenizer.json").write_text(json.dumps(data))
    if template is not None:
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config["chat_template"] = template
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("case", list(TEMPLATES))
def test_the_end_of_a_turn_is_the_special_token_closing_an_answer(tmp_path, case):
    template, closing = TEMPLATES[case]
    tokenizer = load_tokenizer(_tokenizer_dir(tmp_path / "t", template), [END_OF_TEXT])
    assert end_of_turn(tokenizer) == tokenizer.convert_tokens_to_ids(closing)
    assert tokenizer.convert_tokens_to_ids(closing) in tokenizer.eos_token_ids


@pytest.mark.parametrize("case", list(WITHOUT))
def test_no_end_of_a_turn_where_the_template_shows_none(tmp_path, case):
    tokenizer = load_tokenizer(_tokenizer_dir(tmp_path / "t", WITHOUT[case]), [END_OF_TEXT])
    assert end_of_turn(tokenizer) is None
    assert set(tokenizer.eos_token_ids) == {END_OF_TEXT}  # the config's, and eos_token's


@pytest.mark.parametrize("case", ["a newline only", "no template"])
def test_a_conversion_says_once_what_it_stops_on(eot_model, tmp_path, capfd, case):
    src = tmp_path / "src"
    src.mkdir()
    for f in eot_model.path.iterdir():
        (src / f.name).symlink_to(f)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (src / name).unlink()
    _tokenizer_dir(tmp_path / "tok", WITHOUT[case])
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (src / name).write_text((tmp_path / "tok" / name).read_text())
    out = tmp_path / "out"
    result = run_convert(src, "--out", out)
    assert result.returncode == 0, result.stderr
    notes = [line for line in result.stderr.splitlines() if line.startswith("note: ")]
    why = "no chat template" if case == "no template" else "no special token"
    assert len(notes) == 1 and why in notes[0], result.stderr
    assert 'generation stops on 1 ("<|end_of_text|>") only' in notes[0]
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == [END_OF_TEXT]
    # Once: loading the converted directory says nothing of it again.
    capfd.readouterr()
    mobilemoe_mlx.load(str(out))
    assert "note:" not in capfd.readouterr().err


@pytest.mark.e2e
def test_mlx_lm_generate_console_command_stops_at_the_end_of_a_turn(eot_converted):
    exe = Path(sys.executable).parent / "mlx_lm.generate"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "mlx_lm.generate"]
    result = subprocess.run(
        cmd + ["--model", str(eot_converted), "--trust-remote-code", "--prompt", "hi",
               "--max-tokens", "20"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    # mlx-lm's own words for an answer that stopped before its first token's text.
    assert "No text generated for this prompt" in result.stdout, result.stdout
