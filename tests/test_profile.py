"""`bench profile` (bench/profile/): time by op kind and node counts of one
decode step and one prefill chunk.

The machine is shared, so no test asserts on a time beyond its sign; they check
the accounting (every second of a run in exactly one group), that timing
changes no result, which groups each model family has, and the node
classification against independent counts."""

import io
import json

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten

from bench.cli import main as bench_main
from bench.models import build_synthetic, instantiate, model_config
from bench.profile.clock import Clock, Timed, instrumented
from bench.profile.groups import (
    ABSENT,
    ATTENTION,
    DENSE,
    GROUPS,
    HEAD,
    MEASURED,
    NORMS,
    NOT_RUN,
    OTHER,
    ROUTED,
    ROUTER,
    SHARED,
    targets,
)
from bench.profile.measure import Stepper, profile_phase
from bench.steps import VIEW_PRIMITIVES, classify, graph_primitives


def _bench(*args):
    return CliRunner().invoke(bench_main, [str(a) for a in args])


@pytest.fixture(scope="module")
def tiny():
    return build_synthetic("tiny", "float32", seed=0, fuse=True).model


@pytest.fixture(scope="module")
def stepper(tiny):
    ids = np.random.default_rng(0).integers(0, tiny.args.vocab_size, 12).astype(np.int32)
    return Stepper(tiny, ids, 0, fill_step=8)


def _rectangles(*arrays):
    """Nodes of the graph as MLX draws them, counted apart from bench's parser."""
    dot = io.StringIO()
    mx.export_to_dot(dot, *arrays)
    return dot.getvalue().count("shape=rectangle")


def _numpy(tree):
    return [np.array(a) for _, a in tree_flatten(tree)]


def _wrappers(model):
    return [path for path, m in model.named_modules() if isinstance(m, Timed)]


def test_every_second_of_a_run_is_in_one_group(tiny, stepper):
    clock = Clock()
    for make in (stepper.decode, lambda: stepper.prefill([1, 2, 3, 4, 5])):
        with instrumented(tiny, clock, head=make is stepper.decode):
            run = clock.step(make())
        assert all(run.build[g] >= 0 and run.run[g] >= 0 for g in GROUPS)
        assert sum(run.total(g) for g in GROUPS) == pytest.approx(run.wall, rel=1e-9, abs=1e-12)
        layers = tiny.args.num_hidden_layers
        assert run.calls[ATTENTION] == run.calls[ROUTER] == run.calls[ROUTED] == layers
        assert run.calls[SHARED] == layers and run.calls[NORMS] == 3 * layers  # 2 norms, RoPE
    assert _wrappers(tiny) == []  # the model is as it was


def test_phase_reports_groups_and_their_sum(tiny, stepper):
    ph = profile_phase(tiny, stepper.decode, "decode", 1, 12, repeats=1, backend="CPU",
                       head=True)
    status = {g.group: g.status for g in ph.groups}
    assert status == {**{g: MEASURED for g in GROUPS}, DENSE: ABSENT}
    assert all(g.seconds >= 0 and 0 <= g.build_seconds for g in ph.groups)
    assert ph.instrumented_seconds == pytest.approx(sum(g.seconds for g in ph.groups))
    assert sum(ph.share(g) for g in ph.groups) == pytest.approx(1.0)
    assert ph.plain_seconds > 0 and ph.syncs > 0
    chunk = profile_phase(tiny, lambda: stepper.prefill([3] * 6), "prefill", 6, 12, repeats=1,
                          backend="CPU", head=False)
    # A prefill chunk evaluates the KV cache only: the logits are never computed.
    assert {g.group: g.status for g in chunk.groups}[HEAD] == NOT_RUN


def test_instrumented_results_equal_plain(tiny, stepper):
    mx.disable_compile()  # what the instrumented run does; the wrappers alone must change nothing
    try:
        plain = [np.array(stepper.decode()()), _numpy(stepper.prefill([7] * 5)())]
        clock = Clock()
        with instrumented(tiny, clock):
            timed = [np.array(clock.step(stepper.decode()).output)]
        with instrumented(tiny, clock, head=False):
            timed.append(_numpy(clock.step(stepper.prefill([7] * 5)).output))
    finally:
        mx.enable_compile()
    assert np.array_equal(plain[0], timed[0])
    assert all(np.array_equal(a, b) for a, b in zip(plain[1], timed[1]))
    # The logits themselves, not only their argmax.
    cache_a, cache_b, y = stepper.cache(), stepper.cache(), stepper.next_token[None]
    want = np.array(tiny(y, cache=cache_a))
    clock = Clock()
    with instrumented(tiny, clock):
        got = np.array(clock.step(lambda: tiny(y, cache=cache_b)).output)
    assert np.array_equal(want, got)


