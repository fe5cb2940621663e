"""Output directories that appear whole or not at all.

Everything is written into a hidden sibling (`.NAME.partial-PID`) that is
renamed over the target only when complete. A failure, Ctrl-C or SIGTERM
(which the CLIs turn into SystemExit) removes it. A sibling left by a killed
process is swept by the next run, but only when it holds the marker file this
module wrote into it (with the writer's host and process id): a name pattern
alone is never proof, so a user's `.model.backup-2024` is left alone.
"""

import errno
import json
import os
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

from .errors import UserError

# Written inside every temporary directory this module creates, and only there.
MARKER = ".mobilemoe-mlx-partial"
_SIGNATURE = "mobilemoe-mlx temporary output"

# What a full or read-only disk looks like; each becomes one line, not a traceback.
_FREE = "free some space or write elsewhere"
_WRITABLE = "write to a directory you may write to"
_DISK_ERRORS = {
    errno.ENOSPC: ("no space left on the device", _FREE),
    errno.EDQUOT: ("the disk quota is exceeded", _FREE),
    errno.EROFS: ("the file system is read-only", _WRITABLE),
    errno.EACCES: ("permission denied", _WRITABLE),
    errno.EPERM: ("the operation is not permitted", _WRITABLE),
}


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


def check_not_overlapping(out: Path, source: Path) -> None:
    """Refuse an output that holds the source, is it, or lies inside it: writing
    there (or replacing it with --force) could delete the checkpoint itself."""
    out, source = out.resolve(), source.resolve()
    if out == source or out in source.parents:
        raise UserError(f"--out {out} contains the checkpoint {source}; "
                        "choose an output directory outside it")
    source_dir = source if source.is_dir() else source.parent
    if source_dir in out.parents:
        raise UserError(f"--out {out} is inside the checkpoint directory {source_dir}; "
                        "choose an output directory outside it")


def disk_error(error: OSError, where: Path) -> Optional[UserError]:
    """One sentence for an OSError a user can fix (full or read-only disk), else None."""
    if error.errno not in _DISK_ERRORS:
        return None
    reason, advice = _DISK_ERRORS[error.errno]
    return UserError(f"cannot write {where}: {reason} ({errno.errorcode[error.errno]}"
                     f"{' at ' + str(error.filename) if error.filename else ''}); {advice} "
                     "(nothing was left behind)")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_marker(directory: Path) -> None:
    (directory / MARKER).write_text(json.dumps(
        {"signature": _SIGNATURE, "host": socket.gethostname(), "pid": os.getpid()}))


def _abandoned(directory: Path) -> bool:
    """A directory this module made whose writer, on this host, is gone."""
    try:
        marker = json.loads((directory / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return (isinstance(marker, dict) and marker.get("signature") == _SIGNATURE
            and marker.get("host") == socket.gethostname()
            and isinstance(marker.get("pid"), int) and not _alive(marker["pid"]))


def _sweep_stale(out: Path) -> None:
    for leftover in out.parent.glob(f".{out.name}.*"):
        if leftover.is_dir() and not leftover.is_symlink() and _abandoned(leftover):
            shutil.rmtree(leftover, ignore_errors=True)


def _remove_tree(tmp: Path) -> None:
    # Our own marker goes last, so a directory half-removed by a kill is still ours.
    for child in tmp.iterdir() if tmp.is_dir() else []:
        if child.name != MARKER:
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_output_dir(out: Path) -> Iterator[Path]:
    """Yield an empty temporary directory; on success it becomes `out`
    (replacing what was there), on any failure it is removed, with the parent
    directories this call created. A full or read-only disk is a UserError."""
    created = [p for p in [out.parent, *out.parent.parents] if not p.exists()]
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    made = False
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _sweep_stale(out)
        if tmp.exists():
            if not _made_here(tmp):
                raise UserError(f"{tmp} exists and was not made by this converter; move it")
            _remove_tree(tmp)
        tmp.mkdir()
        made = True
        _write_marker(tmp)
        yield tmp
        (tmp / MARKER).unlink()
        if out.exists():
            trash = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.rename(out, trash)
            _write_marker(trash)  # so a kill right here leaves a sweepable leftover
            os.rename(tmp, out)
            made = False
            _remove_tree(trash)
        else:
            os.rename(tmp, out)
            made = False
    except BaseException as e:
        if made:
            _remove_tree(tmp)
        for parent in created:  # deepest first
            try:
                parent.rmdir()
            except OSError:
                break
        if isinstance(e, OSError) and (friendly := disk_error(e, out)):
            raise friendly from e
        raise


def _made_here(directory: Path) -> bool:
    """Made by this module (its marker is inside), whoever wrote it."""
    try:
        marker = json.loads((directory / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("signature") == _SIGNATURE
