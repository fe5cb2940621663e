"""Which module of a model is which kind of operation (bench/profile's
groups), found by the modules' names in each decoder layer (mlx-lm's layout)."""

from typing import List, Tuple

import mlx.nn as nn

ATTENTION, NORMS, ROUTER, ROUTED, SHARED, DENSE, HEAD, OTHER = (
    "attention", "norms_rope", "router", "routed_experts", "shared_expert", "dense_ffn",
    "head", "other")
GROUPS = (ATTENTION, NORMS, ROUTER, ROUTED, SHARED, DENSE, HEAD, OTHER)
LABELS = {
    ATTENTION: "attention", NORMS: "norms and RoPE", ROUTER: "router", ROUTED: "routed experts",
    SHARED: "shared expert", DENSE: "dense FFN", HEAD: "head", OTHER: "other",
}
# What each group holds, for the JSON and the docs.
CONTENTS = {
    ATTENTION: "q/k/v/o projections, KV cache update, attention (and a QK-norm computed inline)",
    NORMS: "the layers' RMS norms, RoPE, QK-norm modules",
    ROUTER: "router matmul, expert selection, weighted combine of the experts",
    ROUTED: "the routed experts' gathered matmuls and SwiGLU",
    SHARED: "the always-on shared expert",
    DENSE: "a feed-forward block without experts (the dense baseline)",
    HEAD: "final norm and output projection",
    OTHER: "embedding, residual adds, mask, sampling: what no group's module ran",
}
MEASURED, ABSENT, NOT_RUN = "measured", "absent", "not run"

_ATTENTION_NAMES = ("self_attn", "attention", "attn")
_EXPERT_NAMES = ("experts", "switch_mlp")
_SHARED_NAMES = ("shared_expert", "shared_experts")
_FFN_NAMES = ("feed_forward", "mlp", "block_sparse_moe", "moe")


def _is_norm(name: str, module: nn.Module) -> bool:
    return isinstance(module, (nn.RMSNorm, nn.LayerNorm)) or name.endswith("norm")


def _children(module: nn.Module) -> List[Tuple[str, nn.Module]]:
    return [(k, v) for k, v in module.items() if isinstance(v, nn.Module)]


def _is_moe(module: nn.Module) -> bool:
    return any(name in _EXPERT_NAMES for name, _ in _children(module))


def targets(model: nn.Module, head: bool = True) -> List[Tuple[nn.Module, str, str]]:
    """(parent module, child name, group) of every module to time. `head`:
    also the final norm and the output projection (a prefill chunk does not
    compute them: nothing in the KV cache depends on the logits)."""
    inner = model["model"] if isinstance(model.get("model"), nn.Module) else model
    out = []
    if isinstance(inner.get("embed_tokens"), nn.Module):
        out.append((inner, "embed_tokens", OTHER))  # its as_linear is the tied head
    for layer in model.layers:
        for name, child in _children(layer):
            if _is_norm(name, child):
                out.append((layer, name, NORMS))
            elif name in _ATTENTION_NAMES:
                out.append((layer, name, ATTENTION))
                out += [(child, n, NORMS) for n, c in _children(child)
                        if n == "rope" or _is_norm(n, c)]
            elif _is_moe(child):
                out.append((layer, name, ROUTER))
                for n, _ in _children(child):
                    if n in _EXPERT_NAMES:
                        out.append((child, n, ROUTED))
                    elif n in _SHARED_NAMES:
                        out.append((child, n, SHARED))
            elif name in _FFN_NAMES:
                out.append((layer, name, DENSE))
    if head:
        out += [(inner, "norm", HEAD)] if isinstance(inner.get("norm"), nn.Module) else []
        out += [(model, "lm_head", HEAD)] if isinstance(model.get("lm_head"), nn.Module) else []
    return out


def groups_present(model: nn.Module) -> set:
    present = {g for _, _, g in targets(model)} | {OTHER}
    inner = model["model"] if isinstance(model.get("model"), nn.Module) else model
    if hasattr(inner.get("embed_tokens"), "as_linear") and "lm_head" not in model:
        present.add(HEAD)  # the tied embedding is the head
    return present
