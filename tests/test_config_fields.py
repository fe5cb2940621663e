"""config.json: every field the model reads is checked by type and range, in one
place (config.validate_config), when a checkpoint is converted and when a
converted directory loads, naming the key (issue 15). And nothing a real
config holds is refused."""

import json
import shutil

import pytest
from test_convert_cli import assert_clean_failure, run_convert

from mobilemoe_mlx import convert, load
from mobilemoe_mlx.checkpoints.config import PRESETS, preset_config, validate_config
from mobilemoe_mlx.checkpoints.convert import converted_config
from mobilemoe_mlx.checkpoints.synthetic import write_synthetic
from mobilemoe_mlx.errors import UserError

QAT_BLOCK = {"format": "mobilemoe-int4-g32", "group_size": 32, "embedding_group_size": 32,
             "qmin": -8, "qmax": 7, "symmetric": True, "scale_dtype": "float16", "packed": True}


def _rope(**changes):
    return {"rope_scaling": dict(preset_config("tiny")["rope_scaling"], **changes)}


# (changes to the tiny preset, the key the message must name). Each is a value of
# the wrong type (true is not 1, "8192" is not 8192) or out of range.
WRONG = {
    "vocab_size true": ({"vocab_size": True}, "vocab_size"),
    "hidden_size 64.0": ({"hidden_size": 64.0}, "hidden_size"),
    "intermediate_size 0": ({"intermediate_size": 0}, "intermediate_size"),
    "intermediate_size_mlp -1": ({"intermediate_size_mlp": -1}, "intermediate_size_mlp"),
    "num_hidden_layers null": ({"num_hidden_layers": None}, "num_hidden_layers"),
    "num_attention_heads '4'": ({"num_attention_heads": "4"}, "num_attention_heads"),
    "num_key_value_heads 0": ({"num_key_value_heads": 0}, "num_key_value_heads"),
    "head_dim odd": ({"head_dim": 15}, "head_dim"),
    "num_local_experts []": ({"num_local_experts": []}, "num_local_experts"),
    "num_experts_per_tok false": ({"num_experts_per_tok": False}, "num_experts_per_tok"),
    "max_position_embeddings 0": ({"max_position_embeddings": 0}, "max_position_embeddings"),
    "max_position_embeddings -5": ({"max_position_embeddings": -5}, "max_position_embeddings"),
    'max_position_embeddings "8192"': ({"max_position_embeddings": "8192"},
                                       'max_position_embeddings must be a positive integer, '
                                       'got "8192"'),
    "max_position_embeddings true": ({"max_position_embeddings": True}, "max_position_embeddings"),
    'rms_norm_eps "1e-5"': ({"rms_norm_eps": "1e-5"}, "rms_norm_eps"),
    "rms_norm_eps 0": ({"rms_norm_eps": 0}, "rms_norm_eps"),
    "rms_norm_eps -1e-5": ({"rms_norm_eps": -1e-5}, "rms_norm_eps"),
    "rope_theta 0": ({"rope_theta": 0}, "rope_theta"),
    'routed_scaling_factor "2.5"': ({"routed_scaling_factor": "2.5"}, "routed_scaling_factor"),
    'expert_sort_threshold "64"': ({"expert_sort_threshold": "64"}, "expert_sort_threshold"),
    "expert_sort_threshold -1": ({"expert_sort_threshold": -1}, "expert_sort_threshold"),
    'fuse_projections "no"': ({"fuse_projections": "no"}, "fuse_projections"),
    "use_qk_norm 1": ({"use_qk_norm": 1}, "use_qk_norm"),
    'tie_word_embeddings "true"': ({"tie_word_embeddings": "true"}, "tie_word_embeddings"),
    "attention_bias 0": ({"attention_bias": 0}, "attention_bias"),
    "norm_topk_prob 1": ({"norm_topk_prob": 1}, "norm_topk_prob"),
    "interleave_moe_layer_step true": ({"interleave_moe_layer_step": True},
                                       "interleave_moe_layer_step"),
    "n_shared_experts 1.0": ({"n_shared_experts": 1.0}, "n_shared_experts"),
    'eos_token_id "2"': ({"eos_token_id": "2"}, "eos_token_id"),
    "eos_token_id past the vocab": ({"eos_token_id": [2, 99999]}, "eos_token_id"),
    "eos_token_id -1": ({"eos_token_id": -1}, "eos_token_id"),
    "eos_token_id [true]": ({"eos_token_id": [True]}, "eos_token_id"),
    'rope_scaling.factor "16"': (_rope(factor="16"), "rope_scaling.factor"),
    "rope_scaling.factor 0": (_rope(factor=0), "rope_scaling.factor"),
    'rope_scaling.original_max_position_embeddings "8192"': (
        _rope(original_max_position_embeddings="8192"),
        "rope_scaling.original_max_position_embeddings"),
    'rope_scaling.low/high_freq_factor "1"': (_rope(low_freq_factor="1", high_freq_factor="1"),
                                              "rope_scaling.low_freq_factor"),
    "rope_scaling a list": ({"rope_scaling": [1]}, "rope_scaling"),
    "layer_types too short": ({"layer_types": ["full_attention"]}, "layer_types"),
}


