"""mlx-lm's console commands on a converted MobileMoE model (end-to-end tier:
`python -m pytest -m e2e`): each as docs/mlx-lm.md's table gives it, and the
one-line refusals where MLX cannot do what was asked."""

import json
import os
import subprocess
import sys

import pytest
from tool_model import tool_int4  # noqa: F401  (a pytest fixture)

pytestmark = pytest.mark.e2e

EXPERT_KEYS = ["feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"]


def mlx_lm(command: str, *args, stdin: str = None) -> subprocess.CompletedProcess:
    """`mlx_lm.<command> ARGS` as a user runs it (offline; timeouts only bound hangs)."""
    return subprocess.run(
        [sys.executable, "-m", "mlx_lm", command, *map(str, args)],
        input=stdin, capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TERM": "dumb"})


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout


def refused_in_one_line(result: subprocess.CompletedProcess, start: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-4000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(start), result.stderr[-2000:]


def generates(model, *args) -> None:
    out = ok(mlx_lm("generate", "--model", model, "--trust-remote-code", "--prompt", "hi",
                    "--max-tokens", 3, *args))
    assert "Generation: 3 tokens" in out, out


@pytest.fixture(scope="module")
def lora_data(tmp_path_factory):
    """A data directory (train/valid jsonl) and a config naming the expert keys."""
    path = tmp_path_factory.mktemp("lora-data")
    lines = [json.dumps({"text": f"the number {i} is followed by {i + 1}"}) for i in range(8)]
    for split in ("train", "valid"):
        (path / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    config = path / "lora.yaml"
    config.write_text("lora_parameters:\n  rank: 4\n  scale: 10.0\n  dropout: 0.0\n"
                      f"  keys: {json.dumps(EXPERT_KEYS)}\n")
    return path, config


def lora(model, data, config, adapters, *args):
    return mlx_lm("lora", "--model", model, "--trust-remote-code", "--train", "--data", data,
                  "-c", config, "--iters", 2, "--batch-size", 2, "--num-layers", 2,
                  "--val-batches", 1, "--steps-per-eval", 100, "--adapter-path", adapters,
                  *args)


def test_lora_on_the_experts_then_fuse_then_generate(tool_int4, lora_data, tmp_path):  # noqa: F811
    data, config = lora_data
    adapters = tmp_path / "adapters"
    ok(lora(tool_int4.path, data, config, adapters))
    assert (adapters / "adapters.safetensors").is_file()
    generates(tool_int4.path, "--adapter-path", adapters)
    for extra in ([], ["--dequantize"]):
        fused = tmp_path / f"fused{len(extra)}"
        ok(mlx_lm("fuse", "--model", tool_int4.path, "--adapter-path", adapters,
                  "--save-path", fused, "--trust-remote-code", *extra))
        generates(fused)


def test_dora_on_the_experts_refuses(tool_int4, lora_data, tmp_path):  # noqa: F811
    data, config = lora_data
    result = lora(tool_int4.path, data, config, tmp_path / "a", "--fine-tune-type", "dora")
    refused_in_one_line(result, "error: DoRA cannot adapt MobileMoE's routed experts")


def test_full_fine_tune_of_the_int4_model_refuses(tool_int4, lora_data, tmp_path):  # noqa: F811
    data, config = lora_data
    result = lora(tool_int4.path, data, config, tmp_path / "a", "--fine-tune-type", "full")
    refused_in_one_line(result, "error: a full fine-tune needs float weights")


def test_convert_dequantize_then_full_fine_tune(tool_int4, lora_data, tmp_path):  # noqa: F811
    data, config = lora_data
    out = tmp_path / "dequantized"
    ok(mlx_lm("convert", "--model", tool_int4.path, "--mlx-path", out, "-d",
              "--dtype", "float32", "--trust-remote-code"))
    generates(out)
    ok(lora(out, data, config, tmp_path / "a", "--fine-tune-type", "full"))


def test_generate_with_a_quantized_kv_cache(tool_int4):  # noqa: F811
    generates(tool_int4.path, "--kv-bits", 8, "--kv-group-size", 64)


def test_generate_draft_model_cannot_load_a_converted_directory(tool_int4):  # noqa: F811
    # mlx-lm loads --draft-model without trust_remote_code, so it refuses the
    # directory's model_file (its own ValueError); docs/mlx-lm.md gives the
    # routes that work. If this starts to pass, update the table.
    result = mlx_lm("generate", "--model", tool_int4.path, "--trust-remote-code",
                    "--draft-model", tool_int4.path, "--prompt", "hi", "--max-tokens", 3)
    assert result.returncode != 0 and "trust_remote_code=True" in result.stderr


def test_chat_answers_on_stdin(tool_int4):  # noqa: F811
    ok(mlx_lm("chat", "--model", tool_int4.path, "--trust-remote-code", "--max-tokens", 3,
              stdin="hi\nq\n"))


def test_cache_prompt_then_generate_from_it(tool_int4, tmp_path):  # noqa: F811
    cache = tmp_path / "prompt.safetensors"
    ok(mlx_lm("cache_prompt", "--model", tool_int4.path, "--trust-remote-code",
              "--prompt", "a long system prompt", "--prompt-cache-file", cache))
    generates(tool_int4.path, "--prompt-cache-file", cache)


def test_benchmark(tool_int4):  # noqa: F811
    out = ok(mlx_lm("benchmark", "--model", tool_int4.path, "--trust-remote-code",
                    "--prompt-tokens", 16, "--generation-tokens", 4, "--num-trials", 1))
    assert "Averages: prompt_tps=" in out, out
