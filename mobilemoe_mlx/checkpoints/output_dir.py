"""Output directories: checked before any work, and written whole or not at all.

Every writer's output directory is checked here, before anything is computed,
with one wording (`Destination`): an empty or unusable path, a file in the
way, a name too long, a read-only or pseudo file system (/proc), a directory
without write permission, an earlier output kept unless --force says to
replace it. Each is one UserError line.

Two kinds of writer use it:

- one that writes a directory whole (a conversion, an export): everything is
  written into a hidden sibling (`.NAME.partial-PID`) that is renamed over the
  target only when complete (check_output_dir, atomic_output_dir);
- one that adds files to a directory as it goes, each file replaced
  atomically (a benchmark run: check_output_dir_in_place, then
  make_output_dir_in_place, which creates it and proves a file can be
  written there).

For the first kind, a failure, Ctrl-C or SIGTERM
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
from typing import Callable, Iterator, List, Optional

from ..errors import UserError

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
    """The absolute output path of a directory written whole (atomic_output_dir),
    if it may be written; UserError otherwise.

    `replaceable(path)` says whether an existing directory is one of ours
    (`what`), so --force never deletes an unrelated directory. Whether the
    directory can be made at all (a file in the way, a read-only or pseudo
    file system such as /proc, a name too long) is found out here, before any
    work, by making and removing an empty directory where it will go."""
    path = _usable_path(out, dest)
    try:
        cwd = Path.cwd().resolve()
    except OSError:  # the current directory was deleted: `out` is absolute, and not it
        cwd = None
    if cwd is not None and (path == cwd or path in cwd.parents):
        raise UserError(f"{dest.label} {path} is the current directory or one of its parents; "
                        f"{dest.elsewhere}")
    if _exists(path):
        if not force:
            raise UserError(f"{path} already exists; {dest.replace}")
        if not path.is_dir() or (any(path.iterdir()) and not replaceable(path)):
            raise UserError(f"{path} exists and is not {what}"
                            + ("; --force replaces only that" if dest is USER_OUT else "")
                            + ", so move or delete it yourself")
    # The longest name written is the temporary sibling (atomic_output_dir).
    anchor = _check_names(path, _temporary(path), dest)
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".mobilemoe-mlx-probe-", dir=anchor))
    except OSError as e:
        raise _cannot(path, "be created", e, dest) from e
    return path


def check_output_dir_in_place(out: str, force: bool, holds: Callable[[Path], bool], what: str,
                              dest: Destination = USER_OUT) -> Path:
    """The absolute output path of a directory that files are added to one at a
    time (never replaced whole, so the current directory will do), if it may be
    written; UserError otherwise. Nothing is created: make_output_dir_in_place
    does that. `holds(path)` says whether an existing directory already holds
    an earlier output (`what`), kept unless `force`."""
    path = _usable_path(out, dest)
    if _exists(path):
        if not path.is_dir():
            raise UserError(f"{dest.label} {path} is a file, not a directory; {dest.elsewhere}")
        if not force and holds(path):
            raise UserError(f"{dest.label} {path} already holds {what}; {dest.replace}")
    else:
        _check_names(path, path, dest)
    return path


def make_output_dir_in_place(path: Path, dest: Destination = USER_OUT) -> List[Path]:
    """Create `path` (checked by check_output_dir_in_place) with its missing
    parents and prove a file can be written in it. Returns the directories
    created, deepest first, for remove_created(); on a UserError (a read-only
    or pseudo file system, no permission) nothing is left behind."""
    created = [p for p in (path, *path.parents) if not os.path.lexists(p)]
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # /proc: ENOENT; /sys: EPERM; read-only: EROFS
        remove_created(created)
        raise _cannot(path, "be created", e, dest) from e
    try:
        with tempfile.NamedTemporaryFile(dir=path, prefix=".mobilemoe-mlx-write-test-"):
            pass
    except OSError as e:
        remove_created(created)
        raise _cannot(path, "be written to", e, dest) from e
    return created


def remove_created(created: List[Path]) -> None:
    """Remove the (empty) directories make_output_dir_in_place() created."""
    for p in created:
        try:
            p.rmdir()
        except OSError:
            pass  # not created after all, or no longer empty: leave it


def cannot_write(path: Path, error: OSError, dest: Destination = USER_OUT) -> UserError:
    """One line for a file in an output directory that could not be written."""
    advice = _DISK_ERRORS[error.errno][1] if error.errno in _DISK_ERRORS else dest.elsewhere
    return UserError(f"cannot write {path}: {os_error_reason(error)}; {advice}")


def _usable_path(out: str, dest: Destination) -> Path:
    """`out` as an absolute path, or a UserError: empty (which Path would read as
    the current directory), a NUL byte, a loop of links."""
    if not str(out).strip():
        raise UserError(f"{dest.label} is empty; {dest.elsewhere}")
    try:
        return Path(out).expanduser().resolve()
    except (OSError, RuntimeError, ValueError) as e:
        raise UserError(f"{dest.label} {out!r} is not a usable path ({e}); {dest.elsewhere}") from e


def _cannot(path: Path, what: str, error: OSError, dest: Destination) -> UserError:
    return UserError(f"{dest.label} {path} cannot {what}: {os_error_reason(error)}; "
                     f"{dest.elsewhere}")


def _check_names(path: Path, longest: Path, dest: Destination) -> Path:
    """Refuse a path whose directory cannot be made because of a file in the
    way or a name or path too long for the file system, `longest` being the
    longest path written for it. Returns the deepest existing directory above
    `path` (where it will be made)."""
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
    room = ", with room for the temporary name written first" if longest != path else ""
    names = [(part, "") for part in path.relative_to(anchor).parts[:-1]]
    for part, note in [*names, (longest.name, room)]:
        if len(os.fsencode(part)) > name_max:
            raise refuse(f"a name in it is longer than this file system takes ({name_max} "
                         f"bytes{note})")
    if len(os.fsencode(str(longest))) >= path_max:
        raise refuse(f"the path is longer than this system takes ({path_max} bytes)")
    return anchor


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
        reason = "the file system there does not take new files or directories"
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
