"""Will it fit? The paper's constraint M(N_total, T) <= budget as a tool.

Memory at context T = weights (all experts resident, INT4) + KV cache at T
(optionally 8-bit) + working memory of one prefill chunk. The first two are
exact counts (analytic.py); the third is an upper-bound estimate of the
activations alive at once (hidden states, FFN or expert intermediates,
attention scores when they are materialised, and one row of logits).

    python -m bench plan --model L --context 8192 --kv-bits 8

`fits_warning()` is the one-call check a loader (chat.py) can make before
loading a model.
"""

import os
from typing import Dict, Optional

from . import analytic

GB = 1e9
PHONE_BUDGETS = {"phone app, 3 GB": 3 * GB, "phone app, 5 GB": 5 * GB}


def machine_ram() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def working_bytes(config: dict, context: int, chunk: int = 2048, act_bytes: int = 2) -> int:
    """Estimated activations of one prefill chunk of `chunk` tokens (an upper bound)."""
    t = min(chunk, context)
    d, v = config["hidden_size"], config["vocab_size"]
    h, hd = config["num_attention_heads"], config.get("head_dim", 64)
    if analytic.is_moe(config):
        k, i = config["num_experts_per_tok"], config["intermediate_size"]
        ffn = 3 * config["intermediate_size_mlp"] + k * (3 * i + 2 * d)  # shared + routed
    else:
        ffn = 3 * config["intermediate_size"]
    hidden = 6 * d + 2 * (h + 2 * config["num_key_value_heads"]) * hd
    scores = h * min(context, max(t, 1)) * 4  # float32 scores per query row
    return int(t * (hidden + ffn) * act_bytes + t * scores + 4 * v)


def plan(config: dict, context: int, kv_bits: Optional[int] = None, bits: Optional[int] = 4,
         group_size: int = 32, dtype: str = "float16", chunk: int = 2048,
         budgets: Optional[Dict[str, float]] = None) -> dict:
    """Weights + KV cache + working memory at `context`, against each budget."""
    quant = analytic.Quant(bits=bits, group_size=group_size, dtype=dtype)
    weights = analytic.weight_bytes(config, quant)["total"]
    kv = analytic.kv_cache_bytes(config, context, dtype, kv_bits)
    work = working_bytes(config, context, chunk, analytic.DTYPE_BYTES[dtype])
    total = weights + kv + work
    budgets = dict(budgets or {**PHONE_BUDGETS, "this machine's RAM": machine_ram()})
    return {
        "context": context, "kv_bits": kv_bits, "bits": bits, "group_size": group_size,
        "dtype": dtype, "params": analytic.param_counts(config),
        "weights_bytes": weights, "kv_cache_bytes": kv, "working_bytes": work,
        "total_bytes": total,
        "budgets": {name: {"bytes": b, "fits": total <= b, "headroom_bytes": b - total}
                    for name, b in budgets.items()},
    }


def format_plan(name: str, p: dict) -> str:
    kv = f"{p['kv_bits']}-bit" if p["kv_bits"] else p["dtype"]
    q = f"INT{p['bits']} g{p['group_size']}" if p["bits"] else p["dtype"]
    lines = [
        f"{name}: {p['params']['total'] / 1e9:.3f}B params ({p['params']['active'] / 1e6:.0f}M active), "
        f"{q} weights, {kv} KV cache, context {p['context']}",
        f"  weights          {p['weights_bytes'] / GB:7.3f} GB",
        f"  KV cache         {p['kv_cache_bytes'] / GB:7.3f} GB",
        f"  working (est.)   {p['working_bytes'] / GB:7.3f} GB",
        f"  total            {p['total_bytes'] / GB:7.3f} GB",
    ]
    for budget, b in p["budgets"].items():
        verdict = "fits" if b["fits"] else "DOES NOT FIT"
        lines.append(f"  {budget:<22} {b['bytes'] / GB:6.2f} GB: {verdict} "
                     f"({b['headroom_bytes'] / GB:+.2f} GB)")
    return "\n".join(lines)


def fits_warning(config: dict, context: int, budget_bytes: Optional[float] = None,
                 **kwargs) -> Optional[str]:
    """None if the model fits `budget_bytes` (default: this machine's RAM) at
    `context`; otherwise a one-line warning to print before loading."""
    budget = budget_bytes if budget_bytes is not None else machine_ram()
    p = plan(config, context, budgets={"budget": budget}, **kwargs)
    if p["total_bytes"] <= budget:
        return None
    return (f"this model needs about {p['total_bytes'] / GB:.2f} GB at {context} tokens "
            f"(weights {p['weights_bytes'] / GB:.2f} + KV {p['kv_cache_bytes'] / GB:.2f} + "
            f"working {p['working_bytes'] / GB:.2f}); the budget is {budget / GB:.2f} GB")
