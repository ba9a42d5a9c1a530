"""Real services for the tests: Mosquitto (started with broker_config/) and the worker as a subprocess.

A missing service skips its tests with a visible reason, except when
IM_REQUIRE_SERVICES=1 (set by .ci/run): then it is a failure, never a silent skip.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading

import pytest

from conftest import REPO, backend_cmd

WORKER_USER, WORKER_PASSWORD = "im-worker", "worker-secret"


def require(available: bool, reason: str) -> None:
    if available:
        return
    if os.environ.get("IM_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{reason} (IM_REQUIRE_SERVICES=1: required here)")
    pytest.skip(reason)


def mosquitto(users: dict[str, str]):
    """Start a Mosquitto with the project's config and these users (plus the worker's account)."""
    from scripts.mosquitto import find_mosquitto, start_mosquitto
    require(find_mosquitto() is not None, "mosquitto binary not installed")
    return start_mosquitto({**users, WORKER_USER: WORKER_PASSWORD})


class WorkerProcess:
    """`python -m backend worker` beside a broker; start() returns once it is connected."""

    def __init__(self, port: int, db_url: str, client_id: str = "im-worker", host: str = "127.0.0.1",
                 extra: list[str] | None = None, username: str | None = WORKER_USER, scheme: str = "mqtt"):
        self.port, self.db_url, self.client_id, self.host = port, db_url, client_id, host
        self.extra, self.username, self.scheme = extra or [], username, scheme
        self.proc: subprocess.Popen | None = None
        self.lines: list[str] = []
        self._cond = threading.Condition()

    def start(self, wait: bool = True, timeout: float = 20, env: dict | None = None) -> "WorkerProcess":
        self.lines = []
        env = {**os.environ, "IM_BROKER_PASSWORD": WORKER_PASSWORD, **(env or {})}
        self.proc = subprocess.Popen(
            backend_cmd("worker", "--broker",
                        f"{self.scheme}://{self.username + '@' if self.username else ''}{self.host}:{self.port}",
                        "--database-url", self.db_url, "--client-id", self.client_id, *self.extra),
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=self._read, args=(self.proc,), daemon=True).start()
        if wait and not self.wait_log("backend.worker: connected", timeout):
            self.kill()
            raise RuntimeError("worker did not connect:\n" + "".join(self.lines))
        return self

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()

    def wait_log(self, text: str, timeout: float = 10) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: any(text in ln for ln in self.lines)
                                       or (self.proc is not None and self.proc.poll() is not None), timeout) \
                and any(text in ln for ln in self.lines)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> int:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            return self.proc.wait(15)
        return self.proc.returncode if self.proc else 0


# The machine's own database servers (PostgreSQL and MariaDB, as CI has them); override with IM_TEST_POSTGRES_URL / IM_TEST_MYSQL_URL.
POSTGRES_URL = os.environ.get("IM_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
MYSQL_URL = os.environ.get("IM_TEST_MYSQL_URL", "mysql://root@127.0.0.1:3306/test")


def reachable(url: str) -> str | None:
    """None if the database answers, else why not."""
    import peewee as pw
    from playhouse.db_url import connect
    try:
        db = connect(url, **({"charset": "utf8mb4"} if url.startswith("mysql") else {}))
        db.connect()
        db.execute_sql("SELECT 1")
        db.close()
        return None
    except (pw.OperationalError, pw.InterfaceError, ImportError) as e:
        return f"{url.split('://')[0]} not reachable at {url.split('@')[-1]}: {str(e).strip()[:120]}"


def fresh_database(url: str):
    """Open ``url`` with an empty schema of ours (drops our tables first)."""
    from backend.store import create_schema, drop_schema, open_database
    if not url.startswith("sqlite"):
        why = reachable(url)
        require(why is None, why or "")
    db = open_database(url, create=False)
    drop_schema(db)
    create_schema(db)
    return db
