"""The benchmark harness: analytic counts, measurements, results.json, report, CLI errors.

The CLI runs in this process through click's test runner; measurements use the
tiny models and settings of a few tokens.
"""

import copy
import gc
import json
import math
import os
import re
import signal
import sys
import warnings
from pathlib import Path

import click
import mlx.core as mx
import mlx.nn as nn
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten

from bench import harness, schema
from bench.cli import main as bench_cli
from bench.estimate import run_seconds
from bench.models import build_synthetic, load_checkpoint, model_class, model_config, weight_bytes
from bench.options import Settings
from bench.report import build_comparison, build_report, load_results, write_report
from bench.run import run_benchmark, sigint_ignored
from bench.tokens import prompt_tokens
from mobilemoe_mlx.model import analytic
from mobilemoe_mlx.model.planner import fits_warning, format_plan, plan
from mobilemoe_mlx.model.runtime import current as current_runtime

ROOT = Path(__file__).resolve().parents[1]
ON_GPU = current_runtime().on_gpu  # Metal or CUDA: the default settings take minutes


def quick_settings(**kw):
    s = dict(prompt_lengths=[16, 32], decode_contexts=[16, 40], gen_tokens=3, repeats=2,
             warmup=1, routing_tokens=32, dtype="float32", bandwidth_gbps=100.0)
    s.update(kw)
    return Settings(**s)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    logs = []
    results = run_benchmark(["tiny", "pro-tiny"], quick_settings(), out, progress=False,
                            plots=False, log=logs.append)
    return out, results, logs


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
    assert analytic.weight_bytes(built.config, built.quant)["total"] == weight_bytes(built.model)
    router = [v for k, v in tree_flatten(built.model.parameters()) if k.endswith("router.weight")]
    assert all(r.dtype == mx.float32 for r in router)


def test_kv_and_flops():
    pro, s = model_config("pro"), model_config("S")
    # Pro: 23 local layers capped at 512 tokens, 7 global layers at the full context.
    per = 2 * 4 * 64 * 2
    assert analytic.kv_cache_bytes(pro, 8192) == (23 * 512 + 7 * 8192) * per
    assert analytic.kv_cache_bytes(s, 100) == 20 * 100 * per
    assert analytic.prefill_flops(s, 1) == analytic.decode_flops_per_token(s, 0)
    # The output head (tied embedding, V*D) runs once per prefill, for the last token:
    # each further prompt token adds the layers' matmuls and its attention only.
    head = 2 * s["vocab_size"] * s["hidden_size"]
    per_token = analytic.decode_flops_per_token(s, 0) - head
    extra = analytic.prefill_flops(s, 2) - analytic.prefill_flops(s, 1)
    attn_1 = analytic.decode_flops_per_token(s, 1) - analytic.decode_flops_per_token(s, 0)
    assert extra == per_token + attn_1
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
    from mlx_lm.models.cache import make_prompt_cache

    built = build_synthetic("tiny", dtype="float32")
    cache = make_prompt_cache(built.model)
    harness.prefill(built.model, prompt_tokens("real", 50, 512), cache, step=16)
    assert all(c.offset == 50 for c in cache)
    host = harness.offload(cache)
    restored = harness.restore(host)
    assert mx.array_equal(restored[0].keys, cache[0].keys).item()
    harness.decode(built.model, mx.array([1]), restored, 2)
    assert restored[0].offset == 52 and cache[0].offset == 50  # the copy is independent
    assert harness.restore(host)[0].offset == 50


def test_decode_peak_counts_one_kv_cache(tmp_path):
    # Context 1000 + 3 tokens stays inside mlx-lm's 1024-token buffer (no regrowth),
    # so the decode peak is weights + the one cache decoded + small temporaries;
    # a second copy of the cache alive during decode would add another kv.
    # Arrays other tests left alive count in MLX's peak too: collect them, count the rest.
    gc.collect()
    mx.clear_cache()
    before = mx.get_active_memory()
    s = quick_settings(prompt_lengths=[8], decode_contexts=[1000], repeats=1, warmup=0,
                       routing_tokens=0)
    r = run_benchmark(["tiny"], s, tmp_path, progress=False, plots=False, log=lambda m: None)
    m = r["models"][0]
    e = m["decode"][0]
    assert e["kv_cache_bytes"] == 2 * 2 * 2 * 16 * 1024 * 4  # layers, K+V, kv heads, head_dim
    extra = e["peak_memory_bytes"] - m["memory"]["weights_bytes"] - e["kv_cache_bytes"] - before
    assert 0 < extra < e["kv_cache_bytes"] / 2
    assert e["kv_cache_bytes_analytic"] == analytic.kv_cache_bytes(m["config"], 1000, "float32")


