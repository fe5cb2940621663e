"""`bench profile`: where one decode step and one prefill chunk spend their time
on this backend, by kind of operation, and how many kernels they launch.

MLX is lazy: a forward pass only records a graph, and the work happens when
something is evaluated. To time each part, the model's modules are wrapped for
the duration of one run (nothing inside them changes): a wrapper first
evaluates what its inputs still owe (that time belongs to the code that called
it), then runs its module, evaluates the output and synchronizes. Time spent in
a nested wrapper is its own group's, so every second of the run lands in
exactly one group, and "other" is what no module of a group ran (the
embedding, residual adds, the mask, the argmax). The step is also timed
without wrappers: the difference is the cost of syncing after every group.

Groups, found by the modules' names in each decoder layer (mlx-lm's layout):
attention (`self_attn`: projections, cache update, attention), norms and RoPE
(the layer norms, `rope`, `q_norm`/`k_norm`), router (an MoE block's own work:
the router matmul, the expert selection, the weighted combine), routed experts
(`experts`, mlx-lm's `switch_mlp`), shared expert, dense FFN (a feed-forward
block without experts), head (the final norm and the output projection) and
other. A group the model has no module for is absent.

The graph of each step is counted too, by primitive, with the views (reshape,
transpose, slice, broadcast...: no kernel, no copy) apart from the nodes that
launch a kernel. On MLX's CPU backend fast.rms_norm, fast.rope and
scaled_dot_product_attention are built from elementary ops, so the CPU's graph
is larger than a GPU's: the output says which backend's graph it counted.
"""

import os
import statistics
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mobilemoe_mlx.errors import UserError

from .steps import VIEW_PRIMITIVES, graph_primitives

# ------------------------------------------------------------------ groups ----

ATTENTION, NORMS, ROUTER, ROUTED, SHARED, DENSE, HEAD, OTHER = (
    "attention", "norms_rope", "router", "routed_experts", "shared_expert", "dense_ffn",
    "head", "other")
GROUPS = (ATTENTION, NORMS, ROUTER, ROUTED, SHARED, DENSE, HEAD, OTHER)
LABELS = {
    ATTENTION: "attention", NORMS: "norms and RoPE", ROUTER: "router", ROUTED: "routed experts",
    SHARED: "shared expert", DENSE: "dense FFN", HEAD: "head", OTHER: "other",
}
# What each group holds, for the JSON and the docs.
CONTENTS = {
    ATTENTION: "q/k/v/o projections, KV cache update, attention (and a QK-norm computed inline)",
    NORMS: "the layers' RMS norms, RoPE, QK-norm modules",
    ROUTER: "router matmul, expert selection, weighted combine of the experts",
    ROUTED: "the routed experts' gathered matmuls and SwiGLU",
    SHARED: "the always-on shared expert",
    DENSE: "a feed-forward block without experts (the dense baseline)",
    HEAD: "final norm and output projection",
    OTHER: "embedding, residual adds, mask, sampling: what no group's module ran",
}
MEASURED, ABSENT, NOT_RUN = "measured", "absent", "not run"

_ATTENTION_NAMES = ("self_attn", "attention", "attn")
_EXPERT_NAMES = ("experts", "switch_mlp")
_SHARED_NAMES = ("shared_expert", "shared_experts")
_FFN_NAMES = ("feed_forward", "mlp", "block_sparse_moe", "moe")


def _is_norm(name: str, module: nn.Module) -> bool:
    return isinstance(module, (nn.RMSNorm, nn.LayerNorm)) or name.endswith("norm")


def _children(module: nn.Module) -> List[Tuple[str, nn.Module]]:
    return [(k, v) for k, v in module.items() if isinstance(v, nn.Module)]


def _is_moe(module: nn.Module) -> bool:
    return any(name in _EXPERT_NAMES for name, _ in _children(module))


