"""report.md and PNG plots from a results.json, and two runs side by side.

The report never measures anything: `python -m bench report DIR` rebuilds it
from DIR/results.json alone, so a run from another machine can be re-read.
"""

import json
from pathlib import Path
from typing import List

from mobilemoe_mlx.errors import UserError
from mobilemoe_mlx.model.planner import human_bytes as hb
from mobilemoe_mlx.model.planner import human_count

from .files import write_text_atomic
from .plots import NO_MATPLOTLIB, make_plots
from .schema import READABLE_VERSIONS, SCHEMA, structure_problem

PAPER = Path(__file__).parent / "paper_numbers.json"
GB = 1e9
PAPER_MOE = ("S", "M", "L")


def load_results(path) -> dict:
    """results.json from a file or a run directory, checked against the schema version."""
    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    if not p.is_file():
        raise UserError(f"{p} does not exist; run `python -m bench run --out DIR` first")
    try:
        data = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{p} is not valid JSON ({e})") from e
    except OSError as e:
        raise UserError(f"cannot read {p}: {e.strerror}") from e
    if (not isinstance(data, dict) or data.get("schema") != SCHEMA
            or data.get("schema_version") not in READABLE_VERSIONS):
        raise UserError(f"{p} is not a results file of schema {SCHEMA} "
                        f"v{'/'.join(map(str, READABLE_VERSIONS))}")
    problem = structure_problem(data)
    if problem:
        raise UserError(f"{p} does not have the structure of a results file ({problem}): "
                        "rerun `python -m bench run` or repair it (see bench/schema.py)")
    return data


def _directory(run) -> Path:
    """The run directory of a run directory or of its results file (given by name)."""
    p = Path(run)
    return p.parent if p.is_file() else p


def paper_numbers() -> dict:
    return json.loads(PAPER.read_text())


def _range(st: dict, fmt="{:.2f}") -> str:
    return f"{fmt.format(st['median'])} ({fmt.format(st['min'])}-{fmt.format(st['max'])})"


def _secs(st: dict) -> str:
    """A time's median (min-max), in ms when the median is under a second."""
    scale, unit = (1e3, "ms") if st["median"] < 1 else (1, "s")
    return (f"{st['median'] * scale:.2f} ({st['min'] * scale:.2f}-{st['max'] * scale:.2f}) "
            f"{unit}")


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


def _paper_moe(pairs) -> List[str]:
    """The paper's MoE sizes to show decode ratios for: those run (S, M, L), else S."""
    run = [a["name"] for a, _ in pairs if a["name"] in PAPER_MOE]
    return list(dict.fromkeys(run)) or ["S"]


def _storage(x: dict, s: dict) -> str:
    """"float32, INT4 g32" for a model entry (v1 files: the run's settings)."""
    q = x.get("quant") or {"bits": s["bits"], "group_size": s["group_size"]}
    w = f"INT{q['bits']} g{q['group_size']}" if q.get("bits") else "unquantized"
    return f"{x.get('dtype', s['dtype'])}, {w}"


def build_report(results: dict, plots=None) -> str:
    """The markdown report of one run. `plots`: the PNG paths; None when
    matplotlib is missing; "skipped" when plots were not asked for."""
    paper = paper_numbers()
    pairs = _pairs(results["models"])
    out = ["# MobileMoE benchmark report", ""]
    out += _header(results)
    out += _models_section(results, paper)
    out += _prefill_section(results["models"], pairs, paper)
    out += _decode_section(results["models"], pairs, paper)
    out += _bandwidth_section(results)
    out += _memory_section(results["models"], paper)
    out += _routing_section(results["models"])
    out += _plots_section(plots)
    out += ["", f"Paper numbers from bench/paper_numbers.json: {paper['source']}. {paper['notes']}"]
    return "\n".join(out) + "\n"


