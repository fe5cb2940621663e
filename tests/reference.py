"""An independent NumPy float64 MobileMoE, written from docs/architecture.md
section 2 alone (it imports nothing from mobilemoe_mlx), plus NumPy helpers for
the released QAT INT4 packing (docs/architecture.md section 3).

Weights are plain float64 arrays under the bf16 checkpoint's names:
``model.embed_tokens.weight`` [V, d], ``model.layers.{i}.self_attn.{q,k,v,o}_proj.weight``
[out, in], ``feed_forward.router.weight`` [E, d], ``feed_forward.expert_bias`` [E],
``feed_forward.experts.gate_up_proj`` [E, d, 2I], ``feed_forward.experts.down_proj``
[E, I, d], ``feed_forward.shared_expert.{gate,up,down}_proj.weight``, the norms and
``model.norm.weight``.

``forward(..., variant=...)`` can also compute deliberately *wrong* models
(a plausible misreading of one line of docs/architecture.md each). The tests use them to
show that the tolerances they apply actually distinguish each detail.
"""

import math
from typing import Dict, Optional

import numpy as np

# Plausible misreadings of docs/architecture.md; each must be told apart by the tests.
VARIANTS = (
    "rope_half_split",        # rotate (i, i + hd/2) instead of interleaved (2i, 2i+1)
    "rope_no_llama3_scaling",  # ignore rope_scaling
    "no_qk_norm",              # skip the weightless per-head RMS norm
    "bias_ignored",            # select by scores only
    "bias_in_weights",         # weights from biased scores
    "softmax_router",          # softmax instead of sigmoid
    "no_routed_scaling",       # drop routed_scaling_factor
    "no_topk_renorm",          # weights not renormalised over the chosen experts
    "gate_up_swapped",         # first I columns taken as up, last I as gate
    "no_shared_expert",
    "attn_scale_sqrt_d",       # 1/sqrt(hidden) instead of 1/sqrt(head_dim)
)


def rms_norm(x: np.ndarray, weight: Optional[np.ndarray], eps: float) -> np.ndarray:
    y = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return y if weight is None else y * weight


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def rope_inv_freq(config: dict, scaled: bool = True) -> np.ndarray:
    """theta^(-2i/hd), divided by `factor` where the wavelength 2*pi/inv_freq
    exceeds original_max_position_embeddings (llama3 with equal low/high factors)."""
    hd = head_dim(config)
    inv = 1.0 / config["rope_theta"] ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
    rs = config.get("rope_scaling") or config.get("rope_parameters")
    if scaled and rs:
        assert rs.get("rope_type", rs.get("type")) == "llama3"
        assert rs.get("low_freq_factor", 1.0) == rs.get("high_freq_factor", 1.0)
        wavelen = 2 * math.pi / inv
        inv = np.where(wavelen > rs["original_max_position_embeddings"], inv / rs["factor"], inv)
    return inv


def apply_rope(x: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray,
               interleaved: bool = True) -> np.ndarray:
    """x: [B, H, T, hd]; rotates pairs by positions * inv_freq."""
    ang = positions[:, None].astype(np.float64) * inv_freq[None, :]  # [T, hd/2]
    cos, sin = np.cos(ang), np.sin(ang)
    out = np.empty_like(x)
    if interleaved:
        a, b = x[..., 0::2], x[..., 1::2]
        out[..., 0::2] = a * cos - b * sin
        out[..., 1::2] = a * sin + b * cos
    else:
        h = x.shape[-1] // 2
        a, b = x[..., :h], x[..., h:]
        out[..., :h] = a * cos - b * sin
        out[..., h:] = a * sin + b * cos
    return out


