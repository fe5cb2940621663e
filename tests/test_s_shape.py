"""Every path a GPU run takes, at MobileMoE-S's full published shape, against the
independent NumPy float64 reference (tests/reference.py), on MLX's CPU in float32.

The first GPU run agreed at the tiny shape and failed at S's (docs/parity.md), so
the CPU's answer at S's shape has to be shown right by itself before it can be
the referee of `bench parity`: fused and unfused projections, compiled and
uncompiled routing, sorted and unsorted expert dispatch, a chunked prefill and
one-token decode steps through the KV cache, and the 128,256-row quantized
embedding as the head. End-to-end tier: about a minute and 3 GB here.
"""

import mlx.core as mx
import numpy as np
import pytest
import reference as ref
from mlx_lm.models.cache import make_prompt_cache

from bench.models import build_synthetic

pytestmark = pytest.mark.e2e
TOKENS = 32  # x top-4 = 128 (token, expert) pairs: sorted dispatch, as in a prefill


class DequantizedWeights(dict):
    """The reference's float64 weights, under its names, dequantized from the
    MLX model's packed words by tests/reference.py on first use (one layer's
    experts at a time: all of S in float64 would take 10 GB)."""

    def __init__(self, params: dict):
        super().__init__()
        self.params = params

    def __missing__(self, name: str) -> np.ndarray:
        if name.endswith(("gate_up_proj", "down_proj")) and ".experts." in name:
            module, keep = name, False
        elif name.endswith(".weight") and f"{name[:-7]}.scales" in self.params:
            module, keep = name[:-7], name.startswith("model.embed_tokens")
        else:
            return np.array(self.params[name], dtype=np.float64)
        p = self.params
        w = ref.dequantize_mlx(np.array(p[f"{module}.weight"]), np.array(p[f"{module}.scales"]),
                               np.array(p[f"{module}.biases"]))
        if keep:
            self[name] = w
        return w


@pytest.fixture(scope="module")
def s_model():
    built = build_synthetic("S", "float32", seed=0, fuse=False)
    return built.model, built.config


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(0, 128256, size=TOKENS)


@pytest.fixture(scope="module")
def reference_logits(s_model, tokens):
    model, config = s_model
    from mlx.utils import tree_flatten

    weights = DequantizedWeights(dict(tree_flatten(model.parameters())))
    gaps = []
    logits = ref.forward(weights, config, tokens[None], gaps=gaps)[0]
    return logits, float(np.min(np.concatenate(gaps)))


def _full(model, tokens):
    return np.array(model(mx.array(tokens)[None])[0])


def _cached(model, tokens, chunk=16, decode=8):
    """Prefill in chunks through the KV cache, then one token at a time (decode)."""
    cache, out = make_prompt_cache(model), []
    cut = len(tokens) - decode
    pieces = [tokens[i:min(i + chunk, cut)] for i in range(0, cut, chunk)]
    for piece in pieces + [tokens[i:i + 1] for i in range(cut, len(tokens))]:
        out.append(np.array(model(mx.array(piece)[None], cache=cache)[0]))
    return np.concatenate(out)


def _uncompiled(model, tokens):
    mx.disable_compile()
    try:
        return _full(model, tokens)
    finally:
        mx.enable_compile()


def _unsorted(model, tokens):
    experts = [layer.feed_forward.experts for layer in model.layers]
    before = experts[0].sort_threshold
    for e in experts:
        e.sort_threshold = 1 << 30
    try:
        return _full(model, tokens)
    finally:
        for e in experts:
            e.sort_threshold = before


PATHS = {  # (fused?, how it runs); fusion is what loading does, so the variants run fused
    "unfused, compiled, sorted": (False, _full),
    "fused, compiled, sorted": (True, _full),
    "fused, uncompiled": (True, _uncompiled),
    "fused, unsorted": (True, _unsorted),
    "fused, chunked prefill + decode through the cache": (True, _cached),
}


@pytest.fixture(scope="module")
def mlx_logits(s_model, tokens, reference_logits):
    """Each path's logits [T, V]: the unfused ones first, then the model fused
    in place (Model.fuse_projections, as loading a directory does), after the reference has
    read the unfused weights."""
    model, _ = s_model
    out = {name: run(model, tokens) for name, (fused, run) in PATHS.items() if not fused}
    model.fuse_projections()
    assert model.layers[0].self_attn.is_fused()
    out.update({name: run(model, tokens) for name, (fused, run) in PATHS.items() if fused})
    return out


@pytest.mark.parametrize("path", list(PATHS))
def test_s_shape_path_matches_the_float64_reference(path, mlx_logits, reference_logits):
    want, gap = reference_logits
    got = mlx_logits[path]
    cos = [ref.cosine(g, w) for g, w in zip(got, want)]
    agree = float((got.argmax(-1) == want.argmax(-1)).mean())
    print(f"\n{path}: min cosine {min(cos):.7f}, argmax {agree:.0%}, "
          f"rel err {ref.rel_err(got, want):.2e}, smallest routing gap {gap:.1e}")
    assert min(cos) >= 0.9999 and agree == 1.0
