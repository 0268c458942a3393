"""Waiting in the main thread for a signal handler to fire.

Python runs signal handlers only in the main thread, between bytecodes. When the kernel delivers
SIGTERM to another thread (a gRPC or HTTP worker), the main thread blocked in an untimed
`Event.wait()` is not woken, and the handler that would set the event never runs: the process
ignores the signal. Waking up every fraction of a second lets the handler run.
"""

from __future__ import annotations

import threading

POLL_S = 0.2


def wait_in_main_thread(event: threading.Event) -> None:
    """Block until `event` is set, waking every `POLL_S` so pending signal handlers can run."""
    while not event.wait(POLL_S):
        pass
