"""results.json, schema "mobilemoe-bench/results", version 2.

Sizes are bytes, times seconds, rates tokens per second. A timing is a
`stats` object: {"median", "min", "max", "runs": [every timed repeat]}.

    schema, schema_version      "mobilemoe-bench/results", 2
    created                     ISO 8601 time the run started
    interrupted                 true when Ctrl-C stopped the run; phases present are complete
    rss_peak_bytes              peak RSS of the whole process so far (getrusage), updated at
                                every save: one figure for the run, since RSS is process-wide
    machine                     chip, cpu, machine, os, memory_bytes, cpu_count, python,
                                mlx, mlx_lm, backend ("Metal" | "CUDA" | "CPU"), default_device
    settings                    prompt_lengths, decode_contexts, gen_tokens, repeats, warmup,
                                prompts ("real" | "random" | "repeat"), prefill_step,
                                routing_tokens, dtype (activations and KV cache of the
                                synthetic models), bits, group_size (of the synthetic
                                models), seed, bandwidth_gbps, bandwidth_source
    models[]                    one entry per model, in the order run
      name, label               as given (S, pro, a path) and as shown
      family                    "moe" | "dense"
      synthetic, source         random weights at the published shape, or the checkpoint path
      config                    the model's config dict
      dtype                     activations and KV cache of this model: settings.dtype for a
                                synthetic model, the checkpoint's own weight dtype otherwise
      quant                     bits (null: unquantized), group_size, scale_dtype,
                                embedding_scale_dtype, dtype (norms): as stored, read from
                                the loaded weights for a checkpoint
      analytic                  mobilemoe_mlx.model.analytic.summary(): params {total, active, embedding,
                                routed_experts}, weight_bytes {total, embedding, per_expert,
                                routed_experts, decode_read_per_token}, kv_bytes_per_token,
                                kv_cache_bytes / decode_flops_per_token keyed by the run's
                                decode_contexts, prefill_flops_per_token keyed by its
                                prompt_lengths
      memory                    weights_bytes (sum of parameter nbytes), active_after_load_bytes,
                                rss_bytes
      prefill[]                 prompt_tokens, ttft_s (stats), tokens_per_s (stats),
                                peak_memory_bytes (phase peak), kv_cache_bytes (the cache's
                                buffers: mlx-lm allocates them in 256-token steps),
                                kv_cache_bytes_analytic (exact tokens), rss_bytes
      decode[]                  context (asked), context_filled (cache offset before decoding),
                                gen_tokens, tokens_per_s, step_s (median step per repeat),
                                graph_build_s (median host graph-building time per step),
                                graph_build_fraction, graph_nodes (operations in one step's
                                graph, on the default device's backend), graph_kernels (those
                                that launch a kernel: views excluded), peak_memory_bytes
                                (decode phase peak),
                                fill_s, fill_peak_memory_bytes, kv_cache_bytes,
                                kv_cache_bytes_analytic, rss_bytes, and with a bandwidth:
                                bandwidth_bound_tokens_per_s, fraction_of_bound. The decode
                                peak holds the weights, the one cache being decoded and the
                                temporaries (the copy repeats start from is kept in host
                                memory, outside MLX's accounting)
      routing                   MoE only: tokens, prompts {real|random|repeat: layers[]
                                {distinct, entropy, max_over_mean}, mean_distinct,
                                mean_entropy, touched_expert_bytes, peak_memory_bytes},
                                real_minus_repeat_peak_bytes, real_minus_repeat_touched_bytes
      complete                  true once every phase of this model was measured (absent
                                on the model an interrupted run was measuring)

Changes. Version 2: rss_peak_bytes moved from models[].memory to the top level
(it was the process's peak, not the model's); models[].dtype and .quant added
(a checkpoint's own dtypes); analytic figures keyed by the run's own contexts
and prompt lengths instead of fixed 256/1024/4096/8192; kv_cache_bytes_analytic
added to prefill[] and decode[]; the decode peak no longer includes a second
copy of the KV cache. `python -m bench report` still reads version 1 files.
"""

