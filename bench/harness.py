"""The measurements: prefill, decode, memory per phase, expert routing.

Every phase starts from `mx.reset_peak_memory()` (and an emptied buffer
cache), so each recorded peak belongs to that phase alone. Timings warm up
first, repeat, and keep every run (median, min and max are derived from them).

Prefill runs as mlx-lm runs it: all tokens but the last in chunks of
`prefill_step`, evaluating the cache after each chunk, then the last token,
whose logits give the first generated token (TTFT = all of that).
Decode first fills a cache to the requested context the same way (untimed),
keeps a copy of it in host memory (NumPy, outside MLX's memory accounting),
and for every repeat generates `gen_tokens` greedy tokens from a fresh MLX copy
of it in the loop users run (bench/steps.py: mlx-lm's generate_step, where
step i+1 is built and queued before token i is read), so tokens/s is what
chat and `mlx_lm.generate` report. The host time to build each step's graph is
timed inside that loop, and once more with nothing else running, when the
step's graph is also counted (operations per decode step).
"""

import copy
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from importlib import metadata
from typing import Callable, List, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import make_prompt_cache

from mobilemoe_mlx.model import analytic
from mobilemoe_mlx.model.routing import ExpertRecorder
from mobilemoe_mlx.model.runtime import current as current_runtime

from .options import Settings
from .schema import (
    DECODE_BOUND,
    DECODE_ENTRY,
    MEMORY_ENTRY,
    PREFILL_ENTRY,
    ROUTING_ENTRY,
    ROUTING_PROMPT_ENTRY,
    entry,
)
from .steps import decode, kernel_nodes, probe_step  # noqa: F401 - decode is public here too

# ---------------------------------------------------------------- machine ----

def _sysctl(name: str) -> Optional[str]:
    try:
        return subprocess.run(["sysctl", "-n", name], capture_output=True, text=True,
                              timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def rss_bytes() -> Optional[int]:
    """Current resident set size of this process."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        pass
    try:  # macOS
        out = subprocess.run(["ps", "-o", "rss=", "-p", str(os.getpid())],
                             capture_output=True, text=True, timeout=5).stdout
        return int(out.strip()) * 1024
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


def peak_rss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024  # bytes on macOS, KiB on Linux


def machine_info() -> dict:
    """Device, OS, versions and backend, for the report's header."""
    chip = _sysctl("machdep.cpu.brand_string") if sys.platform == "darwin" else None
    if chip is None:
        try:
            with open("/proc/cpuinfo") as f:
                chip = next((ln.split(":", 1)[1].strip() for ln in f
                             if ln.startswith("model name")), None)
        except OSError:
            chip = None
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    rt = current_runtime()

    def version(pkg):
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None

    return {
        "chip": rt.device_name or chip or platform.processor() or platform.machine(),
        "cpu": chip,
        "machine": platform.machine(),
        "os": f"{platform.system()} {platform.release()}"
              + (f" (macOS {platform.mac_ver()[0]})" if sys.platform == "darwin" else ""),
        "memory_bytes": memory,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "mlx": mx.__version__,
        "mlx_lm": version("mlx-lm"),
        "backend": rt.backend,
        "default_device": rt.device,
    }


def copy_bandwidth(mbytes: int = 256, repeats: int = 3) -> float:
    """Measured copy bandwidth in GB/s (bytes read + written per second)."""
    n = mbytes * (1 << 20) // 4
    x = mx.ones((n,), dtype=mx.float32)
    mx.eval(x)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        y = x + 1
        mx.eval(y)
        best = min(best, time.perf_counter() - t)
        del y
    return 2 * n * 4 / best / 1e9


# ------------------------------------------------------------------ stats ----

def stats(runs: List[float]) -> dict:
    return {"median": statistics.median(runs), "min": min(runs), "max": max(runs),
            "runs": list(runs)}


def start_phase() -> None:
    """Forget earlier allocations so the next peak belongs to this phase only."""
    mx.clear_cache()
    mx.reset_peak_memory()


def cache_bytes(cache) -> int:
    return sum(c.nbytes for c in cache)


# ------------------------------------------------------------ primitives ----

def prefill(model: nn.Module, tokens: mx.array, cache, step: int) -> mx.array:
    """Feed `tokens` (1-D) into `cache` as mlx-lm does; return the first new token."""
    n = tokens.shape[0]
    done = 0
    while n - done > 1:
        k = min(step, n - done - 1)
        model(tokens[done:done + k][None], cache=cache)
        mx.eval([c.state for c in cache])
        done += k
    logits = model(tokens[done:][None], cache=cache)
    y = mx.argmax(logits[:, -1, :], axis=-1)
    mx.eval(y)
    return y


def _to_host(a: mx.array):
    if a.dtype == mx.bfloat16:  # NumPy has no bfloat16: keep the bits
        return np.array(a.view(mx.uint16)), mx.bfloat16
    return np.array(a), None


def _to_device(h) -> mx.array:
    data, view = h
    a = mx.array(data)
    return a.view(view) if view is not None else a


def _map_kv(cache, fn):
    """Shallow copies of each layer's cache with `fn` applied to its keys and values."""
    out = []
    for c in cache:
        c2 = copy.copy(c)
        if getattr(c, "keys", None) is not None:
            c2.keys, c2.values = fn(c.keys), fn(c.values)
        out.append(c2)
    return out


def offload(cache):
    """A copy of a filled cache in host (NumPy) memory.

    The decode phase measures the peak of MLX's memory while one cache is
    decoded. The copy every repeat starts from must not be counted in it: a
    second MLX copy would stay alive during the phase and add a whole KV cache
    to the peak. NumPy memory is outside `mx.get_peak_memory()`, so the peak
    holds exactly the weights, the cache being decoded and the temporaries.
    (Subtracting the copy's nbytes instead would be off by the allocator's
    rounding, and wrong whenever the copy shares a buffer with the cache.)"""
    return _map_kv(cache, _to_host)


def restore(host_cache):
    """A fresh, evaluated MLX cache from `offload()`'s copy (independent of it)."""
    out = _map_kv(host_cache, _to_device)
    mx.eval([(c.keys, c.values) for c in out if getattr(c, "keys", None) is not None])
    return out


# ------------------------------------------------------------ the runner ----

class Progress:
    """One status line with an ETA, weighted by tokens of work."""

    def __init__(self, total: float, enabled: bool = True):
        self.total, self.done, self.t0 = max(total, 1), 0.0, time.perf_counter()
        self.enabled = enabled
        self.tty = sys.stderr.isatty()

    def update(self, work: float, what: str):
        self.done += work
        if not self.enabled:
            return
        frac = min(self.done / self.total, 1.0)
        el = time.perf_counter() - self.t0
        eta = el / frac * (1 - frac) if frac > 0 else 0
        width = 24
        bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
        line = f"[{bar}] {frac:4.0%} {what:<44.44} {el:6.0f}s elapsed, ~{eta:.0f}s left"
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n",
              file=sys.stderr, flush=True)

    def close(self):
        if self.enabled and self.tty:
            print(file=sys.stderr)