@pytest.fixture(scope="module")
def checkpoints(qat_ckpt, qat_int4, converted):
    """The session's tiny QAT checkpoint converted to float32 and to bfloat16 (conftest.py)."""
    return {"float32": qat_int4.path,
            "bfloat16": converted(qat_ckpt, "qat_int4_bfloat16", dtype="bfloat16").path}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_checkpoint_dtypes_read_from_weights(checkpoints, dtype):
    built = load_checkpoint(str(checkpoints[dtype]))
    assert built.dtype == dtype
    assert (built.quant.bits, built.quant.group_size, built.quant.scale_dtype) == (4, 32, dtype)
    assert analytic.weight_bytes(built.config, built.quant)["total"] == weight_bytes(built.model)


def test_checkpoint_run_records_its_dtype(checkpoints, tmp_path, capfd):
    logs = []
    s = quick_settings(prompt_lengths=[8], decode_contexts=[256], gen_tokens=2, repeats=1,
                       warmup=0, routing_tokens=0, dtype="float32")
    r = run_benchmark(["tiny"], s, tmp_path, weights=str(checkpoints["bfloat16"]),
                      progress=False, plots=False, log=logs.append)
    m = r["models"][0]
    assert m["dtype"] == "bfloat16" and m["quant"]["scale_dtype"] == "bfloat16"
    assert m["name"] == "tiny" and not m["synthetic"]
    assert m["analytic"]["weight_bytes"]["total"] == m["memory"]["weights_bytes"]
    e = m["decode"][0]  # 256 tokens fill mlx-lm's first 256-token buffer exactly
    assert e["kv_cache_bytes"] == e["kv_cache_bytes_analytic"] == m["analytic"]["kv_cache_bytes"]["256"]
    assert any("--dtype float32 ignored" in line and "INT4 g32" in line for line in logs)
    assert "longer than the specified maximum" not in capfd.readouterr().err


def test_peak_memory_resets_between_phases():
    big = mx.ones((16 << 20,))  # 64 MB
    mx.eval(big)
    del big
    harness.start_phase()
    mx.eval(mx.ones((1000,)) + 1)
    assert mx.get_peak_memory() < 8 << 20


