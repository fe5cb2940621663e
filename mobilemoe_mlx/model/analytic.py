"""Closed-form counts for any MobileMoE or dense (MobileLLM-Pro-shaped) config.

Parameters (total and active), bytes of stored weights for a quantization,
bytes read per decode token, FLOPs per token in prefill and decode, and KV
cache bytes. Everything is counted from the config, and the tests check it
against the instantiated models to the parameter and to the byte.

A config is MoE when it has `num_local_experts`; otherwise it is dense, with
`intermediate_size` as the SwiGLU width and optional sliding-window layers
(`layer_types` entries "sliding_attention", window `sliding_window`).

Quantization is MLX's affine format: `bits` per weight, plus one scale and one
bias per `group_size` weights. Linears, experts and the embedding (which is
also the tied output head) are quantized; norms stay in the model dtype; the
router weight and expert-selection bias are float32.
"""

from dataclasses import dataclass
from typing import Dict, Optional

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def is_moe(config: dict) -> bool:
    return "num_local_experts" in config


def _head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def _windows(config: dict):
    """Per layer: the attention window in tokens, or None for full attention."""
    n = config["num_hidden_layers"]
    types = config.get("layer_types") or ["full_attention"] * n
    w = config.get("sliding_window")
    return [w if t == "sliding_attention" else None for t in types]


@dataclass(frozen=True)
class Shapes:
    """Parameter counts by role, per layer unless named otherwise."""
    embedding: int  # V*D (also the tied head)
    attention: int  # q, k, v, o
    norms: int  # the two per-layer RMSNorms
    ffn_dense: int  # dense MLP, or the MoE's always-on shared expert
    expert: int  # one routed expert (gate, up, down); 0 for dense
    experts: int  # routed experts in a layer
    top_k: int
    router: int  # router weight E*D
    expert_bias: int  # E
    final_norm: int
    layers: int


def shapes(config: dict) -> Shapes:
    d, v, L = config["hidden_size"], config["vocab_size"], config["num_hidden_layers"]
    hd = _head_dim(config)
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    attention = 2 * q * d + 2 * kv * d
    if is_moe(config):
        e, i = config["num_local_experts"], config["intermediate_size"]
        return Shapes(v * d, attention, 2 * d, 3 * d * config["intermediate_size_mlp"],
                      3 * d * i, e, config["num_experts_per_tok"], e * d, e, d, L)
    return Shapes(v * d, attention, 2 * d, 3 * d * config["intermediate_size"],
                  0, 0, 0, 0, 0, d, L)


def param_counts(config: dict) -> Dict[str, int]:
    """Total and active (per token) parameters; the embedding counts once (tied)."""
    s = shapes(config)
    common = s.attention + s.norms + s.ffn_dense + s.router + s.expert_bias
    total = s.embedding + s.final_norm + s.layers * (common + s.experts * s.expert)
    active = s.embedding + s.final_norm + s.layers * (common + s.top_k * s.expert)
    return {"total": total, "active": active, "embedding": s.embedding,
            "routed_experts": s.layers * s.experts * s.expert}


def quantized_bytes(n: int, bits: int, group_size: int, scale_bytes: int) -> int:
    """Bytes of `n` weights in MLX's affine format: packed values + scale + bias per group."""
    return n * bits // 8 + 2 * (n // group_size) * scale_bytes


@dataclass(frozen=True)
class Quant:
    """How a model stores its weights. bits=None: unquantized, in `dtype`."""
    bits: Optional[int] = 4
    group_size: int = 32
    scale_dtype: str = "float16"  # scales and biases of linears and experts
    embedding_scale_dtype: Optional[str] = None  # defaults to scale_dtype
    dtype: str = "float16"  # norms (and every weight when bits is None)

    def bytes(self, n: int, embedding: bool = False) -> int:
        if self.bits is None:
            return n * DTYPE_BYTES[self.dtype]
        sd = (self.embedding_scale_dtype or self.scale_dtype) if embedding else self.scale_dtype
        return quantized_bytes(n, self.bits, self.group_size, DTYPE_BYTES[sd])


def weight_bytes(config: dict, quant: Quant = Quant()) -> Dict[str, int]:
    """Stored bytes of every weight, and the bytes one decode token reads.

    Decode reads, per layer: attention, the dense MLP or shared expert, the
    router and top_k routed experts, the norms; then the whole embedding as
    the output head (tied) plus one embedding row for the input token."""
    s = shapes(config)
    nb = DTYPE_BYTES[quant.dtype]
    q = quant.bytes
    fixed = q(s.attention) + q(s.ffn_dense) + s.norms * nb + 4 * (s.router + s.expert_bias)
    expert = 0
    if s.expert:  # gate_up [D, 2I] and down [I, D], grouped along their last axis
        d, i = config["hidden_size"], config["intermediate_size"]
        expert = q(d * 2 * i) + q(i * d)
    embed = q(s.embedding, embedding=True)
    total = embed + s.final_norm * nb + s.layers * (fixed + s.experts * expert)
    row = embed // config["vocab_size"]
    per_token = embed + row + s.final_norm * nb + s.layers * (fixed + s.top_k * expert)
    return {"total": total, "embedding": embed, "per_expert": expert,
            "routed_experts": s.layers * s.experts * expert,
            "decode_read_per_token": per_token}


