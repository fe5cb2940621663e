"""MobileMoE in MLX.

References: "MobileMoE: Scaling On-Device Mixture of Experts" (Meta, 2026) and
docs/architecture.md section 2, which gives the exact computation this file
implements. It follows mlx-lm's model protocol (``Model(args)``,
``model(inputs, cache) -> logits``, ``layers``, ``sanitize``) so mlx-lm's
generation, caches, sampling and server run it unchanged.

This file must stay self-contained (it imports only mlx and mlx-lm): the
converter copies it next to the weights as the config's ``model_file``, which
is how ``mlx_lm.generate --trust-remote-code`` finds the architecture.

It reads top to bottom as mlx-lm's model files do: ModelArgs, the modules
(attention, the expert layers, the MoE block, the decoder layer), then Model
with ``sanitize``, ``quant_predicate`` and ``cast_predicate``. Two marked
sections follow that a reader of the model can skip: the one-line refusals of
mlx-lm tools this model cannot run, and the compiled decode step (the fast
path every one-token step takes; docs/benchmarks.md, "The decode step").

Fewer kernels per token: a decode step of a small model is bound by how many
kernels it launches and how long the host takes to build it, not by
arithmetic. So at load time (`sanitize`, or `Model.fuse_projections()` on a model
quantized in memory) q, k and v become one matmul, and the shared expert's
gate and up another, when their weights are quantized: MLX's groups run along
the input dimension, so stacking output rows of the packed words, scales and
biases is lossless, and the result is bit-identical (tests/test_fusion.py).
Directories on disk keep the separate tensors. The routing math is one
compiled function, as in mlx-lm's glm4_moe.

Shape legend: B = batch, L = tokens, D = hidden, H = heads, Hkv = KV heads,
E = routed experts, K = experts chosen per token (top-k), I = expert width.
"""

import copy
import itertools
import logging
import math
import operator
import os
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models.activations import swiglu  # compiled: one fused elementwise kernel
from mlx_lm.models.base import (
    BaseModelArgs,
    create_attention_mask,
    scaled_dot_product_attention,
)
from mlx_lm.models.cache import KVCache
from mlx_lm.models.rope_utils import (
    Llama3RoPE,
    ProportionalRoPE,
    SuScaledRoPE,
    YarnRoPE,
    initialize_rope,
)
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

# MLX's GPU backends run float32 matmuls as TF32 (a 10-bit mantissa) unless
# MLX_ENABLE_TF32=0. The router is float32 because its top-k choices are
# discrete (rounding flips which experts run), so this model asks for real
# float32; a user's own setting wins. MLX reads the variable once, at the
# process's first matmul (of any dtype), so this line counts only where it runs
# first: for mlx-lm's tools, which import this file before running anything.
# (mobilemoe_mlx's own entry points ask earlier: runtime.exact_float32_matmuls.)
# In MLX's source the switch changes float32 inputs only.
os.environ.setdefault("MLX_ENABLE_TF32", "0")


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
    # Fuse q/k/v and the shared expert's gate/up at load (quantized weights only).
    fuse_projections: bool = True
    # Run one-token decode steps as compiled functions (see Model.__call__).
    compiled_decode: bool = True
    # Where MLX runs on the CPU, cast floating weights to float32 as they load
    # (see Model.sanitize). mobilemoe_mlx's own loader turns this off and decides itself.
    float32_on_cpu: bool = True

    def __post_init__(self):
        if self.rope_scaling is None and self.rope_parameters is not None:
            self.rope_scaling = {
                k: v for k, v in self.rope_parameters.items() if k != "rope_theta"
            }
            self.rope_theta = self.rope_parameters.get("rope_theta", self.rope_theta)


def split_at(a: mx.array, index: int, axis: int) -> Tuple[mx.array, mx.array]:
    """`mx.split(a, [index], axis)`, as two slices: the same views and values.

    MLX's Split gives each part a buffer size of its element count, but a part
    with holes (cut along an inner axis of a transposed array, as q/k/v are)
    spans more memory than that. CUDA's fast.rope sizes its output by that
    count and writes the whole span, past the end of its buffer (ml-explore/mlx
    issue 4548): at S's shape the fused q/k heads overran by 63 KB per layer and
    the GPU's logits fell to cosine 0.39 against the CPU's. Slices record the
    span."""
    lead = (slice(None),) * (axis % a.ndim)
    return a[lead + (slice(None, index),)], a[lead + (slice(index, None),)]


def heads_first(a: mx.array, n: int) -> mx.array:
    """[B, L, n * hd] -> [B, n, L, hd]. One token (a decode step) needs no
    transpose: with L = 1 the reshape alone gives that layout, one view fewer
    per use (a decode step's host time goes by its number of operations)."""
    B, L, _ = a.shape
    if L == 1:
        return a.reshape(B, n, 1, -1)
    return a.reshape(B, L, n, -1).transpose(0, 2, 1, 3)


def heads_merged(a: mx.array) -> mx.array:
    """[B, n, L, hd] -> [B, L, n * hd], the inverse of heads_first."""
    B, _, L, _ = a.shape
    if L == 1:
        return a.reshape(B, 1, -1)
    return a.transpose(0, 2, 1, 3).reshape(B, L, -1)