@pytest.mark.parametrize("case", list(WRONG))
def test_a_wrong_field_is_refused_naming_its_key(case):
    changes, names = WRONG[case]
    config = {**preset_config("tiny"), **changes}
    with pytest.raises(UserError, match=None) as refused:
        validate_config(config)
    message = str(refused.value)
    assert names in message and message.startswith("config.json") and "\n" not in message


def test_a_converted_directorys_quantization_block_is_checked():
    config = converted_config(preset_config("tiny"), {"group_size": 32, "bits": 4}, "qat")
    validate_config(config)
    for block in ({"group_size": "32", "bits": 4}, {"group_size": 32}, "affine"):
        with pytest.raises(UserError, match="quantization"):
            validate_config({**config, "quantization": block})


ACCEPTED = {  # valid spellings a real config may use: refusing them would be a bug
    "eos_token_id one int": {"eos_token_id": 2},
    "eos_token_id null": {"eos_token_id": None},
    "rms_norm_eps an int": {"rms_norm_eps": 1},
    "no max_position_embeddings (the model's default)": {"max_position_embeddings": None},
    "expert_sort_threshold 0 (always sort)": {"expert_sort_threshold": 0},
    "fuse_projections false": {"fuse_projections": False},
    "rope_theta inside rope_parameters": {
        "rope_scaling": None, "rope_theta": None,
        "rope_parameters": dict(preset_config("tiny")["rope_scaling"], rope_theta=5e5)},
}


@pytest.mark.parametrize("case", list(ACCEPTED))
def test_valid_spellings_pass(case):
    config = {**preset_config("tiny"), **ACCEPTED[case]}
    validate_config({k: v for k, v in config.items() if v is not None})


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_and_its_conversions_pass(name):
    config = preset_config(name)
    validate_config(config)
    validate_config({**config, "quantization": QAT_BLOCK})  # as the QAT releases ship
    for quantization in (None, {"group_size": 32, "bits": 4, "mode": "affine"}):
        validate_config(converted_config(config, quantization, "qat"))


@pytest.fixture(scope="module")
def qat(tmp_path_factory):
    return write_synthetic(str(tmp_path_factory.mktemp("ckpt") / "qat"), "tiny", "qat")


def _with_config(src, dst, **changes):
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("changes, says", [
    ({"max_position_embeddings": 0}, "max_position_embeddings must be a positive integer, got 0"),
    ({"max_position_embeddings": "8192"}, 'max_position_embeddings must be a positive integer, '
                                          'got "8192"'),
    ({"rms_norm_eps": "1e-5"}, 'rms_norm_eps must be a positive finite number, got "1e-5"'),
])
def test_conversion_refuses_them_in_one_line(qat, tmp_path, changes, says):
    src = _with_config(qat, tmp_path / "src", **changes)
    out = tmp_path / "out"
    assert_clean_failure(run_convert(src, "--out", out), out, f"config.json: {says}")


@pytest.mark.parametrize("changes, key", [
    ({"max_position_embeddings": "8192"}, "max_position_embeddings"),
    ({"rms_norm_eps": "1e-5"}, "rms_norm_eps"),
    ({"routed_scaling_factor": "2.5"}, "routed_scaling_factor"),
])
def test_loading_refuses_them_in_a_converted_directory(qat, tmp_path, changes, key):
    out = convert(str(qat), str(tmp_path / "mlx"), dtype="float32", progress=False)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, **changes}))
    with pytest.raises(UserError, match=f"^config.json: {key} must be"):
        load(str(out))
