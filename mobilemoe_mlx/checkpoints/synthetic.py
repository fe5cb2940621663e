"""Synthetic checkpoints: random weights in a released layout at any preset's shape.

Latency and memory do not depend on weight values, so the benchmark and the
tests run on these where the gated real checkpoints cannot be had. The config
says `"synthetic": true`; the tokenizer is the released one's, special names,
ids and chat protocol included, with Llama 3.2's words where they are
installed and made-up ones otherwise (synthetic_tokenizer.py), so every id a
model samples reads as text.

The stop tokens' embedding rows (<|end_of_text|> and <|eot|>) are zero, and
since the embedding is also the output head their logits are always 0 while
some other token's is higher: a synthetic model never stops by itself, so a
run produces exactly the tokens asked for (what benchmarks and tests need).

    python -m mobilemoe_mlx.checkpoints.synthetic --preset S --layout qat --out DIR
"""

import json
import math
from pathlib import Path

import click
import mlx.core as mx
import numpy as np

from ..errors import OneLineCommand, UserError, run_cli
from .config import preset_config, preset_name
from .layout import (
    BIAS,
    EMBEDDING,
    EXPERTS,
    FUSED,
    NORM,
    QAT,
    ROUTER,
    model_weights,
    source_tensors,
)
from .output_dir import atomic_output_dir, check_output_dir
from .safetensors_writer import Group, write_shard
from .synthetic_tokenizer import SpecialIds, special_ids, write_tokenizer

# -- random quantized weights: one generator for these checkpoints and bench/models.py --
#
# Weights are q * scale with q uniform over the centred levels -(2**(b-1) - 1) ..
# 2**(b-1) - 1: centred, so no offset shared by every weight pushes all tokens
# to the same few experts (the most negative level would give q a mean of -0.5).
# The released QAT format and MLX's affine format (u * scale + bias) both hold
# them exactly: u = q + 2**(b-1), bias = -2**(b-1) * scale.

def random_levels(shape, bits: int, key: mx.array) -> mx.array:
    """Offset levels u = q + 2**(bits-1) of random centred q, as uint32 in [1, 2**bits - 1]."""
    return mx.random.randint(1, 1 << bits, shape, key=key).astype(mx.uint32)


def level_scale(fan_in: int, bits: int) -> float:
    """The scale that gives weights q * scale a standard deviation of 1/sqrt(fan_in)."""
    count = (1 << bits) - 1  # how many centred levels
    return 1 / (math.sqrt((count * count - 1) / 12) * math.sqrt(fan_in))


