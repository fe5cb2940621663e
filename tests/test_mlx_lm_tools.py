"""mlx-lm's model tools on a converted MobileMoE model, through the Python
functions behind their commands (the commands themselves run in the
end-to-end tier, tests/test_mlx_lm_tools_e2e.py): LoRA and QLoRA on the
routed experts, DoRA's one-line refusal there, fusing adapters (requantized or
dequantized), dequantizing, speculative decoding with a converted draft, a
quantized KV cache, batched generation and perplexity. docs/mlx-lm.md's table
names these tests."""

import ast
import json
import re
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import mlx_lm
import numpy as np
import pytest
import reference as ref
from mlx.utils import tree_flatten
from mlx_lm.convert import convert as mlx_lm_convert
from mlx_lm.tuner.trainer import default_loss
from mlx_lm.tuner.utils import linear_to_lora_layers
from mlx_lm.utils import load as mlx_lm_load
from tool_model import tool_dense, tool_int4  # noqa: F401  (pytest fixtures)

import mobilemoe_mlx

EXPERT_KEYS = ["feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"]
LORA = {"rank": 4, "scale": 10.0, "dropout": 0.0}
STEPS = 8
# Inputs and targets: 4 sequences of 16 tokens (128 token-expert pairs: the
# experts' sorted dispatch), and 1 of 4 for the unsorted one.
rng = np.random.default_rng(7)
BATCH = mx.array(rng.integers(3, 512, (4, 17)))
SHORT = mx.array(rng.integers(3, 512, (1, 4)))


def load(path, **kwargs):
    return mlx_lm_load(str(path), trust_remote_code=True, **kwargs)


def logits(model, tokens=BATCH) -> np.ndarray:
    out = model(tokens)
    mx.eval(out)
    return np.array(out).astype(np.float64)


def weights(path) -> dict:
    out = {}
    for f in sorted(path.glob("model*.safetensors")):
        out.update(mx.load(str(f)))
    return out


def assert_router_float32_unquantized(path):
    w = weights(path)
    routers = [k for k in w if ".router." in k or k.endswith("expert_bias")]
    assert routers and all(w[k].dtype == mx.float32 for k in routers)
    assert all(k.endswith(("router.weight", "expert_bias")) for k in routers), routers


def test_the_tool_models_take_mlx_lms_default_groups(tool_int4, tool_dense):  # noqa: F811
    # head_dim 64 for --kv-bits' groups of 64; every axis a quantizer groups
    # (the last: `in` of [out, in], `out` of the experts' [E, in, out]) by 64
    config = json.loads((tool_int4.path / "config.json").read_text())
    assert config["head_dim"] == 64 and config["quantization"]["group_size"] == 32
    dense = weights(tool_dense.path)
    assert not any(k.endswith(".scales") for k in dense)
    assert all(v.dtype == mx.float32 for v in dense.values())
    assert all(v.shape[-1] % 64 == 0 for k, v in dense.items() if v.ndim > 1 and "router" not in k)


@pytest.fixture(scope="module")
def adapted(tool_int4, tmp_path_factory):  # noqa: F811
    """QLoRA on the INT4 experts, trained a few steps and saved as mlx-lm's
    trainer saves adapters: (the adapted model, its adapter directory, the
    losses, the base model's logits)."""
    model, _ = load(tool_int4.path)
    base = logits(model)
    mx.random.seed(3)  # LoRA's initial lora_a
    model.freeze()
    linear_to_lora_layers(model, 2, {**LORA, "keys": EXPERT_KEYS})
    model.train()
    losses = train_steps(model, STEPS)
    model.eval()
    path = tmp_path_factory.mktemp("adapters")
    mx.save_safetensors(str(path / "adapters.safetensors"),
                        dict(tree_flatten(model.trainable_parameters())))
    config = {"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": {**LORA, "keys": EXPERT_KEYS}}
    (path / "adapter_config.json").write_text(json.dumps(config))
    return model, path, losses, base


def test_lora_on_the_routed_experts_trains(adapted):
    model, _, losses, _ = adapted
    names = [k for k, _ in tree_flatten(model.trainable_parameters())]
    # only the experts' low-rank matrices train; the INT4 experts stay frozen
    assert names and all(".experts." in k and k.endswith(("lora_a", "lora_b")) for k in names)
    assert losses[-1] < 0.6 * losses[0], losses


