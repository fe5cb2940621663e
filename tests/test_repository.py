"""What the repository itself promises: a front page short enough to read, no
package-index host named anywhere (the project's machines reach their own
mirrors; users take PyTorch's CPU build as PyTorch's install page says), and
no claim on the front page that its own figures contradict."""

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Spelled in pieces, so that this file does not name them itself.
INDEX_HOSTS = re.compile("|".join(re.escape(a + b) for a, b in (
    ("pypi", ".org"), ("python", "hosted"), ("download", ".pytorch"))))


def tracked_files():
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [ROOT / f for f in out.splitlines() if (ROOT / f).is_file()]


def test_no_package_index_host_is_named():
    named = []
    for f in tracked_files():
        try:
            text = f.read_text()
        except UnicodeDecodeError:
            continue  # not text
        named += [f"{f.relative_to(ROOT)}:{i}" for i, line in enumerate(text.splitlines(), 1)
                  if INDEX_HOSTS.search(line)]
    assert not named, f"package-index hosts named at {named}"


def test_the_front_page_stays_under_200_lines():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) < 200, f"README.md has {len(lines)} lines: move details to docs/"


@pytest.mark.parametrize("stale", [
    "has not been built or run yet",  # ios/ was built and its tests run on Linux
    "no GPU run has been measured",  # an H200 ran bench parity after the fix
])
def test_the_front_page_makes_no_stale_claim(stale):
    text = " ".join((ROOT / "README.md").read_text().split())
    assert stale not in text
