"""A results.json as the Swift benchmark writes it (ios/Sources/MobileMoEBench/
Results.swift) is read by `python -m bench report` and `--compare`, beside a
Python run. The hand-made file below must carry exactly the keys the Swift
types declare (extracted from the Swift source), so it follows the Swift code.
With a Swift compiler (e2e tier), Results.swift's own encoder writes a file
with non-finite numbers, which must read back as Python writes them.
"""

import copy
import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_swift_sources import json_keys, results_types

from bench import schema
from bench.cli import main
from bench.report import build_comparison, build_report, load_results


def stats(*runs):
    s = sorted(runs)
    return {"median": s[len(s) // 2], "min": s[0], "max": s[-1], "runs": list(runs)}


def routing_prompt(distinct, peak):
    return {"layers": [{"distinct": distinct, "entropy": 0.9, "max_over_mean": 1.7}],
            "mean_distinct": float(distinct), "mean_entropy": 0.9,
            "touched_expert_bytes": distinct * 4608, "peak_memory_bytes": peak}


def swift_results() -> dict:
    analytic = {"params": {"total": 1_263_000_000, "active": 272_000_000},
                "weight_bytes": {"total": 790_000_000, "decode_read_per_token": 230_000_000},
                "kv_bytes_per_token": 81920}

    def model(name, family):
        m = {
            "name": name, "label": f"{name} label", "family": family, "synthetic": name == "pro",
            "source": f"/private/var/mobile/Documents/{name}", "config": {"vocab_size": 128256},
            "dtype": "float16",
            "quant": {"bits": 4, "group_size": 32, "scale_dtype": "float16",
                      "embedding_scale_dtype": "float16", "dtype": "float16"},
            "analytic": analytic,
            "memory": {"weights_bytes": 790_000_000, "active_after_load_bytes": 800_000_000,
                       "rss_bytes": 900_000_000, "footprint_bytes": 950_000_000},
            "prefill": [{"prompt_tokens": 512, "ttft_s": stats(0.20, 0.21, 0.19),
                         "tokens_per_s": stats(2560.0, 2438.1, 2694.7),
                         "peak_memory_bytes": 1_000_000_000, "kv_cache_bytes": 20_971_520,
                         "kv_cache_bytes_analytic": 20_971_520.0, "rss_bytes": 1_100_000_000,
                         "footprint_bytes": 1_150_000_000}],
            "decode": [{"context": 256, "context_filled": 256, "gen_tokens": 128,
                        "tokens_per_s": stats(150.0, 148.0, 152.0),
                        "step_s": stats(0.0066, 0.0067, 0.0065),
                        "graph_build_s": stats(0.0004, 0.0005, 0.0004),
                        "graph_build_fraction": 0.06,
                        "graph_build_idle_s": stats(0.0003, 0.0004, 0.0003),
                        "peak_memory_bytes": 900_000_000,
                        "fill_s": 0.1, "fill_peak_memory_bytes": 950_000_000,
                        "kv_cache_bytes": 20_971_520, "kv_cache_bytes_analytic": 10_485_760.0,
                        "rss_bytes": 1_000_000_000, "footprint_bytes": 1_050_000_000}],
            "complete": True,
        }
        if family == "moe":
            m["routing"] = {"tokens": 1024,
                            "prompts": {"real": routing_prompt(58, 1_200_000_000),
                                        "random": routing_prompt(60, 1_210_000_000),
                                        "repeat": routing_prompt(4, 1_150_000_000)},
                            "real_minus_repeat_peak_bytes": 50_000_000,
                            "real_minus_repeat_touched_bytes": 54 * 4608}
        return m

    return {
        "schema": "mobilemoe-bench/results", "schema_version": 2,
        "created": "2026-11-25T21:00:00+01:00", "interrupted": False,
        "machine": {"chip": "Apple A18 Pro GPU", "cpu": None, "machine": "iPhone17,1",
                    "os": "iOS 18.2.0", "memory_bytes": 8_000_000_000, "cpu_count": 6,
                    "mlx": "0.31.6 (mlx-swift)", "mlx_lm": "3.31.4 (mlx-swift-lm)",
                    "backend": "Metal", "default_device": "Device(gpu, 0)",
                    "device_model": "iPhone17,1"},
        "settings": {"prompt_lengths": [512], "decode_contexts": [256], "gen_tokens": 128,
                     "repeats": 3, "warmup": 1, "prompts": "real", "prefill_step": 2048,
                     "routing_tokens": 1024, "dtype": "float16", "bits": 4, "group_size": 32,
                     "seed": 0, "bandwidth_gbps": None, "bandwidth_source": None},
        "rss_peak_bytes": 1_300_000_000,
        "models": [model("S", "moe"), model("pro", "dense")],
        "runtime": {"name": "mlx-swift", "mlx_swift": "0.31.6", "mlx_swift_lm": "3.31.4",
                    "build_configuration": "release", "cache_limit_bytes": 268_435_456,
                    "memory_limit_bytes": 6_000_000_000},
        "footprint_peak_bytes": 1_400_000_000,
    }


def python_style(results: dict) -> dict:
    """The same run without the Swift-only keys, as a Python run writes it."""
    r = copy.deepcopy(results)
    for key in ("runtime", "footprint_peak_bytes"):
        r.pop(key)
    r["machine"].pop("device_model")
    r["machine"].update(chip="Apple M3", machine="arm64", os="Darwin 24.1.0 (macOS 15.1)",
                        mlx="0.31.1", mlx_lm="0.31.2", python="3.12.7")
    for m in r["models"]:
        m["memory"].pop("footprint_bytes")
        for e in m["prefill"] + m["decode"]:
            e.pop("footprint_bytes")
            e["tokens_per_s"] = stats(*(v / 2 for v in e["tokens_per_s"]["runs"]))
    return r


def test_hand_made_file_has_exactly_the_swift_keys():
    types = results_types()
    r = swift_results()
    m = r["models"][0]
    objects = {
        "BenchResults": r, "MachineInfo": r["machine"], "RuntimeInfo": r["runtime"],
        "ModelRecord": m, "MemoryRecord": m["memory"], "PrefillEntry": m["prefill"][0],
        "DecodeEntry": m["decode"][0], "Stats": m["prefill"][0]["ttft_s"],
        "RoutingRecord": m["routing"], "RoutingPrompt": m["routing"]["prompts"]["real"],
        "RoutingLayer": m["routing"]["prompts"]["real"]["layers"][0],
    }
    for name, obj in objects.items():
        assert set(obj) == json_keys(types[name]), name


def test_swift_results_pass_the_schema_check_and_build_a_report():
    r = swift_results()
    assert schema.check(r) == []
    report = build_report(r, plots="skipped")
    assert "MLX 0.31.6 (mlx-swift), mlx-lm 3.31.4 (mlx-swift-lm), backend **Metal**" in report
    assert "| 512 | 200.00 (190.00-210.00) ms | 2560.0 |" in report
    assert "| S label | real - repeat |" in report


def test_bench_report_and_compare_read_a_swift_run_beside_a_python_run(tmp_path):
    swift_dir, python_dir = tmp_path / "swift", tmp_path / "python"
    swift_dir.mkdir()
    python_dir.mkdir()
    (swift_dir / "results.json").write_text(json.dumps(swift_results()))
    (python_dir / "results.json").write_text(json.dumps(python_style(swift_results())))
    out = CliRunner().invoke(main, ["report", str(swift_dir), "--compare", str(python_dir),
                                    "--no-plots"])
    assert out.exit_code == 0, out.output
    assert (swift_dir / "report.md").is_file()
    compare = (swift_dir / "compare.md").read_text()
    # Models pair by name; the Python run decodes at half the speed here.
    assert "| S label | decode tok/s | 256 | 150.00 | 75.00 | 0.50x |" in compare
    assert "Only in" not in compare
    direct = build_comparison(load_results(python_dir), load_results(swift_dir), "py", "swift")
    assert "| pro label | prefill tok/s | 512 | 1280.00 | 2560.00 | 2.00x |" in direct


ROOT = Path(__file__).resolve().parents[1]
SWIFTC = shutil.which("swiftc") or next(
    (p for p in ("/opt/swift/usr/bin/swiftc",) if Path(p).exists()), None)


@pytest.mark.e2e
@pytest.mark.skipif(SWIFTC is None, reason="needs a Swift compiler (swiftc)")
def test_swift_encoder_writes_non_finite_numbers_as_python_does(tmp_path):
    # Results.swift and Plan.swift need only Foundation: compiled here with a
    # driver that encodes NaN (a routing entropy over one expert) and both
    # infinities. JSONEncoder refuses them by default, which lost the whole file.
    sources = [ROOT / "ios/Sources/MobileMoEBench/Results.swift",
               ROOT / "ios/Sources/MobileMoEBench/Plan.swift",
               ROOT / "tests/swift/results_encoder/main.swift"]
    exe = tmp_path / "encode"
    subprocess.run([SWIFTC, "-swift-version", "6", *map(str, sources), "-o", str(exe)],
                   check=True, capture_output=True, timeout=600)
    text = subprocess.run([str(exe)], check=True, capture_output=True, text=True,
                          timeout=60).stdout
    r = json.loads(text)  # Python's json reads NaN / Infinity / -Infinity
    layer = r["models"][0]["routing"]["prompts"]["real"]["layers"][0]
    assert math.isnan(layer["entropy"]) and layer["max_over_mean"] == math.inf
    assert r["models"][0]["decode"][0]["graph_build_fraction"] == -math.inf
    # Written with the very tokens json.dumps writes, no marker strings left.
    for token in ("NaN", "Infinity", "-Infinity"):
        assert f": {token}" in text and f'"{token}"' not in text
    assert "nonfinite" not in text
    assert json.dumps(float("nan")) == "NaN" and json.dumps(-math.inf) == "-Infinity"
    assert schema.check(r) == []
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text(text)
    assert "tiny label" in build_report(load_results(tmp_path / "run"), plots="skipped")