SCHEMA = "mobilemoe-bench/results"
SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)  # what `bench report` can rebuild a report from

TOP_KEYS = ("schema", "schema_version", "created", "interrupted", "machine", "settings",
            "rss_peak_bytes", "models")
MODEL_KEYS = ("name", "label", "family", "synthetic", "source", "config", "dtype", "quant",
              "analytic", "memory", "prefill", "decode")
PREFILL_KEYS = ("prompt_tokens", "ttft_s", "tokens_per_s", "peak_memory_bytes", "kv_cache_bytes",
                "kv_cache_bytes_analytic")
DECODE_KEYS = ("context", "context_filled", "gen_tokens", "tokens_per_s", "step_s",
               "graph_build_s", "peak_memory_bytes", "kv_cache_bytes", "kv_cache_bytes_analytic")
STATS_KEYS = ("median", "min", "max", "runs")

# Every key the Python harness writes, in order: bench/harness.py builds each
# entry with entry() from these lists, so the harness and this description
# cannot drift apart. The *_KEYS above are what every writer (the Swift runner
# in ios/ too) must include.
MEMORY_ENTRY = ("weights_bytes", "active_after_load_bytes", "rss_bytes")
PREFILL_ENTRY = PREFILL_KEYS + ("rss_bytes",)
DECODE_ENTRY = ("context", "context_filled", "gen_tokens", "tokens_per_s", "step_s",
                "graph_build_s", "graph_build_fraction", "graph_nodes", "graph_kernels",
                "graph_build_idle_s",
                "peak_memory_bytes", "fill_s", "fill_peak_memory_bytes", "kv_cache_bytes",
                "kv_cache_bytes_analytic", "rss_bytes")
DECODE_BOUND = ("bandwidth_bound_tokens_per_s", "fraction_of_bound")  # with a bandwidth only
ROUTING_PROMPT_ENTRY = ("layers", "mean_distinct", "mean_entropy", "touched_expert_bytes",
                        "peak_memory_bytes")
ROUTING_ENTRY = ("tokens", "prompts", "real_minus_repeat_peak_bytes",
                 "real_minus_repeat_touched_bytes")


def entry(keys, **values) -> dict:
    """`values` as an entry with exactly `keys`, in their order (a ValueError
    names a key missing or not in the schema)."""
    missing = [k for k in keys if k not in values]
    extra = [k for k in values if k not in keys]
    if missing or extra:
        raise ValueError(f"entry keys differ from bench/schema.py: missing {missing}, "
                         f"not in the schema {extra}")
    return {k: values[k] for k in keys}


def check(results: dict) -> list:
    """Problems with a results dict (empty when it follows the schema)."""
    problems = [f"missing {k}" for k in TOP_KEYS if k not in results]
    if results.get("schema") != SCHEMA or results.get("schema_version") != SCHEMA_VERSION:
        problems.append("wrong schema or version")
    for m in results.get("models", []):
        problems += [f"{m.get('name')}: missing {k}" for k in MODEL_KEYS if k not in m]
        if "rss_peak_bytes" in m.get("memory", {}):
            problems.append(f"{m.get('name')}: rss_peak_bytes belongs at the top level (v2)")
        for phase, keys in (("prefill", PREFILL_KEYS), ("decode", DECODE_KEYS)):
            for e in m.get(phase, []):
                problems += [f"{m['name']} {phase}: missing {k}" for k in keys if k not in e]
                problems += [f"{m['name']} {phase}: bad stats"
                             for k in ("tokens_per_s",) if set(e.get(k, {})) != set(STATS_KEYS)]
    return problems


# -- the structure `bench report` reads -------------------------------------------
# A spec is a type (or tuple of types), a dict of key -> spec (keys that are
# Maybe(...) may be absent), or a one-element list: a list of that spec.
# Only what the report reads is required; extra keys are fine.

class Maybe:
    def __init__(self, spec):
        self.spec = spec


