"""MobileMoE in MLX.

References: "MobileMoE: Scaling On-Device Mixture of Experts" (Meta, 2026) and
docs/mobilemoe-spec.md section 2, which gives the exact computation this file
implements. It follows mlx-lm's model protocol (``Model(args)``,
``model(inputs, cache) -> logits``, ``layers``, ``sanitize``) so mlx-lm's
generation, caches, sampling and server run it unchanged.

This file must stay self-contained (it imports only mlx and mlx-lm): the
converter copies it next to the weights as the config's ``model_file``, which
is how ``mlx_lm.generate --trust-remote-code`` finds the architecture.

Shape legend: B = batch, L = tokens, D = hidden, H = heads, Hkv = KV heads,
E = routed experts, K = experts chosen per token (top-k), I = expert width.
"""

from dataclasses import dataclass
from typing import Any, Dict, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.activations import swiglu  # compiled: one fused elementwise kernel
from mlx_lm.models.base import (
    BaseModelArgs,
    create_attention_mask,
    scaled_dot_product_attention,
)
from mlx_lm.models.rope_utils import initialize_rope


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str = "mobilemoe"
    vocab_size: int = 128256
    hidden_size: int = 768
    intermediate_size: int = 384  # routed expert width
    intermediate_size_mlp: int = 1536  # shared expert width (4x routed)
    num_hidden_layers: int = 20
    num_attention_heads: int = 12
    num_key_value_heads: int = 4
    head_dim: int = 64
    num_local_experts: int = 60
    num_experts_per_tok: int = 4
    routed_scaling_factor: float = 2.5
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    # Checkpoints write `rope_scaling`; converted directories write the same
    # block as transformers-5's `rope_parameters` (see convert.write_config).
    rope_scaling: Optional[Dict[str, Any]] = None
    rope_parameters: Optional[Dict[str, Any]] = None
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = True
    # Sorted dispatch starts at this many (token, expert) pairs (B * L * top-k):
    # sorting pays off once many tokens hit each expert (prefill), not at decode.
    expert_sort_threshold: int = 64

    def __post_init__(self):
        if self.rope_scaling is None and self.rope_parameters is not None:
            self.rope_scaling = {
                k: v for k, v in self.rope_parameters.items() if k != "rope_theta"
            }
            self.rope_theta = self.rope_parameters.get("rope_theta", self.rope_theta)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.num_key_value_heads
        self.head_dim = args.head_dim
        self.eps = args.rms_norm_eps
        self.scale = self.head_dim**-0.5
        d, hd = args.hidden_size, self.head_dim
        self.q_proj = nn.Linear(d, self.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(self.n_heads * hd, d, bias=False)
        # MobileMoE rotates interleaved pairs (2i, 2i+1): MLX's traditional RoPE.
        self.rope = initialize_rope(
            hd,
            args.rope_theta,
            traditional=True,
            scaling_config=args.rope_scaling,
            max_position_embeddings=args.max_position_embeddings,
        )

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)

        offset = cache.offset if cache is not None else 0
        # QK-norm has no learned scale; per-head RMS commutes with the rotation.
        q = mx.fast.rms_norm(self.rope(q, offset=offset), None, self.eps)
        k = mx.fast.rms_norm(self.rope(k, offset=offset), None, self.eps)

        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        out = scaled_dot_product_attention(
            q, k, v, cache=cache, scale=self.scale, mask=mask
        )
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class ExpertLinear(nn.Module):
    """E stacked linear maps stored [E, in, out], applied per token by index.

    The released checkpoints keep experts as [E, in, out] with quantization
    groups along `out`; that is exactly what `gather_qmm(transpose=False)`
    consumes, so the weights are never transposed.
    """

    def __init__(self, input_dims: int, output_dims: int, num_experts: int):
        super().__init__()
        self.weight = mx.zeros((num_experts, input_dims, output_dims))

    def __call__(self, x, indices, sorted_indices=False):
        return mx.gather_mm(
            x, self.weight, rhs_indices=indices, sorted_indices=sorted_indices
        )

    def to_quantized(self, group_size: int = 32, bits: int = 4, mode: str = "affine"):
        num_experts, input_dims, output_dims = self.weight.shape
        q = QuantizedExpertLinear(
            input_dims, output_dims, num_experts, group_size, bits, mode
        )
        q.weight, q.scales, q.biases = mx.quantize(
            self.weight, group_size, bits, mode=mode
        )
        return q


