"""What the Swift benchmark and the Swift parity test need from Python.

The Swift side (ios/) has no tokenizer, no analytic model and no random
generator that matches MLX's, so Python writes them down once:

- `export-prompts`: a *bench plan* (bench_prompts.json) for one model directory:
  the protocol settings, every prompt as token ids (the same ids
  `python -m bench run` feeds that model), and the analytic figures that go
  into results.json. The Swift benchmark follows it exactly.
- `export-synthetic`: a preset with random weights (the dense MobileLLM-Pro
  baseline above all) written as a model directory, plan included: only a
  preset whose model_type the Swift package registers (SWIFT_MODEL_TYPES), so
  never a glm4 peer, which is mlx-lm's class and has no Swift port here.
- `export-parity`: a tiny converted MobileMoE, token ids, and the Python
  model's float32 logits and chosen experts per layer.
"""

import json
import os
import shutil
from pathlib import Path
from typing import List

import click
import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from mobilemoe_mlx.checkpoints.config import DTYPE_NAMES
from mobilemoe_mlx.errors import UserError, run_cli
from mobilemoe_mlx.model import analytic

from .models import DENSE_NAMES, MODEL_NAMES, PRESETS
from .options import Settings, protocol_settings
from .tokens import KINDS, prompt_tokens

PLAN_FORMAT = "mobilemoe-bench/plan"
PLAN_VERSION = 1
PLAN_FILE = "bench_prompts.json"
PARITY_TOKENS = 48  # B * L * top-k = 96 pairs: the sorted-dispatch path runs
PARITY_MIN_GAP = 1e-4  # no routing choice within this of a tie (float32 cannot flip it)
# The model_type values the Swift package loads: MobileMoERegistration.modelTypes in
# ios/Sources/MobileMoE/Registration.swift (tests/test_export.py holds the two equal).
SWIFT_MODEL_TYPES = ("mobilemoe", "mobilellm_pro")


# ------------------------------------------------------------------ plan ----

def plan_lengths(s: Settings, family: str) -> List[int]:
    """Every prompt length the protocol feeds: prefill lengths, decode contexts,
    and (MoE) the routing phase's length."""
    lengths = set(s.prompt_lengths) | set(s.decode_contexts)
    if family == "moe" and s.routing_tokens:
        lengths.add(s.routing_tokens)
    return sorted(lengths)


def build_plan(built, settings: Settings) -> dict:
    """The bench plan of a built model (bench.models.Built): settings, prompts
    of every kind at every length, and the analytic figures of its entry."""
    config, q = built.config, built.quant
    vocab = config["vocab_size"]
    lengths = plan_lengths(settings, built.family)
    prompts = {kind: {str(n): prompt_tokens(kind, n, vocab, built.tokenizer, settings.seed)
                      .tolist() for n in lengths} for kind in KINDS}
    plan = {
        "format": PLAN_FORMAT, "version": PLAN_VERSION,
        "name": built.name, "label": built.label, "family": built.family,
        "synthetic": built.synthetic, "config": config, "dtype": built.dtype,
        "quant": {"bits": q.bits, "group_size": q.group_size if q.bits else None,
                  "scale_dtype": q.scale_dtype if q.bits else None,
                  "embedding_scale_dtype": (q.embedding_scale_dtype or q.scale_dtype)
                  if q.bits else None, "dtype": q.dtype},
        "analytic": analytic.summary(config, q, kv_dtype=built.dtype,
                                     contexts=settings.decode_contexts,
                                     prompt_lengths=settings.prompt_lengths),
        "kv_cache_bytes_analytic": {str(n): analytic.kv_cache_bytes(config, n, built.dtype)
                                    for n in lengths},
        "settings": settings.to_dict(),
        "tokenizer": "the model's tokenizer" if built.tokenizer is not None
        else "hashed word pieces (bench/tokens.py)",
        "prompts": prompts,
    }
    if built.family == "moe":
        plan["per_expert_bytes"] = analytic.weight_bytes(config, q)["per_expert"]
    return plan


