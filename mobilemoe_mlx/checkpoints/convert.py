"""Convert released MobileMoE checkpoints into MLX directories.

The output is what mlx-lm loads: model*.safetensors in MLX's names, a
config.json with mlx-lm's `quantization` entry and `model_file`, the model
source beside it, the tokenizer files, and conversion.json (provenance and
the quantization error introduced, per tensor).

Packed INT4 QAT weights are carried over bit for bit (see checkpoints/packing.py);
bf16/fp32 weights are quantized to INT4 group-32 by default.
"""

import json
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import mlx.core as mx

from .._version import __version__
from ..errors import UserError
from ..model.runtime import current as current_runtime
from .config import (
    CONVERT_BITS,
    DTYPE_NAMES,
    GROUP_SIZES,
    check_config_fits,
    check_qat_block,
    rope_block,
    validate_config,
)
from .consistency import check_checkpoint_files
from .hub import fetch_checkpoint, looks_like_repo_id
from .layout import (
    QAT,
    QUANTIZABLE,
    Weight,
    check_tensors_against_layout,
    detect_layout,
    model_weights,
)
from .output_dir import USER_OUT, Destination, atomic_output_dir, check_output_dir
from .reading import INDEX_FILE, TensorSource, open_checkpoint, read_text, weight_files
from .safetensors_writer import Group, write_model
from .tensor_converter import TensorConverter
from .turns import Stops, converted_stops

MODEL_FILE = "mobilemoe.py"
DTYPES = {name: getattr(mx, name) for name in DTYPE_NAMES}
DEFAULT_MAX_SHARD_BYTES = 4 << 30  # mlx-lm's loaders are happy with a few GB a file
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja", "chat_template.json")


def _one_of(choices) -> str:
    return ", ".join(map(str, choices[:-1])) + f" or {choices[-1]}"


def _check_group_size(weights: List[Weight], group_size: int, bits: int) -> None:
    if group_size not in GROUP_SIZES:
        raise UserError(f"--q-group-size must be {_one_of(GROUP_SIZES)}, not {group_size}")
    if bits not in CONVERT_BITS:
        raise UserError(f"--q-bits must be {_one_of(CONVERT_BITS)}, not {bits}")
    for w in weights:
        if w.kind in QUANTIZABLE and w.shape[-1] % group_size:
            raise UserError(
                f"--q-group-size {group_size} does not divide {w.path}'s grouped axis "
                f"({w.shape[-1]}); choose a group size that divides it"
            )


def converted_config(config: dict, quantization: Optional[dict], layout: str) -> dict:
    """The source config plus what mlx-lm needs. Two fields move, both kept:
    the source's `quantization` block (mlx-lm reads that key as its own) goes to
    `source_quantization`, and `rope_scaling` + `rope_theta` are written as one
    transformers-5 `rope_parameters` block, because transformers 5 fails to
    read a `rope_scaling` config it does not know, which breaks mlx-lm's
    tokenizer loading."""
    out = {k: v for k, v in config.items() if k not in ("quantization", "rope_scaling")}
    if "quantization" in config:
        out["source_quantization"] = config["quantization"]
    if rope := rope_block(config):
        out["rope_parameters"] = {**rope, "rope_theta": config.get("rope_theta", 500000.0)}
    if quantization:
        out["quantization"] = quantization
        out["quantization_config"] = quantization
    out["model_file"] = MODEL_FILE
    out["source_layout"] = layout
    return out


def _listing(names: List[str], limit: int = 4) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more"
                                       if len(names) > limit else "")


