"""The benchmark protocol's settings and options, parsed and checked once for
`bench run` and the export commands (bench/cli.py, bench/export.py), so a Swift
run follows the same settings a Python run would. Light to import (no mlx-lm):
the command line's help is built from it."""

from dataclasses import asdict, dataclass, field
from typing import List, Optional, Tuple

from mobilemoe_mlx.errors import UserError
from mobilemoe_mlx.model.planner import PREFILL_CHUNK


@dataclass
class Settings:
    prompt_lengths: List[int] = field(default_factory=lambda: [512, 1024, 2048, 4096, 8192])
    decode_contexts: List[int] = field(default_factory=lambda: [256, 1024, 4096, 8192])
    gen_tokens: int = 128
    repeats: int = 5
    warmup: int = 1
    prompts: str = "real"  # real | random | repeat
    prefill_step: int = PREFILL_CHUNK  # the chunk chat prefills with too
    routing_tokens: int = 1024  # prompt length of the real-vs-dummy routing phase
    dtype: str = "float32"  # activations (and KV cache)
    bits: int = 4
    group_size: int = 32
    seed: int = 0
    bandwidth_gbps: Optional[float] = None
    bandwidth_source: Optional[str] = None

    def to_dict(self):
        return asdict(self)


def _as_options(s: Settings, models: str) -> dict:
    return dict(models=models, prompt_lengths=",".join(map(str, s.prompt_lengths)),
                decode_contexts=",".join(map(str, s.decode_contexts)), gen_tokens=s.gen_tokens,
                repeats=s.repeats, warmup=s.warmup, routing_tokens=s.routing_tokens)


# The option values of --quick and of the paper's protocol (Settings' defaults).
QUICK = _as_options(Settings(prompt_lengths=[16, 32], decode_contexts=[16, 48], gen_tokens=4,
                             repeats=2, warmup=1, routing_tokens=32), "tiny,pro-tiny")
FULL = _as_options(Settings(), "S,pro")
# Where MLX runs on the CPU the paper's protocol takes days (`bench run`'s
# estimate read 76 hours on a shared 2-core Linux box, 2026-12-06): without
# protocol options, a CPU run takes these, the same models at one short
# setting of each phase.
CPU_SHORT = _as_options(Settings(prompt_lengths=[128], decode_contexts=[128], gen_tokens=16,
                                 repeats=2, warmup=1, routing_tokens=128), "S,pro")
PROTOCOL_OPTIONS = ("prompt_lengths", "decode_contexts", "gen_tokens", "repeats", "warmup",
                    "routing_tokens")


def choose_protocol(given: dict, quick: bool, full: bool, backend: str) -> Tuple[dict, str]:
    """The option values the protocol options in `given` (None: not given) fall
    back on, and a line saying which protocol runs and why. `backend` is
    runtime.current().backend: a CPU gets CPU_SHORT unless the user asked for
    settings (--full, --quick, or any protocol option)."""
    from mobilemoe_mlx.model.runtime import CPU

    check(not (quick and full), "--quick and --full pick different protocols: give one")
    if quick:
        return QUICK, "protocol: --quick (tiny models, short settings: a smoke test)"
    named = [f"--{k.replace('_', '-')}" for k in PROTOCOL_OPTIONS if given.get(k) is not None]
    if full or named or backend != CPU:
        why = ("--full" if full else f"{', '.join(named)} given" if named
               else f"the {backend} backend")
        return FULL, (f"protocol: the paper's ({why}; options not given take its values: "
                      f"{_describe(FULL)})")
    return CPU_SHORT, (f"protocol: short CPU settings ({_describe(CPU_SHORT)}), as MLX runs on "
                       "the CPU here, where the paper's protocol takes days; --full runs the "
                       "paper's, and any protocol option starts from it")


def _describe(o: dict) -> str:
    return (f"prompts {o['prompt_lengths']}, decode at {o['decode_contexts']}, "
            f"{o['gen_tokens']} tokens, {o['warmup']} warm-up + {o['repeats']} repeats, "
            f"routing {o['routing_tokens']}")


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


def protocol_settings(given: dict, quick: bool, prefill_step: int,
                      defaults: Optional[dict] = None, **fixed) -> Settings:
    """Settings from the protocol options in `given` (None: not given), over
    `defaults` (choose_protocol's; else --quick's or the paper's), each checked;
    `fixed` sets the rest."""
    base = defaults or (QUICK if quick else FULL)
    opts = {**base, **{k: v for k, v in given.items() if v is not None}}
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
