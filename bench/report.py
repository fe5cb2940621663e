"""report.md and PNG plots from a results.json, and two runs side by side.

The report never measures anything: `python -m bench report DIR` rebuilds it
from DIR/results.json alone, so a run from another machine can be re-read.
"""

import json
from pathlib import Path
from typing import List, Optional

from mobilemoe_mlx.errors import UserError

from .schema import SCHEMA, SCHEMA_VERSION

PAPER = Path(__file__).parent / "paper_numbers.json"
GB, MB = 1e9, 1e6


def load_results(path) -> dict:
    """results.json from a file or a run directory, checked against the schema version."""
    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    if not p.is_file():
        raise UserError(f"{p} does not exist; run `python -m bench run --out DIR` first")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{p} is not valid JSON ({e})") from e
    if data.get("schema") != SCHEMA or data.get("schema_version") != SCHEMA_VERSION:
        raise UserError(f"{p} is not a results file of schema {SCHEMA} v{SCHEMA_VERSION}")
    return data


def paper_numbers() -> dict:
    return json.loads(PAPER.read_text())


def _key(model: dict) -> Optional[str]:
    """The paper's name for a model entry (S, M, L, pro) if it has one."""
    n = model["name"]
    return n if n in ("S", "M", "L", "pro") else None


def _range(st: dict, fmt="{:.2f}") -> str:
    return f"{fmt.format(st['median'])} ({fmt.format(st['min'])}-{fmt.format(st['max'])})"


def _pairs(models: List[dict]):
    """(MoE entry, dense entry) pairs to compare."""
    dense = [m for m in models if m["family"] == "dense"]
    return [(m, d) for m in models if m["family"] == "moe" for d in dense]


def _by(entries, key):
    return {e[key]: e for e in entries}


def _paper_prefill(paper, p: int) -> str:
    bits = [f"{r['pro'] / r['S']:.1f}x {r['device'].split(' (')[0]}"
            for r in paper["ttft_s"] if r["prompt_tokens"] == p]
    g = paper["mlx_gpu_prefill_speedup"]
    if p in g["prompt_tokens"]:
        bits.append(f"{g['S_over_pro'][0]}-{g['S_over_pro'][1]}x iPhone GPU (MLX)")
    return "; ".join(bits) or "-"


def _paper_decode(paper, c: int, moe: str = "S") -> str:
    bits = [f"{r[moe] / r['pro']:.1f}x {r['device'].split(' (')[0]}"
            for r in paper["decode_tokens_per_s"] if r["context"] == c and moe in r]
    return "; ".join(bits) or "-"