def halves(a: mx.array) -> Tuple[mx.array, mx.array]:
    """The first and second half of the last axis (gate and up)."""
    assert a.shape[-1] % 2 == 0, "gate and up are stored as two halves of one width"
    return split_at(a, a.shape[-1] // 2, -1)


def _stacked(linears: List[nn.QuantizedLinear]) -> nn.QuantizedLinear:
    """One quantized linear whose output rows are `linears`' rows, in order.

    The packed words, scales and biases are stacked: each output row keeps its
    own groups (they run along the input dimension), so the values, and every
    product, are exactly those of the separate matmuls."""
    first = linears[0]
    out = sum(m.weight.shape[0] for m in linears)
    fused = nn.QuantizedLinear(first.weight.shape[1] * 32 // first.bits, out, False,
                               first.group_size, first.bits, first.mode)
    for name in ("weight", "scales", "biases"):
        if first.get(name) is not None:  # the microscaling modes have no biases
            setattr(fused, name, mx.concatenate([getattr(m, name) for m in linears]))
    return fused


class _Fusable(nn.Module):
    """A module whose projections `parts` can run as one stacked `fused` linear."""

    fused: str
    parts: tuple

    def fuse_projections(self) -> None:
        """Stack the in-memory projections (quantized ones only: a float
        matmul's summation order may change with its width; a quantized one's
        does not)."""
        parts = [getattr(self, p) for p in self.parts] if not self.is_fused() else []
        if not parts or not all(isinstance(m, nn.QuantizedLinear) and "bias" not in m
                                for m in parts):
            return
        if len({(m.bits, m.group_size, m.mode, m.scales.dtype) for m in parts}) != 1:
            return  # mixed precision: one matmul cannot take both packings
        setattr(self, self.fused, _stacked(parts))
        for p in self.parts:
            delattr(self, p)

    def is_fused(self) -> bool:
        return self.fused in self

    def fuse_weights(self, weights: Dict[str, mx.array], prefix: str) -> None:
        """Loading: stack this module's tensors in `weights` (in place) when all
        are quantized, and swap in one (float, to be quantized) linear for them;
        directories saved fused (mlx-lm re-saving a loaded model) stay fused."""
        if self.is_fused():
            return
        names = [f"{prefix}.{p}" for p in self.parts]
        if f"{prefix}.{self.fused}.weight" not in weights:
            if not all(f"{n}.scales" in weights for n in names):
                return
            # Same bits and group size (widths of words and scales) or no fusion.
            if len({(weights[f"{n}.weight"].shape[1:], weights[f"{n}.scales"].shape[1:],
                     weights[f"{n}.scales"].dtype) for n in names}) != 1:
                return
            for r in ("weight", "scales", "biases"):
                if f"{names[0]}.{r}" in weights:  # the microscaling modes have no biases
                    weights[f"{prefix}.{self.fused}.{r}"] = mx.concatenate(
                        [weights.pop(f"{n}.{r}") for n in names])
        linears = [getattr(self, p) for p in self.parts]
        out = sum(m.weight.shape[0] for m in linears)
        setattr(self, self.fused, nn.Linear(linears[0].weight.shape[1], out, bias=False))
        for p in self.parts:
            delattr(self, p)


class Attention(_Fusable):
    fused, parts = "qkv_proj", ("q_proj", "k_proj", "v_proj")

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
        h, hkv = self.n_heads, self.n_kv_heads
        offset = cache.offset if cache is not None else 0
        if self.is_fused():
            # One matmul, then q and k heads rotated and normalised together
            # (both are per head and per position: one RoPE and one RMS-norm
            # kernel for both, with the same values as two of each).
            qkv = heads_first(self.qkv_proj(x), h + 2 * hkv)
            qk, v = split_at(qkv, h + hkv, axis=1)
            qk = mx.fast.rms_norm(self.rotate(qk, offset, cache), None, self.eps)
            q, k = split_at(qk, h, axis=1)
        else:
            q = heads_first(self.q_proj(x), h)
            k = heads_first(self.k_proj(x), hkv)
            v = heads_first(self.v_proj(x), hkv)
            # QK-norm has no learned scale; per-head RMS commutes with the rotation.
            q = mx.fast.rms_norm(self.rotate(q, offset, cache), None, self.eps)
            k = mx.fast.rms_norm(self.rotate(k, offset, cache), None, self.eps)

        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        attend = getattr(cache, "attend", None)  # the compiled step's, on the CPU
        if attend is not None:
            return self.o_proj(attend(q, k, v, self.scale, mask))  # heads merged
        out = scaled_dot_product_attention(q, k, v, cache=cache, scale=self.scale, mask=mask)
        return self.o_proj(heads_merged(out))

    def rotate(self, x: mx.array, offset, cache) -> mx.array:
        """RoPE: MLX's fast.rope, or the compiled decode step's table (CPU)."""
        table = getattr(cache, "rotary", None)
        return self.rope(x, offset=offset) if table is None else table.rotate(x, self.rope)


class ExpertLinear(nn.Module):
    """E stacked linear maps stored [E, in, out], applied per token by index.

    The released checkpoints keep experts as [E, in, out] with quantization
    groups along `out`; that is exactly what `gather_qmm(transpose=False)`
    consumes, so the weights are never transposed.
    """

    def __init__(self, input_dims: int, output_dims: int, num_experts: int):
        super().__init__()
        self.weight = mx.zeros((num_experts, input_dims, output_dims))

    def __call__(self, x, indices, sorted_indices=False, rows=None):
        return mx.gather_mm(
            x, self.weight, lhs_indices=rows, rhs_indices=indices,
            sorted_indices=sorted_indices
        )

    def to_quantized(self, group_size: Optional[int] = None, bits: Optional[int] = None,
                     mode: str = "affine"):
        num_experts, input_dims, output_dims = self.weight.shape
        q = QuantizedExpertLinear(
            input_dims, output_dims, num_experts, group_size, bits, mode
        )
        q.weight, q.scales, *biases = mx.quantize(
            self.weight, q.group_size, q.bits, mode=mode
        )
        if biases:
            q.biases = biases[0]
        return q

    @classmethod
    def from_weight(cls, weight: mx.array) -> "ExpertLinear":
        """An expert layer holding `weight` [E, in, out]."""
        layer = cls(weight.shape[1], weight.shape[2], weight.shape[0])
        layer.weight = weight
        return layer

    def dense_weight(self) -> mx.array:
        return self.weight

    def to_lora(self, r: int = 8, scale: float = 20.0, dropout: float = 0.0):
        """mlx-lm's LoRA hook (tuner.utils.linear_to_lora_layers)."""
        return LoRAExpertLinear(self, r, scale, dropout)


# mx.quantize's (group size, bits) when a caller names none: mlx-lm's mixed
# recipes and per-layer config entries pass None. The microscaling modes allow
# exactly these; only "affine" takes others.
QUANT_MODE_DEFAULTS = {"affine": (64, 4), "mxfp4": (32, 4), "nvfp4": (16, 4), "mxfp8": (32, 8)}


class QuantizedExpertLinear(QuantizedSwitchLinear):
    """ExpertLinear quantized in any mode of mx.quantize. Groups run along
    `out` (the last axis of [E, in, out], gather_qmm with transpose=False);
    "affine" stores scales and biases in the float dtype, the microscaling
    modes (mxfp4, nvfp4, mxfp8) uint8 scales and no biases.

    A QuantizedSwitchLinear to mlx-lm's tools, because that is the type they
    know: `dequantize_model` (convert -d, fuse --dequantize) then rebuilds it as
    a SwitchLinear holding the dequantized [E, in, out] weight, which
    RoutedExperts takes back as an ExpertLinear. Its own layout and call are
    this class's, not QuantizedSwitchLinear's ([E, out, in], transpose=True)."""

    def __init__(self, input_dims, output_dims, num_experts, group_size=None, bits=None,
                 mode="affine"):
        nn.Module.__init__(self)  # not QuantizedSwitchLinear's: its layout is [E, out, in]
        if mode not in QUANT_MODE_DEFAULTS:
            raise ValueError(f"unknown quantization mode {mode!r}; "
                             f"choose one of {', '.join(QUANT_MODE_DEFAULTS)}")
        default_group_size, default_bits = QUANT_MODE_DEFAULTS[mode]
        self.group_size, self.bits = group_size or default_group_size, bits or default_bits
        self.mode = mode
        words = output_dims * self.bits // 32
        groups = (num_experts, input_dims, output_dims // self.group_size)
        self.weight = mx.zeros((num_experts, input_dims, words), dtype=mx.uint32)
        self.scales = mx.zeros(groups, dtype=mx.float32 if mode == "affine" else mx.uint8)
        if mode == "affine":
            self.biases = mx.zeros(groups)
        self.freeze()

    @property
    def input_dims(self):
        return self.weight.shape[1]

    @property
    def output_dims(self):
        return self.scales.shape[2] * self.group_size

    @property
    def num_experts(self):
        return self.weight.shape[0]

    def __call__(self, x, indices, sorted_indices=False, rows=None):
        if self.training and "biases" in self and "scales" not in self._no_grad:
            # Scales being trained (mlx_lm.dwq unfreezes them): gradients of our
            # own. No `rows` here: those come from the compiled decode step only.
            return _expert_qmm(x, self.weight, self.scales, self.biases, indices,
                               self.group_size, self.bits)
        return mx.gather_qmm(
            x,
            self.weight,
            self.scales,
            self.get("biases"),
            lhs_indices=rows,
            rhs_indices=indices,
            transpose=False,
            group_size=self.group_size,
            bits=self.bits,
            mode=self.mode,
            sorted_indices=sorted_indices,
        )

    def dense_weight(self) -> mx.array:
        """The weights [E, in, out] this layer multiplies by."""
        return mx.dequantize(self.weight, self.scales, self.get("biases"),
                             self.group_size, self.bits, mode=self.mode)

    def to_lora(self, r: int = 8, scale: float = 20.0, dropout: float = 0.0):
        """mlx-lm's LoRA hook: QLoRA on the quantized experts."""
        return LoRAExpertLinear(self, r, scale, dropout)


class LoRAExpertLinear(nn.Module):
    """A low-rank update per expert beside a (possibly quantized) expert layer,
    in its [E, in, out] layout: mlx-lm's LoRASwitchLinear for this model.

    `fuse` (mlx_lm.fuse's protocol) folds the update into the weights: a
    quantized base is requantized with its own settings unless `dequantize`,
    so the fused model differs from the adapted one by that rounding only."""

    def __init__(self, linear: nn.Module, r: int = 8, scale: float = 20.0,
                 dropout: float = 0.0):
        super().__init__()
        self.linear = linear
        self.dropout = nn.Dropout(p=dropout)
        self.scale = scale
        e, d_in, d_out = linear.num_experts, linear.input_dims, linear.output_dims
        bound = 1 / math.sqrt(d_in)  # as mlx-lm's LoRA layers: b = 0, so it starts as the base
        self.lora_a = mx.random.uniform(low=-bound, high=bound, shape=(e, d_in, r))
        self.lora_b = mx.zeros((e, r, d_out))

    def __call__(self, x, indices, sorted_indices=False, rows=None):
        y = self.linear(x, indices, sorted_indices=sorted_indices, rows=rows)
        z = mx.gather_mm(self.dropout(x), self.lora_a, lhs_indices=rows,
                         rhs_indices=indices, sorted_indices=sorted_indices)
        z = mx.gather_mm(z, self.lora_b, rhs_indices=indices, sorted_indices=sorted_indices)
        return y + (self.scale * z).astype(y.dtype)

    def fuse(self, dequantize: bool = False) -> nn.Module:
        base = self.linear
        weight = base.dense_weight()
        delta = (self.scale * self.lora_a) @ self.lora_b  # [E, in, out]
        fused = ExpertLinear.from_weight(weight + delta.astype(weight.dtype))
        if isinstance(base, QuantizedExpertLinear) and not dequantize:
            return fused.to_quantized(base.group_size, base.bits, base.mode)
        return fused


def _expert_qmm(x, weight, scales, biases, indices, group_size: int, bits: int):
    """gather_qmm (affine, transpose=False) with gradients for `scales` and
    `biases`: what mlx-lm's DWQ trains. MLX's own gather_qmm gradients assume
    the transposed layout (groups along `in`) and come out misshapen for ours.
    Used only while the scales train; otherwise the plain kernel runs."""

    @mx.custom_function
    def qmm(x, scales, biases):
        return mx.gather_qmm(x, weight, scales, biases, rhs_indices=indices, transpose=False,
                             group_size=group_size, bits=bits)

    @qmm.vjp
    def qmm_vjp(primals, cotangent, _):
        x, scales, biases = primals
        dx = mx.gather_qmm(cotangent, weight, scales, biases, rhs_indices=indices,
                           transpose=True, group_size=group_size, bits=bits)
        dx = _sum_to_shape(dx, x.shape)
        # d/dW of x @ W[e] per expert, through gather_mm's own (dense) gradient,
        # in float32 (DWQ trains bfloat16 scales; the CPU's gather_mm is float32 only).
        f32 = mx.float32
        dense = mx.dequantize(weight, scales.astype(f32), biases.astype(f32), group_size, bits)
        _, (dw,) = mx.vjp(lambda w: mx.gather_mm(x.astype(f32), w, rhs_indices=indices),
                          [dense], [cotangent.astype(f32)])
        dw = mx.unflatten(dw, -1, (-1, group_size))  # [E, in, groups, group_size]
        codes = mx.unflatten(mx.dequantize(weight, mx.ones_like(scales), mx.zeros_like(biases),
                                           group_size, bits), -1, (-1, group_size))
        return dx, (dw * codes).sum(-1).astype(scales.dtype), dw.sum(-1).astype(biases.dtype)

    return qmm(x, scales, biases)


def _sum_to_shape(a: mx.array, shape) -> mx.array:
    """`a` summed over the axes broadcasting added to `shape` (a gradient's shape)."""
    extra = a.ndim - len(shape)
    if extra:
        a = a.sum(axis=tuple(range(extra)))
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and a.shape[i] != 1)
    return a.sum(axis=axes, keepdims=True) if axes else a


class RoutedExperts(nn.Module):
    """SwiGLU experts with gate and up fused, as the checkpoints store them."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        d, i, e = args.hidden_size, args.intermediate_size, args.num_local_experts
        self.gate_up_proj = ExpertLinear(d, 2 * i, e)
        self.down_proj = ExpertLinear(i, d, e)
        self.sort_threshold = args.expert_sort_threshold

    def __setitem__(self, key, value):
        # mlx-lm's dequantize_model rebuilds a QuantizedSwitchLinear (ours is
        # one) as a SwitchLinear holding the dequantized weight, which for ours
        # is [E, in, out]: this layout, so it becomes an ExpertLinear again.
        if type(value) is SwitchLinear:
            value = ExpertLinear.from_weight(value.weight)
        super().__setitem__(key, value)

    def __call__(self, x: mx.array, indices: mx.array, rows=None) -> mx.array:
        """x: [B, L, D], indices: [B, L, K] -> [B, L, K, 1, D] (the row axis
        gather_qmm adds is left for combine_experts' sum). `rows`: the two
        projections' lhs indices (ExpertRows), given as constants by the
        compiled decode step instead of built in every step's graph."""
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
        first, second = (None, None) if rows is None or do_sort else rows
        gate, up = halves(self.gate_up_proj(x, idx, sorted_indices=do_sort, rows=first))
        y = self.down_proj(swiglu(gate, up), idx, sorted_indices=do_sort, rows=second)
        if do_sort:
            y = mx.unflatten(y[inv_order], 0, indices.shape)
        return y


class MLP(_Fusable):
    """A SwiGLU feed-forward block: the always-on shared expert (and dense.py's MLP)."""

    fused, parts = "gate_up_proj", ("gate_proj", "up_proj")

    def __init__(self, dims: int, hidden_dims: int):
        super().__init__()
        self.gate_proj = nn.Linear(dims, hidden_dims, bias=False)
        self.up_proj = nn.Linear(dims, hidden_dims, bias=False)
        self.down_proj = nn.Linear(hidden_dims, dims, bias=False)

    def __call__(self, x):
        if self.is_fused():
            gate, up = halves(self.gate_up_proj(x))
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(swiglu(gate, up))


@partial(mx.compile, shapeless=False)
def select_experts(logits: mx.array, expert_bias: mx.array, top_k: int, scaling: float):
    """Router logits [.., E] (float32) -> (experts [.., K], their weights [.., K]).

    One compiled function (as mlx-lm's glm4_moe does): its elementwise steps
    fuse and the host replays the traced graph instead of building it op by op."""
    scores = mx.sigmoid(logits)
    # The bias only chooses experts; the weights use the unbiased scores.
    choice = scores + expert_bias
    indices = mx.stop_gradient(mx.argpartition(-choice, kth=top_k - 1, axis=-1)[..., :top_k])
    weights = mx.take_along_axis(scores, indices, axis=-1)  # [B, L, K]
    return indices, weights / (weights.sum(-1, keepdims=True) + 1e-20) * scaling


class Router(nn.Linear):
    """The MoE router: an nn.Linear that no quantizer can take. It has no
    `to_quantized`, which is what mlx-lm's quantizers look for (convert's
    mixed recipes and dynamic_quant replace the model's quant_predicate with
    their own; gptq and AWQ's fallback quantize every layer that has one), so
    it stays float32 and unquantized whatever quantizes the model."""

    @property
    def to_quantized(self):
        raise AttributeError("the router stays float32 and unquantized")


class MoE(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.top_k = args.num_experts_per_tok
        self.scaling = args.routed_scaling_factor
        e = args.num_local_experts
        # Router weight and bias stay float32 whatever the model dtype: routing
        # decisions are discrete, and rounding flips which experts run.
        self.router = Router(args.hidden_size, e, bias=False)
        self.expert_bias = mx.zeros((e,), dtype=mx.float32)
        # Frozen, so tools that train what is trainable (mlx_lm.dwq trains and
        # casts to bfloat16 every unfrozen parameter) leave both as they are;
        # full fine-tuning unfreezes the whole model and trains them in float32.
        self.router.freeze()
        self.freeze(recurse=False, keys=["expert_bias"])
        self.experts = RoutedExperts(args)
        self.shared_expert = MLP(args.hidden_size, args.intermediate_size_mlp)

    def __call__(self, x: mx.array) -> mx.array:
        y, indices = self.forward(x)
        self.report(indices)
        return y

    def forward(self, x: mx.array, rows=None) -> Tuple[mx.array, mx.array]:
        """The block's output [B, L, D] and the experts it chose [B, L, K]."""
        logits = self.router(x.astype(mx.float32))  # [B, L, E]
        indices, weights = select_experts(logits, self.expert_bias, self.top_k, self.scaling)
        y = combine_experts(self.experts(x, indices, rows), weights, self.shared_expert(x))
        return y, indices

    @property
    def observers(self) -> list:
        """Callbacks given the experts chosen ([B, L, K]) at every forward
        (routing.ExpertRecorder). A plain attribute, not a child module: no
        parameter, and never part of a compiled graph (a compiled decode step
        returns its choices and the model reports them after it runs)."""
        if "_observers" not in self.__dict__:
            object.__setattr__(self, "_observers", [])
        return self.__dict__["_observers"]

    def report(self, indices: mx.array) -> None:
        for observe in self.observers:
            observe(indices)


@mx.compile
def combine_experts(routed: mx.array, weights: mx.array, shared: mx.array) -> mx.array:
    """Routed outputs [B, L, K, 1, D] weighted [B, L, K] and summed, plus the
    shared expert's. The size-1 row axis goes in the sum's own squeeze: one
    view fewer per layer than squeezing it first."""
    w = mx.expand_dims(weights, (-2, -1)).astype(routed.dtype)
    return (routed * w).sum(axis=(-3, -2)) + shared


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

    def forward(self, x, mask=None, cache=None) -> Tuple[mx.array, mx.array]:
        """The layer's output and the experts its MoE block chose, unreported:
        the compiled decode step returns them, and reports them after it runs
        (observers called while it is traced would keep placeholders)."""
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        rows = getattr(cache, "expert_rows", None)
        y, indices = self.feed_forward.forward(self.post_attention_layernorm(h), rows)
        return h + y, indices

    # Two of mlx_lm.lora's runs MLX cannot do on this model fail inside mlx-lm
    # with a traceback; each passes through one of these first and ends there
    # in one line (only when called from that mlx-lm function; see below).
    def named_modules(self):
        _refuse_dora_on_experts(sys._getframe(1))
        return super().named_modules()

    def unfreeze(self, *, recurse: bool = True, keys=None, strict: bool = False):
        _refuse_full_fine_tune_when_packed(sys._getframe(1), self, recurse and keys is None)
        return super().unfreeze(recurse=recurse, keys=keys, strict=strict)


class MobileMoEModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args) for _ in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, inputs: mx.array, cache=None, mask=None) -> mx.array:
        h = self.embed_tokens(inputs)
        if cache is None:
            cache = [None] * len(self.layers)
        if mask is None:
            mask = create_attention_mask(h, cache[0])
        for layer, c in zip(self.layers, cache):
            h = layer(h, mask, c)
        return self.norm(h)


class Model(nn.Module):
    # Which kernels the compiled decode step rotates and attends with:
    # "composed" (its own, what MLX's CPU wants), "fast" (MLX's fast.rope and
    # attention, what GPUs want), or None, by the default device.
    decode_kernels: Optional[str] = None

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = MobileMoEModel(args)
        quiet_config_warnings()
        # What a module keeps beside its parameters (a rope's frequencies)
        # is computed now, on this thread: left lazy, only the thread that
        # built it could ever evaluate it (MLX binds a lazy array to its
        # thread's stream), and a model loaded on one thread and run on
        # another would fail. Parameters are left to the loader, which
        # replaces them.
        mx.eval([a for path, a in held_arrays(self) if path.rsplit(".", 1)[-1].startswith("_")])

    def __getstate__(self):
        # A copy (copy.copy, deepcopy, pickle) makes its own compiled decode
        # step: this one's is bound to this tree (and holds MLX objects that
        # do not pickle).
        return {k: v for k, v in self.__dict__.items() if k != "_decode_step"}

    def __call__(self, inputs: mx.array, cache=None) -> mx.array:
        """Logits [B, L, vocab] for token ids [B, L].

        A one-token step through mlx-lm's KVCache (every decode step of
        generate, chat and the server) runs as compiled functions (the
        embedding, one per kind of layer, the head): a step of S is ~2,700
        operations that Python would otherwise build one by one, and the
        compiled graphs are replayed from C++ with their elementwise work
        between matmuls fused. Prefill, other caches (quantized,
        batched) and a step that must grow the buffers take the plain path."""
        if self.args.compiled_decode and _static_decode_applies(self, inputs, cache):
            return compiled_decode_step(self, inputs, cache)
        return self._logits(self.model(inputs, cache))

    def _logits(self, h: mx.array) -> mx.array:
        # Tied embeddings: the (possibly quantized) embedding is the output head.
        return self.model.embed_tokens.as_linear(h)

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

    def fusable(self):
        """(module, its parameter prefix) of every projection group that fuses."""
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}"
            yield layer.self_attn, f"{p}.self_attn"
            yield layer.feed_forward.shared_expert, f"{p}.feed_forward.shared_expert"

    def fuse_projections(self) -> None:
        """Stack q/k/v and the shared expert's gate/up of a model quantized in
        memory (bit-identical; see the module docstring)."""
        for module, _ in self.fusable():
            module.fuse_projections()

    def sanitize(self, weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
        """Converted directories are already in this module's names; an untied
        head some exporters add is dropped (the embedding is the head). Then,
        unless `fuse_projections` is off, quantized q/k/v and shared gate/up
        tensors are stacked and the module tree set up to take them (mlx-lm's
        loader calls this before it quantizes and loads the weights).

        Where MLX runs on the CPU, floating weights (quantized layers' scales
        and biases too) are cast to float32 first, as mobilemoe_mlx.load()
        does: MLX's CPU kernels run float16 and bfloat16 tens of times slower
        (docs/mlx-lm.md, "On the CPU", has mlx_lm.generate's figures) and have
        gather_mm in float32 only. So mlx-lm's tools run a float16 directory at
        float32 speed on the CPU; on a GPU the stored dtypes stay. A tool that
        saves what it loaded (mlx_lm.convert without --dtype, the quantizers)
        then saves float32 floats there."""
        _refuse_unsupported_tools(weights)
        weights = {k: v for k, v in weights.items() if not k.startswith("lm_head.")}
        if self.args.float32_on_cpu and mx.default_device().type == mx.DeviceType.cpu:
            weights = {k: _as_float32(v) for k, v in weights.items()}
        if self.args.fuse_projections:
            for module, prefix in self.fusable():
                module.fuse_weights(weights, prefix)
        return weights


def held_arrays(root) -> List[Tuple[str, mx.array]]:
    """(dotted path, array) for every array a module tree holds, parameters
    or not (a rope's `_freqs`, which `parameters()` leaves out)."""
    return [(k, v) for k, v in tree_flatten(root) if isinstance(v, mx.array)]


def realize(model: nn.Module) -> nn.Module:
    """Evaluate every array `model` holds, so that any thread can run it
    (see Model.__init__); mobilemoe_mlx's loaders end with this."""
    mx.eval([a for _, a in held_arrays(model)])
    return model


def _as_float32(a: mx.array) -> mx.array:
    if mx.issubdtype(a.dtype, mx.floating) and a.dtype != mx.float32:
        return a.astype(mx.float32)
    return a


# ---------------------------------------------------------------------------
# transformers' warnings about a MobileMoE config, which no user can act on.
# ---------------------------------------------------------------------------

# mlx-lm's tokenizer loader has transformers read the directory's config.json,
# which transformers does not know: it warns that it builds a generic config
# from a `mobilemoe` one, and checks the llama3 RoPE block by rules MobileMoE's
# released values break by design (equal low and high frequency factors; the
# original context equal to the context). The messages, and their loggers.
_CONFIG_WARNINGS = {
    "transformers.configuration_utils": ("You are using a model of type `mobilemoe` to ",),
    "transformers.modeling_rope_utils": (
        "`rope_parameters`'s high_freq_factor field must be greater than low_freq_factor",
        "`rope_parameters`'s original_max_position_embeddings field must be less than ",
    ),
}


class _MobileMoEConfigWarnings(logging.Filter):
    """Drops exactly those messages, and only while transformers reads a
    config whose model_type is "mobilemoe"; every other message passes."""

    mobilemoe_config_warnings = True  # how a second copy of this file finds it installed

    def __init__(self, starts: Tuple[str, ...]):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.getMessage().startswith(self.starts) and _reading_mobilemoe_config())


