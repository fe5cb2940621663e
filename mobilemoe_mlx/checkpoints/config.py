"""MobileMoE configs: the published presets and the checks a real config must pass.

A preset only ever stands in for a checkpoint that does not exist (synthetic
weights for tests and benchmarks); a real config.json always wins.
"""

import copy
import json
import math
import re
from typing import Any, Callable, Dict, NamedTuple, Optional

from ..errors import UserError
from ..model import analytic

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
RELEASED_SIZES = ("S", "M", "L")  # the presets Meta released checkpoints of


def preset_name(name: str) -> Optional[str]:
    """The preset `name` means, spelled as PRESETS spells it, or None. The one
    rule for model sizes on every command line (chat, convert, bench,
    synthetic): case does not matter, so `s` is S and `TINY` is tiny."""
    return {p.lower(): p for p in PRESETS}.get(name.strip().lower())


def preset_config(name: str) -> Dict[str, Any]:
    """A full config.json dict for a named preset (S, M, L or tiny, any case)."""
    preset = preset_name(name)
    if preset is None:
        raise UserError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)} "
                        "(any case)")
    config = copy.deepcopy(_COMMON)
    config.update(_SHAPES[preset])
    layers = config["num_hidden_layers"]
    config["no_rope_layers"] = [1] * layers
    config["layer_types"] = ["full_attention"] * layers
    return config


# Settings docs/architecture.md section 3 fixes; any other value would need a
# computation we do not do. Compared with their type too: JSON's 1 is not true.
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


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON's true is no count


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class Kind(NamedTuple):
    """What a config value must be: the words a message uses, and the test."""

    words: str
    test: Callable[[Any], bool]


POSITIVE_INT = Kind("a positive integer", lambda v: _is_int(v) and v > 0)
NON_NEGATIVE_INT = Kind("an integer of 0 or more", lambda v: _is_int(v) and v >= 0)
POSITIVE_NUMBER = Kind("a positive finite number",
                       lambda v: _is_number(v) and math.isfinite(v) and v > 0)
BOOLEAN = Kind("true or false", lambda v: isinstance(v, bool))

# Every field of config.json that the model (model/mobilemoe.py's ModelArgs), the converter
# or chat reads, and what it must be; (required, kind). Checked in one place,
# validate_config, when a checkpoint is converted and when a converted one loads.
_FIELDS = {
    "vocab_size": (True, POSITIVE_INT),
    "hidden_size": (True, POSITIVE_INT),
    "intermediate_size": (True, POSITIVE_INT),
    "intermediate_size_mlp": (True, POSITIVE_INT),
    "num_hidden_layers": (True, POSITIVE_INT),
    "num_attention_heads": (True, POSITIVE_INT),
    "num_key_value_heads": (True, POSITIVE_INT),
    "head_dim": (True, POSITIVE_INT),
    "num_local_experts": (True, POSITIVE_INT),
    "num_experts_per_tok": (True, POSITIVE_INT),
    "max_position_embeddings": (False, POSITIVE_INT),  # the context chat allows
    "rms_norm_eps": (False, POSITIVE_NUMBER),
    "rope_theta": (False, POSITIVE_NUMBER),
    "routed_scaling_factor": (False, POSITIVE_NUMBER),
    "expert_sort_threshold": (False, NON_NEGATIVE_INT),
    "fuse_projections": (False, BOOLEAN),
}
_ROPE_FIELDS = {  # inside rope_scaling (or rope_parameters); mlx-lm's llama3 RoPE reads them
    "factor": (True, POSITIVE_NUMBER),
    "original_max_position_embeddings": (True, POSITIVE_NUMBER),
    "low_freq_factor": (False, POSITIVE_NUMBER),
    "high_freq_factor": (False, POSITIVE_NUMBER),
    "rope_theta": (False, POSITIVE_NUMBER),
}
# A converted directory's `quantization`, as mlx-lm's loader reads it. Only the
# types: which sizes MLX takes depends on the mode, and MLX says so itself.
_MLX_QUANTIZATION = {
    "group_size": (True, POSITIVE_INT),
    "bits": (True, POSITIVE_INT),
    "mode": (False, Kind("a name such as \"affine\"", lambda v: isinstance(v, str))),
}


# The fields that hold token ids, in config.json, generation_config.json or a
# tokenizer's config: bos_token_id, eos_token_id, pad_token_id, decoder_start_token_id, ...
TOKEN_ID_FIELD = re.compile(r"_token_ids?$")


def shown(value) -> str:
    """A value as config.json spells it (strings quoted, true, null), cut short."""
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _bad(key: str, must: str, value) -> UserError:
    return UserError(f"config.json: {key} must be {must}, got {shown(value)}")


def _check_fields(block: Dict[str, Any], fields, prefix: str = "") -> None:
    missing = [prefix + k for k, (required, _) in fields.items() if required and k not in block]
    if missing:
        raise UserError(f"config.json lacks {', '.join(missing)}")
    for key, (_, kind) in fields.items():
        if key in block and not kind.test(block[key]):
            raise _bad(prefix + key, kind.words, block[key])


def rope_block(config: Dict[str, Any]) -> Dict[str, Any]:
    """The RoPE scaling block, whether written as `rope_scaling` (released
    checkpoints) or `rope_parameters` (our converted directories)."""
    return config.get("rope_scaling") or config.get("rope_parameters") or {}


