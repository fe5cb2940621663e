"""mlx-lm itself runs a converted directory: its loader (through the
`model_file` copied beside the weights, with trust_remote_code), its KV-cached
generation loop, its quantizer and (end-to-end tier) its console command."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
import reference as ref
from mlx_lm.convert import convert as mlx_lm_convert
from mlx_lm.utils import load as mlx_lm_load

import mobilemoe_mlx

COS_EXACT, REL_EXACT = 0.99999, 1e-4
NEW_TOKENS = 4
# A text prompt whose greedy continuation on the test checkpoint is varied (not
# one token repeated), so a wrong cache or sampling step shows in the tokens.
TEXT_PROMPT = "Paris is the capital of"
TEXT_TOKENS = 8


@pytest.fixture(scope="module")
def loaded(qat_int4):
    return mlx_lm_load(str(qat_int4.path), trust_remote_code=True)


@pytest.fixture(scope="module")
def ours(qat_int4):
    """The same directory through our own loader."""
    return mobilemoe_mlx.load(str(qat_int4.path))


def test_mlx_lm_loads_the_directory_and_matches_the_reference(loaded, qat_int4, tokens,
                                                              reference_logits):
    model, tokenizer = loaded
    # the architecture came from the directory's own copy of the model file
    assert Path(type(model).__init__.__code__.co_filename) == qat_int4.path / "mobilemoe.py"
    out = model(mx.array(tokens))
    mx.eval(out)
    got = np.array(out).astype(np.float64)
    want = reference_logits(qat_int4.source, tokens)
    cos, rel = ref.cosine(got, want), ref.rel_err(got, want)
    print(f"\n[mlx_lm.load qat->int4] cosine={cos:.9f} rel_err={rel:.3e}")
    assert cos >= COS_EXACT and rel <= REL_EXACT
    assert set(tokenizer.eos_token_ids) >= set(qat_int4.source.config["eos_token_id"])


def test_mlx_lm_load_and_our_load_give_the_same_logits(loaded, ours, tokens):
    # Same weights, same model source (the directory's copy is ours): the same numbers.
    theirs = loaded[0](mx.array(tokens))
    mine = ours[0](mx.array(tokens))
    mx.eval(theirs, mine)
    np.testing.assert_array_equal(np.array(theirs), np.array(mine))


def reference_greedy(ckpt, prompt, n):
    """Greedy continuation by the reference, with each step's top-1 margin."""
    seq, margins = list(prompt), []
    for _ in range(n):
        last = ref.forward(ckpt.weights, ckpt.config, np.array([seq]))[0, -1]
        top2 = np.sort(last)[-2:]
        margins.append(top2[1] - top2[0])
        seq.append(int(np.argmax(last)))
        if seq[-1] in ckpt.config["eos_token_id"]:
            break
    return seq[len(prompt):], margins


def test_mlx_lm_greedy_generation_matches_the_reference(loaded, qat_int4, tokens):
    model, tokenizer = loaded
    prompt = [int(t) for t in tokens[0, :8]]
    want, margins = reference_greedy(qat_int4.source, prompt, NEW_TOKENS)
    assert min(margins) > 1e-3, "greedy choice near a tie: pick another prompt"
    got = [r.token for r in mlx_lm.stream_generate(model, tokenizer, prompt,
                                                   max_tokens=NEW_TOKENS)]
    assert got == want


def greedy_without_cache(model, prompt, n):
    """Argmax of a full forward pass over the whole sequence at every step (no KV
    cache, no sampler): what mlx-lm's cached greedy loop must reproduce."""
    seq, margins = list(prompt), []
    for _ in range(n):
        last = np.array(model(mx.array([seq]))[0, -1])
        top2 = np.sort(last)[-2:]
        margins.append(top2[1] - top2[0])
        seq.append(int(np.argmax(last)))
    return seq[len(prompt):], margins


