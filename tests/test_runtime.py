"""One decision of which backend runs (mobilemoe_mlx/model/runtime.py), and everything
that depends on it following it: loading's cast, the cache's conversion dtype,
the benchmark's labels, notes and defaults, the planner's phone question.

MLX's own probes (mx.metal / mx.cuda .is_available and the default device) are
replaced to play a CUDA or Metal machine on this CPU; nothing of ours is mocked.
"""

import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from bench import report as bench_report
from bench.harness import machine_info
from mobilemoe_mlx.checkpoints import loading
from mobilemoe_mlx.checkpoints.synthetic import write_synthetic
from mobilemoe_mlx.model.runtime import CPU, CUDA, METAL, current

ROOT = Path(__file__).resolve().parents[1]


def play(monkeypatch, backend):
    """Make MLX report `backend` ("CUDA", "Metal" or "CPU") as the default device's."""
    gpu = backend != CPU
    monkeypatch.setattr(mx.metal, "is_available", lambda: backend == METAL)
    monkeypatch.setattr(mx.cuda, "is_available", lambda: backend == CUDA)
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.gpu if gpu else mx.cpu))
    monkeypatch.setattr(mx, "device_info", lambda: {"device_name": "NVIDIA H200"}
                        if backend == CUDA else {"device_name": "Apple M3"})


@pytest.mark.parametrize("backend,dtype,name", [
    (CPU, "float32", None), (CUDA, "float16", "NVIDIA H200"), (METAL, "float16", "Apple M3")])
def test_backend_dtype_and_name(monkeypatch, backend, dtype, name):
    play(monkeypatch, backend)
    rt = current()
    assert (rt.backend, rt.compute_dtype, rt.device_name) == (backend, dtype, name)
    assert rt.half_precision_fast == (backend != CPU)
    assert ("not Apple figures" in rt.timing_note()) == (backend != METAL)
    assert backend in rt.timing_note() or backend == METAL


def test_cpu_device_on_a_gpu_machine_is_cpu(monkeypatch):
    # A Mac with mx.set_default_device(mx.cpu) runs on the CPU: the device decides.
    play(monkeypatch, METAL)
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.cpu))
    assert current().backend == CPU and current().compute_dtype == "float32"


@pytest.mark.parametrize("before,after", [(None, "0"), ("1", "1")])
def test_importing_the_package_asks_for_real_float32_unless_the_user_chose(before, after):
    # In a fresh process: MLX reads the variable once, at its first matmul.
    env = {k: v for k, v in os.environ.items() if k != "MLX_ENABLE_TF32"}
    if before is not None:
        env["MLX_ENABLE_TF32"] = before
    r = subprocess.run([sys.executable, "-c", "import os, mobilemoe_mlx; "
                        "print(os.environ['MLX_ENABLE_TF32'])"], env=env, capture_output=True,
                       text=True, cwd=ROOT)
    assert r.stdout.strip() == after, r.stderr


@pytest.fixture(scope="module")
def float16_dir(tmp_path_factory):
    from mobilemoe_mlx import convert
    src = tmp_path_factory.mktemp("src") / "qat"
    write_synthetic(str(src), "tiny")
    out = tmp_path_factory.mktemp("conv") / "f16"
    convert(str(src), str(out), dtype="float16", progress=False)
    return out


@pytest.mark.parametrize("backend,kept", [(CPU, mx.float32), (CUDA, mx.float16),
                                          (METAL, mx.float16)])
def test_load_casts_to_float32_only_on_the_cpu(monkeypatch, float16_dir, backend, kept):
    play(monkeypatch, backend)
    model, _ = loading.load_converted(float16_dir, float32_on_cpu=True)
    assert model.model.norm.weight.dtype == kept


def test_machine_info_and_report_say_cuda(monkeypatch, tmp_path):
    play(monkeypatch, CUDA)
    m = machine_info()
    assert m["backend"] == CUDA and m["chip"] == "NVIDIA H200"
    assert m["default_device"] == "Device(gpu, 0)"
    results = {"machine": m, "settings": {
        "dtype": "float16", "bits": 4, "group_size": 32, "prompts": "real", "prefill_step": 256,
        "warmup": 1, "repeats": 1, "gen_tokens": 1}, "created": "now", "models": []}
    header = "\n".join(bench_report._header(results))
    assert "CUDA backend" in header and "CPU backend" not in header
    play(monkeypatch, CPU)
    results["machine"] = machine_info()
    assert "CPU backend" in "\n".join(bench_report._header(results))
