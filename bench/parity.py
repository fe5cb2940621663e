"""`bench parity`: one model on the default device against the same weights on
the CPU in float32, layer by layer.

A GPU backend that computes a wrong answer still produces fluent-looking
numbers, so a port is only as trustworthy as its last comparison with a known
computation. MLX's CPU backend in float32 is that computation here (the test
suite holds it to an independent NumPy float64 model, tests/reference.py), and
this command puts any other backend and dtype beside it: per layer the cosine
of the residual stream at every position and the share of routed-expert
choices both runs made alike, then the logits' cosine and argmax agreement.
The first layer that falls below the thresholds is named, since every later
layer inherits its error.

The prompt goes through the paths a chat takes: most of it as a chunked
prefill through mlx-lm's KV cache (sorted expert dispatch, the causal mask),
the last tokens one at a time (decode: unsorted dispatch, one-row kernels).

Shape legend: T = prompt tokens, D = hidden, K = experts per token, V = vocabulary.
"""

import copy
import math
from dataclasses import asdict, dataclass
from typing import List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map
from mlx_lm.models.cache import make_prompt_cache

from mobilemoe_mlx.checkpoints.config import PRESETS
from mobilemoe_mlx.checkpoints.convert import DTYPES
from mobilemoe_mlx.checkpoints.loading import as_float32, load_converted
from mobilemoe_mlx.errors import UserError
from mobilemoe_mlx.model.mobilemoe import realize
from mobilemoe_mlx.model.routing import ExpertRecorder
from mobilemoe_mlx.model.runtime import current as current_runtime

from .models import build_synthetic, check_checkpoint, model_config, storage_of

# What "agrees" means, by the dtype of the run under test.
# - float32: two correct backends differ only in summation order (relative
#   error ~1e-6), so each layer's output and the logits must agree to cosine
#   0.9999 at every position, with the same argmax.
# - Half precision rounds every product and activation. Where a token's top-k
#   routing choice is nearly tied the rounding may pick another expert, which
#   legitimately moves that one position a long way (a quarter of S's routed
#   output changes), and in a free run every later layer inherits the change:
#   random synthetic weights are chaotic, and 4 layers of S in float16 already
#   agree with float32 on only half of the argmaxes. So half precision is
#   judged layer by layer (each layer given the reference's input), on the mean
#   cosine and the share of expert choices made alike, never on the worst
#   position or on the free-running logits, which are reported only. The bounds
#   sit below what float16 and bfloat16 give against float32 on the CPU
#   (docs/parity.md) and far above a layer that computes something else.
THRESHOLDS = {
    "float32": dict(cosine_min=0.9999, cosine_mean=0.9999, experts_same=0.99,
                    logits=True, argmax=1.0),
    "float16": dict(cosine_min=None, cosine_mean=0.98, experts_same=0.95,
                    logits=False, argmax=None),
    "bfloat16": dict(cosine_min=None, cosine_mean=0.95, experts_same=0.9,
                     logits=False, argmax=None),
}


@dataclass
class LayerParity:
    layer: int
    cosine_min: float  # the worst position's cosine of this layer's output
    cosine_mean: float
    experts_same: float  # share of (token, slot) expert choices made alike


@dataclass
class Parity:
    backend: str  # the run under test's backend and dtype
    dtype: str
    tokens: int
    layers: List[LayerParity]
    logits_cosine_min: float
    logits_cosine_mean: float
    argmax_agree: float

    @property
    def thresholds(self) -> dict:
        return THRESHOLDS[self.dtype]

    def _cosine_ok(self, worst: float, mean: float) -> bool:
        # `>=`, never `<`: a NaN (what a broken kernel often returns) must fail.
        t = self.thresholds
        return (t["cosine_min"] is None or worst >= t["cosine_min"]) and mean >= t["cosine_mean"]

    def first_bad_layer(self) -> Optional[int]:
        return next((x.layer for x in self.layers if not (
            self._cosine_ok(x.cosine_min, x.cosine_mean)
            and x.experts_same >= self.thresholds["experts_same"])), None)

    def failures(self) -> List[str]:
        t, out = self.thresholds, []
        bad = self.first_bad_layer()
        if bad is not None:
            x = self.layers[bad]
            out.append(f"layer {bad} is the first to diverge (cosine min {x.cosine_min:.6f}, "
                       f"mean {x.cosine_mean:.6f}, experts alike {x.experts_same:.1%})")
        if not t["logits"]:
            return out
        if not self._cosine_ok(self.logits_cosine_min, self.logits_cosine_mean):
            out.append(f"logits cosine min {self.logits_cosine_min:.6f}, mean "
                       f"{self.logits_cosine_mean:.6f} below {describe(t)}")
        if not self.argmax_agree >= t["argmax"]:
            out.append(f"argmax agrees at {self.argmax_agree:.1%} of positions "
                       f"< {t['argmax']:.0%}")
        return out

    def to_dict(self) -> dict:
        """JSON-ready: a non-finite figure is null, as in the benchmark's results.json."""
        d = tree_map(lambda v: v if not isinstance(v, float) or math.isfinite(v) else None,
                     asdict(self))
        return {**d, "thresholds": self.thresholds, "first_bad_layer": self.first_bad_layer(),
                "ok": not self.failures()}


