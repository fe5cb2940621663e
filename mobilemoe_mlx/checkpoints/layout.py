"""The one mapping table between released checkpoint names and MLX module names.

Every weight of the model is listed once (`model_weights`), in MLX names and
logical shapes. `source_tensors` says which checkpoint tensors hold it in each
released layout, with the dtype and shape each must have. The converter checks
the whole table against the checkpoint before it reads any data: every tensor
must be consumed, every expected one present.

Shape legend: V = vocab, D = hidden, E = routed experts, I = expert width,
S = shared expert width, Q/KV = query/key-value widths. Linears are [out, in];
experts are [E, in, out] (the checkpoints' own orientation).
"""

from dataclasses import dataclass
from typing import Dict, List, Tuple

from ..errors import UserError
from .reading import TensorInfo, TensorSource

QAT, FUSED, PER_EXPERT = "qat", "bf16", "bf16-per-expert"
FLOAT_DTYPES = ("BF16", "F16", "F32")

LINEAR, EMBEDDING, EXPERTS, NORM, ROUTER, BIAS = (
    "linear", "embedding", "experts", "norm", "router", "bias")
QUANTIZABLE = (LINEAR, EMBEDDING, EXPERTS)
# The small vectors a float checkpoint may keep in any float dtype of its own
# (DeepSeek-V3's bf16 release keeps its routing bias in float32; nobody has seen
# MobileMoE's bf16 files): the router, the expert bias and the norms.
SMALL = (ROUTER, BIAS, NORM)


@dataclass(frozen=True)
class Weight:
    path: str  # MLX module path (a parameter path for BIAS)
    kind: str
    shape: Tuple[int, ...]  # logical, unpacked


@dataclass(frozen=True)
class Expected:
    name: str
    dtypes: Tuple[str, ...]
    shape: Tuple[int, ...]


def model_weights(config: dict) -> List[Weight]:
    """Every weight of the model, in MLX names, embedding first, layer by layer."""
    d, v = config["hidden_size"], config["vocab_size"]
    hd = config.get("head_dim") or d // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    e, i, s = config["num_local_experts"], config["intermediate_size"], config["intermediate_size_mlp"]
    weights = [Weight("model.embed_tokens", EMBEDDING, (v, d))]
    for n in range(config["num_hidden_layers"]):
        p = f"model.layers.{n}"
        ff = f"{p}.feed_forward"
        weights += [
            Weight(f"{p}.input_layernorm", NORM, (d,)),
            Weight(f"{p}.self_attn.q_proj", LINEAR, (q, d)),
            Weight(f"{p}.self_attn.k_proj", LINEAR, (kv, d)),
            Weight(f"{p}.self_attn.v_proj", LINEAR, (kv, d)),
            Weight(f"{p}.self_attn.o_proj", LINEAR, (d, q)),
            Weight(f"{p}.post_attention_layernorm", NORM, (d,)),
            Weight(f"{ff}.router", ROUTER, (e, d)),
            Weight(f"{ff}.expert_bias", BIAS, (e,)),
            Weight(f"{ff}.experts.gate_up_proj", EXPERTS, (e, d, 2 * i)),
            Weight(f"{ff}.experts.down_proj", EXPERTS, (e, i, d)),
            Weight(f"{ff}.shared_expert.gate_proj", LINEAR, (s, d)),
            Weight(f"{ff}.shared_expert.up_proj", LINEAR, (s, d)),
            Weight(f"{ff}.shared_expert.down_proj", LINEAR, (d, s)),
        ]
    weights.append(Weight("model.norm", NORM, (d,)))
    return weights


def detect_layout(source: TensorSource) -> str:
    names = source.info
    if "model.embed_tokens.qweight" in names:
        return QAT
    if any(".experts.0.gate_proj.weight" in n for n in names):
        return PER_EXPERT
    if "model.embed_tokens.weight" in names:
        return FUSED
    raise UserError(
        "cannot tell the checkpoint's layout: it has neither "
        "model.embed_tokens.qweight (QAT) nor model.embed_tokens.weight (bf16)"
    )