def test_mlx_lm_generate_text_is_our_models_greedy_continuation(loaded, ours):
    model, tokenizer = loaded
    prompt = tokenizer.encode(TEXT_PROMPT)
    want, margins = greedy_without_cache(ours[0], prompt, TEXT_TOKENS)
    assert min(margins) > 1e-3, "greedy choice near a tie: pick another prompt"
    assert len(set(want)) > 2, "a degenerate continuation would not test the loop"
    got = [r.token for r in mlx_lm.stream_generate(model, tokenizer, TEXT_PROMPT,
                                                   max_tokens=TEXT_TOKENS)]
    assert got == want
    # generate() (greedy by default) returns those tokens' text; mlx-lm's streaming
    # detokenizer drops a leading space of the first token, decode() keeps it.
    text = mlx_lm.generate(model, tokenizer, TEXT_PROMPT, max_tokens=TEXT_TOKENS)
    assert text.lstrip(" ") == tokenizer.decode(want).lstrip(" ")


def test_mlx_lm_convert_keeps_the_router_float32_and_unquantized(bf16_dense, tmp_path):
    # mlx-lm's own quantizer, run on an unquantized float32 directory, must honour
    # the model's quant_predicate and cast_predicate like it does for its own MoEs.
    out = tmp_path / "requantized"
    mlx_lm_convert(str(bf16_dense.path), str(out), quantize=True, q_group_size=32,
                   dtype="bfloat16", trust_remote_code=True)
    weights = {}
    for f in out.glob("model*.safetensors"):
        weights.update(mx.load(str(f)))
    routers = [k for k in weights if ".router." in k]
    assert routers and all(k.endswith("router.weight") for k in routers), routers
    assert all(weights[k].dtype == mx.float32 for k in routers)
    biases = [k for k in weights if k.endswith("expert_bias")]
    assert biases and all(weights[k].dtype == mx.float32 for k in biases)
    assert weights["model.layers.0.self_attn.q_proj.scales"].dtype == mx.bfloat16
    # the experts were quantized too (a predicate that skipped them would keep them dense)
    experts = "model.layers.0.feed_forward.experts."
    assert {experts + "gate_up_proj.scales", experts + "down_proj.scales"} <= set(weights)
    assert weights[experts + "gate_up_proj.weight"].dtype == mx.uint32


@pytest.mark.e2e
def test_mlx_lm_generate_console_command(qat_int4):
    exe = Path(sys.executable).parent / "mlx_lm.generate"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "mlx_lm.generate"]
    result = subprocess.run(
        cmd + ["--model", str(qat_int4.path), "--trust-remote-code", "--prompt", "hi",
               "--max-tokens", "3"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Generation: 3 tokens" in result.stdout, result.stdout
    # transformers reads config.json for the tokenizer: nothing it says about a
    # mobilemoe config is the user's to act on (test_transformers_warnings_...)
    assert "transformers" not in result.stderr, result.stderr


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("model_type", ["mobilemoe", "llama"])
def test_transformers_warnings_about_a_mobilemoe_config_and_only_those_are_dropped(
        loaded, qat_int4, tmp_path, model_type):
    """The model file (loaded above) filters transformers' three messages
    while it reads a mobilemoe config; the same messages about another
    model's config, and any other message, still show."""
    from transformers import PretrainedConfig

    config = json.loads((qat_int4.path / "config.json").read_text())
    assert config["rope_parameters"]["low_freq_factor"] == config["rope_parameters"][
        "high_freq_factor"], "the released RoPE values, which transformers' check warns about"
    (tmp_path / "config.json").write_text(json.dumps(dict(config, model_type=model_type)))
    records = _Records()
    loggers = [logging.getLogger(f"transformers.{name}")
               for name in ("configuration_utils", "modeling_rope_utils")]
    for logger in loggers:
        logger.addHandler(records)
    try:
        PretrainedConfig.from_pretrained(str(tmp_path))
        for logger in loggers:
            logger.warning("any other message")
    finally:
        for logger in loggers:
            logger.removeHandler(records)
    about_config = [m for m in records.messages if m != "any other message"]
    assert records.messages.count("any other message") == 2
    if model_type == "mobilemoe":
        assert about_config == []
    else:
        assert any(m.startswith("You are using a model of type `llama`") for m in about_config)
        assert any("high_freq_factor field must be greater" in m for m in about_config)
