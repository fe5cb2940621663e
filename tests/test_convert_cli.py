"""convert.py on bad input: one clear line, exit code 2, nothing left at --out."""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from mobilemoe_mlx.synthetic import write_synthetic

REPO = Path(__file__).resolve().parents[1]


def run_convert(*args, env=None):
    return subprocess.run(
        [sys.executable, str(REPO / "convert.py"), *map(str, args)],
        capture_output=True, text=True, cwd=REPO, timeout=300,
        env={**os.environ, **(env or {})},
    )


def assert_clean_failure(result, out: Path, *fragments):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.*")), "a partial output was left behind"


@pytest.fixture(scope="module")
def good_qat(tmp_path_factory):
    return write_synthetic(str(tmp_path_factory.mktemp("ckpt") / "qat"), "tiny", "qat")


def variant(src: Path, dst: Path, config_changes=None, tensor_changes=None) -> Path:
    """A copy of `src` with config keys changed and tensors replaced or (None) removed."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name not in ("config.json", "model.safetensors"):
            (dst / f.name).write_bytes(f.read_bytes())
    config = json.loads((src / "config.json").read_text())
    config.update(config_changes or {})
    (dst / "config.json").write_text(json.dumps(config))
    tensors = mx.load(str(src / "model.safetensors"))
    for name, value in (tensor_changes or {}).items():
        if value is None:
            tensors.pop(name)
        else:
            tensors[name] = value
    mx.save_safetensors(str(dst / "model.safetensors"), tensors)
    return dst


def test_converts_and_refuses_to_overwrite_without_force(good_qat, tmp_path):
    out = tmp_path / "out"
    first = run_convert(good_qat, "--out", out, "--dtype", "float32")
    assert first.returncode == 0, first.stderr
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    again = run_convert(good_qat, "--out", out)
    assert again.returncode == 2
    assert "already exists" in again.stderr and "--force" in again.stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before

    forced = run_convert(good_qat, "--out", out, "--force", "--dtype", "float16")
    assert forced.returncode == 0, forced.stderr
    assert json.loads((out / "conversion.json").read_text())["dtype"] == "float16"
    assert not list(tmp_path.glob(".out.*"))


def test_unexpected_tensor_is_named(good_qat, tmp_path):
    src = variant(good_qat, tmp_path / "src",
                  tensor_changes={"model.layers.0.feed_forward.extra.weight": mx.zeros((4,))})
    out = tmp_path / "out"
    assert_clean_failure(run_convert(src, "--out", out), out,
                         "unexpected tensors", "model.layers.0.feed_forward.extra.weight")


def test_missing_tensor_is_named(good_qat, tmp_path):
    name = "model.layers.1.self_attn.k_proj.weight_scale"
    src = variant(good_qat, tmp_path / "src", tensor_changes={name: None})
    out = tmp_path / "out"
    assert_clean_failure(run_convert(src, "--out", out), out, "missing tensors", name)


def test_wrong_shape_names_expected_and_got(good_qat, tmp_path):
    name = "model.layers.0.feed_forward.router.weight"
    src = variant(good_qat, tmp_path / "src", tensor_changes={name: mx.zeros((8, 32))})
    out = tmp_path / "out"
    assert_clean_failure(run_convert(src, "--out", out), out, name, "[8, 32]", "[8, 64]")


def test_wrong_dtype_names_expected_and_got(good_qat, tmp_path):
    name = "model.layers.0.self_attn.q_proj.weight_scale"
    bad = mx.zeros((64, 2), dtype=mx.float32)
    src = variant(good_qat, tmp_path / "src", tensor_changes={name: bad})
    out = tmp_path / "out"
    assert_clean_failure(run_convert(src, "--out", out), out, name, "F32", "F16")


def test_truncated_file(good_qat, tmp_path):
    src = variant(good_qat, tmp_path / "src")
    weights = src / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 1000])
    out = tmp_path / "out"
    assert_clean_failure(run_convert(src, "--out", out), out, "truncated")


def test_corrupt_file(good_qat, tmp_path):
    src = variant(good_qat, tmp_path / "src")
    (src / "model.safetensors").write_bytes(b"\xff" * 64)
    out = tmp_path / "out"
    assert_clean_failure(run_convert(src, "--out", out), out, "not a valid safetensors")


@pytest.mark.parametrize("change, fragment", [
    ({"model_type": "llama"}, "not a MobileMoE checkpoint"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type 'yarn'"),
    ({"sliding_window": 512}, "windowed attention"),
    ({"interleave_moe_layer_step": 2}, "interleave_moe_layer_step"),
    ({"no_rope_layers": [1, 0]}, "without RoPE"),
    ({"layer_types": ["full_attention", "sliding_attention"]}, "full_attention"),
])
def test_unsupported_config(good_qat, tmp_path, change, fragment):
    src = variant(good_qat, tmp_path / "src", config_changes=change)
    out = tmp_path / "out"
    assert_clean_failure(run_convert(src, "--out", out), out, fragment)


def test_group_size_that_does_not_divide(good_qat, tmp_path):
    # The tiny preset's hidden size is 64, so groups of 128 cannot tile it.
    out = tmp_path / "out"
    assert_clean_failure(run_convert(good_qat, "--out", out, "--q-group-size", "128"),
                         out, "--q-group-size 128 does not divide")


def test_missing_source(tmp_path):
    out = tmp_path / "out"
    assert_clean_failure(run_convert(tmp_path / "nowhere", "--out", out), out,
                         "neither an existing path nor a Hub repo id")


def test_offline_hub_fetch(tmp_path):
    # This machine reaches no Hub, and HF_HUB_OFFLINE makes that certain elsewhere.
    out = tmp_path / "out"
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = run_convert("facebook/MobileMoE-S-QAT", "--out", out, env=env)
    assert_clean_failure(result, out, "cannot reach the Hugging Face Hub", "local checkpoint path")


def test_verbose_shows_the_traceback(good_qat, tmp_path):
    src = variant(good_qat, tmp_path / "src", config_changes={"model_type": "llama"})
    result = run_convert(src, "--out", tmp_path / "out", "--verbose")
    assert result.returncode == 2
    assert "Traceback" in result.stderr
