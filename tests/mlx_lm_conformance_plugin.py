"""A pytest plugin for running mlx-lm's own test suites on a model of ours
(tests/test_mlx_lm_conformance.py starts pytest with `-p` naming this module).

mlx-lm's suites load a Qwen model from the Hub with `load(...)`, imported by
name into each test module; every such `load` is pointed at the directory
in $MLX_LM_CONFORMANCE_MODEL instead (with trust_remote_code, which a
converted MobileMoE directory needs for its model file and a stock one
ignores). Nothing else in the suites changes."""

import os

import mlx_lm.utils

MODEL = os.environ["MLX_LM_CONFORMANCE_MODEL"]


def _load(path_or_hf_repo, *args, **kwargs):
    kwargs["trust_remote_code"] = True
    return mlx_lm.utils.load(MODEL, *args, **kwargs)


def pytest_collection_modifyitems(session, config, items):
    for module in {getattr(item, "module", None) for item in items} - {None}:
        if getattr(module, "load", None) is mlx_lm.utils.load:
            module.load = _load
