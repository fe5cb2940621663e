"""INT4 formats: the released QAT packing and MLX's affine quantization.

Released QAT tensors (docs/architecture.md section 3): value = q * scale, q in [-8, 7], groups
of 32 along the last axis, two's-complement nibbles, two per byte, the even
index in the low nibble. MLX's affine format stores w = scale * u + bias with
u in [0, 15], eight nibbles per little-endian uint32, element 0 lowest.

With u = q + 8 and bias = -8 * scale both describe the same numbers, and
u = q + 8 (mod 16) is q with its top bit flipped. So the packed bytes, read
as uint32 words with every nibble's bit 3 flipped, are MLX's weights as they
are: no unpacking, no rounding.
"""

from typing import Tuple

import mlx.core as mx

_FLIP_SIGN_BITS = 0x88888888  # bit 3 of each of the eight nibbles in a word


def qat_to_mlx(qweight: mx.array, scale: mx.array) -> Tuple[mx.array, mx.array, mx.array]:
    """Released packed INT4 (uint8 [..., n/2], fp16 scales [..., n/g]) to MLX
    affine 4-bit (uint32 [..., n/8], scales, biases), bit for bit."""
    words = mx.contiguous(qweight).view(mx.uint32)
    weight = mx.bitwise_xor(words, mx.array(_FLIP_SIGN_BITS, dtype=mx.uint32))
    # -8 * scale only shifts the exponent: exact in the scale's own dtype.
    return weight, scale, -8 * scale


def unpack_qat(qweight: mx.array) -> mx.array:
    """The signed integers q in [-8, 7] of a packed uint8 tensor, as int8 [..., n]."""
    low = qweight & 0x0F
    high = qweight >> 4
    nibbles = mx.stack([low, high], axis=-1).reshape(*qweight.shape[:-1], -1)
    return (nibbles.astype(mx.int8) ^ 8) - 8  # two's complement of a nibble


def dequantize_qat(qweight: mx.array, scale: mx.array) -> mx.array:
    """q * scale in float32, where every product is exact."""
    q = unpack_qat(qweight).astype(mx.float32)
    group = q.shape[-1] // scale.shape[-1]
    grouped = q.reshape(*scale.shape, group) * scale.astype(mx.float32)[..., None]
    return grouped.reshape(q.shape)


def quantize(w: mx.array, group_size: int, bits: int, dtype: mx.Dtype,
             chunk_elements: int = 1 << 22):
    """MLX affine quantization computed in float32, scales stored in `dtype`.

    Works through the rows in chunks so the float32 temporaries stay small
    (a whole embedding in float32, plus its round trip, would be gigabytes).
    Returns (weight, scales, biases, max abs error of the stored result)."""
    *lead, last = w.shape
    rows = w.reshape(-1, last)
    step = max(1, chunk_elements // last)
    parts, max_error = [], 0.0
    for start in range(0, rows.shape[0], step):
        w32 = rows[start:start + step].astype(mx.float32)
        q, scales, biases = mx.quantize(w32, group_size, bits)
        scales, biases = scales.astype(dtype), biases.astype(dtype)
        restored = mx.dequantize(q, scales.astype(mx.float32), biases.astype(mx.float32),
                                 group_size, bits)
        error = mx.abs(restored - w32).max()
        mx.eval(q, scales, biases, error)
        parts.append((q, scales, biases))
        # max(0.0, nan) is 0.0: a NaN must stay visible, not vanish into the maximum.
        max_error = float(mx.maximum(mx.array(max_error), error).item())
    weight, scales, biases = (
        mx.concatenate([p[i] for p in parts]).reshape(*lead, -1) for i in range(3))
    return weight, scales, biases, max_error