def test_lora_experts_sorted_and_unsorted_dispatch_agree(adapted):
    # SHORT alone (8 token-expert pairs) runs unsorted, 8 copies of it (64)
    # sorted: a token's logits do not depend on the dispatch its batch took.
    model, *_ = adapted
    alone = logits(model, SHORT)
    within = logits(model, mx.broadcast_to(SHORT, (8, 4)))[:1]
    np.testing.assert_allclose(alone, within, rtol=1e-4, atol=1e-4)


def test_adapted_decode_steps_equal_the_full_forward(adapted):
    # Generation's one-token steps (the compiled decode step) through the
    # expert adapters give the logits of one forward over the whole sequence.
    from mlx_lm.models.cache import make_prompt_cache

    model, *_ = adapted
    tokens = BATCH[:1, :12]
    cache = make_prompt_cache(model)
    steps = [model(tokens[:, :8], cache=cache)[:, -1:]]
    steps += [model(tokens[:, i:i + 1], cache=cache) for i in range(8, 11)]
    got = np.array(mx.concatenate(steps, axis=1)).astype(np.float64)
    np.testing.assert_allclose(got, logits(model, tokens)[:, 7:11], rtol=1e-4, atol=1e-4)


def test_mlx_lm_default_lora_keys_include_the_experts(tool_int4):  # noqa: F811
    model, _ = load(tool_int4.path)
    model.freeze()
    linear_to_lora_layers(model, 1, dict(LORA))  # no keys: every layer mlx-lm can adapt
    experts = model.layers[1].feed_forward.experts
    assert type(experts.gate_up_proj).__name__ == "LoRAExpertLinear"
    assert type(experts.down_proj).__name__ == "LoRAExpertLinear"


def test_load_adapters_on_a_converted_model(adapted, tool_int4):  # noqa: F811
    model, path, _, _ = adapted
    again, _ = load(tool_int4.path, adapter_path=str(path))
    np.testing.assert_allclose(logits(again), logits(model), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def fused(adapted, tool_int4, tmp_path_factory):  # noqa: F811
    """mlx_lm.fuse's main on the adapters: {dequantize: the fused directory}."""
    from mlx_lm import fuse

    out = {}
    for dequantize in (False, True):
        out[dequantize] = tmp_path_factory.mktemp("fused") / "model"
        argv = ["--model", str(tool_int4.path), "--adapter-path", str(adapted[1]),
                "--save-path", str(out[dequantize]), "--trust-remote-code"]
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(sys, "argv", ["mlx_lm.fuse", *argv, *(["--dequantize"] * dequantize)])
            fuse.main()
    return out


EXPERTS = [f"model.layers.{i}.feed_forward.experts.{p}" for i in range(2)
           for p in ("gate_up_proj", "down_proj")]


@pytest.mark.parametrize("dequantize", [False, True])
def test_fused_model_loads_through_both_loaders(fused, dequantize):
    fused_model, _ = load(fused[dequantize])
    ours, _ = mobilemoe_mlx.load(str(fused[dequantize]))
    np.testing.assert_array_equal(logits(ours), logits(fused_model))
    assert_router_float32_unquantized(fused[dequantize])


def test_fuse_dequantize_equals_the_adapted_model(adapted, fused):
    model, _, _, base = adapted
    out = fused[True]
    w = weights(out)
    assert not any(k.endswith(".scales") for k in w)
    assert "quantization" not in json.loads((out / "config.json").read_text())
    assert w[EXPERTS[0] + ".weight"].shape == (8, 128, 128)
    got, want = logits(load(out)[0]), logits(model)
    assert ref.rel_err(got, want) < 1e-5 < ref.rel_err(base, want)


def test_fuse_requantizes_the_merged_experts_with_their_own_settings(adapted, fused,
                                                                     tool_int4):  # noqa: F811
    # The fused INT4 experts are the merged weights (the dequantized fuse's)
    # quantized as the base was (groups of 32 along `out`, 4 bits); everything
    # the adapters did not touch is the base's, bit for bit.
    model, _, _, base = adapted
    quantized, merged = weights(fused[False]), weights(fused[True])
    assert json.loads((fused[False] / "config.json").read_text())["quantization"]["group_size"] == 32
    base_experts = weights(tool_int4.path)
    for name in EXPERTS:
        assert not mx.array_equal(quantized[name + ".weight"], base_experts[name + ".weight"])
        want = mx.quantize(merged[name + ".weight"], 32, 4)
        for got, part in zip([quantized[name + s] for s in (".weight", ".scales", ".biases")], want):
            np.testing.assert_array_equal(np.array(got), np.array(part))
    # (compared as loaded: both directories load with q/k/v stacked; the fused one is saved so)
    source = dict(tree_flatten(load(tool_int4.path)[0].parameters()))
    saved = dict(tree_flatten(load(fused[False])[0].parameters()))
    assert set(saved) == set(source)
    for name in (k for k in source if ".experts." not in k):
        np.testing.assert_array_equal(np.array(saved[name]), np.array(source[name]), name)
    fused_logits = logits(load(fused[False])[0])
    err, effect = ref.rel_err(fused_logits, logits(model)), ref.rel_err(base, logits(model))
    print(f"\n[fuse] adapters moved logits {effect:.3f}; INT4-requantized fused vs adapted {err:.3f}")


def train_model(model):
    """The first lines of mlx_lm.lora's train_model for --fine-tune-type full
    (the model's refusal looks for a caller of that name)."""
    model.freeze()
    for layer in model.layers:
        layer.unfreeze()


def train_steps(model, steps: int):
    """`steps` Adam steps on BATCH with mlx-lm's default loss; the losses."""
    optimizer = optim.Adam(learning_rate=1e-2)
    step = nn.value_and_grad(model, lambda m: default_loss(m, BATCH, mx.array([[0, 16]] * 4))[0])
    losses = []
    for _ in range(steps):
        loss, grads = step(model)
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state)
        losses.append(loss.item())
    return losses


