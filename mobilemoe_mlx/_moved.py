"""Old import paths, from before the package was split into folders.

`mobilemoe_mlx.loading`, `mobilemoe_mlx.chat_cli` and the rest were flat
modules; they live in `model/`, `checkpoints/` and `chat/` now. Code written
against the old paths keeps working: importing one gives the module at its new
place (the same module object, not a copy) with a DeprecationWarning naming
that place, and `python -m` an old path runs the new one. The package's
`__init__` installs the finder; nothing else imports this module.
"""

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

# old flat module -> its place now (both under mobilemoe_mlx)
MOVED = {
    "model": "model.mobilemoe",
    "routing": "model.routing",
    "runtime": "model.runtime",
    "planner": "model.planner",
    "analytic": "model.analytic",
    "checkpoint": "checkpoints.reading",
    "layout": "checkpoints.layout",
    "tensor_converter": "checkpoints.tensor_converter",
    "packing": "checkpoints.packing",
    "safetensors_writer": "checkpoints.safetensors_writer",
    "consistency": "checkpoints.consistency",
    "config": "checkpoints.config",
    "convert": "checkpoints.convert",
    "convert_cli": "checkpoints.convert_cli",
    "loading": "checkpoints.loading",
    "hub": "checkpoints.hub",
    "synthetic": "checkpoints.synthetic",
    "output_dir": "checkpoints.output_dir",
    "chat": "chat.session",
    "chat_cache": "chat.cache",
    "chat_stream": "chat.stream",
    "chat_options": "chat.options",
    "chat_commands": "chat.commands",
    "chat_model": "chat.loader",
    "chat_cli": "chat.cli",
    "terminal": "chat.terminal",
}
PACKAGE = __name__.rsplit(".", 1)[0]


def new_place(old: str) -> str:
    """`mobilemoe_mlx.chat_cli` -> `mobilemoe_mlx.chat.cli`."""
    return f"{PACKAGE}.{MOVED[old.rpartition('.')[2]]}"


def warn_moved(old: str) -> None:
    # Point the warning at the user's import: past our frames and importlib's
    # (warnings itself leaves importlib's frozen bootstrap frames uncounted).
    frame, level = sys._getframe(1), 2
    while frame is not None and (frame.f_code.co_filename.startswith("<frozen")
                                 or frame.f_code.co_filename in (__file__, importlib.__file__)):
        if "importlib._bootstrap" not in frame.f_code.co_filename:
            level += 1
        frame = frame.f_back
    warnings.warn(f"{old} has moved to {new_place(old)}: import it from there",
                  DeprecationWarning, stacklevel=level)


class _Alias(importlib.abc.Loader):
    def create_module(self, spec):
        warn_moved(spec.name)
        return importlib.import_module(new_place(spec.name))

    def exec_module(self, module):
        pass  # the module at its new place has run already

    def get_code(self, fullname):
        # `python -m <old path>` (runpy asks the loader for code to run as
        # __main__): a person at a terminal, who sees no DeprecationWarning.
        print(f"note: {fullname} is now {new_place(fullname)}", file=sys.stderr)
        return compile(f"import runpy\nrunpy.run_module({new_place(fullname)!r}, "
                       "run_name='__main__', alter_sys=True)\n", fullname, "exec")

    def is_package(self, fullname):
        return False


class MovedFinder(importlib.abc.MetaPathFinder):
    """Finds the old flat names only; every other import passes it by. A name
    that is a folder now (`model`, `chat`) is that folder: its package answers
    for the old module's names (see model/__init__.py, chat/__init__.py)."""

    def find_spec(self, fullname, path=None, target=None):
        head, _, leaf = fullname.rpartition(".")
        if head != PACKAGE or leaf not in MOVED or leaf in ("model", "chat"):
            return None
        return importlib.util.spec_from_loader(fullname, _Alias())


def install() -> None:
    if not any(isinstance(f, MovedFinder) for f in sys.meta_path):
        sys.meta_path.append(MovedFinder())
    # `mobilemoe_mlx.convert` is the package's function, so an import of the old
    # module by that name gets no attribute lookup to warn from: it is simply
    # the module at its new place (loaded already: the function comes from it).
    sys.modules.setdefault(f"{PACKAGE}.convert", sys.modules[new_place("convert")])
