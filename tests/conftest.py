"""Shared fixtures: tiny checkpoints in every released layout, each written and
converted once per session, and the helpers the numerical tests share.

Every fixture here is session-scoped and built only when a test asks for it:
reuse them instead of writing or converting a model again. Only the PyTorch
pickle checkpoints need torch; without it their tests skip, all with one reason
(`checkpoints.TORCH_MISSING`).

MLX runs on the CPU in float32 here (its CPU backend is slow; tiny shapes only),
except in the GPU tier (`-m gpu`), whose tests run on MLX's GPU where it has one.
"""

from __future__ import annotations

import json
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Dict

import mlx.core as mx
import numpy as np
import pytest

if TYPE_CHECKING:  # pytest puts this directory on sys.path (tests/ is not a package)
    import checkpoints as ck

# Ctrl-C raises KeyboardInterrupt here however pytest was started: a shell
# without job control starts a background job (`pytest &`, CI runners, a
# script's `&`) with SIGINT ignored, and Python then keeps ignoring it, so the
# tests that send Ctrl-C to themselves saw nothing (4 failed so on a busy
# machine). Children then start with the default handler as well.
signal.signal(signal.SIGINT, signal.default_int_handler)

# The default and end-to-end tiers pin the CPU (for collection too); the GPU
# tier's tests get the GPU back for their run (`_gpu_tier_on_the_gpu`).
mx.set_default_device(mx.cpu)


@pytest.fixture(autouse=True)
def _gpu_tier_on_the_gpu(request):
    """A test marked `gpu` runs on MLX's GPU where there is one (on a machine
    without one it is skipped by its own marker's condition)."""
    from mobilemoe_mlx.model.runtime import gpu_available

    if request.node.get_closest_marker("gpu") is None or not gpu_available():
        yield
        return
    mx.set_default_device(mx.gpu)
    try:
        yield
    finally:
        mx.set_default_device(mx.cpu)


def _checkpoints():
    import checkpoints

    return checkpoints

BATCH, SEQ = 2, 16


@dataclass
class Converted:
    source: ck.Checkpoint
    path: Path  # the converted MLX directory
    report: dict  # its conversion.json
    config: dict  # its config.json

    def model(self):
        """A freshly loaded model (tests that change module state get their own)."""
        from mobilemoe_mlx.checkpoints.loading import load_converted

        model, _ = load_converted(self.path)
        return model

    def weights(self) -> Dict[str, mx.array]:
        out = {}
        for f in sorted(self.path.glob("model*.safetensors")):
            out.update(mx.load(str(f)))
        return out


def _convert(tmp_path_factory, ckpt: ck.Checkpoint, name: str, **kwargs) -> Converted:
    from mobilemoe_mlx.checkpoints.convert import convert

    out = tmp_path_factory.mktemp("converted") / name
    kwargs.setdefault("dtype", "float32")
    convert(str(ckpt.path), str(out), progress=False, **kwargs)
    return Converted(ckpt, out, json.loads((out / "conversion.json").read_text()),
                     json.loads((out / "config.json").read_text()))


@pytest.fixture(scope="session")
def tokens() -> np.ndarray:
    """[BATCH, SEQ] token ids (the tokenizer's special ids included)."""
    ck = _checkpoints()
    rng = np.random.default_rng(1234)
    t = rng.integers(0, ck.tiny_config()["vocab_size"], (BATCH, SEQ))
    t[:, 0] = ck.BOS
    return t


# --- the synthetic tiny model (mobilemoe_mlx.checkpoints.synthetic: what users try first) ---

@pytest.fixture(scope="session")
def synthetic_qat(tmp_path_factory) -> Path:
    """An unconverted tiny synthetic checkpoint in the released QAT layout."""
    from mobilemoe_mlx.checkpoints.synthetic import write_synthetic

    return Path(write_synthetic(str(tmp_path_factory.mktemp("synthetic") / "qat"), "tiny", "qat"))


