"""The compiled decode step is never stale (issue 22, section 1).

Whatever changes a model after its first compiled step, by any route MLX and
mlx-lm give (on the model or on a submodule at any depth), the next
generation must be the one the plain path gives, token for token. Every route
below changes the tokens the model generates (checked against the unchanged
model's), so a step that kept the old weights or the old structure fails.
"""

import concurrent.futures
import json

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_map
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.tuner.utils import linear_to_lora_layers, load_adapters
from test_numerics import assert_close

from bench.steps import graph_primitives
from mobilemoe_mlx.model.mobilemoe import DecoderLayer

COMPILED_MARK = "DynamicSliceUpdate"  # as in test_compiled_decode.py
PROMPT, NEW = 6, 8
# LoRA on the fused attention and shared-expert projections (mlx-lm's own
# LoRA layers), and on the routed experts (the model's LoRAExpertLinear).
LORA_KEYS = ["self_attn.qkv_proj", "self_attn.o_proj",
             "feed_forward.shared_expert.gate_up_proj", "feed_forward.shared_expert.down_proj"]
LORA = {"rank": 4, "scale": 4.0, "dropout": 0.0, "keys": LORA_KEYS}
EXPERT_LORA = dict(LORA, keys=["feed_forward.experts.gate_up_proj",
                               "feed_forward.experts.down_proj"])


def generate(model, tokens: np.ndarray, compiled: bool, steps: int = NEW, forced=None):
    """Greedy tokens [B, steps] after a PROMPT-token prefill, whether each
    one-token step ran compiled, and the steps' logits [B, steps - 1, V].
    `forced`: feed these tokens instead of the model's own (so two runs'
    logits compare step by step)."""
    model.args.compiled_decode = compiled
    try:
        cache = make_prompt_cache(model)
        y = mx.argmax(model(mx.array(tokens[:, :PROMPT]), cache=cache)[:, -1], axis=-1)
        out, marks, logits = [y], [], []
        for i in range(steps - 1):
            feed = y if forced is None else mx.array(forced[:, i])
            step = model(feed[:, None], cache=cache)
            marks.append(COMPILED_MARK in graph_primitives(step))
            logits.append(np.array(step[:, -1].astype(mx.float32)).astype(np.float64))
            y = mx.argmax(step[:, -1], axis=-1)
            out.append(y)
        return np.array(mx.stack(out, axis=1)), marks, np.stack(logits, axis=1)
    finally:
        model.args.compiled_decode = True


def noise(shape, scale=1.0):
    return scale * mx.random.normal(shape)


def convert_to_lora(model, tmp_path, config=LORA):
    linear_to_lora_layers(model, model.args.num_hidden_layers, config)
    # B set on each LoRA module itself (not through the model's own methods)
    for layer in model.layers:
        for _, m in layer.named_modules():
            if "lora_b" in m:
                m.lora_b = noise(m.lora_b.shape, 0.5)


def saved_adapters(model, tmp_path):
    """An adapter directory as mlx_lm.lora writes it, with non-zero A and B
    shaped for this model's (quantized, fused) projections."""
    config = {"fine_tune_type": "lora", "num_layers": model.args.num_hidden_layers,
              "lora_parameters": LORA}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    weights = {}
    for i, layer in enumerate(model.layers):
        modules = dict(layer.named_modules())
        for key in LORA_KEYS:
            m = modules[key]
            fan_in, fan_out = m.weight.shape[1] * 32 // m.bits, m.weight.shape[0]
            weights[f"model.layers.{i}.{key}.lora_a"] = noise((fan_in, LORA["rank"]), 0.1)
            weights[f"model.layers.{i}.{key}.lora_b"] = noise((LORA["rank"], fan_out), 0.5)
    mx.save_safetensors(str(tmp_path / "adapters.safetensors"), weights)
    return tmp_path


def optimizer_step(model):
    """One SGD step (mlx.optimizers) with made-up gradients of every
    trainable parameter, as a training loop applies them."""
    grads = tree_map(lambda p: mx.random.normal(p.shape).astype(p.dtype),
                     model.trainable_parameters())
    optim.SGD(learning_rate=0.5).update(model, grads)


def freeze_then_step(model):
    """Freeze all but one layer's norms, then train: only those change."""
    model.freeze()
    model.layers[1].input_layernorm.unfreeze()
    model.layers[1].post_attention_layernorm.unfreeze()
    optimizer_step(model)
    model.unfreeze()


def signs(a):
    return -a if a.dtype == mx.float32 and a.ndim == 1 else a


def layer_norm_like(norm: nn.RMSNorm) -> nn.Module:
    """A module of another class with the very arrays of `norm` (same names,
    shapes and dtypes): only the module's identity says the step changed."""
    ln = nn.LayerNorm(norm.weight.shape[0], bias=False)
    ln.weight = norm.weight
    return ln


def ablate_experts(model):
    """The expert-ablation study's change: in-place item assignment."""
    for layer in model.layers:
        layer.feed_forward.expert_bias[mx.arange(0, model.args.num_local_experts, 2)] = -1e4


def quantize_shared_experts(target):
    # (the router has no to_quantized: it stays float32 whatever quantizes the model)
    nn.quantize(target, group_size=32, bits=2,
                class_predicate=lambda p, m: "shared_expert" in p and isinstance(m, nn.Linear))


