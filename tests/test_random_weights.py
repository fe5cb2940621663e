"""The one generator of random quantized weights (mobilemoe_mlx/checkpoints/synthetic.py),
read back through MLX's own dequantize and NumPy, not through our packer."""

import mlx.core as mx
import numpy as np
import pytest

from mobilemoe_mlx.checkpoints.synthetic import (
    level_scale,
    pack_levels,
    random_levels,
    random_packed_weight,
)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_packed_levels_dequantize_to_themselves_in_mlx(bits):
    u = np.random.default_rng(bits).integers(0, 1 << bits, (3, 256)).astype(np.uint32)
    packed = pack_levels(mx.array(u), bits)
    assert packed.shape == (3, 256 * bits // 32) and packed.dtype == mx.uint32
    ones, zeros = mx.ones((3, 8)), mx.zeros((3, 8))
    back = mx.dequantize(packed, ones, zeros, group_size=32, bits=bits)
    np.testing.assert_array_equal(np.array(back), u.astype(np.float32))


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_random_weights_are_centred_levels_of_the_right_spread(bits):
    fan_in = 512
    packed = random_packed_weight((64, fan_in * bits // 32), bits, mx.random.key(0))
    scale = level_scale(fan_in, bits)
    scales = mx.full((64, fan_in // 32), scale)
    w = np.array(mx.dequantize(packed, scales, -(1 << (bits - 1)) * scales, group_size=32,
                               bits=bits))
    q = np.rint(w / scale)
    # u * scale + bias in float32: rounding relative to the bias, 2**(bits-1) * scale
    np.testing.assert_allclose(w, q * scale, rtol=0, atol=2**-20 * (1 << bits) * scale)
    top = (1 << (bits - 1)) - 1
    assert q.min() == -top and q.max() == top  # every centred level, never -2**(bits-1)
    assert abs(q.mean()) < 0.05 * top
    assert abs(w.std() * np.sqrt(fan_in) - 1) < 0.05  # weights of std 1/sqrt(fan_in)


def test_levels_exclude_the_uncentred_extreme():
    u = np.array(random_levels((100_000,), 4, mx.random.key(1)))
    assert u.min() == 1 and u.max() == 15