class _LayerTap(nn.Module):
    """Keeps what a decoder layer is given and returns. With `forced` (the
    reference's inputs of this layer, [T, D]), the layer is given those instead
    of the previous layer's output, at positions offset.. of the current piece."""

    def __init__(self, inner: nn.Module, forced: Optional[np.ndarray] = None):
        super().__init__()
        self.inner, self.forced = inner, forced
        self.inputs: List[mx.array] = []
        self.outputs: List[mx.array] = []
        self.offset = 0

    def __call__(self, x, *args, **kwargs):
        if self.forced is not None:
            piece = self.forced[self.offset:self.offset + x.shape[1]]
            x = mx.array(piece)[None].astype(x.dtype)
        out = self.inner(x, *args, **kwargs)
        self.inputs.append(x)
        self.outputs.append(out)
        return out


@dataclass
class Trace:
    inputs: List[np.ndarray]  # per layer, what it was given [T, D] (float32)
    outputs: List[np.ndarray]  # per layer, what it returned [T, D]
    experts: List[np.ndarray]  # per layer, the experts chosen [T, K]
    logits: np.ndarray  # [T, V]


def _rows(arrays: List[mx.array]) -> np.ndarray:
    return np.concatenate([np.array(a[0].astype(mx.float32)) for a in arrays])


def trace(model: nn.Module, tokens: np.ndarray, chunk: int, decode: int,
          forced: Optional[List[np.ndarray]] = None) -> Trace:
    """Run `tokens` [T] through `model` on the current default stream: the first
    T - decode in prefill chunks of `chunk`, the rest one at a time, all through
    one KV cache, recording every layer's input, output and expert choices.
    With `forced` (another run's per-layer inputs), each layer is given those:
    its output then carries its own error alone, not its predecessors'."""
    inner = model.model.layers
    taps = [_LayerTap(layer, None if forced is None else forced[i])
            for i, layer in enumerate(inner)]
    recorder = ExpertRecorder(model)
    try:
        model.model.layers = taps
        cache = make_prompt_cache(model)
        prefill = len(tokens) - decode
        pieces = [tokens[i:min(i + chunk, prefill)] for i in range(0, prefill, chunk)]
        pieces += [tokens[i:i + 1] for i in range(prefill, len(tokens))]
        logits, offset = [], 0
        with recorder.record():
            for piece in pieces:  # the generation loop, as mlx-lm's: not a forward pass
                for tap in taps:
                    tap.offset = offset
                y = model(mx.array(piece)[None], cache=cache)
                mx.eval(y, [c.state for c in cache])
                logits.append(np.array(y[0].astype(mx.float32)))
                offset += len(piece)
            return Trace([_rows(t.inputs) for t in taps], [_rows(t.outputs) for t in taps],
                         recorder.choices(), np.concatenate(logits))
    finally:
        recorder.remove()
        model.model.layers = inner


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of each row of `a` with the same row of `b` (float64)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    na, nb = np.linalg.norm(a, axis=-1), np.linalg.norm(b, axis=-1)
    den = np.where(na * nb == 0, 1.0, na * nb)
    # Two zero rows agree; a zero row against a non-zero one (a kernel that wrote
    # nothing) does not.
    return np.where((na == 0) & (nb == 0), 1.0,
                    np.where(na * nb == 0, 0.0, (a * b).sum(-1) / den))


def _experts_same(a: np.ndarray, b: np.ndarray) -> float:
    """Share of each token's K choices that the other run also made (order ignored)."""
    same = (np.sort(a, -1)[:, :, None] == np.sort(b, -1)[:, None, :]).any(-1)
    return float(same.mean())


def compare(model: nn.Module, reference: nn.Module, tokens: np.ndarray, chunk: int = 32,
            decode: int = 8, dtype: Optional[str] = None, backend: Optional[str] = None
            ) -> Parity:
    """`model` on the default device against `reference` on the CPU (cast to
    float32 here), judged by THRESHOLDS[dtype] (default: the model's
    activation dtype).

    Each layer is judged on its own error: it is given the reference's input to
    that layer, so a fault shows in its layer alone and half precision's
    rounding does not compound over the depth. The logits come from a free run
    (each layer given the one before), as a user gets them."""
    reference.update(tree_map(as_float32, reference.parameters()))
    with mx.stream(mx.cpu):
        ref = trace(reference, tokens, chunk, decode)
    own = trace(model, tokens, chunk, decode, forced=ref.inputs)
    logits = trace(model, tokens, chunk, decode).logits
    dtype = dtype or storage_of(model)[0]
    layers = []
    for i, (out, want, e, re) in enumerate(zip(own.outputs, ref.outputs, own.experts,
                                                ref.experts)):
        c = _cosines(out, want)
        layers.append(LayerParity(i, float(c.min()), float(c.mean()), _experts_same(e, re)))
    c = _cosines(logits, ref.logits)
    return Parity(
        backend=backend or current_runtime().backend, dtype=dtype, tokens=len(tokens),
        layers=layers, logits_cosine_min=float(c.min()), logits_cosine_mean=float(c.mean()),
        argmax_agree=float((logits.argmax(-1) == ref.logits.argmax(-1)).mean()))


