"""mlx-lm's quantizers on a converted MobileMoE directory: convert's recipes
and modes, gptq, dynamic_quant and dwq run their own code (their CLIs' main()
in-process, the calibration data loader swapped for a few random token rows:
no network). Each result keeps the router and expert bias float32 and
unquantized, loads through mlx-lm's loader and ours alike, generates, and its
logits stay near the float model's (a bound by bits). AWQ refuses in one line.

The test model is tests/tool_model.py's: every quantized width a multiple of
mlx-lm's default group size (64)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.convert import convert as mlx_lm_convert
from mlx_lm.quant import dwq, dynamic_quant, gptq
from mlx_lm.utils import load as mlx_lm_load
from tool_model import tool_config, tool_dense  # noqa: F401  (tool_dense: a pytest fixture)

import mobilemoe_mlx
from mobilemoe_mlx.checkpoints.convert import convert

CALIBRATION_ROWS, CALIBRATION_LENGTH = 8, 32
NEW_TOKENS = 3


@pytest.fixture(scope="module")
def tool_checkpoint(tool_dense) -> Path:  # noqa: F811
    """The tool model's checkpoint in the released bf16 layout (tests/tool_model.py)."""
    return tool_dense.source.path


@pytest.fixture(scope="module")
def float_dir(tool_dense) -> Path:  # noqa: F811
    """It converted unquantized to float32: what every quantizer here starts from."""
    return tool_dense.path


@pytest.fixture(scope="module")
def tool_tokens() -> mx.array:
    rng = np.random.default_rng(7)
    return mx.array(rng.integers(3, tool_config()["vocab_size"], (2, 16)))


@pytest.fixture(scope="module")
def float_logits(float_dir, tool_tokens) -> np.ndarray:
    model, _ = mobilemoe_mlx.load(str(float_dir), progress=False)
    return np.array(model(tool_tokens))


def calibration(*_args, **_kwargs) -> mx.array:
    """What mlx_lm.quant.utils.load_data returns (token rows), random, offline."""
    rng = np.random.default_rng(3)
    return mx.array(rng.integers(3, tool_config()["vocab_size"],
                                 (CALIBRATION_ROWS, CALIBRATION_LENGTH)))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def check_quantized(path: Path, tool_tokens: mx.array, float_logits: np.ndarray,
                    min_cosine: float) -> dict:
    """The common promise of every quantizer's output `path`; its weights."""
    weights = {}
    for f in path.glob("model*.safetensors"):
        weights.update(mx.load(str(f)))
    routers = [k for k in weights if ".router." in k]
    assert routers and all(k.endswith(".router.weight") for k in routers), routers
    biases = [k for k in weights if k.endswith(".expert_bias")]
    assert biases and all(weights[k].dtype == mx.float32 for k in routers + biases)
    quantization = json.loads((path / "config.json").read_text())["quantization"]
    assert not any("router" in k and v for k, v in quantization.items()), quantization
    # the experts were quantized (a tool that skipped them would keep them float)
    experts = "model.layers.0.feed_forward.experts."
    assert weights[experts + "gate_up_proj.weight"].dtype == mx.uint32
    assert weights[experts + "down_proj.weight"].dtype == mx.uint32

    theirs, tokenizer = mlx_lm_load(str(path), trust_remote_code=True)
    ours, _ = mobilemoe_mlx.load(str(path), progress=False)
    for model in (theirs, ours):
        router = model.layers[0].feed_forward.router
        assert type(router).__name__ == "Router" and router.weight.dtype == mx.float32
        got = np.array(model(tool_tokens))
        assert cosine(got, float_logits) >= min_cosine, cosine(got, float_logits)
    prompt = [int(t) for t in tool_tokens[0, :6]]
    generated = [[r.token for r in mlx_lm.stream_generate(m, tokenizer, prompt,
                                                          max_tokens=NEW_TOKENS)]
                 for m in (theirs, ours)]
    assert len(generated[0]) == NEW_TOKENS and generated[0] == generated[1]
    return weights


# The least cosine of a quantized model's logits to the float model's, by how
# few bits its layers get. Measured on this model (2026-12-06): mixed_2_6 0.69,
# mixed_3_x 0.86, mixed_4_6, affine 4-bit, gptq, dynamic_quant and dwq 0.97-0.98,
# mxfp4 and nvfp4 0.88, mxfp8 0.98: routing flips weigh on a random model.
@pytest.mark.parametrize("recipe,min_cosine", [("mixed_2_6", 0.6), ("mixed_3_4", 0.8),
                                               ("mixed_3_6", 0.8), ("mixed_4_6", 0.93)])