def work_estimate(s: Settings, n_models: int, moe_models: int) -> float:
    per_model = (s.warmup + s.repeats) * sum(s.prompt_lengths)
    per_model += sum(c + (s.warmup + s.repeats) * s.gen_tokens * 8 for c in s.decode_contexts)
    return n_models * per_model + moe_models * 3 * s.routing_tokens


def measure_model(built, s: Settings, vocab_tokens, progress: Progress,
                  save: Callable[[], None], record: dict) -> None:
    """Fill `record` (one model's entry in results.json) phase by phase, calling
    `save` after each so an interrupted run keeps what it measured."""
    from .models import weight_bytes

    record["memory"] = entry(MEMORY_ENTRY, weights_bytes=weight_bytes(built.model),
                             active_after_load_bytes=mx.get_active_memory(),
                             rss_bytes=rss_bytes())
    record["prefill"], record["decode"] = [], []
    save()
    for p in s.prompt_lengths:
        record["prefill"].append(measure_prefill(built, s, vocab_tokens(s.prompts, p), progress))
        save()
    for c in s.decode_contexts:
        record["decode"].append(measure_decode(built, s, vocab_tokens(s.prompts, c), progress))
        save()
    if built.family == "moe" and s.routing_tokens:
        measure_routing(built, s, vocab_tokens, progress, save, record)
    record["complete"] = True
    save()


def measure_prefill(built, s: Settings, tokens: mx.array, progress: Progress) -> dict:
    """TTFT of a prompt (warm-up, then the timed repeats) and the phase's peak memory."""
    p, runs = tokens.shape[0], s.warmup + s.repeats
    ttft, peaks, kv = [], [], 0
    for r in range(runs):
        cache = make_prompt_cache(built.model)
        start_phase()
        t = time.perf_counter()
        prefill(built.model, tokens, cache, s.prefill_step)
        dt = time.perf_counter() - t
        if r >= s.warmup:
            ttft.append(dt)
            peaks.append(mx.get_peak_memory())
        kv = cache_bytes(cache)
        del cache
        progress.update(p, f"{built.label}: prefill {p} ({r + 1}/{runs})")
    return entry(PREFILL_ENTRY, prompt_tokens=p, ttft_s=stats(ttft),
                 tokens_per_s=stats([p / t for t in ttft]), peak_memory_bytes=max(peaks),
                 kv_cache_bytes=kv,
                 kv_cache_bytes_analytic=analytic.kv_cache_bytes(built.config, p, built.dtype),
                 rss_bytes=rss_bytes())


