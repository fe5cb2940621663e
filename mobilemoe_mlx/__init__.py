"""Run Meta's MobileMoE models with MLX: model, converter and loader.

The package by layers, each importing only from the ones below it
(docs/architecture.md draws them; tests/test_layers.py holds them):

    chat/         the terminal chat: conversation, KV cache, streaming, commands
    checkpoints/  reading, validating, converting and writing checkpoints; the Hub
    model/        the MobileMoE model file and what runs it
    errors.py     the one error type a user can fix, and the CLI wrapper
"""

from .model.runtime import exact_float32_matmuls

exact_float32_matmuls()  # before any import below can run a matmul

from . import _moved  # noqa: E402
from ._version import __version__  # noqa: E402
from .checkpoints.convert import convert  # noqa: E402
from .checkpoints.loading import load  # noqa: E402

_moved.install()

__all__ = ["load", "convert", "__version__"]
