"""The benchmark harness: analytic counts, measurements, results.json, report, CLI errors."""

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

from bench import harness, schema
from bench.harness import Settings
from bench.models import build_synthetic, model_class, model_config, weight_bytes
from bench.report import build_comparison, load_results, write_report
from bench.run import run_benchmark
from bench.tokens import prompt_tokens
from mobilemoe_mlx import analytic
from mobilemoe_mlx.planner import fits_warning, plan

ROOT = Path(__file__).resolve().parents[1]


def quick_settings(**kw):
    s = dict(prompt_lengths=[16, 32], decode_contexts=[16, 40], gen_tokens=3, repeats=2,
             warmup=1, routing_tokens=32, dtype="float32", bandwidth_gbps=100.0)
    s.update(kw)
    return Settings(**s)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    results = run_benchmark(["tiny", "pro-tiny"], quick_settings(), out, progress=False,
                            plots=False, log=lambda m: None)
    return out, results


def _lazy_model(name):
    config = model_config(name)
    Model, ModelArgs = model_class(config)
    return Model(ModelArgs.from_dict(config)), config  # parameters never evaluated


@pytest.mark.parametrize("name", ["tiny", "S", "pro", "pro-tiny"])
def test_param_counts_equal_instantiated_models(name):
    model, config = _lazy_model(name)
    counted = sum(v.size for _, v in tree_flatten(model.parameters()))
    assert analytic.param_counts(config)["total"] == counted


def test_published_param_counts():
    s = analytic.param_counts(model_config("S"))
    assert round(s["active"] / 1e6) == 272 and round(s["total"] / 1e9, 3) == 1.263
    assert round(analytic.param_counts(model_config("pro"))["total"] / 1e9, 2) == 1.08


@pytest.mark.parametrize("name", ["S", "pro"])
def test_weight_bytes_equal_quantized_model(name):
    model, config = _lazy_model(name)
    nn.quantize(model, group_size=32, bits=4,
                class_predicate=lambda p, m: hasattr(m, "to_quantized") and not p.endswith("router"))
    quant = analytic.Quant(bits=4, group_size=32, scale_dtype="float32", dtype="float32")
    assert analytic.weight_bytes(config, quant)["total"] == weight_bytes(model)


@pytest.mark.parametrize("name", ["tiny", "pro-tiny"])
def test_weight_bytes_of_synthetic_build(name):
    built = build_synthetic(name, dtype="float32")
    quant = harness.quant_of(built, quick_settings())
    assert analytic.weight_bytes(built.config, quant)["total"] == weight_bytes(built.model)
    router = [v for k, v in tree_flatten(built.model.parameters()) if k.endswith("router.weight")]
    assert all(r.dtype == mx.float32 for r in router)


def test_kv_and_flops():
    pro, s = model_config("pro"), model_config("S")
    # Pro: 23 local layers capped at 512 tokens, 7 global layers at the full context.
    per = 2 * 4 * 64 * 2
    assert analytic.kv_cache_bytes(pro, 8192) == (23 * 512 + 7 * 8192) * per
    assert analytic.kv_cache_bytes(s, 100) == 20 * 100 * per
    assert analytic.prefill_flops(s, 1) == analytic.decode_flops_per_token(s, 0)
    assert analytic.decode_flops_per_token(s, 4096) > analytic.decode_flops_per_token(s, 256)
    assert analytic.decode_bound(s, 256, 100.0) > analytic.decode_bound(pro, 256, 100.0)


def test_dense_windowed_cache_matches_full_forward():
    built = build_synthetic("pro-tiny", dtype="float32")
    model = built.model
    tokens = prompt_tokens("random", 40, 512)
    full = model(tokens[None])[:, -1]
    cache = model.make_cache()
    for i in range(0, 40, 8):
        out = model(tokens[None, i:i + 8], cache=cache)
    assert mx.allclose(out[:, -1], full, atol=1e-4).item()
    local = [c for c, layer in zip(cache, model.layers) if layer.is_local]
    assert all(c.keys.shape[2] <= 16 + 7 for c in local)  # window 16 (+ chunk - 1)


def test_prefill_fills_cache_to_the_requested_context():
    built = build_synthetic("tiny", dtype="float32")
    cache = built.model.make_cache() if hasattr(built.model, "make_cache") else None
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(built.model)
    harness.prefill(built.model, prompt_tokens("real", 50, 512), cache, step=16)
    assert all(c.offset == 50 for c in cache)
    restored = harness.snapshot(cache)
    harness.decode(built.model, mx.array([1]), restored, 2)
    assert restored[0].offset == 52 and cache[0].offset == 50  # the snapshot is independent