def targets(model: nn.Module, head: bool = True) -> List[Tuple[nn.Module, str, str]]:
    """(parent module, child name, group) of every module to time. `head`:
    also the final norm and the output projection (a prefill chunk does not
    compute them: nothing in the KV cache depends on the logits)."""
    inner = model["model"] if isinstance(model.get("model"), nn.Module) else model
    out = []
    if isinstance(inner.get("embed_tokens"), nn.Module):
        out.append((inner, "embed_tokens", OTHER))  # its as_linear is the tied head
    for layer in model.layers:
        for name, child in _children(layer):
            if _is_norm(name, child):
                out.append((layer, name, NORMS))
            elif name in _ATTENTION_NAMES:
                out.append((layer, name, ATTENTION))
                out += [(child, n, NORMS) for n, c in _children(child)
                        if n == "rope" or _is_norm(n, c)]
            elif _is_moe(child):
                out.append((layer, name, ROUTER))
                for n, _ in _children(child):
                    if n in _EXPERT_NAMES:
                        out.append((child, n, ROUTED))
                    elif n in _SHARED_NAMES:
                        out.append((child, n, SHARED))
            elif name in _FFN_NAMES:
                out.append((layer, name, DENSE))
    if head:
        out += [(inner, "norm", HEAD)] if isinstance(inner.get("norm"), nn.Module) else []
        out += [(model, "lm_head", HEAD)] if isinstance(model.get("lm_head"), nn.Module) else []
    return out


def groups_present(model: nn.Module) -> set:
    present = {g for _, _, g in targets(model)} | {OTHER}
    inner = model["model"] if isinstance(model.get("model"), nn.Module) else model
    if hasattr(inner.get("embed_tokens"), "as_linear") and "lm_head" not in model:
        present.add(HEAD)  # the tied embedding is the head
    return present


# ------------------------------------------------------------------- clock ----

def _arrays(tree) -> List[mx.array]:
    return [a for _, a in tree_flatten(tree) if isinstance(a, mx.array)]


def _force(tree, sync: bool = True) -> None:
    """Evaluate the arrays in `tree` (mx.eval blocks until they are computed);
    `sync`: also wait for everything queued on the default stream."""
    mx.eval(_arrays(tree))
    if sync:
        mx.synchronize()


@dataclass
class _Frame:
    children: float = 0.0  # seconds inside nested timed calls (after their inputs were ready)
    inputs: float = 0.0  # seconds spent evaluating this frame's pending work at their entry


@dataclass
class Run:
    """One timed step: seconds per group (host graph building and the rest),
    timed calls per group, and the wall time of the whole step."""
    build: Counter = field(default_factory=Counter)
    run: Counter = field(default_factory=Counter)
    calls: Counter = field(default_factory=Counter)
    wall: float = 0.0
    output: object = None  # what the step returned, evaluated

    def total(self, group: str) -> float:
        return self.build[group] + self.run[group]

    @property
    def syncs(self) -> int:
        return sum(self.calls.values())


class Clock:
    """Exclusive time per group of the wrapped calls of one step (see the module
    docstring): every interval of the step is counted in exactly one group."""

    def __init__(self):
        self._stack: List[_Frame] = []
        self.last = Run()

    def time(self, group: str, fn: Callable, args: tuple, kwargs: dict):
        parent = self._stack[-1]
        t0 = time.perf_counter()
        _force((args, kwargs), sync=False)  # work the caller left pending is the caller's
        t1 = time.perf_counter()
        parent.inputs += t1 - t0
        frame = _Frame()
        self._stack.append(frame)
        try:
            out = fn(*args, **kwargs)
            t2 = time.perf_counter()
            _force(out)
            t3 = time.perf_counter()
        finally:
            self._stack.pop()
        self._book(group, frame, t2 - t1, t3 - t2)
        parent.children += t3 - t1
        return out

    def _book(self, group: str, frame: _Frame, building: float, waiting: float) -> None:
        self.last.build[group] += building - frame.children - frame.inputs
        self.last.run[group] += waiting + frame.inputs
        self.last.calls[group] += 1

    def step(self, fn: Callable[[], object]) -> Run:
        """Run `fn` (builds the step, returns what it must evaluate) with its
        remainder booked under "other"; returns the run's times."""
        self.last, top = Run(), _Frame()
        self._stack = [top]
        t0 = time.perf_counter()
        out = fn()
        t1 = time.perf_counter()
        _force(out)
        t2 = time.perf_counter()
        self._stack = []
        self._book(OTHER, top, t1 - t0, t2 - t1)
        self.last.calls[OTHER] -= 1  # the step itself is not a timed call
        self.last.wall, self.last.output = t2 - t0, out
        return self.last


