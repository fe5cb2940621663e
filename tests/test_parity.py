"""`bench parity` (bench/parity.py): a model against the CPU in float32, layer by layer.

Here the default device is the CPU too, so a healthy model agrees exactly; faults
are injected into one layer of the model under test to show the command finds
them, names that layer, and exits non-zero."""

import json

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten

from bench.cli import main as bench_main
from bench.models import build_synthetic, model_config
from bench.parity import cast, compare, models_for, random_tokens, trace
from mobilemoe_mlx.model.mobilemoe import split_at
from mobilemoe_mlx.model.runtime import current as current_runtime

LAYERS = 4


def _bench(*args):
    return CliRunner().invoke(bench_main, [str(a) for a in args])


@pytest.fixture()
def pair():
    """Two copies of one 4-layer tiny model (same seed), and a prompt."""
    config = {**model_config("tiny"), "num_hidden_layers": LAYERS}
    config["no_rope_layers"] = [1] * LAYERS
    config["layer_types"] = ["full_attention"] * LAYERS
    model, reference = (build_synthetic("tiny", "float32", seed=3, config=config,
                                        fuse=True).model for _ in range(2))
    return model, reference, random_tokens(config["vocab_size"], 24, seed=1)


def test_healthy_model_agrees_exactly(pair):
    model, reference, tokens = pair
    p = compare(model, reference, tokens, chunk=8, decode=4)
    assert [x.cosine_min for x in p.layers] == pytest.approx([1.0] * LAYERS, abs=1e-7)
    assert all(x.experts_same == 1.0 for x in p.layers)
    assert p.argmax_agree == 1.0 and not p.failures() and p.first_bad_layer() is None


@pytest.mark.parametrize("layer", [1, 2])
def test_a_fault_in_one_layer_is_named(pair, layer):
    model, reference, tokens = pair
    norm = model.layers[layer].post_attention_layernorm
    norm.weight = norm.weight * 1.05  # what a wrong kernel in that layer's MoE might do
    p = compare(model, reference, tokens, chunk=8, decode=4)
    assert p.first_bad_layer() == layer
    # Every other layer is given the reference's input, so only the faulty one errs.
    assert [x.layer for x in p.layers if x.cosine_min < 0.9999] == [layer]
    assert p.failures()[0].startswith(f"layer {layer} is the first to diverge")


def test_half_precision_is_judged_on_means_and_still_finds_a_fault(pair):
    model, reference, tokens = pair
    cast(model, "float16")
    healthy = compare(model, reference, tokens, chunk=8, decode=4)
    assert healthy.dtype == "float16" and not healthy.failures()
    norm = model.layers[2].post_attention_layernorm
    norm.weight = -norm.weight  # a sign error in one layer's kernel
    p = compare(model, reference, tokens, chunk=8, decode=4)
    assert p.first_bad_layer() == 2 and p.failures()


def test_nan_is_a_failure_not_a_pass(pair):
    # NaN compares false with everything: a `<` test would let it through.
    model, reference, tokens = pair
    norm = model.layers[2].input_layernorm
    norm.weight = mx.full(norm.weight.shape, float("nan"))
    p = compare(model, reference, tokens, chunk=8, decode=4)
    assert p.first_bad_layer() == 2 and p.failures()
    d = p.to_dict()
    assert d["ok"] is False and d["layers"][2]["cosine_min"] is None
    json.dumps(d, allow_nan=False)  # valid JSON


def test_trace_takes_the_chunked_and_the_decode_paths(pair):
    # Feeding the prompt in chunks and then one token at a time through the KV
    # cache gives the logits of one full forward pass.
    model, _, tokens = pair
    t = trace(model, tokens, chunk=5, decode=6)
    full = np.array(model(mx.array(tokens)[None])[0])
    np.testing.assert_allclose(t.logits, full, rtol=1e-4, atol=1e-4)
    assert all(e.shape == (len(tokens), 2) for e in t.experts)
    # Each layer was given the one before's output.
    for before, after in zip(t.outputs, t.inputs[1:]):
        np.testing.assert_array_equal(before, after)


def test_forced_inputs_replace_the_previous_layers_output(pair):
    model, _, tokens = pair
    free = trace(model, tokens, chunk=8, decode=4)
    noise = [x + np.random.default_rng(i).normal(0, 0.1, x.shape).astype(np.float32)
             for i, x in enumerate(free.inputs)]
    forced = trace(model, tokens, chunk=8, decode=4, forced=noise)
    for given, want in zip(forced.inputs, noise):
        np.testing.assert_array_equal(given, want)
    again = trace(model, tokens, chunk=8, decode=4, forced=free.inputs)
    for a, b in zip(again.outputs, free.outputs):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_a_zero_output_is_not_a_match():
    # A kernel that writes nothing must not score cosine 1 against a real output.
    from bench.parity import _cosines

    ones, zeros = np.ones((2, 4)), np.zeros((2, 4))
    assert list(_cosines(zeros, ones)) == [0.0, 0.0]
    assert list(_cosines(ones, zeros)) == [0.0, 0.0]
    assert list(_cosines(zeros, zeros)) == [1.0, 1.0]


