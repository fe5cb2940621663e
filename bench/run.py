"""`run_benchmark()`: every model, every setting, saved as it goes."""

import datetime
import json
import sys
from pathlib import Path
from typing import List, Optional

import mlx.core as mx

from mobilemoe_mlx import analytic
from mobilemoe_mlx.errors import UserError

from .harness import Progress, Settings, copy_bandwidth, machine_info, measure_model, quant_of
from .models import build, check_checkpoint, family, model_config
from .report import write_report
from .schema import SCHEMA, SCHEMA_VERSION
from .tokens import prompt_tokens


def run_benchmark(models: List[str], settings: Settings, out_dir, weights: Optional[str] = None,
                  progress: bool = True, plots: bool = True, log=print) -> dict:
    """Measure `models` (names or converted directories) and write
    out_dir/results.json and out_dir/report.md. Ctrl-C stops the run and keeps
    every model entry measured so far (results.json says "interrupted")."""
    out = Path(out_dir)
    moe_names = [m for m in models if m not in ("pro", "pro-tiny")]
    if weights is not None and len(moe_names) != 1:
        raise UserError("--weights replaces one MobileMoE model's synthetic weights: "
                        f"name exactly one MoE model in --models (got {', '.join(moe_names) or 'none'})")
    if weights is not None:
        check_checkpoint(weights)
    else:
        for m in models:  # fail on a bad name before measuring anything
            if not Path(m).expanduser().exists():
                model_config(m)
    out.mkdir(parents=True, exist_ok=True)
    if settings.bandwidth_gbps is None:
        settings.bandwidth_gbps = copy_bandwidth(64 if settings.gen_tokens < 16 else 256)
        settings.bandwidth_source = "measured copy bandwidth"
    elif settings.bandwidth_source is None:
        settings.bandwidth_source = "given with --bandwidth"
    results = {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION,
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "interrupted": False, "machine": machine_info(), "settings": settings.to_dict(),
        "models": [],
    }

    def save():
        (out / "results.json").write_text(json.dumps(results, indent=1))

    save()
    m = results["machine"]
    log(f"{m['chip']}, {m['backend']} backend, MLX {m['mlx']}, mlx-lm {m['mlx_lm']}"
        + ("  (CPU timings here are not Apple figures; memory, bytes and FLOPs are)"
           if m["backend"] != "Metal" else ""))
    bar = Progress(_work(settings, models), enabled=progress)
    try:
        for name in models:
            built = build(name, weights if name in moe_names else None, dtype=settings.dtype,
                          bits=settings.bits, group_size=settings.group_size, seed=settings.seed)
            log(("\n" if progress and bar.tty else "")
                + f"{built.label}: " + ("synthetic random INT4 weights at the published shape, "
                                        "built in memory" if built.synthetic
                                        else f"weights from {built.source}"))
            record = {
                "name": built.name, "label": built.label, "family": built.family,
                "synthetic": built.synthetic, "source": built.source, "config": built.config,
                "analytic": analytic.summary(built.config, quant_of(built, settings),
                                             kv_dtype=settings.dtype),
            }
            results["models"].append(record)
            vocab = built.config["vocab_size"]

            def tokens(kind, n, vocab=vocab, tok=built.tokenizer):
                return prompt_tokens(kind, n, vocab, tok, settings.seed)

            measure_model(built, settings, tokens, bar, save, record)
            del built
            mx.clear_cache()
    except KeyboardInterrupt:
        results["interrupted"] = True
        save()
        bar.close()
        print("\ninterrupted: keeping the results measured so far", file=sys.stderr)
        write_report(out, plots=plots)
        raise
    bar.close()
    save()
    write_report(out, plots=plots)
    return results


def _work(s: Settings, models: List[str]) -> float:
    from .harness import work_estimate

    moe = 0
    for m in models:
        try:
            moe += family(model_config(m)) == "moe"
        except UserError:
            moe += 1  # a checkpoint directory
    return work_estimate(s, len(models), moe)