def _packed(shape, divisor):
    *lead, last = shape
    return (*lead, last // divisor)


def source_tensors(w: Weight, layout: str, group_size: int = 32) -> Dict[str, Expected]:
    """The checkpoint tensors that hold `w`, by role."""
    if layout == QAT and w.kind in QUANTIZABLE:
        if w.kind == EXPERTS:  # experts.gate_up_proj -> experts.gate_up_qweight
            base = w.path.removesuffix("_proj")
            names = (f"{base}_qweight", f"{base}_scale")
        else:
            names = (f"{w.path}.qweight", f"{w.path}.weight_scale")
        return {
            "qweight": Expected(names[0], ("U8",), _packed(w.shape, 2)),
            "scale": Expected(names[1], ("F16",), _packed(w.shape, group_size)),
        }
    if layout == QAT and w.kind == ROUTER:
        return {"weight": Expected(f"{w.path}.weight", ("F32",), w.shape)}
    if w.kind == BIAS:
        return {"weight": Expected(w.path, FLOAT_DTYPES, w.shape)}
    if w.kind == EXPERTS and layout == FUSED:
        return {"weight": Expected(w.path, FLOAT_DTYPES, w.shape)}
    if w.kind == EXPERTS and layout == PER_EXPERT:
        e, d_in, d_out = w.shape
        parent = w.path.rsplit(".", 1)[0]
        if w.path.endswith("gate_up_proj"):  # stored per expert as [out, in]
            return {
                f"{proj}.{j}": Expected(f"{parent}.{j}.{proj}_proj.weight", FLOAT_DTYPES,
                                        (d_out // 2, d_in))
                for j in range(e) for proj in ("gate", "up")
            }
        return {
            f"down.{j}": Expected(f"{parent}.{j}.down_proj.weight", FLOAT_DTYPES, (d_out, d_in))
            for j in range(e)
        }
    return {"weight": Expected(f"{w.path}.weight", FLOAT_DTYPES, w.shape)}


def check_tensors_against_layout(weights: List[Weight], layout: str, source: TensorSource,
                 group_size: int = 32) -> None:
    """Every expected tensor present with its dtype and shape, none left over,
    and the large floating tensors (embedding, linears, experts) in one dtype;
    the small vectors (SMALL) may each have any float dtype."""
    expected = {
        e.name: e for w in weights for e in source_tensors(w, layout, group_size).values()
    }
    small = {e.name for w in weights if w.kind in SMALL
             for e in source_tensors(w, layout, group_size).values()}
    missing = sorted(set(expected) - set(source.info))
    leftover = sorted(set(source.info) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing tensors: {_listing(missing)}")
    if leftover:
        problems.append(f"unexpected tensors: {_listing(leftover)}")
    float_dtypes: Dict[str, str] = {}  # dtype -> first tensor seen with it
    for name, exp in expected.items():
        got: TensorInfo = source.info.get(name)
        if got is None:
            continue
        if got.shape != exp.shape:
            problems.append(f"{name} has shape {list(got.shape)}, expected {list(exp.shape)}")
        elif got.dtype not in exp.dtypes:
            problems.append(f"{name} has dtype {got.dtype}, expected {' or '.join(exp.dtypes)}")
        elif exp.dtypes == FLOAT_DTYPES and name not in small:
            float_dtypes.setdefault(got.dtype, name)
    if len(float_dtypes) > 1:
        # A checkpoint's large tensors are saved in one dtype: a lone one in another
        # is a damaged header (BF16 and F16 have one size, so the byte counts cannot
        # tell) whose bytes would be read as other numbers.
        problems.append("the large floating tensors mix dtypes (" + ", ".join(
            f"{name} is {dtype}" for dtype, name in float_dtypes.items()) + ")")
    if problems:
        raise UserError(f"the checkpoint does not match its config ({layout} layout): "
                        + "; ".join(problems[:8])
                        + (f"; and {len(problems) - 8} more" if len(problems) > 8 else ""))


def _listing(names: List[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")
