"""Loading a model for the chat: which checkpoint `--model` means, what a chat
needs of its tokenizer, and what can be refused before anything is downloaded,
converted or loaded.

The refusals come as early as the files allow: a `--kv-bits` its heads cannot
take is refused before anything happens wherever the checkpoint's config.json
is on this machine, else with a checkpoint without a chat template (unless raw)
just before a conversion starts (checkpoints/loading.py's `before_converting`); a `--system`
prompt too long for the context is refused before anything at all happens
wherever the checkpoint's config.json and tokenizer are already on this machine
(a local directory or weights file, converted or not, or a Hub repo in the
Hub's cache), else once they are downloaded, still before converting.
"""

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import mlx.core as mx

from ..checkpoints.hub import model_source  # noqa: F401 - chat's name for it
from ..errors import UserError
from .options import kv_group_size
from .session import check_system_fits


def load_chat_model(source: str, raw: bool = False, revision: Optional[str] = None,
                    progress: bool = True, kv_bits: Optional[int] = None,
                    system: Optional[str] = None):
    """`load()` plus what chat needs: a chat template (unless `raw`) and decoding
    without `clean_up_tokenization_spaces`. `load()` already stops where the
    template ends a turn (checkpoints/turns.py). Warns first when
    the model at full context will not fit this machine's memory. A `system`
    prompt that does not fit the context raises UserError, before the model is
    converted or loaded wherever its files allow (see the module's docstring)."""
    from ..checkpoints.loading import load
    from ..model.mobilemoe import realize
    from ..model.planner import fits_warning

    check_kv_bits(source, revision, kv_bits)
    measured = raw or not system or measure_system_prompt(source, revision, system)

    def before_converting(config: dict, folder: Path) -> None:
        # What the loaded model would be refused for, refused before a conversion runs.
        if not raw and not ships_chat_template(folder):
            raise _no_chat_template(source)
        kv_group_size(config["head_dim"], kv_bits)
        if not measured:  # a Hub repo, downloaded just now
            _measure(folder, system, config)

    model, tokenizer = load(source, revision=revision, lazy=True, progress=progress,
                            before_converting=before_converting)
    # Weights are still on disk (lazy): this is the moment to warn.
    warning = fits_warning(asdict(model.args), model.args.max_position_embeddings, kv_bits=kv_bits,
                           dtype=activation_dtype(model))
    if warning and progress:
        print(f"warning: {warning}; expect swapping or a failed load", file=sys.stderr)
    if not raw and not tokenizer.has_chat_template:
        raise _no_chat_template(source)
    _for_chat(tokenizer)
    if not raw:  # measured again with the tokenizer the chat will use: it decides
        check_system_fits(tokenizer, system, model.args.max_position_embeddings)
    realize(model)  # weights read now; and any thread can run it (Model.__init__)
    return model, tokenizer


def _for_chat(tokenizer) -> None:
    """Decoding and encoding as the chat needs them."""
    # `SELECT ?s` must not come out as `SELECT?s` (docs/architecture.md section 3).
    tokenizer._tokenizer.clean_up_tokenization_spaces = False
    # The session measures prompts against the context itself; transformers' warning
    # about encoding more than model_max_length tokens would only be a stray stderr line.
    tokenizer._tokenizer.model_max_length = sys.maxsize


def check_kv_bits(source: str, revision: Optional[str], kv_bits: Optional[int]) -> None:
    """Refuse a `kv_bits` the model's heads cannot take from its config.json,
    before anything is loaded, wherever that file is on this machine (the load
    that follows refuses it otherwise, before converting)."""
    if kv_bits is None:
        return
    folder = _files_on_this_machine(source, revision)
    if folder is None:
        return
    from ..checkpoints.reading import read_config

    try:
        config = read_config(folder / "config.json")
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    except Exception:  # noqa: BLE001 - no such file, or a damaged one: the load says what is wrong
        return
    if isinstance(head_dim, int) and head_dim > 0:
        kv_group_size(head_dim, kv_bits)


