"""Worker processes that never outlive the command that started them.

A command that fans out to spawned workers (rollouts, demo generation) cleans them up in a
`finally`; that runs on errors and Ctrl-C but not when the command is stopped with SIGTERM (a job
scheduler, `kill`, a session ending) or SIGKILL, and the workers would go on rolling out under init.
Two guards: the command turns SIGTERM into SystemExit while its workers run (so the `finally`
runs), and every worker watches its parent and exits when it is gone (SIGKILL included).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading


def exit_with_parent(parent_pid: int, interval: float = 1.0) -> None:
    """In a worker: exit (status 1) as soon as the process `parent_pid` is no longer its parent.

    Polls from a daemon thread: portable (no prctl), and the worker's own work needs no changes."""
    if os.getppid() != parent_pid:  # the parent died before we got here
        os._exit(1)

    def watch():
        while True:
            threading.Event().wait(interval)
            if os.getppid() != parent_pid:
                os._exit(1)  # no cleanup to run: the parent that would read our results is gone

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


@contextlib.contextmanager
def sigterm_raises_exit():
    """While inside: SIGTERM raises SystemExit(143) in the main thread, so `finally` blocks stop the
    workers and results already written stay (elsewhere, or off the main thread, a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