def test_convert_recipe(float_dir, tool_tokens, float_logits, tmp_path, recipe, min_cosine):
    out = tmp_path / recipe
    mlx_lm_convert(str(float_dir), str(out), quantize=True, quant_predicate=recipe,
                   trust_remote_code=True)
    weights = check_quantized(out, tool_tokens, float_logits, min_cosine)
    # the recipe's two widths both happened (6 or 4 bits on some down_proj layers)
    assert len({weights[k].shape[-1] for k in weights
                if k.endswith("down_proj.weight") and weights[k].dtype == mx.uint32}) > 1


@pytest.mark.parametrize("mode,group_size,min_cosine", [
    ("affine", 64, 0.93), ("mxfp4", 32, 0.8), ("nvfp4", 16, 0.8), ("mxfp8", 32, 0.95)])
def test_convert_mode(float_dir, tool_tokens, float_logits, tmp_path, mode, group_size, min_cosine):
    out = tmp_path / mode
    mlx_lm_convert(str(float_dir), str(out), quantize=True, q_mode=mode,
                   trust_remote_code=True)
    weights = check_quantized(out, tool_tokens, float_logits, min_cosine)
    scales = weights["model.layers.0.feed_forward.experts.down_proj.scales"]
    assert scales.shape[-1] == tool_config()["hidden_size"] // group_size
    assert scales.dtype == (mx.float32 if mode == "affine" else mx.uint8)


def run_main(module, monkeypatch, argv):
    monkeypatch.setattr(sys, "argv", [module.__name__, *argv])
    module.main()


def test_gptq(float_dir, tool_tokens, float_logits, tmp_path, monkeypatch):
    monkeypatch.setattr(gptq, "load_data", calibration)
    out = tmp_path / "gptq"
    run_main(gptq, monkeypatch, ["--model", str(float_dir), "--mlx-path", str(out),
                                 "--trust-remote-code"])
    weights = check_quantized(out, tool_tokens, float_logits, 0.93)
    # GPTQ's 4 bits on the linears, the 6-bit fallback on the experts
    config = tool_config()
    attention_width = config["num_attention_heads"] * config["head_dim"]
    assert weights["model.layers.0.self_attn.o_proj.weight"].shape[-1] == attention_width * 4 // 32
    assert weights["model.layers.0.feed_forward.experts.down_proj.weight"].shape[-1] == \
        config["hidden_size"] * 6 // 32


def test_dynamic_quant(float_dir, tool_tokens, float_logits, tmp_path, monkeypatch):
    monkeypatch.setattr(dynamic_quant, "load_data", calibration)
    monkeypatch.chdir(tmp_path)  # it writes its sensitivities file here
    out = tmp_path / "dynamic"
    run_main(dynamic_quant, monkeypatch, ["--model", str(float_dir), "--mlx-path", str(out),
                                          "--target-bpw", "4.8", "--trust-remote-code"])
    weights = check_quantized(out, tool_tokens, float_logits, 0.93)
    # --low-bits 4 and --high-bits 5 (group size 64) both happened, by sensitivity
    bits = {weights[k].shape[-1] * 32 // (weights[k[:-len("weight")] + "scales"].shape[-1] * 64)
            for k in weights if k.endswith(".weight") and weights[k].dtype == mx.uint32}
    assert bits == {4, 5}, bits


def dwq_data(*_args, **_kwargs):
    """What mlx_lm.quant.dwq.load_data returns: (tokens, offset) rows."""
    rows = [list(map(int, r)) for r in np.array(calibration())]
    return [(r, 0) for r in rows[:6]], [(r, 0) for r in rows[6:]]


def test_dwq(float_dir, tool_tokens, float_logits, tmp_path, monkeypatch):
    monkeypatch.setattr(dwq, "load_data", dwq_data)
    out = tmp_path / "dwq"
    run_main(dwq, monkeypatch, ["--model", str(float_dir), "--mlx-path", str(out),
                                "--batch-size", "2", "--max-seq-length", "33",
                                "--learning-rate", "1e-4", "--trust-remote-code"])
    weights = check_quantized(out, tool_tokens, float_logits, 0.93)
    # It trained the experts' scales: they moved off plain rounding's.
    name = "model.layers.0.feed_forward.experts.down_proj"
    dense = mx.load(str(float_dir / "model.safetensors"))[name + ".weight"]
    _, rounded, _ = mx.quantize(dense, 64, 4)
    trained = weights[name + ".scales"]
    assert not mx.array_equal(trained, rounded.astype(trained.dtype))


