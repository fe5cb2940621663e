"""How long a benchmark run will take, said before it starts.

The run's work is counted from the analytic model (mobilemoe_mlx/model/analytic.py):
FLOPs of every timed and untimed prefill, of every decode step, and bytes read
per decode step. A fraction of a second measuring this backend's throughput on
the operation that dominates both (an INT4 quantized matmul in the run's
activation dtype) turns that into seconds. MLX's CPU backend runs it about 1000
times slower than an Apple GPU (and float16 30 times slower than float32), so
the default settings that take minutes on a Mac take hours here: the user is
told before waiting, not by an ETA that appears later.

The figure ignores per-step overheads (graph building, kernel launches): it is
a lower bound for tiny models, close for the published shapes.
"""

import time
from dataclasses import replace
from typing import Dict, List, NamedTuple

import mlx.core as mx

from mobilemoe_mlx.model import analytic
from mobilemoe_mlx.model.runtime import CPU

from .options import Settings

HOURS_WARNING = 3600.0  # warn above this many seconds


def measured_flops(dtype: str = "float32", seconds: float = 0.1) -> float:
    """FLOP/s of a 4-bit group-32 quantized matmul of 8 rows in `dtype` on the
    default device: what prefill and decode spend their time in."""
    dt = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}[dtype]
    n = 1024
    q, s, b = mx.quantize(mx.random.normal((n, n), key=mx.random.key(0)).astype(dt),
                          group_size=32, bits=4)
    x = mx.random.normal((8, n), key=mx.random.key(1)).astype(dt)
    mx.eval(q, s, b, x)

    def step():
        mx.eval(mx.quantized_matmul(x, q, s, b, transpose=True, group_size=32, bits=4))

    step()  # warm-up
    runs, t0 = 0, time.perf_counter()
    while runs < 3 or time.perf_counter() - t0 < seconds:
        step()
        runs += 1
    return 2 * 8 * n * n * runs / (time.perf_counter() - t0)


def model_seconds(config: dict, s: Settings, flops_per_s: float,
                  quant: analytic.Quant) -> float:
    """Seconds one model's phases take: prefill repeats, cache fills, decode
    steps (the slower of compute and memory traffic) and the routing prefills."""
    runs = s.warmup + s.repeats
    flops = runs * sum(analytic.prefill_flops(config, p) for p in s.prompt_lengths)
    flops += sum(analytic.prefill_flops(config, c) for c in s.decode_contexts)  # fills
    if analytic.is_moe(config) and s.routing_tokens:
        flops += 3 * analytic.prefill_flops(config, s.routing_tokens)
    seconds = flops / flops_per_s
    for c in s.decode_contexts:
        compute = analytic.decode_flops_per_token(config, c) / flops_per_s
        memory = (analytic.decode_bound(config, c, s.bandwidth_gbps, quant, kv_dtype=s.dtype)
                  ** -1 if s.bandwidth_gbps else 0.0)
        seconds += runs * s.gen_tokens * max(compute, memory)
    return seconds


def run_seconds(configs: Dict[str, dict], s: Settings, flops_per_s: float) -> float:
    quant = analytic.Quant(bits=s.bits, group_size=s.group_size)
    return sum(model_seconds(c, s, flops_per_s, quant) for c in configs.values())


def duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} hours"
    if seconds >= 60:
        return f"{seconds / 60:.0f} minutes"
    return "under a minute"


class Estimate(NamedTuple):
    seconds: float
    advice: str  # how to shorten the run


def estimate_line(seconds: float, flops_per_s: float, dtype: str, backend: str) -> str:
    """The line `bench run` and `bench profile` print before they start."""
    return (f"estimated time: {'' if seconds < 60 else 'about '}{duration(seconds)} "
            f"({flops_per_s / 1e9:.2f} GFLOP/s measured for {dtype} INT4 matmuls on the "
            f"{backend} backend)")


def announce(configs: Dict[str, dict], s: Settings, backend: str, log) -> Estimate:
    """Log the estimate (and a warning with what shortens it, when it is hours)."""
    rate = measured_flops(s.dtype)
    seconds = run_seconds(configs, s, rate)
    log(estimate_line(seconds, rate, s.dtype, backend))
    advice = shorter(configs, s, rate, backend)
    if seconds > HOURS_WARNING:
        log(f"warning: these settings will take hours here ({_biggest(configs, s)}); {advice} "
            "(Ctrl-C stops a run and keeps what was measured)")
    return Estimate(seconds, advice)


def profile_steps(repeats: int) -> int:
    """Runs of each step `bench profile` makes: one to count its graph, then a
    warm-up and `repeats` timed runs, each plain and instrumented."""
    return 1 + 2 * (repeats + 1)


def profile_work(config: dict, context: int, chunk: int, repeats: int) -> Dict[str, float]:
    """FLOPs of `bench profile`'s parts: filling the KV cache, the decode steps,
    the prefill chunks (by bench/profile/measure.py's run_profile)."""
    runs = profile_steps(repeats)
    chunks = (analytic.prefill_flops(config, context + chunk)
              - analytic.prefill_flops(config, context)) if chunk else 0.0
    return {"fill": analytic.prefill_flops(config, context) if context else 0.0,
            "decode": runs * analytic.decode_flops_per_token(config, context),
            "prefill": runs * chunks}


def shorter(configs: Dict[str, dict], s: Settings, flops_per_s: float, backend: str) -> str:
    """What shortens the run, with one shorter command line's estimate."""
    shortest = min(s.prompt_lengths)
    short = replace(s, prompt_lengths=[shortest], decode_contexts=[min(s.decode_contexts)],
                    repeats=1, gen_tokens=min(s.gen_tokens, 32),
                    routing_tokens=min(s.routing_tokens, shortest))
    example = (f"--prompt-lengths {shortest} --decode-contexts {short.decode_contexts[0]} "
               f"--repeats 1 --gen-tokens {short.gen_tokens}"
               + (f" --routing-tokens {short.routing_tokens}"
                  if short.routing_tokens != s.routing_tokens else ""))
    return ("fewer or shorter --prompt-lengths and --decode-contexts, fewer --repeats, "
            "--gen-tokens or --models, or --routing-tokens 0 shorten the run "
            f"({example}: {duration(run_seconds(configs, short, flops_per_s))}); "
            "--quick is a smoke test of tiny models"
            + ("; float16 is slow on MLX's CPU backend: --dtype float32 is faster"
               if backend == CPU and s.dtype != "float32" else ""))


def _biggest(configs: Dict[str, dict], s: Settings) -> str:
    longest = max(s.prompt_lengths + s.decode_contexts)
    names: List[str] = list(configs)
    return (f"{', '.join(names)}, contexts up to {longest} tokens, "
            f"{s.warmup} warm-up + {s.repeats} repeats")
