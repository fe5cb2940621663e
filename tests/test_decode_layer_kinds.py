"""The compiled decode step runs one compiled function per kind of layer
(model/mobilemoe.py, `DecodeStep`): layers alike share one trace, each call
passing its own arrays. So a layer unlike the others must get a trace of its
own, whatever makes it unlike them, even when it was so before the first step
(tests/test_decode_staleness.py covers changes after it).

Each case changes the tiny model before any step (most only layer 1) in one
of the ways a layer's trace can depend on besides its arrays: a plain
attribute, a key more, a submodule of another class, a module used twice in
the layer, mlx-lm's LoRA on the last layers only, another dtype, another head
size, another kind of RoPE; or shares a module with another layer. A step
that reused layer 0's trace for layer 1, or assumed the config's top-k or an
interleaved RoPE, decodes other tokens than the plain path. The model's
training mode and additions that change nothing are checked after.
"""

from dataclasses import replace

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models.rope_utils import DynamicNTKScalingRoPE, SuScaledRoPE
from mlx_lm.tuner.utils import linear_to_lora_layers
from test_decode_staleness import LORA, generate, layer_norm_like, noise
from test_numerics import assert_close

from mobilemoe_mlx.model.mobilemoe import Attention


def last_layer_lora(model):
    """mlx_lm.lora --num-layers 1: LoRA on the last layer only, with a non-zero B."""
    linear_to_lora_layers(model, 1, LORA)
    for _, m in model.layers[-1].named_modules():
        if "lora_b" in m:
            m.lora_b = noise(m.lora_b.shape, 0.5)


def share_norm(model):
    """One RMSNorm module object in two layers (then given other weights)."""
    model.layers[1].input_layernorm = model.layers[0].input_layernorm
    model.layers[0].input_layernorm.weight = noise(model.layers[0].input_layernorm.weight.shape)


def norm_used_twice(model):
    """One RMSNorm object as both norms of layer 1 (so the layer has a slot
    fewer than the others), with weights of its own."""
    layer = model.layers[1]
    layer.post_attention_layernorm = layer.input_layernorm
    layer.input_layernorm.weight = noise(layer.input_layernorm.weight.shape)


def wider_heads(model):
    """Layer 1's attention with heads twice as wide (float, freshly made)."""
    args = replace(model.args, head_dim=2 * model.args.head_dim)
    model.layers[1].self_attn = Attention(args)


def rope(model, make):
    attn = model.layers[1].self_attn
    attn.rope = make(attn.head_dim)


def all_top_k(model, k):
    for layer in model.layers:
        layer.feed_forward.top_k = k


