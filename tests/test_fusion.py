"""Load-time fusion (q/k/v into one matmul, the shared expert's gate/up into
another) changes no bit of any output, on every path a model is loaded by:
our loader, mlx-lm's loader (model_file + sanitize + nn.quantize), mlx-lm's
own quantizer (mlx_lm.convert), and a model quantized in memory (the bench).

The unfused model is the same directory loaded with `fuse_projections` off;
both run the tiny shapes in float32, where any change to the arithmetic would
show in the low bits of the logits.
"""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import load_model

from bench import dense
from mobilemoe_mlx.model import mobilemoe as moe


def load(path, fuse: bool):
    m, _ = load_model(path, model_config={"model_file": None, "fuse_projections": fuse},
                      get_model_classes=lambda config: (moe.Model, moe.ModelArgs))
    return m


def full_and_cached(model, tokens: np.ndarray):
    """Logits of one full forward, and of a cached decode: a 6-token prompt, a
    5-token chunk, then one token at a time (each step's logits concatenated)."""
    full = model(mx.array(tokens))
    cache = make_prompt_cache(model)
    cuts = [0, 6, 11] + list(range(12, tokens.shape[1] + 1))
    steps = [model(mx.array(tokens[:, a:b]), cache=cache) for a, b in zip(cuts, cuts[1:])]
    out = mx.concatenate(steps, axis=1)
    mx.eval(full, out)
    assert full.dtype == mx.float32
    return np.array(full), np.array(out)


def assert_identical(a, b):
    for x, y in zip(a, b):
        assert x.shape == y.shape
        assert np.array_equal(x, y), f"max |diff| {np.abs(x - y).max():.3e}"


def fused_state(model):
    """(attention fused?, shared expert / dense MLP fused?) in the first layer."""
    layer = model.layers[0]
    ffn = layer.feed_forward.shared_expert if "feed_forward" in layer else layer.mlp
    return layer.self_attn.is_fused(), ffn.is_fused()


def test_loading_fuses_and_changes_no_bit(qat_int4, tokens):
    fused, unfused = load(qat_int4.path, True), load(qat_int4.path, False)
    assert fused_state(fused) == (True, True) and fused_state(unfused) == (False, False)
    attn = fused.layers[0].self_attn
    assert "q_proj" not in attn and isinstance(attn.qkv_proj, nn.QuantizedLinear)
    c = qat_int4.config
    assert attn.qkv_proj.weight.shape[0] == (c["num_attention_heads"]
                                             + 2 * c["num_key_value_heads"]) * c["head_dim"]
    assert_identical(full_and_cached(fused, tokens), full_and_cached(unfused, tokens))
    # the stacked words are the directory's words, row for row
    w = qat_int4.weights()
    got = np.array(attn.qkv_proj.weight)
    want = np.concatenate([np.array(w[f"model.layers.0.self_attn.{p}_proj.weight"])
                           for p in "qkv"])
    assert np.array_equal(got, want)


def test_fusing_in_memory_changes_no_bit(qat_int4, tokens):
    model = load(qat_int4.path, False)
    before = full_and_cached(model, tokens)
    model.fuse_projections()
    assert fused_state(model) == (True, True)
    assert_identical(full_and_cached(model, tokens), before)


def test_float_weights_are_not_fused(qat_dense):
    # A float matmul's summation order may depend on its width: only quantized
    # projections are stacked (that is what makes the fusion exact).
    model = load(qat_dense.path, True)
    assert fused_state(model) == (False, False)
    model.fuse_projections()
    assert fused_state(model) == (False, False)


def test_mlx_lm_loader_fuses(qat_int4, tokens):
    from mlx_lm.utils import load as mlx_lm_load

    model, _ = mlx_lm_load(str(qat_int4.path), trust_remote_code=True)
    assert type(model).__module__ != moe.__name__  # the directory's own copy of model/mobilemoe.py
    assert fused_state(model) == (True, True)
    assert_identical(full_and_cached(model, tokens),
                     full_and_cached(load(qat_int4.path, False), tokens))


def test_mlx_lm_convert_saves_separate_projections_and_loads_fused(bf16_dense, tokens, tmp_path):
    from mlx_lm.convert import convert

    out = tmp_path / "requantized"
    convert(str(bf16_dense.path), str(out), quantize=True, q_group_size=32, q_bits=4, dtype="float32",
            trust_remote_code=True)
    saved = {}
    for f in out.glob("model*.safetensors"):
        saved.update(mx.load(str(f)))
    assert "model.layers.0.self_attn.q_proj.scales" in saved
    assert not any("qkv_proj" in k or "gate_up_proj.weight" in k and "shared" in k
                   for k in saved)
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 4
    assert_identical(full_and_cached(load(out, True), tokens),
                     full_and_cached(load(out, False), tokens))


def test_mixed_precision_projections_stay_separate(qat_int4):
    # q at 8 bits, k and v at 4: stacking would mix two packings in one matmul.
    w = {k: v for k, v in qat_int4.weights().items()}
    q = "model.layers.0.self_attn.q_proj"
    deq = mx.dequantize(w[f"{q}.weight"], w[f"{q}.scales"], w[f"{q}.biases"], 32, 4)
    w[f"{q}.weight"], w[f"{q}.scales"], w[f"{q}.biases"] = mx.quantize(deq, 32, 8)
    model = moe.Model(moe.ModelArgs.from_dict(qat_int4.config))
    out = model.sanitize(w)
    assert f"{q}.scales" in out and not model.layers[0].self_attn.is_fused()
    assert model.layers[1].self_attn.is_fused()  # other layers still fuse


@pytest.mark.parametrize("family", ["moe", "dense"])
def test_bench_models_fuse_bit_identically(family, tokens):
    """A model quantized in memory (as the bench builds them), MoE and dense."""
    from bench.models import build_synthetic

    built = build_synthetic("tiny" if family == "moe" else "pro-tiny", seed=3, fuse=True)
    fused = built.model
    assert fused_state(fused) == (True, True)
    module = moe if family == "moe" else dense
    unfused = module.Model(module.ModelArgs.from_dict(built.config))
    nn.quantize(unfused, group_size=32, bits=4,
                class_predicate=lambda p, m: hasattr(m, "to_quantized") and "router" not in p)
    # give the unfused model the fused one's values, split back into q/k/v and gate/up
    params = dict(tree_flatten(fused.parameters()))
    split = {}
    for name, value in params.items():
        for group, parts in (("qkv_proj", ("q_proj", "k_proj", "v_proj")),
                             ("gate_up_proj", ("gate_proj", "up_proj"))):
            # (the routed experts' own gate_up_proj is stored fused: not ours to split)
            if f".{group}." in name and ".experts." not in name:
                prefix, role = name.split(f".{group}.")
                old = unfused
                for key in prefix.split("."):
                    old = old[int(key)] if key.isdigit() else old[key]
                rows = np.cumsum([old[p].weight.shape[0] for p in parts])[:-1].tolist()
                for p, piece in zip(parts, mx.split(value, rows, axis=0)):
                    split[f"{prefix}.{p}.{role}"] = piece
                break
        else:
            split[name] = value
    unfused.load_weights(list(split.items()))
    assert fused_state(unfused) == (False, False)
    toks = tokens % built.config["vocab_size"]
    assert_identical(full_and_cached(fused, toks), full_and_cached(unfused, toks))