class Timed(nn.Module):
    """`inner` with every call timed under `group` by `clock`; results unchanged.
    Other attributes read through to `inner`. `head`: time the tied
    embedding's `as_linear` (the output projection) as the head."""

    def __init__(self, inner: nn.Module, group: str, clock: Clock, head: bool = False):
        super().__init__()
        self.inner = inner
        self._group, self._clock, self._head = group, clock, head

    def __call__(self, *args, **kwargs):
        return self._clock.time(self._group, self.inner, args, kwargs)

    def as_linear(self, x):
        if self._head:
            return self._clock.time(HEAD, self.inner.as_linear, (x,), {})
        return self.inner.as_linear(x)

    def __getattr__(self, key):
        try:
            return super().__getattr__(key)
        except AttributeError:
            if key == "inner":
                raise
            return getattr(self.inner, key)


@contextmanager
def instrumented(model: nn.Module, clock: Clock, head: bool = True):
    """`model`'s modules wrapped in Timed for `clock`, and mx.compile off (a
    compiled function would replay its trace without calling the wrappers, or
    refuse their evaluations). On exit the modules are restored and mx.compile
    is on again, unless MLX_DISABLE_COMPILE asks for it off."""
    swapped = []
    try:
        for parent, name, group in targets(model, head):
            swapped.append((parent, name, parent[name]))
            parent[name] = Timed(parent[name], group, clock, head=head)
        mx.disable_compile()
        yield clock
    finally:
        if not os.environ.get("MLX_DISABLE_COMPILE"):
            mx.enable_compile()
        for parent, name, original in reversed(swapped):
            parent[name] = original


# ------------------------------------------------------------------- graph ----

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
    """`counts` (bench.steps.graph_primitives) split into kernels and views."""
    kernels = Counter({k: n for k, n in counts.items() if k not in VIEW_PRIMITIVES})
    views = Counter({k: n for k, n in counts.items() if k in VIEW_PRIMITIVES})
    return Graph(backend, kernels, views)


# ----------------------------------------------------------------- profile ----

@dataclass
class GroupTime:
    group: str
    status: str  # MEASURED, ABSENT or NOT_RUN
    calls: int = 0  # timed calls in one step
    seconds: float = 0.0  # median over the repeats
    build_seconds: float = 0.0  # of which: host time building the graph (median)


@dataclass
class Phase:
    """One profiled step: a decode step (1 token) or a prefill chunk."""
    kind: str  # "decode" or "prefill"
    tokens: int
    context: int  # tokens in the KV cache before the step
    groups: List[GroupTime]
    plain_seconds: float  # the step without wrappers (median)
    plain_build_seconds: float  # of which: building its graph on the host
    syncs: int  # timed calls (one sync each) in one instrumented step
    graph: Graph

    @property
    def instrumented_seconds(self) -> float:
        return sum(g.seconds for g in self.groups)

    def share(self, g: GroupTime) -> float:
        return g.seconds / self.instrumented_seconds if self.instrumented_seconds else 0.0

    def ranked(self) -> List[GroupTime]:
        return sorted((g for g in self.groups if g.status == MEASURED),
                      key=lambda g: -g.seconds)

    def to_dict(self) -> dict:
        return {
            "kind": self.kind, "tokens": self.tokens, "context": self.context,
            "plain_ms": self.plain_seconds * 1e3,
            "plain_build_ms": self.plain_build_seconds * 1e3,
            "instrumented_ms": self.instrumented_seconds * 1e3, "syncs": self.syncs,
            "groups": [{"group": g.group, "label": LABELS[g.group], "status": g.status,
                        "calls": g.calls, "ms": g.seconds * 1e3,
                        "build_ms": g.build_seconds * 1e3, "share": self.share(g),
                        "contents": CONTENTS[g.group]} for g in self.groups],
            "graph": self.graph.to_dict(),
        }


