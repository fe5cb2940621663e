"""load(): converted directories directly, anything else converted once into the cache."""

import shutil

import mlx.core as mx
import pytest

from mobilemoe_mlx import convert, load
from mobilemoe_mlx.checkpoints.synthetic import write_synthetic
from mobilemoe_mlx.errors import UserError
from mobilemoe_mlx.model.runtime import current as current_runtime


@pytest.fixture
def cache(tmp_path, monkeypatch):
    home = tmp_path / "cache"
    monkeypatch.setenv("MOBILEMOE_MLX_HOME", str(home))
    return home


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_synthetic(str(tmp_path_factory.mktemp("ckpt") / "qat"), "tiny", "qat")


def test_unconverted_checkpoint_is_converted_once(checkpoint, cache, capsys):
    model, tokenizer = load(str(checkpoint))
    first = capsys.readouterr().err
    assert "converting" in first
    converted = [p for p in cache.rglob("config.json")]
    assert len(converted) == 1
    stamp = {p: p.stat().st_mtime_ns for p in converted[0].parent.iterdir()}

    ids = mx.array([tokenizer.encode("Hello world")])
    logits = model(ids)
    model2, _ = load(str(checkpoint))
    assert "using the converted model cached" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in converted[0].parent.iterdir()} == stamp
    assert mx.array_equal(logits, model2(ids))


def test_changed_checkpoint_converts_again(checkpoint, cache, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(checkpoint, src)
    load(str(src))
    (src / "config.json").write_text((src / "config.json").read_text() + "\n")
    capsys.readouterr()
    load(str(src))
    assert "converting" in capsys.readouterr().err
    entries = [p for p in (cache / "local").iterdir() if not p.name.startswith(".")]
    assert len(entries) == 2  # beside them only the hidden lock files


def test_single_weights_file(checkpoint, cache):
    model, tokenizer = load(str(checkpoint / "model.safetensors"))
    assert model(mx.array([[1, 2, 3]])).shape == (1, 3, 512)


def test_converted_directory_loads_without_the_cache(checkpoint, cache, tmp_path):
    out = convert(str(checkpoint), str(tmp_path / "mlx"), dtype="float32", progress=False)
    model, tokenizer = load(str(out))
    assert not cache.exists()
    assert tokenizer.eos_token_ids == {1, 2}
    assert model.model.embed_tokens.weight.dtype == mx.uint32  # still INT4


def test_missing_tokenizer_is_a_clear_error(checkpoint, cache, tmp_path):
    out = convert(str(checkpoint), str(tmp_path / "mlx"), dtype="float32", progress=False)
    (out / "tokenizer.json").unlink()
    with pytest.raises(UserError, match="no tokenizer.json"):
        load(str(out))


def test_sharded_output_loads_like_a_single_file(checkpoint, tmp_path):
    single = convert(str(checkpoint), str(tmp_path / "one"), dtype="float32", progress=False)
    sharded = convert(str(checkpoint), str(tmp_path / "many"), dtype="float32",
                      progress=False, max_shard_bytes=40_000)
    shards = sorted(p.name for p in sharded.glob("model-*.safetensors"))
    assert len(shards) > 2 and (sharded / "model.safetensors.index.json").exists()
    ids = mx.array([[5, 6, 7, 8]])
    a, _ = load(str(single))
    b, _ = load(str(sharded))
    assert mx.array_equal(a(ids), b(ids))


def test_single_file_converts_again_when_its_config_changes(checkpoint, cache, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(checkpoint, src)
    load(str(src / "model.safetensors"))
    (src / "config.json").write_text((src / "config.json").read_text() + "\n")
    capsys.readouterr()
    load(str(src / "model.safetensors"))
    assert "converting" in capsys.readouterr().err


def test_source_without_tokenizer_is_refused_before_converting(checkpoint, cache, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(checkpoint, src)
    (src / "tokenizer.json").unlink()
    with pytest.raises(UserError, match="has no tokenizer.json"):
        load(str(src))
    assert not list(cache.rglob("*.safetensors"))


def test_broken_converted_config_is_a_clear_error(checkpoint, tmp_path):
    out = convert(str(checkpoint), str(tmp_path / "mlx"), dtype="float32", progress=False)
    (out / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load(str(out))


@pytest.mark.skipif(current_runtime().half_precision_fast,
                    reason="GPU backends run half-precision experts")
def test_unquantized_half_precision_experts_run_in_float32_on_cpu(checkpoint, tmp_path):
    # MLX's CPU backend has gather_mm in float32 only: load casts instead of failing.
    out = convert(str(checkpoint), str(tmp_path / "mlx"), quantize=False, dtype="float16",
                  progress=False)
    model, _ = load(str(out))
    assert model.layers[0].feed_forward.experts.gate_up_proj.weight.dtype == mx.float32
    assert model(mx.array([[1, 2, 3]])).shape == (1, 3, 512)