def attention(w: Dict[str, np.ndarray], p: str, a: np.ndarray, config: dict,
              positions: np.ndarray, variant: Optional[str]) -> np.ndarray:
    B, T, _ = a.shape
    H, Hkv, hd = config["num_attention_heads"], config["num_key_value_heads"], head_dim(config)
    eps = config["rms_norm_eps"]
    q = (a @ w[f"{p}.self_attn.q_proj.weight"].T).reshape(B, T, H, hd).transpose(0, 2, 1, 3)
    k = (a @ w[f"{p}.self_attn.k_proj.weight"].T).reshape(B, T, Hkv, hd).transpose(0, 2, 1, 3)
    v = (a @ w[f"{p}.self_attn.v_proj.weight"].T).reshape(B, T, Hkv, hd).transpose(0, 2, 1, 3)
    inv = rope_inv_freq(config, scaled=variant != "rope_no_llama3_scaling")
    interleaved = variant != "rope_half_split"
    q = apply_rope(q, positions, inv, interleaved)
    k = apply_rope(k, positions, inv, interleaved)
    if variant != "no_qk_norm":
        q = rms_norm(q, None, eps)
        k = rms_norm(k, None, eps)
    # GQA: query head h reads KV head h // (H / Hkv).
    rep = H // Hkv
    k = np.repeat(k, rep, axis=1)
    v = np.repeat(v, rep, axis=1)
    scale = 1 / math.sqrt(config["hidden_size"] if variant == "attn_scale_sqrt_d" else hd)
    s = (q @ k.transpose(0, 1, 3, 2)) * scale  # [B, H, T, T]
    causal = positions[None, :] <= positions[:, None]
    s = np.where(causal, s, -np.inf)
    s = s - s.max(-1, keepdims=True)
    pr = np.exp(s)
    pr /= pr.sum(-1, keepdims=True)
    out = (pr @ v).transpose(0, 2, 1, 3).reshape(B, T, H * hd)
    return out @ w[f"{p}.self_attn.o_proj.weight"].T


def route(w: Dict[str, np.ndarray], p: str, b: np.ndarray, config: dict,
          variant: Optional[str] = None):
    """Returns (indices [N, K], weights [N, K], selection gap [N]) for b [N, d].

    The gap is (k-th best biased score) - ((k+1)-th best): how far each token is
    from a tie that float32 rounding could flip."""
    logits = b @ w[f"{p}.feed_forward.router.weight"].T  # [N, E]
    if variant == "softmax_router":
        e = np.exp(logits - logits.max(-1, keepdims=True))
        scores = e / e.sum(-1, keepdims=True)
    else:
        scores = sigmoid(logits)
    bias = w[f"{p}.feed_forward.expert_bias"]
    choice = scores if variant == "bias_ignored" else scores + bias
    k = config["num_experts_per_tok"]
    order = np.argsort(-choice, axis=-1, kind="stable")
    idx = order[:, :k]
    srt = np.take_along_axis(choice, order, axis=-1)
    gap = srt[:, k - 1] - srt[:, k] if k < choice.shape[-1] else np.full(len(b), np.inf)
    src = choice if variant == "bias_in_weights" else scores
    wts = np.take_along_axis(src, idx, axis=-1)
    if variant != "no_topk_renorm":
        wts = wts / (wts.sum(-1, keepdims=True) + 1e-20)
    if variant != "no_routed_scaling":
        wts = wts * config["routed_scaling_factor"]
    return idx, wts, gap


def moe(w: Dict[str, np.ndarray], p: str, b: np.ndarray, config: dict,
        variant: Optional[str], gaps: Optional[list]) -> np.ndarray:
    shape = b.shape
    b = b.reshape(-1, shape[-1])
    inter = config["intermediate_size"]
    idx, wts, gap = route(w, p, b, config, variant)
    if gaps is not None:
        gaps.append(gap)
    gate_up = w[f"{p}.feed_forward.experts.gate_up_proj"]
    down = w[f"{p}.feed_forward.experts.down_proj"]
    routed = np.zeros_like(b)
    for n in range(b.shape[0]):  # a loop is fine here: this is the reference
        for j in range(idx.shape[1]):
            e = idx[n, j]
            h = b[n] @ gate_up[e]
            gate, up = h[:inter], h[inter:]
            if variant == "gate_up_swapped":
                gate, up = up, gate
            routed[n] += wts[n, j] * ((silu(gate) * up) @ down[e])
    out = routed
    if variant != "no_shared_expert":
        sp = f"{p}.feed_forward.shared_expert"
        g = b @ w[f"{sp}.gate_proj.weight"].T
        u = b @ w[f"{sp}.up_proj.weight"].T
        out = out + (silu(g) * u) @ w[f"{sp}.down_proj.weight"].T
    return out.reshape(shape)


