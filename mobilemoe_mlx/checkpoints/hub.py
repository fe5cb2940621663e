"""Fetching released checkpoints from the Hugging Face Hub, and where converted
models are cached.

The repos are gated, so most failures a user meets are about access: each is
turned into one sentence that says what to do.
"""

import os
import re
from pathlib import Path
from typing import Optional, Tuple

from ..errors import UserError
from .config import RELEASED_SIZES, preset_name

# Only what conversion reads: never the repo's remote code or other formats.
_METADATA_PATTERNS = ["*.json", "*.jinja", "tokenizer*"]
_WEIGHT_PATTERNS = [["*.safetensors"], ["*.bin", "*.pt", "*.pth"]]

_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")

VARIANTS = {"qat": "QAT", "sft": "SFT", "base": "Base"}  # --variant: the releases of a size
_RELEASE = re.compile(r"^facebook/MobileMoE-([SML])-(QAT|SFT|Base)$")


def release_repo(name: str, variant: Optional[str] = None) -> Optional[str]:
    """The Hub repo of the released size `name` (S, M or L, any case; see
    config.preset_name) in `variant` (default qat), or None for any other name."""
    size = preset_name(name)
    if size not in RELEASED_SIZES:
        return None
    return f"facebook/MobileMoE-{size}-{VARIANTS[variant or 'qat']}"


def model_source(model: str, variant: Optional[str] = None) -> str:
    """What a command line's model argument means: a size (S, M, L, any case) is
    its released repo, unless a file or directory of that name exists here;
    anything else is used as given (a path or a repo id)."""
    repo = None if Path(model).expanduser().exists() else release_repo(model, variant)
    if repo is not None:
        return repo
    if variant is not None:
        raise UserError(f"--variant picks a release of --model S, M or L, not of {model}")
    return model


def looks_like_repo_id(source: str) -> bool:
    return bool(_REPO_ID.match(source)) and not Path(source).exists()


def cache_root() -> Path:
    """Where converted models live: $MOBILEMOE_MLX_HOME, else beside the Hub's
    cache under $HF_HOME (users point it at a big disk), else the XDG cache."""
    if home := os.environ.get("MOBILEMOE_MLX_HOME"):
        return Path(home)
    if hf_home := os.environ.get("HF_HOME"):
        return Path(hf_home) / "mobilemoe-mlx"
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "mobilemoe-mlx"


def converted_cache_dir(repo_id: str, revision: str) -> Path:
    """One directory per repo and resolved commit, like the Hub's own cache."""
    return cache_root() / ("models--" + repo_id.replace("/", "--")) / revision


def _explain(repo_id: str, error: Exception) -> UserError:
    from huggingface_hub import errors

    page = f"https://huggingface.co/{repo_id}"
    if isinstance(error, errors.GatedRepoError):
        return UserError(
            f"{_named(repo_id)} is gated: accept the license on {page}, then log in with "
            "`hf auth login` (or set HF_TOKEN), or pass a local checkpoint path"
        )
    if isinstance(error, errors.RevisionNotFoundError):
        return UserError(f"{_named(repo_id)} has no such revision; check --revision")
    if isinstance(error, errors.RepositoryNotFoundError):
        return UserError(
            f"{_as_hub_repo(repo_id)} was not found, or you are not logged in to see it: "
            f"{_check(repo_id, '; ')}for a Hub repo accept the license on the model page and run "
            "`hf auth login`"
        )
    if isinstance(error, errors.LocalEntryNotFoundError):
        return unreachable(repo_id)
    if isinstance(error, errors.HFValidationError):
        return UserError(f"{repo_id!r} is neither an existing path nor a Hub repo id")
    status = getattr(getattr(error, "response", None), "status_code", None)
    if status in (401, 403):
        return UserError(
            f"the Hub refused access to {_named(repo_id)} (HTTP {status}): log in with "
            f"`hf auth login` and accept the license on {page}"
        )
    return UserError(f"could not download {_named(repo_id)}: {error}")


def fetch_checkpoint(repo_id: str, revision: Optional[str] = None) -> Tuple[Path, str]:
    """Download the files conversion needs; returns (local dir, commit hash).

    Uses the Hub's cache (HF_HOME / HF_HUB_CACHE), so a second call is local.
    """
    from huggingface_hub import snapshot_download

    try:
        for weights in _WEIGHT_PATTERNS:
            path = Path(
                snapshot_download(
                    repo_id, revision=revision,
                    allow_patterns=_METADATA_PATTERNS + weights,
                )
            )
            if any(next(path.glob(p), None) for p in weights):
                return path, path.name
    except Exception as e:  # the Hub client raises its own and its transport's errors
        raise _explain(repo_id, e) from e
    raise UserError(f"{_named(repo_id)} holds no weights file (.safetensors, .bin, .pt, .pth)")


def resolve_revision(repo_id: str, revision: Optional[str] = None) -> str:
    """The commit a branch or tag points at, asked of the Hub; offline, the
    commit this cache last resolved it to, so a converted model still loads."""
    if revision and re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision
    ref = cache_root() / ("models--" + repo_id.replace("/", "--")) / "refs" / (revision or "main")
    from huggingface_hub import HfApi, errors

    try:
        if _offline_set():
            raise ConnectionError("HF_HUB_OFFLINE is set")
        commit = HfApi().model_info(repo_id, revision=revision).sha
    except (errors.HfHubHTTPError, errors.HFValidationError) as e:
        raise _explain(repo_id, e) from e  # the Hub answered: gated, missing, refused
    except Exception as e:  # no answer at all: offline, DNS, timeout
        if ref.exists():
            return ref.read_text().strip()
        raise unreachable(repo_id) from e
    try:
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(commit)
    except OSError:
        pass  # only a note for loading offline later; the cache's own writes say what is wrong
    return commit


def _offline_set() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def unreachable(repo_id: str) -> UserError:
    """The one message for a repo the Hub cannot be asked for and this machine
    holds no copy of (chat, load() and convert all say it so, word for word)."""
    return UserError(
        f"{_as_hub_repo(repo_id)} cannot be fetched: the Hugging Face Hub is unreachable"
        + (" (HF_HUB_OFFLINE is set)" if _offline_set() else "")
        + " and this machine has neither a download nor a "
        f"converted copy of it; {_check(repo_id, ', ')}connect to the network once, or pass a local "
        "checkpoint path")


def _as_hub_repo(repo_id: str) -> str:
    """How a message names `repo_id`, in the user's terms: a released size as the
    size they typed with its repo (`S (facebook/MobileMoE-S-QAT)`); any other
    name, which could also be a path (`mlx/MobileMoE-S` is both), with the
    directory that does not exist first."""
    if _RELEASE.match(repo_id):
        return _named(repo_id)
    return f"there is no directory {repo_id} in {Path.cwd()}, and as a Hub repo it"


def _named(repo_id: str) -> str:
    """A released repo with the size a user types for it: `S (facebook/MobileMoE-S-QAT)`."""
    release = _RELEASE.match(repo_id)
    return f"{release.group(1)} ({repo_id})" if release else repo_id


def _check(repo_id: str, then: str) -> str:
    return "" if _RELEASE.match(repo_id) else "check the path or the name" + then
