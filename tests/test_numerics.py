"""The converted MLX model against an independent NumPy float64 reference
(tests/reference.py, written from docs/architecture.md alone) on tiny checkpoints in every
released layout.

Bounds: cosine >= 0.99999 and max|a - b| / max|b| <= 1e-4 where the MLX
weights hold exactly the checkpoint's values (float32 runs); cosine >= 0.99
where the converter quantizes bf16 weights to INT4 itself.
"""

import mlx.core as mx
import numpy as np
import pytest
import reference as ref
from mlx_lm.models.cache import make_prompt_cache

from mobilemoe_mlx.checkpoints import packing

COS_EXACT, REL_EXACT = 0.99999, 1e-4
COS_INT4 = 0.99


def logits_of(model, tokens: np.ndarray) -> np.ndarray:
    out = model(mx.array(tokens))
    mx.eval(out)
    assert out.dtype == mx.float32
    return np.array(out).astype(np.float64)


def assert_close(got: np.ndarray, want: np.ndarray, label: str,
                 cos_min: float = COS_EXACT, rel_max: float = REL_EXACT):
    assert got.shape == want.shape, (got.shape, want.shape)
    assert np.isfinite(got).all(), f"{label}: non-finite logits"
    cos, rel = ref.cosine(got, want), ref.rel_err(got, want)
    print(f"\n[{label}] cosine={cos:.9f} rel_err={rel:.3e}")
    assert cos >= cos_min and rel <= rel_max, f"{label}: cosine {cos:.9f}, rel err {rel:.3e}"


def quantizable_paths(config: dict):
    """MLX module paths of every weight that is (or could be) quantized,
    mapped to their bf16-checkpoint names."""
    out = {"model.embed_tokens": "model.embed_tokens.weight"}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        for proj in ("q", "k", "v", "o"):
            out[f"{p}.self_attn.{proj}_proj"] = f"{p}.self_attn.{proj}_proj.weight"
        for proj in ("gate", "up", "down"):
            out[f"{p}.feed_forward.shared_expert.{proj}_proj"] = (
                f"{p}.feed_forward.shared_expert.{proj}_proj.weight")
        for proj in ("gate_up", "down"):
            out[f"{p}.feed_forward.experts.{proj}_proj"] = f"{p}.feed_forward.experts.{proj}_proj"
    return out


def plain_paths(config: dict):
    """MLX parameter names of the unquantized tensors -> checkpoint names."""
    out = {"model.norm.weight": "model.norm.weight"}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        for n in ("input_layernorm.weight", "post_attention_layernorm.weight",
                  "feed_forward.router.weight", "feed_forward.expert_bias"):
            out[f"{p}.{n}"] = f"{p}.{n}"
    return out


# --- the reference's own INT4 helpers, against docs/architecture.md's byte layout ---

def test_reference_int4_packing_follows_the_spec():
    # even index in the low nibble, two's complement: (1, -1) -> 0xF1, (-8, 7) -> 0x78
    assert ref.pack_int4(np.array([1, -1, -8, 7])).tolist() == [0xF1, 0x78]
    rng = np.random.default_rng(0)
    q = rng.integers(-8, 8, (3, 5, 64))
    assert np.array_equal(ref.unpack_int4(ref.pack_int4(q)), q)
    every_byte = np.arange(256, dtype=np.uint8)[None]
    assert np.array_equal(ref.pack_int4(ref.unpack_int4(every_byte)), every_byte)


def test_package_unpacks_every_byte_like_the_reference():
    every_byte = np.arange(256, dtype=np.uint8).reshape(8, 32)
    got = np.array(packing.unpack_qat(mx.array(every_byte)))
    assert np.array_equal(got, ref.unpack_int4(every_byte))


# --- QAT -> MLX, INT4 carried over ---

def test_qat_int4_logits_match_reference(qat_int4, tokens, reference_logits):
    want = reference_logits(qat_int4.source, tokens)
    assert_close(logits_of(qat_int4.model(), tokens), want, "qat->int4")


def test_qat_int4_weights_are_bit_exact(qat_int4):
    ckpt = qat_int4.source
    weights = qat_int4.weights()
    q = qat_int4.config["quantization"]
    assert (q["group_size"], q["bits"]) == (32, 4)
    assert qat_int4.report["bit_exact_int4"] is True
    paths = quantizable_paths(ckpt.config)
    assert set(paths.values()) == set(ckpt.qat)  # the fixture quantized exactly these
    quantized = {k[: -len(".scales")] for k in weights if k.endswith(".scales")}
    assert quantized == set(paths)
    for path, name in paths.items():
        w, s, b = (weights[f"{path}.{r}"] for r in ("weight", "scales", "biases"))
        assert w.dtype == mx.uint32 and s.dtype == mx.float32 and b.dtype == mx.float32
        want = ckpt.weights[name]  # q * scale
        deq = mx.dequantize(w, s, b, group_size=32, bits=4)
        assert deq.shape == want.shape, (path, deq.shape, want.shape)
        assert np.array_equal(np.array(deq).astype(np.float64), want), path
        # and by a NumPy reading of MLX's packing, independent of mx.dequantize
        assert np.array_equal(ref.dequantize_mlx(np.array(w), np.array(s), np.array(b)), want), path
    for mlx_name, name in plain_paths(ckpt.config).items():
        got = weights[mlx_name]
        assert got.dtype == mx.float32, mlx_name
        assert np.array_equal(np.array(got).astype(np.float64), ckpt.weights[name]), mlx_name
    assert not any(".router.scales" in k or ".expert_bias." in k for k in weights)
    assert len(weights) == 3 * len(paths) + len(plain_paths(ckpt.config))