def _reading_mobilemoe_config() -> bool:
    """Whether transformers' PreTrainedConfig is being built from a
    mobilemoe config dict (its from_pretrained or from_dict is on the stack)."""
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code.co_name in ("from_pretrained", "from_dict") and \
                code.co_filename.endswith("configuration_utils.py"):
            config = frame.f_locals.get("config_dict")
            return isinstance(config, dict) and config.get("model_type") == "mobilemoe"
        frame = frame.f_back
    return False


def quiet_config_warnings() -> None:
    """Install the filter on transformers' loggers, once per process (each
    load through mlx-lm runs this file anew). Called when a Model is built,
    which mlx-lm's loader does before it loads the tokenizer."""
    for name, starts in _CONFIG_WARNINGS.items():
        logger = logging.getLogger(name)
        if not any(getattr(f, "mobilemoe_config_warnings", False) for f in logger.filters):
            logger.addFilter(_MobileMoEConfigWarnings(starts))


# ---------------------------------------------------------------------------
# mlx-lm tools this model cannot run: each ends in one line, not a traceback.
# They recognise the calling mlx-lm code (docs/architecture.md section 7).
# ---------------------------------------------------------------------------


def _refuse_dora_on_experts(caller) -> None:
    """mlx-lm has DoRA for linear layers and embeddings only: asked to put it
    on expert layers (its own SwitchLinear or ours), its linear_to_lora_layers
    raises a ValueError, a traceback on the console. It lists each layer's
    modules (this layer's named_modules) before converting them, so a DoRA run
    whose keys name the experts ends here first, in one line."""
    if caller.f_code.co_name != "linear_to_lora_layers" or not caller.f_locals.get("use_dora"):
        return
    if any("feed_forward.experts." in str(k) for k in caller.f_locals.get("keys") or ()):
        raise SystemExit(
            "error: DoRA cannot adapt MobileMoE's routed experts (mlx-lm has DoRA for "
            "linear layers only); use --fine-tune-type lora, or give lora_parameters "
            "keys that leave out feed_forward.experts.*")