@dataclass
class Profile:
    model: str  # the label
    backend: str
    device: str
    dtype: str
    storage: str  # "INT4 g32 weights, float32 activations"
    repeats: int
    sync_seconds: float  # one eval + synchronize of a trivial op here
    phases: List[Phase]

    def to_dict(self) -> dict:
        return {"model": self.model, "backend": self.backend, "device": self.device,
                "dtype": self.dtype, "storage": self.storage, "repeats": self.repeats,
                "sync_us": self.sync_seconds * 1e6,
                "phases": [p.to_dict() for p in self.phases], "why": why(self)}


def sync_cost(repeats: int = 30) -> float:
    """Median seconds of building, evaluating and synchronizing one trivial op:
    what each timed group adds to the instrumented step."""
    x = mx.zeros((16,))
    mx.eval(x)
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        _force(x + 1)
        runs.append(time.perf_counter() - t)
    return statistics.median(runs)


def _median(values: List[float]) -> float:
    return statistics.median(values) if values else 0.0


class Stepper:
    """Builds the step to profile from a KV cache kept in host memory, so every
    run starts from the same cache without holding a second copy on the device
    (which would make the cache update copy the whole buffer)."""

    def __init__(self, model: nn.Module, context_ids, seed_token: int, fill_step: int):
        from mlx_lm.models.cache import make_prompt_cache

        from .harness import offload, prefill

        cache = make_prompt_cache(model)
        self.model, self.next_token = model, mx.array([seed_token])
        if len(context_ids):
            self.next_token = prefill(model, mx.array(context_ids), cache, fill_step)
        self._host = offload(cache)

    def cache(self):
        from .harness import restore

        return restore(self._host)

    def decode(self) -> Callable[[], object]:
        """A fresh decode step: the model on the next token, the greedy argmax."""
        cache, y = self.cache(), self.next_token

        def step():
            return mx.argmax(self.model(y[None], cache=cache)[:, -1, :], axis=-1)
        return step

    def prefill(self, ids) -> Callable[[], object]:
        """A fresh prefill chunk: as mlx-lm's prefill, only the KV cache is evaluated."""
        cache, chunk = self.cache(), mx.array(ids)[None]

        def step():
            self.model(chunk, cache=cache)
            return [c.state for c in cache]
        return step


def profile_phase(model: nn.Module, make_step: Callable[[], Callable], kind: str, tokens: int,
                  context: int, repeats: int, backend: str, head: bool,
                  on_step: Callable[[str], None] = lambda what: None) -> Phase:
    """Time the step `make_step()` builds `repeats` times with and without
    wrappers (after one untimed run of each), and count its graph. `on_step`
    is told after each run of the step (estimate.profile_steps of them)."""
    clock = Clock()
    graph = classify(graph_primitives(*_arrays(make_step()())), backend)
    on_step(f"{kind}: graph counted")
    plain, plain_build, runs = [], [], []
    for r in range(repeats + 1):
        step = make_step()
        t0 = time.perf_counter()
        out = step()
        t1 = time.perf_counter()
        _force(out)
        t2 = time.perf_counter()
        on_step(f"{kind}: {'warm-up' if not r else f'run {r}/{repeats}'}, plain")
        with instrumented(model, clock, head):
            run = clock.step(make_step())
        on_step(f"{kind}: {'warm-up' if not r else f'run {r}/{repeats}'}, instrumented")
        if r:  # the first of each is a warm-up
            plain.append(t2 - t0)
            plain_build.append(t1 - t0)
            runs.append(run)
    present = groups_present(model)
    groups = []
    for g in GROUPS:
        calls = runs[-1].calls[g]
        status = MEASURED if g == OTHER or calls else (NOT_RUN if g in present else ABSENT)
        groups.append(GroupTime(g, status, calls, _median([x.total(g) for x in runs]),
                                _median([x.build[g] for x in runs])))
    return Phase(kind, tokens, context, groups, _median(plain), _median(plain_build),
                 runs[-1].syncs, graph)


