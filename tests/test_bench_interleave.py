"""bench/interleave.py: the decode step's host build, interleaved in one
process against another revision's model file and mlx-lm's glm4_moe (how
docs/benchmarks.md compares changes to the step). Times are not checked, only
that the three are built alike and reported."""

import re

import mlx.core as mx
import pytest
from mlx_lm.models.cache import make_prompt_cache

from bench.interleave import main, model_file_at, same_model_from
from bench.models import build_synthetic


def test_another_revisions_model_computes_the_same_logits():
    built = build_synthetic("tiny", fuse=True)
    other = same_model_from(model_file_at("HEAD"), built.model, built.quant.bits,
                            built.quant.group_size)
    assert type(other).__module__ != type(built.model).__module__
    logits = []
    for model in (built.model, other):
        cache = make_prompt_cache(model)
        model(mx.array([[3, 4, 5]]), cache=cache)
        logits.append(model(mx.array([[6]]), cache=cache))
    assert mx.allclose(logits[0], logits[1], rtol=1e-5, atol=1e-6).item()


def test_one_round_reports_both_kinds_of_build(capsys):
    main(["--model", "tiny", "--rounds", "1", "--probe", "3", "--steps", "3"])
    out = capsys.readouterr().out
    for kind in ("pipelined", "idle"):
        line = next(line for line in out.splitlines() if line.strip().startswith(kind))
        assert re.search(r"this tree [\d.]+ ms \([\d.]+x\)  at HEAD [\d.]+ ms \([\d.]+x\)"
                         r"  glm4_moe [\d.]+ ms  \(n=2\)", line), line


@pytest.mark.parametrize("argv, message", [
    (["--against", "no-such-revision"], "cannot read mobilemoe_mlx/model/mobilemoe.py at"),
    (["--model", "XL"], "--model must be one of"),
])
def test_bad_input_is_one_sentence(argv, message):
    if "--model" not in argv:
        argv = argv + ["--model", "tiny"]
    with pytest.raises(SystemExit) as e:
        main(argv + ["--rounds", "1"])
    assert str(e.value).startswith(message), e.value
    assert "\n" not in str(e.value)
