"""`python -m bench`: thin click wrappers over bench.run, bench.report and mobilemoe_mlx.model.planner.

Only light modules are imported at the top (no mlx-lm, which pulls in
transformers, and no matplotlib): `-h` answers at once, and each command
imports what it runs inside its body."""

import math
import sys

import click

from mobilemoe_mlx.checkpoints.config import DTYPE_NAMES
from mobilemoe_mlx.errors import OneLineGroup, UserError, run_cli
from mobilemoe_mlx.model.planner import PREFILL_CHUNK

from .models import canonical, names_help
from .options import CPU_SHORT, FULL, check, choose_protocol, protocol_settings
from .tokens import KINDS


def _check_quant(bits: int, group_size: int) -> None:
    from mobilemoe_mlx.checkpoints.config import GROUP_SIZES, MLX_BITS

    check(bits in MLX_BITS, f"--bits must be one of {', '.join(map(str, MLX_BITS))}, not {bits}")
    check(group_size in GROUP_SIZES, "--group-size must be one of "
           f"{', '.join(map(str, GROUP_SIZES))} (MLX's affine quantization), not {group_size}")


HELP = {"help_option_names": ["-h", "--help"]}


def _default(option: str) -> str:
    return f"[default: {FULL[option]}; on a CPU {CPU_SHORT[option]}]"

# `bench parity`'s answer "the backends disagree", apart from 1 (our bug) and 2 (bad input).
PARITY_FAILED = 3


@click.group(cls=OneLineGroup, context_settings=HELP)
def main():
    """MobileMoE benchmarks: measure speed and memory, rebuild and compare
    reports, plan memory, check this backend against the CPU, and export what
    the Swift benchmark (ios/) runs. `COMMAND -h` explains each command below."""


@main.command(context_settings=HELP)
@click.option("--models", help=f"Comma-separated: {names_help()} or a converted directory. "
              f"[default: {FULL['models']}]")
@click.option("--prompt-lengths",
              help=f"Prefill prompt lengths. {_default('prompt_lengths')}")
@click.option("--decode-contexts",
              help=f"Contexts to decode at. {_default('decode_contexts')}")
@click.option("--gen-tokens", type=int,
              help=f"Decode tokens per run. {_default('gen_tokens')}")
@click.option("--repeats", type=int, help=f"Timed repeats per setting. {_default('repeats')}")
@click.option("--warmup", type=int,
              help=f"Untimed warm-up runs per setting. {_default('warmup')}")
@click.option("--prompts", type=click.Choice(KINDS), default="real", show_default=True,
              help="Prompt text for the timed runs (routing always compares all three).")
@click.option("--routing-tokens", type=int,
              help="Prompt length of the real-vs-dummy routing phase (0: skip). "
                   f"{_default('routing_tokens')}")
@click.option("--weights", type=click.Path(), help="A converted MobileMoE directory to use "
              "instead of synthetic weights (for the one MoE model in --models).")
@click.option("--out", default="results", show_default=True, help="Output directory.")
@click.option("--force", is_flag=True, help="Replace an earlier run's results in --out.")
@click.option("--quick", is_flag=True, help="Tiny models and short settings (tests, smoke runs).")
@click.option("--full", is_flag=True, help="The paper's protocol even on a CPU, where it takes "
              "days (a CPU otherwise runs short settings unless protocol options are given).")
@click.option("--dtype", type=click.Choice(DTYPE_NAMES),
              help="Activation and KV dtype. [default: float16 on a GPU (Metal, CUDA), float32 on CPU]")
@click.option("--bits", type=int, default=4, show_default=True,
              help="Synthetic weight bits (2, 3, 4, 5, 6 or 8).")
@click.option("--group-size", type=int, default=32, show_default=True,
              help="Synthetic weight group size (32, 64 or 128).")
@click.option("--prefill-step", type=int, default=PREFILL_CHUNK, show_default=True,
              help="Prefill chunk size (as mlx-lm's prefill_step_size).")
@click.option("--bandwidth", type=float, help="Memory bandwidth in GB/s for the decode limit "
              "[default: measured copy bandwidth].")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the synthetic weights and the random prompts.")