def run_profile(built, context: int, chunk: int, repeats: int, seed: int = 0,
                fill_step: Optional[int] = None, progress=None) -> Profile:
    """Profile `built` (bench.models.Built): a decode step at `context` tokens of
    KV cache and, unless `chunk` is 0, a prefill chunk of `chunk` tokens after
    `context` tokens. The cache is filled in chunks of `fill_step` (default
    `chunk`, or the planner's chunk). `progress`: a bench.harness.Progress
    whose total is the FLOPs of estimate.profile_work, updated as they are done."""
    import numpy as np

    from mobilemoe_mlx.planner import PREFILL_CHUNK
    from mobilemoe_mlx.runtime import current

    from .estimate import profile_steps, profile_work
    from .models import describe_storage

    rt = current()
    model = built.model
    work, runs = profile_work(built.config, context, chunk, repeats), profile_steps(repeats)

    def ticker(part: str) -> Callable[[str], None]:
        return lambda what: progress and progress.update(work[part] / runs, what)

    rng = np.random.default_rng(seed)
    vocab = model.args.vocab_size
    stepper = Stepper(model, rng.integers(0, vocab, context).astype(np.int32),
                      int(rng.integers(0, vocab)), fill_step or chunk or PREFILL_CHUNK)
    if progress:
        progress.update(work["fill"], f"KV cache filled to {context} tokens")
    phases = [profile_phase(model, stepper.decode, "decode", 1, context, repeats, rt.backend,
                            head=True, on_step=ticker("decode"))]
    if chunk:
        ids = rng.integers(0, vocab, chunk).astype(np.int32)
        phases.append(profile_phase(model, lambda: stepper.prefill(ids), "prefill", chunk,
                                    context, repeats, rt.backend, head=False,
                                    on_step=ticker("prefill")))
    if progress:
        progress.close()
    return Profile(built.label, rt.backend, rt.device, built.dtype,
                   describe_storage(built.quant.bits, built.quant.group_size, built.dtype),
                   repeats, sync_cost(), phases)


def check_settings(name: str, context: int, chunk: int, repeats: int) -> None:
    """One-line UserErrors for settings `bench profile --model name` cannot run,
    before any model is built."""
    from .models import check_checkpoint, config_for, is_checkpoint_name

    if context < 0:
        raise UserError(f"--context must be 0 or more, not {context}")
    if chunk < 0:
        raise UserError(f"--chunk must be 0 (no prefill chunk) or more, not {chunk}")
    if repeats < 1:
        raise UserError(f"--repeats must be at least 1, not {repeats}")
    if is_checkpoint_name(name):
        check_checkpoint(name, "--model")
    longest = config_for(name).get("max_position_embeddings")
    if isinstance(longest, int) and context + max(chunk, 1) > longest:
        raise UserError(f"--context {context} and --chunk {chunk} go past the model's "
                        f"context of {longest} tokens")


def build_model(name: str, dtype: Optional[str], seed: int):
    """bench.models.Built for a preset name (synthetic weights, fused as loading
    fuses them; `dtype` default: this backend's) or a converted directory (as
    load() runs it here; `dtype` casts it)."""
    from mobilemoe_mlx.loading import load_converted
    from mobilemoe_mlx.runtime import current

    from .models import Built, build_synthetic, check_checkpoint, is_checkpoint_name, storage_of
    from .parity import cast

    if not is_checkpoint_name(name):
        return build_synthetic(name, dtype or current().compute_dtype, seed=seed, fuse=True)
    path = check_checkpoint(name, "--model")
    model, config = load_converted(path, float32_on_cpu=True)
    if dtype is not None:
        cast(model, dtype)
    mx.eval(model.parameters())
    act, quant = storage_of(model)
    return Built(str(path), path.name, model, config, "moe", False, str(path),
                 dtype=act, quant=quant)


