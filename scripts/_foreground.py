"""Running a private broker in the foreground for the launchers' command lines (scripts/mosquitto.py,
nats.py, rabbitmq.py): print where it listens, wait for Ctrl-C or SIGTERM (or the broker's death), stop it."""

from __future__ import annotations

import signal
import sys
import threading


def run_until_stopped(broker, banner: str, name: str) -> int:
    """``broker`` has ``running``, ``proc``, ``log_tail()`` and ``close()``. Returns 0 when stopped by a signal,
    1 when the broker died by itself (its log's tail is printed)."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"{banner}; Ctrl-C stops", flush=True)
    code = None
    try:
        while broker.running and not stop.wait(0.5):  # wake up now and then to notice a dead broker
            pass
    finally:
        code = broker.proc.poll()
        if code is not None:
            print(f"{name} exited with {code}:\n{broker.log_tail()}", file=sys.stderr)
        broker.close()
    return 0 if code is None else 1
