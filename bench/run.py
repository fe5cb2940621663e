"""`run_benchmark()`: every model, every setting, saved as it goes."""

import datetime
import json
import signal
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable, List, Optional

import mlx.core as mx

from mobilemoe_mlx.checkpoints.config import PRESETS
from mobilemoe_mlx.errors import UserError
from mobilemoe_mlx.model import analytic
from mobilemoe_mlx.model.runtime import current as current_runtime

from .estimate import HOURS_WARNING, announce, duration
from .files import prepare_out_dir, remove_created, write_text_atomic
from .harness import Progress, copy_bandwidth, machine_info, measure_model, peak_rss_bytes
from .interrupt import HardStop
from .models import (
    build,
    check_checkpoint,
    check_quantizable,
    describe_storage,
    family,
    is_checkpoint_name,
    model_config,
)
from .options import Settings
from .report import write_report
from .schema import SCHEMA, SCHEMA_VERSION
from .tokens import prompt_tokens


class NotStarted(Exception):
    """The run was not started: its estimate was long and the user said no."""


@contextmanager
def sigint_ignored():
    """Ctrl-C is ignored inside the block (the main thread only can change it):
    used while the results and the report are written, so a second Ctrl-C
    cannot leave them half-written."""
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread: nothing to change
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def validate_models(models: List[str], settings: Settings, weights: Optional[str]) -> List[str]:
    """Check every --models entry (and --weights) before anything is written.
    Returns the MoE presets that --weights replaces (one, or none)."""
    if not models:
        raise UserError("--models names no model")
    for m in models:
        if is_checkpoint_name(m):
            check_checkpoint(m, "--models")
        else:
            try:
                model_config(m)
            except UserError as e:
                raise UserError(f"--models: {e}") from None
            check_quantizable(m, settings.bits, settings.group_size)
    moe_presets = [m for m in models if m in PRESETS]
    if weights is not None:
        if len(moe_presets) != 1:
            raise UserError("--weights replaces one MobileMoE preset's synthetic weights: name "
                            "exactly one of S, M, L, tiny in --models "
                            f"(got {', '.join(moe_presets) or 'none'})")
        check_checkpoint(weights, "--weights")
    return moe_presets if weights is not None else []


def run_benchmark(models: List[str], settings: Settings, out_dir, weights: Optional[str] = None,
                  progress: bool = True, plots: bool = True, log=print,
                  confirm: Optional[Callable[[str], bool]] = None,
                  hard_stop: bool = False, force: bool = False,
                  protocol: Optional[str] = None) -> dict:
    """Measure `models` (names or converted directories) and write
    out_dir/results.json and out_dir/report.md. Ctrl-C stops the run and keeps
    every model entry measured so far (results.json says "interrupted"); the
    report is always written, with Ctrl-C ignored while it is.

    `confirm(question)` is asked before a run estimated at over an hour (a
    False answer raises NotStarted, with nothing written). `hard_stop` ends
    the process within a second of Ctrl-C even inside MLX (bench/interrupt.py):
    for the command line, never for a caller that must keep running. An
    earlier run's results.json in `out_dir` is replaced only with `force`.
    `protocol`: the line saying which protocol runs and why, logged before the estimate."""
    replaced = validate_models(models, settings, weights)
    out = Path(out_dir)
    created = prepare_out_dir(out_dir, force)  # before anything is measured or asked
    try:
        machine = _announce(models, weights, replaced, settings, log, confirm, protocol)
    except BaseException as e:
        remove_created(created)  # nothing was written: leave nothing behind
        if isinstance(e, KeyboardInterrupt):
            log("interrupted before the run started: nothing was measured or written")
        raise
    results = {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION,
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "interrupted": False, "machine": machine, "settings": settings.to_dict(),
        "rss_peak_bytes": peak_rss_bytes(), "models": [],
    }

    def save():  # renamed over the last save when complete: never half-written
        results["rss_peak_bytes"] = peak_rss_bytes()
        write_text_atomic(out / "results.json", json.dumps(results, indent=1))

    save()
    bar = Progress(_work(settings, models), enabled=progress)

    def finish():
        bar.close()
        save()
        if results["interrupted"]:
            log("interrupted: keeping the results measured so far")
        log(f"writing {out / 'report.md'}")
        write_report(out, plots=plots, log=log)

    def finish_for_main():  # the watcher's: the main thread is inside MLX
        results["interrupted"] = True
        finish()

    stop = HardStop(finish_for_main) if hard_stop else None
    with stop or nullcontext():
        try:
            _measure(models, weights, replaced, settings, bar, progress, log, save, results)
        except (KeyboardInterrupt, SystemExit):  # Ctrl-C, or SIGTERM through run_cli
            results["interrupted"] = True
            raise
        finally:
            with sigint_ignored():  # before the claim: a second Ctrl-C must not skip finish()
                if stop is not None and not stop.claim():
                    stop.wait_for_exit()
                finish()
    return results