CHANGES = {
    "a plain attribute (attention scale)": lambda m: setattr(m.layers[1].self_attn, "scale", 2.0),
    "a plain attribute (routed scaling)": lambda m: setattr(m.layers[1].feed_forward, "scaling",
                                                            40.0),
    "a key more (a bias on o_proj)": lambda m: m.layers[1].self_attn.o_proj.__setitem__(
        "bias", noise((m.args.hidden_size,), 2.0)),
    "a submodule of another class": lambda m: setattr(
        m.layers[1], "post_attention_layernorm", layer_norm_like(m.layers[1].post_attention_layernorm)),
    "LoRA on the last layer only": last_layer_lora,
    "another dtype": lambda m: m.layers[1].set_dtype(mx.bfloat16),
    "a module used twice in the layer": norm_used_twice,
    "top-k other than the config's (layer 1)": lambda m: setattr(m.layers[1].feed_forward,
                                                                 "top_k", 1),
    "top-k other than the config's (every layer)": lambda m: all_top_k(
        m, m.args.num_experts_per_tok + 1),
    "another head size": wider_heads,
    "a RoPE of half-split pairs (traditional=False)": lambda m: rope(
        m, lambda d: nn.RoPE(d, traditional=False, base=10.0)),
    "longrope (SuScaledRoPE)": lambda m: rope(
        m, lambda d: SuScaledRoPE(d, base=10.0, original_max_position_embeddings=4,
                                  long_factor=[1.0 + i for i in range(d // 2)])),
    "a RoPE that takes an int offset (DynamicNTKScalingRoPE)": lambda m: rope(
        m, lambda d: DynamicNTKScalingRoPE(d, max_position_embeddings=4, traditional=True,
                                           base=10.0, factor=4.0)),
    "a module shared by two layers": share_norm,
}
# The guards: these decode on the plain path, every other case compiled.
PLAIN_PATH = {"a module shared by two layers",
              "a RoPE that takes an int offset (DynamicNTKScalingRoPE)"}


@pytest.fixture(scope="module")
def unchanged(qat_int4, tokens):
    return generate(qat_int4.model(), tokens, compiled=False)[0]


@pytest.mark.parametrize("change", CHANGES)
def test_a_layer_unlike_the_others_decodes_as_the_plain_path(qat_int4, tokens, unchanged,
                                                             change):
    model = qat_int4.model()
    assert len(model.layers) >= 2
    mx.random.seed(sum(map(ord, change)))
    CHANGES[change](model)
    plain, _, plain_logits = generate(model, tokens, compiled=False)
    assert not np.array_equal(plain, unchanged), "the change must show in the tokens"
    compiled, marks, _ = generate(model, tokens, compiled=True)
    if change in PLAIN_PATH:
        assert not any(marks), "this case decodes on the plain path"
    else:
        assert all(marks), "the steps ran compiled"
    np.testing.assert_array_equal(compiled, plain)
    _, _, logits = generate(model, tokens, compiled=True, forced=plain)
    assert_close(logits, plain_logits, "compiled vs plain, layer 1 unlike layer 0",
                 cos_min=0.999999, rel_max=1e-5)


def test_alike_layers_share_one_trace(qat_int4):
    """The point of the per-layer functions: layers alike are one kind."""
    from mobilemoe_mlx.model.mobilemoe import layer_signature

    model = qat_int4.model()
    first = layer_signature(model.layers[0])
    assert all(layer_signature(layer) == first for layer in model.layers[1:])
    model.layers[1].input_layernorm.eps = 1e-3
    assert layer_signature(model.layers[1]) != first
    # alike by content, not identity: a fresh norm with layer 0's settings
    model.layers[1].input_layernorm = nn.RMSNorm(model.args.hidden_size,
                                                 eps=model.layers[0].input_layernorm.eps).eval()
    assert layer_signature(model.layers[1]) == first


def test_training_mode_dropout_takes_the_plain_path(qat_int4, tokens):
    """A trace would freeze a dropout's random mask: in training mode (LoRA
    with dropout, as mlx_lm.lora trains) every step draws a new one, as the
    plain path does; after eval() the steps run compiled again."""
    model = qat_int4.model()
    linear_to_lora_layers(model, len(model.layers), dict(LORA, dropout=0.5))
    for _, m in model.named_modules():
        if "lora_b" in m:
            m.lora_b = noise(m.lora_b.shape, 0.5)
    model.train()
    runs = {}
    for compiled in (True, False):
        mx.random.seed(3)
        runs[compiled] = generate(model, tokens, compiled=compiled)
    np.testing.assert_array_equal(runs[True][0], runs[False][0])
    np.testing.assert_allclose(runs[True][2], runs[False][2], rtol=0, atol=0)
    assert not any(runs[True][1])
    model.eval()
    plain = generate(model, tokens, compiled=False)[0]
    compiled, marks, _ = generate(model, tokens, compiled=True)
    assert all(marks)
    np.testing.assert_array_equal(compiled, plain)


ADDITIONS = {
    "a list in layer 1 leading back to it": lambda m: setattr(
        m.layers[1].self_attn, "back", [m.layers[1]]),
    "one tuple object in every layer": lambda m: [
        layer.__setitem__("settings", ()) for layer in m.layers],
}


@pytest.mark.parametrize("addition", ADDITIONS)
def test_additions_that_change_nothing_keep_the_compiled_step(qat_int4, tokens, unchanged,
                                                              addition):
    model = qat_int4.model()
    ADDITIONS[addition](model)
    compiled, marks, _ = generate(model, tokens, compiled=True)
    assert all(marks)
    np.testing.assert_array_equal(compiled, unchanged)