ROUTES = {
    "update on the model": lambda m, t: m.update(
        {"model": {"norm": {"weight": noise(m.model.norm.weight.shape)}}}),
    "update on a submodule": lambda m, t: m.layers[1].feed_forward.update(
        {"router": {"weight": noise(m.layers[1].feed_forward.router.weight.shape)}}),
    "update_modules on the model": lambda m, t: m.update_modules(
        {"model": {"layers": [{}, {"feed_forward": {"router": nn.Linear(64, 8, bias=False)}}]}}),
    "update_modules on a submodule": lambda m, t: m.layers[0].self_attn.update_modules(
        {"o_proj": nn.Linear(64, 64, bias=False)}),
    "load_weights on the model": lambda m, t: m.load_weights(
        [("model.layers.0.input_layernorm.weight", noise((64,)))], strict=False),
    "load_weights on a submodule": lambda m, t: m.layers[0].input_layernorm.load_weights(
        [("weight", noise((64,)))]),
    "apply on the model": lambda m, t: m.apply(signs),
    "apply on a submodule": lambda m, t: m.layers[0].apply(signs),
    "set_dtype on the model": lambda m, t: m.set_dtype(mx.bfloat16),
    "set_dtype on a submodule": lambda m, t: m.layers[0].self_attn.set_dtype(mx.bfloat16),
    "freeze, unfreeze and train": lambda m, t: freeze_then_step(m),
    "array attribute, deep": lambda m, t: setattr(
        m.layers[1].feed_forward, "expert_bias", noise((8,), 3.0)),
    "submodule attribute": lambda m, t: setattr(
        m.layers[0].feed_forward, "router", nn.Linear(64, 8, bias=False)),
    "submodule attribute, same arrays, other class": lambda m, t: setattr(
        m.model, "norm", layer_norm_like(m.model.norm)),
    "element of model.model.layers": lambda m, t: m.model.layers.__setitem__(
        1, DecoderLayer(m.args)),
    "item assignment into a parameter": lambda m, t: ablate_experts(m),
    "LoRA conversion (linear_to_lora_layers)": convert_to_lora,
    "LoRA conversion of the routed experts": lambda m, t: convert_to_lora(m, t, EXPERT_LORA),
    "load_adapters": lambda m, t: load_adapters(m, str(saved_adapters(m, t))),
    "optimizer step": lambda m, t: optimizer_step(m),
}


@pytest.fixture(scope="module")
def unchanged_tokens(qat_int4, tokens):
    return generate(qat_int4.model(), tokens, compiled=False)[0]


def check_route(model, tokens, unchanged, change, tmp_path, name, decoder=None):
    """`decoder`: a thread pool of one thread that runs every compiled
    generation (MLX keeps that thread's traces apart from this one's), while
    the change is made here; None: all on this thread."""
    def compiled(**kwargs):
        if decoder is None:
            return generate(model, tokens, compiled=True, **kwargs)
        return decoder.submit(generate, model, tokens, True, **kwargs).result()

    _, marks, _ = compiled(steps=3)
    assert all(marks), "the compiled step ran (and was traced) before the change"
    mx.random.seed(sum(map(ord, name)))
    change(model, tmp_path)
    plain, _, plain_logits = generate(model, tokens, compiled=False)
    assert not np.array_equal(plain, unchanged), "the change must show in the tokens"
    after, marks, _ = compiled()
    assert all(marks), "the steps after the change ran compiled"
    np.testing.assert_array_equal(after, plain)
    # and step by step on the same tokens, closer than any token could show
    _, _, logits = compiled(forced=plain)
    assert_close(logits, plain_logits, "compiled vs plain after the change", cos_min=0.999999,
                 rel_max=1e-5)


@pytest.mark.parametrize("route", ROUTES)
def test_a_change_after_a_compiled_step_is_decoded(qat_int4, tokens, unchanged_tokens,
                                                   route, tmp_path):
    check_route(qat_int4.model(), tokens, unchanged_tokens, ROUTES[route], tmp_path, route)


@pytest.mark.parametrize("route", ROUTES)
def test_a_change_is_decoded_by_a_thread_that_traced_before_it(qat_int4, tokens,
                                                                unchanged_tokens, route,
                                                                tmp_path):
    """The model is changed on this thread while another thread holds its
    traces of the model before the change (as a service's workers do)."""
    with concurrent.futures.ThreadPoolExecutor(1) as decoder:
        check_route(qat_int4.model(), tokens, unchanged_tokens, ROUTES[route], tmp_path, route,
                    decoder)


# nn.quantize needs float layers: the float conversion of the same checkpoint.
QUANTIZE_ROUTES = {
    "nn.quantize on the model": lambda m, t: quantize_shared_experts(m),
    "nn.quantize on a submodule": lambda m, t: quantize_shared_experts(m.layers[1]),
}


@pytest.mark.parametrize("route", QUANTIZE_ROUTES)
def test_quantizing_after_a_compiled_step_is_decoded(qat_dense, tokens, route, tmp_path):
    unchanged = generate(qat_dense.model(), tokens, compiled=False)[0]
    check_route(qat_dense.model(), tokens, unchanged, QUANTIZE_ROUTES[route], tmp_path, route)


def test_arrays_keep_their_python_objects(qat_int4, tokens, unchanged_tokens):
    """A compiled step traces with placeholders in the model's slots and puts
    back the very objects: a parameter a user took before the first step is
    still the model's, so writing into it later changes what both paths run."""
    model = qat_int4.model()
    held = [layer.feed_forward.expert_bias for layer in model.layers]
    generate(model, tokens, compiled=True, steps=3)
    assert all(layer.feed_forward.expert_bias is b for layer, b in zip(model.layers, held))
    for bias in held:
        bias[mx.arange(0, model.args.num_local_experts, 2)] = -1e4
    plain, _, _ = generate(model, tokens, compiled=False)
    assert not np.array_equal(plain, unchanged_tokens)
    np.testing.assert_array_equal(generate(model, tokens, compiled=True)[0], plain)