def _announce(models, weights, replaced, settings: Settings, log, confirm,
              protocol: Optional[str] = None) -> dict:
    """The machine line and the time estimate; asks `confirm` when it is over
    an hour. Returns the machine's description."""
    if settings.bandwidth_gbps is None:
        settings.bandwidth_gbps = copy_bandwidth(64 if settings.gen_tokens < 16 else 256)
        settings.bandwidth_source = "measured copy bandwidth"
    elif settings.bandwidth_source is None:
        settings.bandwidth_source = "given with --bandwidth"
    m = machine_info()
    note = current_runtime().timing_note()
    log(f"{m['chip']}, {m['backend']} backend, MLX {m['mlx']}, mlx-lm {m['mlx_lm']}"
        + (f"  ({note})" if note else ""))
    if protocol:
        log(protocol)
    configs = _configs(models, weights, replaced)
    estimate = announce(configs, settings, m["backend"], log)
    if estimate.seconds > HOURS_WARNING and confirm is not None and not confirm(
            f"Start anyway (about {duration(estimate.seconds)})?"):
        raise NotStarted(f"nothing was measured or written; {estimate.advice}")
    return m


def _measure(models, weights, replaced, settings: Settings, bar, progress, log, save,
             results) -> None:
    for name in models:
        built = build(name, weights if name in replaced else None, dtype=settings.dtype,
                      bits=settings.bits, group_size=settings.group_size, seed=settings.seed)
        log(("\n" if progress and bar.tty else "") + f"{built.label}: "
            + _describe(built, settings))
        record = _record(built, settings)
        results["models"].append(record)
        vocab = built.config["vocab_size"]

        def tokens(kind, n, vocab=vocab, tok=built.tokenizer):
            return prompt_tokens(kind, n, vocab, tok, settings.seed)

        measure_model(built, settings, tokens, bar, save, record)
        del built
        mx.clear_cache()


def _describe(built, s: Settings) -> str:
    """What is measured: synthetic weights at which shape, or a checkpoint's, and how stored."""
    q = built.quant
    storage = describe_storage(q.bits, q.group_size, built.dtype)
    if built.synthetic:
        shape = ("tiny test shape, not a published one" if built.name.endswith("tiny")
                 else "the published shape")
        return f"synthetic random weights at {shape} ({storage}), built in memory"
    what = f"weights from {built.source} ({storage}, read from the checkpoint"
    return what + (f"; --dtype {s.dtype} ignored: a checkpoint runs in its own dtype)"
                   if s.dtype != built.dtype else ")")


def _record(built, s: Settings) -> dict:
    """A model's entry in results.json before anything is measured (see schema.py)."""
    q = built.quant
    return {
        "name": built.name, "label": built.label, "family": built.family,
        "synthetic": built.synthetic, "source": built.source, "config": built.config,
        "dtype": built.dtype,
        "quant": {"bits": q.bits, "group_size": q.group_size if q.bits else None,
                  "scale_dtype": q.scale_dtype if q.bits else None,
                  "embedding_scale_dtype": (q.embedding_scale_dtype or q.scale_dtype)
                  if q.bits else None, "dtype": q.dtype},
        "analytic": analytic.summary(built.config, q, kv_dtype=built.dtype,
                                     contexts=s.decode_contexts, prompt_lengths=s.prompt_lengths),
    }


def _configs(models: List[str], weights: Optional[str], replaced: List[str]) -> dict:
    """The config of every model to run, by name, without building any."""
    configs = {}
    for name in models:
        path = weights if name in replaced else name if is_checkpoint_name(name) else None
        if path is None:
            configs[name] = model_config(name)
        else:
            configs[name] = json.loads((Path(path).expanduser() / "config.json").read_text())
    return configs


def _work(s: Settings, models: List[str]) -> float:
    from .harness import work_estimate

    moe = 0
    for m in models:
        try:
            moe += family(model_config(m)) == "moe"
        except UserError:
            moe += 1  # a checkpoint directory
    return work_estimate(s, len(models), moe)
