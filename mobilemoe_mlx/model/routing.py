"""Which routed experts each MoE layer chose, recorded on a model instance.

Each MoE block reports the expert indices its router chose to its observers
(model/mobilemoe.py's `MoE.observers`), on every path: a plain forward reports them as
they are computed, a compiled decode step after it runs. Nothing is recomputed
and results are unchanged. chat.py's /stats and the benchmark's routing report
both use it.
"""

from contextlib import contextmanager
from typing import List

import mlx.core as mx
import mlx.nn as nn
import numpy as np


class ExpertRecorder:
    """Keeps, per MoE layer, the expert indices ([..., K]) chosen while recording.

        recorder = ExpertRecorder(model)
        with recorder.record():
            model(tokens)
        recorder.distinct()   # distinct experts per layer
        recorder.remove()     # the model as it was
    """

    def __init__(self, model: nn.Module):
        self._moe = [layer.feed_forward for layer in model.layers
                     if hasattr(getattr(layer, "feed_forward", None), "observers")]
        if not self._moe:
            raise ValueError("the model has no MoE layers to record")
        self.num_experts = model.args.num_local_experts
        self.recording = False
        self._calls: List[list] = [[] for _ in self._moe]
        self._observers = [self._observer(sink) for sink in self._calls]
        for ff, observe in zip(self._moe, self._observers):
            ff.observers.append(observe)

    def _observer(self, sink: list):
        def observe(indices: mx.array) -> None:
            if self.recording:
                sink.append(indices)
        return observe

    def remove(self) -> None:
        for ff, observe in zip(self._moe, self._observers):
            if observe in ff.observers:
                ff.observers.remove(observe)

    def clear(self) -> None:
        for calls in self._calls:
            calls.clear()

    @contextmanager
    def record(self):
        """Record (from empty) for the duration of the block."""
        self.clear()
        self.recording = True
        try:
            yield self
        finally:
            self.recording = False

    def choices(self) -> List[np.ndarray]:
        """Per layer, the chosen experts as [tokens, K], tokens in the order seen."""
        out = []
        for calls in self._calls:
            rows = [np.array(c.astype(mx.int32)).reshape(-1, c.shape[-1]) for c in calls]
            out.append(np.concatenate(rows) if rows else np.zeros((0, 1), np.int32))
        return out

    def distinct(self, start: int = 0, stop=None) -> List[int]:
        """Distinct experts per layer over the recorded tokens [start:stop]."""
        return [len(np.unique(rows[start:stop])) for rows in self.choices()]

    def load_balance(self) -> List[dict]:
        """Per layer: distinct experts, evenness (normalised entropy of the load,
        1 = perfectly even) and the busiest expert's load over the mean."""
        layers = []
        for rows in self.choices():
            counts = np.bincount(rows.reshape(-1), minlength=self.num_experts)
            p = counts / max(counts.sum(), 1)
            nz = p[p > 0]
            layers.append({
                "distinct": int((counts > 0).sum()),
                "entropy": float(-(nz * np.log(nz)).sum() / np.log(self.num_experts)),
                "max_over_mean": float(counts.max() / max(counts.mean(), 1e-12)),
            })
        return layers
