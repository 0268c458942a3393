"""A service's main thread notices SIGTERM even when the kernel hands it to another thread."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

# The main thread blocks SIGTERM, so the kernel must deliver it to the helper thread; Python then
# runs the handler in the main thread only if that thread wakes up on its own.
WAITER = textwrap.dedent(
    """
    import signal, threading, time
    from gharial.plumbing.signals import wait_in_main_thread

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    print("ready", flush=True)
    wait_in_main_thread(stop)
    print("stopped", flush=True)
    """
)


def test_a_sigterm_delivered_to_another_thread_still_stops_the_wait() -> None:
    process = subprocess.Popen([sys.executable, "-c", WAITER], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "ready"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
        assert process.stdout.read().strip() == "stopped"
    finally:
        process.kill()