def test_split_at_gives_the_views_mx_split_gives():
    a = mx.arange(2 * 20 * 3 * 8).reshape(2, 3, 20, 8).transpose(0, 2, 1, 3)
    for axis, index in ((1, 16), (-1, 4), (2, 1)):
        want = mx.split(a, [index], axis=axis)
        got = split_at(a, index, axis)
        for w, g in zip(want, got):
            assert w.shape == g.shape and mx.array_equal(w, g).item()


def test_cli_reports_every_layer_and_passes(tmp_path):
    r = _bench("parity", "--model", "tiny", "--tokens", "20", "--chunk", "8", "--decode", "3")
    assert r.exit_code == 0, r.output
    assert "parity: ok" in r.output and "against the CPU in float32" in r.output
    rows = [ln for ln in r.output.splitlines() if ln.strip()[:1].isdigit()]
    assert len(rows) == model_config("tiny")["num_hidden_layers"]
    r = _bench("parity", "--model", "tiny", "--tokens", "20", "--json", "--dtype", "float16")
    d = json.loads(r.output)
    assert r.exit_code == 0 and d["dtype"] == "float16" and d["ok"] is True
    assert 0.99 < d["logits_cosine_min"] < 1.0  # float16 rounds: close, not equal


def test_cli_parity_of_a_converted_directory(synthetic_tiny):
    r = _bench("parity", "--model", synthetic_tiny, "--tokens", "12", "--decode", "2")
    assert r.exit_code == 0 and "parity: ok" in r.output, r.output
    r = _bench("parity", "--model", synthetic_tiny, "--layers", "1")
    assert r.exit_code == 2 and "--layers applies to a preset" in r.output


def test_cli_layers_keeps_that_many_of_a_presets_layers():
    r = _bench("parity", "--model", "tiny", "--layers", "1", "--tokens", "8", "--decode", "2")
    rows = [ln for ln in r.output.splitlines() if ln.strip()[:1].isdigit()]
    assert r.exit_code == 0 and len(rows) == 1


@pytest.mark.parametrize("args,says", [
    (["--tokens", "1"], "--tokens must be at least 2"),
    (["--chunk", "0"], "--chunk must be at least 1"),
    (["--tokens", "8", "--decode", "8"], "--decode must be from 0 to --tokens - 1"),
    (["--decode", "-1"], "--decode must be from 0"),
    (["--seed", "-1"], "--seed must be 0 or more"),
    (["--model", "nowhere/at-all"], "--model nowhere/at-all: no such directory"),
    (["--layers", "0"], "--layers must be from 1 to tiny's 2, not 0"),
    (["--layers", "3"], "--layers must be from 1 to tiny's 2, not 3"),
])
def test_cli_refuses_bad_settings_in_one_line(args, says):
    r = _bench("parity", *args)
    assert r.exit_code == 2 and says in r.output and "Traceback" not in r.output


def test_cli_exits_3_when_parity_fails(monkeypatch):
    # Thresholds no run can meet stand in for a backend that disagrees: the answer
    # is exit code 3, apart from 1 (an internal error) and 2 (bad input).
    from bench import parity

    strict = dict(parity.THRESHOLDS["float32"], cosine_min=1.5, cosine_mean=1.5)
    monkeypatch.setitem(parity.THRESHOLDS, "float32", strict)
    r = _bench("parity", "--model", "tiny", "--tokens", "8", "--decode", "2")
    assert r.exit_code == 3 and "parity: FAILED: layer 0 is the first to diverge" in r.output


def _bits(model) -> dict:
    """Every parameter as (dtype, shape, raw bytes): equal only if bit for bit equal."""
    return {k: (v.dtype, v.shape, np.array(v.view(mx.uint8)).tobytes())
            for k, v in tree_flatten(model.parameters())}


def _recording(monkeypatch, name, model_of):
    """Wrap bench.parity's builder or loader `name`: each call's model's bits
    (_bits), as it was made, before anything else touches it."""
    import bench.parity

    made, real = [], getattr(bench.parity, name)

    def record(*args, **kwargs):
        result = real(*args, **kwargs)
        made.append(_bits(model_of(result)))
        return result

    monkeypatch.setattr(bench.parity, name, record)
    return made


@pytest.mark.parametrize("dtype", [None, "float32", "float16"])
def test_a_presets_weights_are_built_once_and_copied_bit_for_bit(monkeypatch, dtype):
    builds = _recording(monkeypatch, "build_synthetic", lambda built: built.model)
    model, reference = models_for("tiny", dtype, seed=7, layers=2)
    # One build; the reference is that build bit for bit, and the model under
    # test its cast (to this backend's dtype when none is given).
    assert len(builds) == 1 and _bits(reference) == builds[0]
    # Two models (trace() swaps a model's layers), none of their arrays shared.
    assert model.model.layers[0] is not reference.model.layers[0]
    assert not {id(v) for _, v in tree_flatten(model.parameters())} & \
        {id(v) for _, v in tree_flatten(reference.parameters())}
    cast(reference, dtype or current_runtime().compute_dtype)
    assert _bits(model) == _bits(reference)


def test_a_converted_directory_is_loaded_once_and_copied_bit_for_bit(monkeypatch,
                                                                      synthetic_tiny):
    loads = _recording(monkeypatch, "load_converted", lambda loaded: loaded[0])
    model, reference = models_for(str(synthetic_tiny), None, seed=0)
    assert len(loads) == 1 and _bits(reference) == _bits(model) == loads[0]
    assert model.model.layers[0] is not reference.model.layers[0]