# ------------------------------------------------------------------ output ----

def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}"


def _top(counts: Counter, n: int) -> str:
    merged = Counter()
    for k, v in counts.items():  # compiled functions' names list their ops: one entry
        merged["Compiled (fused)" if k.startswith("Compiled") else k] += v
    items = merged.most_common()
    shown = ", ".join(f"{k} {v}" for k, v in items[:n])
    return shown + (f", {len(items) - n} more kinds" if len(items) > n else "")


def graph_note(backend: str) -> str:
    if backend == "CPU":
        return ("counted on MLX's CPU backend, which builds fast.rms_norm, fast.rope and "
                "attention from elementary ops: a GPU's graph of the same step is smaller")
    return f"counted on the {backend} backend's graph"


def why(p: Profile) -> List[str]:
    """Short findings that hold on any backend: they are read off the figures."""
    lines = []
    for ph in p.phases:
        ranked = ph.ranked()
        what = "the decode step" if ph.kind == "decode" else "the prefill chunk"
        if ranked:
            top = ", ".join(f"{LABELS[g.group]} {ph.share(g):.0%}" for g in ranked[:3])
            lines.append(f"{what}: {top} of the instrumented time")
        if ph.plain_seconds:
            lines.append(f"{what}: building its graph took {_ms(ph.plain_build_seconds)} of "
                         f"its {_ms(ph.plain_seconds)} ms on the host "
                         f"({ph.plain_build_seconds / ph.plain_seconds:.0%}); "
                         f"{ph.graph.nodes} nodes, of which {sum(ph.graph.kernels.values())} "
                         f"launch kernels")
    syncs = p.phases[0].syncs
    lines.append(f"syncing after each timed group costs about {_ms(syncs * p.sync_seconds)} ms "
                 f"per decode step here ({syncs} syncs at {p.sync_seconds * 1e6:.0f} us): "
                 "the groups' times include it")
    return lines


def format_profile(p: Profile) -> str:
    lines = [f"profile of {p.model}: {p.backend} ({p.device}), {p.storage}; "
             f"median of {p.repeats} runs after a warm-up"]
    for ph in p.phases:
        title = (f"decode step: 1 token after {ph.context} in the KV cache" if ph.kind == "decode"
                 else f"prefill chunk: {ph.tokens} tokens after {ph.context} "
                      "(only the KV cache is evaluated, as mlx-lm's prefill does)")
        lines += ["", title, f"  {'group':<16} {'ms':>9} {'share':>7} {'build ms':>9} {'calls':>6}"]
        for g in ph.groups:
            if g.status != MEASURED:
                lines.append(f"  {LABELS[g.group]:<16} {g.status:>9}")
                continue
            lines.append(f"  {LABELS[g.group]:<16} {_ms(g.seconds):>9} {ph.share(g):>7.1%} "
                         f"{_ms(g.build_seconds):>9} {g.calls if g.group != OTHER else '':>6}")
        lines += [f"  {'instrumented':<16} {_ms(ph.instrumented_seconds):>9} "
                  f"(the groups' sum; {ph.syncs} syncs)",
                  f"  {'plain step':<16} {_ms(ph.plain_seconds):>9} "
                  f"(no wrappers, mx.compile on; {_ms(ph.plain_build_seconds)} ms building)",
                  f"  graph: {ph.graph.nodes} nodes = {sum(ph.graph.kernels.values())} launching "
                  f"a kernel + {sum(ph.graph.views.values())} views ({graph_note(ph.graph.backend)})",
                  f"    kernels: {_top(ph.graph.kernels, 8)}",
                  f"    views: {_top(ph.graph.views, 6)}"]
    lines += ["", "why:"] + [f"  - {line}" for line in why(p)]
    lines += ["", "Groups are timed with a sync after each and mx.compile off; a norm computed "
              "inline (MobileMoE's QK-norm) counts under its module's group. docs/profile.md "
              "explains the figures."]
    return "\n".join(lines)
