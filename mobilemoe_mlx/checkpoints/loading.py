"""`load()`: a converted directory, or any checkpoint converted once into the cache."""

import hashlib
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn

from ..errors import UserError
from ..model.runtime import current as current_runtime
from .config import check_config_fits, validate_config
from .consistency import check_checkpoint_files, check_embedding_rows
from .convert import (  # noqa: F401 - is_converted is public here too
    check_conversion,
    is_converted,
    source_files,
    write_conversion,
)
from .hub import cache_root, converted_cache_dir, looks_like_repo_id, resolve_revision
from .output_dir import Destination, os_error_reason
from .reading import (
    WEIGHT_SUFFIXES,
    CorruptSafetensors,
    read_config,
    read_safetensors_header,
    tensor_bytes,
)
from .turns import load_tokenizer

# How messages name a conversion into the cache: the user passed no --out.
CACHE_ENTRY = Destination(
    label="the cache entry", replace="delete it",
    elsewhere="point MOBILEMOE_MLX_HOME at a directory elsewhere that you can write to")

try:  # Linux and macOS; elsewhere concurrent first loads are not serialised
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None


class DamagedConversion(UserError):
    """A converted directory whose weights files are damaged (say, truncated)."""


def check_converted_weights(path: Path, vocab_size: Optional[int] = None) -> int:
    """The tensor bytes of a converted directory, after checking every weights
    file's header against its size (DamagedConversion if one is damaged) and,
    given `vocab_size`, the embedding's rows against it."""
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
        if vocab_size is not None:
            check_embedding_rows(infos, vocab_size, f.name)
        total += tensor_bytes(infos.values())
    return total


def check_converted(path: Path) -> dict:
    """The config.json of a converted directory, read and checked once, after
    every weights file's header is checked against its size, the config
    against the bytes the weights hold (DamagedConversion if a file is
    damaged) and against the embedding's rows, and the tokenizer files against
    the config (checkpoints/consistency.py: no id the tokenizer or a config names may lie
    past the embedding)."""
    config = read_config(path / "config.json")
    validate_config(config)
    check_config_fits(config, check_converted_weights(path, config["vocab_size"]), str(path))
    check_checkpoint_files(path, config)
    return config


def load_converted(path: Path, lazy: bool = False, float32_on_cpu: bool = False,
                   config: Optional[dict] = None) -> Tuple[nn.Module, dict]:
    """The model of a converted directory, through mlx-lm's own loader.

    `config` is what `check_converted(path)` returned, when the caller already
    checked the directory (so nothing is read twice); otherwise it is checked here.
    With `float32_on_cpu` (what load() asks for), where MLX runs on the CPU
    (model/runtime.py) the floating parameters are cast to float32 (quantized
    weights stay quantized; their scales and biases are cast): the CPU backend
    runs float16 and bfloat16 tens of times slower, and the directory on disk
    stays as portable as it was converted. GPU backends (Metal, CUDA) keep the
    stored dtypes, as does the benchmark everywhere."""
    from mlx_lm.utils import load_model

    from ..model.mobilemoe import Model, ModelArgs, realize

    if config is None:
        check_converted(path)
    try:
        model, config = load_model(
            # float32_on_cpu: this function casts (or not) itself, below.
            path, lazy=lazy, model_config={"model_file": None, "float32_on_cpu": False},
            get_model_classes=lambda config: (Model, ModelArgs),
        )
    except json.JSONDecodeError as e:
        raise UserError(f"{path / 'config.json'} is not valid JSON ({e})") from e
    except (FileNotFoundError, ValueError) as e:  # mlx-lm: no weights, or shapes that differ
        lines = str(e).strip().splitlines() or [type(e).__name__]
        more = f" (+{len(lines) - 1} more lines)" if len(lines) > 1 else ""
        raise UserError(f"{path}'s config.json does not match its weights: "
                        f"{lines[0][:300]}{more}; convert the checkpoint again") from e
    if not current_runtime().half_precision_fast:
        if float32_on_cpu:
            model.apply(as_float32)
        else:
            _check_runs_here(model, path)
    if not lazy:  # nothing left lazy: any thread can run it (Model.__init__ says why)
        realize(model)
    return model, config


def _check_runs_here(model: nn.Module, path: Path) -> None:
    """MLX's CPU backend has gather_mm in float32 only: say so at load, not at
    the first token with a kernel error."""
    from ..model.mobilemoe import ExpertLinear

    experts = model.layers[0].feed_forward.experts.gate_up_proj
    if isinstance(experts, ExpertLinear) and experts.weight.dtype != mx.float32:
        raise UserError(
            f"{path} keeps its experts unquantized in {str(experts.weight.dtype).split('.')[-1]}, "
            "which MLX's CPU backend cannot run: convert again with --dtype float32, or quantize"
        )


def as_float32(a: mx.array) -> mx.array:
    if mx.issubdtype(a.dtype, mx.floating) and a.dtype != mx.float32:
        return a.astype(mx.float32)
    return a


def conversion_dtype() -> Optional[str]:
    """The converter's default (float16 for QAT) on every backend: where MLX
    runs on the CPU, load_converted casts to float32 in memory, as it does for
    any float16 directory. A float32 cache entry would be a second, larger
    copy of what convert.py writes (S: 907 MB against 757 MB), and the cast at
    load time costs little (docs/conversion.md, "Converting on load")."""
    return None