def _refuse_full_fine_tune_when_packed(caller, layer: nn.Module, everything: bool) -> None:
    """mlx_lm.lora's full fine-tune (train_model) unfreezes every parameter of
    its layers; MLX has no gradient for packed (quantized) weights, so its
    first step would fail with a traceback."""
    if not everything or caller.f_code.co_name != "train_model":
        return
    if any(v.dtype == mx.uint32 for _, v in tree_flatten(layer.parameters())):
        raise SystemExit(
            "error: a full fine-tune needs float weights and this model's are quantized "
            "(MLX has no gradient for packed weights); fine-tune a dequantized copy "
            "(mlx_lm.convert -d --trust-remote-code) or use LoRA, which adapts quantized layers")


def _refuse_unsupported_tools(weights: Dict[str, mx.array]) -> None:
    """Stop, in one line and before they work, mlx-lm's quantizers that cannot
    quantize these weights: their loaders call `sanitize`, which calls this.

    mlx_lm.awq knows the architectures its own table names (which norm feeds
    which projections, to fold its scales into) and has none for MobileMoE;
    its scaling and clipping also assume weights laid out [..., out, in],
    while the routed experts are stored [E, in, out]. mlx_lm.gptq and
    mlx_lm.dynamic_quant quantize float layers only: on a quantized directory
    gptq writes the input back unchanged and dynamic_quant fails with a
    traceback."""
    tool = _calling_quantizer()
    if tool == "awq":
        raise SystemExit(
            "error: mlx_lm.awq has no MobileMoE configuration (it folds scales by "
            "per-architecture tables, and its routed experts are stored [E, in, out]); "
            "quantize with mlx_lm.convert -q, mlx_lm.gptq, mlx_lm.dynamic_quant or "
            "mlx_lm.dwq instead")
    if tool in ("gptq", "dynamic_quant") and any(k.endswith(".scales") for k in weights):
        raise SystemExit(
            f"error: mlx_lm.{tool} quantizes float weights, and this directory is "
            "quantized already; give it one converted with `python convert.py SOURCE "
            "--out DIR --no-quantize`")