def measure_system_prompt(source: str, revision: Optional[str], system: str) -> bool:
    """Refuse (UserError) a system prompt that does not fit the context of `source`,
    from the checkpoint's own config.json and tokenizer, before anything is
    downloaded, converted or loaded. False where those files are not on this
    machine (a Hub repo not in the Hub's cache) or cannot be read: the load that
    follows then measures it, or reports what is wrong with them in its own words."""
    folder = _files_on_this_machine(source, revision)
    return folder is not None and _measure(folder, system)


def _files_on_this_machine(source: str, revision: Optional[str]) -> Optional[Path]:
    """The directory holding `source`'s config.json and tokenizer without fetching anything."""
    from ..checkpoints.hub import looks_like_repo_id

    path = Path(source).expanduser()
    if path.exists():
        return path if path.is_dir() else path.parent
    if not looks_like_repo_id(source):
        return None
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(source, "config.json", revision=revision)
    except ValueError:  # a name the Hub would refuse: the load that follows says so
        return None
    return Path(found).parent if isinstance(found, str) else None


def _measure(folder: Path, system: str, config: Optional[dict] = None) -> bool:
    """Measure `system` with the tokenizer and context in `folder` (UserError if it
    does not fit); False where they cannot be read or there is no template to measure."""
    from ..checkpoints.config import validate_config
    from ..checkpoints.loading import load_tokenizer
    from ..checkpoints.reading import read_config
    from ..model.mobilemoe import ModelArgs

    if not (folder / "tokenizer.json").is_file() or not ships_chat_template(folder):
        return False
    try:
        if config is None:
            config = read_config(folder / "config.json")
            validate_config(config)
        tokenizer = load_tokenizer(folder)
    except Exception:  # noqa: BLE001 - the load that follows says what is wrong, in its words
        return False
    if not tokenizer.has_chat_template:
        return False
    _for_chat(tokenizer)
    context = config.get("max_position_embeddings", ModelArgs.max_position_embeddings)
    check_system_fits(tokenizer, system, context)
    return True


def _no_chat_template(source: str) -> UserError:
    return UserError(
        f"{source} has no chat template (Base checkpoints have none): add --raw to "
        "continue plain text instead, or pick an instruction-tuned model (--variant qat or sft)")


def ships_chat_template(folder: Path) -> bool:
    """Whether a checkpoint directory has a chat template in a file the converter
    copies (chat_template.jinja or .json, or tokenizer_config.json's chat_template).
    A tokenizer_config.json that cannot be read counts as yes: the loaded
    tokenizer then decides (and its reader says what is wrong)."""
    if any((folder / name).is_file() for name in ("chat_template.jinja", "chat_template.json")):
        return True
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return False
    except (OSError, ValueError):
        return True
    return not isinstance(config, dict) or bool(config.get("chat_template"))


def activation_dtype(model) -> str:
    """The dtype the model computes (and caches keys and values) in: its norms'."""
    import mlx.nn as nn

    norm = next((m for m in model.modules() if isinstance(m, nn.RMSNorm)), None)
    dtype = norm.weight.dtype if norm is not None else mx.float32
    return {mx.float16: "float16", mx.bfloat16: "bfloat16"}.get(dtype, "float32")


def load_models(options, source: str, draft_source: Optional[str]):
    """(model, tokenizer, draft model or None) for chat's `options` (a ChatOptions);
    the system prompt is measured before the draft model loads, and before the
    model does wherever its files allow."""
    raw, system, kv_bits = options.session.raw, options.session.system, options.session.kv_bits
    main_model, tokenizer = load_chat_model(source, raw=raw, revision=options.revision,
                                            kv_bits=kv_bits, system=system)
    if draft_source is None:
        return main_model, tokenizer, None
    draft_model, draft_tokenizer = load_chat_model(draft_source, raw=True)
    if (draft_model.args.vocab_size != main_model.args.vocab_size
            or draft_tokenizer.get_vocab() != tokenizer.get_vocab()):
        raise UserError(f"--draft {options.draft} does not share {source}'s tokenizer; "
                        "speculative decoding needs the same one")
    return main_model, tokenizer, draft_model