def _copy_tokenizer(src_dir: Path, out: Path, stops: Stops) -> List[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (src_dir / name).is_file():
            shutil.copy2(src_dir / name, out / name)
            copied.append(name)
    generation = out / "generation_config.json"
    if generation.exists() and stops.eos_token_id:
        # mlx-lm reads this file's eos_token_id over config.json's: the same list.
        cfg = json.loads(read_text(generation))  # checked to be an object already
        cfg["eos_token_id"] = stops.eos_token_id
        generation.write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
    tc = out / "tokenizer_config.json"
    if tc.exists():
        # Llama-3's cleanup turns `SELECT ?s` into `SELECT?s`; the model was not
        # trained to expect it, so decode verbatim.
        try:
            cfg = json.loads(read_text(tc))
        except ValueError as e:
            raise UserError(f"{tc} is not valid JSON ({e})") from e
        if not isinstance(cfg, dict):
            raise UserError(f"{tc} is not a JSON object")
        cfg["clean_up_tokenization_spaces"] = False
        tc.write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
    return copied


def _resolve_source(source: str, revision: Optional[str]):
    path = Path(source).expanduser()
    if path.exists():
        if revision:
            print(f"warning: --revision {revision} is ignored for the local path {path}",
                  file=sys.stderr)
        return path, None
    if looks_like_repo_id(source):
        return fetch_checkpoint(source, revision)
    raise UserError(f"{source} is neither an existing path nor a Hub repo id (org/name)")


CONVERTER_NAME = "mobilemoe-mlx"
# Every file this converter writes; a directory holding anything else is not one --force replaces.
_OUTPUT_FILES = re.compile(
    r"(config|conversion|model\.safetensors\.index)\.json|" + re.escape(MODEL_FILE)
    + r"|model(-\d{5}-of-\d{5})?\.safetensors|"
    + "|".join(re.escape(name) for name in TOKENIZER_FILES))


def conversion_report(path: Path) -> Optional[dict]:
    """conversion.json of a directory this converter wrote, or None: the file
    must exist and carry the converter's signature, its name alone proves nothing."""
    try:
        report = json.loads(read_text(path / "conversion.json"))
    except (UserError, ValueError):
        return None
    if (isinstance(report, dict) and isinstance(report.get("converter"), str)
            and report["converter"].startswith(CONVERTER_NAME + " ")
            and isinstance(report.get("layout"), str)):
        return report
    return None


def is_converted(path: Path) -> bool:
    """A directory this converter wrote, or mlx-lm re-quantized from one."""
    if not path.is_dir():
        return False
    if conversion_report(path) is not None and (path / "config.json").is_file():
        return True
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "source_layout" in config


def is_replaceable_output(path: Path) -> bool:
    """What --force may delete: a directory with our signed conversion.json
    and nothing but the files a conversion writes (a user's own file inside,
    or a subdirectory, and it is left alone)."""
    if conversion_report(path) is None:
        return False
    return all(child.is_file() and not child.is_symlink() and _OUTPUT_FILES.fullmatch(child.name)
               for child in path.iterdir())


@dataclass
class Conversion:
    """A conversion with every input checked and every choice made; nothing written yet."""

    source: str  # as the caller gave it (recorded in conversion.json)
    commit: Optional[str]  # the Hub commit, for a repo id
    out: Path
    config: dict
    tensors: TensorSource
    layout: str
    weights: List[Weight]
    qat_group: int  # a QAT checkpoint's group size (32 otherwise)
    quantization: Optional[dict]  # mlx-lm's {"group_size", "bits", "mode"}; None keeps dense
    dtype: str
    tokenizer_dir: Path  # where the tokenizer files beside the weights are
    stops: Stops  # the eos_token_id to write: the source's ids and the end of a turn


def default_dtype(tensors: TensorSource) -> str:
    """The output dtype when none is asked for: float16 for QAT checkpoints
    (their scales are fp16), the checkpoint's own dtype (bf16, fp32) otherwise."""
    embed = tensors.info.get("model.embed_tokens.weight")
    return {"BF16": "bfloat16", "F32": "float32"}.get(embed.dtype if embed else "", "float16")


def source_files(src_path: Path) -> List[Path]:
    """Every file a conversion of `src_path` reads: the weights, and the config,
    index and tokenizer files beside them (those that exist)."""
    folder = src_path if src_path.is_dir() else src_path.parent
    beside = [folder / "config.json", folder / INDEX_FILE, *(folder / n for n in TOKENIZER_FILES)]
    return weight_files(src_path) + [f for f in beside if f.is_file()]


def _check_spares_source(out: Path, src_path: Path, dest: Destination) -> None:
    """Refuse an output that is, or holds, a file the conversion reads: writing
    there, or replacing it with --force, would destroy the checkpoint. An output
    beside those files is fine (a subdirectory of the checkpoint's directory, or
    the cache under a home directory that holds a checkpoint): the readers take
    regular files, by name, from the directory itself, so it is never read as input."""
    for f in source_files(src_path):
        target = f.resolve()  # a Hub snapshot's files are links into its blobs
        if out == target or out in target.parents:
            raise UserError(f"{dest.label} {out} contains the checkpoint's file {f}, which "
                            f"writing there would destroy; {dest.elsewhere}")


def _check_source(source: str, src_path: Path, out: Path, require_tokenizer: bool,
                  dest: Destination) -> None:
    """What can be refused about the source before it is opened."""
    if is_converted(src_path):
        raise UserError(f"{src_path} is already converted: load it directly")
    _check_spares_source(out, src_path, dest)
    folder = src_path if src_path.is_dir() else src_path.parent
    if require_tokenizer and not (folder / "tokenizer.json").is_file():
        raise UserError(f"{source} has no tokenizer.json: copy the model's tokenizer files "
                        "next to its weights")


def check_conversion(source: str, out: str, dtype: Optional[str] = None, quantize: bool = True,
                     q_bits: int = 4, q_group_size: Optional[int] = None, force: bool = False,
                     revision: Optional[str] = None, require_tokenizer: bool = False,
                     dest: Destination = USER_OUT) -> Conversion:
    """Every check a conversion makes before it writes anything, and its choices
    (see `convert` for the arguments; `dest` names `out` in messages)."""
    out_path = check_output_dir(out, force, is_replaceable_output,
                                "a converted model (holding only the files a conversion "
                                "writes)", dest)
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype}")
    src_path, commit = _resolve_source(source, revision)
    _check_source(source, src_path, out_path, require_tokenizer, dest)
    config, tensors = open_checkpoint(src_path)
    validate_config(config)
    tokenizer_dir = src_path if src_path.is_dir() else src_path.parent
    # The tokenizer files must agree with the config: an id past vocab_size is
    # a read past the embedding table (issue 19). Refused here, before writing.
    check_checkpoint_files(tokenizer_dir, config)
    stops = converted_stops(tokenizer_dir, config)
    check_config_fits(config, tensors.stored_bytes(), str(src_path))
    layout = detect_layout(tensors)
    qat_group = check_qat_block(config.get("quantization", {})) if layout == QAT else 32
    weights = model_weights(config)
    check_tensors_against_layout(weights, layout, tensors, qat_group)
    q_group_size = q_group_size or qat_group
    if quantize:
        _check_group_size(weights, q_group_size, q_bits)
    dtype = dtype or default_dtype(tensors)
    if not quantize and dtype != "float32" and not current_runtime().half_precision_fast:
        print(f"warning: MLX's CPU backend runs unquantized experts only in float32; this "
              f"{dtype} output will load only where MLX runs on a GPU", file=sys.stderr)
    return Conversion(
        source, commit, out_path, config, tensors, layout, weights, qat_group,
        {"group_size": q_group_size, "bits": q_bits, "mode": "affine"} if quantize else None,
        dtype, tokenizer_dir, stops)


