"""Which MLX backend runs here, and what it wants: decided in one place.

MLX computes on Apple's GPU (Metal), on an NVIDIA GPU (its CUDA backend) or on
the CPU, and the three want different things. Both GPU backends run float16
at full speed, so models run in float16 there. MLX's CPU kernels are scalar
and single-threaded, run float16 and bfloat16 10-40x slower than float32, and
have `gather_mm` (unquantized experts) in float32 only, so models run in
float32 there. Everything that depends on this asks `current()`: load()'s
in-memory cast, the dtype load() converts a cache entry to, the converter's
warning, the planner's and the benchmark's activation and KV dtype, and the
labels, notes and time estimate of the benchmark and chat.

"No Metal" is not "CPU": a Linux machine with an NVIDIA card and MLX's CUDA
wheel runs on the GPU, and a Mac with `mx.set_default_device(mx.cpu)` runs on
the CPU. So the backend is the default device's, not the platform's.
"""

import os
from dataclasses import dataclass
from typing import Optional

METAL, CUDA, CPU = "Metal", "CUDA", "CPU"
# The runtime of the question "does it fit a phone?": MLX on the iPhone's GPU.
PHONE_DTYPE = "float16"


@dataclass(frozen=True)
class Runtime:
    backend: str  # METAL, CUDA or CPU: what runs arrays on the default device
    device: str  # MLX's default device, e.g. "Device(gpu, 0)"
    device_name: Optional[str]  # the GPU's name (e.g. "Apple M3 Pro"); None on the CPU
    compute_dtype: str  # the activation and KV dtype models run in here

    @property
    def on_gpu(self) -> bool:
        return self.backend != CPU

    @property
    def half_precision_fast(self) -> bool:
        """float16/bfloat16 arithmetic at full speed (and gather_mm in them)."""
        return self.on_gpu

    @property
    def prefill_chunk(self) -> int:
        """Prompt tokens per prefill chunk (chat; `bench run`'s default), with
        the experts' sorted dispatch (model/mobilemoe.py), chosen by measurement
        (docs/benchmarks.md, "Prefill dispatch"). 256 on every backend for now:
        on the CPU, chunks of 128, 256 and 512 and sorted or unsorted dispatch
        came within 4-7% of each other at S's shape, run to run; on the GPUs
        256 is the largest chunk that keeps S's 8k-token prefill within the
        planner's 1.1 GB (not measured on a GPU by this project)."""
        from .planner import PREFILL_CHUNK

        return PREFILL_CHUNK

    def timing_note(self) -> str:
        """What this backend's times say about an Apple device ('' on Metal)."""
        if self.backend == METAL:
            return ""
        if self.backend == CUDA:
            return "CUDA timings here are not Apple figures; memory, bytes and FLOPs are"
        return "CPU timings here are not Apple figures; memory, bytes and FLOPs are"


def exact_float32_matmuls() -> None:
    """Ask MLX's GPU backends for real float32 matmuls (MLX_ENABLE_TF32=0), not
    TF32, unless the user chose; model/mobilemoe.py explains why the router needs it.
    MLX reads the variable at the process's first matmul, so this is called when
    the package is imported, before anything of ours can run one."""
    os.environ.setdefault("MLX_ENABLE_TF32", "0")


def gpu_available() -> bool:
    """Whether this MLX has a GPU backend with a device (Metal or CUDA),
    whichever device is the default now."""
    import mlx.core as mx

    return mx.metal.is_available() or mx.cuda.is_available()


def current() -> Runtime:
    """The backend of MLX's default device now, and what it wants."""
    import mlx.core as mx

    on_gpu = mx.default_device().type == mx.DeviceType.gpu
    backend = CPU
    if on_gpu and mx.metal.is_available():
        backend = METAL
    elif on_gpu and mx.cuda.is_available():
        backend = CUDA
    return Runtime(
        backend=backend,
        device=str(mx.default_device()),
        device_name=_gpu_name() if backend != CPU else None,
        compute_dtype="float16" if backend != CPU else "float32",
    )


def _gpu_name() -> Optional[str]:
    import mlx.core as mx

    try:
        return mx.device_info().get("device_name") or None
    except Exception:  # noqa: BLE001 - a name is informational; no name is fine
        return None
