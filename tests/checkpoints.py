"""Writers of tiny MobileMoE checkpoints in the *released* layouts.

The tensor names are written out here from the table in docs/architecture.md
section 3, on purpose without importing mobilemoe_mlx.checkpoints.layout: these files are
an independent check of the converter's name table.

Every writer returns a `Checkpoint`: where it is, its config, and the float64
weights (bf16-layout names, fused experts) that tests/reference.py should run,
i.e. exactly the values stored (bf16-rounded, or q * scale for QAT).

Only the PyTorch pickles need torch: safetensors files are written here from
NumPy (bf16 as its bits), laid out as the safetensors library lays them out.
A test that needs torch skips, when it is missing, with `TORCH_MISSING`.
"""

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import numpy as np
import pytest
from reference import QAT_GROUP, pack_int4

from mobilemoe_mlx.checkpoints.config import preset_config
from mobilemoe_mlx.checkpoints.synthetic import write_tokenizer

# The tiny synthetic tokenizer's special tokens: 0 <|begin_of_text|>, 1 <|end_of_text|>,
# 2 <|eot|> (where its chat template ends a turn; 3 and 4 are the header's marks).
BOS, EOS = 0, [1, 2]

# The one reason every torch-needing test gives when it skips.
TORCH_MISSING = ("torch is not installed: the PyTorch pickle tests need it "
                 "(tests/run installs its CPU build)")


def import_torch():
    """torch, or a skip of the calling test with `TORCH_MISSING`."""
    return pytest.importorskip("torch", reason=TORCH_MISSING)


QAT_BLOCK = {
    "format": "mobilemoe-int4-g32", "group_size": 32, "embedding_group_size": 32,
    "qmin": -8, "qmax": 7, "symmetric": True, "scale_dtype": "float16", "packed": True,
    "linear_group_axis": "in (last dim of [out, in])",
    "expert_group_axis": "out (last dim of [E, in, out])",
}


@dataclass
class Checkpoint:
    path: Path  # what to hand the converter (a directory or a weights file)
    config: dict
    weights: Dict[str, np.ndarray]  # float64, bf16-layout names, fused experts
    # QAT only: bf16-layout name -> (q int8 [..., n], scale float16 [..., n/32])
    qat: Dict[str, Tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)


def tiny_config() -> dict:
    """The tiny preset, with original_max_position_embeddings lowered to 64 so
    that the llama3 frequency scaling changes rotations visibly within a
    16-token test sequence (at 8192 it only touches frequencies too low to
    matter at such short positions)."""
    config = preset_config("tiny")
    config["rope_scaling"] = dict(config["rope_scaling"], original_max_position_embeddings=64)
    config.update(bos_token_id=BOS, eos_token_id=EOS)
    return config


def _layer_names(i: int) -> Dict[str, str]:
    p = f"model.layers.{i}"
    return {
        "q": f"{p}.self_attn.q_proj.weight",
        "k": f"{p}.self_attn.k_proj.weight",
        "v": f"{p}.self_attn.v_proj.weight",
        "o": f"{p}.self_attn.o_proj.weight",
        "ln1": f"{p}.input_layernorm.weight",
        "ln2": f"{p}.post_attention_layernorm.weight",
        "router": f"{p}.feed_forward.router.weight",
        "bias": f"{p}.feed_forward.expert_bias",
        "gate_up": f"{p}.feed_forward.experts.gate_up_proj",
        "down": f"{p}.feed_forward.experts.down_proj",
        "sg": f"{p}.feed_forward.shared_expert.gate_proj.weight",
        "su": f"{p}.feed_forward.shared_expert.up_proj.weight",
        "sd": f"{p}.feed_forward.shared_expert.down_proj.weight",
    }