def test_a_wrapper_reads_through_to_its_module(tiny):
    attn = tiny.layers[0].self_attn
    timed = Timed(attn, ATTENTION, Clock())
    assert timed.n_heads == attn.n_heads and timed.inner is attn
    with pytest.raises(AttributeError):
        assert timed.no_such_attribute is None  # never reached: it raises


def test_wrappers_are_removed_when_the_step_fails(tiny):
    with pytest.raises(ZeroDivisionError):
        with instrumented(tiny, Clock()):
            assert _wrappers(tiny)
            raise ZeroDivisionError
    assert _wrappers(tiny) == []


@pytest.mark.parametrize("name, groups", [
    ("tiny", {ATTENTION, NORMS, ROUTER, ROUTED, SHARED, HEAD, OTHER}),
    ("pro-tiny", {ATTENTION, NORMS, DENSE, HEAD, OTHER}),
    ("glm4-tiny", {ATTENTION, NORMS, ROUTER, ROUTED, SHARED, HEAD, OTHER}),
])
def test_groups_each_family_has(name, groups):
    model = instantiate(model_config(name))  # lazy: nothing is computed
    found = {g for _, _, g in targets(model)}
    assert found == groups
    assert HEAD not in {g for _, _, g in targets(model, head=False)}
    if name == "glm4-tiny":  # its QK-norms and untied head are modules of their own
        names = {n for _, n, _ in targets(model)}
        assert {"q_norm", "k_norm", "lm_head", "switch_mlp", "shared_experts"} <= names


def test_views_are_not_counted_as_kernels():
    a, w, b = mx.ones((4, 6)), mx.ones((6, 6)), mx.ones((5,))
    mx.eval(a, w, b)
    out = mx.exp((a @ w).T.reshape(-1)[:5]) + b  # 3 kernels, 3 views, nothing implicit
    g = classify(graph_primitives(out), "CPU")
    assert dict(g.kernels) == {"Matmul": 1, "Exp": 1, "Add": 1}
    assert dict(g.views) == {"Transpose": 1, "Reshape": 1, "Slice": 1}
    assert g.nodes == _rectangles(out) == 6


def test_a_steps_node_counts_by_kind_sum_to_the_total(stepper):
    out = stepper.decode()()
    g = classify(graph_primitives(out), "CPU")
    assert g.nodes == _rectangles(out)
    assert not set(g.kernels) & VIEW_PRIMITIVES and set(g.views) <= VIEW_PRIMITIVES
    assert g.kernels["QuantizedMatmul"] > 0 and g.views
    d = g.to_dict()
    assert d["kernels"] + d["views"] == d["nodes"]
    assert sum(d["kernels_by_primitive"].values()) == d["kernels"]
    mx.eval(out)


def test_cli_on_a_preset_prints_a_table():
    r = _bench("profile", "--model", "tiny", "--context", "8", "--chunk", "4", "--repeats", "1")
    assert r.exit_code == 0, r.output
    for says in ("decode step: 1 token after 8", "prefill chunk: 4 tokens after 8",
                 "routed experts", "dense FFN", "absent", "not run", "graph:", "why:"):
        assert says in r.output


def test_cli_json_on_a_converted_directory(synthetic_tiny):
    r = _bench("profile", "--model", synthetic_tiny, "--context", "4", "--chunk", "0",
               "--repeats", "1", "--json")
    assert r.exit_code == 0, r.output
    p = json.loads(r.stdout)
    (decode,) = p["phases"]
    assert p["backend"] == "CPU" and decode["graph"]["backend"] == "CPU"
    assert [g["group"] for g in decode["groups"]] == list(GROUPS)
    assert all(g["ms"] >= 0 for g in decode["groups"])
    assert decode["graph"]["kernels"] + decode["graph"]["views"] == decode["graph"]["nodes"]


@pytest.mark.parametrize("args, says", [
    (["--model", "nonesuch"], "unknown model 'nonesuch'"),
    (["--model", "{tmp}"], "not a converted model directory"),
    (["--model", "tiny", "--context", "-1"], "--context must be 0 or more"),
    (["--model", "tiny", "--repeats", "0"], "--repeats must be at least 1"),
    (["--model", "tiny", "--context", "8190", "--chunk", "8"], "past the model's context"),
])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, args, says):
    r = _bench("profile", *[a.format(tmp=tmp_path) for a in args])
    assert r.exit_code == 2
    assert r.stderr.startswith("error:") and r.stderr.count("\n") == 1 and says in r.stderr