def write_conversion(c: Conversion, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                     progress: bool = True) -> Path:
    """Write the checked conversion `c` into its output directory (whole or not at all)."""
    q = c.quantization or {}
    converter = TensorConverter(c.tensors, c.layout, DTYPES[c.dtype], c.quantization is not None,
                           q.get("bits", 4), q.get("group_size", c.qat_group), c.qat_group)
    if converter.carry_qat and c.dtype == "bfloat16":
        print("warning: bfloat16 cannot hold the checkpoint's fp16 scales exactly; "
              "use float16 or float32 to keep the weights bit-exact", file=sys.stderr)
    groups = [Group(converter.specs(w), lambda w=w: converter.produce(w)) for w in c.weights]

    with atomic_output_dir(c.out) as tmp:
        from huggingface_hub.utils import tqdm

        with tqdm(total=len(groups), desc="converting", unit="tensor",
                  disable=not progress) as bar:
            files = write_model(tmp, groups, max_shard_bytes, bar.update)
        cfg = converted_config(c.config, c.quantization, c.layout)
        # The dtype written, not the source's: mlx_lm.convert saves in it by default.
        cfg["torch_dtype"] = c.dtype
        if c.stops.eos_token_id:  # where a turn ends, for mlx-lm's tools as for ours
            cfg["eos_token_id"] = c.stops.eos_token_id
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        shutil.copy2(Path(__file__).parents[1] / "model" / "mobilemoe.py", tmp / MODEL_FILE)
        copied = _copy_tokenizer(c.tokenizer_dir, tmp, c.stops)
        report = {
            "converter": f"mobilemoe-mlx {__version__}", "source": c.source,
            "revision": c.commit, "layout": c.layout, "dtype": c.dtype,
            "quantization": c.quantization,
            "bit_exact_int4": converter.carry_qat,
            "weights_bytes": sum((tmp / f).stat().st_size for f in files),
            "max_abs_quantization_error": converter.errors,
            "all_zero_scales": converter.zero_scales,
        }
        (tmp / "conversion.json").write_text(json.dumps(report, indent=2))
        if converter.zero_scales:
            print(f"warning: every quantization scale of {_listing(converter.zero_scales)} is "
                  "zero, so those weights are all zero (recorded in conversion.json)",
                  file=sys.stderr)
        if c.stops.note:
            print(f"note: {c.stops.note}", file=sys.stderr)
        if "tokenizer.json" not in copied:
            print(f"warning: no tokenizer.json beside the checkpoint; copy the tokenizer "
                  f"files into {c.out} before loading it", file=sys.stderr)
    return c.out


