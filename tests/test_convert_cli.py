"""convert.py on bad input: one clear line, exit code 2, nothing left at --out.

The CLI runs in-process (click's CliRunner) so these stay fast; the few tests
marked e2e run it as a real process."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import pytest
from click.testing import CliRunner

from mobilemoe_mlx.checkpoints import convert_cli
from mobilemoe_mlx.checkpoints.synthetic import write_synthetic

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def run_convert(*args) -> Result:
    """convert.py's command (mobilemoe_mlx/checkpoints/convert_cli.py) in this process, as the shell would run it."""
    handler = signal.getsignal(signal.SIGTERM)
    try:
        result = CliRunner().invoke(convert_cli.main, [str(a) for a in args])
    finally:
        signal.signal(signal.SIGTERM, handler)  # run_cli installs its own
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return Result(result.exit_code, result.stdout, result.stderr)


def run_convert_process(*args, env=None, cwd=REPO):
    return subprocess.run(
        [sys.executable, str(REPO / "convert.py"), *map(str, args)],
        capture_output=True, text=True, cwd=cwd, timeout=300,
        env={**os.environ, **(env or {})},
    )


def assert_clean_failure(result, out: Path, *fragments):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.*")), "a partial output was left behind"


@pytest.fixture(scope="module")
def good_qat(tmp_path_factory):
    return write_synthetic(str(tmp_path_factory.mktemp("ckpt") / "qat"), "tiny", "qat")


