"""One decode step as users run it, the pipelined loop around it, and what
the step costs the host: its graph's operation count and its build time.

mlx-lm's generate_step (behind chat, `mlx_lm.generate` and its server) builds
step i+1 and queues it with `mx.async_eval` before it reads token i, so the
host builds while the device computes; the benchmark times that same loop.
On Apple GPUs a small model's step is short enough that the operations it
launches and the host time to build them decide tokens/s.
"""

import io
import time

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import generation_stream


def _step(model: nn.Module, y: mx.array, cache):
    """One greedy decode step as mlx-lm's generate_step builds it: the model,
    the last position's log-probabilities, their argmax. `y` is [1]."""
    logits = model(y[None], cache=cache)[:, -1, :]
    logprobs = logits - mx.logsumexp(logits, keepdims=True)
    return mx.argmax(logprobs, axis=-1), logprobs


def decode(model: nn.Module, y: mx.array, cache, n: int):
    """Generate `n` greedy tokens after `y` with the loop users run (mlx-lm's
    generate_step, which chat and mlx_lm.generate use): the graph of step i+1
    is built and handed to `mx.async_eval` before token i is read, so the host
    builds while the device computes. Returns (seconds for the n tokens,
    per-step host graph-building seconds, the tokens)."""
    builds, tokens = [], []
    with mx.stream(generation_stream):
        t0 = time.perf_counter()
        nxt = _step(model, y, cache)
        builds.append(time.perf_counter() - t0)
        mx.async_eval(nxt)
        for i in range(n):
            current = nxt
            if i + 1 < n:
                tb = time.perf_counter()
                nxt = _step(model, current[0], cache)
                builds.append(time.perf_counter() - tb)
                mx.async_eval(nxt)
            tokens.append(current[0].item())  # the token, as a user's loop reads it
        total = time.perf_counter() - t0
    return total, builds, tokens


def graph_nodes(*arrays: mx.array) -> int:
    """Operations (primitives) in the not yet evaluated graph behind `arrays`:
    what one evaluation of them launches, at most (compiled elementwise
    chains count once, as they run as one kernel)."""
    dot = io.StringIO()
    mx.export_to_dot(dot, *arrays)
    return dot.getvalue().count("shape=rectangle")


def probe_step(model: nn.Module, y: mx.array, cache, steps: int = 8):
    """Build `steps` decode steps with nothing else running, timing each build
    and counting the first one's graph. Returns (nodes, build seconds[])."""
    builds, nodes = [], None
    with mx.stream(generation_stream):
        for _ in range(steps):
            t = time.perf_counter()
            out = _step(model, y, cache)
            builds.append(time.perf_counter() - t)
            if nodes is None:
                nodes = graph_nodes(*out)
            mx.eval(out)
            y = out[0]
    return nodes, builds