class QuantizedExpertLinear(nn.Module):
    def __init__(self, input_dims, output_dims, num_experts, group_size, bits, mode):
        super().__init__()
        self.group_size, self.bits, self.mode = group_size, bits, mode
        words = output_dims * bits // 32
        self.weight = mx.zeros((num_experts, input_dims, words), dtype=mx.uint32)
        self.scales = mx.zeros((num_experts, input_dims, output_dims // group_size))
        self.biases = mx.zeros_like(self.scales)
        self.freeze()

    def __call__(self, x, indices, sorted_indices=False):
        return mx.gather_qmm(
            x,
            self.weight,
            self.scales,
            self.biases,
            rhs_indices=indices,
            transpose=False,
            group_size=self.group_size,
            bits=self.bits,
            mode=self.mode,
            sorted_indices=sorted_indices,
        )


class RoutedExperts(nn.Module):
    """SwiGLU experts with gate and up fused, as the checkpoints store them."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        d, i, e = args.hidden_size, args.intermediate_size, args.num_local_experts
        self.gate_up_proj = ExpertLinear(d, 2 * i, e)
        self.down_proj = ExpertLinear(i, d, e)
        self.sort_threshold = args.expert_sort_threshold

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        # x: [B, L, D], indices: [B, L, K] -> [B, L, K, D]
        x = mx.expand_dims(x, (-2, -3))  # [B, L, 1, 1, D]: one row per token
        do_sort = indices.size >= self.sort_threshold
        idx, inv_order = indices, None
        if do_sort:
            # Group the (token, expert) pairs by expert so each expert's weights
            # are read once, in order; undone after the down projection.
            k = indices.shape[-1]
            flat = indices.flatten()
            order = mx.argsort(flat)
            inv_order = mx.argsort(order)
            x, idx = x.flatten(0, -3)[order // k], flat[order]
        gate, up = mx.split(self.gate_up_proj(x, idx, sorted_indices=do_sort), 2, -1)
        y = self.down_proj(swiglu(gate, up), idx, sorted_indices=do_sort)
        if do_sort:
            y = mx.unflatten(y[inv_order], 0, indices.shape)
        return y.squeeze(-2)


class MLP(nn.Module):
    """A SwiGLU feed-forward block: the always-on shared expert (and dense.py's MLP)."""

    def __init__(self, dims: int, hidden_dims: int):
        super().__init__()
        self.gate_proj = nn.Linear(dims, hidden_dims, bias=False)
        self.up_proj = nn.Linear(dims, hidden_dims, bias=False)
        self.down_proj = nn.Linear(hidden_dims, dims, bias=False)

    def __call__(self, x):
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class MoE(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.top_k = args.num_experts_per_tok
        self.scaling = args.routed_scaling_factor
        e = args.num_local_experts
        # Router weight and bias stay float32 whatever the model dtype: routing
        # decisions are discrete, and rounding flips which experts run.
        self.router = nn.Linear(args.hidden_size, e, bias=False)
        self.expert_bias = mx.zeros((e,), dtype=mx.float32)
        self.experts = RoutedExperts(args)
        self.shared_expert = MLP(args.hidden_size, args.intermediate_size_mlp)

    def __call__(self, x: mx.array) -> mx.array:
        scores = mx.sigmoid(self.router(x.astype(mx.float32)))  # [B, L, E]
        # The bias only chooses experts; the weights use the unbiased scores.
        choice = scores + self.expert_bias
        k = self.top_k
        indices = mx.stop_gradient(mx.argpartition(-choice, kth=k - 1, axis=-1)[..., :k])
        weights = mx.take_along_axis(scores, indices, axis=-1)  # [B, L, K]
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20) * self.scaling
        routed = self.experts(x, indices)  # [B, L, K, D]
        routed = (routed * weights[..., None].astype(routed.dtype)).sum(axis=-2)
        return routed + self.shared_expert(x)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = Attention(args)
        self.feed_forward = MoE(args)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(
            args.hidden_size, eps=args.rms_norm_eps
        )

    def __call__(self, x, mask=None, cache=None):
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        return h + self.feed_forward(self.post_attention_layernorm(h))


class MobileMoEModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args) for _ in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, inputs: mx.array, cache=None) -> mx.array:
        h = self.embed_tokens(inputs)
        if cache is None:
            cache = [None] * len(self.layers)
        mask = create_attention_mask(h, cache[0])
        for layer, c in zip(self.layers, cache):
            h = layer(h, mask, c)
        return self.norm(h)


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = MobileMoEModel(args)

    def __call__(self, inputs: mx.array, cache=None) -> mx.array:
        # Tied embeddings: the (possibly quantized) embedding is the output head.
        return self.model.embed_tokens.as_linear(self.model(inputs, cache))

    @property
    def layers(self):
        return self.model.layers

    # mlx-lm's own convert/quantize consult these: the router and its bias stay
    # float32 and unquantized whatever else is cast or quantized.
    @property
    def quant_predicate(self):
        return lambda path, module: not path.endswith("router")

    @property
    def cast_predicate(self):
        return lambda key: "router" not in key and "expert_bias" not in key

    def sanitize(self, weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
        """Converted directories are already in this module's names; only an
        untied head some exporters add is dropped (the embedding is the head)."""
        return {k: v for k, v in weights.items() if not k.startswith("lm_head.")}

