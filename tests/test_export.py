"""The export commands the Swift side relies on (bench/export.py): the parity
fixture against an independent NumPy recomputation (tests/reference.py), the
bench plan's prompts against the tokenizer, the synthetic dense model against
dense.py's and the Swift model's parameter names."""

import json
import re
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import reference as ref
from click.testing import CliRunner
from test_swift_sources import dense_python_names, model_tree

from bench.cli import main
from bench.export import SWIFT_MODEL_TYPES, swift_names
from bench.models import MODEL_NAMES, PEER_NAMES, tiny_pro_config
from bench.options import QUICK
from bench.tokens import real_text


def invoke(*args):
    return CliRunner().invoke(main, list(args))


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    out = tmp_path_factory.mktemp("parity") / "fixture"
    result = invoke("export-parity", "--out", str(out))
    assert result.exit_code == 0, result.output
    return out


def reference_weights(model_dir):
    """float64 weights in the bf16 checkpoint's names, dequantized with NumPy."""
    arrays = {}
    for f in model_dir.glob("*.safetensors"):
        arrays.update({k: np.array(v.astype(mx.float32)) if v.dtype != mx.uint32 else np.array(v)
                       for k, v in mx.load(str(f)).items()})
    out = {}
    for name in arrays:
        if name.endswith(".scales"):
            base = name[: -len(".scales")]
            dense = ref.dequantize_mlx(arrays[base + ".weight"], arrays[name],
                                       arrays[base + ".biases"])
            out[base if ".experts." in base else base + ".weight"] = dense
        elif not name.endswith((".biases",)) and name[: -len(".weight")] + ".scales" not in arrays:
            out[name] = arrays[name].astype(np.float64)
    return out


def reference_experts(w, config, tokens):
    """Per layer, the reference's chosen experts [T, K] (rows sorted)."""
    eps = config["rms_norm_eps"]
    x = w["model.embed_tokens.weight"][tokens].astype(np.float64)
    positions = np.arange(tokens.shape[1])
    chosen = []
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        x = x + ref.attention(w, p, ref.rms_norm(x, w[f"{p}.input_layernorm.weight"], eps),
                              config, positions, None)
        b = ref.rms_norm(x, w[f"{p}.post_attention_layernorm.weight"], eps)
        idx, _, _ = ref.route(w, p, b.reshape(-1, b.shape[-1]), config)
        chosen.append(np.sort(idx, axis=-1))
        x = x + ref.moe(w, p, b, config, None, None)
    return chosen


def test_parity_fixture_equals_an_independent_recomputation(parity):
    arrays = mx.load(str(parity / "parity.safetensors"))
    info = json.loads((parity / "parity.json").read_text())
    config = json.loads((parity / "model" / "config.json").read_text())
    tokens = np.array(arrays["tokens"])
    logits = np.array(arrays["logits"])
    assert tokens.shape == (1, info["tokens"]) and arrays["logits"].dtype == mx.float32
    assert logits.shape == (1, info["tokens"], config["vocab_size"])
    # The fixture lowers the llama3 original context so the scaling matters in it.
    assert config["rope_parameters"]["original_max_position_embeddings"] == 32

    w = reference_weights(parity / "model")
    want = ref.forward(w, config, tokens)
    for t in range(tokens.shape[1]):
        assert ref.cosine(logits[0, t], want[0, t]) > 0.99999, f"position {t}"
    assert ref.rel_err(logits, want) < 1e-4
    for layer, expected in enumerate(reference_experts(w, config, tokens)):
        got = np.array(arrays[f"experts.{layer}"])
        assert got.shape == expected.shape and (got == expected).all(), f"layer {layer}"
    assert info["min_routing_gap"] > 1e-4


def test_parity_fixture_saved_fused_model_stacks_the_separate_tensors(parity):
    # model-fused/ is model/ as Python loads it: the stacked tensors, bit for bit.
    separate = mx.load(str(parity / "model" / "model.safetensors"))
    fused = mx.load(str(parity / "model-fused" / "model.safetensors"))
    groups = {"self_attn": ("qkv_proj", ("q_proj", "k_proj", "v_proj")),
              "feed_forward.shared_expert": ("gate_up_proj", ("gate_proj", "up_proj"))}
    stacked = set()
    for i in range(json.loads((parity / "parity.json").read_text())["layers"]):
        for module, (whole, parts) in groups.items():
            p = f"model.layers.{i}.{module}"
            for r in ("weight", "scales", "biases"):
                want = mx.concatenate([separate[f"{p}.{part}.{r}"] for part in parts])
                assert mx.array_equal(fused[f"{p}.{whole}.{r}"], want), f"{p}.{whole}.{r}"
                stacked.add(f"{p}.{whole}.{r}")
                stacked.update(f"{p}.{part}.{r}" for part in parts)
    rest = set(fused) - stacked
    assert rest == set(separate) - stacked
    assert all(mx.array_equal(fused[k], separate[k]) for k in rest)
    assert json.loads((parity / "model-fused" / "config.json").read_text()) == \
        json.loads((parity / "model" / "config.json").read_text())


def test_parity_fixture_is_not_overwritten_without_force(parity):
    before = (parity / "parity.safetensors").read_bytes()
    result = invoke("export-parity", "--out", str(parity))
    assert result.exit_code == 2 and "pass --force" in result.output
    assert (parity / "parity.safetensors").read_bytes() == before