def build_report(results: dict, plots: Optional[List[str]] = None) -> str:
    """The markdown report of one run."""
    paper = paper_numbers()
    m, s = results["machine"], results["settings"]
    out = ["# MobileMoE benchmark report", ""]
    out += [
        f"- Device: {m['chip']} ({m['machine']}), {m['memory_bytes'] / GB:.1f} GB RAM, {m['os']}",
        f"- MLX {m['mlx']}, mlx-lm {m['mlx_lm']}, backend **{m['backend']}**, activations "
        f"{s['dtype']}, INT{s['bits']} group {s['group_size']} weights",
        f"- Prompts: {s['prompts']}; prefill step {s['prefill_step']}; {s['warmup']} warm-up + "
        f"{s['repeats']} timed repeats, median (min-max); {s['gen_tokens']} decode tokens per run",
        f"- Run at {results['created']}" + (" (**interrupted: partial results**)"
                                              if results.get("interrupted") else ""),
    ]
    if any(x["synthetic"] for x in results["models"]):
        out.append("- Synthetic weights at the exact published shapes (random INT4 values: "
                   "speed and memory are those of the real models; outputs are meaningless)")
    if m["backend"] != "Metal":
        out += ["", "> **CPU backend.** MLX's CPU kernels are scalar and single-threaded: the "
                "times below say nothing about an Apple device. Memory, bytes and FLOPs carry over."]
    out += ["", "## Models", "",
            "| model | params total / active | weights measured | weights analytic | "
            "read per decode token | KV per token |", "|---|---|---|---|---|---|"]
    for x in results["models"]:
        a = x["analytic"]
        out.append(
            f"| {x['label']} | {a['params']['total'] / 1e9:.3f}B / "
            f"{a['params']['active'] / 1e6:.0f}M | "
            f"{x.get('memory', {}).get('weights_bytes', 0) / GB:.3f} GB | "
            f"{a['weight_bytes']['total'] / GB:.3f} GB | "
            f"{a['weight_bytes']['decode_read_per_token'] / MB:.0f} MB | "
            f"{a['kv_bytes_per_token'] / 1e3:.1f} KB |")
    pairs = _pairs(results["models"])

    out += ["", "## Prefill (time to first token)", ""]
    head = "| prompt | " + " | ".join(f"{x['label']} TTFT s | tok/s" for x in results["models"])
    head += "".join(f" | {a['label']} vs {b['label']}" for a, b in pairs) + " | paper (S vs Pro) |"
    out += [head, "|" + "---|" * (2 + 2 * len(results["models"]) + len(pairs))]
    lengths = sorted({e["prompt_tokens"] for x in results["models"] for e in x.get("prefill", [])})
    for p in lengths:
        row = [str(p)]
        for x in results["models"]:
            e = _by(x.get("prefill", []), "prompt_tokens").get(p)
            row += [_range(e["ttft_s"]), f"{e['tokens_per_s']['median']:.1f}"] if e else ["-", "-"]
        for a, b in pairs:
            ea = _by(a.get("prefill", []), "prompt_tokens").get(p)
            eb = _by(b.get("prefill", []), "prompt_tokens").get(p)
            row.append(f"{eb['ttft_s']['median'] / ea['ttft_s']['median']:.2f}x"
                       if ea and eb else "-")
        row.append(_paper_prefill(paper, p))
        out.append("| " + " | ".join(row) + " |")

    out += ["", "## Decode", "",
            "Cache filled to the context first (untimed), then greedy tokens timed one by one. "
            "`build` is host-side graph building per step (Python, before `mx.eval`).", ""]
    head = "| context | " + " | ".join(f"{x['label']} tok/s | build ms" for x in results["models"])
    head += "".join(f" | {a['label']} vs {b['label']}" for a, b in pairs) + " | paper (S vs Pro) |"
    out += [head, "|" + "---|" * (2 + 2 * len(results["models"]) + len(pairs))]
    contexts = sorted({e["context"] for x in results["models"] for e in x.get("decode", [])})
    for c in contexts:
        row = [str(c)]
        for x in results["models"]:
            e = _by(x.get("decode", []), "context").get(c)
            row += ([_range(e["tokens_per_s"]), f"{e['graph_build_s']['median'] * 1e3:.2f}"]
                    if e else ["-", "-"])
        for a, b in pairs:
            ea = _by(a.get("decode", []), "context").get(c)
            eb = _by(b.get("decode", []), "context").get(c)
            row.append(f"{ea['tokens_per_s']['median'] / eb['tokens_per_s']['median']:.2f}x"
                       if ea and eb else "-")
        row.append(_paper_decode(paper, c))
        out.append("| " + " | ".join(row) + " |")
    if s.get("bandwidth_gbps"):
        out += ["", f"Memory-bound decode limit at {s['bandwidth_gbps']:.1f} GB/s "
                f"({s.get('bandwidth_source')}): bandwidth / (active weight bytes + KV bytes).", "",
                "| model | context | limit tok/s | achieved | fraction |", "|---|---|---|---|---|"]
        for x in results["models"]:
            for e in x.get("decode", []):
                if "bandwidth_bound_tokens_per_s" in e:
                    out.append(f"| {x['label']} | {e['context']} | "
                               f"{e['bandwidth_bound_tokens_per_s']:.1f} | "
                               f"{e['tokens_per_s']['median']:.2f} | {e['fraction_of_bound']:.1%} |")

    out += ["", "## Memory", "",
            "Peak = `mx.get_peak_memory()` within the phase (reset before it): weights + KV cache "
            "+ temporaries. RSS is the whole process.", "",
            "| model | phase | setting | peak | KV cache | RSS |", "|---|---|---|---|---|---|"]
    for x in results["models"]:
        mem = x.get("memory", {})
        out.append(f"| {x['label']} | weights | resident | {mem.get('weights_bytes', 0) / GB:.3f} GB"
                   f" | - | {(mem.get('rss_bytes') or 0) / GB:.2f} GB |")
        for e in x.get("prefill", []):
            out.append(f"| {x['label']} | prefill | {e['prompt_tokens']} tokens | "
                       f"{e['peak_memory_bytes'] / GB:.3f} GB | {e['kv_cache_bytes'] / MB:.1f} MB | "
                       f"{(e.get('rss_bytes') or 0) / GB:.2f} GB |")
        for e in x.get("decode", []):
            out.append(f"| {x['label']} | decode | context {e['context_filled']} | "
                       f"{e['peak_memory_bytes'] / GB:.3f} GB | {e['kv_cache_bytes'] / MB:.1f} MB | "
                       f"{(e.get('rss_bytes') or 0) / GB:.2f} GB |")
    rss = "; ".join(f"{r['context']}: S {r['S']} GB vs Pro {r['pro']} GB"
                    for r in paper["peak_rss_gb"])
    w = paper["weights_gb"]
    out += ["", f"Paper, for comparison: INT4 weights S {w['S']} GB, Pro {w['pro']} GB "
            f"(ExecuTorch, one fp16 scale per group; MLX adds a bias per group); "
            f"peak RSS on Galaxy S25 at context {rss}."]

    routed = [x for x in results["models"] if x.get("routing")]
    if routed:
        out += ["", "## Expert routing: real against dummy prompts", "",
                "Per layer, the number of distinct routed experts a prefill used, and how evenly "
                "(normalised entropy of the load: 1 = even). `touched` is the routed-expert weight "
                "a runtime that pages weights on use (mmap, as on phones) would bring in; MLX keeps "
                "every expert resident, so its own peak barely moves.", "",
                "| model | prompt | tokens | distinct experts/layer | evenness | touched | peak |",
                "|---|---|---|---|---|---|---|"]
        for x in routed:
            r = x["routing"]
            for kind, e in r["prompts"].items():
                out.append(f"| {x['label']} | {kind} | {r['tokens']} | {e['mean_distinct']:.1f} | "
                           f"{e['mean_entropy']:.2f} | {e['touched_expert_bytes'] / GB:.3f} GB | "
                           f"{e['peak_memory_bytes'] / GB:.3f} GB |")
            if "real_minus_repeat_peak_bytes" in r:
                out.append(f"| {x['label']} | real - repeat | | | | "
                           f"{r['real_minus_repeat_touched_bytes'] / GB:+.3f} GB | "
                           f"{r['real_minus_repeat_peak_bytes'] / MB:+.1f} MB |")
    if plots:
        out += ["", "## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    elif plots is not None:
        out += ["", "(Plots skipped: `pip install matplotlib`, or `pip install -e .[plots]`.)"]
    out += ["", f"Paper numbers from bench/paper_numbers.json: {paper['source']}. {paper['notes']}"]
    return "\n".join(out) + "\n"


def make_plots(results: dict, out_dir) -> Optional[List[str]]:
    """prefill.png, decode.png, memory.png; None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    out_dir = Path(out_dir)
    files = []
    specs = [
        ("prefill", "prefill", "prompt_tokens", lambda e: e["tokens_per_s"]["median"],
         "prompt tokens", "prefill tokens/s"),
        ("decode", "decode", "context", lambda e: e["tokens_per_s"]["median"],
         "context tokens", "decode tokens/s"),
        ("memory", "decode", "context", lambda e: e["peak_memory_bytes"] / GB,
         "context tokens", "peak memory in decode (GB)"),
    ]
    backend = results["machine"]["backend"]
    for fname, phase, xkey, yfun, xlabel, ylabel in specs:
        fig, ax = plt.subplots(figsize=(6, 4))
        for x in results["models"]:
            entries = sorted(x.get(phase, []), key=lambda e: e[xkey])
            if entries:
                ax.plot([e[xkey] for e in entries], [yfun(e) for e in entries], "o-",
                        label=x["label"])
        ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{ylabel} ({results['machine']['chip']}, {backend})", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out_dir / f"{fname}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(str(path))
    return files


def write_report(run_dir, plots: bool = True) -> Path:
    """Rebuild DIR/report.md (and the plots) from DIR/results.json."""
    run_dir = Path(run_dir)
    results = load_results(run_dir)
    files = make_plots(results, run_dir) if plots else []
    path = run_dir / "report.md"
    path.write_text(build_report(results, files))
    return path


def build_comparison(a: dict, b: dict, name_a: str, name_b: str) -> str:
    """Two runs side by side: medians of each and their ratio b/a."""
    def who(r):
        return f"{r['machine']['chip']}, {r['machine']['backend']}"

    out = ["# MobileMoE benchmark: two runs compared", "",
           f"- A = {name_a}: {who(a)}", f"- B = {name_b}: {who(b)}", "",
           "| model | measure | setting | A | B | B / A |", "|---|---|---|---|---|---|"]
    models_b = {x["label"]: x for x in b["models"]}
    for xa in a["models"]:
        xb = models_b.get(xa["label"])
        if xb is None:
            continue
        for phase, key, measure in (("prefill", "prompt_tokens", "prefill tok/s"),
                                    ("decode", "context", "decode tok/s")):
            eb = _by(xb.get(phase, []), key)
            for ea in xa.get(phase, []):
                if ea[key] in eb:
                    va = ea["tokens_per_s"]["median"]
                    vb = eb[ea[key]]["tokens_per_s"]["median"]
                    out.append(f"| {xa['label']} | {measure} | {ea[key]} | {va:.2f} | {vb:.2f} "
                               f"| {vb / va:.2f}x |")
            for ea in xa.get(phase, []):
                if ea[key] in eb:
                    va, vb = ea["peak_memory_bytes"] / GB, eb[ea[key]]["peak_memory_bytes"] / GB
                    out.append(f"| {xa['label']} | {phase} peak GB | {ea[key]} | {va:.3f} | "
                               f"{vb:.3f} | {vb / va:.2f}x |")
    return "\n".join(out) + "\n"


def write_comparison(dir_a, dir_b) -> Path:
    a, b = load_results(dir_a), load_results(dir_b)
    path = Path(dir_a) / "compare.md"
    path.write_text(build_comparison(a, b, str(dir_a), str(dir_b)))
    return path