def _local_cache_dir(path: Path, dtype: Optional[str]) -> Path:
    """Keyed by absolute path and the size and modification time of every file
    a conversion reads (weights, config, tokenizer): a changed one converts
    again, while other files beside them (a home directory's) change nothing."""
    key = hashlib.sha256(f"{path.resolve()}:{dtype}".encode())
    for f in source_files(path):
        st = f.stat()
        key.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return cache_root() / "local" / key.hexdigest()[:16]


def check_source_argument(source: str, option: str = "source") -> None:
    """Reject a source `load()` cannot use, before anything is fetched or converted:
    an empty one, a file that is no weights file, or neither a path nor a repo id."""
    cli = option.startswith("--")  # the CLIs also take the sizes S, M and L
    if not source.strip():
        raise UserError(f"{option} is empty: give {'S, M, L, ' if cli else ''}a Hub repo id "
                        "or a path")
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir() and path.suffix not in WEIGHT_SUFFIXES:
            raise UserError(f"{option} {source} is neither a directory nor a weights file "
                            f"({' '.join(WEIGHT_SUFFIXES)}); pass the checkpoint's directory")
    elif not looks_like_repo_id(source):
        # A name without a slash is more likely a mistyped size than a path.
        size = "a model size (S, M or L), " if cli and os.sep not in source else ""
        raise UserError(f"{option} {source} is neither {size}an existing path nor a Hub repo id "
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
        raise UserError(f"cannot write the cache {cache_root()}: {os_error_reason(e)}; "
                        f"{CACHE_ENTRY.elsewhere}") from e
    with handle:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes
        yield


def _cached(target: Path, progress: bool) -> Optional[dict]:
    """The checked config of the cache entry `target` if it is a whole converted
    model, else None; a damaged one (say, truncated weights) is reported and
    converted again."""
    if not is_converted(target):
        return None
    try:
        config = check_converted(target)
    except UserError as e:
        print(f"warning: {e}; converting it again", file=sys.stderr)
        return None
    if progress:
        print(f"using the converted model cached at {target}", file=sys.stderr)
    return config


BeforeConverting = Callable[[dict, Path], None]


def resolve_converted(path_or_repo: str, revision: Optional[str] = None,
                      progress: bool = True,
                      before_converting: Optional[BeforeConverting] = None) -> Tuple[Path, dict]:
    """A converted directory for any source, converting into the cache once, and
    its checked config. Before a conversion starts, every check it makes is made
    (and `before_converting(config, checkpoint directory)` called) first, so a
    refusal comes before the "converting" line, not after."""
    check_source_argument(path_or_repo)
    dtype = conversion_dtype()
    path = Path(path_or_repo).expanduser()
    if path.exists():
        if is_converted(path):
            return path, check_converted(path)
        target = _local_cache_dir(path, dtype)
    else:  # check_source_argument made sure it is a repo id
        commit = resolve_revision(path_or_repo, revision)
        target = converted_cache_dir(path_or_repo, commit + (f"-{dtype}" if dtype else ""))
    if target.exists() and (config := _cached(target, progress)) is not None:
        return target, config
    with _conversion_lock(target):
        if (config := _cached(target, progress)) is not None:
            return target, config  # another process converted it while we waited
        conversion = check_conversion(path_or_repo, str(target), dtype=dtype, revision=revision,
                                      force=True, require_tokenizer=True, dest=CACHE_ENTRY)
        if before_converting is not None:
            before_converting(conversion.config, conversion.tokenizer_dir)
        if progress:
            print(f"converting {path_or_repo} once into {target}", file=sys.stderr)
        write_conversion(conversion, progress=progress)
    return target, check_converted(target)


def load(path_or_repo: str, revision: Optional[str] = None, lazy: bool = False,
         progress: bool = True, before_converting: Optional[BeforeConverting] = None):
    """Load a MobileMoE model and its tokenizer.

    Args:
        path_or_repo: a converted MLX directory, an unconverted checkpoint
            (directory or weights file), or a Hub repo id such as
            ``facebook/MobileMoE-S-QAT``. Unconverted sources are converted once
            into the cache ($MOBILEMOE_MLX_HOME, else $HF_HOME/mobilemoe-mlx,
            else $XDG_CACHE_HOME or ~/.cache, under mobilemoe-mlx), keyed by repo
            and commit (or by path and file times); float32 where MLX runs on the CPU.
        revision: Hub branch, tag or commit.
        lazy: leave weights on disk until first use, which must then be on
            this thread (MLX binds a lazy array to the thread that made it);
            otherwise every array the model holds is evaluated, and any
            thread can run it, many at once.
        before_converting: called with the checkpoint's checked config and its
            directory when a conversion is about to start, to refuse (UserError)
            what the caller would refuse once the model is loaded (chat: a
            checkpoint without a chat template) before the conversion runs.
    Where MLX runs on the CPU, floating parameters are cast to float32 in memory
    (see load_converted); the directory on disk is left as it is.
    Returns:
        ``(model, tokenizer)``: an mlx-lm compatible model and mlx-lm's
        TokenizerWrapper, ready for ``mlx_lm.generate`` / ``stream_generate``.
    """
    path, config = resolve_converted(path_or_repo, revision, progress, before_converting)
    model, config = load_converted(path, lazy, float32_on_cpu=True, config=config)
    return model, load_tokenizer(path, config.get("eos_token_id"))