def full_fine_tune(model, steps: int = 4):
    train_model(model)
    return train_steps(model, steps)


@pytest.fixture(scope="module")
def dequantized(tool_int4, tmp_path_factory):  # noqa: F811
    """mlx_lm.convert -d on the INT4 model (--dtype float32: mlx-lm casts to
    the config's torch_dtype otherwise)."""
    out = tmp_path_factory.mktemp("dequantized") / "model"
    mlx_lm_convert(str(tool_int4.path), str(out), dequantize=True, dtype="float32",
                   trust_remote_code=True)
    return out


def test_full_fine_tune_of_a_dequantized_model_trains(dequantized):
    model, _ = load(dequantized)
    losses = full_fine_tune(model)
    assert losses[-1] < losses[0], losses
    assert model.layers[0].feed_forward.router.weight.dtype == mx.float32


def test_full_fine_tune_of_a_quantized_model_refuses_in_one_line(tool_int4):  # noqa: F811
    model, _ = load(tool_int4.path)
    with pytest.raises(SystemExit) as e:
        full_fine_tune(model)
    message = str(e.value.code)
    assert message.startswith("error: a full fine-tune") and "\n" not in message


def test_dora_on_the_experts_refuses_in_one_line(tool_int4):  # noqa: F811
    for keys in (EXPERT_KEYS, None):  # named, or mlx-lm's default (every adaptable layer)
        model, _ = load(tool_int4.path)
        model.freeze()
        config = {**LORA, **({"keys": keys} if keys else {})}
        with pytest.raises(SystemExit) as e:
            linear_to_lora_layers(model, 2, config, use_dora=True)
        message = str(e.value.code)
        assert message.startswith("error: DoRA") and "\n" not in message


def test_dora_on_the_other_linears_works(tool_int4):  # noqa: F811
    from mlx_lm.tuner.dora import DoRALinear

    model, _ = load(tool_int4.path)
    before = logits(model)
    model.freeze()
    linear_to_lora_layers(model, 2, {**LORA, "keys": ["self_attn.o_proj"]}, use_dora=True)
    assert isinstance(model.layers[0].self_attn.o_proj, DoRALinear)
    np.testing.assert_allclose(logits(model), before, rtol=1e-4, atol=1e-4)  # b = 0 at start


def test_mlx_lm_convert_dequantize_writes_a_model_equal_to_the_quantized(tool_int4,  # noqa: F811
                                                                         dequantized):
    out = dequantized
    w = weights(out)
    assert not any(k.endswith((".scales", ".biases")) for k in w)
    assert w["model.layers.0.feed_forward.experts.down_proj.weight"].shape == (8, 64, 128)
    assert_router_float32_unquantized(out)
    quantized, _ = load(tool_int4.path)
    dequantized, _ = load(out)
    ours, _ = mobilemoe_mlx.load(str(out))
    want = logits(quantized)
    assert ref.rel_err(logits(dequantized), want) < 1e-5
    assert ref.rel_err(logits(ours), want) < 1e-5