def forward(w: Dict[str, np.ndarray], config: dict, tokens, variant: Optional[str] = None,
            gaps: Optional[list] = None) -> np.ndarray:
    """Logits [B, T, V] (float64) for token ids [B, T].

    If `gaps` is a list, the routing selection gap of every token of every
    layer is appended to it (see `route`)."""
    if variant is not None and variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant}")
    tokens = np.asarray(tokens)
    eps = config["rms_norm_eps"]
    emb = w["model.embed_tokens.weight"]
    x = emb[tokens].astype(np.float64)
    positions = np.arange(tokens.shape[1])
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        a = rms_norm(x, w[f"{p}.input_layernorm.weight"], eps)
        x = x + attention(w, p, a, config, positions, variant)
        b = rms_norm(x, w[f"{p}.post_attention_layernorm.weight"], eps)
        x = x + moe(w, p, b, config, variant, gaps)
    h = rms_norm(x, w["model.norm.weight"], eps)
    return h @ emb.T


# --- released QAT INT4 format (docs/architecture.md section 3), independent of mobilemoe_mlx.checkpoints.packing ---

QAT_GROUP = 32


def pack_int4(q: np.ndarray) -> np.ndarray:
    """Signed q in [-8, 7] [..., n] -> uint8 [..., n/2]: even index in the low
    nibble, odd index in the high nibble, nibbles two's complement."""
    q = np.asarray(q)
    assert q.min() >= -8 and q.max() <= 7 and q.shape[-1] % 2 == 0
    nib = (q.astype(np.int16) & 0xF).astype(np.uint8)
    return (nib[..., 0::2] | (nib[..., 1::2] << 4)).astype(np.uint8)


def unpack_int4(packed: np.ndarray) -> np.ndarray:
    """uint8 [..., n/2] -> int8 q [..., n] in [-8, 7]."""
    packed = np.asarray(packed, dtype=np.uint8)
    lo = (packed & 0xF).astype(np.int16)
    hi = (packed >> 4).astype(np.int16)
    q = np.empty(packed.shape[:-1] + (packed.shape[-1] * 2,), dtype=np.int16)
    q[..., 0::2] = lo
    q[..., 1::2] = hi
    q = np.where(q >= 8, q - 16, q)
    return q.astype(np.int8)


def dequantize_int4(packed: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """q * scale in float64, groups of len/scale.shape[-1] along the last axis."""
    q = unpack_int4(packed).astype(np.float64)
    g = q.shape[-1] // scale.shape[-1]
    return (q.reshape(*scale.shape, g) * scale.astype(np.float64)[..., None]).reshape(q.shape)


def unpack_mlx_uint32(words: np.ndarray, bits: int = 4) -> np.ndarray:
    """MLX affine packed weights (uint32 [..., n*bits/32], element 0 in the lowest
    bits) -> unsigned integers u [..., n]."""
    words = np.asarray(words, dtype=np.uint32)
    per = 32 // bits
    shifts = (np.arange(per, dtype=np.uint32) * bits)
    u = (words[..., None] >> shifts) & np.uint32((1 << bits) - 1)
    return u.reshape(*words.shape[:-1], words.shape[-1] * per).astype(np.int64)


def dequantize_mlx(words, scales, biases, bits: int = 4) -> np.ndarray:
    """w = scale * u + bias per group, in float64."""
    u = unpack_mlx_uint32(words, bits).astype(np.float64)
    scales = np.asarray(scales, dtype=np.float64)
    g = u.shape[-1] // scales.shape[-1]
    u = u.reshape(*scales.shape, g)
    return (u * scales[..., None] + np.asarray(biases, dtype=np.float64)[..., None]).reshape(
        *scales.shape[:-1], -1)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """max|a - b| / max|b| (b is the reference)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())
