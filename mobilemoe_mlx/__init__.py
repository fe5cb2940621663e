"""Run Meta's MobileMoE models with MLX: model, converter and loader."""

__version__ = "0.1.0"

from .convert import convert  # noqa: E402
from .loading import load  # noqa: E402

__all__ = ["load", "convert", "__version__"]
