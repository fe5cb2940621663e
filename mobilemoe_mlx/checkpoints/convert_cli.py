"""The converter's command line: `mobilemoe-convert` once installed, `python convert.py`
from a checkout.

    python convert.py facebook/MobileMoE-S-QAT --out mlx/MobileMoE-S
    python convert.py ./MobileMoE-S-SFT --out mlx/MobileMoE-S-int4 --q-group-size 64
    python convert.py model.pt --out mlx/S-f32 --no-quantize --dtype float32
"""

import click

from ..errors import OneLineCommand, run_cli
from .convert import DTYPES, convert


@click.command(cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("source")
@click.option("--out", required=True, help="Directory to create (written atomically).")
@click.option("--dtype", type=click.Choice(list(DTYPES)), default=None,
              help="Dtype of every floating tensor except the router (always float32). "
                   "Default: float16 for QAT checkpoints, the checkpoint's own otherwise.")
@click.option("--quantize/--no-quantize", default=True, show_default=True,
              help="Quantize linears, embedding and experts.")
@click.option("--q-bits", type=int, default=4, show_default=True, help="4 or 8.")
@click.option("--q-group-size", type=int, default=None,
              help="32, 64 or 128. Default: a QAT checkpoint's own (kept bit for bit), else 32.")
@click.option("--force", is_flag=True, help="Replace an existing --out.")
@click.option("--revision", default=None, help="Hub branch, tag or commit.")
@click.option("--verbose", is_flag=True, help="Show tracebacks on errors.")
def main(source, out, dtype, quantize, q_bits, q_group_size, force, revision, verbose):
    """Convert SOURCE (S, M or L in any case: the QAT release on the Hub; a Hub
    repo id, a checkpoint directory or a weights file)."""

    def run():
        from .hub import model_source

        path = convert(model_source(source), out, dtype=dtype, quantize=quantize, q_bits=q_bits,
                       q_group_size=q_group_size, force=force, revision=revision)
        click.echo(f"wrote {path}")

    run_cli(run, verbose)