def write_json_atomic(path: Path, data: dict, force: bool) -> Path:
    if path.exists() and not force:
        raise UserError(f"{path} already exists; pass --force to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# ----------------------------------------------------------- synthetic ----

def exported_model_type(config: dict) -> str:
    """The model_type of the model a preset's config builds: a glm4 peer's is
    mlx-lm's (under `peer`), whatever the MobileMoE shape it borrows says."""
    return config.get("peer", config)["model_type"]


def swift_names() -> List[str]:
    """The preset names whose model the Swift package loads (SWIFT_MODEL_TYPES)."""
    from .models import model_config

    return [n for n in MODEL_NAMES if exported_model_type(model_config(n)) in SWIFT_MODEL_TYPES]


def check_swift_loads(name: str) -> None:
    """A one-line UserError unless the Swift package loads preset `name`'s model
    (an unknown name gets model_config()'s error)."""
    from .models import model_config

    kind = exported_model_type(model_config(name))
    if kind not in SWIFT_MODEL_TYPES:
        raise UserError(f"--model {name} is a {kind} model, which the Swift package does not "
                        f"load (it loads {', '.join(SWIFT_MODEL_TYPES)}): export one of "
                        f"{', '.join(swift_names())}")


def write_synthetic_model(built, out: Path) -> None:
    """A built synthetic model as a directory the Swift loader reads: its
    parameters under their MLX names in model.safetensors, its config."""
    config = dict(built.config)
    config["quantization"] = {**config["quantization"], "mode": "affine"}
    weights = dict(tree_flatten(built.model.parameters()))
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(config, indent=2))


# -------------------------------------------------------------- parity ----

class _Tap(nn.Module):
    """A layer's post-attention norm that keeps its output (the MoE input)."""

    def __init__(self, norm: nn.Module, sink: list, i: int):
        super().__init__()
        self.norm = norm
        self._sink, self._i = sink, i

    def __call__(self, x):
        y = self.norm(x)
        self._sink[self._i] = y
        return y


def routing_gaps(model, moe_inputs) -> List[np.ndarray]:
    """Per layer and token: the k-th best biased router score minus the (k+1)-th,
    i.e. how far each choice is from a tie float32 rounding could flip."""
    gaps = []
    for layer, b in zip(model.layers, moe_inputs):
        ff = layer.feed_forward
        choice = mx.sigmoid(ff.router(b.astype(mx.float32))) + ff.expert_bias
        s = -np.sort(-np.array(choice).reshape(-1, choice.shape[-1]), axis=-1)
        gaps.append(s[:, ff.top_k - 1] - s[:, ff.top_k])
    return gaps


def parity_arrays(model, tokens: np.ndarray):
    """(logits [1, T, V] float32, experts per layer [T, K] sorted, routing gaps)."""
    from mobilemoe_mlx.model.routing import ExpertRecorder

    recorder = ExpertRecorder(model)
    norms = [layer.post_attention_layernorm for layer in model.layers]
    moe_inputs: list = [None] * len(norms)
    try:
        for i, layer in enumerate(model.layers):
            layer.post_attention_layernorm = _Tap(norms[i], moe_inputs, i)
        with recorder.record():
            logits = model(mx.array(tokens[None], dtype=mx.int32)).astype(mx.float32)
            mx.eval(logits, moe_inputs)
        experts = [np.sort(c, axis=-1).astype(np.int32) for c in recorder.choices()]
    finally:
        for layer, norm in zip(model.layers, norms):
            layer.post_attention_layernorm = norm
        recorder.remove()
    return np.array(logits), experts, routing_gaps(model, moe_inputs)


def save_loaded_model(model, config: dict, out: Path) -> None:
    """A loaded model's parameters as they are in memory (q/k/v and the shared
    expert's gate/up stacked, when quantized) with its config: a directory
    saved fused, as mlx-lm writes one when it re-saves a loaded model."""
    out.mkdir(parents=True)
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(model.parameters())),
                        metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(config, indent=2))


