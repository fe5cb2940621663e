"""The decode step's host build, interleaved in one process: this tree's
MobileMoE, the model file of another git revision, and mlx-lm's glm4_moe,
all at one preset's shape with the same synthetic weights.

A machine's load moves single benchmark runs by more than a change to the
step does, so changes to it are compared this way (docs/benchmarks.md, "The
decode step"): each round builds `--probe` steps of each model with nothing
else running (`steps.probe_step`) and `--steps` in the pipelined loop
(`steps.decode`), and the medians are compared within the run.

    python -m bench.interleave --rounds 10 --against 8f7f3c3
"""

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

MODEL_FILE = "mobilemoe_mlx/model/mobilemoe.py"


def model_file_at(revision: str):
    """The model file as it was at `revision` (git), imported on its own."""
    root = Path(__file__).resolve().parent.parent
    try:
        source = subprocess.run(["git", "show", f"{revision}:{MODEL_FILE}"], cwd=root,
                                check=True, capture_output=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        said = (getattr(e, "stderr", None) or str(e).encode()).decode().strip().splitlines()
        raise SystemExit(f"cannot read {MODEL_FILE} at {revision!r}: give a git revision of "
                         f"this checkout ({said[-1] if said else e})") from None
    path = Path(tempfile.mkdtemp()) / "mobilemoe_at_revision.py"
    path.write_bytes(source)
    spec = importlib.util.spec_from_file_location("mobilemoe_at_revision", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def same_model_from(module, model: nn.Module, bits: int, group_size: int) -> nn.Module:
    """`model` rebuilt from another version of the model file, same weights."""
    from .models import _not_router

    other = module.Model(module.ModelArgs.from_dict(dict(vars(model.args))))
    nn.quantize(other, group_size=group_size, bits=bits, class_predicate=_not_router)
    if hasattr(other, "fuse_projections"):
        other.fuse_projections()
    other.update(model.parameters())
    mx.eval(other.parameters())
    return other


def measure(models: dict, rounds: int, probe: int, steps: int) -> dict:
    """{name: {"idle": [s...], "pipelined": [s...]}}, the first build of each
    call left out (it may trace or grow the cache)."""
    from mlx_lm.models.cache import make_prompt_cache

    from .steps import decode, probe_step

    state, builds = {}, {name: {"idle": [], "pipelined": []} for name in models}
    for name, model in models.items():
        cache = make_prompt_cache(model)
        mx.eval(model(mx.array([[1] * 8]), cache=cache))
        state[name] = cache
    for _ in range(rounds):
        for name, model in models.items():
            cache = state[name]
            builds[name]["idle"] += probe_step(model, mx.array([1]), cache, probe)[1][1:]
            builds[name]["pipelined"] += decode(model, mx.array([1]), cache, steps)[1][1:]
            for c in cache:  # stay within one buffer size
                c.offset = min(c.offset, 200)
    return builds


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.interleave", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="S", help="preset (default S)")
    parser.add_argument("--against", default="HEAD",
                        help="git revision whose model file to compare with (default HEAD)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--probe", type=int, default=8, help="idle builds a round")
    parser.add_argument("--steps", type=int, default=12, help="pipelined steps a round")
    args = parser.parse_args(argv)

    from .models import PEER_PREFIX, PRESETS, build_synthetic

    if args.model not in PRESETS:
        raise SystemExit(f"--model must be one of {', '.join(PRESETS)}, not {args.model!r}")
    before = model_file_at(args.against)
    built = build_synthetic(args.model, fuse=True)
    models = {
        "this tree": built.model,
        f"at {args.against}": same_model_from(before, built.model, built.quant.bits,
                                              built.quant.group_size),
        "glm4_moe": build_synthetic(PEER_PREFIX + args.model, fuse=True).model,
    }
    builds = measure(models, args.rounds, args.probe, args.steps)
    median = {name: {kind: statistics.median(v) for kind, v in b.items()}
              for name, b in builds.items()}
    print(f"{args.model}, {args.rounds} rounds, host build per decode step (median), "
          f"{mx.default_device()}:")
    for kind in ("pipelined", "idle"):
        peer = median["glm4_moe"][kind]
        cells = [f"{name} {m[kind] * 1e3:.3f} ms ({m[kind] / peer:.3f}x)"
                 for name, m in median.items() if name != "glm4_moe"]
        print(f"  {kind:9} " + "  ".join(cells) + f"  glm4_moe {peer * 1e3:.3f} ms"
              f"  (n={len(builds['glm4_moe'][kind])})")


if __name__ == "__main__":
    sys.exit(main())
