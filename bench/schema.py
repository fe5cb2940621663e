"""results.json, schema "mobilemoe-bench/results", version 1.

Sizes are bytes, times seconds, rates tokens per second. A timing is a
`stats` object: {"median", "min", "max", "runs": [every timed repeat]}.

    schema, schema_version      "mobilemoe-bench/results", 1
    created                     ISO 8601 time the run started
    interrupted                 true when Ctrl-C stopped the run; phases present are complete
    machine                     chip, cpu, machine, os, memory_bytes, cpu_count, python,
                                mlx, mlx_lm, backend ("Metal" | "CPU"), default_device
    settings                    prompt_lengths, decode_contexts, gen_tokens, repeats, warmup,
                                prompts ("real" | "random" | "repeat"), prefill_step,
                                routing_tokens, dtype (activations and KV cache), bits,
                                group_size, seed, bandwidth_gbps, bandwidth_source
    models[]                    one entry per model, in the order run
      name, label               as given (S, pro, a path) and as shown
      family                    "moe" | "dense"
      synthetic, source         random weights at the published shape, or the checkpoint path
      config                    the model's config dict
      analytic                  mobilemoe_mlx.analytic.summary(): params {total, active, embedding,
                                routed_experts}, weight_bytes {total, embedding, per_expert,
                                routed_experts, decode_read_per_token}, kv_bytes_per_token,
                                kv_cache_bytes / decode_flops_per_token /
                                prefill_flops_per_token keyed by context
      memory                    weights_bytes (sum of parameter nbytes), active_after_load_bytes,
                                rss_bytes, rss_peak_bytes (process peak at the end)
      prefill[]                 prompt_tokens, ttft_s (stats), tokens_per_s (stats),
                                peak_memory_bytes (phase peak), kv_cache_bytes, rss_bytes
      decode[]                  context (asked), context_filled (cache offset before decoding),
                                gen_tokens, tokens_per_s, step_s (median step per repeat),
                                graph_build_s (median host graph-building time per step),
                                graph_build_fraction, peak_memory_bytes (decode phase peak),
                                fill_s, fill_peak_memory_bytes, kv_cache_bytes, rss_bytes,
                                and with a bandwidth: bandwidth_bound_tokens_per_s,
                                fraction_of_bound
      routing                   MoE only: tokens, prompts {real|random|repeat: layers[]
                                {distinct, entropy, max_over_mean}, mean_distinct,
                                mean_entropy, touched_expert_bytes, peak_memory_bytes},
                                real_minus_repeat_peak_bytes, real_minus_repeat_touched_bytes
      complete                  true once every phase of this model was measured (absent
                                on the model an interrupted run was measuring)
"""

SCHEMA = "mobilemoe-bench/results"
SCHEMA_VERSION = 1

TOP_KEYS = ("schema", "schema_version", "created", "interrupted", "machine", "settings", "models")
MODEL_KEYS = ("name", "label", "family", "synthetic", "source", "config", "analytic", "memory",
              "prefill", "decode")
PREFILL_KEYS = ("prompt_tokens", "ttft_s", "tokens_per_s", "peak_memory_bytes", "kv_cache_bytes")
DECODE_KEYS = ("context", "context_filled", "gen_tokens", "tokens_per_s", "step_s",
               "graph_build_s", "peak_memory_bytes", "kv_cache_bytes")
STATS_KEYS = ("median", "min", "max", "runs")


def check(results: dict) -> list:
    """Problems with a results dict (empty when it follows the schema)."""
    problems = [f"missing {k}" for k in TOP_KEYS if k not in results]
    if results.get("schema") != SCHEMA or results.get("schema_version") != SCHEMA_VERSION:
        problems.append("wrong schema or version")
    for m in results.get("models", []):
        problems += [f"{m.get('name')}: missing {k}" for k in MODEL_KEYS if k not in m]
        for phase, keys in (("prefill", PREFILL_KEYS), ("decode", DECODE_KEYS)):
            for e in m.get(phase, []):
                problems += [f"{m['name']} {phase}: missing {k}" for k in keys if k not in e]
                problems += [f"{m['name']} {phase}: bad stats"
                             for k in ("tokens_per_s",) if set(e.get(k, {})) != set(STATS_KEYS)]
    return problems
