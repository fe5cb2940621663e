"""Reading released checkpoints tensor by tensor, without loading them whole.

A `TensorSource` lists every tensor's dtype and shape from the file headers
(so a conversion is checked before any data is read) and loads one tensor at
a time on request. Safetensors are read lazily by `mx.load`; PyTorch pickles
through `torch.load(mmap=True)`.
"""

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import mlx.core as mx

from .errors import UserError

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
_PREFIXES = ("module.", "_orig_mod.")
_PICKLE_WRAPPERS = ("model", "state_dict")


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors spelling: U8, F16, BF16, F32, ...
    shape: Tuple[int, ...]


_SAFETENSORS_ITEMSIZE = {"U8": 1, "I8": 1, "F16": 2, "BF16": 2, "I16": 2, "F32": 4,
                         "I32": 4, "U32": 4, "F64": 8, "I64": 8, "BOOL": 1}


def _strip_prefixes(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix):], True
    return name


def read_safetensors_header(path: Path) -> Dict[str, TensorInfo]:
    """The tensor table of a safetensors file, checked against the file size so
    a truncated or corrupt download is caught before conversion starts."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(n))
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not a valid safetensors file ({e}); download it again") from e
    tensors, end = {}, 0
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        dtype, shape = meta["dtype"], tuple(meta["shape"])
        start, stop = meta["data_offsets"]
        count = 1
        for s in shape:
            count *= s
        if dtype not in _SAFETENSORS_ITEMSIZE:
            raise UserError(f"{path}: tensor {name} has dtype {dtype}, which MobileMoE "
                            "checkpoints do not use")
        if stop - start != count * _SAFETENSORS_ITEMSIZE[dtype]:
            raise UserError(f"{path}: tensor {name} has the wrong byte size; the file is corrupt")
        tensors[name] = TensorInfo(dtype, shape)
        end = max(end, stop)
    if 8 + n + end > size:
        raise UserError(
            f"{path} is truncated ({size} bytes, its header needs {8 + n + end}); download it again"
        )
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

    t = t.contiguous()
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
        if not isinstance(t, torch.Tensor):
            raise UserError(f"{path}: entry {name} is not a tensor")
        dtype = _TORCH_DTYPES.get(str(t.dtype).removeprefix("torch."), str(t.dtype))
        source.add(name, TensorInfo(dtype, tuple(t.shape)), lambda t=t: _torch_to_mx(t), path)


def weight_files(path: Path) -> List[Path]:
    """The weights files of a checkpoint directory or the single file given."""
    if path.is_file():
        if path.suffix not in WEIGHT_SUFFIXES:
            raise UserError(f"{path} is not a weights file ({', '.join(WEIGHT_SUFFIXES)})")
        return [path]
    index = path / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (path / s).exists()]
        if missing:
            raise UserError(f"{path} lacks shards named in its index: {', '.join(missing)}")
        return [path / s for s in shards]
    for pattern in ("*.safetensors", "*.bin", "*.pt", "*.pth"):
        files = sorted(path.glob(pattern))
        if files:
            return files
    raise UserError(f"{path} holds no weights file ({', '.join(WEIGHT_SUFFIXES)})")


def open_checkpoint(path: Path) -> Tuple[dict, TensorSource]:
    """The config.json and tensors of a checkpoint directory or weights file."""
    if not path.exists():
        raise UserError(f"{path} does not exist")
    config_path = (path if path.is_dir() else path.parent) / "config.json"
    if not config_path.exists():
        raise UserError(f"no config.json in {config_path.parent}; a checkpoint needs its config")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{config_path} is not valid JSON ({e})") from e
    source = TensorSource()
    for file in weight_files(path):
        if file.suffix == ".safetensors":
            _add_safetensors(source, file)
        else:
            _add_pickle(source, file)
    return config, source
