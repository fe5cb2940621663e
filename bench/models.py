"""Which models the benchmark runs, and how it builds them.

A model name is a MobileMoE preset (S, M, L, tiny), ``pro`` (the dense
MobileLLM-Pro-shaped baseline), ``pro-tiny`` (a tiny dense model for tests),
``glm4-<preset>`` (mlx-lm's own glm4_moe class at that preset's shape: the
generic MoE a user would otherwise run, as a peer for the dedicated port), or
a converted MobileMoE directory. Presets get synthetic weights at the exact
published shape, built in memory: speed and memory do not depend on weight
values, but routing does, so the weights are random (never zeros) and the
routed experts spread over the tokens as they would in a trained model.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mobilemoe_mlx.checkpoints.config import GROUP_SIZES, MLX_BITS, PRESETS, preset_config
from mobilemoe_mlx.checkpoints.convert import DTYPES
from mobilemoe_mlx.checkpoints.synthetic import level_scale, random_packed_weight
from mobilemoe_mlx.errors import UserError
from mobilemoe_mlx.model import analytic

DENSE_NAMES = ("pro", "pro-tiny")
PEER_PREFIX = "glm4-"
PEER_NAMES = tuple(PEER_PREFIX + p for p in PRESETS)
MODEL_NAMES = (*PRESETS, *DENSE_NAMES, *PEER_NAMES)


def canonical(name: str) -> str:
    """A --model or --models entry with a preset's name spelled as MODEL_NAMES
    spells it, whatever its case (config.preset_name's rule: `s` is S, `PRO`
    is pro, `glm4-s` is glm4-S); anything else, a directory, as given."""
    return {known.lower(): known for known in MODEL_NAMES}.get(name.strip().lower(), name)


def names_help() -> str:
    """Every preset name model_config() takes, for the options' help."""
    return (f"{', '.join(PRESETS + DENSE_NAMES)}, {', '.join(PEER_NAMES)} (mlx-lm's glm4_moe "
            "class at that MobileMoE shape)")


@dataclass
class Built:
    name: str  # as given on the command line
    label: str  # what reports show ("MobileMoE-S", "MobileLLM-Pro", a path)
    model: nn.Module
    config: dict  # the config dict, with `quantization` as applied
    family: str  # "moe" or "dense"
    synthetic: bool
    source: str  # "synthetic" or the checkpoint path
    tokenizer: object = None  # the checkpoint's tokenizer, if it has one
    dtype: str = "float32"  # activations and KV cache (a checkpoint's own weight dtype)
    quant: analytic.Quant = analytic.Quant()  # how the weights are stored


def dtype_name(dtype: mx.Dtype) -> str:
    return str(dtype).rsplit(".", 1)[-1]


def storage_of(model: nn.Module):
    """(activation dtype, analytic.Quant) read from a loaded model's weights.

    The activation dtype is the model's floating weight dtype: the norms' (the
    embedding's scales when it is quantized decide the residual stream, and a
    converted checkpoint stores both in its one dtype). Scales and biases,
    bits and group size come from the quantized modules; the router and the
    expert-selection bias are float32 whatever the checkpoint's dtype."""
    modules = dict(model.named_modules())
    quantized = [(p, m) for p, m in modules.items()
                 if hasattr(m, "scales") and hasattr(m, "bits")]
    norms = [m.weight.dtype for m in modules.values() if isinstance(m, nn.RMSNorm)]
    embed = next((m for p, m in modules.items() if p.endswith("embed_tokens")), None)
    if embed is not None and hasattr(embed, "scales"):
        act = embed.scales.dtype
    elif norms:
        act = norms[0]
    else:
        act = embed.weight.dtype if embed is not None else mx.float32
    norm_dtype = dtype_name(norms[0] if norms else act)
    if not quantized:
        return dtype_name(act), analytic.Quant(bits=None, dtype=norm_dtype)
    linear = [m for p, m in quantized if not p.endswith("embed_tokens")] or [quantized[0][1]]
    first = linear[0]
    emb_scale = dtype_name(embed.scales.dtype) if embed is not None and hasattr(
        embed, "scales") else None
    return dtype_name(act), analytic.Quant(
        bits=first.bits, group_size=first.group_size, scale_dtype=dtype_name(first.scales.dtype),
        embedding_scale_dtype=emb_scale, dtype=norm_dtype)