def measure_decode(built, s: Settings, tokens: mx.array, progress: Progress) -> dict:
    """Decode speed at the context len(tokens): the cache filled once (untimed)
    and kept in host memory, each repeat decoding from a fresh copy of it."""
    model, c, runs = built.model, tokens.shape[0], s.warmup + s.repeats
    cache = make_prompt_cache(model)
    start_phase()
    t = time.perf_counter()
    y = prefill(model, tokens, cache, s.prefill_step)
    fill_s = time.perf_counter() - t
    fill_peak = mx.get_peak_memory()
    filled, kv = cache[0].offset, cache_bytes(cache)
    base = offload(cache)  # host memory: not part of the decode peak
    del cache
    progress.update(c, f"{built.label}: fill cache to {c}")
    probe_cache = restore(base)
    primitives, idle_builds = probe_step(model, y, probe_cache)
    del probe_cache
    tps, step_mean, build_med, peaks = [], [], [], []
    for r in range(runs):
        run_cache = restore(base)
        start_phase()
        total, builds, _ = decode(model, y, run_cache, s.gen_tokens)
        if r >= s.warmup:
            tps.append(s.gen_tokens / total)
            step_mean.append(total / s.gen_tokens)  # steps overlap: the mean
            build_med.append(statistics.median(builds))
            peaks.append(mx.get_peak_memory())
        del run_cache
        progress.update(s.gen_tokens * 8, f"{built.label}: decode at {c} ({r + 1}/{runs})")
    measured = entry(
        DECODE_ENTRY, context=c, context_filled=filled, gen_tokens=s.gen_tokens,
        tokens_per_s=stats(tps), step_s=stats(step_mean), graph_build_s=stats(build_med),
        graph_build_fraction=statistics.median(build_med) / statistics.median(step_mean),
        graph_nodes=sum(primitives.values()), graph_kernels=kernel_nodes(primitives),
        graph_build_idle_s=stats(idle_builds), peak_memory_bytes=max(peaks),
        fill_s=fill_s, fill_peak_memory_bytes=fill_peak, kv_cache_bytes=kv,
        kv_cache_bytes_analytic=analytic.kv_cache_bytes(built.config, filled, built.dtype),
        rss_bytes=rss_bytes())
    if not s.bandwidth_gbps:
        return measured
    bound = analytic.decode_bound(built.config, c, s.bandwidth_gbps, built.quant,
                                  kv_dtype=built.dtype)
    return {**measured, **entry(DECODE_BOUND, bandwidth_bound_tokens_per_s=bound,
                                fraction_of_bound=statistics.median(tps) / bound)}


def measure_routing(built, s: Settings, vocab_tokens, progress: Progress,
                    save: Callable[[], None], record: dict) -> None:
    """Experts a prefill of real, random and repeated-token prompts routes to,
    into record["routing"], saved after each prompt."""
    prompts: dict = {}
    record["routing"] = {"tokens": s.routing_tokens, "prompts": prompts}
    per_expert = analytic.weight_bytes(built.config, built.quant)["per_expert"]
    recorder = ExpertRecorder(built.model)
    try:
        for kind in ("real", "random", "repeat"):
            tokens = vocab_tokens(kind, s.routing_tokens)
            with recorder.record():
                cache = make_prompt_cache(built.model)
                start_phase()
                prefill(built.model, tokens, cache, s.prefill_step)
                peak = mx.get_peak_memory()
            del cache
            prompts[kind] = routing_stats(recorder, per_expert, peak)
            progress.update(s.routing_tokens, f"{built.label}: routing, {kind} prompt")
            save()
    finally:
        recorder.remove()
    record["routing"] = entry(
        ROUTING_ENTRY, tokens=s.routing_tokens, prompts=prompts,
        real_minus_repeat_peak_bytes=(prompts["real"]["peak_memory_bytes"]
                                      - prompts["repeat"]["peak_memory_bytes"]),
        real_minus_repeat_touched_bytes=(prompts["real"]["touched_expert_bytes"]
                                         - prompts["repeat"]["touched_expert_bytes"]))


def routing_stats(recorder: ExpertRecorder, expert_bytes: int, peak_bytes: int) -> dict:
    """Distinct experts used per layer and how evenly, from a recorded prefill."""
    layers = recorder.load_balance()
    distinct = [ly["distinct"] for ly in layers]
    return entry(
        ROUTING_PROMPT_ENTRY, layers=layers, mean_distinct=sum(distinct) / len(distinct),
        mean_entropy=sum(ly["entropy"] for ly in layers) / len(layers),
        # What a runtime that pages weights in on use (mmap, as ExecuTorch on a
        # phone) would hold of the routed experts; MLX keeps them all resident.
        touched_expert_bytes=sum(distinct) * expert_bytes, peak_memory_bytes=peak_bytes)
