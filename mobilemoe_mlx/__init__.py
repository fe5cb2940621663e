"""Run Meta's MobileMoE models with MLX: model, converter and loader."""

from ._version import __version__
from .convert import convert
from .loading import load

__all__ = ["load", "convert", "__version__"]