def _check_rope(config: Dict[str, Any]) -> None:
    name = "rope_scaling" if config.get("rope_scaling") else "rope_parameters"
    rope = rope_block(config)
    if not isinstance(rope, dict):
        raise _bad(name, "an object (MobileMoE uses llama3-scaled RoPE)", rope)
    if not rope:
        raise UserError("config.json has no rope_scaling block; MobileMoE uses llama3-scaled RoPE")
    rope_type = rope.get("rope_type", rope.get("type"))
    if rope_type != "llama3":
        raise UserError(f"config.json uses rope_type {rope_type!r}; only 'llama3' is supported")
    _check_fields(rope, _ROPE_FIELDS, f"{name}.")
    if rope.get("low_freq_factor", 1.0) != rope.get("high_freq_factor", 1.0):
        raise UserError(
            "config.json's llama3 RoPE has low_freq_factor != high_freq_factor; "
            "only equal factors (as released) are supported"
        )
    if "rope_theta" not in rope and "rope_theta" not in config:
        raise UserError("config.json lacks rope_theta")


def _check_layers(config: Dict[str, Any]) -> None:
    layers = config["num_hidden_layers"]
    if config.get("sliding_window") or config.get("attention_chunk_size"):
        raise UserError("config.json asks for windowed attention; MobileMoE uses full attention only")
    for key in ("layer_types", "no_rope_layers"):
        if key in config and (not isinstance(config[key], list) or len(config[key]) != layers):
            got = (f"a list of {len(config[key])}" if isinstance(config[key], list)
                   else shown(config[key]))
            raise UserError(f"config.json: {key} must list each of its {layers} layers, got {got}")
    if any(t != "full_attention" for t in config.get("layer_types", [])):
        raise UserError("config.json has layers other than full_attention; not supported")
    if any(not _is_int(v) or v != 1 for v in config.get("no_rope_layers", [])):
        raise UserError("config.json has layers without RoPE; not supported")
    for key in ("moe_layers", "dense_layers", "first_k_dense_replace"):
        if config.get(key):
            raise UserError(f"config.json sets {key}; every MobileMoE layer is MoE, dense layers are not supported")


def token_ids_ok(value: Any, vocab_size: int) -> bool:
    """Whether `value` is what a *_token_id field may hold: null, a token id
    (an integer, not true or "2", in [0, vocab_size)) or a list of them."""
    ids = value if isinstance(value, list) else [value]
    return value is None or all(_is_int(i) and 0 <= i < vocab_size for i in ids)


def _check_token_ids(config: Dict[str, Any]) -> None:
    """Every *_token_id (eos_token_id, bos_token_id, pad_token_id, ...): one id
    or a list of them, each a token of the vocabulary (the embedding has a row
    for it; eos ids are what generation stops on); null means none."""
    vocab = config["vocab_size"]
    for key in sorted(k for k in config if TOKEN_ID_FIELD.search(k)):
        if not token_ids_ok(config[key], vocab):
            raise _bad(key, f"a token id below vocab_size ({vocab}) or a list of them",
                       config[key])


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
    """Raise UserError unless `config` describes the model docs/architecture.md
    describes, with every field the model reads of the right type and range.

    The one place config.json is checked: the converter calls it on a
    checkpoint's config, the loader on a converted directory's (which also
    carries mlx-lm's `quantization` block, marked by `source_layout`)."""
    if not isinstance(config, dict):
        raise UserError("config.json is not a JSON object")
    if config.get("model_type") != "mobilemoe":
        raise UserError(
            f"config.json has model_type {config.get('model_type')!r}, not 'mobilemoe': "
            "this is not a MobileMoE checkpoint"
        )
    _check_fields(config, _FIELDS)
    for key, expected in _FIXED.items():
        value = config.get(key, expected)
        if type(value) is not type(expected) or value != expected:
            raise UserError(f"config.json: {key} must be {shown(expected)} (MobileMoE as "
                            f"specified; nothing else is implemented), got {shown(value)}")
    if config["head_dim"] % 2:
        raise _bad("head_dim", "even (RoPE turns pairs of dimensions)", config["head_dim"])
    _check_rope(config)
    _check_layers(config)
    _check_token_ids(config)
    if config["num_experts_per_tok"] > config["num_local_experts"]:
        raise UserError("config.json chooses more experts per token than it has")
    if config["num_attention_heads"] % config["num_key_value_heads"]:
        raise UserError("config.json's attention heads are not a multiple of its KV heads")
    if "source_layout" in config and config.get("quantization") is not None:
        block = config["quantization"]
        if not isinstance(block, dict):
            raise _bad("quantization", "an object", block)
        _check_fields(block, _MLX_QUANTIZATION, "quantization.")


def check_config_fits(config: Dict[str, Any], stored_bytes: int, where: str) -> None:
    """Refuse a config whose shapes need more bytes than the weights hold.

    Every parameter takes at least one bit (MLX quantizes to as few as 1;
    mlx-lm's mixed_2_6 recipe to 2), so a config implying more than eight
    times as many parameters as there are bytes cannot belong to these
    weights (say, num_hidden_layers edited to a million)."""
    params = analytic.param_counts(config)["total"]  # arithmetic alone: nothing is built
    if params // 8 > stored_bytes + stored_bytes // 64 + 4096:
        raise UserError(
            f"config.json describes {params:,} parameters ({config['num_hidden_layers']} "
            f"layers of hidden size {config['hidden_size']}), but {where} holds only "
            f"{stored_bytes:,} bytes of tensors: the config does not belong to these weights"
        )