def describe_storage(bits, group_size, dtype: str) -> str:
    """"INT4 g32 weights, float32 activations" (or unquantized)."""
    w = f"INT{bits} g{group_size} weights" if bits else "unquantized weights"
    return f"{w}, {dtype} activations"


def tiny_pro_config() -> dict:
    """A dense config small enough for tests, with a 3:1 local:global pattern."""
    from .dense import pro_config

    cfg = pro_config()
    cfg.update(vocab_size=512, hidden_size=64, intermediate_size=192, num_hidden_layers=4,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=16)
    cfg["layer_types"] = ["sliding_attention"] * 3 + ["full_attention"]
    return cfg


def glm4_config(config: dict) -> dict:
    """mlx-lm's glm4_moe arguments for a MobileMoE config: same widths, heads,
    experts, top-k, scaling and QK-norm; one expert group (no group routing),
    every layer MoE, the shared expert as `n_shared_experts` routed widths."""
    i = config["intermediate_size"]
    shared, rest = divmod(config["intermediate_size_mlp"], i)
    assert rest == 0, "shared expert width must be a multiple of the routed width"
    return {
        "model_type": "glm4_moe", "vocab_size": config["vocab_size"],
        "hidden_size": config["hidden_size"], "intermediate_size": config["intermediate_size_mlp"],
        "max_position_embeddings": config["max_position_embeddings"],
        "moe_intermediate_size": i, "norm_topk_prob": True,
        "num_attention_heads": config["num_attention_heads"], "n_group": 1,
        "head_dim": config["head_dim"], "topk_group": 1, "n_shared_experts": shared,
        "n_routed_experts": config["num_local_experts"],
        "routed_scaling_factor": config["routed_scaling_factor"],
        "num_experts_per_tok": config["num_experts_per_tok"], "first_k_dense_replace": 0,
        "num_hidden_layers": config["num_hidden_layers"],
        "num_key_value_heads": config["num_key_value_heads"],
        "rms_norm_eps": config["rms_norm_eps"], "rope_theta": config["rope_theta"],
        "rope_scaling": None, "use_qk_norm": True, "tie_word_embeddings": False,
        "attention_bias": False, "partial_rotary_factor": 1.0,
    }


def model_config(name: str) -> dict:
    """The config dict of a preset name (MoE preset, pro, pro-tiny or a glm4 peer).

    A peer's config is its MobileMoE preset's (so the analytic counts apply:
    same shapes) with the glm4_moe arguments under `peer`."""
    from .dense import pro_config

    if name.startswith(PEER_PREFIX) and name[len(PEER_PREFIX):] in PRESETS:
        config = preset_config(name[len(PEER_PREFIX):])
        config["peer"] = glm4_config(config)
        return config
    if name == "pro":
        return pro_config()
    if name == "pro-tiny":
        return tiny_pro_config()
    if name in PRESETS:
        return preset_config(name)
    raise UserError(
        f"unknown model {name!r}: use one of {', '.join(MODEL_NAMES)} or a converted directory")


def family(config: dict) -> str:
    if "peer" in config:
        return "peer"
    return "moe" if "num_local_experts" in config else "dense"


def model_class(config: dict):
    """(Model, ModelArgs) and the config dict those classes take."""
    if family(config) == "peer":
        from mlx_lm.models.glm4_moe import Model, ModelArgs
    elif family(config) == "moe":
        from mobilemoe_mlx.model.mobilemoe import Model, ModelArgs
    else:
        from .dense import Model, ModelArgs
    return Model, ModelArgs


def label(name: str) -> str:
    if name in PEER_NAMES:
        return f"mlx-lm glm4_moe at {name[len(PEER_PREFIX):]} shape"
    return {"pro": "MobileLLM-Pro", "pro-tiny": "MobileLLM-Pro (tiny)"}.get(
        name, f"MobileMoE-{name}" if name in PRESETS else name)