NUMBER = (int, float)
NUMBER_OR_NULL = (int, float, type(None))
STATS = {k: NUMBER for k in ("median", "min", "max")}
_PHASE = {"peak_memory_bytes": NUMBER, "kv_cache_bytes": NUMBER,
          "kv_cache_bytes_analytic": Maybe(NUMBER), "rss_bytes": Maybe(NUMBER_OR_NULL)}
_PREFILL = {"prompt_tokens": int, "ttft_s": STATS, "tokens_per_s": STATS, **_PHASE}
_DECODE = {"context": int, "context_filled": int, "tokens_per_s": STATS,
           "graph_build_s": STATS, "bandwidth_bound_tokens_per_s": Maybe(NUMBER),
           "fraction_of_bound": Maybe(NUMBER), **_PHASE}
_ROUTING_PROMPT = {"mean_distinct": NUMBER, "mean_entropy": NUMBER,
                   "touched_expert_bytes": NUMBER, "peak_memory_bytes": NUMBER}
_MODEL = {
    "name": str, "label": str, "family": str, "synthetic": bool,
    "analytic": {"params": {"total": NUMBER, "active": NUMBER},
                 "weight_bytes": {"total": NUMBER, "decode_read_per_token": NUMBER},
                 "kv_bytes_per_token": NUMBER},
    "memory": Maybe({"weights_bytes": Maybe(NUMBER), "rss_bytes": Maybe(NUMBER_OR_NULL)}), "prefill": Maybe([_PREFILL]), "decode": Maybe([_DECODE]),
    "routing": Maybe({"tokens": int, "prompts": {str: _ROUTING_PROMPT}}),
}
REPORT_READS = {
    "created": str,
    "machine": {"chip": str, "machine": str, "memory_bytes": NUMBER, "os": str,
                "mlx": str, "backend": str},
    "settings": {"dtype": str, "bits": int, "group_size": int, "prompts": str,
                 "prefill_step": int, "warmup": int, "repeats": int, "gen_tokens": int,
                 "bandwidth_gbps": Maybe(NUMBER_OR_NULL)},
    "rss_peak_bytes": Maybe(NUMBER_OR_NULL),
    "models": [_MODEL],
}
_NAMES = {str: "a string", int: "an integer", NUMBER: "a number", bool: "true or false",
          NUMBER_OR_NULL: "a number or null",
          dict: "an object", list: "a list"}


def structure_problem(value, spec=REPORT_READS, where: str = "the top level"):
    """The first place where `value` does not have the structure of `spec`, as
    "where: what was expected", or None when it has."""
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            return f"{where}: expected an object, found {_kind(value)}"
        for key, sub in spec.items():
            if key is str:  # a mapping of any names to `sub`
                for name, item in value.items():
                    if (problem := structure_problem(item, sub, f"{where}.{name}")):
                        return problem
                continue
            if isinstance(sub, Maybe):
                if key not in value:
                    continue
                sub = sub.spec
            elif key not in value:
                return f"{_at(where)}missing \"{key}\""
            if (problem := structure_problem(value[key], sub, _join(where, key))):
                return problem
        return None
    if isinstance(spec, list):
        if not isinstance(value, list):
            return f"{where}: expected a list, found {_kind(value)}"
        for i, item in enumerate(value):
            if (problem := structure_problem(item, spec[0], f"{where}[{i}]")):
                return problem
        return None
    if isinstance(value, bool) and spec is not bool:  # JSON true is not a number here
        return f"{where}: expected {_NAMES.get(spec, spec)}, found {_kind(value)}"
    if not isinstance(value, spec):
        return f"{where}: expected {_NAMES.get(spec, spec)}, found {_kind(value)}"
    return None


def _join(where: str, key: str) -> str:
    return key if where == "the top level" else f"{where}.{key}"


def _at(where: str) -> str:
    return "" if where == "the top level" else f"{where}: "


def _kind(value) -> str:
    if value is None:
        return "null"
    for t, name in ((bool, "true or false"), (str, "a string"), (int, "an integer"),
                    (float, "a number"), (dict, "an object"), (list, "a list")):
        if isinstance(value, t):
            return name
    return type(value).__name__