@pytest.fixture(scope="session")
def synthetic_tiny(tmp_path_factory, synthetic_qat) -> Path:
    """`synthetic_qat` converted to float32 MLX weights (INT4 kept bit for bit).

    Read-only: a test that changes the directory must copy it first."""
    from mobilemoe_mlx.checkpoints.convert import convert

    out = tmp_path_factory.mktemp("synthetic-converted") / "tiny"
    return Path(convert(str(synthetic_qat), str(out), dtype="float32", progress=False))


# --- checkpoints in the released layouts ---

@pytest.fixture(scope="session")
def qat_ckpt(tmp_path_factory) -> ck.Checkpoint:
    return _checkpoints().write_qat(tmp_path_factory.mktemp("src") / "qat")


@pytest.fixture(scope="session")
def bf16_ckpt(tmp_path_factory) -> ck.Checkpoint:
    return _checkpoints().write_bf16(tmp_path_factory.mktemp("src") / "bf16")


@pytest.fixture(scope="session")
def per_expert_ckpt(tmp_path_factory) -> ck.Checkpoint:
    return _checkpoints().write_bf16_per_expert(tmp_path_factory.mktemp("src") / "per_expert")


@pytest.fixture(scope="session")
def pickle_model_ckpt(tmp_path_factory) -> ck.Checkpoint:
    """{"model": {"module.<name>": ...}} in model.pt, converted from its directory."""
    return _checkpoints().write_pickle(tmp_path_factory.mktemp("src") / "pt_model", "model", "module.",
                           "model.pt")


@pytest.fixture(scope="session")
def pickle_state_dict_ckpt(tmp_path_factory) -> ck.Checkpoint:
    """{"state_dict": {"_orig_mod.module.<name>": ...}} in weights.pth, converted from the file."""
    return _checkpoints().write_pickle(tmp_path_factory.mktemp("src") / "pt_sd", "state_dict",
                           "_orig_mod.module.", "weights.pth", as_file=True)


@pytest.fixture(scope="session")
def sharded_ckpt(tmp_path_factory) -> ck.Checkpoint:
    return _checkpoints().write_sharded(tmp_path_factory.mktemp("src") / "sharded")


# --- conversions, once each ---

@pytest.fixture(scope="session")
def qat_int4(tmp_path_factory, qat_ckpt) -> Converted:
    """QAT -> MLX with the default quantization (INT4 g32: carried bit for bit)."""
    return _convert(tmp_path_factory, qat_ckpt, "qat_int4")


@pytest.fixture(scope="session")
def qat_dense(tmp_path_factory, qat_ckpt) -> Converted:
    return _convert(tmp_path_factory, qat_ckpt, "qat_dense", quantize=False)


@pytest.fixture(scope="session")
def bf16_dense(tmp_path_factory, bf16_ckpt) -> Converted:
    return _convert(tmp_path_factory, bf16_ckpt, "bf16_dense", quantize=False)


@pytest.fixture(scope="session")
def bf16_int4(tmp_path_factory, bf16_ckpt) -> Converted:
    return _convert(tmp_path_factory, bf16_ckpt, "bf16_int4", quantize=True, q_bits=4,
                    q_group_size=32)


@pytest.fixture(scope="session")
def converted(tmp_path_factory):
    """converted(ckpt, name, **convert_kwargs) -> Converted, each name converted once."""
    done = {}

    def get(ckpt: ck.Checkpoint, name: str, **kwargs) -> Converted:
        if name not in done:
            done[name] = _convert(tmp_path_factory, ckpt, name, **kwargs)
        return done[name]

    return get


@pytest.fixture(scope="session")
def reference_logits():
    """Reference logits by checkpoint, computed once."""
    cache = {}

    def get(ckpt: ck.Checkpoint, tokens: np.ndarray, variant=None) -> np.ndarray:
        key = (id(ckpt), tokens.tobytes(), tokens.shape, variant)
        if key not in cache:
            import reference as ref

            gaps = []
            cache[key] = ref.forward(ckpt.weights, ckpt.config, tokens, variant, gaps)
            if variant is None:
                # The test data must not sit on a routing tie float32 could flip.
                assert np.concatenate(gaps).min() > 1e-4, "routing near a tie: reseed"
        return cache[key]

    return get
