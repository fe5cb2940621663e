"""Streaming safetensors output: the header is written from declared shapes,
then each tensor's bytes as soon as it is computed, so converting never holds
more than one weight group in memory."""

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Tuple

import mlx.core as mx
import numpy as np

_DTYPE_NAMES = {mx.uint32: "U32", mx.uint8: "U8", mx.uint16: "U16", mx.float16: "F16",
                mx.bfloat16: "BF16", mx.float32: "F32"}

Spec = Tuple[Tuple[int, ...], mx.Dtype]  # shape, dtype


@dataclass
class Group:
    """Tensors computed together (a quantized weight with its scales and biases)."""
    specs: Dict[str, Spec]
    produce: Callable[[], Dict[str, mx.array]]

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(s)) * d.size for s, d in self.specs.values())


def shard_groups(groups: List[Group], max_shard_bytes: int) -> List[List[Group]]:
    shards: List[List[Group]] = [[]]
    size = 0
    for g in groups:
        if shards[-1] and size + g.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(g)
        size += g.nbytes
    return shards


def _header(groups: Iterable[Group], fmt: str) -> bytes:
    header, offset = {"__metadata__": {"format": fmt}}, 0
    for g in groups:
        for name, (shape, dtype) in g.specs.items():
            n = int(np.prod(shape)) * dtype.size
            header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + n]}
            offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)  # data starts 8-byte aligned


def _as_bytes(a: mx.array) -> memoryview:
    if a.dtype == mx.bfloat16:  # numpy has no bfloat16; the bits are what we write
        a = a.view(mx.uint16)
    return memoryview(np.ascontiguousarray(np.array(a, copy=False)))


def write_shard(path: Path, groups: List[Group], on_group: Callable[[], None] = lambda: None,
                fmt: str = "mlx") -> None:
    header = _header(groups, fmt)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        for g in groups:
            arrays = g.produce()
            mx.eval(*arrays.values())
            for name, (shape, dtype) in g.specs.items():
                a = arrays[name]
                if tuple(a.shape) != tuple(shape) or a.dtype != dtype:
                    raise AssertionError(f"{name}: produced {a.shape} {a.dtype}, declared {shape} {dtype}")
                f.write(_as_bytes(a))
            del arrays
            mx.clear_cache()  # hand freed buffers back so peak memory stays one group
            on_group()


def write_model(out: Path, groups: List[Group], max_shard_bytes: int,
                on_group: Callable[[], None]) -> List[str]:
    """Write model*.safetensors (and an index when sharded); returns file names."""
    shards = shard_groups(groups, max_shard_bytes)
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        write_shard(out / name, shard, on_group)
    if len(shards) > 1:
        weight_map = {t: name for name, shard in zip(names, shards) for g in shard for t in g.specs}
        total = sum(g.nbytes for g in groups)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return names
