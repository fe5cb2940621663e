"""MobileMoE configs: the published presets and the checks a real config must pass.

A preset only ever stands in for a checkpoint that does not exist (synthetic
weights for tests and benchmarks); a real config.json always wins.
"""

import copy
from typing import Any, Dict

from . import analytic
from .errors import UserError

# Storage choices, defined once for the converter, the loader and the benchmark.
DTYPE_NAMES = ("float16", "bfloat16", "float32")  # floating dtypes a model can be stored in
GROUP_SIZES = (32, 64, 128)  # quantization group sizes MLX's affine kernels take
CONVERT_BITS = (4, 8)  # what the converter quantizes to
MLX_BITS = (2, 3, 4, 5, 6, 8)  # what MLX's affine quantization supports (bench's synthetic weights)

_COMMON = {
    "model_type": "mobilemoe",
    "architectures": ["MobileMoEForCausalLM"],
    "vocab_size": 128256,
    "head_dim": 64,
    "num_key_value_heads": 4,
    "num_local_experts": 60,
    "num_experts_per_tok": 4,
    "hidden_act": "silu",
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 16.0,
        "original_max_position_embeddings": 8192,
        "low_freq_factor": 1.0,
        "high_freq_factor": 1.0,
    },
    "interleave_moe_layer_step": 1,
    "use_qk_norm": True,
    "attn_temperature_tuning": False,
    "tie_word_embeddings": True,
    "attention_bias": False,
    "routed_scaling_factor": 2.5,
    "norm_topk_prob": True,
    "torch_dtype": "bfloat16",
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
}

# Shapes from docs/architecture.md section 1; M's row is an estimate.
_SHAPES = {
    "S": dict(num_hidden_layers=20, hidden_size=768, num_attention_heads=12,
              intermediate_size=384, intermediate_size_mlp=1536),
    "M": dict(num_hidden_layers=26, hidden_size=1024, num_attention_heads=16,
              intermediate_size=512, intermediate_size_mlp=2048),
    "L": dict(num_hidden_layers=32, hidden_size=1280, num_attention_heads=20,
              intermediate_size=640, intermediate_size_mlp=2560),
    # Small enough for MLX's CPU backend, but every feature of the real shape:
    # GQA (4 heads on 2 KV heads), top-k < experts, shared expert 4x routed.
    "tiny": dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, intermediate_size=32,
                 intermediate_size_mlp=128, num_local_experts=8,
                 num_experts_per_tok=2, vocab_size=512, bos_token_id=1,
                 eos_token_id=[2, 3]),
}

PRESETS = tuple(_SHAPES)


def preset_config(name: str) -> Dict[str, Any]:
    """A full config.json dict for a named preset (S, M, L or tiny)."""
    if name not in _SHAPES:
        raise UserError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    config = copy.deepcopy(_COMMON)
    config.update(_SHAPES[name])
    layers = config["num_hidden_layers"]
    config["no_rope_layers"] = [1] * layers
    config["layer_types"] = ["full_attention"] * layers
    return config


# Shape keys: every one a positive integer.
_REQUIRED = (
    "vocab_size", "hidden_size", "intermediate_size", "intermediate_size_mlp",
    "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "num_local_experts", "num_experts_per_tok",
)

# Settings docs/architecture.md section 3 fixes; any other value would need a computation we do not do.
_FIXED = {
    "hidden_act": "silu",
    "interleave_moe_layer_step": 1,
    "use_qk_norm": True,
    "attn_temperature_tuning": False,
    "tie_word_embeddings": True,
    "attention_bias": False,
    "norm_topk_prob": True,
    "scoring_func": "sigmoid",
    "n_shared_experts": 1,
}

# The released QAT block; anything else is a packing this converter does not know.
_QAT_FORMAT = {"format": "mobilemoe-int4-g32", "qmin": -8, "qmax": 7, "symmetric": True,
               "scale_dtype": "float16", "packed": True}


def rope_block(config: Dict[str, Any]) -> Dict[str, Any]:
    """The RoPE scaling block, whether written as `rope_scaling` (released
    checkpoints) or `rope_parameters` (our converted directories)."""
    return config.get("rope_scaling") or config.get("rope_parameters") or {}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_rope(config: Dict[str, Any]) -> None:
    rope = rope_block(config)
    if not isinstance(rope, dict) or not rope:
        raise UserError("config.json has no rope_scaling block; MobileMoE uses llama3-scaled RoPE")
    rope_type = rope.get("rope_type", rope.get("type"))
    if rope_type != "llama3":
        raise UserError(f"config.json uses rope_type {rope_type!r}; only 'llama3' is supported")
    for key in ("factor", "original_max_position_embeddings"):
        if not _is_number(rope.get(key)) or rope[key] <= 0:
            raise UserError(f"config.json's rope_scaling needs a positive number for {key}")
    if rope.get("low_freq_factor", 1.0) != rope.get("high_freq_factor", 1.0):
        raise UserError(
            "config.json's llama3 RoPE has low_freq_factor != high_freq_factor; "
            "only equal factors (as released) are supported"
        )
    theta = rope.get("rope_theta", config.get("rope_theta"))
    if not _is_number(theta) or theta <= 0:
        raise UserError("config.json needs a positive number for rope_theta")