def test_export_prompts_writes_the_tokenizers_ids_and_the_quick_protocol(qat_int4, tmp_path):
    from tokenizers import Tokenizer

    out = tmp_path / "plan.json"
    result = invoke("export-prompts", "--model", str(qat_int4.path), "--out", str(out), "--quick",
                    "--name", "tiny")
    assert result.exit_code == 0, result.output
    plan = json.loads(out.read_text())
    s = plan["settings"]
    assert s["prompt_lengths"] == [int(v) for v in QUICK["prompt_lengths"].split(",")]
    assert s["decode_contexts"] == [int(v) for v in QUICK["decode_contexts"].split(",")]
    assert (s["gen_tokens"], s["repeats"], s["warmup"], s["routing_tokens"]) == (
        QUICK["gen_tokens"], QUICK["repeats"], QUICK["warmup"], QUICK["routing_tokens"])
    lengths = sorted(set(s["prompt_lengths"]) | set(s["decode_contexts"]) | {s["routing_tokens"]})
    assert sorted(map(int, plan["prompts"]["real"])) == lengths

    tokenizer = Tokenizer.from_file(str(qat_int4.path / "tokenizer.json"))
    config = qat_int4.config
    for n in lengths:
        real = plan["prompts"]["real"][str(n)]
        assert len(real) == n
        # The ids are the tokenizer's encoding of the prompt texts, from the start.
        assert real[0] == config["bos_token_id"]  # BOS first, as the released tokenizer puts it
        assert real_text().startswith(tokenizer.decode(real, skip_special_tokens=True))
        assert real == tokenizer.encode(real_text()).ids[:n]
        assert plan["prompts"]["repeat"][str(n)] == [min(1000, config["vocab_size"] - 1)] * n
        random = plan["prompts"]["random"][str(n)]
        assert len(random) == n and 0 <= min(random) and max(random) < config["vocab_size"]
        # float32 KV cache: 2 (K and V) x KV heads x head_dim x layers x tokens x 4 bytes
        kv = 2 * config["num_key_value_heads"] * config["head_dim"]
        assert plan["kv_cache_bytes_analytic"][str(n)] == kv * config["num_hidden_layers"] * n * 4
    assert plan["family"] == "moe" and plan["dtype"] == "float32" and plan["per_expert_bytes"] > 0
    assert plan["name"] == "tiny"


def test_export_prompts_rejects_a_directory_that_is_no_converted_model(tmp_path):
    result = invoke("export-prompts", "--model", str(tmp_path), "--out", str(tmp_path / "p.json"))
    assert result.exit_code == 2 and "not a converted model directory" in result.output
    assert not (tmp_path / "p.json").exists()


def test_export_synthetic_dense_has_dense_py_and_swift_names(tmp_path):
    out = tmp_path / "pro-tiny"
    result = invoke("export-synthetic", "--model", "pro-tiny", "--out", str(out), "--quick",
                    "--dtype", "float32")
    assert result.exit_code == 0, result.output
    names = set(mx.load(str(out / "model.safetensors")))
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "mobilellm_pro"
    assert config["quantization"] == {"group_size": 32, "bits": 4, "mode": "affine"}
    assert names == dense_python_names(tiny_pro_config(), fuse=False)
    swift = model_tree(config["num_hidden_layers"]).names("MobileLLMProModel", names)
    assert swift == names
    plan = json.loads((out / "bench_prompts.json").read_text())
    assert plan["family"] == "dense" and plan["name"] == "pro-tiny" and plan["synthetic"]
    assert "per_expert_bytes" not in plan


def test_export_synthetic_rejects_an_unknown_model(tmp_path):
    result = invoke("export-synthetic", "--model", "XL", "--out", str(tmp_path / "x"))
    assert result.exit_code == 2 and "unknown model 'XL'" in result.output
    assert not (tmp_path / "x").exists()


def test_swift_model_types_are_the_ones_registration_swift_registers():
    """export-synthetic's accepted models derive from SWIFT_MODEL_TYPES: it must be
    what the Swift package registers and loads, read from its source."""
    swift = (Path(__file__).resolve().parents[1] / "ios" / "Sources" / "MobileMoE"
             / "Registration.swift").read_text()
    listed = re.search(r"static let modelTypes = \[([^\]]*)\]", swift)
    assert listed, "MobileMoERegistration.modelTypes not found"
    assert re.findall(r'"([^"]+)"', listed.group(1)) == list(SWIFT_MODEL_TYPES)
    registered = re.findall(r'registerModelType\(\s*"([^"]+)"', swift)
    assert sorted(registered) == sorted(SWIFT_MODEL_TYPES)


def test_swift_names_are_the_moe_and_dense_presets():
    from bench.export import exported_model_type
    from bench.models import model_config

    names = swift_names()
    assert names and not set(names) & set(PEER_NAMES)
    assert set(names) | set(PEER_NAMES) == set(MODEL_NAMES)
    assert {exported_model_type(model_config(n)) for n in names} == set(SWIFT_MODEL_TYPES)


@pytest.mark.parametrize("name", PEER_NAMES)
def test_export_synthetic_refuses_a_model_the_swift_side_cannot_load(tmp_path, name):
    out = tmp_path / "x"
    result = invoke("export-synthetic", "--model", name, "--out", str(out), "--quick")
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:"), \
        result.stderr
    assert f"--model {name} is a glm4_moe model" in lines[0]
    assert lines[0].endswith(f"export one of {', '.join(swift_names())}")
    assert list(tmp_path.iterdir()) == []  # refused before anything was built or written
