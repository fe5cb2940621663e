"""`load()`: a converted directory, or any checkpoint converted once into the cache."""

import hashlib
import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn

from .checkpoint import (
    WEIGHT_SUFFIXES,
    CorruptSafetensors,
    read_config,
    read_safetensors_header,
    tensor_bytes,
)
from .config import check_config_fits, validate_config
from .convert import convert, is_converted  # noqa: F401 - is_converted is public here too
from .errors import UserError
from .hub import cache_root, converted_cache_dir, looks_like_repo_id, resolve_revision
from .output_dir import disk_error
from .runtime import current as current_runtime

try:  # Linux and macOS; elsewhere concurrent first loads are not serialised
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None


class DamagedConversion(UserError):
    """A converted directory whose weights files are damaged (say, truncated)."""


def load_tokenizer(path: Path, eos_token_ids=None):
    """mlx-lm's tokenizer wrapper for a converted directory.

    An empty transformers config is handed in so transformers never parses the
    model's own config.json (transformers 5 cannot, see docs/architecture.md section 6)."""
    if not (path / "tokenizer.json").exists():
        raise UserError(
            f"{path} has no tokenizer.json; copy the checkpoint's tokenizer files there"
        )
    from mlx_lm.tokenizer_utils import load as load_mlx_tokenizer
    from transformers import PretrainedConfig

    return load_mlx_tokenizer(path, {"config": PretrainedConfig()}, eos_token_ids=eos_token_ids)


def check_converted_weights(path: Path) -> int:
    """The tensor bytes of a converted directory, after checking every weights
    file's header against its size; DamagedConversion if one is damaged."""
    files = sorted(path.glob("model*.safetensors"))
    if not files:
        raise DamagedConversion(f"{path} holds no model*.safetensors; convert the checkpoint "
                                "again (with --force to replace this directory)")
    total = 0
    for f in files:
        try:
            infos = read_safetensors_header(f)
        except UserError as e:
            what = e.problem if isinstance(e, CorruptSafetensors) else str(e)
            raise DamagedConversion(
                f"the converted model in {path} is damaged ({what}); convert the checkpoint "
                "again with --force to replace it") from e
        total += tensor_bytes(infos.values())
    return total


def load_converted(path: Path, lazy: bool = False,
                   float32_on_cpu: bool = False) -> Tuple[nn.Module, dict]:
    """The model of a converted directory, through mlx-lm's own loader.

    With `float32_on_cpu` (what load() asks for), where MLX runs on the CPU
    (runtime.py) the floating parameters are cast to float32 (quantized
    weights stay quantized; their scales and biases are cast): the CPU backend
    runs float16 and bfloat16 tens of times slower, and the directory on disk
    stays as portable as it was converted. GPU backends (Metal, CUDA) keep the
    stored dtypes, as does the benchmark everywhere."""
    from mlx_lm.utils import load_model

    from .model import Model, ModelArgs

    config = read_config(path / "config.json")
    validate_config(config)
    check_config_fits(config, check_converted_weights(path), str(path))
    try:
        model, config = load_model(
            path, lazy=lazy, model_config={"model_file": None},
            get_model_classes=lambda config: (Model, ModelArgs),
        )
    except json.JSONDecodeError as e:
        raise UserError(f"{path / 'config.json'} is not valid JSON ({e})") from e
    except (FileNotFoundError, ValueError) as e:  # mlx-lm: no weights, or shapes that differ
        lines = str(e).strip().splitlines() or [type(e).__name__]
        more = f" (+{len(lines) - 1} more lines)" if len(lines) > 1 else ""
        raise UserError(f"{path}'s config.json does not match its weights: "
                        f"{lines[0][:300]}{more}; convert the checkpoint again") from e
    if current_runtime().half_precision_fast:
        return model, config
    if float32_on_cpu:
        model.apply(_as_float32)
        if not lazy:
            mx.eval(model.parameters())
    else:
        _check_runs_here(model, path)
    return model, config


def _check_runs_here(model: nn.Module, path: Path) -> None:
    """MLX's CPU backend has gather_mm in float32 only: say so at load, not at
    the first token with a kernel error."""
    from .model import ExpertLinear

    experts = model.layers[0].feed_forward.experts.gate_up_proj
    if isinstance(experts, ExpertLinear) and experts.weight.dtype != mx.float32:
        raise UserError(
            f"{path} keeps its experts unquantized in {str(experts.weight.dtype).split('.')[-1]}, "
            "which MLX's CPU backend cannot run: convert again with --dtype float32, or quantize"
        )


def _as_float32(a: mx.array) -> mx.array:
    if mx.issubdtype(a.dtype, mx.floating) and a.dtype != mx.float32:
        return a.astype(mx.float32)
    return a


