"""Float checkpoints may keep their small vectors (the router, the expert bias,
the norms) in float32, or in any other float dtype (issue 29): nobody has seen
the bf16 releases' dtypes, and DeepSeek-V3's bf16 release keeps its routing
bias in float32. They convert, and the model computes with their exact values,
checked against the independent float64 reference (tests/reference.py).

The defence against damaged headers stays where it was: byte sizes and offsets
(a dtype relabelled to one of another size), shapes, non-float dtypes, and one
dtype for the large tensors (BF16 and F16 have one size, so only that can tell
a relabelled linear)."""

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from checkpoints import _bf16, _f64, write_bf16, write_qat
from test_convert_cli import assert_clean_failure, run_convert, variant
from test_hardening import read_header, write_header
from test_numerics import assert_close, logits_of

from mobilemoe_mlx.checkpoints.loading import load_converted

ALL_F32 = {"router": "F32", "bias": "F32", "norm": "F32"}
CASES = {
    "float32": ALL_F32,
    "float16": {"router": "F16", "bias": "F16", "norm": "F16"},
    "each its own": {"router": "BF16", "bias": "F16", "norm": "F32"},
}
SMALL_SUFFIXES = ("layernorm.weight", "model.norm.weight", "router.weight", "expert_bias")


def _converted_weights(out: Path) -> dict:
    weights = {}
    for f in out.glob("model*.safetensors"):
        weights.update(mx.load(str(f)))
    return weights


def _convert(ckpt, out: Path, *args) -> Path:
    result = run_convert(ckpt.path, "--out", out, *args)
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("small-vectors")
    return {case: write_bf16(root / case.replace(" ", "-"), seed=7, small_dtypes=dtypes)
            for case, dtypes in CASES.items()}


@pytest.mark.parametrize("case", list(CASES))
def test_a_bf16_checkpoint_with_small_vectors_of_its_own_matches_the_reference(
        ckpts, tmp_path, tokens, reference_logits, case):
    ckpt = ckpts[case]
    header = read_header(ckpt.path / "model.safetensors")[0]
    stored = {m["dtype"] for n, m in header.items() if n.endswith(SMALL_SUFFIXES)}
    assert stored == set(CASES[case].values())  # what is under test
    out = _convert(ckpt, tmp_path / "mlx", "--no-quantize", "--dtype", "float32")
    model, _ = load_converted(out)
    assert_close(logits_of(model, tokens), reference_logits(ckpt, tokens), f"small {case}")
    # Every small vector holds exactly the stored value.
    weights = _converted_weights(out)
    for name, value in ckpt.weights.items():
        if name.endswith(SMALL_SUFFIXES):
            np.testing.assert_array_equal(np.array(weights[name]).astype(np.float64), value, name)


def test_the_router_and_bias_stay_exact_in_a_bfloat16_model(ckpts, tmp_path):
    """Converted with the defaults (bfloat16, INT4): the router and expert bias are
    float32 in every model, with the stored values; a norm follows the model's
    dtype, as every other weight the activations meet does (docs/conversion.md)."""
    ckpt = ckpts["float32"]
    weights = _converted_weights(_convert(ckpt, tmp_path / "mlx"))
    for name, value in ckpt.weights.items():
        if name.endswith(("router.weight", "expert_bias")):
            assert weights[name].dtype == mx.float32, name
            np.testing.assert_array_equal(np.array(weights[name]).astype(np.float64), value)
        elif name.endswith(("layernorm.weight", "model.norm.weight")):
            assert weights[name].dtype == mx.bfloat16, name
            got = np.array(weights[name].astype(mx.float32)).astype(np.float64)
            np.testing.assert_array_equal(got, _f64(_bf16(value)), name)


def test_a_qat_checkpoint_with_float32_norms_and_bias_matches_the_reference(
        tmp_path, tokens, reference_logits):
    ckpt = write_qat(tmp_path / "qat", seed=7, small_dtypes=ALL_F32)
    model, _ = load_converted(_convert(ckpt, tmp_path / "mlx", "--dtype", "float32"))
    assert_close(logits_of(model, tokens), reference_logits(ckpt, tokens), "qat small float32")


# -- what is still refused --------------------------------------------------------

LINEAR = "model.layers.0.self_attn.q_proj.weight"
NORM = "model.layers.1.input_layernorm.weight"
BIAS = "model.layers.0.feed_forward.expert_bias"


def _relabelled(ckpt, dst: Path, name: str, dtype: str) -> Path:
    """A copy of the checkpoint whose header says `dtype` for `name`, bytes unchanged."""
    dst.mkdir()
    for f in ckpt.path.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    header, data = read_header(dst / "model.safetensors")
    header[name]["dtype"] = dtype
    write_header(dst / "model.safetensors", header, data)
    return dst


def test_a_large_tensor_in_another_dtype_is_refused(ckpts, tmp_path):
    # BF16 relabelled F16: the same bytes, other numbers. Only the dtype tells.
    src = _relabelled(ckpts["float32"], tmp_path / "src", LINEAR, "F16")
    out = tmp_path / "out"
    assert_clean_failure(run_convert(src, "--out", out), out,
                         "large floating tensors mix dtypes", LINEAR, "F16")


@pytest.mark.parametrize("name,stored,label", [
    (NORM, "F32", "F16"), (NORM, "F32", "BF16"), (BIAS, "F32", "F16"), (NORM, "F16", "F32")])
def test_a_small_vector_relabelled_to_another_size_is_refused(ckpts, tmp_path, name, stored,
                                                               label):
    case = next(c for c, d in CASES.items() if all(v == stored for v in d.values()))
    src = _relabelled(ckpts[case], tmp_path / "src", name, label)
    out = tmp_path / "out"
    assert_clean_failure(run_convert(src, "--out", out), out, name, "byte size")


@pytest.mark.parametrize("value,fragments", [
    (mx.zeros((9,), dtype=mx.float32), [BIAS, "shape [9]", "expected [8]"]),
    (mx.zeros((8,), dtype=mx.int32), [BIAS, "dtype I32", "BF16 or F16 or F32"]),
    (mx.zeros((8,), dtype=mx.uint8), [BIAS, "dtype U8"]),
])
def test_a_small_vector_of_the_wrong_shape_or_kind_is_refused(ckpts, tmp_path, value, fragments):
    src = variant(ckpts["float32"].path, tmp_path / "src", tensor_changes={BIAS: value})
    out = tmp_path / "out"
    assert_clean_failure(run_convert(src, "--out", out), out, *fragments)