def pack_levels(u: mx.array, bits: int) -> mx.array:
    """[..., n] levels -> [..., n * bits / 32] uint32 words in MLX's layout.

    MLX stores a row as one little-endian bit stream: level j occupies bits
    j*bits .. (j+1)*bits - 1, so with 3, 5 or 6 bits a level can straddle two
    words. Every 32 levels fill exactly `bits` words."""
    *lead, n = u.shape
    levels = u.reshape(*lead, n // 32, 32)
    first_bit = np.arange(32) * bits
    word, offset = first_bit // 32, first_bit % 32
    straddles = offset + bits > 32
    low = levels << mx.array(offset, dtype=mx.uint32)  # what lands in `word` (high bits drop off)
    high = levels >> mx.array(np.where(straddles, 32 - offset, 0), dtype=mx.uint32)
    words = [mx.where(mx.array(word == k), low, 0).sum(-1)
             + mx.where(mx.array(straddles & (word == k - 1)), high, 0).sum(-1)
             for k in range(bits)]  # bits <= 8 words per 32 levels; bit fields are disjoint
    return mx.stack(words, -1).astype(mx.uint32).reshape(*lead, n * bits // 32)


def random_packed_weight(packed_shape, bits: int, key: mx.array) -> mx.array:
    """Random centred levels packed as MLX's quantized `weight` of `packed_shape`.

    Generated a block of rows at a time and evaluated, so unpacking never holds
    more than ~16M levels (an L embedding has 259M)."""
    *lead, words = packed_shape
    rows = math.prod(lead)
    n = words * 32 // bits
    step = max(1, (1 << 24) // n)
    blocks = []
    for start in range(0, rows, step):
        key, sub = mx.random.split(key)
        block = pack_levels(random_levels((min(step, rows - start), n), bits, sub), bits)
        mx.eval(block)
        blocks.append(block)
    return mx.concatenate(blocks).reshape(packed_shape)


def _random_tensor(kind: str, role: str, shape, dtype: str, fan_in: int,
                   key: mx.array) -> mx.array:
    if kind == NORM:
        return mx.ones(shape, dtype=mx.bfloat16)
    if kind == BIAS:
        return (0.01 * mx.random.normal(shape, key=key)).astype(mx.bfloat16)
    if role == "qweight":  # the released format: two's-complement q nibbles, even index low
        *lead, half = shape
        nibbles = (random_levels((*lead, 2 * half), 4, key) ^ 8).astype(mx.uint8)  # u ^ 8 == q & 0xF
        return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)
    if role == "scale":
        return mx.full(shape, level_scale(fan_in, 4), dtype=mx.float16)
    std = 0.02 if kind == ROUTER else 1 / math.sqrt(fan_in)
    out = std * mx.random.normal(shape, key=key)
    return out if dtype == "F32" else out.astype(mx.bfloat16)


def _silence_stop_tokens(kind: str, tensor: mx.array, ids: SpecialIds) -> mx.array:
    if kind == EMBEDDING and tensor.dtype != mx.uint8:  # the scales, or the bf16 weight
        tensor[mx.array([ids.end_of_text, ids.end_of_turn])] = 0
    return tensor


def _is_synthetic(path: Path) -> bool:
    try:
        return json.loads((path / "config.json").read_text()).get("synthetic") is True
    except (OSError, ValueError, AttributeError):
        return False


def write_synthetic(out: str, preset: str = "tiny", layout: str = QAT, seed: int = 0,
                    force: bool = False, progress: bool = False) -> Path:
    """Write a random checkpoint in the released `layout` (qat or bf16) at `preset`'s
    shape (any case: config.preset_name); `progress`: a progress bar on stderr."""
    if layout not in (QAT, FUSED):
        raise UserError(f"--layout must be {QAT} or {FUSED}, not {layout}")
    out_path = check_output_dir(out, force, _is_synthetic, "a synthetic checkpoint")
    config = preset_config(preset)
    ids = special_ids(config["vocab_size"])
    # The released eos_token_id is not known; listing only <|end_of_text|> is the
    # case where nothing but the chat template says that a turn ends at <|eot|>.
    config.update(bos_token_id=ids.bos, eos_token_id=[ids.end_of_text], synthetic=True,
                  synthetic_note="random weights for tests and benchmarks; not a trained model")
    if layout == QAT:
        config["quantization"] = {
            "format": "mobilemoe-int4-g32", "group_size": 32, "embedding_group_size": 32,
            "qmin": -8, "qmax": 7, "symmetric": True, "scale_dtype": "float16",
            "packed": True}

    groups = []
    key = mx.random.key(seed)
    for w in model_weights(config):
        specs, makers = {}, {}
        for role, exp in source_tensors(w, layout).items():
            key, sub = mx.random.split(key)
            dtype = "F32" if w.kind == ROUTER else exp.dtypes[0]
            mx_dtype = {"U8": mx.uint8, "F16": mx.float16, "F32": mx.float32}.get(dtype, mx.bfloat16)
            fan_in = w.shape[1] if w.kind == EXPERTS else w.shape[-1]
            specs[exp.name] = (exp.shape, mx_dtype)
            makers[exp.name] = (w.kind, role, exp.shape, dtype, fan_in, sub)
        groups.append(Group(specs, lambda m=makers: {
            n: _silence_stop_tokens(args[0], _random_tensor(*args), ids)
            for n, args in m.items()}))

    with atomic_output_dir(out_path) as tmp:
        from huggingface_hub.utils import tqdm

        # On stderr, a tensor group at a time (S: 0.7 GB, half a minute on a CPU).
        with tqdm(total=len(groups), desc=f"writing {preset_name(preset)}'s random weights", unit="tensor",
                  disable=not progress) as bar:
            write_shard(tmp / "model.safetensors", groups, on_group=bar.update, fmt="pt")
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        write_tokenizer(tmp, config["vocab_size"])
    return out_path


@click.command(cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--preset", default="tiny", show_default=True, help="S, M, L or tiny (any case).")
@click.option("--layout", default=QAT, show_default=True, type=click.Choice([QAT, FUSED]),
              help="The released layout: qat (packed INT4, as the QAT release) or bf16.")
@click.option("--out", required=True, help="Directory to create.")
@click.option("--seed", default=0, show_default=True, help="Seed of the random weights.")
@click.option("--force", is_flag=True, help="Replace an existing --out.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--verbose", is_flag=True, help="Show tracebacks.")
def main(preset, layout, out, seed, force, no_progress, verbose):
    """Write a random MobileMoE checkpoint in a released layout."""
    run_cli(lambda: click.echo(write_synthetic(out, preset, layout, seed, force,
                                               progress=not no_progress)), verbose)


if __name__ == "__main__":
    main()