def _calling_quantizer() -> Optional[str]:
    """The mlx_lm.quant module (awq, gptq, ...) whose code is loading this model, if any."""
    frame = sys._getframe(1)
    while frame is not None:
        path = Path(frame.f_code.co_filename)
        if path.parent.name == "quant" and path.parent.parent.name == "mlx_lm":
            return path.stem
        frame = frame.f_back
    return None


# ---------------------------------------------------------------------------
# The compiled decode step: a fast path a reader can skip. Every one-token
# step through mlx-lm's KVCache runs as mx.compile'd functions (the embedding,
# one per kind of layer, the head) with the weights as their inputs; the plain
# path above gives the same logits (tests/test_compiled_decode.py,
# tests/test_decode_staleness.py, tests/test_decode_layer_kinds.py).
# ---------------------------------------------------------------------------


def _static_decode_applies(model: Model, inputs: mx.array, cache) -> bool:
    """One token per sequence, through plain KVCaches with room for it (the
    compiled step neither allocates nor grows buffers: KVCache does that on the
    plain path, once every 256 tokens). Which layers run: DecodeStep."""
    if cache is None or inputs.ndim != 2 or inputs.shape[1] != 1:
        return False
    first = cache[0]
    return all(
        type(c) is KVCache and c.keys is not None and c.offset == first.offset
        and c.offset < c.keys.shape[2] for c in cache)


def compiled_decode_step(model: Model, inputs: mx.array, cache) -> mx.array:
    """`model`'s logits for one token per sequence, as compiled functions
    (Model.__call__ decides when it applies; DecodeStep runs them)."""
    # Never stale: the weights are the compiled functions' inputs, read
    # from the tree's slots at every step, and the traces are kept only
    # while the tree's structure is the traced one (TreeSlots says what
    # that checks and what it assumes) and the model asks for the kernels
    # they were traced with. What that costs a step, measured:
    # docs/benchmarks.md, "The decode step".
    # Any number of threads may run this at once on one model: a DecodeStep
    # is only read once made (a thread that finds it stale makes its own and
    # publishes it), and its traces never touch the model's tree (TreeSlots.shadow).
    step = model.__dict__.get("_decode_step")
    composed = _composed_kernels(model.decode_kernels)
    weights = None
    if step is not None and step.model is model and step.composed == composed:
        weights = step.slots.arrays()
    if weights is None:
        step = model._decode_step = DecodeStep(model, composed)
        weights = step.slots.arrays()
    if not step.applies or step.dropout_in_training():
        return model._logits(model.model(inputs, cache))
    return step(weights, inputs, cache)


