"""The GPU tier: `python -m pytest -m gpu` on a machine where MLX runs on a GPU
(Metal or CUDA); every test is skipped elsewhere, and neither the default tier
nor CI runs it.

It holds the GPU to the CPU in float32 (bench/parity.py) at the tiny shape and
at S's published shape, which is where the first GPU run went wrong while the
tiny one agreed (docs/parity.md), and runs a short benchmark of S, the dense
baseline and mlx-lm's glm4_moe peer on that backend.
"""

import json

import pytest

from bench.options import Settings
from bench.parity import compare, models_for, random_tokens
from bench.run import run_benchmark
from mobilemoe_mlx.model.runtime import current, gpu_available

# Whether MLX has a GPU, not whether it is the default device now: conftest.py
# pins the CPU for the other tiers and hands the GPU tier's tests the GPU.
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not gpu_available(), reason="MLX has no GPU backend here"),
]


def test_the_gpu_tier_runs_on_the_gpu():
    """The guard: with a GPU in MLX, this tier's tests must not run on the CPU
    (they once did: every test was skipped on an H200)."""
    assert current().on_gpu, f"the GPU tier ran on {current().device} though MLX has a GPU"


@pytest.mark.parametrize("name", ["tiny", "S"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_gpu_agrees_with_the_cpu(name, dtype):
    model, reference = models_for(name, dtype, seed=0)
    p = compare(model, reference, random_tokens(model.args.vocab_size, 64, seed=0),
                chunk=32, decode=8)
    assert not p.failures(), p.failures()
    if dtype == "float32":  # the criterion the first GPU run failed
        assert p.logits_cosine_min >= 0.9999 and p.argmax_agree == 1.0


def test_short_benchmark_on_this_backend(tmp_path):
    s = Settings(prompt_lengths=[256, 1024], decode_contexts=[256], gen_tokens=16, repeats=2,
                 warmup=1, routing_tokens=256, dtype=current().compute_dtype)
    results = run_benchmark(["S", "pro", "glm4-S"], s, tmp_path, progress=False, plots=False,
                            log=lambda m: None)
    assert results["machine"]["backend"] == current().backend
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [m["name"] for m in saved["models"]] == ["S", "pro", "glm4-S"]
    for m in saved["models"]:
        assert all(p["tokens_per_s"]["median"] > 0 for p in m["prefill"])
        assert all(d["tokens_per_s"]["median"] > 0 for d in m["decode"])