def instantiate(config: dict) -> nn.Module:
    """The (lazy, unquantized) module for a preset config, peers included."""
    Model, ModelArgs = model_class(config)
    return Model(ModelArgs.from_dict(config.get("peer", config)))


def _not_router(path: str, module: nn.Module) -> bool:
    # The router stays float32 and unquantized: routing is a discrete choice.
    return hasattr(module, "to_quantized") and not path.endswith("router")


def build_synthetic(name: str, dtype: str = "float32", bits: int = 4, group_size: int = 32,
                    seed: int = 0, config: Optional[dict] = None, fuse: bool = False) -> Built:
    """A model at `name`'s exact shape (or `config`'s, e.g. a depth-reduced
    preset) with random quantized weights. `fuse`: stack q/k/v and gate/up as
    loading a converted directory does (what the benchmark runs); unfused, the
    parameters keep the directory names (what the exporters write).

    Built lazily, quantized, then given fresh random packed weights and
    evaluated one layer at a time, so no float copy of the whole model ever
    exists (peak memory stays near the quantized size)."""
    # Imported here: mlx-lm pulls in transformers, and `bench -h` imports this module.
    from mobilemoe_mlx.model.mobilemoe import QuantizedExpertLinear, realize

    config = dict(config) if config is not None else model_config(name)
    model = instantiate(config)
    nn.quantize(model, group_size=group_size, bits=bits, class_predicate=_not_router)
    config["quantization"] = {"group_size": group_size, "bits": bits}
    config["synthetic"] = True
    dt = DTYPES[dtype]
    key = mx.random.key(seed)
    modules = dict(model.named_modules())
    # Fill each quantized module with mobilemoe_mlx/checkpoints/synthetic.py's random centred
    # levels (as a synthetic checkpoint has them), packed in MLX's format.
    for m in modules.values():
        if not hasattr(m, "scales"):
            continue
        key, k1 = mx.random.split(key)
        # Our experts are [E, in, out] (groups along out); everything else,
        # glm4's SwitchLinear included, is [..., out, in] (groups along in).
        ours = isinstance(m, QuantizedExpertLinear)
        fan_in = m.scales.shape[-2] if ours else m.weight.shape[-1] * 32 // bits
        scale = level_scale(fan_in, bits)
        m.weight = random_packed_weight(m.weight.shape, bits, k1)
        # Scales and biases in the activation dtype, as a conversion to that
        # dtype stores them and load() leaves them: in any other dtype every
        # quantized matmul would cast all of its scales at every step (at S in
        # float32 on the CPU, 12 casts a layer, most of the experts' data).
        m.scales = mx.full(m.scales.shape, scale, dtype=dt)
        m.biases = mx.full(m.scales.shape, -(1 << (bits - 1)) * scale, dtype=dt)
    for path, m in modules.items():
        if isinstance(m, nn.RMSNorm):
            m.weight = mx.ones(m.weight.shape, dtype=dt)
        elif path.endswith(("router", "mlp.gate")):  # ours, glm4's
            key, k1 = mx.random.split(key)
            m.weight = 0.02 * mx.random.normal(m.weight.shape, key=k1)  # float32
            if hasattr(m, "e_score_correction_bias"):
                key, k1 = mx.random.split(key)
                m.e_score_correction_bias = 0.01 * mx.random.normal(
                    m.e_score_correction_bias.shape, key=k1)
        elif path.endswith("feed_forward"):
            key, k1 = mx.random.split(key)
            m.expert_bias = 0.01 * mx.random.normal(m.expert_bias.shape, key=k1)
    if fuse and hasattr(model, "fuse_projections"):
        model.fuse_projections()  # what loading does to a converted directory (model/mobilemoe.py)
    mx.eval(model.model.embed_tokens.parameters())
    for layer in model.layers:
        mx.eval(layer.parameters())
    realize(model)  # what modules keep beside parameters too: any thread can run it
    quant = analytic.Quant(bits=bits, group_size=group_size, scale_dtype=dtype, dtype=dtype)
    return Built(name, label(name), model, config, family(config), True, "synthetic",
                 dtype=dtype, quant=quant)


