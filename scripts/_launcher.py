"""What the broker launchers (scripts/mosquitto.py, nats.py, rabbitmq.py) share: a broker process writing its
log in a work directory of its own, started in the background, stopped politely and then killed, and closed
together with its directory. Each launcher adds how it starts and when its broker is ready. Also their
``--user USER:PASSWORD`` argument's parser."""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
from pathlib import Path


class BrokerProcess:
    """A broker process on host:port (``proc``: None until started), its files in ``workdir``, its output in
    ``log_path``. A subclass defines ``start(timeout)`` (launch with :meth:`launch_process`, then wait until
    ready) and may set START_TIMEOUT_S, STOP_TIMEOUT_S and ``_signal`` (RabbitMQ signals a process group)."""

    START_TIMEOUT_S = 10.0
    STOP_TIMEOUT_S = 10.0
    host: str
    port: int
    workdir: Path
    log_path: Path
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float | None = None):
        raise NotImplementedError

    def launch_process(self, argv: list[str], **popen_kw) -> None:
        """Run ``argv`` in the work directory, its output appended to the log, no stdin."""
        if self.running:
            raise RuntimeError("already running")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         cwd=self.workdir, **popen_kw)

    def _signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGTERM (the broker saves what it keeps on the way out); SIGKILL if it lingers past STOP_TIMEOUT_S."""
        if not self.running:
            return self.proc.returncode if self.proc else None
        self._signal(signal.SIGTERM)
        try:
            return self.proc.wait(self.STOP_TIMEOUT_S if timeout is None else timeout)
        except subprocess.TimeoutExpired:
            return self.kill()

    def kill(self) -> int | None:
        """SIGKILL: a crash (whatever the broker had not written yet is lost)."""
        if not self.running:
            return self.proc.returncode if self.proc else None
        self._signal(signal.SIGKILL)
        return self.proc.wait()

    def restart(self, timeout: float | None = None):
        """Stop if running, then start again: same ports, same data."""
        self.stop()
        return self.start(self.START_TIMEOUT_S if timeout is None else timeout)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def close(self) -> None:
        """Stop the broker and remove its directory."""
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def parse_user(text: str) -> tuple[str, str]:
    """A launcher's ``--user USER:PASSWORD`` argument (argparse ``type=``): (user, password)."""
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise argparse.ArgumentTypeError(f"expected USER:PASSWORD, got {text!r}")
    return user, password
