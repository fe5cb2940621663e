"""One error type for what the user can fix, and the CLI wrapper that reports it.

Bad input gets one line and exit code 2; anything else is our bug and exits 1.
A traceback is shown only with --verbose.
"""

import signal
import sys
import traceback
from typing import Callable


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
