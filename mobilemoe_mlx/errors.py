"""One error type for what the user can fix, and the CLI wrapper that reports it.

Bad input gets one line and exit code 2; anything else is our bug and exits 1.
A traceback is shown only with --verbose.
"""

import signal
import sys
import traceback
from typing import Callable

import click


class UserError(Exception):
    """Input the user can fix: the message says what is wrong and what to do."""


def _terminate(signum, frame):
    # SystemExit unwinds like Ctrl-C does, so half-written outputs are removed.
    raise SystemExit(128 + signum)


def run_cli(main: Callable[[], None], verbose: bool) -> None:
    """Run `main`, turning failures into one line on stderr and an exit code."""
    signal.signal(signal.SIGTERM, _terminate)
    try:
        main()
    except UserError as e:
        if verbose:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - the last line of defence for a CLI
        if verbose:
            traceback.print_exc()
        print(
            f"internal error: {type(e).__name__}: {e} (rerun with --verbose and report it)",
            file=sys.stderr,
        )
        sys.exit(1)


class _OneLineUsageErrors:
    """click's usage errors (a bad option value, a missing argument) as one line
    and exit code 2, like every other error, instead of click's usage block."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as e:
            if e.ctx is not None and type(e).__name__ == "NoArgsIsHelpError":
                # A group run with no command: its help is the answer, not an error.
                print(e.ctx.get_help(), file=sys.stderr)
                sys.exit(2)
            print(f"error: {e.format_message()} (see --help)", file=sys.stderr)
            sys.exit(2)
        except click.Abort:
            sys.exit(130)


class OneLineCommand(_OneLineUsageErrors, click.Command):
    """A click command whose usage errors are one line (see _OneLineUsageErrors)."""


class OneLineGroup(_OneLineUsageErrors, click.Group):
    """A click group whose, and whose subcommands', usage errors are one line."""
