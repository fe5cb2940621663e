"""Fetching released checkpoints from the Hugging Face Hub, and where converted
models are cached.

The repos are gated, so most failures a user meets are about access: each is
turned into one sentence that says what to do.
"""

import os
import re
from pathlib import Path
from typing import Optional, Tuple

from .errors import UserError

# Only what conversion reads: never the repo's remote code or other formats.
_METADATA_PATTERNS = ["*.json", "*.jinja", "tokenizer*"]
_WEIGHT_PATTERNS = [["*.safetensors"], ["*.bin", "*.pt", "*.pth"]]

_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


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
            f"{repo_id} is gated: accept the license on {page}, then log in with "
            "`hf auth login` (or set HF_TOKEN), or pass a local checkpoint path"
        )
    if isinstance(error, errors.RevisionNotFoundError):
        return UserError(f"{repo_id} has no such revision; check --revision")
    if isinstance(error, errors.RepositoryNotFoundError):
        return UserError(
            f"{_no_directory(repo_id)}, and as a Hub repo it was not found, or you are not "
            "logged in to see it: check the path or the name; for a Hub repo accept the "
            "license on the model page and run `hf auth login`"
        )
    if isinstance(error, errors.LocalEntryNotFoundError):
        return UserError(
            f"{_no_directory(repo_id)}, and as a Hub repo it cannot be fetched: the Hugging "
            "Face Hub is unreachable and the repo is not in the local cache; check the path, "
            "connect to the network, or pass a local checkpoint path"
        )
    if isinstance(error, errors.HFValidationError):
        return UserError(f"{repo_id!r} is neither an existing path nor a Hub repo id")
    status = getattr(getattr(error, "response", None), "status_code", None)
    if status in (401, 403):
        return UserError(
            f"the Hub refused access to {repo_id} (HTTP {status}): log in with "
            f"`hf auth login` and accept the license on {page}"
        )
    return UserError(f"could not download {repo_id}: {error}")


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
    raise UserError(f"{repo_id} holds no weights file (.safetensors, .bin, .pt, .pth)")


def resolve_revision(repo_id: str, revision: Optional[str] = None) -> str:
    """The commit a branch or tag points at, asked of the Hub; offline, the
    commit this cache last resolved it to, so a converted model still loads."""
    if revision and re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision
    ref = cache_root() / ("models--" + repo_id.replace("/", "--")) / "refs" / (revision or "main")
    from huggingface_hub import HfApi, errors

    try:
        if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
            raise ConnectionError("HF_HUB_OFFLINE is set")
        commit = HfApi().model_info(repo_id, revision=revision).sha
    except (errors.HfHubHTTPError, errors.HFValidationError) as e:
        raise _explain(repo_id, e) from e  # the Hub answered: gated, missing, refused
    except Exception as e:  # no answer at all: offline, DNS, timeout
        if ref.exists():
            return ref.read_text().strip()
        raise UserError(
            f"{_no_directory(repo_id)}, and as a Hub repo it cannot be fetched: the Hugging "
            f"Face Hub is unreachable ({type(e).__name__}) and the repo has not been converted "
            "here before; check the path, connect to the network, or pass a local checkpoint path"
        ) from e
    try:
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(commit)
    except OSError:
        pass  # only a note for loading offline later; the cache's own writes say what is wrong
    return commit


def _no_directory(repo_id: str) -> str:
    """The first half of a message about a repo id that could also be a path
    (`mlx/MobileMoE-S` is both): that there is no such directory."""
    return f"there is no directory {repo_id} in {Path.cwd()}"
