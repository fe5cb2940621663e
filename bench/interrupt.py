"""Ctrl-C stops a benchmark run within a second, even in the middle of a long
MLX computation.

Python raises KeyboardInterrupt only between bytecodes of the main thread, so
a Ctrl-C waits for the `mx.eval` running at that moment: one 256-token prefill
chunk of MobileMoE-S takes 20-60 s on MLX's CPU backend, and building a
published shape's synthetic weights seconds per layer. Splitting those
computations finer would change what is measured. Instead: the signal's
C-level handler writes to the file descriptor given to `signal.set_wakeup_fd`
at once, and MLX releases the GIL while it computes, so a watcher thread
reading that descriptor wakes within milliseconds. If the main thread has not
started finishing the run itself within GRACE_S (it has not, when it is inside
MLX), the watcher finishes it (the saved results marked interrupted, and the
report) and ends the process with the signal's exit code (128 + signal). The
measurement in progress is abandoned: it could not have been kept anyway.
"""

import os
import signal
import sys
import threading
from typing import Callable, Optional

GRACE_S = 0.5  # time the main thread has to take over before the watcher does
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class HardStop:
    """A context in which Ctrl-C (or SIGTERM) ends the process promptly.

    `finish()` is what the watcher runs for the main thread when that is stuck
    in MLX; the main thread calls `claim()` first thing when it finishes the
    run itself (normally or after KeyboardInterrupt), and only writes when it
    returns True. False means the watcher is already finishing: the main
    thread then waits for the process to end (`wait_for_exit()`)."""

    def __init__(self, finish: Callable[[], None]):
        self._finish = finish
        self._claim = threading.Lock()
        self._claimed = threading.Event()
        self._pipe: Optional[tuple] = None
        self._previous_fd = -1
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> "HardStop":
        if threading.current_thread() is not threading.main_thread():
            return self  # signals reach the main thread only: nothing to watch
        r, w = os.pipe()
        os.set_blocking(w, False)  # the C handler must never block
        self._previous_fd = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        self._pipe = (r, w)
        self._thread = threading.Thread(target=self._watch, name="bench-hard-stop", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._pipe is None:
            return
        signal.set_wakeup_fd(self._previous_fd)
        r, w = self._pipe
        os.write(w, b"\0")  # wakes the watcher, which then returns
        self._thread.join(timeout=5)
        os.close(w)
        os.close(r)
        self._pipe = None

    def claim(self) -> bool:
        """True when the caller (the main thread) is to finish the run."""
        if self._claim.acquire(blocking=False):
            self._claimed.set()
            return True
        return False

    def wait_for_exit(self) -> None:
        threading.Event().wait()  # the watcher ends the process

    def _watch(self) -> None:
        r = self._pipe[0]
        while True:
            data = os.read(r, 64)
            if not data or b"\0" in data:
                return  # the context is closing
            stop = [s for s in data if s in SIGNALS]
            if not stop:
                continue
            # The main thread takes over itself when it is in Python code.
            if self._claimed.wait(GRACE_S) or not self._claim.acquire(blocking=False):
                return
            self._claimed.set()
            code = 128 + stop[0]
            try:
                self._finish()
            except Exception as e:  # noqa: BLE001 - said, then the process still ends
                print(f"error: {e}", file=sys.stderr)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)  # the main thread is inside MLX: nothing else can end it
