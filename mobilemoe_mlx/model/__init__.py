"""The model and what runs it.

mobilemoe.py  the MobileMoE architecture as an mlx-lm model file (self-contained:
              converted directories ship a copy of it as their `model_file`)
routing.py    watching which experts each token chooses
runtime.py    which MLX backend runs, and what that decides (dtype, chunking)
planner.py    memory planning: will a model and its context fit this machine
analytic.py   parameter, byte, FLOP and KV-cache counts from a config alone

`from mobilemoe_mlx.model import Model, ModelArgs` reads them from mobilemoe.py,
as it did when this package was one module.
"""

_FROM_MODEL_FILE = ("Model", "ModelArgs")


def __getattr__(name):
    # Lazily, so that importing planner or analytic does not import mlx-lm.
    if name in _FROM_MODEL_FILE:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.mobilemoe"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