def test_results_schema_and_measurements(quick_run):
    out, results, _ = quick_run
    saved = json.loads((out / "results.json").read_text())
    assert schema.check(saved) == []
    assert saved["interrupted"] is False and saved["machine"]["backend"] in ("CPU", "Metal")
    for m in saved["models"]:
        assert m["complete"]
        assert [e["prompt_tokens"] for e in m["prefill"]] == [16, 32]
        for e in m["decode"]:
            assert e["context_filled"] == e["context"]
            assert len(e["tokens_per_s"]["runs"]) == 2
            # A run's n step builds lie inside its n steps (their sum is at most n mean
            # steps) and at least ceil(n/2) of them are not below their median, so the
            # median is at most n / ceil(n/2) mean steps: exact, whatever the load. Not
            # <= one mean step: builds the scheduler preempts (a busy machine) can be.
            n = e["gen_tokens"]
            for build, step in zip(e["graph_build_s"]["runs"], e["step_s"]["runs"]):
                assert 0 < build <= n / math.ceil(n / 2) * step, (build, step)
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
    out, _, _ = quick_run
    run_dir = tmp_path / "copy"
    run_dir.mkdir()
    (run_dir / "results.json").write_text((out / "results.json").read_text())
    pytest.importorskip("matplotlib")
    path = write_report(run_dir)
    text = path.read_text()
    sections = {s.split("\n", 1)[0]: s for s in text.split("\n## ")[1:]}
    assert list(sections)[:5] == ["Models", "Prefill (time to first token)", "Decode", "Memory",
                                  "Expert routing: real against dummy prompts"]
    models = ("MobileMoE-tiny", "MobileLLM-Pro (tiny)")
    assert all(f"| {m} | float32, INT4 g32 |" in sections["Models"] for m in models)
    prefill, decode = sections["Prefill (time to first token)"], sections["Decode"]
    assert "MobileMoE-tiny vs MobileLLM-Pro (tiny)" in prefill
    assert [r.split(" |")[0] for r in prefill.splitlines() if r[:3] in ("| 1", "| 3")] == \
        ["| 16", "| 32"]
    assert [r.split(" |")[0] for r in decode.splitlines() if r[:3] in ("| 1", "| 4")] == \
        ["| 16", "| 40"]
    for m in models:  # a weights row and one row per prefill length and decode context
        rows = [r for r in sections["Memory"].splitlines() if r.startswith(f"| {m} |")]
        assert [r.split(" | ")[1] for r in rows] == ["weights"] + ["prefill"] * 2 + ["decode"] * 2
    routing = sections["Expert routing: real against dummy prompts"]
    assert [r.split(" | ")[1] for r in routing.splitlines() if r.startswith("| MobileMoE")] == \
        ["real", "random", "repeat", "real - repeat"]
    assert "MobileLLM-Pro" not in routing  # dense: no routing
    # The CPU warning stands before the tables exactly when the run was on the CPU.
    backend = json.loads((run_dir / "results.json").read_text())["machine"]["backend"]
    assert ("**CPU backend.**" in text.split("## Models")[0]) == (backend != "Metal")
    for png in ("prefill.png", "decode.png", "memory.png"):
        assert (run_dir / png).stat().st_size > 1000
    r = load_results(run_dir)
    assert "B / A" in build_comparison(r, r, "a", "b")


def _sigint_on(prefix, seen):
    """A log callback that sends this process a real Ctrl-C (SIGINT) on a message."""
    def log(message):
        seen.append(message)
        if message.startswith(prefix):
            os.kill(os.getpid(), signal.SIGINT)
    return log


def test_interrupt_keeps_results(tmp_path):
    seen = []
    with pytest.raises(KeyboardInterrupt):
        run_benchmark(["tiny", "pro-tiny"], quick_settings(), tmp_path, progress=False,
                      plots=False, log=_sigint_on("MobileLLM-Pro", seen))
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["interrupted"] and saved["models"][0]["complete"]
    assert len(saved["models"]) == 1 and "interrupted" in (tmp_path / "report.md").read_text()
    assert sum("interrupted" in m for m in seen) == 1


def test_ctrl_c_while_the_report_is_written_is_ignored(tmp_path):
    seen = []
    s = quick_settings(prompt_lengths=[8], decode_contexts=[8], repeats=1, warmup=0,
                       routing_tokens=0)
    run_benchmark(["tiny"], s, tmp_path, progress=False, plots=False,
                  log=_sigint_on("writing", seen))  # no KeyboardInterrupt
    assert any(m.startswith("writing") for m in seen)
    assert "## Decode" in (tmp_path / "report.md").read_text()
    with sigint_ignored():
        os.kill(os.getpid(), signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):  # the handler is back after the block
        os.kill(os.getpid(), signal.SIGINT)
        mx.eval(mx.ones((1,)))


def test_planner():
    cfg = model_config("L")
    p = plan(cfg, 8192, kv_bits=8, budgets={"3": 3e9, "5": 5e9})
    assert p["weights_bytes"] == analytic.weight_bytes(cfg)["total"]
    assert p["kv_cache_bytes"] < analytic.kv_cache_bytes(cfg, 8192)
    assert not p["budgets"]["3"]["fits"] and p["budgets"]["5"]["fits"]
    assert fits_warning(cfg, 8192, budget_bytes=1e9) is not None
    assert fits_warning(model_config("S"), 8192, budget_bytes=64e9) is None
    text = format_plan("tiny", plan(model_config("tiny"), 256, budgets={"3": 3e9}))
    assert "0.000 GB" not in text and "K params" in text and " KB" in text