def conversion_dtype() -> Optional[str]:
    """float32 where MLX runs on the CPU (its half-precision CPU kernels are
    10-40x slower); the converter's default (float16 for QAT) on a GPU."""
    return None if current_runtime().half_precision_fast else "float32"


def _local_cache_dir(path: Path, dtype: Optional[str]) -> Path:
    """Keyed by absolute path and the size and modification time of the weights
    and of the config and tokenizer beside them: a changed file converts again."""
    folder = path if path.is_dir() else path.parent
    files = sorted(p for p in folder.iterdir() if p.is_file())
    if path.is_file():
        files = [path] + [f for f in files if f.suffix not in WEIGHT_SUFFIXES]
    key = hashlib.sha256(f"{path.resolve()}:{dtype}".encode())
    for f in files:
        st = f.stat()
        key.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return cache_root() / "local" / key.hexdigest()[:16]


def check_source_argument(source: str, option: str = "source") -> None:
    """Reject a source `load()` cannot use, before anything is fetched or converted:
    an empty one, a file that is no weights file, or neither a path nor a repo id."""
    if not source.strip():
        sizes = "S, M, L, " if option.startswith("--") else ""  # the CLIs also take sizes
        raise UserError(f"{option} is empty: give {sizes}a Hub repo id or a path")
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir() and path.suffix not in WEIGHT_SUFFIXES:
            raise UserError(f"{option} {source} is neither a directory nor a weights file "
                            f"({' '.join(WEIGHT_SUFFIXES)}); pass the checkpoint's directory")
    elif not looks_like_repo_id(source):
        raise UserError(f"{option} {source} is neither an existing path nor a Hub repo id "
                        "(org/name)")


@contextmanager
def _conversion_lock(target: Path) -> Iterator[None]:
    """Held while one process converts into `target`, so many processes loading
    the same source at once convert it once and all get the finished model."""
    lock = target.with_name(f".{target.name}.lock")
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        handle = open(lock, "a")
    except OSError as e:
        raise disk_error(e, lock.parent) or e from e
    with handle:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes
        yield


def _cached(target: Path, progress: bool) -> bool:
    """Whether the cache entry `target` is a whole converted model; a damaged one
    (say, truncated weights) is reported and converted again."""
    if not is_converted(target):
        return False
    try:
        check_converted_weights(target)
    except DamagedConversion as e:
        print(f"warning: {e}; converting it again", file=sys.stderr)
        return False
    if progress:
        print(f"using the converted model cached at {target}", file=sys.stderr)
    return True


def resolve_converted(path_or_repo: str, revision: Optional[str] = None,
                      progress: bool = True) -> Path:
    """A converted directory for any source, converting into the cache once."""
    check_source_argument(path_or_repo)
    dtype = conversion_dtype()
    path = Path(path_or_repo).expanduser()
    if path.exists():
        if is_converted(path):
            return path
        target = _local_cache_dir(path, dtype)
    else:  # check_source_argument made sure it is a repo id
        commit = resolve_revision(path_or_repo, revision)
        target = converted_cache_dir(path_or_repo, commit + (f"-{dtype}" if dtype else ""))
    if target.exists() and _cached(target, progress):
        return target
    with _conversion_lock(target):
        if _cached(target, progress):  # another process converted it while we waited
            return target
        if progress:
            print(f"converting {path_or_repo} once into {target}", file=sys.stderr)
        return convert(path_or_repo, str(target), dtype=dtype, revision=revision, force=True,
                       progress=progress, require_tokenizer=True)


def load(path_or_repo: str, revision: Optional[str] = None, lazy: bool = False,
         progress: bool = True):
    """Load a MobileMoE model and its tokenizer.

    Args:
        path_or_repo: a converted MLX directory, an unconverted checkpoint
            (directory or weights file), or a Hub repo id such as
            ``facebook/MobileMoE-S-QAT``. Unconverted sources are converted once
            into the cache ($MOBILEMOE_MLX_HOME, else $HF_HOME/mobilemoe-mlx,
            else $XDG_CACHE_HOME or ~/.cache, under mobilemoe-mlx), keyed by repo
            and commit (or by path and file times); float32 where MLX runs on the CPU.
        revision: Hub branch, tag or commit.
        lazy: leave weights on disk until first use.
    Where MLX runs on the CPU, floating parameters are cast to float32 in memory
    (see load_converted); the directory on disk is left as it is.
    Returns:
        ``(model, tokenizer)``: an mlx-lm compatible model and mlx-lm's
        TokenizerWrapper, ready for ``mlx_lm.generate`` / ``stream_generate``.
    """
    path = resolve_converted(path_or_repo, revision, progress)
    model, config = load_converted(path, lazy, float32_on_cpu=True)
    return model, load_tokenizer(path, config.get("eos_token_id"))