def _header(results: dict) -> List[str]:
    """Device, software, settings, and what kind of weights were measured."""
    m, s = results["machine"], results["settings"]
    out = [
        f"- Device: {m['chip']} ({m['machine']}), {m['memory_bytes'] / GB:.1f} GB RAM, {m['os']}",
        f"- MLX {m['mlx']}, mlx-lm {m['mlx_lm']}, backend **{m['backend']}**; synthetic models: "
        f"activations {s['dtype']}, INT{s['bits']} group {s['group_size']} weights "
        "(a checkpoint keeps its own, see Models)",
        f"- Prompts: {s['prompts']}; prefill step {s['prefill_step']}; {s['warmup']} warm-up + "
        f"{s['repeats']} timed repeats, median (min-max); {s['gen_tokens']} decode tokens per run",
        f"- Run at {results['created']}" + (" (**interrupted: partial results**)"
                                              if results.get("interrupted") else ""),
    ]
    if results.get("rss_peak_bytes"):
        out.append(f"- Peak RSS of the whole run (process-wide): {hb(results['rss_peak_bytes'])}")
    synthetic = [x for x in results["models"] if x["synthetic"]]
    if any(not x["name"].endswith("tiny") for x in synthetic):
        out.append(f"- Synthetic weights at the exact published shapes (random INT{s['bits']} values: "
                   "speed and memory are those of the real models; outputs are meaningless)")
    if any(x["name"].endswith("tiny") for x in synthetic):
        out.append("- Tiny test models (random weights at toy shapes): a smoke test of the "
                   "harness, not a measurement of MobileMoE or MobileLLM-Pro")
    if m["backend"] == "CPU":
        out += ["", "> **CPU backend.** MLX's CPU kernels are scalar and single-threaded: the "
                "times below say nothing about an Apple device. Memory, bytes and FLOPs carry over."]
    elif m["backend"] == "CUDA":
        out += ["", "> **CUDA backend.** An NVIDIA GPU through MLX's CUDA backend: the times are "
                "this GPU's, not an Apple device's. Memory, bytes and FLOPs carry over."]
    return out


def _table(header: List[str], rows: List[List[str]]) -> List[str]:
    """A markdown table: one separator cell per header cell, every row as wide
    (a cell's own "|" escaped, so a path cannot add a column)."""
    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    assert all(len(r) == len(header) for r in rows), "a row of another width than the header"
    return [line(header), "|" + "---|" * len(header)] + [line(r) for r in rows]


def _none(what: str) -> List[str]:
    """In place of a table without rows (an interrupted run): say what is missing."""
    return [f"(No {what}: the run stopped before any was measured.)"]


def _models_section(results: dict, paper: dict) -> List[str]:
    out = ["", "## Models", ""]
    rows = []
    for x in results["models"]:
        a = x["analytic"]
        measured = x.get("memory", {}).get("weights_bytes")
        rows.append([
            x["label"], _storage(x, results["settings"]),
            f"{human_count(a['params']['total'])} / {human_count(a['params']['active'])}",
            hb(measured) if measured is not None else "-", hb(a["weight_bytes"]["total"]),
            hb(a["weight_bytes"]["decode_read_per_token"]), hb(a["kv_bytes_per_token"])])
    out += _table(["model", "activations, weights", "params total / active", "weights measured",
                   "weights analytic", "read per decode token", "KV per token"],
                  rows) if rows else _none("model")
    h = paper["headline_speedup"]
    return out + ["", f"Paper headline (all settings, MobileMoE-S over MobileLLM-Pro): "
                  f"{h['prefill'][0]}-{h['prefill'][1]}x faster prefill, "
                  f"{h['decode'][0]}-{h['decode'][1]}x faster decode."]


def _prefill_section(models: List[dict], pairs, paper: dict) -> List[str]:
    out = ["", "## Prefill (time to first token)", ""]
    lengths = sorted({e["prompt_tokens"] for x in models for e in x.get("prefill", [])})
    if not lengths:
        return out + _none("prefill")
    header = ["prompt"] + [h for x in models for h in (f"{x['label']} TTFT", "tok/s")]
    header += [f"{a['label']} vs {b['label']}" for a, b in pairs] + ["paper (S vs Pro)"]
    rows = []
    for p in lengths:
        row = [str(p)]
        for x in models:
            e = _by(x.get("prefill", []), "prompt_tokens").get(p)
            row += [_secs(e["ttft_s"]), f"{e['tokens_per_s']['median']:.1f}"] if e else ["-", "-"]
        for a, b in pairs:
            ea = _by(a.get("prefill", []), "prompt_tokens").get(p)
            eb = _by(b.get("prefill", []), "prompt_tokens").get(p)
            row.append(f"{eb['ttft_s']['median'] / ea['ttft_s']['median']:.2f}x"
                       if ea and eb else "-")
        rows.append(row + [_paper_prefill(paper, p)])
    return out + _table(header, rows)


