"""One decode step as users run it, the pipelined loop around it, and what
the step costs the host: its graph's operation count and its build time.

mlx-lm's generate_step (behind chat, `mlx_lm.generate` and its server) builds
step i+1 and queues it with `mx.async_eval` before it reads token i, so the
host builds while the device computes; the benchmark times that same loop.
On Apple GPUs a small model's step is short enough that the operations it
launches and the host time to build them decide tokens/s.
"""

import io
import re
import time
from collections import Counter
from dataclasses import dataclass

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


# Primitives that only describe another array's memory (shape, strides,
# offset): MLX evaluates them without a kernel (a reshape of a layout it cannot
# describe copies; counted as a view all the same). Every other node launches a
# kernel: one each, a compiled elementwise chain included.
VIEW_PRIMITIVES = frozenset({
    "Reshape", "Transpose", "Slice", "Broadcast", "BroadcastAxes", "ExpandDims", "Squeeze",
    "Flatten", "Unflatten", "AsStrided", "StopGradient", "Depends", "NumberOfElements",
})


def graph_primitives(*arrays: mx.array) -> Counter:
    """How many of each primitive the not yet evaluated graph behind `arrays`
    holds: what one evaluation of them runs. The graph is the one MLX builds
    for the default device: on the CPU, fast.rms_norm, rope and attention are
    built from their primitive fallbacks (S: ~2,700 nodes a step there, ~1,200
    on a GPU before compilation), so a CPU count is not a GPU count."""
    dot = io.StringIO()
    mx.export_to_dot(dot, *arrays)
    return Counter(re.findall(r'label ="([^"]+)", shape=rectangle', dot.getvalue()))


def graph_nodes(*arrays: mx.array) -> int:
    """Operations (primitives) in the not yet evaluated graph behind `arrays`."""
    return sum(graph_primitives(*arrays).values())


def kernel_nodes(primitives: Counter) -> int:
    """The nodes of `graph_primitives` that launch a kernel (views excluded)."""
    return sum(n for name, n in primitives.items() if name not in VIEW_PRIMITIVES)


def probe_step(model: nn.Module, y: mx.array, cache, steps: int = 12):
    """Build `steps` decode steps with nothing else running, timing each build
    and counting the last one's graph (the first may be unlike the rest: the
    one that grows the KV buffers, or the first of a compiled step, which
    traces it). Returns (primitives Counter, build seconds[])."""
    builds, primitives = [], None
    with mx.stream(generation_stream):
        for i in range(steps):
            t = time.perf_counter()
            out = _step(model, y, cache)
            builds.append(time.perf_counter() - t)
            if i == steps - 1:
                primitives = graph_primitives(*out)
            mx.eval(out)
            y = out[0]
    return primitives, builds


@dataclass
class Graph:
    """The primitives of one step's graph, as built on `backend`'s streams."""
    backend: str
    kernels: Counter  # primitive name -> nodes that launch a kernel
    views: Counter  # primitive name -> view nodes

    @property
    def nodes(self) -> int:
        return sum(self.kernels.values()) + sum(self.views.values())

    def to_dict(self) -> dict:
        return {"backend": self.backend, "nodes": self.nodes,
                "kernels": sum(self.kernels.values()), "views": sum(self.views.values()),
                "kernels_by_primitive": dict(self.kernels.most_common()),
                "views_by_primitive": dict(self.views.most_common())}


def classify(counts: Counter, backend: str) -> Graph:
    """`counts` (graph_primitives) split into kernels and views."""
    kernels = Counter({k: n for k, n in counts.items() if k not in VIEW_PRIMITIVES})
    views = Counter({k: n for k, n in counts.items() if k in VIEW_PRIMITIVES})
    return Graph(backend, kernels, views)