def test_qat_float16_keeps_scales_bit_exact_and_router_float32(converted, qat_ckpt):
    conv = converted(qat_ckpt, "qat_fp16", dtype="float16")
    weights = conv.weights()
    for path, name in quantizable_paths(qat_ckpt.config).items():
        s, b = weights[f"{path}.scales"], weights[f"{path}.biases"]
        assert s.dtype == mx.float16 and b.dtype == mx.float16
        scale = qat_ckpt.qat[name][1]
        assert np.array_equal(np.array(s), scale), path
        assert np.array_equal(np.array(b).astype(np.float64), -8 * scale.astype(np.float64)), path
    for i in range(qat_ckpt.config["num_hidden_layers"]):
        p = f"model.layers.{i}.feed_forward"
        for n in (f"{p}.router.weight", f"{p}.expert_bias"):
            assert weights[n].dtype == mx.float32, n
            assert np.array_equal(np.array(weights[n]).astype(np.float64), qat_ckpt.weights[n])


def test_qat_float16_model_is_close_to_reference(converted, qat_ckpt, tokens, reference_logits):
    # Half-precision compute rounds q * scale and the activations: close, not exact.
    model = converted(qat_ckpt, "qat_fp16", dtype="float16").model()
    out = model(mx.array(tokens))
    mx.eval(out)
    got = np.array(out.astype(mx.float32)).astype(np.float64)
    want = reference_logits(qat_ckpt, tokens)
    per_token = np.array([ref.cosine(got[b, i], want[b, i])
                          for b in range(got.shape[0]) for i in range(got.shape[1])])
    print(f"\n[qat->int4, float16 compute] cosine={ref.cosine(got, want):.6f}, "
          f"tokens below 0.9999: {(per_token < 0.9999).sum()} of {per_token.size}")
    # Most tokens agree closely; rounding may flip a near-tied top-k choice for a
    # token or two, which moves that token's logits a lot (routing is discrete).
    assert (per_token >= 0.9999).sum() >= per_token.size - 2
    assert ref.cosine(got, want) >= 0.99


def test_qat_dense_weights_equal_q_times_scale(qat_dense, tokens, reference_logits):
    weights = qat_dense.weights()
    assert not any(k.endswith(".scales") for k in weights)
    for path, name in quantizable_paths(qat_dense.source.config).items():
        got = weights[f"{path}.weight"]
        assert got.dtype == mx.float32
        assert np.array_equal(np.array(got).astype(np.float64), qat_dense.source.weights[name]), path
    want = reference_logits(qat_dense.source, tokens)
    assert_close(logits_of(qat_dense.model(), tokens), want, "qat->float32")


# --- bf16 -> MLX float32 ---

def test_bf16_dense_logits_match_reference(bf16_dense, tokens, reference_logits):
    want = reference_logits(bf16_dense.source, tokens)
    assert_close(logits_of(bf16_dense.model(), tokens), want, "bf16->float32")


@pytest.mark.parametrize("variant", ref.VARIANTS)
def test_bounds_tell_apart_each_misreading_of_the_spec(variant, bf16_dense, tokens,
                                                       reference_logits):
    """The model must NOT match a reference that gets one detail wrong: shows the
    bounds above are tight enough to catch each such mistake."""
    wrong = reference_logits(bf16_dense.source, tokens, variant)
    got = logits_of(bf16_dense.model(), tokens)
    cos, rel = ref.cosine(got, wrong), ref.rel_err(got, wrong)
    print(f"\n[{variant}] cosine={cos:.9f} rel_err={rel:.3e}")
    assert cos < COS_EXACT or rel > REL_EXACT * 10, (variant, cos, rel)


@pytest.mark.parametrize("layout", ["per_expert_ckpt", "pickle_model_ckpt",
                                    "pickle_state_dict_ckpt", "sharded_ckpt"])
def test_other_bf16_layouts_give_the_same_model(layout, request, converted, bf16_dense,
                                                tokens, reference_logits):
    ckpt = request.getfixturevalue(layout)
    conv = converted(ckpt, layout, quantize=False)
    got, fused = conv.weights(), bf16_dense.weights()
    assert set(got) == set(fused)
    for k in fused:
        assert got[k].dtype == fused[k].dtype, k
        assert np.array_equal(np.array(got[k]), np.array(fused[k])), k
    want = reference_logits(ckpt, tokens)
    assert_close(logits_of(conv.model(), tokens), want, f"{layout}->float32")


# --- bf16 -> INT4 g32 by the converter ---

