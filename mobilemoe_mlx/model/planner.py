"""Will it fit? The paper's constraint M(N_total, T) <= budget as a tool.

Memory at context T = weights (all experts resident, INT4) + KV cache at T
(optionally 8-bit) + working memory of the last prefill chunk. The first two
are exact counts (model/analytic.py); the third is an upper-bound estimate of what
is alive at once while the last chunk runs (see `working_bytes`).

    python -m bench plan --model L --context 8192 --kv-bits 8

`fits_warning()` is the one-call check a loader (chat.py) can make before
loading a model.
"""

import os
from typing import Dict, Optional

from . import analytic

GB = 1e9
# Prompt tokens per prefill chunk, for chat (mlx-lm's prefill_step_size) and
# the benchmark alike: the largest power of two that keeps MobileMoE-S at
# 8,192 tokens within 1.1 GB in float16 by `plan()` (weights 0.793 + KV 0.168 +
# working 0.087 GB = 1.048 GB; 512 would give 1.112 GB, mlx-lm's 2048 1.495 GB).
PREFILL_CHUNK = 256
PHONE_BUDGETS = {"phone app, 3 GB": 3 * GB, "phone app, 5 GB": 5 * GB}


def machine_ram() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def working_bytes(config: dict, context: int, chunk: int = PREFILL_CHUNK, act_bytes: int = 2,
                  kv_element_bytes: Optional[float] = None) -> int:
    """Upper-bound estimate of the memory a prefill to `context` tokens needs
    beyond the weights and the exact KV cache, at its worst moment: the last
    chunk of `chunk` tokens, which attends over the whole context.

    - hidden states, q/k/v and FFN or expert intermediates of the chunk;
    - attention scores of the chunk against every key, `chunk x keys` per
      head in the activation dtype, where keys is the whole context for a
      full-attention layer (window + chunk for a sliding one), plus the
      boolean causal mask of the same shape. Layers run one after another, so
      only one layer's scores are alive; MLX masks and softmaxes them in place.
      MLX's CPU backend materialises them; Metal's fused attention kernel does
      not, so there the estimate is conservative by about that much;
    - KV cache slack: mlx-lm allocates caches in 256-token steps and grows
      one by concatenation (old and new buffer of one layer alive at once);
    - one row of float32 logits (the head runs for the last token only).

    `kv_element_bytes` is the bytes of one cached element (default: act_bytes).
    """
    t = max(1, min(chunk, context))
    d, v = config["hidden_size"], config["vocab_size"]
    h, hd = config["num_attention_heads"], analytic._head_dim(config)
    kvh, layers = config["num_key_value_heads"], config["num_hidden_layers"]
    if analytic.is_moe(config):
        k, i = config["num_experts_per_tok"], config["intermediate_size"]
        ffn = 3 * config["intermediate_size_mlp"] + k * (3 * i + 2 * d)  # shared + routed
    else:
        ffn = 3 * config["intermediate_size"]
    hidden = 6 * d + 2 * (h + 2 * kvh) * hd
    keys = max(min(context, w + t) if w else context for w in analytic._windows(config))
    scores = t * keys * (h * act_bytes + 1)
    kv_layer_token = 2 * kvh * hd * (act_bytes if kv_element_bytes is None else kv_element_bytes)
    kv_slack = layers * 256 * kv_layer_token + 2 * (context + 256) * kv_layer_token
    return int(t * (hidden + ffn) * act_bytes + scores + kv_slack + 4 * v)


def human_bytes(n: float) -> str:
    """Bytes with a unit scaled to the value: 512 B, 12.3 KB, 45.6 MB, 1.234 GB."""
    a = abs(n)
    for unit, scale, fmt in (("GB", 1e9, "{:.3f}"), ("MB", 1e6, "{:.1f}"), ("KB", 1e3, "{:.1f}")):
        if a >= scale:
            return f"{fmt.format(n / scale)} {unit}"
    return f"{n:.0f} B"


def human_count(n: float) -> str:
    """A parameter count with a unit scaled to it: 1.263B, 272M, 45.1K, 640."""
    a = abs(n)
    for unit, scale, fmt in (("B", 1e9, "{:.3f}"), ("M", 1e6, "{:.0f}"), ("K", 1e3, "{:.1f}")):
        if a >= scale:
            return fmt.format(n / scale) + unit
    return f"{n:.0f}"


def plan(config: dict, context: int, kv_bits: Optional[int] = None, bits: Optional[int] = 4,
         group_size: int = 32, dtype: str = "float16", chunk: int = PREFILL_CHUNK,
         budgets: Optional[Dict[str, float]] = None) -> dict:
    """Weights + KV cache + working memory at `context`, against each budget."""
    quant = analytic.Quant(bits=bits, group_size=group_size, dtype=dtype)
    weights = analytic.weight_bytes(config, quant)["total"]
    kv = analytic.kv_cache_bytes(config, context, dtype, kv_bits)
    work = working_bytes(config, context, chunk, analytic.DTYPE_BYTES[dtype],
                         analytic.kv_bytes_per_element(dtype, kv_bits))
    total = weights + kv + work
    budgets = dict(budgets or {**PHONE_BUDGETS, "this machine's RAM": machine_ram()})
    return {
        "context": context, "prefill_chunk": chunk, "kv_bits": kv_bits, "bits": bits, "group_size": group_size,
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
        f"{name}: {human_count(p['params']['total'])} params "
        f"({human_count(p['params']['active'])} active), "
        f"{q} weights, {kv} KV cache, context {p['context']}",
        f"  weights          {human_bytes(p['weights_bytes']):>10}",
        f"  KV cache         {human_bytes(p['kv_cache_bytes']):>10}",
        f"  working (est.)   {human_bytes(p['working_bytes']):>10}"
        f"  (prefill in chunks of {p['prefill_chunk']} tokens)",
        f"  total            {human_bytes(p['total_bytes']):>10}",
    ]
    for budget, b in p["budgets"].items():
        verdict = "fits" if b["fits"] else "DOES NOT FIT"
        head = human_bytes(b["headroom_bytes"])
        lines.append(f"  {budget:<22} {human_bytes(b['bytes']):>10}: {verdict} "
                     f"({'' if head.startswith('-') else '+'}{head})")
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