def check_quantizable(name: str, bits: int, group_size: int) -> None:
    """A one-line UserError unless MLX can quantize preset `name` at bits/group_size."""
    if bits not in MLX_BITS:
        raise UserError(f"--bits must be one of {', '.join(map(str, MLX_BITS))}, not {bits}")
    if group_size not in GROUP_SIZES:
        raise UserError(f"--group-size must be one of {', '.join(map(str, GROUP_SIZES))}, "
                        f"not {group_size}")
    config = model_config(name)
    model = instantiate(config)  # lazy: nothing is computed
    for path, m in model.named_modules():
        if _not_router(path, m) and m.weight.shape[-1] % group_size:
            raise UserError(f"--group-size {group_size} does not divide {name}'s {path} "
                            f"input width {m.weight.shape[-1]}; choose a smaller group size")


def check_checkpoint(path: str, option: str = "--weights") -> Path:
    """The directory if it is a converted MobileMoE model, else a one-line UserError
    naming `option` (the command-line option that gave the path)."""
    from mobilemoe_mlx.checkpoints.loading import is_converted

    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{option} {path}: no such directory")
    if not p.is_dir() or not (p / "config.json").exists():
        raise UserError(f"{option} {path}: not a converted model directory (no config.json)")
    try:
        converted = is_converted(p)
    except json.JSONDecodeError as e:
        raise UserError(f"{option} {path}: config.json is not valid JSON ({e})") from e
    if not converted:
        raise UserError(f"{option} {path}: not a converted MobileMoE directory; "
                        "run `python convert.py SOURCE --out DIR` first")
    if not list(p.glob("*.safetensors")):
        raise UserError(f"{option} {path}: no .safetensors weights in the directory")
    return p


def is_checkpoint_name(name: str) -> bool:
    """True when a --models entry names a directory rather than a preset."""
    return name not in MODEL_NAMES and (Path(name).expanduser().exists() or "/" in name)


def load_checkpoint(path: str, option: str = "--weights") -> Built:
    """A converted MobileMoE directory (made by convert.py), with a clear error
    otherwise. Its dtypes, bits and group size are read from the loaded weights:
    a checkpoint runs in its own dtype."""
    from mobilemoe_mlx.checkpoints.loading import load_converted

    p = check_checkpoint(path, option)
    model, config = load_converted(p)  # realized: every array read
    try:
        from mobilemoe_mlx.checkpoints.loading import load_tokenizer

        tokenizer = load_tokenizer(p, config.get("eos_token_id"))
    except Exception:  # noqa: BLE001 - prompts fall back to the hashing tokenizer
        tokenizer = None
    dtype, quant = storage_of(model)
    return Built(str(p), f"{p.name} (checkpoint)", model, config, "moe", False, str(p),
                 tokenizer, dtype=dtype, quant=quant)


def build(name: str, weights: Optional[str] = None, **kwargs) -> Built:
    """A model by name: `weights` (a converted directory) replaces a MoE preset's
    synthetic weights; a name that is a directory is loaded as a checkpoint."""
    if is_checkpoint_name(name):
        return load_checkpoint(name, "--models")
    if weights is not None and name not in DENSE_NAMES:
        built = load_checkpoint(weights)
        built.name = name
        return built
    return build_synthetic(name, fuse=True, **kwargs)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter the model holds (quantized words, scales, biases)."""
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def config_for(model: str) -> dict:
    """A preset name, `pro`, or a directory with a config.json."""
    if model in MODEL_NAMES:
        return model_config(model)
    path = Path(model).expanduser()
    if (path / "config.json").is_file():
        try:
            return json.loads((path / "config.json").read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{path / 'config.json'} is not valid JSON ({e})") from e
    if path.exists():
        raise UserError(f"{model} has no config.json")
    return model_config(model)  # raises the unknown-model error