def test_bf16_int4_logits_close_to_reference(bf16_int4, tokens, reference_logits):
    want = reference_logits(bf16_int4.source, tokens)
    assert_close(logits_of(bf16_int4.model(), tokens), want, "bf16->int4 g32",
                 cos_min=COS_INT4, rel_max=np.inf)


def test_bf16_int4_reported_errors_are_the_real_errors(bf16_int4):
    ckpt = bf16_int4.source
    reported = bf16_int4.report["max_abs_quantization_error"]
    paths = quantizable_paths(ckpt.config)
    assert set(reported) == set(paths)
    weights = bf16_int4.weights()
    for path, name in paths.items():
        w, s, b = (np.array(weights[f"{path}.{r}"]) for r in ("weight", "scales", "biases"))
        original = ckpt.weights[name]
        restored = ref.dequantize_mlx(w, s, b)
        assert restored.shape == original.shape, path
        err = np.abs(restored - original).max()
        assert reported[path] == pytest.approx(err, rel=1e-5, abs=1e-9), path
        # and within half a step of its group: these weights lie on an INT4 grid
        # (tests/checkpoints.py), which MLX's min/max affine grid then contains
        per_group = np.abs(restored - original).reshape(s.shape + (32,)).max(-1)
        assert (per_group <= np.abs(s.astype(np.float64)) * 0.5 * (1 + 1e-5) + 1e-9).all(), path
        assert err > 0, path


def test_quantize_in_row_chunks_equals_one_pass_and_reports_its_error():
    """packing.quantize works through rows in chunks on big tensors; the tiny
    checkpoints fit one chunk, so force uneven chunks here."""
    rng = np.random.default_rng(3)
    w = rng.normal(0, 0.1, (3, 40, 64)).astype(np.float32)
    one = packing.quantize(mx.array(w), 32, 4, mx.float32)
    chunked = packing.quantize(mx.array(w), 32, 4, mx.float32, chunk_elements=7 * 64)
    for a, b in zip(one[:3], chunked[:3]):
        assert a.shape == b.shape and np.array_equal(np.array(a), np.array(b))
    words, scales, biases = (np.array(a) for a in chunked[:3])
    assert words.shape == (3, 40, 8) and scales.shape == (3, 40, 2)
    restored = ref.dequantize_mlx(words, scales, biases)
    err = np.abs(restored - w).max()
    assert float(chunked[3]) == pytest.approx(err, rel=1e-5)
    assert float(one[3]) == pytest.approx(err, rel=1e-5)
    # (no half-step bound here: MLX keeps 0 on the grid, so on generic data a
    # group's far end may be clipped by more than half a step)
    assert 0 < err < 0.1


# --- mlx-lm's KV cache, batching and expert dispatch ---

@pytest.mark.parametrize("conv", ["qat_int4", "bf16_dense"])
def test_incremental_decode_with_kv_cache_equals_full_forward(conv, request, tokens):
    conv = request.getfixturevalue(conv)
    model = conv.model()
    full = logits_of(model, tokens)
    cache = make_prompt_cache(model)
    # a 6-token prompt, a 5-token chunk (multi-token with an offset), then one at a time
    cuts = [0, 6, 11] + list(range(12, tokens.shape[1] + 1))
    steps = [logits_of_cached(model, tokens[:, a:b], cache) for a, b in zip(cuts, cuts[1:])]
    assert cache[0].offset == tokens.shape[1]
    assert_close(np.concatenate(steps, axis=1), full, f"{conv.path.name} kv-cache decode")


def logits_of_cached(model, chunk, cache):
    out = model(mx.array(chunk), cache=cache)
    mx.eval(out)
    return np.array(out).astype(np.float64)


@pytest.mark.parametrize("conv", ["qat_int4", "bf16_dense"])
def test_batch_of_two_equals_two_batches_of_one(conv, request, tokens):
    conv = request.getfixturevalue(conv)
    model = conv.model()
    both = logits_of(model, tokens)
    one = np.concatenate([logits_of(model, tokens[i:i + 1]) for i in range(len(tokens))])
    assert_close(both, one, f"{conv.path.name} batch 2 vs 2x1")


@pytest.mark.parametrize("conv", ["qat_int4", "bf16_dense", "bf16_int4"])
def test_sorted_and_unsorted_expert_dispatch_agree(conv, request, tokens):
    conv = request.getfixturevalue(conv)
    model = conv.model()
    experts = [layer.feed_forward.experts for layer in model.layers]

    def run(threshold):
        for e in experts:
            assert hasattr(e, "sort_threshold")
            e.sort_threshold = threshold
        return logits_of(model, tokens)

    sorted_, unsorted = run(0), run(10**9)
    assert_close(sorted_, unsorted, f"{conv.path.name} sorted vs unsorted")
    # one token at a time too (decode shapes), sorted
    cache = make_prompt_cache(model)
    run(0)
    steps = [logits_of_cached(model, tokens[:, t:t + 1], cache) for t in range(4)]
    assert_close(np.concatenate(steps, axis=1), unsorted[:, :4], f"{conv.path.name} sorted decode")