@click.option("--no-plots", is_flag=True, help="Skip the PNG plots.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--verbose", is_flag=True, help="Tracebacks on errors.")
def run(models, prompt_lengths, decode_contexts, gen_tokens, repeats, warmup, prompts,
        routing_tokens, weights, out, force, quick, full, dtype, bits, group_size, prefill_step, bandwidth,
        seed, no_plots, no_progress, verbose):
    """Measure prefill, decode and memory; write results.json, report.md, plots.

    The paper's protocol by default; on a CPU, where that takes days, short
    settings unless --full or a protocol option is given (the run says which).
    Settings estimated at more than an hour are asked about first when stdin is
    a terminal (the default answer is no); Ctrl-C stops the run within a second
    and keeps what was measured."""
    def go():
        from mobilemoe_mlx.model.runtime import current

        from .run import NotStarted, run_benchmark

        given = dict(prompt_lengths=prompt_lengths, decode_contexts=decode_contexts,
                     gen_tokens=gen_tokens, repeats=repeats, warmup=warmup,
                     routing_tokens=routing_tokens)
        runtime = current()
        defaults, protocol = choose_protocol(given, quick, full, runtime.backend)
        s = protocol_settings(
            given, quick, prefill_step, defaults, prompts=prompts,
            dtype=dtype or runtime.compute_dtype, bits=bits, group_size=group_size,
            seed=seed, bandwidth_gbps=bandwidth)
        check(bandwidth is None or (math.isfinite(bandwidth) and bandwidth > 0),
              f"--bandwidth must be a positive figure in GB/s, not {bandwidth}")
        _check_quant(bits, group_size)
        names = [canonical(m) for m in (models or defaults["models"]).split(",") if m.strip()]
        if not names:
            raise UserError("--models names no model")
        # Only a person at a terminal can answer; a script keeps running as before.
        ask = _ask if sys.stdin.isatty() else None
        try:
            run_benchmark(names, s, out, weights=weights, progress=not no_progress,
                          plots=not no_plots, log=lambda m: click.echo(m, err=True),
                          confirm=ask, hard_stop=True, force=force, protocol=protocol)
        except KeyboardInterrupt:
            sys.exit(130)  # run_benchmark said "interrupted" and wrote the report
        except NotStarted as e:
            click.echo(f"not started: {e}", err=True)
            sys.exit(1)
        click.echo(f"wrote {out}/results.json and {out}/report.md")

    run_cli(go, verbose)


def _ask(question: str) -> bool:
    """y/N on the terminal; Ctrl-C or Ctrl-D there answers no."""
    try:
        return click.confirm(question, default=False, err=True)
    except click.Abort:
        click.echo(err=True)
        return False


@main.command(context_settings=HELP)
@click.argument("run_dir", type=click.Path())
@click.option("--compare", "other", type=click.Path(), help="A second run to put side by side.")
@click.option("--no-plots", is_flag=True, help="Skip the PNG plots.")
@click.option("--verbose", is_flag=True, help="Tracebacks on errors.")
def report(run_dir, other, no_plots, verbose):
    """Rebuild RUN_DIR/report.md (and plots) from RUN_DIR/results.json."""
    def go():
        from .report import load_results, write_comparison, write_report

        load_results(run_dir)
        if other:
            load_results(other)  # both must be readable before anything is rewritten
        click.echo(f"wrote {write_report(run_dir, plots=not no_plots, log=click.echo)}")
        if other:
            click.echo(f"wrote {write_comparison(run_dir, other)}")

    run_cli(go, verbose)


@main.command(context_settings=HELP)
@click.option("--model", default="S", show_default=True,
              help=f"{names_help()} or a directory with a config.json.")
@click.option("--context", type=int, default=8192, show_default=True,
              help="Tokens in the KV cache (at most the model's context).")
@click.option("--kv-bits", type=click.Choice(["4", "8", "16"]), default="16", show_default=True,
              help="KV cache bits (16: unquantized, in --dtype).")
@click.option("--bits", type=int, default=4, show_default=True,
              help="Weight bits (2, 3, 4, 5, 6 or 8).")
@click.option("--group-size", type=int, default=32, show_default=True,
              help="Weight group size (32, 64 or 128).")
@click.option("--budget-gb", type=float, multiple=True, help="Extra budgets to check.")
@click.option("--dtype", type=click.Choice(DTYPE_NAMES),
              help="Activation and KV dtype. [default: float16, as MLX runs on the phone's GPU]")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@click.option("--verbose", is_flag=True, help="Tracebacks on errors.")
def plan(model, context, kv_bits, bits, group_size, dtype, budget_gb, as_json, verbose):
    """Weights + KV cache + working memory against phone and Mac budgets."""
    model = canonical(model)

    def go():
        import json

        from mobilemoe_mlx.model.planner import PHONE_BUDGETS, format_plan, machine_ram
        from mobilemoe_mlx.model.planner import plan as make_plan
        from mobilemoe_mlx.model.runtime import PHONE_DTYPE

        from .models import config_for

        check(context >= 1, f"--context must be at least 1, not {context}")
        _check_quant(bits, group_size)
        check(all(math.isfinite(b) and b > 0 for b in budget_gb),
               "--budget-gb must be a positive number of GB")
        config = config_for(model)
        longest = config.get("max_position_embeddings")
        check(not isinstance(longest, int) or context <= longest,
               f"--context {context} is longer than {model}'s context of {longest} tokens: "
               f"plan for {longest} or fewer")
        budgets = {**PHONE_BUDGETS, "this machine's RAM": machine_ram()}
        budgets.update({f"{b:g} GB": b * 1e9 for b in budget_gb})
        p = make_plan(config, context, kv_bits=None if kv_bits == "16" else int(kv_bits),
                      bits=bits, group_size=group_size, dtype=dtype or PHONE_DTYPE,
                      budgets=budgets)
        click.echo(json.dumps(p, indent=1) if as_json else format_plan(model, p))

    run_cli(go, verbose)


