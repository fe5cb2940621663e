"""Small file systems of the tests' own, for the disk errors a user can hit."""

import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def mounted_tmpfs(mount: Path, options: str):
    """A tmpfs mounted at `mount` with `options` (e.g. "ro", "size=64k"), where this
    machine lets us mount one (root on Linux); the test is skipped elsewhere."""
    mount.mkdir()
    if sys.platform != "linux" or os.geteuid() != 0 or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)],
            capture_output=True).returncode:
        pytest.skip(f"cannot mount a tmpfs ({options}) here")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)