def variant(src: Path, dst: Path, config_changes=None, tensor_changes=None) -> Path:
    """A copy of `src` with config keys changed and tensors replaced or (None) removed."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name not in ("config.json", "model.safetensors"):
            (dst / f.name).write_bytes(f.read_bytes())
    config = json.loads((src / "config.json").read_text())
    config.update(config_changes or {})
    (dst / "config.json").write_text(json.dumps(config))
    tensors = mx.load(str(src / "model.safetensors"))
    for name, value in (tensor_changes or {}).items():
        if value is None:
            tensors.pop(name)
        else:
            tensors[name] = value
    mx.save_safetensors(str(dst / "model.safetensors"), tensors)
    return dst


@pytest.mark.e2e
def test_converts_and_refuses_to_overwrite_without_force(good_qat, tmp_path):
    run_convert = run_convert_process
    out = tmp_path / "out"
    first = run_convert(good_qat, "--out", out, "--dtype", "float32")
    assert first.returncode == 0, first.stderr
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    again = run_convert(good_qat, "--out", out)
    assert again.returncode == 2
    assert "already exists" in again.stderr and "--force" in again.stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before

    forced = run_convert(good_qat, "--out", out, "--force", "--dtype", "float16")
    assert forced.returncode == 0, forced.stderr
    assert json.loads((out / "conversion.json").read_text())["dtype"] == "float16"
    assert not list(tmp_path.glob(".out.*"))


def test_unexpected_tensor_is_named(good_qat, tmp_path):
    src = variant(good_qat, tmp_path / "src",
                  tensor_changes={"model.layers.0.feed_forward.extra.weight": mx.zeros((4,))})
    out = tmp_path / "out"
    assert_clean_failure(run_convert(src, "--out", out), out,
                         "unexpected tensors", "model.layers.0.feed_forward.extra.weight")


def test_missing_tensor_is_named(good_qat, tmp_path):
    name = "model.layers.1.self_attn.k_proj.weight_scale"
    src = variant(good_qat, tmp_path / "src", tensor_changes={name: None})
    out = tmp_path / "out"
    assert_clean_failure(run_convert(src, "--out", out), out, "missing tensors", name)


def test_wrong_shape_names_expected_and_got(good_qat, tmp_path):
    name = "model.layers.0.feed_forward.router.weight"
    src = variant(good_qat, tmp_path / "src", tensor_changes={name: mx.zeros((8, 32))})
    out = tmp_path / "out"
    assert_clean_failure(run_convert(src, "--out", out), out, name, "[8, 32]", "[8, 64]")


def test_wrong_dtype_names_expected_and_got(good_qat, tmp_path):
    name = "model.layers.0.self_attn.q_proj.weight_scale"
    bad = mx.zeros((64, 2), dtype=mx.float32)
    src = variant(good_qat, tmp_path / "src", tensor_changes={name: bad})
    out = tmp_path / "out"
    assert_clean_failure(run_convert(src, "--out", out), out, name, "F32", "F16")


def test_truncated_file(good_qat, tmp_path):
    src = variant(good_qat, tmp_path / "src")
    weights = src / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 1000])
    out = tmp_path / "out"
    assert_clean_failure(run_convert(src, "--out", out), out, "truncated")


def test_corrupt_file(good_qat, tmp_path):
    src = variant(good_qat, tmp_path / "src")
    (src / "model.safetensors").write_bytes(b"\xff" * 64)
    out = tmp_path / "out"
    assert_clean_failure(run_convert(src, "--out", out), out, "not a valid safetensors")


@pytest.mark.parametrize("change, fragment", [
    ({"model_type": "llama"}, "not a MobileMoE checkpoint"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type 'yarn'"),
    ({"sliding_window": 512}, "windowed attention"),
    ({"interleave_moe_layer_step": 2}, "interleave_moe_layer_step"),
    ({"no_rope_layers": [1, 0]}, "without RoPE"),
    ({"layer_types": ["full_attention", "sliding_attention"]}, "full_attention"),
    ({"no_rope_layers": [1]}, "no_rope_layers must list each of its 2 layers"),
    ({"head_dim": None}, "head_dim must be a positive integer"),
    ({"num_experts_per_tok": 0}, "num_experts_per_tok must be a positive integer"),
    ({"num_key_value_heads": 0}, "num_key_value_heads must be a positive integer"),
    ({"num_attention_heads": "4"}, "num_attention_heads must be a positive integer"),
    ({"rope_scaling": {"rope_type": "llama3"}}, "lacks rope_scaling.factor"),
    ({"rope_scaling": None}, "no rope_scaling block"),
    ({"rope_theta": "abc"}, "rope_theta"),
    ({"scoring_func": "softmax"}, "scoring_func"),
    ({"n_shared_experts": 2}, "n_shared_experts"),
    ({"quantization": {"format": "other-int4", "group_size": 32}}, "only the released format"),
    ({"quantization": {"group_size": 32, "expert_group_axis": "in"}}, "expert_group_axis"),
])
def test_unsupported_config(good_qat, tmp_path, change, fragment):
    src = variant(good_qat, tmp_path / "src", config_changes=change)
    out = tmp_path / "out"
    assert_clean_failure(run_convert(src, "--out", out), out, fragment)


def test_group_size_that_does_not_divide(good_qat, tmp_path):
    # The tiny preset's hidden size is 64, so groups of 128 cannot tile it.
    out = tmp_path / "out"
    assert_clean_failure(run_convert(good_qat, "--out", out, "--q-group-size", "128"),
                         out, "--q-group-size 128 does not divide")


def test_missing_source(tmp_path):
    out = tmp_path / "out"
    assert_clean_failure(run_convert(tmp_path / "nowhere", "--out", out), out,
                         "neither an existing path nor a Hub repo id")


@pytest.mark.e2e
def test_offline_hub_fetch(tmp_path):
    # This machine reaches no Hub, and HF_HUB_OFFLINE makes that certain elsewhere
    # (huggingface_hub reads it at import, hence a process of its own).
    out = tmp_path / "out"
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = run_convert_process("facebook/MobileMoE-S-QAT", "--out", out, env=env)
    assert_clean_failure(result, out, "Hugging Face Hub is unreachable", "local checkpoint path")


def test_verbose_shows_the_traceback(good_qat, tmp_path):
    src = variant(good_qat, tmp_path / "src", config_changes={"model_type": "llama"})
    result = run_convert(src, "--out", tmp_path / "out", "--verbose")
    assert result.returncode == 2
    assert "Traceback" in result.stderr


def test_config_that_is_not_an_object(good_qat, tmp_path):
    src = variant(good_qat, tmp_path / "src")
    (src / "config.json").write_text("[1, 2]")
    out = tmp_path / "out"
    assert_clean_failure(run_convert(src, "--out", out), out, "not a JSON object")


def test_config_without_a_key_the_model_needs(good_qat, tmp_path):
    src = variant(good_qat, tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    del config["head_dim"]
    (src / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    assert_clean_failure(run_convert(src, "--out", out), out, "lacks head_dim")


def test_unsupported_tensor_dtype_is_named(good_qat, tmp_path):
    name = "model.layers.0.self_attn.q_proj.weight_scale"
    # Same bytes as the fp16 scales, declared as an 8-bit float type instead.
    src = variant(good_qat, tmp_path / "src",
                  tensor_changes={name: mx.zeros((64, 4), dtype=mx.uint8)})
    weights = src / "model.safetensors"
    data = weights.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    header[name]["dtype"] = "F8_E4M3"
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    weights.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])
    out = tmp_path / "out"
    assert_clean_failure(run_convert(src, "--out", out), out, name, "F8_E4M3")


def test_already_converted_source(good_qat, tmp_path):
    converted = tmp_path / "mlx"
    assert run_convert(good_qat, "--out", converted).returncode == 0
    out = tmp_path / "again"
    assert_clean_failure(run_convert(converted, "--out", out), out, "already converted")


def test_force_never_replaces_an_unrelated_directory(good_qat, tmp_path):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"not a model")
    result = run_convert(good_qat, "--out", out, "--force")
    assert result.returncode == 2 and "is not a converted model" in result.stderr
    assert (out / "holiday.jpg").read_bytes() == b"not a model"


def test_current_directory_as_out(good_qat, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run_convert(good_qat, "--out", ".", "--force")
    assert result.returncode == 2 and "current directory" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_garbage_pickle(good_qat, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text((good_qat / "config.json").read_text())
    (src / "model.pt").write_bytes(b"this is not a pickle" * 10)
    out = tmp_path / "out"
    # Without torch the converter cannot read any pickle and says what to install.
    said = ("not a readable PyTorch checkpoint" if importlib.util.find_spec("torch")
            else "reading it needs PyTorch: pip install torch")
    assert_clean_failure(run_convert(src, "--out", out), out, said)


def test_stale_partial_output_of_a_killed_run_is_swept(good_qat, tmp_path):
    out = tmp_path / "out"
    stale = tmp_path / ".out.partial-999999999"  # what a killed run leaves, marker and all
    stale.mkdir()
    (stale / ".mobilemoe-mlx-partial").write_text(json.dumps(
        {"signature": "mobilemoe-mlx temporary output", "host": os.uname().nodename,
         "pid": 999999999}))  # no such process
    (stale / "model.safetensors").write_bytes(b"half")
    assert run_convert(good_qat, "--out", out).returncode == 0
    assert not stale.exists() and out.is_dir()


@pytest.mark.e2e
def test_sigterm_removes_the_partial_output(tmp_path):
    # run_cli turns SIGTERM into SystemExit, which the atomic writer unwinds.
    script = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from mobilemoe_mlx.errors import run_cli\n"
        "from mobilemoe_mlx.checkpoints.output_dir import atomic_output_dir\n"
        "def main():\n"
        "    with atomic_output_dir(Path(sys.argv[1])) as tmp:\n"
        "        (tmp / 'model.safetensors').write_bytes(b'half')\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "run_cli(main, verbose=False)\n"
    )
    out = tmp_path / "nested" / "out"
    result = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True,
                            text=True, timeout=300)  # bounds a hang only
    assert result.returncode == 128 + 15, result.stderr
    assert not (tmp_path / "nested").exists()  # the parent it created is gone too