@main.command(context_settings=HELP)
@click.option("--model", default="tiny", show_default=True,
              help="A converted MobileMoE directory, or a preset (S, M, L, tiny) with "
                   "synthetic weights.")
@click.option("--tokens", type=int, default=64, show_default=True,
              help="Random prompt tokens compared at every position.")
@click.option("--chunk", type=int, default=32, show_default=True,
              help="Prefill chunk through the KV cache.")
@click.option("--decode", type=int, default=8, show_default=True,
              help="Last tokens fed one at a time (the decode path).")
@click.option("--dtype", type=click.Choice(DTYPE_NAMES),
              help="Cast the model under test to this dtype. [default: a directory as load() "
                   "runs it here; a preset in this backend's dtype]")
@click.option("--layers", type=int, help="Keep this many of a preset's layers (all of one "
              "shape: a quicker check on a slow backend). [default: all]")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the prompt and of a preset's weights.")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@click.option("--verbose", is_flag=True, help="Tracebacks on errors.")
def parity(model, tokens, chunk, decode, dtype, layers, seed, as_json, verbose):
    """The model on the default device against the CPU in float32, layer by layer.

    Each layer is given the CPU's input to it, so its figures are its own error;
    the logits come from a free run. Exit code 3 when a figure is below its
    dtype's threshold (the first such layer is named), 0 when all agree."""
    model = canonical(model)

    def go():
        import json

        from .parity import check_settings, compare, format_parity, models_for, random_tokens

        check_settings(tokens, chunk, decode)
        check(seed >= 0, f"--seed must be 0 or more, not {seed}")
        under_test, reference = models_for(model, dtype, seed, layers)
        ids = random_tokens(under_test.args.vocab_size, tokens, seed)
        result = compare(under_test, reference, ids, chunk, decode)
        click.echo(json.dumps(result.to_dict(), indent=1) if as_json
                   else format_parity(model, result))
        if result.failures():
            sys.exit(PARITY_FAILED)

    run_cli(go, verbose)


@main.command(context_settings=HELP)
@click.option("--model", default="S", show_default=True,
              help=f"{names_help()} or a converted directory.")
@click.option("--context", type=int, default=256, show_default=True,
              help="Tokens in the KV cache before the decode step and the prefill chunk.")
@click.option("--chunk", type=int, default=PREFILL_CHUNK, show_default=True,
              help="Tokens of the prefill chunk (bench run's --prefill-step; 0: decode only).")
@click.option("--dtype", type=click.Choice(DTYPE_NAMES),
              help="Activation dtype. [default: a preset in this backend's dtype; a directory "
                   "as load() runs it here]")
@click.option("--repeats", type=int, default=3, show_default=True,
              help="Timed runs of each step (after one warm-up); the median is shown.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the tokens and of a preset's weights.")
@click.option("--json", "as_json", is_flag=True, help="Print the profile as JSON.")
@click.option("--no-progress", is_flag=True, help="No estimate and no progress bar on stderr.")
@click.option("--verbose", is_flag=True, help="Tracebacks on errors.")
def profile(model, context, chunk, dtype, repeats, seed, as_json, no_progress, verbose):
    """Where one decode step and one prefill chunk spend their time on this
    backend, by kind of op (attention, norms and RoPE, router, experts, head),
    and how many graph nodes and kernels they have. docs/profile.md explains it."""
    model = canonical(model)

    def go():
        import json

        from .profile.measure import build_model, check_settings, run_profile
        from .profile.output import format_profile

        check(seed >= 0, f"--seed must be 0 or more, not {seed}")
        check_settings(model, context, chunk, repeats)
        bar = None if no_progress else _profile_estimate(model, context, chunk, repeats, dtype)
        built = build_model(model, dtype, seed)
        p = run_profile(built, context, chunk, repeats, seed, progress=bar)
        click.echo(json.dumps(p.to_dict(), indent=1) if as_json else format_profile(p))

    run_cli(go, verbose)


def _profile_estimate(model: str, context: int, chunk: int, repeats: int, dtype):
    """Print `bench profile`'s estimate as `bench run` prints its own, and return
    the progress bar (bench run's) it will update."""
    from mobilemoe_mlx.model.runtime import current

    from .estimate import estimate_line, measured_flops, profile_work
    from .harness import Progress
    from .models import config_for, is_checkpoint_name

    runtime = current()
    dtype = dtype or runtime.compute_dtype
    work = profile_work(config_for(model), context, chunk, repeats)
    rate = measured_flops(dtype)
    first = "loading" if is_checkpoint_name(model) else "building"
    click.echo(f"{estimate_line(sum(work.values()) / rate, rate, dtype, runtime.backend)}, "
               f"after {first} {model}", err=True)
    return Progress(sum(work.values()))


# The export commands of the Swift benchmark and parity test (ios/), in bench/export.py.
from .export import register as _register_exports  # noqa: E402

_register_exports(main)