def test_planner_bounds_a_measured_prefill():
    # The last 1023-token chunk of a 2048-token prefill attends over 2047 keys: its
    # attention scores (chunk x context per head) dominate the measured peak.
    from mlx_lm.models.cache import make_prompt_cache

    built = build_synthetic("tiny", dtype="float32")
    cache = make_prompt_cache(built.model)
    harness.start_phase()
    harness.prefill(built.model, prompt_tokens("real", 2048, 512), cache, step=1024)
    peak = mx.get_peak_memory()
    p = plan(built.config, 2048, dtype="float32", chunk=1024, budgets={})
    assert p["total_bytes"] >= peak > 0.5 * p["total_bytes"]


def _bench(*args):
    """`python -m bench ARGS` in this process: click's Result (exit_code, stdout, stderr)."""
    return CliRunner().invoke(bench_cli, [str(a) for a in args])


def _one_line_error(r, says: str) -> None:
    assert r.exit_code == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and says in lines[0], r.stderr


@pytest.mark.parametrize("args, message", [
    (["run", "--models", "XL"], "unknown model 'XL'"),
    (["run", "--models", "S", "--weights", "/nonexistent/dir"], "no such directory"),
    (["run", "--models", "S", "--weights", "{tmp}"], "not a converted model directory"),
    (["run", "--models", "S", "--prompt-lengths", "a,b"], "comma-separated integers"),
    (["plan", "--model", "XL"], "unknown model 'XL'"),
    (["report", "{tmp}"], "does not exist"),
    (["run", "--models", "{tmp}"], "--models"),
    (["run", "--prefill-step", "0"], "--prefill-step"),
    (["run", "--routing-tokens", "-5"], "--routing-tokens"),
    (["run", "--group-size", "48"], "--group-size must be one of 32, 64, 128"),
    (["run", "--bandwidth", "-3"], "--bandwidth"),
    (["run", "--bandwidth", "nan"], "--bandwidth"),
    (["run", "--gen-tokens", "0"], "--gen-tokens"),
    (["run", "--decode-contexts", "0"], "--decode-contexts needs positive integers"),
    (["plan", "--model", "tiny", "--group-size", "48"], "--group-size"),
    (["plan", "--model", "tiny", "--context", "0"], "--context must be at least 1"),
    (["plan", "--model", "tiny", "--budget-gb", "nan"], "--budget-gb"),
    # Longer than the model's own context (max_position_embeddings: 8192).
    (["plan", "--model", "S", "--context", "8193"], "longer than S's context of 8192 tokens"),
])
def test_cli_errors_are_one_line(args, message, tmp_path):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    r = _bench(*args, *(["--out", tmp_path / "o"] if args[0] == "run" else []))
    _one_line_error(r, message)
    assert not (tmp_path / "o").exists()  # nothing written before the check


def test_run_out_an_existing_file_is_refused(tmp_path):
    (tmp_path / "results").write_text("mine")
    for out in (tmp_path / "results", tmp_path / "results" / "sub"):
        _one_line_error(_bench("run", "--quick", "--out", out), f"--out {out}")
    assert (tmp_path / "results").read_text() == "mine"


def _valid_results(quick_run) -> dict:
    return json.loads((quick_run[0] / "results.json").read_text())


def _break(path: str, value):
    """A change to a results dict: set the value at a dotted path (None: delete it)."""
    def apply(results):
        *head, last = path.split(".")
        node = results
        for key in head:
            node = node[int(key)] if isinstance(node, list) else node[key]
        key = int(last) if isinstance(node, list) else last
        if value is None:
            del node[key]
        else:
            node[key] = value
        return results
    return apply