def export_parity(out: Path, seed: int) -> dict:
    """Write the parity fixture into `out` (a fresh temporary directory): the
    converted model (q/k/v and shared gate/up stored apart, fused at load) and
    the same model saved as loaded (model-fused/: fused on disk)."""
    from mobilemoe_mlx.checkpoints.convert import convert
    from mobilemoe_mlx.checkpoints.loading import load_converted
    from mobilemoe_mlx.checkpoints.synthetic import write_synthetic

    for attempt in range(seed, seed + 20):
        src = out / ".source"
        write_synthetic(str(src), "tiny", "qat", attempt, force=True)
        config = json.loads((src / "config.json").read_text())
        # llama3 scaling changes rotations visibly within the fixture's tokens
        # only if the original context is short: lower it to 32.
        config["rope_scaling"]["original_max_position_embeddings"] = 32
        (src / "config.json").write_text(json.dumps(config, indent=2))
        model_dir = out / "model"
        convert(str(src), str(model_dir), dtype="float32", progress=False, force=True)
        model, _ = load_converted(model_dir)
        rng = np.random.default_rng(attempt)
        tokens = rng.integers(0, config["vocab_size"], PARITY_TOKENS).astype(np.int32)
        tokens[0] = config["bos_token_id"]
        logits, experts, gaps = parity_arrays(model, tokens)
        min_gap = float(min(g.min() for g in gaps))
        if min_gap > PARITY_MIN_GAP:
            break
    else:
        raise RuntimeError("no seed gave routing choices clear of ties")
    shutil.rmtree(out / ".source")
    save_loaded_model(model, json.loads((model_dir / "config.json").read_text()),
                      out / "model-fused")
    arrays = {"tokens": mx.array(tokens[None]), "logits": mx.array(logits)}
    arrays.update({f"experts.{i}": mx.array(e) for i, e in enumerate(experts)})
    mx.save_safetensors(str(out / "parity.safetensors"), arrays)
    info = {"seed": attempt, "tokens": PARITY_TOKENS, "layers": len(experts),
            "min_routing_gap": min_gap, "min_cosine": 0.9999,
            "model": "model/ (a converted tiny MobileMoE: INT4 weights, float32 otherwise; "
                     "q/k/v and the shared expert's gate/up stored apart, fused at load)",
            "model-fused": "model-fused/ (model/ saved as loaded: qkv_proj and gate_up_proj "
                           "on disk; the same logits and experts)",
            "arrays": "tokens [1, T] int32, logits [1, T, V] float32, "
                      "experts.{layer} [T, K] int32 (each row sorted)"}
    (out / "parity.json").write_text(json.dumps(info, indent=2))
    return info


# ------------------------------------------------------------ commands ----

def _protocol(f):
    """The protocol options of `bench run`, with the same defaults."""
    s = Settings()
    for opt in reversed([
        click.option("--quick", is_flag=True, help="bench run --quick's short settings."),
        click.option("--prompt-lengths", help=f"Prefill prompt lengths. [default: {','.join(map(str, s.prompt_lengths))}]"),
        click.option("--decode-contexts",
                     help=f"Contexts to decode at. [default: {','.join(map(str, s.decode_contexts))}]"),
        click.option("--gen-tokens", type=int, help=f"Decode tokens per run. [default: {s.gen_tokens}]"),
        click.option("--repeats", type=int, help=f"Timed repeats per setting. [default: {s.repeats}]"),
        click.option("--warmup", type=int, help=f"Untimed warm-up runs per setting. [default: {s.warmup}]"),
        click.option("--routing-tokens", type=int, help=f"Tokens of the routing phase. [default: {s.routing_tokens}]"),
        click.option("--prompts", type=click.Choice(KINDS), default="real", show_default=True,
                     help="Prompt text for the timed runs."),
        click.option("--prefill-step", type=int, default=s.prefill_step, show_default=True,
                     help="Prefill chunk size (as mlx-lm's prefill_step_size)."),
        click.option("--seed", type=int, default=0, show_default=True,
                     help="Seed of the random prompts."),
    ]):
        f = opt(f)
    return f


def settings_from(opts: dict, dtype: str = "float16") -> Settings:
    """Settings from the protocol options (_protocol), as `bench run` reads them."""
    protocol = ("prompt_lengths", "decode_contexts", "gen_tokens", "repeats", "warmup",
                "routing_tokens")
    return protocol_settings({k: opts[k] for k in protocol}, opts.pop("quick"),
                             opts["prefill_step"], dtype=dtype, prompts=opts["prompts"],
                             seed=opts["seed"])


@click.command("export-prompts")
@click.option("--model", "model_dir", required=True, type=click.Path(),
              help="A converted MobileMoE directory.")
