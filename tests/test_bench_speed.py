"""The benchmark's decode loop, graph counts and mlx-lm peer (tiny shapes).

The loop must produce what mlx-lm's generate_step produces (it is the same
pipelined loop), the graph counter must see the fusion, and the glm4_moe peer
must be a working model with the same quantization as ours.
"""

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.models.switch_layers import QuantizedSwitchLinear

from bench import harness, steps
from bench.models import build_synthetic, model_config
from bench.tokens import prompt_tokens


@pytest.fixture(scope="module")
def tiny():
    return build_synthetic("tiny", seed=2, fuse=True)


@pytest.fixture(scope="module")
def peer():
    return build_synthetic("glm4-tiny", seed=2, fuse=True)


def filled(built, n=20):
    cache = make_prompt_cache(built.model)
    y = harness.prefill(built.model, prompt_tokens("real", n, built.config["vocab_size"]),
                        cache, step=8)
    return y, cache


@pytest.mark.parametrize("name", ["tiny", "peer"])
def test_decode_loop_gives_mlx_lm_greedy_tokens(name, request):
    built = request.getfixturevalue(name)
    prompt = prompt_tokens("real", 20, built.config["vocab_size"])
    want = [int(t) for t, _ in generate_step(prompt, built.model, max_tokens=6)]
    cache = make_prompt_cache(built.model)
    y = harness.prefill(built.model, prompt, cache, step=8)
    assert int(y.item()) == want[0]
    seconds, builds, tokens = steps.decode(built.model, y, cache, 5)
    assert tokens == want[1:]
    assert len(builds) == 5 and 0 < max(builds) and seconds > 0
    assert cache[0].offset == 20 + 5


def test_graph_nodes_count_what_is_left_to_run(tiny):
    y, cache = filled(tiny)
    assert steps.graph_nodes(y) == 0  # evaluated: nothing to run
    primitives, builds = steps.probe_step(tiny.model, y, cache, steps=2)
    assert sum(primitives.values()) > 10 * len(tiny.model.layers) and len(builds) == 2


def test_fusion_cuts_graph_nodes(tiny):
    """The same model, fused (as built) and unfused: fewer operations per decode step."""
    from mobilemoe_mlx.model import mobilemoe as moe

    unfused = moe.Model(moe.ModelArgs.from_dict(tiny.config))
    nn.quantize(unfused, group_size=32, bits=4,
                class_predicate=lambda p, m: hasattr(m, "to_quantized") and "router" not in p)
    mx.eval(unfused.parameters())
    counts = []
    for model in (tiny.model, unfused):
        built = type(tiny)(**{**tiny.__dict__, "model": model})
        y, cache = filled(built)
        counts.append(sum(steps.probe_step(model, y, cache, steps=1)[0].values()))
    fused, plain = counts
    layers = len(tiny.model.layers)
    # per layer at least: q/k/v 3 matmuls -> 1, one RoPE and one norm fewer
    assert plain - fused >= 4 * layers, counts


def test_peer_is_glm4_with_our_quantization(tiny, peer):
    from mlx_lm.models.glm4_moe import Model as Glm4

    assert isinstance(peer.model, Glm4) and peer.family == "peer"
    assert "glm4_moe" in peer.label and peer.config["peer"]["n_routed_experts"] == 8
    experts = peer.model.layers[0].mlp.switch_mlp.gate_proj
    assert isinstance(experts, QuantizedSwitchLinear)
    assert (experts.bits, experts.group_size) == (4, 32)
    assert isinstance(peer.model.lm_head, nn.QuantizedLinear)
    # same shape as ours: the same number of stored parameters within the tied head
    ours, theirs = (harness_weight_bytes(b.model) for b in (tiny, peer))
    head = tiny.config["vocab_size"] * tiny.config["hidden_size"]
    assert 0 < theirs - ours <= head  # only the untied head (and norms) differ


def harness_weight_bytes(model):
    from bench.models import weight_bytes

    return weight_bytes(model)


def test_peer_routing_spreads_over_experts(peer):
    """Random router weights (not zeros) so tokens pick different experts."""
    x = mx.random.normal((1, 64, peer.config["hidden_size"]), key=mx.random.key(0))
    inds, _ = peer.model.layers[0].mlp.gate(x)
    assert len(set(inds.flatten().tolist())) > peer.config["num_experts_per_tok"]


def test_peer_names_are_accepted():
    assert model_config("glm4-S")["peer"]["hidden_size"] == 768
    from mobilemoe_mlx.errors import UserError

    with pytest.raises(UserError):
        model_config("glm4-XL")
