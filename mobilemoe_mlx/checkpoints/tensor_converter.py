"""One released weight into MLX tensors: carried bit for bit (QAT INT4),
quantized, or cast, and each result checked for NaN and infinity.

convert.py decides what to convert and writes it; this is the per-tensor step.
"""

import math
from typing import Dict, List

import mlx.core as mx

from ..errors import UserError
from . import packing
from .layout import (
    BIAS,
    EXPERTS,
    NORM,
    PER_EXPERT,
    QAT,
    QUANTIZABLE,
    ROUTER,
    Weight,
    source_tensors,
)
from .reading import TensorSource


class TensorConverter:
    """Turns one Weight into MLX tensors; holds the choices made once per run."""

    def __init__(self, source: TensorSource, layout: str, dtype: mx.Dtype,
                 quantize: bool, bits: int, group_size: int, qat_group_size: int):
        self.source, self.layout, self.dtype = source, layout, dtype
        self.quantize, self.bits, self.group_size = quantize, bits, group_size
        self.qat_group_size = qat_group_size
        # QAT weights already are INT4 g32: asking for exactly that keeps them as they are.
        self.carry_qat = (layout == QAT and quantize and bits == 4
                          and group_size == qat_group_size)
        self.errors: Dict[str, float] = {}
        self.zero_scales: List[str] = []  # weights whose every scale is zero

    def _load(self, name: str) -> mx.array:
        """A checkpoint tensor, refused if it holds NaN or infinity: those would
        become a model that answers garbage, never an error."""
        a = self.source.load(name)
        if mx.issubdtype(a.dtype, mx.floating) and not mx.isfinite(a).all().item():
            raise UserError(f"the checkpoint's tensor {name} holds NaN or infinite values; "
                            "the checkpoint is damaged: download it again")
        return a

    def produce(self, w: Weight) -> Dict[str, mx.array]:
        arrays = self._produce(w)
        for name, a in arrays.items():
            if mx.issubdtype(a.dtype, mx.floating) and not mx.isfinite(a).all().item():
                raise UserError(
                    f"{name} does not fit in {str(a.dtype).split('.')[-1]} (it overflows to "
                    "infinity); convert with --dtype float32")
            if name.endswith(".scales") and not mx.any(a).item():
                self.zero_scales.append(w.path)
        error = self.errors.get(w.path, 0.0)
        if not math.isfinite(error):
            raise UserError(f"quantizing {w.path} gave a non-finite error ({error}); "
                            "convert with --no-quantize or --dtype float32")
        return arrays

    def specs(self, w: Weight):
        if w.kind in (ROUTER, BIAS):
            return {self._name(w): (w.shape, mx.float32)}
        if w.kind in QUANTIZABLE and self.quantize:
            *lead, last = w.shape
            words = (*lead, last * self.bits // 32)
            groups = (*lead, last // self.group_size)
            return {f"{w.path}.weight": (words, mx.uint32),
                    f"{w.path}.scales": (groups, self.dtype),
                    f"{w.path}.biases": (groups, self.dtype)}
        return {f"{w.path}.weight": (w.shape, self.dtype)}

    @staticmethod
    def _name(w: Weight) -> str:
        return w.path if w.kind == BIAS else f"{w.path}.weight"

    def _produce(self, w: Weight) -> Dict[str, mx.array]:
        roles = source_tensors(w, self.layout, self.qat_group_size)
        load = self._load
        if w.kind in (ROUTER, BIAS):
            return {self._name(w): load(roles["weight"].name).astype(mx.float32)}
        if w.kind == NORM:
            return {f"{w.path}.weight": load(roles["weight"].name).astype(self.dtype)}
        if self.carry_qat:
            weight, scales, biases = packing.qat_to_mlx(
                load(roles["qweight"].name), load(roles["scale"].name).astype(self.dtype))
            return {f"{w.path}.weight": weight, f"{w.path}.scales": scales,
                    f"{w.path}.biases": biases}
        full = self._dense(w, roles)
        if not self.quantize:
            return {f"{w.path}.weight": full.astype(self.dtype)}
        weight, scales, biases, err = packing.quantize(full, self.group_size, self.bits, self.dtype)
        self.errors[w.path] = err
        return {f"{w.path}.weight": weight, f"{w.path}.scales": scales,
                f"{w.path}.biases": biases}

    def _dense(self, w: Weight, roles) -> mx.array:
        load = self._load
        if self.layout == QAT:
            return packing.dequantize_qat(load(roles["qweight"].name), load(roles["scale"].name))
        if self.layout == PER_EXPERT and w.kind == EXPERTS:
            # Per-expert tensors are [out, in]; the model keeps experts [E, in, out].
            if w.path.endswith("gate_up_proj"):
                per_expert = [mx.concatenate([load(roles[f"gate.{j}"].name).T,
                                              load(roles[f"up.{j}"].name).T], axis=-1)
                              for j in range(w.shape[0])]
            else:
                per_expert = [load(roles[f"down.{j}"].name).T for j in range(w.shape[0])]
            return mx.stack(per_expert)
        return load(roles["weight"].name)
