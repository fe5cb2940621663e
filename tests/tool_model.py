"""A tiny converted MobileMoE on which every mlx-lm option applies.

The tiny preset (head_dim 16, hidden 64) rules some options out: mlx-lm's
quantized KV cache (`--kv-bits`) quantizes each head in groups of 64 by
default, and its quantizers default to groups of 32 or 64 along every input
(and, for our experts, output) axis. This model's shapes divide by 64 on every
axis a quantizer or the KV cache groups, keeping the tiny preset's features
(GQA, top-k < experts, the shared expert 4x the routed width).

Use: import the fixtures you need into a test module, e.g.

    from tool_model import tool_int4, tool_dense  # noqa: F401  (pytest fixtures)

and ask for them by name. Both are session-scoped, built on first use, and
read-only (copy a directory before changing it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

# Each divides by 64 where a group runs: attention inputs (hidden 128, heads
# 4 x 64), expert outputs (2 x 64 for gate/up, 128 for down), the shared
# expert's input (256), the embedding's rows (128); head_dim 64 for --kv-bits.
TOOL_SHAPE = dict(num_hidden_layers=2, hidden_size=128, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64, intermediate_size=64,
                  intermediate_size_mlp=256, num_local_experts=8, num_experts_per_tok=2,
                  vocab_size=512)


def tool_config() -> dict:
    """The checkpoint config: the tests' tiny config with TOOL_SHAPE."""
    import checkpoints

    return {**checkpoints.tiny_config(), **TOOL_SHAPE}


@dataclass
class ToolModel:
    source: object  # checkpoints.Checkpoint: the unconverted checkpoint and its float64 weights
    path: Path  # the converted MLX directory (config.json, model.safetensors, mobilemoe.py)


def _build(tmp_path_factory, name: str, write: str, **convert_kwargs) -> ToolModel:
    import checkpoints

    from mobilemoe_mlx.checkpoints.convert import convert

    root = tmp_path_factory.mktemp(f"tool-{name}")
    source = getattr(checkpoints, write)(root / "source", config=tool_config())
    out = convert(str(source.path), str(root / name), dtype="float32", progress=False,
                  **convert_kwargs)
    return ToolModel(source, Path(out))


@pytest.fixture(scope="session")
def tool_int4(tmp_path_factory) -> ToolModel:
    """A QAT checkpoint converted as released models are: INT4 in groups of 32
    (experts bit for bit, grouped along their output axis), float32 otherwise,
    router float32 and unquantized. What LoRA/QLoRA, fuse, dequantize and the
    generation options run on."""
    return _build(tmp_path_factory, "int4", "write_qat")


@pytest.fixture(scope="session")
def tool_dense(tmp_path_factory) -> ToolModel:
    """A bf16 checkpoint converted unquantized to float32: what mlx-lm's
    quantizers (convert -q, gptq, awq, dwq, dynamic_quant) start from."""
    return _build(tmp_path_factory, "dense", "write_bf16", quantize=False)