@click.option("--out", type=click.Path(), help=f"[default: MODEL/{PLAN_FILE}]")
@click.option("--name", help="The model's name in results.json, e.g. S to pair it with "
              "`bench run --models S --weights DIR` in `bench report --compare`. "
              "[default: the directory, as `bench run --models DIR` names it]")
@_protocol
@click.option("--force", is_flag=True, help="Replace an existing --out.")
@click.option("--verbose", is_flag=True, help="Tracebacks on errors.")
def export_prompts(model_dir, out, name, force, verbose, **opts):
    """Write the bench plan (prompt token ids, settings, analytic figures) the
    Swift benchmark runs for a converted model."""
    def go():
        from .models import load_checkpoint

        settings = settings_from(opts)
        built = load_checkpoint(model_dir, "--model")
        built.name = name or built.name
        settings.dtype = built.dtype
        target = Path(out) if out else Path(model_dir) / PLAN_FILE
        click.echo(f"wrote {write_json_atomic(target, build_plan(built, settings), force)}")

    run_cli(go, verbose)


@click.command("export-synthetic")
@click.option("--model", "name", default="pro", show_default=True,
              # Spelled out, not swift_names(): that imports mlx-lm, and `-h` must not.
              help=f"{', '.join(PRESETS + DENSE_NAMES)} (the presets whose model_type the "
              f"Swift package loads: {', '.join(SWIFT_MODEL_TYPES)}).")
@click.option("--out", required=True, type=click.Path(), help="Directory to create.")
@click.option("--dtype", type=click.Choice(DTYPE_NAMES),
              default="float16", show_default=True, help="Activation dtype (Metal: float16).")
@click.option("--bits", type=int, default=4, show_default=True,
              help="Weight bits (2, 3, 4, 5, 6 or 8).")
@click.option("--group-size", type=int, default=32, show_default=True,
              help="Weight group size (32, 64 or 128).")
@_protocol
@click.option("--force", is_flag=True, help="Replace an existing --out.")
@click.option("--verbose", is_flag=True, help="Tracebacks on errors.")
def export_synthetic(name, out, dtype, bits, group_size, force, verbose, **opts):
    """Write a preset with random weights (e.g. the dense baseline) as a model
    directory the Swift benchmark loads, with its bench plan."""
    from .models import canonical

    name = canonical(name)

    def go():
        from mobilemoe_mlx.checkpoints.output_dir import atomic_output_dir, check_output_dir

        from .models import build_synthetic, check_quantizable

        check_swift_loads(name)  # and a clear error for an unknown name
        check_quantizable(name, bits, group_size)
        settings = settings_from(opts, dtype)
        settings.bits, settings.group_size = bits, group_size
        path = check_output_dir(out, force, lambda p: (p / PLAN_FILE).is_file(),
                                "an exported synthetic model")
        built = build_synthetic(name, dtype=dtype, bits=bits, group_size=group_size,
                                seed=settings.seed)
        with atomic_output_dir(path) as tmp:
            write_synthetic_model(built, tmp)
            write_json_atomic(tmp / PLAN_FILE, build_plan(built, settings), force=True)
        click.echo(f"wrote {path}")

    run_cli(go, verbose)


@click.command("export-parity")
@click.option("--out", required=True, type=click.Path(), help="Directory to create.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the fixture's random weights.")
@click.option("--force", is_flag=True, help="Replace an existing --out.")
@click.option("--verbose", is_flag=True, help="Tracebacks on errors.")
def export_parity_cmd(out, seed, force, verbose):
    """Write the Swift parity fixture: a tiny converted model, token ids, the
    Python model's float32 logits and its chosen experts per layer."""
    def go():
        from mobilemoe_mlx.checkpoints.output_dir import atomic_output_dir, check_output_dir

        path = check_output_dir(out, force, lambda p: (p / "parity.json").is_file(),
                                "a parity fixture")
        with atomic_output_dir(path) as tmp:
            info = export_parity(tmp, seed)
        click.echo(f"wrote {path} ({info['tokens']} tokens, {info['layers']} layers)")

    run_cli(go, verbose)


def register(group: click.Group) -> None:
    for command in (export_prompts, export_synthetic, export_parity_cmd):
        group.add_command(command)
