"""The report's PNG plots: prefill and decode speed and decode memory against
the prompt length or context.

The x axis is logarithmic (contexts double) but labelled with the values
measured (16, 48, ...), not with powers of two that may fall between them; the
y axis starts at 0, so 0.276 against 0.300 MB looks as close as it is.
matplotlib is imported only when there is something to draw.
"""

from pathlib import Path
from typing import List, Optional

from .files import write_atomic

NO_MATPLOTLIB = ("matplotlib is not installed (`pip install matplotlib`, "
                 "or `pip install -e .[plots]`)")

# file name, results phase, x key, y from an entry, x label, y label
SPECS = [
    ("prefill", "prefill", "prompt_tokens", lambda e: e["tokens_per_s"]["median"],
     "prompt tokens", "prefill tokens/s"),
    ("decode", "decode", "context", lambda e: e["tokens_per_s"]["median"],
     "context tokens", "decode tokens/s"),
    ("memory", "decode", "context", lambda e: e["peak_memory_bytes"] / 1e6,
     "context tokens", "peak memory in decode (MB)"),
]


def _lines(results: dict, phase: str, xkey: str):
    return [(x["label"], sorted(x.get(phase, []), key=lambda e: e[xkey]))
            for x in results["models"] if x.get(phase)]


def figure(results: dict, spec):
    """The matplotlib figure of one spec, or None when its phase has no measurement."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator, StrMethodFormatter

    _, phase, xkey, yfun, xlabel, ylabel = spec
    lines = _lines(results, phase, xkey)
    if not lines:  # nothing to draw: no empty plot (and no legend warning)
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    top = 0.0
    for label, entries in lines:
        ys = [yfun(e) for e in entries]
        ax.plot([e[xkey] for e in entries], ys, "o-", label=label)
        top = max(top, *ys)
    ax.set_xscale("log", base=2)
    xs = sorted({e[xkey] for _, entries in lines for e in entries})
    ax.xaxis.set_major_locator(FixedLocator(xs))
    ax.xaxis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_ylim(0, 1.1 * top or 1)  # from 0, with room above the highest point
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    backend = results["machine"]["backend"]
    ax.set_title(f"{ylabel} ({results['machine']['chip']}, {backend})", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def make_plots(results: dict, out_dir) -> Optional[List[str]]:
    """prefill.png, decode.png, memory.png, each only when its phase has measurements
    (an interrupted run may have none); None when matplotlib is missing."""
    if not any(_lines(results, spec[1], spec[2]) for spec in SPECS):
        return []
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return None
    import matplotlib.pyplot as plt

    files = []
    for spec in SPECS:
        fig = figure(results, spec)
        if fig is None:
            continue
        path = Path(out_dir) / f"{spec[0]}.png"
        try:
            write_atomic(path, lambda tmp, fig=fig: fig.savefig(tmp, dpi=110, format="png"))
        finally:
            plt.close(fig)
        files.append(str(path))
    return files