def _composed_kernels(choice: Optional[str]) -> bool:
    """Whether the compiled step rotates and attends with its own composed
    operations ("composed": RotaryTable, decode_attention) or with MLX's fast
    kernels ("fast": fast.rope and fast.scaled_dot_product_attention); None
    picks by the default device: composed on the CPU, where the fast ones are
    no kernels but ~13 primitives each, fast on a GPU."""
    if choice is None:
        return mx.default_device().type == mx.DeviceType.cpu
    if choice not in ("composed", "fast"):
        raise ValueError(f"decode_kernels is {choice!r}; choose 'composed', 'fast' or None")
    return choice == "composed"


# Each DecodeStep's number, passed to its compiled functions as a constant.
# MLX keeps traces per thread, keyed by the Python function's address, and a
# function freed on one thread is forgotten by that thread's cache only; a new
# step's function at a freed address could then replay, on another thread, a
# trace of a structure the model no longer has. The number tells them apart.
_STEP_NUMBERS = itertools.count()


class DecodeStep:
    """The compiled decode step of one structure of `model`'s module tree
    (see TreeSlots): its slots, its made-once arrays and three kinds of
    compiled function: the embedding with the step's shared rows (`embed`),
    one layer (one per kind of layer, in `steps`) and the head (`head`).

    Why a function per layer, not one for the whole step: MLX replays a
    compiled function by walking its traced graph, an entry per operation
    and per input, and building each array anew. A whole step of S is ~1,700
    entries walked once, with the host's caches cold (in the pipelined loop
    the device's work runs between two builds); a layer is ~80, walked for
    each of 20 layers and warm after the first. Layers share a function when
    they are alike (`layer_signature`): one trace then serves them all, each
    call passing that layer's own arrays.

    It runs only on the model's own layers and MoE blocks: one wrapped to
    watch or change what passes (bench parity's taps, bench profile's timers)
    must be called at every step, not traced once."""

    def __init__(self, model: "Model", composed: bool):
        self.model, self.composed = model, composed
        self.number = next(_STEP_NUMBERS)
        self.slots = TreeSlots(model)
        self.moes = [getattr(layer, "feed_forward", None) for layer in model.layers]
        self.spans = self.slots.spans(model, model.layers)
        self.applies = self.slots.traceable and self.spans is not None and all(
            type(layer) is DecoderLayer and type(moe) is MoE
            and isinstance(layer.self_attn.rope, _ARRAY_OFFSET_ROPES)
            for layer, moe in zip(model.layers, self.moes))
        if not self.applies:
            return
        # A trace would freeze the random mask of a dropout in training mode
        # (mlx_lm.lora's train()): see dropout_in_training.
        self.dropouts = [c for c in self.slots.containers
                         if isinstance(c, _DROPOUTS) and getattr(c, "_p_1", 0.0) != 1.0]
        self.constants = DecodeConstants(model, composed)
        in_layers = {i for start, end in self.spans for i in range(start, end)}
        self.outside = [i for i in range(len(self.slots.array_keys)) if i not in in_layers]
        self.embed = mx.compile(self.trace_embed)
        self.head = mx.compile(self.trace_head)
        kinds: Dict[tuple, Any] = {}  # layer_signature -> its compiled function
        steps = []
        for i, layer in enumerate(model.layers):
            signature = layer_signature(layer)
            if signature not in kinds:  # traced on this layer, the first of its kind
                kinds[signature] = mx.compile(partial(self.trace_layer, i))
            steps.append(kinds[signature])
        self.steps = list(zip(self.spans, steps, self.constants.rope_index,
                              [moe.top_k for moe in self.moes], self.moes))

    def dropout_in_training(self) -> bool:
        """Whether a dropout would draw a random mask now: such steps take the
        plain path. Checked at every step, since train() and eval() only set
        an attribute."""
        return any(m.training for m in self.dropouts)

    def __call__(self, weights: List[mx.array], inputs: mx.array, cache) -> mx.array:
        offset = mx.array(cache[0].offset, dtype=mx.int32)
        outside = [weights[i] for i in self.outside]
        h, mask, rows = self.embed(self.number, outside, inputs, offset, cache[0].keys.shape[2])
        batch = inputs.shape[0]
        for c, ((start, end), step, rope, k, moe) in zip(cache, self.steps):
            # The buffers first: mx.compile matches a call to a trace input by
            # input, so a trace for another buffer size is told apart at once.
            h, c.keys, c.values, chosen = step(
                c.keys, c.values, self.number, weights[start:end], h, offset, mask,
                rows[rope] if rope >= 0 else (), self.constants.expert_rows(batch, k))
            c.offset += 1
            moe.report(chosen)  # the tree's own, while it holds
        return self.head(self.number, outside, h)

    # The traced functions. Each runs the model's own code on a private copy
    # of its part of the tree holding the placeholders (TreeSlots.shadow);
    # `number` is only a compile constant (see _STEP_NUMBERS).

    def trace_embed(self, number, outside, inputs, offset, capacity: int):
        """The step's hidden state, mask and RoPE rows."""
        model = self.slots.shadow(self.model, self.outside, outside, keep=self.model.layers)
        h = model.model.embed_tokens(inputs)
        return h, decode_mask(offset, capacity), self.constants.rotary_rows(offset, h.dtype)

    def trace_layer(self, i, keys, values, number, weights, h, offset, mask, rows, expert_rows):
        """Layer i's one-token forward over whole KV buffers."""
        start, end = self.spans[i]
        layer = self.slots.shadow(self.model.layers[i], range(start, end), weights)
        rotary = RotaryRows(self.constants, offset, rows) if self.composed else None
        c = StaticKV(keys, values, offset, rotary, expert_rows)
        h, chosen = layer.forward(h, mask, c)
        return h, c.keys, c.values, chosen

    def trace_head(self, number, outside, h):
        model = self.slots.shadow(self.model, self.outside, outside, keep=self.model.layers)
        return model._logits(model.model.norm(h))


def layer_signature(layer: nn.Module) -> tuple:
    """What a layer's trace depends on besides its arrays (which are inputs,
    and whose shapes and dtypes mx.compile keys its traces by): the class,
    keys and plain attributes of every module and container in it, in order,
    and which of them are one object met twice (a module used in two places
    of the layer holds one set of slots, not two). Two layers with equal
    signatures compute alike from their own arrays."""
    out: list = []
    seen: Dict[int, int] = {}

    def visit(c):
        if id(c) in seen:
            out.append(("again", seen[id(c)]))
            return
        seen[id(c)] = len(seen)
        keys = tuple(c.keys()) if isinstance(c, dict) else len(c)
        attrs = None
        if isinstance(c, nn.Module):
            # MoE's observers are called after a step runs, never traced.
            attrs = _plain({k: v for k, v in vars(c).items() if k != "_observers"})
        out.append((type(c), keys, attrs))
        for key, value in (c.items() if isinstance(c, dict) else enumerate(c)):
            if isinstance(value, (dict, list, tuple)):
                visit(value)
            elif not isinstance(value, mx.array):
                out.append((key, _plain(value)))

    visit(layer)
    return tuple(out)


