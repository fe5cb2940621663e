"""The planner's working-memory estimate against a measured prefill peak at
the published width: MobileMoE-S cut to 2 layers (working memory is per
layer: layers run one after another), 8,192 prompt tokens in chunks of
PREFILL_CHUNK, float32 on MLX's CPU backend (which, unlike Metal's fused
attention, materialises each chunk's attention scores, as the estimate assumes).

Marked e2e: a real 8k prefill takes tens of seconds on a CPU.
"""

import mlx.core as mx
import pytest
from mlx_lm.models.cache import make_prompt_cache

from bench import harness
from bench.models import build_synthetic
from bench.tokens import prompt_tokens
from mobilemoe_mlx.checkpoints.config import preset_config
from mobilemoe_mlx.model.planner import PREFILL_CHUNK, plan


def test_prefill_chunk_keeps_s_at_8k_within_budget():
    """The chunk is the largest power of two the planner fits S at 8k in 1.1 GB (float16)."""
    s = preset_config("S")
    assert plan(s, 8192, chunk=PREFILL_CHUNK, budgets={})["total_bytes"] <= 1.1e9
    assert plan(s, 8192, chunk=2 * PREFILL_CHUNK, budgets={})["total_bytes"] > 1.1e9
    assert plan(s, 8192, budgets={})["prefill_chunk"] == PREFILL_CHUNK


@pytest.mark.e2e
def test_planner_bounds_a_measured_8k_prefill_at_full_width():
    config = preset_config("S")
    config.update(num_hidden_layers=2, no_rope_layers=[1, 1], layer_types=["full_attention"] * 2)
    built = build_synthetic("S", dtype="float32", config=config)
    tokens = prompt_tokens("random", 8192, config["vocab_size"])
    cache = make_prompt_cache(built.model)
    harness.start_phase()
    harness.prefill(built.model, tokens, cache, PREFILL_CHUNK)
    peak = mx.get_peak_memory()
    p = plan(config, 8192, dtype="float32", bits=4, group_size=32, budgets={})
    weights = sum(v.nbytes for v in _params(built.model))
    working = peak - weights - harness.cache_bytes(cache)
    print(f"\n[S, 2 layers, 8192 tokens, chunk {PREFILL_CHUNK}, CPU float32] peak {peak / 1e6:.1f} MB"
          f" = weights {weights / 1e6:.1f} + KV {harness.cache_bytes(cache) / 1e6:.1f}"
          f" + working {working / 1e6:.1f} MB; planner: working {p['working_bytes'] / 1e6:.1f},"
          f" total {p['total_bytes'] / 1e6:.1f} MB")
    assert peak <= p["total_bytes"]
    assert working <= p["working_bytes"]
    assert working > 0.5 * p["working_bytes"]  # an upper bound, not a loose one


def _params(model):
    from mlx.utils import tree_flatten

    return [v for _, v in tree_flatten(model.parameters())]