def cast(model: nn.Module, dtype: str) -> None:
    """Floating parameters to `dtype`, except those the model keeps float32
    (the router and its selection bias: Model.cast_predicate)."""
    castable = model.cast_predicate
    model.load_weights([(k, v.astype(DTYPES[dtype]) if castable(k) and
                         mx.issubdtype(v.dtype, mx.floating) else v)
                        for k, v in tree_flatten(model.parameters())])


def models_for(name: str, dtype: Optional[str], seed: int, layers: Optional[int] = None
               ) -> Tuple[nn.Module, nn.Module]:
    """(the model as it runs here, a copy of it to be the CPU float32 reference)
    for a preset (synthetic weights from `seed`; `layers` keeps that many of its
    layers, all of one shape) or a converted directory (loaded as load() does:
    in its stored dtype on a GPU, float32 on the CPU); `dtype` casts the first.

    Built or loaded once, then copied before the cast: both models start from
    the same weights bit for bit (a second build from the seed would cost as
    much again, and could differ should building ever stop being deterministic)."""
    if name in PRESETS:
        config = model_config(name)
        if layers is not None:
            if not 1 <= layers <= config["num_hidden_layers"]:
                raise UserError(f"--layers must be from 1 to {name}'s "
                                f"{config['num_hidden_layers']}, not {layers}")
            config.update(num_hidden_layers=layers, no_rope_layers=[1] * layers,
                          layer_types=["full_attention"] * layers)
        model = build_synthetic(name, "float32", seed=seed, config=config, fuse=True).model
        dtype = dtype or current_runtime().compute_dtype
    else:
        if layers is not None:
            raise UserError("--layers applies to a preset, not to a converted directory")
        path = check_checkpoint(name, "--model")
        # float32 wherever it loads: compare() runs the reference on the CPU in float32 anyway.
        model, _ = load_converted(path, float32_on_cpu=True)
    # Its own modules (trace() swaps a model's layers) and its own arrays.
    reference = copy.deepcopy(model)
    if dtype is not None:
        cast(model, dtype)
    realize(model)
    realize(reference)
    return model, reference


def random_tokens(vocab: int, n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=n).astype(np.int32)


def check_settings(tokens: int, chunk: int, decode: int) -> None:
    if tokens < 2:
        raise UserError(f"--tokens must be at least 2, not {tokens}")
    if chunk < 1:
        raise UserError(f"--chunk must be at least 1, not {chunk}")
    if not 0 <= decode < tokens:
        raise UserError(f"--decode must be from 0 to --tokens - 1 ({tokens - 1}), not {decode}")


def describe(t: dict) -> str:
    """The cosine part of a dtype's thresholds, in words."""
    if t["cosine_min"] is None:
        return f"mean cosine >= {t['cosine_mean']} (the worst position is not judged)"
    return f"cosine >= {t['cosine_min']} at every position"


def format_parity(name: str, p: Parity) -> str:
    t, bad = p.thresholds, p.first_bad_layer()
    lines = [f"parity of {name}: {p.backend} in {p.dtype} against the CPU in float32, "
             f"{p.tokens} random tokens",
             "", "each layer given the CPU's input to it:",
             f"{'layer':>5}  {'cosine min':>10}  {'mean':>10}  {'experts alike':>13}"]
    for x in p.layers:
        flag = "  <- first to diverge" if x.layer == bad else ""
        lines.append(f"{x.layer:>5}  {x.cosine_min:>10.6f}  {x.cosine_mean:>10.6f}  "
                     f"{x.experts_same:>12.1%}{flag}")
    judged = (f"; argmax >= {t['argmax']:.0%}" if t["logits"]
              else "; the free-running logits are reported, not judged")
    lines += ["", f"logits of a free run: cosine min {p.logits_cosine_min:.6f}, mean "
              f"{p.logits_cosine_mean:.6f}; argmax agrees at {p.argmax_agree:.1%} of positions",
              f"thresholds for {p.dtype}: {describe(t)}, experts alike >= "
              f"{t['experts_same']:.0%}{judged}"]
    fails = p.failures()
    lines.append("parity: ok" if not fails else "parity: FAILED: " + "; ".join(fails))
    return "\n".join(lines)