def kv_bytes_per_element(dtype: str = "float16", kv_bits: Optional[int] = None,
                         kv_group_size: int = 64) -> float:
    """Bytes per cached K or V element; quantized like mlx-lm's QuantizedKVCache."""
    if kv_bits is None:
        return DTYPE_BYTES[dtype]
    return kv_bits / 8 + 2 * DTYPE_BYTES[dtype] / kv_group_size


def kv_bytes_per_token(config: dict, dtype: str = "float16", kv_bits: Optional[int] = None) -> float:
    """KV bytes one token adds to every layer's cache (before windows cap it)."""
    per_layer = 2 * config["num_key_value_heads"] * _head_dim(config)
    return per_layer * config["num_hidden_layers"] * kv_bytes_per_element(dtype, kv_bits)


def kv_cache_bytes(config: dict, context: int, dtype: str = "float16",
                   kv_bits: Optional[int] = None) -> float:
    """KV cache bytes at `context` tokens; sliding-window layers keep `window` tokens."""
    per_layer_token = 2 * config["num_key_value_heads"] * _head_dim(config)
    tokens = sum(min(context, w) if w else context for w in _windows(config))
    return tokens * per_layer_token * kv_bytes_per_element(dtype, kv_bits)


def _matmul_params_active(config: dict) -> int:
    """Weights multiplied per token: everything active but the embedding lookup
    and norms, plus the tied head (V*D)."""
    s = shapes(config)
    return s.embedding + s.layers * (s.attention + s.ffn_dense + s.router + s.top_k * s.expert)


def _attention_flops(config: dict, context: int) -> float:
    """QK^T and AV for one query token attending over `context` keys, all layers."""
    h, hd = config["num_attention_heads"], _head_dim(config)
    return sum(4 * h * hd * (min(context, w) if w else context) for w in _windows(config))


def decode_flops_per_token(config: dict, context: int) -> float:
    """FLOPs (multiply-add = 2) for one decode token with `context` tokens cached."""
    return 2 * _matmul_params_active(config) + _attention_flops(config, context + 1)


def prefill_flops(config: dict, prompt_tokens: int) -> float:
    """FLOPs to prefill `prompt_tokens` tokens (causal: token t attends to t keys).

    The output head (the tied embedding, V*D) is counted once, for the last
    token only: an mlx-lm-style prefill evaluates only the cache state after
    each chunk, so the lazily built logits of the chunk tokens are never
    computed; the head runs on the last prompt token alone, whose logits give
    the first generated token. The layers run for every prompt token."""
    h, hd = config["num_attention_heads"], _head_dim(config)
    p = prompt_tokens
    attn = 0
    for w in _windows(config):
        if w and w < p:  # sum of min(t, w) for t = 1..p
            keys = w * (w + 1) // 2 + (p - w) * w
        else:
            keys = p * (p + 1) // 2
        attn += 4 * h * hd * keys
    body = _matmul_params_active(config) - shapes(config).embedding
    head = shapes(config).embedding
    return 2 * body * p + 2 * head + attn


def summary(config: dict, quant: Quant = Quant(), kv_dtype: str = "float16",
            contexts=(256, 1024, 4096, 8192), prompt_lengths=None) -> dict:
    """Everything above for one config, as a JSON-able dict: KV cache bytes and
    decode FLOPs keyed by `contexts`, prefill FLOPs per token keyed by
    `prompt_lengths` (default: `contexts`)."""
    wb = weight_bytes(config, quant)
    prompts = contexts if prompt_lengths is None else prompt_lengths
    return {
        "params": param_counts(config),
        "weight_bytes": wb,
        "kv_bytes_per_token": kv_bytes_per_token(config, kv_dtype),
        "kv_cache_bytes": {str(c): kv_cache_bytes(config, c, kv_dtype) for c in contexts},
        "decode_flops_per_token": {str(c): decode_flops_per_token(config, c) for c in contexts},
        "prefill_flops_per_token": {str(p): prefill_flops(config, p) / p for p in prompts},
    }


def decode_bound(config: dict, context: int, bandwidth_gbps: float, quant: Quant = Quant(),
                 kv_dtype: str = "float16") -> float:
    """Memory-bound upper limit on decode tokens/s: bandwidth over bytes read per
    token (active weights + the whole KV cache at `context`)."""
    read = weight_bytes(config, quant)["decode_read_per_token"]
    read += kv_cache_bytes(config, context, kv_dtype)
    return bandwidth_gbps * 1e9 / read