def _plain(value):
    """`value` as something == compares by content where it is plain data
    (numbers, strings, containers of them), else by identity."""
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return (type(value), value)
    if isinstance(value, (set, frozenset)):
        return (type(value), frozenset(map(_plain, value)))
    if isinstance(value, (list, tuple)):
        return (type(value), tuple(map(_plain, value)))
    if isinstance(value, dict):
        return (dict, tuple((_plain(k), _plain(v)) for k, v in value.items()))
    return ("object", id(value))


class TreeSlots:
    """Where every array of a module tree sits, and what else the tree holds.

    The compiled decode step's weights are its inputs, read from these slots
    (container, key) at every step (`arrays`): whatever replaced an array in
    its slot (update, load_weights, apply, set_dtype, an optimizer step, an
    attribute assignment) or rewrote it in place (item assignment, which
    swaps the array's data under the same Python object) is what the step
    computes with. The trace itself depends on the rest of the tree: which
    modules, lists and dicts sit where, and (through `mx.compile`'s own
    cache) the arrays' shapes and dtypes. So every non-array slot's object is
    held and compared by identity, with every container's length (a key added
    or deleted); any difference means the tree is not the one traced, and
    the step is traced anew (update_modules, nn.quantize, LoRA conversion,
    assigning a module or a list element, fusing). Arrays held under a private
    key (`_freqs` of a rope: derived from the config, no parameter) count as
    structure too, since DecodeConstants groups ropes by them.

    Assumed, not checked: a module's plain Python attributes (eps, scale,
    group size, top_k...) and class do not change in place after it is
    traced; a dropout's training mode is the exception, checked every step
    (DecodeStep)."""

    def __init__(self, root: nn.Module):
        self.containers: List[Any] = []
        self.node_parents, self.node_keys, self.nodes = [], [], []
        self.array_parents, self.array_keys = [], []
        self.traceable = True  # False when an array sits in a tuple (no slot to trace)
        seen = set()

        def visit(container):
            seen.add(id(container))
            self.containers.append(container)
            items = container.items() if isinstance(container, dict) else enumerate(container)
            for key, value in items:
                if isinstance(value, mx.array):
                    self.traceable &= not isinstance(container, tuple)
                    self.array_parents.append(container)
                    self.array_keys.append(key)
                    if not (isinstance(key, str) and key.startswith("_")):
                        continue
                self.node_parents.append(container)
                self.node_keys.append(key)
                self.nodes.append(value)
                if isinstance(value, (dict, list, tuple)) and id(value) not in seen:
                    visit(value)

        visit(root)
        self.sizes = list(map(len, self.containers))
        self.array_type = [mx.array] * len(self.array_keys)

    def arrays(self) -> Optional[List[mx.array]]:
        """The arrays in the slots now, or None if the tree changed shape."""
        try:
            if not all(map(operator.is_, map(operator.getitem, self.node_parents,
                                             self.node_keys), self.nodes)):
                return None
            arrays = list(map(operator.getitem, self.array_parents, self.array_keys))
        except (KeyError, IndexError):
            return None
        if list(map(len, self.containers)) != self.sizes:
            return None
        if list(map(type, arrays)) != self.array_type:
            return None
        return arrays

    def spans(self, root: nn.Module, parts: List[nn.Module]) -> Optional[List[Tuple[int, int]]]:
        """Each of `parts` (subtrees of `root`) as the range of slots that
        holds its arrays, or None where a part shares a module or container
        with another part or with the rest of the tree (its arrays would not
        be its own range)."""
        reach = [_containers(part) for part in parts]
        rest = _containers(root, skip={id(part) for part in parts})
        if sum(map(len, reach)) + len(rest) != len(rest.union(*reach)):
            return None
        spans = []
        for ids in reach:
            mine = [i for i, c in enumerate(self.array_parents) if id(c) in ids]
            if mine and mine[-1] + 1 - mine[0] != len(mine):
                return None
            spans.append((mine[0], mine[-1] + 1) if mine else (0, 0))
        return spans

    def shadow(self, root, indices, arrays: List[mx.array], keep=()):
        """A private copy of the tree under `root` with `arrays` in the slots
        `indices` (a trace's placeholders): every module, list, dict and tuple
        reachable from `root` is copied (shallow: the same arrays and plain
        attributes), except the modules in `keep`, which are shared as they are.

        Why a copy: a trace runs the model's own code on placeholders, so they
        must sit where that code reads its arrays. Put into the model's own
        tree, they would be seen by every other thread running the model
        meanwhile (a forward pass that reads a placeholder fails with
        "Attempting to eval an array without a primitive"), and MLX traces
        each compiled function once per thread, so a service's threads trace
        while others decode. The copy is this trace's alone, and the model's
        tree is only ever read."""
        indices = list(indices)
        if len(arrays) != len(indices):  # a trace reused for a layer unlike it
            raise RuntimeError(f"{len(arrays)} arrays for {len(indices)} slots")
        keep_ids = {id(m) for m in keep}
        copies: Dict[int, Any] = {}

        def copy_of(c):
            if id(c) in keep_ids:
                return c
            if id(c) not in copies:
                if isinstance(c, tuple):
                    copies[id(c)] = tuple(
                        copy_of(v) if isinstance(v, (dict, list, tuple)) else v for v in c)
                else:
                    new = copies[id(c)] = copy.copy(c)
                    items = new.items() if isinstance(new, dict) else enumerate(new)
                    for key, value in list(items):
                        if isinstance(value, (dict, list, tuple)):
                            new[key] = copy_of(value)
            return copies[id(c)]

        top = copy_of(root)
        for i, a in zip(indices, arrays):
            copies[id(self.array_parents[i])][self.array_keys[i]] = a
        return top


def _containers(root, skip=frozenset()) -> set:
    """The ids of the dicts (modules) and lists reachable from `root` (through
    tuples too), not through those in `skip`. Tuples themselves are left out:
    immutable, they hold no slot, and one such as () is shared by everything."""
    seen, found, stack = set(), set(), [root]
    while stack:
        c = stack.pop()
        if id(c) in seen or id(c) in skip:
            continue
        seen.add(id(c))
        if not isinstance(c, tuple):
            found.add(id(c))
        stack.extend(v for v in (c.values() if isinstance(c, dict) else c)
                     if isinstance(v, (dict, list, tuple)))
    return found


class DecodeConstants:
    """What the compiled decode step of `model` takes as made-once arrays
    rather than building them in every step's graph. They derive from the
    config and the module tree's structure, never from the weights' values."""

    def __init__(self, model: "Model", composed: bool):
        self._rows: Dict[Tuple[int, int], Tuple[mx.array, mx.array]] = {}
        self._tables: Dict[Tuple[int, mx.Dtype], RotaryTable] = {}
        # The ropes the table rotates for, in groups that rotate alike at
        # the same head size: the first of each group with that size, and
        # each layer's group (-1: its rope rotates itself, see RotaryRows).
        # All of MobileMoE's layers are one group.
        self.ropes: List[Tuple[nn.Module, int]] = []
        self.rope_index: List[int] = []
        for layer in model.layers:
            rope, dims = layer.self_attn.rope, layer.self_attn.head_dim
            if not (composed and _rotates_by_table(rope)):
                self.rope_index.append(-1)
                continue
            j = next((j for j, (f, d) in enumerate(self.ropes)
                      if d == dims and _rope_alike(f, rope)), None)
            if j is None:
                j = len(self.ropes)
                self.ropes.append((rope, dims))
            self.rope_index.append(j)

    def rotary_table(self, dims: int, dtype: mx.Dtype) -> "RotaryTable":
        if (dims, dtype) not in self._tables:
            self._tables[dims, dtype] = RotaryTable(dims, dtype)
        return self._tables[dims, dtype]

    def rotary_rows(self, offset: mx.array, dtype: mx.Dtype) -> list:
        """Each rope group's (cos, sin) rows at `offset` in `dtype`."""
        return [self.rotary_table(dims, dtype).at(rope, offset) for rope, dims in self.ropes]

    def expert_rows(self, batch: int, k: int) -> Tuple[mx.array, mx.array]:
        """The lhs indices gather_qmm builds itself (an arange, reshaped and
        broadcast, in every layer of every step) for one-token steps with `k`
        experts a token: each (token, expert) pair's token row for the first
        projection, the pair's own row for the second."""
        if (batch, k) not in self._rows:
            token = mx.broadcast_to(mx.arange(batch, dtype=mx.uint32)[:, None, None],
                                    (batch, 1, k))
            pair = mx.arange(batch * k, dtype=mx.uint32).reshape(batch, 1, k)
            rows = (mx.contiguous(token), pair)
            # Evaluated before they are published: another thread may find them at
            # once, and a lazy array in two threads' graphs is evaluated by both at
            # once (a crash inside MLX's eval). RotaryTables are made whole likewise.
            mx.eval(rows)
            self._rows[batch, k] = rows
        return self._rows[batch, k]


