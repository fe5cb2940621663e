"""Reading released checkpoints tensor by tensor, without loading them whole.

A `TensorSource` lists every tensor's dtype and shape from the file headers
(so a conversion is checked before any data is read) and loads one tensor at
a time on request. Safetensors are read lazily by `mx.load`; PyTorch pickles
through `torch.load(mmap=True)`.
"""

import json
import math
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Tuple

import mlx.core as mx

from ..errors import UserError

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
INDEX_FILE = "model.safetensors.index.json"  # the shard list of a sharded checkpoint
_PREFIXES = ("module.", "_orig_mod.")
_PICKLE_WRAPPERS = ("model", "state_dict")


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors spelling: U8, F16, BF16, F32, ...
    shape: Tuple[int, ...]


_SAFETENSORS_ITEMSIZE = {"U8": 1, "I8": 1, "F16": 2, "BF16": 2, "I16": 2, "F32": 4,
                         "I32": 4, "U32": 4, "F64": 8, "I64": 8, "BOOL": 1}


def tensor_bytes(infos: Iterable[TensorInfo]) -> int:
    """The bytes tensors take, from their dtypes and shapes alone."""
    total = 0
    for info in infos:
        count = 1
        for s in info.shape:
            count *= s
        total += count * _SAFETENSORS_ITEMSIZE.get(info.dtype, 1)
    return total


def _strip_prefixes(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix):], True
    return name


# The safetensors library's own limit; a longer header is damage, not a model.
MAX_HEADER_BYTES = 100_000_000


class CorruptSafetensors(UserError):
    """A damaged safetensors file; `problem` says what is wrong, without the advice."""

    def __init__(self, problem: str, advice: str = "download it again"):
        super().__init__(f"{problem}; {advice}")
        self.problem = problem