def test_dequantize_model_in_memory_keeps_the_expert_layout(tool_int4):  # noqa: F811
    from mlx_lm.utils import dequantize_model

    model, _ = load(tool_int4.path)
    want = logits(model, SHORT)
    dequantize_model(model)
    layer = model.layers[0].feed_forward.experts.gate_up_proj
    assert type(layer).__name__ == "ExpertLinear"
    assert ref.rel_err(logits(model, SHORT), want) < 1e-5


@pytest.fixture(scope="module")
def tool_loaded(tool_int4):  # noqa: F811
    return load(tool_int4.path)


@pytest.mark.parametrize("draft", ["itself", "tiny"])
def test_speculative_decoding_with_a_converted_draft(tool_loaded, qat_int4, tool_int4, draft):  # noqa: F811
    # What `python chat.py --draft` and stream_generate(draft_model=) run: the
    # tokens are the model's own greedy ones, whatever the draft proposes.
    model, tokenizer = tool_loaded
    draft_model, _ = load(tool_int4.path if draft == "itself" else qat_int4.path)
    prompt = tokenizer.encode("def fib(n):")
    plain = [r.token for r in mlx_lm.stream_generate(model, tokenizer, prompt, max_tokens=8)]
    spec = list(mlx_lm.stream_generate(model, tokenizer, prompt, max_tokens=8,
                                       draft_model=draft_model, num_draft_tokens=3))
    assert [r.token for r in spec] == plain
    if draft == "itself":
        assert any(r.from_draft for r in spec)


def test_quantized_kv_cache_on_the_tool_model(tool_loaded):
    # --kv-bits: head_dim 64 takes mlx-lm's default KV groups of 64.
    from mlx_lm.models.cache import KVCache, QuantizedKVCache

    model, _ = tool_loaded
    tokens = BATCH[:1, :12]
    outs = []
    for make in (KVCache, lambda: QuantizedKVCache(group_size=64, bits=8)):
        cache = [make() for _ in model.layers]
        first = model(tokens[:, :8], cache=cache)
        steps = [model(tokens[:, i:i + 1], cache=cache) for i in range(8, 12)]
        outs.append(np.array(mx.concatenate([first, *steps], axis=1)).astype(np.float64))
    assert ref.cosine(outs[1], outs[0]) > 0.999


def test_batch_generate_matches_one_prompt_at_a_time(tool_loaded):
    model, tokenizer = tool_loaded
    prompts = [tokenizer.encode("def fib(n):"), tokenizer.encode("hello there, how")]
    one_by_one = [[r.token for r in mlx_lm.stream_generate(model, tokenizer, p, max_tokens=5)]
                  for p in prompts]
    batched = mlx_lm.batch_generate(model, tokenizer, prompts, max_tokens=5)
    assert batched.texts == [tokenizer.decode(t) for t in one_by_one]


def test_perplexity_equals_the_models_own_cross_entropy(tool_loaded):
    from mlx_lm.perplexity import eval_ppl

    model, _ = tool_loaded
    data = BATCH[:, :16]
    ppl, _ = eval_ppl(model, data, batch_size=2)
    z = logits(model, data[:, :-1])
    z -= z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    targets = np.array(data[:, 1:])
    nll = -np.take_along_axis(logp, targets[..., None], -1).mean()
    assert ppl == pytest.approx(np.exp(nll), rel=1e-4)


TOOLS = {"generate", "chat", "server", "batch_generate", "cache_prompt", "perplexity",
         "benchmark", "lora: LoRA", "lora: DoRA", "lora: full", "fuse", "convert -q",
         "convert -d", "gptq", "dynamic_quant", "awq", "dwq", "--quant-predicate recipes",
         "--q-mode", "draft models"}

def test_the_docs_table_names_tests_that_exist():
    tests = Path(__file__).parent
    rows = [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in (tests.parent / "docs" / "mlx-lm.md").read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| Tool ")]
    assert {r[0] for r in rows} == TOOLS
    defined = {}
    for f in tests.glob("test_*.py"):
        defined[f.name] = {n.name for n in ast.walk(ast.parse(f.read_text()))
                           if isinstance(n, ast.FunctionDef)}
    for tool, _claim, command, named in rows:
        refs = re.findall(r"(test_\w+\.py)::(test_\w+)", named)
        assert refs, tool
        for file, name in refs:
            assert name in defined.get(file, ()), f"{tool}: {file}::{name} does not exist"
        # a converted directory loads only with trust_remote_code (or through our chat)
        for cmd in re.findall(r"`([^`]+)`", command):
            if cmd.startswith("mlx_lm.") and " --" in cmd:
                assert "--trust-remote-code" in cmd, cmd