def _shapes(config: dict):
    """(name, kind, shape, fan_in) for every tensor, in bf16-layout names."""
    d, v = config["hidden_size"], config["vocab_size"]
    hd = config["head_dim"]
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    e, i, s = (config["num_local_experts"], config["intermediate_size"],
               config["intermediate_size_mlp"])
    out = [("model.embed_tokens.weight", "embedding", (v, d), d)]
    for n in range(config["num_hidden_layers"]):
        nm = _layer_names(n)
        out += [
            (nm["ln1"], "norm", (d,), d),
            (nm["q"], "linear", (q, d), d),
            (nm["k"], "linear", (kv, d), d),
            (nm["v"], "linear", (kv, d), d),
            (nm["o"], "linear", (d, q), q),
            (nm["ln2"], "norm", (d,), d),
            (nm["router"], "router", (e, d), d),
            (nm["bias"], "bias", (e,), e),
            (nm["gate_up"], "experts", (e, d, 2 * i), d),
            (nm["down"], "experts", (e, i, d), i),
            (nm["sg"], "linear", (s, d), d),
            (nm["su"], "linear", (s, d), d),
            (nm["sd"], "linear", (d, s), s),
        ]
    out.append(("model.norm.weight", "norm", (d,), d))
    return out


@dataclass(frozen=True)
class Bf16:
    """A bfloat16 tensor as its bits (NumPy has no bfloat16)."""
    bits: np.ndarray  # uint16

    @property
    def shape(self):
        return self.bits.shape


Tensor = Union[np.ndarray, Bf16]  # float32, float16 or uint8 arrays, or bf16


def _bf16(a: np.ndarray) -> Bf16:
    """Rounded to bfloat16 as torch and MLX round: to nearest, ties to even
    (through float32, as `torch.from_numpy(a.astype(float32)).bfloat16()`)."""
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return Bf16((bits >> 16).astype(np.uint16))


def _f64(t: Tensor) -> np.ndarray:
    if isinstance(t, Bf16):
        return (t.bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return t.astype(np.float64)


def _contiguous(t: Tensor, part) -> Tensor:
    """`part(t)` (an index or a transpose) as a tensor of its own."""
    if isinstance(t, Bf16):
        return Bf16(np.ascontiguousarray(part(t.bits)))
    return np.ascontiguousarray(part(t))


_DTYPE_NAMES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
                np.dtype(np.uint8): "U8"}
# The library's order of the data: by dtype, in this order, then by name.
_DATA_ORDER = ["F32", "BF16", "F16", "U8"]