def convert(source: str, out: str, dtype: Optional[str] = None, quantize: bool = True,
            q_bits: int = 4, q_group_size: Optional[int] = None, force: bool = False,
            revision: Optional[str] = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
            progress: bool = True, require_tokenizer: bool = False) -> Path:
    """Convert a MobileMoE checkpoint into an MLX directory at `out`.

    Args:
        source: a checkpoint directory, a weights file (.safetensors, .pt, .pth,
            .bin; config.json beside it), or a Hub repo id.
        out: the directory to create. It is written under a temporary name and
            renamed when complete, so a failed run leaves nothing at `out`.
        dtype: float16, bfloat16 or float32 for every floating tensor except the
            router (always float32). Default: `default_dtype` (float16 for QAT
            checkpoints, whose scales are fp16; the checkpoint's own otherwise).
        quantize: quantize linears, embedding and experts (the default).
        q_bits, q_group_size: 4 or 8 bits; groups of 32, 64 or 128. Default group
            size: a QAT checkpoint's own (its INT4 weights are then copied bit
            for bit), 32 otherwise.
        force: replace an existing `out` that is a converted model.
        revision: Hub branch, tag or commit.
        require_tokenizer: fail before converting when the source has no
            tokenizer.json (otherwise only warn: it can be copied in later).
    Returns:
        The output directory.
    """
    return write_conversion(
        check_conversion(source, out, dtype, quantize, q_bits, q_group_size, force, revision,
                         require_tokenizer),
        max_shard_bytes, progress)
