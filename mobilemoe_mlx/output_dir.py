"""Output directories that appear whole or not at all.

Everything is written into a hidden sibling (`.NAME.partial-PID`) that is
renamed over the target only when complete. A failure, Ctrl-C or SIGTERM
(which the CLIs turn into SystemExit) removes it; a sibling left by a killed
process is swept by the next run.
"""

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from .errors import UserError


def check_output_dir(out: str, force: bool, replaceable: Callable[[Path], bool],
                     what: str) -> Path:
    """The absolute output path, if it may be written; UserError otherwise.

    `replaceable(path)` says whether an existing directory is one of ours
    (`what`), so --force never deletes an unrelated directory."""
    path = Path(out).expanduser().resolve()
    cwd = Path.cwd().resolve()
    if path == cwd or path in cwd.parents:
        raise UserError(f"--out {path} is the current directory or one of its parents; "
                        "name a new directory")
    if path.exists():
        if not force:
            raise UserError(f"{path} already exists; pass --force to replace it")
        if not path.is_dir() or (any(path.iterdir()) and not replaceable(path)):
            raise UserError(f"{path} exists and is not {what}; --force replaces only that, "
                            "so move or delete it yourself")
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sweep_stale(out: Path) -> None:
    for leftover in out.parent.glob(f".{out.name}.*-*"):
        pid = leftover.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)


@contextmanager
def atomic_output_dir(out: Path) -> Iterator[Path]:
    """Yield an empty temporary directory; on success it becomes `out`
    (replacing what was there), on any failure it is removed, with the parent
    directories this call created."""
    created = [p for p in [out.parent, *out.parent.parents] if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale(out)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            trash = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.rename(out, trash)
            os.rename(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for parent in created:  # deepest first
            try:
                parent.rmdir()
            except OSError:
                break
        raise