def _decode_section(models: List[dict], pairs, paper: dict) -> List[str]:
    paper_moe = _paper_moe(pairs)
    out = ["", "## Decode", ""]
    contexts = sorted({e["context"] for x in models for e in x.get("decode", [])})
    if not contexts:
        return out + _none("decode")
    out += ["Cache filled to the context first (untimed), then greedy tokens timed in the loop "
            "mlx_lm.generate runs (step i+1 queued before token i is read). `build` is the host "
            "time to build one step's graph; `kernels` the operations in that graph that launch "
            "a kernel (views such as reshape and slice left out), on this backend: on the CPU, "
            "fast.rms_norm, RoPE and attention are built from many primitives, so CPU counts "
            "are not GPU counts.", ""]
    header = ["context"] + [h for x in models
                            for h in (f"{x['label']} tok/s", "build ms", "kernels")]
    header += [f"{a['label']} vs {b['label']}" for a, b in pairs]
    header += [f"paper ({k} vs Pro)" for k in paper_moe]
    rows = []
    for c in contexts:
        row = [str(c)]
        for x in models:
            e = _by(x.get("decode", []), "context").get(c)
            # Older runs (and Swift runs) have no kernel count.
            row += ([_range(e["tokens_per_s"]), f"{e['graph_build_s']['median'] * 1e3:.2f}",
                     f"{e['graph_kernels']:,}" if e.get("graph_kernels") else "-"]
                    if e else ["-", "-", "-"])
        for a, b in pairs:
            ea = _by(a.get("decode", []), "context").get(c)
            eb = _by(b.get("decode", []), "context").get(c)
            row.append(f"{ea['tokens_per_s']['median'] / eb['tokens_per_s']['median']:.2f}x"
                       if ea and eb else "-")
        rows.append(row + [_paper_decode(paper, c, k) for k in paper_moe])
    return out + _table(header, rows)


def _bandwidth_section(results: dict) -> List[str]:
    s = results["settings"]
    rows = [[x["label"], e["context"], f"{e['bandwidth_bound_tokens_per_s']:.1f}",
             f"{e['tokens_per_s']['median']:.2f}", f"{e['fraction_of_bound']:.1%}"]
            for x in results["models"] for e in x.get("decode", [])
            if "bandwidth_bound_tokens_per_s" in e]
    if not s.get("bandwidth_gbps") or not rows:
        return []
    return ["", f"Memory-bound decode limit at {s['bandwidth_gbps']:.1f} GB/s "
            f"({s.get('bandwidth_source')}): bandwidth / (active weight bytes + KV bytes).", ""] + \
        _table(["model", "context", "limit tok/s", "achieved", "fraction"], rows)


def _memory_section(models: List[dict], paper: dict) -> List[str]:
    out = ["", "## Memory", ""]

    def row(x, phase, setting, e):
        kv = hb(e["kv_cache_bytes_analytic"]) if "kv_cache_bytes_analytic" in e else "-"
        rss = hb(e["rss_bytes"]) if e.get("rss_bytes") else "-"
        return [x["label"], phase, setting, hb(e["peak_memory_bytes"]), hb(e["kv_cache_bytes"]),
                kv, rss]

    rows = []
    for x in models:
        mem = x.get("memory", {})
        rows.append([x["label"], "weights", "resident",
                     hb(mem["weights_bytes"]) if "weights_bytes" in mem else "-", "-", "-",
                     hb(mem["rss_bytes"]) if mem.get("rss_bytes") else "-"])
        rows += [row(x, "prefill", f"{e['prompt_tokens']} tokens", e) for e in x.get("prefill", [])]
        rows += [row(x, "decode", f"context {e['context_filled']}", e) for e in x.get("decode", [])]
    if rows:
        out += ["Peak = `mx.get_peak_memory()` within the phase (reset before it): weights + KV "
                "cache + temporaries (decode: the one cache being decoded). KV measured is the "
                "cache's buffers, which mlx-lm allocates in 256-token steps, so it can exceed the "
                "analytic KV (exact tokens) by up to 255 tokens per layer. RSS is the whole "
                "process.", ""]
        out += _table(["model", "phase", "setting", "peak", "KV measured", "KV analytic", "RSS"],
                      rows)
    else:
        out += _none("memory figure")
    rss = "; ".join(f"{r['context']}: S {r['S']} GB vs Pro {r['pro']} GB"
                    for r in paper["peak_rss_gb"])
    w = paper["weights_gb"]
    return out + ["", f"Paper, for comparison: INT4 weights S {w['S']} GB, Pro {w['pro']} GB "
                  f"(ExecuTorch, one fp16 scale per group; MLX adds a bias per group); "
                  f"peak RSS on Galaxy S25 at context {rss}."]


