"""`bench profile`'s text: a Profile's groups, plain step and graph, for a person."""

from collections import Counter

from .groups import LABELS, MEASURED, OTHER
from .measure import Profile, ms_text, why


def _top(counts: Counter, n: int) -> str:
    merged = Counter()
    for k, v in counts.items():  # compiled functions' names list their ops: one entry
        merged["Compiled (fused)" if k.startswith("Compiled") else k] += v
    items = merged.most_common()
    shown = ", ".join(f"{k} {v}" for k, v in items[:n])
    return shown + (f", {len(items) - n} more kinds" if len(items) > n else "")


def graph_note(backend: str) -> str:
    if backend == "CPU":
        return ("counted on MLX's CPU backend, which builds fast.rms_norm, fast.rope and "
                "attention from elementary ops: a GPU's graph of the same step is smaller")
    return f"counted on the {backend} backend's graph"


def format_profile(p: Profile) -> str:
    lines = [f"profile of {p.model}: {p.backend} ({p.device}), {p.storage}; "
             f"median of {p.repeats} runs after a warm-up"]
    for ph in p.phases:
        title = (f"decode step: 1 token after {ph.context} in the KV cache" if ph.kind == "decode"
                 else f"prefill chunk: {ph.tokens} tokens after {ph.context} "
                      "(only the KV cache is evaluated, as mlx-lm's prefill does)")
        lines += ["", title, f"  {'group':<16} {'ms':>9} {'share':>7} {'build ms':>9} {'calls':>6}"]
        for g in ph.groups:
            if g.status != MEASURED:
                lines.append(f"  {LABELS[g.group]:<16} {g.status:>9}")
                continue
            lines.append(f"  {LABELS[g.group]:<16} {ms_text(g.seconds):>9} {ph.share(g):>7.1%} "
                         f"{ms_text(g.build_seconds):>9} {g.calls if g.group != OTHER else '':>6}")
        lines += [f"  {'instrumented':<16} {ms_text(ph.instrumented_seconds):>9} "
                  f"(the groups' sum; {ph.syncs} syncs)",
                  f"  {'plain step':<16} {ms_text(ph.plain_seconds):>9} "
                  f"(no wrappers, mx.compile on; {ms_text(ph.plain_build_seconds)} ms building)",
                  f"  graph: {ph.graph.nodes} nodes = {sum(ph.graph.kernels.values())} launching "
                  f"a kernel + {sum(ph.graph.views.values())} views ({graph_note(ph.graph.backend)})",
                  f"    kernels: {_top(ph.graph.kernels, 8)}",
                  f"    views: {_top(ph.graph.views, 6)}"]
    lines += ["", "why:"] + [f"  - {line}" for line in why(p)]
    lines += ["", "Groups are timed with a sync after each and mx.compile off; a norm computed "
              "inline (MobileMoE's QK-norm) counts under its module's group. docs/profile.md "
              "explains the figures."]
    return "\n".join(lines)
