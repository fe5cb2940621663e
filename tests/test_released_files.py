"""What an independent reader of the released S-QAT file pinned (the pure-Java
port in integrallis/models, `MobileMoeQatLayoutIntegrationTest`; written out
here, not read from the code under test) against the layout this project
converts from and writes its synthetic checkpoints in (docs/conversion.md,
"What is known about the released files")."""

import json
import struct

from mobilemoe_mlx.checkpoints.config import preset_config
from mobilemoe_mlx.checkpoints.layout import QAT, model_weights, source_tensors
from mobilemoe_mlx.checkpoints.reading import TensorInfo, tensor_bytes

RELEASED_S_QAT_BYTES = 713_916_240
RELEASED_S_QAT_TENSORS = 443
Q_PROJ = "model.layers.0.self_attn.q_proj"
PINNED = {f"{Q_PROJ}.qweight": ("U8", (768, 384)), f"{Q_PROJ}.weight_scale": ("F16", (768, 24))}


def _s_qat_layout():
    return {e.name: e for w in model_weights(preset_config("S"))
            for e in source_tensors(w, QAT).values()}


def test_the_s_qat_layout_has_the_released_files_tensors():
    layout = _s_qat_layout()
    assert len(layout) == RELEASED_S_QAT_TENSORS
    assert {n: (layout[n].dtypes[0], layout[n].shape) for n in PINNED} == PINNED
    assert layout["model.layers.19.feed_forward.expert_bias"].shape == (60,)
    assert layout["model.norm.weight"].shape == (768,)
    # Its data fits the released file with room for a header of its 443 entries.
    data = tensor_bytes(TensorInfo(e.dtypes[0], e.shape) for e in layout.values())
    header = RELEASED_S_QAT_BYTES - 8 - data
    assert 443 * 80 < header < 443 * 200, header


def check_written_s_qat(path):
    """A written synthetic S-QAT file against the pinned facts (the end-to-end
    tier's full-size demo writes one: tests/test_synthetic_tokenizer.py)."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    assert len(header) == RELEASED_S_QAT_TENSORS
    assert {k: (header[k]["dtype"], tuple(header[k]["shape"])) for k in PINNED} == PINNED