def _routing_section(models: List[dict]) -> List[str]:
    # A model whose routing phase was interrupted before its first prompt has none to show.
    routed = [x for x in models if x.get("routing", {}).get("prompts")]
    if not routed:
        return []
    rows = []
    for x in routed:
        r = x["routing"]
        for kind, e in r["prompts"].items():
            rows.append([x["label"], kind, r["tokens"], f"{e['mean_distinct']:.1f}",
                         f"{e['mean_entropy']:.2f}", hb(e["touched_expert_bytes"]),
                         hb(e["peak_memory_bytes"])])
        if "real_minus_repeat_peak_bytes" in r:
            touched, peak = r["real_minus_repeat_touched_bytes"], r["real_minus_repeat_peak_bytes"]
            rows.append([x["label"], "real - repeat", "", "", "",
                         f"{'+' if touched >= 0 else ''}{hb(touched)}",
                         f"{'+' if peak >= 0 else ''}{hb(peak)}"])
    return ["", "## Expert routing: real against dummy prompts", "",
            "Per layer, the number of distinct routed experts a prefill used, and how evenly "
            "(normalised entropy of the load: 1 = even). `touched` is the routed-expert weight "
            "a runtime that pages weights on use (mmap, as on phones) would bring in; MLX keeps "
            "every expert resident, so its own peak barely moves.", ""] + _table(
        ["model", "prompt", "tokens", "distinct experts/layer", "evenness", "touched", "peak"],
        rows)


def _plots_section(plots) -> List[str]:
    if plots == "skipped":
        return ["", "Plots skipped (--no-plots)."]
    if plots is None:
        return ["", f"(Plots skipped: {NO_MATPLOTLIB}.)"]
    if not plots:
        return ["", "(No plots: no phase was measured.)"]
    return ["", "## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots]


def write_report(run_dir, plots: bool = True, log=None) -> Path:
    """Rebuild DIR/report.md (and the plots) from DIR/results.json. `log` (a
    print-like callable) hears where the plots went, or why there are none."""
    results = load_results(run_dir)
    run_dir = _directory(run_dir)
    files = make_plots(results, run_dir) if plots else "skipped"
    if log is not None and files != "skipped":
        log(f"plots skipped: {NO_MATPLOTLIB}" if files is None
            else f"plots: {', '.join(files)}" if files else "no plots: no phase was measured")
    path = run_dir / "report.md"
    write_text_atomic(path, build_report(results, files))
    return path


def build_comparison(a: dict, b: dict, name_a: str, name_b: str) -> str:
    """Two runs side by side: medians of each and their ratio b/a. Models are
    paired by `name` (S, pro, tiny...), so a checkpoint run pairs with a
    synthetic one of the same preset; models without a partner are listed."""
    def who(r):
        return f"{r['machine']['chip']}, {r['machine']['backend']}"

    out = ["# MobileMoE benchmark: two runs compared", "",
           f"- A = {name_a}: {who(a)}", f"- B = {name_b}: {who(b)}", ""]
    rows = []
    models_b = {x["name"]: x for x in b["models"]}
    names_a = {x["name"] for x in a["models"]}
    for xa in a["models"]:
        xb = models_b.get(xa["name"])
        if xb is None:
            continue
        who_ = xa["label"] if xa["label"] == xb["label"] else f"{xa['label']} / {xb['label']}"
        for phase, key, measure in (("prefill", "prompt_tokens", "prefill tok/s"),
                                    ("decode", "context", "decode tok/s")):
            eb = _by(xb.get(phase, []), key)
            for ea in xa.get(phase, []):
                if ea[key] in eb:
                    va = ea["tokens_per_s"]["median"]
                    vb = eb[ea[key]]["tokens_per_s"]["median"]
                    rows.append([who_, measure, ea[key], f"{va:.2f}", f"{vb:.2f}",
                                 f"{vb / va:.2f}x"])
            for ea in xa.get(phase, []):
                if ea[key] in eb:
                    va, vb = ea["peak_memory_bytes"], eb[ea[key]]["peak_memory_bytes"]
                    rows.append([who_, f"{phase} peak", ea[key], hb(va), hb(vb),
                                 f"{vb / va:.2f}x"])
    out += _table(["model (A / B)", "measure", "setting", "A", "B", "B / A"], rows) if rows else \
        ["(No setting was measured in both runs.)"]
    only_a = [x["label"] for x in a["models"] if x["name"] not in models_b]
    only_b = [x["label"] for x in b["models"] if x["name"] not in names_a]
    if only_a or only_b:
        out.append("")
        out += [f"- Only in A (no model of the same name in B): {', '.join(only_a)}"] if only_a else []
        out += [f"- Only in B (no model of the same name in A): {', '.join(only_b)}"] if only_b else []
    return "\n".join(out) + "\n"


def write_comparison(dir_a, dir_b) -> Path:
    a, b = load_results(dir_a), load_results(dir_b)
    path = _directory(dir_a) / "compare.md"
    write_text_atomic(path, build_comparison(a, b, str(dir_a), str(dir_b)))
    return path