def _unique_keys(pairs):
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"the name {key!r} appears twice")
        seen[key] = value
    return seen


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _entry(path: Path, name: str, meta) -> Tuple[TensorInfo, int, int]:
    """One header entry, checked the way the safetensors library checks it."""
    def bad(what: str) -> UserError:
        return CorruptSafetensors(f"{path}: the header entry of tensor {name} {what}",
                                  "the file is corrupt, download or convert it again")

    if not isinstance(meta, dict) or set(meta) != {"dtype", "shape", "data_offsets"}:
        raise bad("must hold exactly dtype, shape and data_offsets")
    dtype, shape, offsets = meta["dtype"], meta["shape"], meta["data_offsets"]
    if not isinstance(dtype, str):
        raise bad(f"has the dtype {dtype!r}, which is not a name")
    if dtype not in _SAFETENSORS_ITEMSIZE:
        raise UserError(f"{path}: tensor {name} has dtype {dtype}, which MobileMoE "
                               "checkpoints do not use")
    if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
        raise bad(f"has the shape {shape!r}, not a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(_is_int(o) and o >= 0 for o in offsets) or offsets[0] > offsets[1]):
        raise bad(f"has data_offsets {offsets!r}, not two increasing integers")
    count = 1
    for s in shape:
        count *= s
    if offsets[1] - offsets[0] != count * _SAFETENSORS_ITEMSIZE[dtype]:
        raise bad("has the wrong byte size for its dtype and shape")
    return TensorInfo(dtype, tuple(shape)), offsets[0], offsets[1]


def read_safetensors_header(path: Path) -> Dict[str, TensorInfo]:
    """The tensor table of a safetensors file, checked as strictly as the
    safetensors library checks it (a JSON object of unique names, known dtypes,
    offsets that tile the data section exactly), so a damaged file is refused
    before anything is converted instead of becoming a wrong model."""
    def corrupt(why: str) -> UserError:
        return CorruptSafetensors(f"{path} is not a valid safetensors file ({why})")

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise corrupt("shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", prefix)
            if n > size - 8 or n > MAX_HEADER_BYTES:
                raise corrupt(f"its header length {n} exceeds the file")
            raw = f.read(n)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from e
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as e:  # JSON, UTF-8 and duplicate names
        raise corrupt(f"bad header: {str(e)[:200]}") from e
    if not isinstance(header, dict):
        raise corrupt("its header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is None:  # null, as MLX writes it, is allowed
        metadata = {}
    if not isinstance(metadata, dict) or not all(
            isinstance(v, str) for v in metadata.values()):
        raise corrupt("its __metadata__ is not a table of strings")
    tensors, spans = {}, []
    for name, meta in header.items():
        tensors[name], start, stop = _entry(path, name, meta)
        spans.append((start, stop, name))
    data = size - 8 - n
    end = 0
    for start, stop, name in sorted(spans):
        if start != end:
            raise corrupt(f"tensor {name} starts at byte {start}, not where the previous "
                          f"one ends ({end}): the offsets overlap or leave a gap")
        end = stop
    if end > data:
        raise CorruptSafetensors(f"{path} is truncated ({size} bytes, its header needs "
                                 f"{8 + n + end})")
    if end < data:
        raise corrupt(f"{data - end} bytes after the last tensor")
    return tensors


class TensorSource:
    """Tensors of one checkpoint, by name (prefixes like `module.` removed)."""

    def __init__(self) -> None:
        self.info: Dict[str, TensorInfo] = {}
        self._loaders: Dict[str, Callable[[], mx.array]] = {}

    def add(self, name: str, info: TensorInfo, loader: Callable[[], mx.array], origin: Path):
        name = _strip_prefixes(name)
        if name in self.info:
            raise UserError(f"tensor {name} appears twice in the checkpoint (again in {origin})")
        self.info[name] = info
        self._loaders[name] = loader

    def load(self, name: str) -> mx.array:
        return self._loaders[name]()

    def stored_bytes(self) -> int:
        """The bytes all tensors take, from their dtypes and shapes."""
        return tensor_bytes(self.info.values())


def _add_safetensors(source: TensorSource, path: Path) -> None:
    infos = read_safetensors_header(path)
    arrays: Dict[str, mx.array] = {}

    def loader(name):
        def load():
            # mx.load is lazy: each array is read from disk when evaluated.
            if not arrays:
                arrays.update(mx.load(str(path)))
            return arrays.pop(name)
        return load

    for name, info in infos.items():
        source.add(name, info, loader(name), path)


_TORCH_DTYPES = {"uint8": "U8", "int8": "I8", "float16": "F16", "bfloat16": "BF16",
                 "float32": "F32", "float64": "F64", "int32": "I32", "int64": "I64"}


def _torch_to_mx(t) -> mx.array:
    import torch

    t = t.detach().contiguous()  # a tensor saved with requires_grad has no numpy() otherwise
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: carry the raw bits
        return mx.array(t.view(torch.int16).numpy()).view(mx.bfloat16)
    return mx.array(t.numpy())


def _add_pickle(source: TensorSource, path: Path) -> None:
    try:
        import torch
    except ImportError as e:
        raise UserError(
            f"{path.name} is a PyTorch pickle; reading it needs PyTorch: pip install torch"
        ) from e
    def read(mmap: bool):
        return torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)

    try:
        try:
            state = read(mmap=True)  # tensors stay on disk until converted
        except RuntimeError as e:
            if "_use_new_zipfile_serialization" not in str(e):
                raise
            state = read(mmap=False)  # the legacy (pre-1.6) format cannot be mapped
    except pickle.UnpicklingError as e:
        if "weights only" not in str(e).lower():
            raise UserError(f"{path} is not a readable PyTorch checkpoint "
                            f"({str(e).splitlines()[0][:200]})") from e
        # Never pass on torch's advice to set weights_only=False: that runs the code.
        raise UserError(
            f"{path} holds Python objects besides tensors, and loading those could run "
            "code on this machine, so mobilemoe-mlx will not load it; ask for the "
            "checkpoint as .safetensors or as a plain state dict of tensors") from e
    except Exception as e:  # torch raises many types for a bad file
        raise UserError(f"{path} is not a readable PyTorch checkpoint "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e
    for key in _PICKLE_WRAPPERS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise UserError(f"{path} does not hold a state dict of tensors")
    for name, t in state.items():
        if not isinstance(name, str):
            raise UserError(f"{path}: the state dict has the key {name!r} ({type(name).__name__}), "
                            "not a tensor name; save a dict from names to tensors")
        if problem := _not_a_plain_tensor(t, torch):
            raise UserError(f"{path}: entry {name} {problem}; save the weights as plain dense "
                            "CPU tensors (a state_dict() of the model), or as .safetensors")
        dtype = _TORCH_DTYPES[str(t.dtype).removeprefix("torch.")]
        source.add(name, TensorInfo(dtype, tuple(t.shape)), lambda t=t: _torch_to_mx(t), path)


def _not_a_plain_tensor(t, torch) -> str:
    """What keeps `t` from being read as a dense array of numbers, or ''.

    Only a strided tensor with its data in CPU memory, of a dtype the safetensors
    format has, is one: sparse and nested ones, meta tensors (no data),
    quantized ones and other dtypes each fail somewhere else, later."""
    if not isinstance(t, torch.Tensor):
        return f"is a {type(t).__name__}, not a tensor"
    if type(t) not in (torch.Tensor, torch.nn.Parameter):
        return f"is a tensor subclass ({type(t).__name__})"
    if t.is_nested:
        return "is a nested tensor"
    if t.layout != torch.strided:
        return f"is a {str(t.layout).removeprefix('torch.')} tensor, not a dense one"
    if t.device.type != "cpu":
        return f"is on the {t.device.type} device" + (
            ", which holds no data" if t.device.type == "meta" else "")
    if t.is_quantized:
        return f"is a quantized tensor ({str(t.dtype).removeprefix('torch.')})"
    if str(t.dtype).removeprefix("torch.") not in _TORCH_DTYPES:
        return (f"has dtype {str(t.dtype).removeprefix('torch.')}, which MobileMoE "
                "checkpoints do not use")
    return ""


def _index_shards(index: Path) -> List[str]:
    """The shard names of an index file: plain file names beside it, nothing else."""
    def bad(why: str) -> UserError:
        return UserError(f"{index} is not a valid safetensors index ({why}); "
                         "download it again or remove it")

    try:
        data = json.loads(read_text(index), object_pairs_hook=_unique_keys)
    except ValueError as e:
        raise bad(str(e)[:200]) from e
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise bad("it has no weight_map object")
    shards = set()
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard.endswith(".safetensors"):
            raise bad(f"tensor {name} maps to {shard!r}, not a .safetensors file name")
        if shard != Path(shard).name or shard in (".", ".."):
            raise bad(f"tensor {name} maps to {shard!r}: shards must be files in the "
                      "checkpoint directory itself (no folders, '..' or absolute paths)")
        shards.add(shard)
    return sorted(shards)


def read_text(path: Path) -> str:
    """A text file's contents; UserError if it is unreadable, a directory or not UTF-8."""
    if path.is_dir():
        raise UserError(f"{path} is a directory, not a file")
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from e
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from e


def read_json_object(path: Path) -> dict:
    """A JSON file that must hold an object (a tokenizer's or generation
    config); UserError naming the file for anything else."""
    try:
        data = json.loads(read_text(path))
    except (ValueError, RecursionError) as e:
        raise UserError(f"{path} is not valid JSON ({str(e)[:200]})") from e
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a JSON object")
    return data


def non_finite_key(value, where: str = "") -> str:
    """The dotted key of the first NaN or infinite number in parsed JSON, else ''."""
    if isinstance(value, float) and not math.isfinite(value):
        return where or "(top level)"
    items = (value.items() if isinstance(value, dict)
             else enumerate(value) if isinstance(value, list) else ())
    for key, item in items:
        if found := non_finite_key(item, f"{where}.{key}" if where else str(key)):
            return found
    return ""


def read_config(config_path: Path) -> dict:
    """config.json parsed; UserError for anything but a JSON object of finite numbers."""
    if not config_path.exists():
        raise UserError(f"no config.json in {config_path.parent}; a checkpoint needs its config")
    try:
        config = json.loads(read_text(config_path))
    except json.JSONDecodeError as e:
        raise UserError(f"{config_path} is not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise UserError(f"{config_path} is not a JSON object")
    if key := non_finite_key(config):
        raise UserError(f"{config_path} sets {key} to NaN or infinity; "
                        "it needs a finite number")
    return config


def weight_files(path: Path) -> List[Path]:
    """The weights files of a checkpoint directory or the single file given."""
    if path.is_file():
        if path.suffix not in WEIGHT_SUFFIXES:
            raise UserError(f"{path} is not a weights file ({', '.join(WEIGHT_SUFFIXES)})")
        return [path]
    index = path / INDEX_FILE
    if index.is_file():
        shards = _index_shards(index)
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise UserError(f"{path} lacks shards named in its index: {', '.join(missing)}")
        return [path / s for s in shards]
    for pattern in ("*.safetensors", "*.bin", "*.pt", "*.pth"):
        # Files only: a directory of that name (an output written beside) is no input.
        files = sorted(p for p in path.glob(pattern) if p.is_file())
        if files:
            return files
    raise UserError(f"{path} holds no weights file ({', '.join(WEIGHT_SUFFIXES)})")


def open_checkpoint(path: Path) -> Tuple[dict, TensorSource]:
    """The config.json and tensors of a checkpoint directory or weights file."""
    if not path.exists():
        raise UserError(f"{path} does not exist")
    config = read_config((path if path.is_dir() else path.parent) / "config.json")
    source = TensorSource()
    for file in weight_files(path):
        if file.suffix == ".safetensors":
            _add_safetensors(source, file)
        else:
            _add_pickle(source, file)
    return config, source