def test_peak_memory_resets_between_phases():
    big = mx.ones((16 << 20,))  # 64 MB
    mx.eval(big)
    del big
    harness.start_phase()
    mx.eval(mx.ones((1000,)) + 1)
    assert mx.get_peak_memory() < 8 << 20


def test_results_schema_and_measurements(quick_run):
    out, results = quick_run
    saved = json.loads((out / "results.json").read_text())
    assert schema.check(saved) == []
    assert saved["interrupted"] is False and saved["machine"]["backend"] in ("CPU", "Metal")
    for m in saved["models"]:
        assert m["complete"]
        assert [e["prompt_tokens"] for e in m["prefill"]] == [16, 32]
        for e in m["decode"]:
            assert e["context_filled"] == e["context"]
            assert len(e["tokens_per_s"]["runs"]) == 2
            assert 0 < e["graph_build_s"]["median"] <= e["step_s"]["median"]
            assert e["peak_memory_bytes"] < 10 * m["memory"]["weights_bytes"] + (64 << 20)
            assert "fraction_of_bound" in e
    moe = saved["models"][0]
    r = moe["routing"]["prompts"]
    assert r["repeat"]["mean_distinct"] < r["real"]["mean_distinct"]
    assert r["repeat"]["mean_distinct"] == moe["config"]["num_experts_per_tok"]
    dense = saved["models"][1]
    # Local layers cap at their 16-token window: context 40 holds less than 40/16 more.
    assert dense["decode"][1]["kv_cache_bytes"] < 40 / 16 * dense["decode"][0]["kv_cache_bytes"]


def test_report_and_plots_from_saved_json(quick_run, tmp_path):
    out, _ = quick_run
    run_dir = tmp_path / "copy"
    run_dir.mkdir()
    (run_dir / "results.json").write_text((out / "results.json").read_text())
    pytest.importorskip("matplotlib")
    path = write_report(run_dir)
    text = path.read_text()
    for section in ("## Prefill", "## Decode", "## Memory", "## Expert routing", "CPU backend"):
        assert section in text or "Metal" in text
    assert "MobileMoE-tiny vs MobileLLM-Pro (tiny)" in text
    for png in ("prefill.png", "decode.png", "memory.png"):
        assert (run_dir / png).stat().st_size > 1000
    r = load_results(run_dir)
    assert "B / A" in build_comparison(r, r, "a", "b")


def test_interrupt_keeps_results(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(harness, "decode", boom)
    with pytest.raises(KeyboardInterrupt):
        run_benchmark(["tiny"], quick_settings(), tmp_path, progress=False, plots=False,
                      log=lambda m: None)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["interrupted"] and len(saved["models"][0]["prefill"]) == 2
    assert (tmp_path / "report.md").exists()


def test_planner():
    cfg = model_config("L")
    p = plan(cfg, 8192, kv_bits=8, budgets={"3": 3e9, "5": 5e9})
    assert p["weights_bytes"] == analytic.weight_bytes(cfg)["total"]
    assert p["kv_cache_bytes"] < analytic.kv_cache_bytes(cfg, 8192)
    assert not p["budgets"]["3"]["fits"] and p["budgets"]["5"]["fits"]
    assert fits_warning(cfg, 8192, budget_bytes=1e9) is not None
    assert fits_warning(model_config("S"), 8192, budget_bytes=64e9) is None


def _bench(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("args, message", [
    (["run", "--models", "XL"], "unknown model 'XL'"),
    (["run", "--models", "S", "--weights", "/nonexistent/dir"], "no such directory"),
    (["run", "--models", "S", "--weights", "{tmp}"], "not a converted model directory"),
    (["run", "--models", "S", "--prompt-lengths", "a,b"], "comma-separated integers"),
    (["plan", "--model", "XL"], "unknown model 'XL'"),
    (["report", "{tmp}"], "does not exist"),
])
def test_cli_errors_are_one_line(args, message, tmp_path):
    r = _bench(*[a.replace("{tmp}", str(tmp_path)) for a in args], "--out", str(tmp_path / "o")) \
        if args[0] == "run" else _bench(*[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0]


def test_cli_plan_and_report(quick_run):
    r = _bench("plan", "--model", "L", "--context", "8192", "--kv-bits", "8")
    assert r.returncode == 0 and "phone app, 3 GB" in r.stdout and "DOES NOT FIT" in r.stdout
    out, _ = quick_run
    r = _bench("report", str(out), "--no-plots", "--compare", str(out))
    assert r.returncode == 0 and (out / "compare.md").exists()