def save_safetensors(tensors: Dict[str, Tensor], path: Path) -> int:
    """A safetensors file as the safetensors library (and so a release) lays it
    out: data ordered by dtype then name, a header padded to 8 bytes, the "pt"
    format metadata. Returns the bytes of tensor data."""
    data = {n: ("BF16", t.bits) if isinstance(t, Bf16) else (_DTYPE_NAMES[t.dtype], t)
            for n, t in tensors.items()}
    order = sorted(data, key=lambda n: (_DATA_ORDER.index(data[n][0]), n))
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name in order:
        dtype, a = data[name]
        header[name] = {"dtype": dtype, "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name in order:
            f.write(np.ascontiguousarray(data[name][1], data[name][1].dtype.newbyteorder("<")))
    return offset


# How much the residual stream carried from the embedding outweighs each
# layer's update (variance ratio). Random networks with discrete top-k routing
# are far more chaotic than trained ones; with every weight at the same scale a
# perturbation of a few percent flips routing choices and moves the logits a
# lot. A residual-dominant init is closer to how trained models behave.
RESIDUAL_RATIO = 3.0


def _std(name: str, kind: str, fan_in: int) -> float:
    std = 1.0 / math.sqrt(fan_in)
    if kind == "embedding":
        std *= math.sqrt(RESIDUAL_RATIO)
    elif name.endswith(("o_proj.weight", "down_proj.weight", "experts.down_proj")):
        std /= math.sqrt(RESIDUAL_RATIO)
    return std


def _int4_grid(rng, shape, std: float):
    """q in [-8, 7] (every group of 32 holds both -8 and 7) and per-group
    scales giving weights of about `std`."""
    groups = (*shape[:-1], shape[-1] // QAT_GROUP)
    q = rng.integers(-8, 8, (*groups, QAT_GROUP))
    q[..., 0], q[..., 1] = -8, 7
    q = rng.permuted(q, axis=-1).reshape(shape).astype(np.int8)
    scale = rng.uniform(0.7, 1.3, groups) * std / 4.6  # q has std ~4.6
    return q, scale


def _times_scale(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return (q.astype(np.float64).reshape(*scale.shape, QAT_GROUP)
            * scale.astype(np.float64)[..., None]).reshape(q.shape)


def _dense_value(rng, name: str, kind: str, shape, fan_in: int) -> np.ndarray:
    if kind == "norm":  # around 1, but not 1, so a dropped norm weight shows
        value = rng.uniform(0.6, 1.4, shape)
        # keep logits O(1) with the larger tied embedding
        return value / math.sqrt(RESIDUAL_RATIO) if name == "model.norm.weight" else value
    if kind == "bias":  # small but able to change some choices
        return rng.normal(0.0, 0.08, shape)
    if kind == "router":  # router logits O(2): well separated sigmoid scores
        return rng.normal(0.0, 2.0 / math.sqrt(fan_in), shape)
    return rng.normal(0.0, _std(name, kind, fan_in), shape)


# How a release stores each kind of small vector: the QAT release's table (the
# router float32, the rest bf16). `small_dtypes` overrides it per kind (issue 29:
# a bf16 release may keep them in float32, or another float dtype).
SMALL_DTYPES = {"router": "F32", "bias": "BF16", "norm": "BF16"}


def _stored(value: np.ndarray, dtype: str) -> Tensor:
    """`value` as a checkpoint stores it in `dtype` (BF16, F16 or F32)."""
    return _bf16(value) if dtype == "BF16" else value.astype(
        {"F16": np.float16, "F32": np.float32}[dtype])


def bf16_tensors(config: dict, seed: int, small_dtypes: Optional[Dict[str, str]] = None,
                 ) -> Tuple[Dict[str, Tensor], Dict[str, np.ndarray]]:
    """Random bf16-layout tensors (the small vectors as SMALL_DTYPES, updated
    with `small_dtypes`; everything else bf16) and their float64 values.

    The embedding, linears and experts lie on a per-group INT4 grid (groups of
    32 along the axis the INT4 format groups: the last axis of [out, in] and of
    [E, in, out]) up to bf16 rounding, as a bf16 export of quantization-aware
    trained weights would. Quantizing them to INT4 g32 along the right axis
    then loses about bf16's rounding only, while a wrong grouping axis or
    layout loses ~8% per weight; with generic Gaussian weights both lose ~8%
    and the two cannot be told apart by the logits.
    """
    small = {**SMALL_DTYPES, **(small_dtypes or {})}
    rng = np.random.default_rng(seed)
    tensors, ref = {}, {}
    for name, kind, shape, fan_in in _shapes(config):
        if kind in ("embedding", "linear", "experts"):
            q, scale = _int4_grid(rng, shape, _std(name, kind, fan_in))
            t = _bf16(_times_scale(q, scale))
        else:
            t = _stored(_dense_value(rng, name, kind, shape, fan_in), small[kind])
        tensors[name] = t
        ref[name] = _f64(t)
    return tensors, ref


def _qat_name(name: str, kind: str) -> Tuple[str, str]:
    if kind == "experts":  # experts.gate_up_proj -> experts.gate_up_qweight / gate_up_scale
        base = name[: -len("_proj")]
        return f"{base}_qweight", f"{base}_scale"
    base = name[: -len(".weight")]
    return f"{base}.qweight", f"{base}.weight_scale"


# The special tokens as a release's special_tokens_map.json spells them (AddedToken objects).
SPECIAL_TOKENS_MAP = {
    name: {"content": token, "lstrip": False, "normalized": False, "rstrip": False,
           "single_word": False}
    for name, token in (("bos_token", "<|begin_of_text|>"), ("eos_token", "<|end_of_text|>"))}


def write_tokenizer_files(out: Path, config: dict) -> None:
    """Every tokenizer file a release carries: tokenizer.json and
    tokenizer_config.json (with the chat template), special_tokens_map.json and
    generation_config.json, agreeing with `config` as a release's do."""
    write_tokenizer(out, config["vocab_size"])
    (out / "special_tokens_map.json").write_text(json.dumps(SPECIAL_TOKENS_MAP, indent=2))
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))


def _write_common(out: Path, config: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    write_tokenizer_files(out, config)


def write_qat(out: Path, seed: int = 1, config: Optional[dict] = None,
              small_dtypes: Optional[Dict[str, str]] = None) -> Checkpoint:
    """(a) QAT: packed INT4 + fp16 scales in one model.safetensors. `config`:
    another shape than the tiny preset's (tests/tool_model.py); `small_dtypes`:
    as bf16_tensors'."""
    small = {**SMALL_DTYPES, **(small_dtypes or {})}
    config = dict(config or tiny_config())
    config["quantization"] = dict(QAT_BLOCK)
    rng = np.random.default_rng(seed)
    tensors, ref, qat = {}, {}, {}
    for name, kind, shape, fan_in in _shapes(config):
        if kind in ("embedding", "linear", "experts"):
            q, scale = _int4_grid(rng, shape, _std(name, kind, fan_in))
            scale = scale.astype(np.float16)
            qname, sname = _qat_name(name, kind)
            tensors[qname] = pack_int4(q)
            tensors[sname] = scale
            ref[name] = _times_scale(q, scale)
            qat[name] = (q, scale)
            continue
        t = _stored(_dense_value(rng, name, kind, shape, fan_in), small[kind])
        tensors[name] = t
        ref[name] = _f64(t)
    _write_common(out, config)
    save_safetensors(tensors, out / "model.safetensors")
    return Checkpoint(out, config, ref, qat)


def write_bf16(out: Path, seed: int = 1, config: Optional[dict] = None,
               small_dtypes: Optional[Dict[str, str]] = None) -> Checkpoint:
    """(b) bf16 with fused experts, one model.safetensors (`config`, `small_dtypes`:
    as write_qat's)."""
    config = dict(config or tiny_config())
    tensors, ref = bf16_tensors(config, seed, small_dtypes)
    _write_common(out, config)
    save_safetensors(tensors, out / "model.safetensors")
    return Checkpoint(out, config, ref)


def per_expert_tensors(config: dict, tensors: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """Fused experts split into `experts.{j}.{gate,up,down}_proj.weight`, each [out, in]."""
    i = config["intermediate_size"]
    out = {}
    for name, t in tensors.items():
        if name.endswith("experts.gate_up_proj"):
            parent = name[: -len(".gate_up_proj")]
            for j in range(t.shape[0]):
                out[f"{parent}.{j}.gate_proj.weight"] = _contiguous(t, lambda a, j=j: a[j, :, :i].T)
                out[f"{parent}.{j}.up_proj.weight"] = _contiguous(t, lambda a, j=j: a[j, :, i:].T)
        elif name.endswith("experts.down_proj"):
            parent = name[: -len(".down_proj")]
            for j in range(t.shape[0]):
                out[f"{parent}.{j}.down_proj.weight"] = _contiguous(t, lambda a, j=j: a[j].T)
        else:
            out[name] = t
    return out


def write_bf16_per_expert(out: Path, seed: int = 1) -> Checkpoint:
    """(c) bf16 with one [out, in] tensor per expert projection."""
    config = tiny_config()
    tensors, ref = bf16_tensors(config, seed)
    _write_common(out, config)
    save_safetensors(per_expert_tensors(config, tensors), out / "model.safetensors")
    return Checkpoint(out, config, ref)


def _torch_tensor(torch, t: Tensor):
    if isinstance(t, Bf16):
        return torch.from_numpy(t.bits.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(t)


def write_pickle(out: Path, wrapper: str, prefix: str, filename: str, seed: int = 1,
                 as_file: bool = False) -> Checkpoint:
    """(d) a PyTorch pickle {wrapper: {prefix + name: tensor}}; `as_file` hands
    the converter the weights file itself rather than its directory. Needs torch."""
    torch = import_torch()
    config = tiny_config()
    tensors, ref = bf16_tensors(config, seed)
    _write_common(out, config)
    state = {prefix + k: _torch_tensor(torch, v) for k, v in tensors.items()}
    torch.save({wrapper: state, "step": 7}, out / filename)
    return Checkpoint(out / filename if as_file else out, config, ref)


def write_sharded(out: Path, seed: int = 1, shards: int = 3) -> Checkpoint:
    """(e) bf16 fused experts over several safetensors files plus
    model.safetensors.index.json."""
    config = tiny_config()
    tensors, ref = bf16_tensors(config, seed)
    _write_common(out, config)
    names = list(tensors)
    weight_map, total = {}, 0
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s::shards]}  # interleaved: layers span files
        total += save_safetensors(part, out / fname)
        weight_map.update(dict.fromkeys(part, fname))
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return Checkpoint(out, config, ref)