class StaticKV:
    """One layer's KV buffers for a compiled decode step: mlx-lm's KVCache
    buffers (preallocated 256 positions at a time), written at an array
    offset, and read whole. Every step of a buffer size then has the same
    shapes, so one traced graph serves them all; the positions past the offset
    are masked out (`decode_mask`). `rotary` (the step's RoPE rows) and
    `attend` (decode_attention) stand in for fast.rope and fast attention on
    the CPU (see RotaryTable), None elsewhere; `expert_rows` are the experts'
    lhs indices."""

    def __init__(self, keys, values, offset, rotary=None, expert_rows=None):
        self.keys, self.values, self.offset = keys, values, offset
        self.rotary, self.expert_rows = rotary, expert_rows
        self.attend = None if rotary is None else decode_attention

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        self.keys = mx.slice_update(self.keys, keys, self.offset, axes=(2,))
        self.values = mx.slice_update(self.values, values, self.offset, axes=(2,))
        return self.keys, self.values


class RotaryTable:
    """RoPE for the compiled decode step on MLX's CPU backend, computed once
    a step instead of once a layer. There fast.rope is no kernel: MLX builds
    it from ~13 primitives per call (positions, frequencies, cos, sin, the
    rotation), and a decode step's host time goes by its number of
    operations. Here the rope module rotates one unit pair (1, 0) per
    frequency at the step's position, giving that position's cos and sin (the
    very values fast.rope computes), and each layer rotates with one matmul
    and one fused multiply-add. On a GPU, fast.rope is one kernel and stays.

    The rotation of a pair (x0, x1) is (x0 c - x1 s, x0 s + x1 c) =
    x * cos + (x @ swap) * sin, `swap` taking (x0, x1) to (-x1, x0) exactly."""

    def __init__(self, dims: int, dtype: mx.Dtype):
        unit = mx.zeros((1, 1, 1, dims), dtype=dtype)
        unit[..., ::2] = 1
        swap = mx.zeros((dims, dims), dtype=dtype)
        pairs = mx.arange(0, dims, 2)
        swap[pairs + 1, pairs] = -1
        swap[pairs, pairs + 1] = 1
        self.unit, self.swap = unit, swap
        mx.eval(self.unit, self.swap)

    def at(self, rope: nn.Module, offset: mx.array) -> Tuple[mx.array, mx.array]:
        """`rope`'s cos and sin rows at `offset`."""
        rows = rope(self.unit, offset=offset)  # (c0, s0, c1, s1, ...)
        cos = mx.repeat(rows[..., ::2], 2, axis=-1)
        sin = mx.repeat(rows[..., 1::2], 2, axis=-1)
        return cos, sin


class RotaryRows:
    """One position's RoPE rows for a layer of the compiled step on the CPU:
    those the step's embedding made for the layer's rope group, in the step's
    dtype (`DecodeConstants.rotary_rows`), or, for a layer rotating in another
    dtype (a model cast in part by `set_dtype`), made here from its own rope,
    as fast.rope would rotate in that dtype."""

    def __init__(self, constants: "DecodeConstants", offset: mx.array, rows):
        self.constants, self.offset, self.rows = constants, offset, rows

    def rotate(self, x: mx.array, rope: nn.Module) -> mx.array:
        if not _rotates_by_table(rope):
            return rope(x, offset=self.offset)
        table = self.constants.rotary_table(x.shape[-1], x.dtype)
        if self.rows and self.rows[0].dtype == x.dtype:
            cos, sin = self.rows
        else:
            cos, sin = table.at(rope, self.offset)
        return x * cos + (x @ table.swap) * sin


# mlx-lm's RoPE classes that rotate at an array offset (the compiled step's):
# fast.rope with fixed frequencies. DynamicNTKScalingRoPE takes max() of the
# offset in Python, so a model with it decodes on the plain path.
_ARRAY_OFFSET_ROPES = (nn.RoPE, Llama3RoPE, YarnRoPE, ProportionalRoPE, SuScaledRoPE)
_DROPOUTS = (nn.Dropout, nn.Dropout2d, nn.Dropout3d)


def _rotates_by_table(rope: nn.Module) -> bool:
    """Whether RotaryTable rotates as `rope` does: interleaved pairs
    (traditional) at angles linear in the position, by a class whose call is
    fast.rope (after at most a fixed scaling of the input)."""
    return (isinstance(rope, (nn.RoPE, Llama3RoPE, YarnRoPE, ProportionalRoPE))
            and getattr(rope, "traditional", False) is True)


def _rope_alike(a: nn.Module, b: nn.Module) -> bool:
    """Whether two rope modules rotate alike: same class, settings and tables."""
    def settings(m):
        return {k: v for k, v in vars(m).items() if k not in ("_no_grad", "_training")}

    return (type(a) is type(b) and settings(a) == settings(b) and a.keys() == b.keys()
            and all(isinstance(b[k], mx.array) and a[k].shape == b[k].shape
                    and a[k].dtype == b[k].dtype and mx.array_equal(a[k], b[k]).item()
                    for k in a))


def decode_attention(q, k, v, scale: float, mask: mx.array) -> mx.array:
    """One query per head over whole KV buffers, for the compiled step on the
    CPU, where fast.scaled_dot_product_attention is no kernel either: the
    same matmul, masked precise softmax and matmul as MLX's own fallback,
    without its broadcasts for grouped heads (the query heads of a KV head
    share a row block) and with the scale folded into the masking.
    q: [B, H, 1, hd], k and v: [B, Hkv, C, hd] -> [B, 1, H * hd], the heads
    already merged (one reshape, not two)."""
    B, H, _, hd = q.shape
    hkv = k.shape[1]
    scores = q.reshape(B, hkv, H // hkv, hd) @ k.swapaxes(-1, -2)  # [B, Hkv, H/Hkv, C]
    scores = mx.where(mask, scores * scale, -mx.inf)
    weights = mx.softmax(scores, axis=-1, precise=True)
    return (weights @ v).reshape(B, 1, H * hd)


def decode_mask(offset: mx.array, capacity: int) -> mx.array:
    """[capacity] True up to and including the new token's position `offset`.

    A masked position gets exactly zero attention weight, so reading whole
    buffers gives the values of reading the filled part while the rest is
    finite: mlx-lm's buffers start as zeros, and a position trimmed off keeps
    the key and value written there. Zero weight times a non-finite value is
    NaN, so after a step whose keys or values overflowed was trimmed away
    (a rejected draft, say), the compiled steps give NaN where the plain path,
    which reads only up to the offset, recovers."""
    return mx.arange(capacity) <= offset
