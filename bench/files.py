"""Where a benchmark run writes, and how: never half-written.

`--out` is checked before anything is measured, by creating it and writing a
file there: a read-only file system, a pseudo file system such as /proc, a
directory without write permission or a parent that is a file are each one
`error:` line, and whatever the check created is removed again. Every file is
written under a temporary name and renamed over the old one, so a run stopped
at any moment leaves the last complete results.json, report.md and plots.
"""

import os
import tempfile
import threading
from pathlib import Path
from typing import Callable, List

from mobilemoe_mlx.errors import UserError

ADVICE = "give a directory you can write to"


def check_out_dir(out, force: bool = False) -> Path:
    """--out must be a directory or a path to create one at, never an existing file
    (nor an empty string, which Path would read as the current directory), and
    holds no earlier run's results.json unless `force` says to replace it."""
    if not str(out).strip():
        raise UserError(f"--out is empty: {ADVICE}")
    out = Path(out)
    try:
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out} is an existing file, not a directory: give a "
                            "directory for results.json, report.md and the plots (it is made "
                            "if missing)")
        for parent in out.parents:
            if parent.exists() and not parent.is_dir():
                raise UserError(f"--out {out}: {parent} is a file, not a directory")
        if not force and (out / "results.json").exists():
            raise UserError(f"--out {out} already holds a run's results.json: pass --force to "
                            "replace it, or give another --out")
    except OSError as e:  # a name too long, a loop of links
        raise UserError(f"--out {out}: {_reason(e)}; {ADVICE}") from None
    return out


def prepare_out_dir(out, force: bool = False) -> List[Path]:
    """Create `out` (and missing parents) and prove a file can be written in it.
    Returns the directories created, deepest first, for remove_created(); a
    one-line UserError (with nothing left behind) when `out` cannot hold the run."""
    out = check_out_dir(out, force)
    created = [p for p in (out, *out.parents) if not os.path.lexists(p)]
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # /proc: ENOENT; /sys: EPERM; read-only: EROFS
        remove_created(created)
        raise UserError(f"--out {out}: cannot create a directory there ({_reason(e)}); "
                        f"{ADVICE}") from None
    try:
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as e:
        remove_created(created)
        raise UserError(f"--out {out}: cannot write files there ({_reason(e)}); "
                        f"{ADVICE}") from None
    return created


def remove_created(created: List[Path]) -> None:
    """Remove the (empty) directories prepare_out_dir() created."""
    for p in created:
        try:
            p.rmdir()
        except OSError:
            pass  # not created after all, or no longer empty: leave it


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` writes the content to a temporary path, renamed to `path`
    when complete; a one-line UserError if the disk refuses."""
    # Per thread: the Ctrl-C watcher (bench/interrupt.py) may write while the main thread is in MLX.
    tmp = path.with_name(f".{path.name}.part-{os.getpid()}-{threading.get_ident()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"cannot write {path} ({_reason(e)}); {ADVICE}") from None
    finally:
        try:
            tmp.unlink()
        except OSError:
            pass  # renamed, or never created


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text))


def _reason(e: Exception) -> str:
    return getattr(e, "strerror", None) or str(e)