def _check_layers(config: Dict[str, Any]) -> None:
    layers = config["num_hidden_layers"]
    if config.get("sliding_window") or config.get("attention_chunk_size"):
        raise UserError("config.json asks for windowed attention; MobileMoE uses full attention only")
    for key in ("layer_types", "no_rope_layers"):
        if key in config and (not isinstance(config[key], list) or len(config[key]) != layers):
            raise UserError(f"config.json's {key} must list each of its {layers} layers")
    if any(t != "full_attention" for t in config.get("layer_types", [])):
        raise UserError("config.json has layers other than full_attention; not supported")
    if any(v != 1 for v in config.get("no_rope_layers", [])):
        raise UserError("config.json has layers without RoPE; not supported")
    for key in ("moe_layers", "dense_layers", "first_k_dense_replace"):
        if config.get(key):
            raise UserError(f"config.json sets {key}; every MobileMoE layer is MoE, dense layers are not supported")


def check_qat_block(block: Any) -> int:
    """The group size of a QAT checkpoint's `quantization` block, if it is the released format."""
    if not isinstance(block, dict):
        raise UserError("config.json's quantization block is not an object")
    for key, expected in _QAT_FORMAT.items():
        if key in block and block[key] != expected:
            raise UserError(
                f"config.json's quantization block has {key}={block[key]!r}; only the released "
                f"format ({key}={expected!r}) is supported"
            )
    group = block.get("group_size", 32)
    if block.get("embedding_group_size", group) != group:
        raise UserError("QAT checkpoints with a different embedding group size are not supported")
    for key, axis in (("linear_group_axis", "in"), ("expert_group_axis", "out")):
        if key in block and not str(block[key]).startswith(axis):
            raise UserError(f"config.json's quantization block groups {key} along "
                            f"{block[key]!r}; the released layout groups along {axis!r}")
    if group not in GROUP_SIZES:
        raise UserError(f"config.json's quantization group_size {group!r} is not "
                        f"{', '.join(map(str, GROUP_SIZES))}")
    return group


def validate_config(config: Any) -> None:
    """Raise UserError unless `config` describes the model docs/architecture.md describes."""
    if not isinstance(config, dict):
        raise UserError("config.json is not a JSON object")
    if config.get("model_type") != "mobilemoe":
        raise UserError(
            f"config.json has model_type {config.get('model_type')!r}, not 'mobilemoe': "
            "this is not a MobileMoE checkpoint"
        )
    missing = [k for k in _REQUIRED if k not in config]
    if missing:
        raise UserError(f"config.json lacks {', '.join(missing)}")
    for key in _REQUIRED:
        if not isinstance(config[key], int) or isinstance(config[key], bool) or config[key] < 1:
            raise UserError(f"config.json's {key} must be a positive integer, not {config[key]!r}")
    for key, expected in _FIXED.items():
        if key in config and config[key] != expected:
            raise UserError(
                f"config.json sets {key}={config[key]!r}; MobileMoE as specified "
                f"uses {expected!r} and nothing else is implemented"
            )
    _check_rope(config)
    _check_layers(config)
    if config["num_experts_per_tok"] > config["num_local_experts"]:
        raise UserError("config.json chooses more experts per token than it has")
    if config["num_attention_heads"] % config["num_key_value_heads"]:
        raise UserError("config.json's attention heads are not a multiple of its KV heads")


def check_config_fits(config: Dict[str, Any], stored_bytes: int, where: str) -> None:
    """Refuse a config whose shapes need more bytes than the weights hold.

    Every parameter takes at least half a byte (INT4), so a config implying
    more than twice as many parameters as there are bytes cannot belong to
    these weights (say, num_hidden_layers edited to a million)."""
    params = analytic.param_counts(config)["total"]  # arithmetic alone: nothing is built
    if params // 2 > stored_bytes + stored_bytes // 64 + 4096:
        raise UserError(
            f"config.json describes {params:,} parameters ({config['num_hidden_layers']} "
            f"layers of hidden size {config['hidden_size']}), but {where} holds only "
            f"{stored_bytes:,} bytes of tensors: the config does not belong to these weights"
        )
