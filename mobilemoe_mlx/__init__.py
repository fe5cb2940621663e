"""Run Meta's MobileMoE models with MLX: model, converter and loader."""

from .runtime import exact_float32_matmuls

exact_float32_matmuls()  # before any import below can run a matmul

from ._version import __version__  # noqa: E402
from .convert import convert  # noqa: E402
from .loading import load  # noqa: E402

__all__ = ["load", "convert", "__version__"]
