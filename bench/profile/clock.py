"""Timing every group of one step: each timed module evaluates what its inputs
still owe (the caller's time), runs, evaluates its output and synchronizes, so
every second of the step lands in exactly one group (bench/profile's docstring)."""

import os
import statistics
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, List

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .groups import HEAD, OTHER, targets


def arrays_of(tree) -> List[mx.array]:
    return [a for _, a in tree_flatten(tree) if isinstance(a, mx.array)]


def force(tree, sync: bool = True) -> None:
    """Evaluate the arrays in `tree` (mx.eval blocks until they are computed);
    `sync`: also wait for everything queued on the default stream."""
    mx.eval(arrays_of(tree))
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
        force((args, kwargs), sync=False)  # work the caller left pending is the caller's
        t1 = time.perf_counter()
        parent.inputs += t1 - t0
        frame = _Frame()
        self._stack.append(frame)
        try:
            out = fn(*args, **kwargs)
            t2 = time.perf_counter()
            force(out)
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
        force(out)
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


def sync_cost(repeats: int = 30) -> float:
    """Median seconds of building, evaluating and synchronizing one trivial op:
    what each timed group adds to the instrumented step."""
    x = mx.zeros((16,))
    mx.eval(x)
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        force(x + 1)
        runs.append(time.perf_counter() - t)
    return statistics.median(runs)
