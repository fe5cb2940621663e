"""The compiled decode step (model/mobilemoe.py, `Model.__call__`): one-token steps through
mlx-lm's KVCache run as one compiled function over the whole cache buffers.

It must give the float64 reference's logits (tests/reference.py) and the plain
path's, across a growth of the buffers, report the experts it chose to
recorders, and leave every other case to the plain path.
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import reference as ref
from mlx_lm.models.cache import RotatingKVCache, make_prompt_cache
from test_numerics import assert_close

from bench.steps import graph_primitives, kernel_nodes
from mobilemoe_mlx.model.routing import ExpertRecorder

# Only the compiled step writes the cache at an array offset; the plain path's
# KVCache writes at Python ints (SliceUpdate).
COMPILED_MARK = "DynamicSliceUpdate"


def decode_one_by_one(model, tokens: np.ndarray, prompt: int, compiled: bool):
    """Logits [B, T - prompt, V] of tokens[:, prompt:], fed one at a time
    after a `prompt`-token prefill, and whether each step was compiled."""
    model.args.compiled_decode = compiled
    try:
        cache = make_prompt_cache(model)
        mx.eval(model(mx.array(tokens[:, :prompt]), cache=cache))
        logits, marks = [], []
        for t in range(prompt, tokens.shape[1]):
            out = model(mx.array(tokens[:, t:t + 1]), cache=cache)
            marks.append(COMPILED_MARK in graph_primitives(out))
            mx.eval(out)
            logits.append(np.array(out).astype(np.float64))
        assert cache[0].offset == tokens.shape[1]
        return np.concatenate(logits, axis=1), marks
    finally:
        model.args.compiled_decode = True


def test_compiled_steps_match_the_reference(qat_int4, tokens, reference_logits):
    model = qat_int4.model()
    got, marks = decode_one_by_one(model, tokens, 6, compiled=True)
    assert all(marks), "every step after the prefill is the compiled one"
    want = reference_logits(qat_int4.source, tokens)[:, 6:]
    assert_close(got, want, "compiled decode vs float64 reference")


def test_compiled_steps_across_a_buffer_growth_equal_the_plain_path(qat_int4):
    """mlx-lm's KVCache grows its buffers 256 positions at a time: the step
    that must grow them takes the plain path, the next ones compile again
    for the new buffer size, and all of them agree with the reference."""
    model = qat_int4.model()
    rng = np.random.default_rng(7)
    toks = rng.integers(0, qat_int4.config["vocab_size"], (1, 260))
    compiled, marks = decode_one_by_one(model, toks, 250, compiled=True)
    plain, plain_marks = decode_one_by_one(model, toks, 250, compiled=False)
    assert not any(plain_marks)
    # positions 250..255 fill the first buffer; 256 grows it (plain); 257.. compile
    assert marks == [True] * 6 + [False] + [True] * 3, marks
    assert_close(compiled, plain, "compiled vs plain decode", cos_min=0.999999, rel_max=1e-5)
    gaps = []
    want = ref.forward(qat_int4.source.weights, qat_int4.source.config, toks, None, gaps)
    assert_close(compiled, want[:, 250:], "compiled decode past 256 vs reference")


def test_recorders_see_the_compiled_steps_choices(qat_int4, tokens):
    model = qat_int4.model()
    seen = {}
    for compiled in (True, False):
        recorder = ExpertRecorder(model)
        with recorder.record():
            decode_one_by_one(model, tokens, 6, compiled=compiled)
        seen[compiled] = recorder.choices()
        recorder.remove()
    n_steps = tokens.shape[1] - 6
    for layer_compiled, layer_plain in zip(seen[True], seen[False]):
        # the prefill's 2 x 6 rows, then 2 rows per step
        assert layer_compiled.shape == (2 * 6 + 2 * n_steps, model.args.num_experts_per_tok)
        np.testing.assert_array_equal(np.sort(layer_compiled, -1), np.sort(layer_plain, -1))
    assert not any(ff.observers for ff in (layer.feed_forward for layer in model.layers))


class _LayerProbe(nn.Module):
    """A layer wrapped as bench parity's taps wrap them: called at every step."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0

    def __call__(self, x, *args, **kwargs):
        self.calls += 1
        return self.inner(x, *args, **kwargs)


@pytest.mark.parametrize("case", ["rotating cache", "wrapped layer", "uneven offsets",
                                  "switched off"])
def test_other_cases_take_the_plain_path(qat_int4, tokens, case):
    model = qat_int4.model()
    # chat's --max-kv-size: a rotating cache, which the compiled step does not know
    cache = make_prompt_cache(model, max_kv_size=64 if case == "rotating cache" else None)
    mx.eval(model(mx.array(tokens[:, :6]), cache=cache))
    if case == "rotating cache":
        assert isinstance(cache[0], RotatingKVCache)
    elif case == "wrapped layer":
        inner = model.layers[0]
        model.layers[0] = _LayerProbe(inner)
    elif case == "uneven offsets":
        cache[1].offset -= 1
    else:
        model.args.compiled_decode = False
    out = model(mx.array(tokens[:, 6:7]), cache=cache)
    assert COMPILED_MARK not in graph_primitives(out)
    if case == "wrapped layer":
        assert model.layers[0].calls == 1


def test_compiled_step_launches_fewer_kernels(qat_int4, tokens):
    """The same step, compiled and plain: the elementwise work between matmuls
    fuses, so fewer nodes launch a kernel (counted on this backend's graph)."""
    model = qat_int4.model()
    counts = {}
    for compiled in (True, False):
        model.args.compiled_decode = compiled
        cache = make_prompt_cache(model)
        mx.eval(model(mx.array(tokens[:, :6]), cache=cache))
        counts[compiled] = kernel_nodes(graph_primitives(model(mx.array(tokens[:, 6:7]), cache)))
    model.args.compiled_decode = True
    assert counts[True] < counts[False], counts


@pytest.mark.parametrize("change", ["load_weights", "apply"])
def test_weights_changed_after_a_compiled_step_are_used(qat_int4, tokens, change):
    """The compiled step holds the weights as constants: changing them
    through the model must drop it, or the next steps would use the old ones."""
    model = qat_int4.model()
    before, _ = decode_one_by_one(model, tokens, 6, compiled=True)
    if change == "load_weights":
        norm = model.model.norm.weight
        model.load_weights([("model.norm.weight", norm * 2.0 + 0.5)], strict=False)
    else:
        model.apply(lambda a: a * 1.01 if a.dtype == mx.float32 and a.ndim == 1 else a)
    after, marks = decode_one_by_one(model, tokens, 6, compiled=True)
    plain, _ = decode_one_by_one(model, tokens, 6, compiled=False)
    assert all(marks)
    assert not np.allclose(after, before, rtol=1e-3)
    assert_close(after, plain, "compiled after a weight change vs plain", cos_min=0.999999,
                 rel_max=1e-5)
