"""Profiling a model: one decode step and one prefill chunk, each timed with
and without the group timers (clock.py), their graphs counted, gathered in a
Profile with the findings that can be read off its figures."""

import statistics
import time
from dataclasses import dataclass
from typing import Callable, List, Optional

import mlx.core as mx
import mlx.nn as nn

from mobilemoe_mlx.errors import UserError

from ..steps import Graph, classify, graph_primitives
from .clock import Clock, arrays_of, force, instrumented, sync_cost
from .groups import ABSENT, CONTENTS, GROUPS, LABELS, MEASURED, NOT_RUN, OTHER, groups_present


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


def _median(values: List[float]) -> float:
    return statistics.median(values) if values else 0.0


class Stepper:
    """Builds the step to profile from a KV cache kept in host memory, so every
    run starts from the same cache without holding a second copy on the device
    (which would make the cache update copy the whole buffer)."""

    def __init__(self, model: nn.Module, context_ids, seed_token: int, fill_step: int):
        from mlx_lm.models.cache import make_prompt_cache

        from ..harness import offload, prefill

        cache = make_prompt_cache(model)
        self.model, self.next_token = model, mx.array([seed_token])
        if len(context_ids):
            self.next_token = prefill(model, mx.array(context_ids), cache, fill_step)
        self._host = offload(cache)

    def cache(self):
        from ..harness import restore

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
    graph = classify(graph_primitives(*arrays_of(make_step()())), backend)
    on_step(f"{kind}: graph counted")
    plain, plain_build, runs = [], [], []
    for r in range(repeats + 1):
        step = make_step()
        t0 = time.perf_counter()
        out = step()
        t1 = time.perf_counter()
        force(out)
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

    from mobilemoe_mlx.model.planner import PREFILL_CHUNK
    from mobilemoe_mlx.model.runtime import current

    from ..estimate import profile_steps, profile_work
    from ..models import describe_storage

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
    from ..models import check_checkpoint, config_for, is_checkpoint_name

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
    from mobilemoe_mlx.checkpoints.loading import load_converted
    from mobilemoe_mlx.model.mobilemoe import realize
    from mobilemoe_mlx.model.runtime import current

    from ..models import Built, build_synthetic, check_checkpoint, is_checkpoint_name, storage_of
    from ..parity import cast

    if not is_checkpoint_name(name):
        return build_synthetic(name, dtype or current().compute_dtype, seed=seed, fuse=True)
    path = check_checkpoint(name, "--model")
    model, config = load_converted(path, float32_on_cpu=True)
    if dtype is not None:
        cast(model, dtype)
    realize(model)
    act, quant = storage_of(model)
    return Built(str(path), path.name, model, config, "moe", False, str(path),
                 dtype=act, quant=quant)


def ms_text(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}"


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
            lines.append(f"{what}: building its graph took {ms_text(ph.plain_build_seconds)} of "
                         f"its {ms_text(ph.plain_seconds)} ms on the host "
                         f"({ph.plain_build_seconds / ph.plain_seconds:.0%}); "
                         f"{ph.graph.nodes} nodes, of which {sum(ph.graph.kernels.values())} "
                         f"launch kernels")
    syncs = p.phases[0].syncs
    lines.append(f"syncing after each timed group costs about {ms_text(syncs * p.sync_seconds)} ms "
                 f"per decode step here ({syncs} syncs at {p.sync_seconds * 1e6:.0f} us): "
                 "the groups' times include it")
    return lines


