"""The compiled decode step runs one compiled function per kind of layer
(model/mobilemoe.py, `DecodeStep`): layers alike share one trace, each call
passing its own arrays. So a layer unlike the others must get a trace of its
own, whatever makes it unlike them, even when it was so before the first step
(tests/test_decode_staleness.py covers changes after it).

Each case changes only layer 1 of the tiny model, before any step, in one of
the ways a layer's trace can depend on besides its arrays: a plain attribute,
a key more, a submodule of another class, mlx-lm's LoRA on the last layers
only, another dtype; or shares a module with another layer. A step that reused
layer 0's trace for layer 1 decodes other tokens than the plain path.
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.tuner.utils import linear_to_lora_layers
from test_decode_staleness import LORA, generate, layer_norm_like, noise
from test_numerics import assert_close


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
    "a module shared by two layers": share_norm,
}


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
    if change != "a module shared by two layers":  # that one takes the plain path
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
