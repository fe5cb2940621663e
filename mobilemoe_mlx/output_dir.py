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
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Destination:
    """How messages name an output directory, so they never speak of --out or
    --force to someone who passed neither (a load() that converts into the cache)."""

    label: str = "--out"  # "--out /x/y is ..."
    elsewhere: str = "name another directory"  # what to do when it cannot be written
    replace: str = "pass --force to replace it"  # what to do when it exists


USER_OUT = Destination()


def check_output_dir(out: str, force: bool, replaceable: Callable[[Path], bool],
                     what: str, dest: Destination = USER_OUT) -> Path:
    """The absolute output path, if it may be written; UserError otherwise.

    `replaceable(path)` says whether an existing directory is one of ours
    (`what`), so --force never deletes an unrelated directory. Whether the
    directory can be made at all (a file in the way, a read-only or pseudo
    file system such as /proc, a name too long) is found out here, before any
    work, by making and removing an empty directory where it will go."""
    try:
        path = Path(out).expanduser().resolve()
        cwd = Path.cwd().resolve()
    except (OSError, RuntimeError, ValueError) as e:  # a NUL byte, a symlink loop
        raise UserError(f"{dest.label} {out!r} is not a usable path ({e}); {dest.elsewhere}") from e
    if path == cwd or path in cwd.parents:
        raise UserError(f"{dest.label} {path} is the current directory or one of its parents; "
                        f"{dest.elsewhere}")
    if _exists(path):
        if not force:
            raise UserError(f"{path} already exists; {dest.replace}")
        if not path.is_dir() or (any(path.iterdir()) and not replaceable(path)):
            raise UserError(f"{path} exists and is not {what}"
                            + ("; --force replaces only that" if dest is USER_OUT else "")
                            + ", so move or delete it yourself")
    _check_creatable(path, dest)
    return path


def _check_creatable(path: Path, dest: Destination) -> None:
    """Refuse an output directory that cannot be made, saying why."""
    def refuse(why: str) -> UserError:
        return UserError(f"{dest.label} {path} cannot be created: {why}; {dest.elsewhere}")

    anchor = next(p for p in [path.parent, *path.parent.parents] if _exists(p))
    if not anchor.is_dir():
        raise refuse(f"{anchor} is a file, not a directory")
    try:
        name_max = os.pathconf(anchor, "PC_NAME_MAX")
        path_max = os.pathconf(anchor, "PC_PATH_MAX")
    except (OSError, ValueError):
        name_max, path_max = 255, 4096
    # The longest name written is the temporary sibling (atomic_output_dir).
    longest = _temporary(path)
    for part in [*path.relative_to(anchor).parts[:-1], longest.name]:
        if len(os.fsencode(part)) > name_max:
            raise refuse(f"a name in it is longer than this file system takes ({name_max} "
                         "bytes, with room for the temporary name written first)")
    if len(os.fsencode(str(longest))) >= path_max:
        raise refuse(f"the path is longer than this system takes ({path_max} bytes)")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".mobilemoe-mlx-probe-", dir=anchor))
    except OSError as e:
        raise refuse(os_error_reason(e)) from e


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # a name too long to look up: it does not exist (the caller says why)
        return False


def _temporary(out: Path) -> Path:
    return out.with_name(f".{out.name}.partial-{os.getpid()}")


def os_error_reason(error: OSError) -> str:
    """An OSError as a few words: what, and its errno's name."""
    if error.errno in _DISK_ERRORS:
        reason = _DISK_ERRORS[error.errno][0]
    elif error.errno in (errno.ENOENT, errno.EINVAL, errno.EXDEV, errno.ENOTSUP):
        # What mkdir in a pseudo file system (/proc, /sys) answers.
        reason = "the file system there does not take new directories"
    else:
        reason = (error.strerror or str(error)).lower()
    code = errno.errorcode.get(error.errno, "")
    return f"{reason}{f' ({code})' if code else ''}"


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
    tmp = _temporary(out)
    made = False
    try:
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
        except OSError as e:  # check_output_dir found none of these; something changed since
            raise disk_error(e, out) or UserError(f"cannot create {out}: {os_error_reason(e)}") from e
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
