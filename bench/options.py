"""The benchmark protocol's options, parsed and checked once for `bench run` and
the export commands (bench/cli.py, bench/export.py), so a Swift run follows the
same settings a Python run would."""

from typing import List

from mobilemoe_mlx.errors import UserError

from .harness import Settings

QUICK = dict(models="tiny,pro-tiny", prompt_lengths="16,32", decode_contexts="16,48",
             gen_tokens=4, repeats=2, warmup=1, routing_tokens=32)
FULL = dict(models="S,pro", prompt_lengths="512,1024,2048,4096,8192",
            decode_contexts="256,1024,4096,8192", gen_tokens=128, repeats=5, warmup=1,
            routing_tokens=1024)


def check(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def ints(text: str, option: str) -> List[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{option} takes comma-separated integers, not {text!r}") from None
    if not values or min(values) < 1:
        raise UserError(f"{option} needs positive integers, got {text!r}")
    return values


def protocol_settings(given: dict, quick: bool, prefill_step: int, **fixed) -> Settings:
    """Settings from the protocol options in `given` (None: not given), over
    --quick's or the paper's defaults, each checked; `fixed` sets the rest."""
    opts = {**(QUICK if quick else FULL), **{k: v for k, v in given.items() if v is not None}}
    check(opts["repeats"] >= 1, f"--repeats must be at least 1, not {opts['repeats']}")
    check(opts["gen_tokens"] >= 1, f"--gen-tokens must be at least 1, not {opts['gen_tokens']}")
    check(opts["warmup"] >= 0, f"--warmup must be 0 or more, not {opts['warmup']}")
    check(opts["routing_tokens"] >= 0,
          f"--routing-tokens must be 0 (skip) or more, not {opts['routing_tokens']}")
    check(prefill_step >= 1, f"--prefill-step must be at least 1, not {prefill_step}")
    return Settings(
        prompt_lengths=ints(opts["prompt_lengths"], "--prompt-lengths"),
        decode_contexts=ints(opts["decode_contexts"], "--decode-contexts"),
        gen_tokens=opts["gen_tokens"], repeats=opts["repeats"], warmup=opts["warmup"],
        routing_tokens=opts["routing_tokens"], prefill_step=prefill_step, **fixed)