def test_dwq_trains_the_experts_scales_and_biases(float_dir):
    """The gradients DWQ takes through our quantized experts (their own VJP:
    MLX's gather_qmm has none for groups along `out`) are those of the
    dequantized weights through MLX's gather_mm."""
    model, _ = mlx_lm_load(str(float_dir), trust_remote_code=True)
    experts = model.layers[0].feed_forward.experts.down_proj.to_quantized(64, 4)
    x = mx.random.normal((2, 3, 2, 1, tool_config()["intermediate_size"]), key=mx.random.key(1))
    idx = mx.random.randint(0, 8, (2, 3, 2), key=mx.random.key(2)).astype(mx.uint32)
    experts.train()
    experts.unfreeze(keys=["scales", "biases"], recurse=False)  # as mlx_lm.dwq does

    def through_layer(scales, biases, x):
        experts.scales, experts.biases = scales, biases
        return (experts(x, idx) ** 2).sum()

    def through_dense(scales, biases, x):
        w = mx.dequantize(experts.weight, scales, biases, 64, 4)
        return (mx.gather_mm(x, w, rhs_indices=idx) ** 2).sum()

    args = (experts.scales, experts.biases, x)
    got = mx.grad(through_layer, argnums=(0, 1, 2))(*args)
    want = mx.grad(through_dense, argnums=(0, 1, 2))(*args)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        np.testing.assert_allclose(np.array(g), np.array(w), rtol=1e-4, atol=1e-4)


def test_awq_refuses_in_one_line(float_dir, tmp_path, monkeypatch, capsys):
    from mlx_lm.quant import awq

    monkeypatch.setattr(awq, "load_data", calibration)
    with pytest.raises(SystemExit) as refused:
        run_main(awq, monkeypatch, ["--model", str(float_dir), "--mlx-path",
                                    str(tmp_path / "awq"), "--trust-remote-code"])
    message = str(refused.value.code)
    assert message.startswith("error: mlx_lm.awq ") and "\n" not in message
    assert not (tmp_path / "awq").exists()


@pytest.mark.parametrize("tool", [gptq, dynamic_quant], ids=["gptq", "dynamic_quant"])
def test_float_quantizers_refuse_a_quantized_directory(synthetic_tiny, tmp_path, monkeypatch,
                                                        tool):
    # gptq would write it back unchanged, dynamic_quant fail with a traceback
    monkeypatch.setattr(tool, "load_data", calibration)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as refused:
        run_main(tool, monkeypatch, ["--model", str(synthetic_tiny), "--mlx-path",
                                     str(tmp_path / "out"), "--trust-remote-code"])
    message = str(refused.value.code)
    assert message.startswith(f"error: {tool.__name__.replace('.quant', '')} ")
    assert "--no-quantize" in message and "\n" not in message
    assert not (tmp_path / "out").exists()


def test_mlx_lm_runs_a_float16_directory_in_float32_on_the_cpu(tool_checkpoint, tool_tokens):
    """The model file's sanitize casts as load() does where MLX runs on the CPU
    (these tests' backend): float16 there runs tens of times slower."""
    half = Path(convert(str(tool_checkpoint), str(tool_checkpoint.parent / "half"),
                        dtype="float16", progress=False))
    stored = mx.load(str(half / "model.safetensors"))
    assert stored["model.layers.0.self_attn.o_proj.scales"].dtype == mx.float16
    theirs, _ = mlx_lm_load(str(half), trust_remote_code=True)
    floats = {k: v.dtype for k, v in tree_flatten(theirs.parameters())
              if mx.issubdtype(v.dtype, mx.floating)}
    assert set(floats.values()) == {mx.float32}, floats
    ours, _ = mobilemoe_mlx.load(str(half), progress=False)
    np.testing.assert_array_equal(np.array(theirs(tool_tokens)), np.array(ours(tool_tokens)))


@pytest.mark.e2e
def test_awq_console_command_prints_one_line(float_dir, tmp_path):
    exe = Path(sys.executable).parent / "mlx_lm.awq"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "mlx_lm.quant.awq"]
    result = subprocess.run(
        cmd + ["--model", str(float_dir), "--mlx-path", str(tmp_path / "awq"),
               "--trust-remote-code"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path)},  # no calibration download
    )
    assert result.returncode == 1
    assert result.stderr.startswith("error: mlx_lm.awq ") and result.stderr.count("\n") == 1
    assert not (tmp_path / "awq").exists()