@pytest.mark.parametrize("change, says", [
    (lambda r: [r], "is not a results file"),
    (lambda r: "text", "is not a results file"),
    (_break("machine", None), 'missing "machine"'),
    (_break("machine", [1, 2]), "machine: expected an object, found a list"),
    (_break("models", "x"), "models: expected a list, found a string"),
    (_break("models.0", 7), "models[0]: expected an object, found an integer"),
    (_break("models.0.prefill.0.ttft_s.median", "fast"),
     "models[0].prefill[0].ttft_s.median: expected a number, found a string"),
    (_break("models.1.decode.0.context", None), 'models[1].decode[0]: missing "context"'),
    (_break("settings.bits", "4"), "settings.bits: expected an integer, found a string"),
    (_break("models.0.routing.prompts.real.mean_distinct", None),
     'models[0].routing.prompts.real: missing "mean_distinct"'),
])
def test_report_of_a_results_file_of_the_wrong_structure(quick_run, tmp_path, change, says):
    (tmp_path / "results.json").write_text(json.dumps(change(_valid_results(quick_run))))
    _one_line_error(_bench("report", tmp_path), says)
    assert not (tmp_path / "report.md").exists()
    _one_line_error(_bench("report", quick_run[0], "--compare", tmp_path), says)


def test_cli_plan_and_report(quick_run):
    r = _bench("plan", "--model", "L", "--context", "8192", "--kv-bits", "8")
    assert r.exit_code == 0 and "phone app, 3 GB" in r.stdout and "DOES NOT FIT" in r.stdout
    out, _, _ = quick_run
    r = _bench("report", out, "--no-plots", "--compare", out)
    assert r.exit_code == 0 and (out / "compare.md").exists()
    before = (out / "report.md").stat().st_mtime_ns
    r = _bench("report", out, "--compare", out / "missing")
    assert r.exit_code == 2 and (out / "report.md").stat().st_mtime_ns == before
    r = _bench("report", out / "results.json", "--no-plots")  # the file, not its directory
    assert r.exit_code == 0 and f"wrote {out / 'report.md'}" in r.stdout


def test_plan_answers_for_the_phone_whatever_runs_here():
    # "Does it fit a phone?" is about MLX on the phone's GPU (float16 activations and
    # KV cache), so Linux's CPU and a Mac give the same answer unless --dtype says otherwise.
    r = _bench("plan", "--model", "S", "--context", "1024", "--json")
    p = json.loads(r.stdout)
    assert p["dtype"] == "float16"
    assert p["kv_cache_bytes"] == analytic.kv_cache_bytes(model_config("S"), 1024, "float16")
    r = _bench("plan", "--model", "S", "--context", "1024", "--json", "--dtype", "float32")
    assert json.loads(r.stdout)["kv_cache_bytes"] == analytic.kv_cache_bytes(
        model_config("S"), 1024, "float32")


def test_every_command_takes_h_and_every_option_has_help():
    assert _bench("-h").exit_code == 0
    for name, command in bench_cli.commands.items():
        r = _bench(name, "-h")
        assert r.exit_code == 0 and "--help" in r.stdout, name
        options = [p for p in command.params if isinstance(p, click.Option)]
        assert options, name
        for option in options:  # every option, whatever kind of parameter comes first
            assert option.help, f"bench {name} {option.opts[0]} has no help"


def test_run_warns_before_starting_when_it_will_take_hours(tmp_path):
    """The default settings (published shapes, contexts up to 8192) take hours on a CPU:
    said before the first model is built, not by a progress bar's ETA later."""
    class Stop(Exception):
        pass

    seen = []

    def log(message):
        seen.append(message)
        if message.startswith("warning: these settings") or (
                ON_GPU and message.startswith("estimated time")):
            raise Stop  # stop the run here: it would take hours

    out = tmp_path / "out"
    with pytest.raises(Stop):
        run_benchmark(["S", "pro"], Settings(dtype="float32", bandwidth_gbps=100.0), out,
                      progress=False, plots=False, log=log)
    # Said before any model was built or anything written (--out was checked, then removed).
    assert not out.exists()
    assert not any(m.startswith(("MobileMoE-S", "MobileLLM-Pro")) for m in seen)
    assert len([m for m in seen if m.startswith("estimated time: about")]) == 1
    if not ON_GPU:  # on MLX's CPU backend: hours, and what shortens the run
        assert "hours" in seen[-2] and "--quick" in seen[-1] and "--repeats" in seen[-1]


