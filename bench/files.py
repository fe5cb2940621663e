"""Where a benchmark run writes, and how: never half-written.

`--out` is checked before anything is measured, as every writer's output
directory is (mobilemoe_mlx/checkpoints/output_dir.py: the same checks, the same words),
then created, and a file written there proves the run can save. Every file is
written under a temporary name and renamed over the old one, so a run stopped
at any moment leaves the last complete results.json, report.md and plots.
"""

import os
import threading
from pathlib import Path
from typing import Callable, List

from mobilemoe_mlx.checkpoints.output_dir import (
    cannot_write,
    check_output_dir_in_place,
    make_output_dir_in_place,
    remove_created,
)

RESULTS = "results.json"  # what marks a directory as holding an earlier run

__all__ = ["check_out_dir", "prepare_out_dir", "remove_created", "write_atomic",
           "write_text_atomic"]


def check_out_dir(out, force: bool = False) -> Path:
    """--out as an absolute path, if a run may write there: a directory or a path
    to create one at, holding no earlier run's results.json unless `force`."""
    return check_output_dir_in_place(out, force, lambda p: (p / RESULTS).exists(),
                                     f"a run's {RESULTS}")


def prepare_out_dir(out, force: bool = False) -> List[Path]:
    """check_out_dir(), then create it (and missing parents) and prove a file can be
    written in it. Returns the directories created, deepest first, for
    remove_created(); a one-line UserError (with nothing left behind) when `out`
    cannot hold the run."""
    return make_output_dir_in_place(check_out_dir(out, force))


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` writes the content to a temporary path, renamed to `path`
    when complete; a one-line UserError if the disk refuses."""
    # Per thread: the Ctrl-C watcher (bench/interrupt.py) may write while the main thread is in MLX.
    tmp = path.with_name(f".{path.name}.part-{os.getpid()}-{threading.get_ident()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise cannot_write(path, e) from None
    finally:
        try:
            tmp.unlink()
        except OSError:
            pass  # renamed, or never created


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text))