def test_run_time_estimate_follows_the_work():
    s = Settings(dtype="float32", bandwidth_gbps=100.0)
    configs = {"S": model_config("S")}
    full = run_seconds(configs, s, 1e9)
    # Prefill FLOPs of every prompt, (warm-up + repeats) times, at 1 GFLOP/s, at least.
    prefill = 6 * sum(analytic.prefill_flops(configs["S"], p) for p in s.prompt_lengths) / 1e9
    assert prefill < full < 3 * prefill
    assert run_seconds(configs, s, 2e9) == pytest.approx(full / 2, rel=0.01)
    shorter = Settings(dtype="float32", bandwidth_gbps=100.0, repeats=1)
    assert run_seconds(configs, shorter, 1e9) < full / 2


def test_quick_run_estimates_minutes_at_most(quick_run):
    logs = quick_run[2]
    assert any(m.startswith("estimated time: under a minute") for m in logs)
    assert not any("will take hours" in m for m in logs)


def test_without_matplotlib_the_run_says_plots_were_skipped(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` fails
    logs = []
    s = quick_settings(prompt_lengths=[8], decode_contexts=[8], repeats=1, warmup=0,
                       routing_tokens=0)
    run_benchmark(["tiny"], s, tmp_path, progress=False, plots=True, log=logs.append)
    assert [m for m in logs if m.startswith("plots skipped")] == [
        "plots skipped: matplotlib is not installed (`pip install matplotlib`, "
        "or `pip install -e .[plots]`)"]
    assert "Plots skipped: matplotlib is not installed" in (tmp_path / "report.md").read_text()
    assert not list(tmp_path.glob("*.png"))


@pytest.mark.parametrize("stop_at, pngs", [("MobileMoE-tiny", []),
                                           ("MobileLLM-Pro", ["decode", "memory", "prefill"])])
def test_an_interrupted_run_writes_no_empty_plots_and_no_warnings(tmp_path, capfd, stop_at,
                                                                   pngs):
    pytest.importorskip("matplotlib")
    s = quick_settings(prompt_lengths=[8], decode_contexts=[8], repeats=1, warmup=0,
                       routing_tokens=0)
    seen = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(KeyboardInterrupt):
            run_benchmark(["tiny", "pro-tiny"], s, tmp_path, progress=False, plots=True,
                          log=_sigint_on(stop_at, seen))
    assert [str(w.message) for w in caught] == []
    assert "Warning" not in capfd.readouterr().err
    assert sorted(p.stem for p in tmp_path.glob("*.png")) == pngs
    report = (tmp_path / "report.md").read_text()
    assert ("No plots: no phase was measured" in report) == (not pngs)
    # The run says where its plots went (or that there are none).
    said = [m for m in seen if m.startswith(("plots: ", "no plots: "))]
    assert len(said) == 1, seen
    if pngs:
        files = [Path(f) for f in said[0][len("plots: "):].split(", ")]
        assert sorted(f.stem for f in files) == pngs
        assert all(f.parent == tmp_path and f.stat().st_size > 1000 for f in files)
    else:
        assert said == ["no plots: no phase was measured"]
    assert not list(tmp_path.glob(".*part*"))  # written under temporary names, renamed


def test_report_units_and_paper_numbers(quick_run, tmp_path):
    out, _, _ = quick_run
    results = load_results(out)
    text = build_report(results, "skipped")
    assert "(--no-plots)" in text and "matplotlib" not in text
    models = text.split("## Models")[1].split("## Prefill")[0]
    assert "0.000 GB" not in models and " KB" in models and "K /" in models
    assert "KV analytic" in text and "256-token steps" in text
    assert "1.8-3.8x faster prefill" in text and "2.2-3.4x faster decode" in text
    results["models"][0]["name"] = "M"  # the paper's decode ratios follow the sizes run
    assert "paper (M vs Pro)" in build_report(results, "skipped")
    write_report(out, plots=False)
    assert "(--no-plots)" in (out / "report.md").read_text()


def test_compare_pairs_models_by_name(quick_run):
    out, _, _ = quick_run
    a = load_results(out)
    b = json.loads(json.dumps(a))
    b["models"][0]["label"] = "tiny-ckpt (checkpoint)"  # as a --weights run labels it
    del b["models"][1]
    text = build_comparison(a, b, "a", "b")
    assert "MobileMoE-tiny / tiny-ckpt (checkpoint) | decode tok/s" in text
    assert "Only in A (no model of the same name in B): MobileLLM-Pro (tiny)" in text


def test_results_keep_run_level_rss_and_own_keys(quick_run):
    _, results, _ = quick_run
    assert results["rss_peak_bytes"] > 0
    assert all("rss_peak_bytes" not in m["memory"] for m in results["models"])
    for m in results["models"]:
        assert sorted(m["analytic"]["kv_cache_bytes"]) == ["16", "40"]
        assert sorted(m["analytic"]["prefill_flops_per_token"]) == ["16", "32"]


# -- every table of the report well formed, in every state a run can stop in ----------

def _cells(line: str) -> list:
    """A markdown table line's cells ("\\|" inside a cell is not a border)."""
    return re.split(r"(?<!\\)\|", line.strip())[1:-1]


def _tables(text: str) -> list:
    blocks, block = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            block.append(line)
        elif block:
            blocks.append(block)
            block = []
    return blocks


def _check_tables(text: str) -> None:
    for table in _tables(text):
        header, separator, rows = _cells(table[0]), _cells(table[1]), table[2:]
        assert set(separator) == {"---"}, table
        assert len(separator) == len(header), table  # as many separators as header cells
        assert rows, f"a table without rows: {table}"
        assert all(len(_cells(r)) == len(header) for r in rows), table


def _partial_states(full: dict):
    """Every state an interrupted run can leave results.json in, from a complete
    run: the models measured so far, then the one being measured cut short at
    each point its entry grows (built, memory, each prefill and decode entry,
    each routing prompt)."""
    def state(models):
        return {**copy.deepcopy(full), "interrupted": True, "models": copy.deepcopy(models)}

    for k, m in enumerate(full["models"]):
        done = full["models"][:k]
        bare = {key: v for key, v in m.items()
                if key not in ("memory", "prefill", "decode", "routing", "complete")}
        yield state(done)
        yield state(done + [bare])
        grown = {**bare, "memory": m["memory"], "prefill": [], "decode": []}
        yield state(done + [grown])
        for i in range(1, len(m["prefill"]) + 1):
            yield state(done + [{**grown, "prefill": m["prefill"][:i]}])
        for j in range(1, len(m["decode"]) + 1):
            yield state(done + [{**grown, "prefill": m["prefill"], "decode": m["decode"][:j]}])
        if "routing" in m:
            kinds = list(m["routing"]["prompts"])
            for i in range(len(kinds)):
                prompts = {kind: m["routing"]["prompts"][kind] for kind in kinds[:i]}
                yield state(done + [{**m, "routing": {"tokens": m["routing"]["tokens"],
                                                      "prompts": prompts}}])
    yield full


def test_every_report_table_is_well_formed_in_every_partial_state(quick_run):
    full = _valid_results(quick_run)
    states = list(_partial_states(full))
    assert len(states) > 10 and states[0]["models"] == []
    for results in states:
        assert load_results_dict_ok(results)
        for plots in ("skipped", None, [], ["prefill.png"]):
            _check_tables(build_report(results, plots))
        _check_tables(build_comparison(results, full, "a", "b"))
        _check_tables(build_comparison(full, results, "a", "b"))
    # Stopped before the first model was built: no empty table, but a sentence.
    empty = build_report(states[0], [])
    assert "(No model: the run stopped before any was measured.)" in empty
    assert "(No prefill" in empty and "(No decode" in empty


def load_results_dict_ok(results: dict) -> bool:
    """A partial state is still a file `bench report` reads."""
    return schema.structure_problem(results) is None


def test_a_second_run_into_the_same_out_needs_force(quick_run):
    # Never overwrite without --force: an earlier run's results stay as they were.
    from bench.files import check_out_dir

    out, _, _ = quick_run
    before = (out / "results.json").read_bytes()
    r = _bench("run", "--quick", "--out", out, "--no-plots", "--no-progress")
    assert r.exit_code == 2 and "already holds a run's results.json" in r.output
    assert "--force" in r.output and (out / "results.json").read_bytes() == before
    assert check_out_dir(out, force=True) == out
