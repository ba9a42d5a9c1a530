"""Start a private RabbitMQ node (rabbitmq_mqtt) with broker_config/rabbitmq/, for tests and manual use.

    from scripts.rabbitmq import start_rabbitmq
    broker = start_rabbitmq({"alice": "pw", "im-worker": "secret"})   # about 20 s
    ... broker.host, broker.port (MQTT) ...
    broker.add_users({"carol": "pw"})   # more accounts on the running node (one rabbitmqctl call)
    broker.close()                      # stop the node and its epmd, remove the temporary directory

or from a shell (Ctrl-C stops it):

    python -m scripts.rabbitmq --user alice:pw --user bob:pw --user im-worker:secret [--port 18830]

The node runs from the binaries in /usr/lib/rabbitmq/bin/ directly (the /usr/sbin wrappers switch to the
rabbitmq user and its cookie), with a private HOME (its Erlang cookie), epmd port, node name, distribution
port, mnesia and log directories (../shared/BROKERS.md), so it never meets the machine's own RabbitMQ.
broker_config/rabbitmq/rabbitmq.conf is the base (its MQTT listener moved to the chosen port); accounts,
vhost rights and topic permissions (the same regular expressions as broker_config/rabbitmq/setup.sh) are
loaded at boot from a definitions file. Readiness: an MQTT CONNECT is accepted.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterable, Mapping

from scripts.mosquitto import free_port
from scripts.nats import mqtt_connects

try:
    from scripts._foreground import run_until_stopped
except ImportError:  # run as a file: python scripts/X.py
    from _foreground import run_until_stopped  # type: ignore[no-redef]

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "broker_config" / "rabbitmq"
BIN_DIRS = ("/usr/lib/rabbitmq/bin", "/usr/local/lib/rabbitmq/bin", "/opt/homebrew/sbin")
WORKER_USER = "im-worker"
# One node starts in 18-26 s here (BROKERS.md); a loaded CI machine gets room to spare.
START_TIMEOUT_S = 120.0
# rabbitmqctl stop waits for the node to flush its queues; then SIGKILL.
STOP_TIMEOUT_S = 30.0
# A RabbitMQ uid: no '.', which RabbitMQ turns into '/' in topics (im/u/bob.x/send arrives as im/u/bob/x/send).
RABBIT_UID_RE = re.compile(r"^[A-Za-z0-9_-]{1,50}$")


def _setup_value(name: str) -> str:
    """A regular expression from setup.sh (one source for the shell and the fixture)."""
    text = (CONFIG_DIR / "setup.sh").read_text(encoding="utf-8")
    m = re.search(rf"^{name}='([^']*)'$", text, re.M)
    if m is None:
        raise RuntimeError(f"broker_config/rabbitmq/setup.sh has no {name}=")
    return m.group(1)


def find_rabbitmq() -> str | None:
    """The directory holding rabbitmq-server and rabbitmqctl, or None."""
    for d in BIN_DIRS:
        if os.access(os.path.join(d, "rabbitmq-server"), os.X_OK):
            return d
    return None


def password_hash(password: str) -> str:
    """RabbitMQ's rabbit_password_hashing_sha256: base64(salt + sha256(salt + password)), 4 random salt bytes."""
    salt = os.urandom(4)
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def definitions(users: Mapping[str, str], worker_user: str = WORKER_USER) -> dict:
    """Accounts, vhost rights and topic permissions as a RabbitMQ definitions document."""
    out: dict = {"users": [], "vhosts": [{"name": "/"}], "permissions": [], "topic_permissions": []}
    queues, rw = _setup_value("QUEUES"), _setup_value("RW")
    for user, password in users.items():
        if user == worker_user:
            write, read = _setup_value("WORKER_WRITE"), _setup_value("WORKER_READ")
        elif not RABBIT_UID_RE.match(user):
            raise ValueError(f"user {user!r}: a uid on RabbitMQ is 1-50 of A-Z a-z 0-9 _ - (no '.': RabbitMQ "
                             "turns it into a topic level; docs/PROTOCOL.md)")
        else:
            write, read = _setup_value("USER_WRITE"), _setup_value("USER_READ")
        out["users"].append({"name": user, "password_hash": password_hash(password),
                             "hashing_algorithm": "rabbit_password_hashing_sha256", "tags": []})
        out["permissions"].append({"user": user, "vhost": "/", "configure": queues, "write": rw, "read": rw})
        out["topic_permissions"].append({"user": user, "vhost": "/", "exchange": "amq.topic",
                                         "write": write, "read": read})
    return out


def render_config(base: str, *, host: str, port: int, definitions_path: Path) -> str:
    lines = []
    for line in base.splitlines():
        if line.startswith("mqtt.listeners.tcp.default"):
            line = f"mqtt.listeners.tcp.default = {host}:{port}"
        lines.append(line)
    lines.append(f"load_definitions = {definitions_path}")
    return "\n".join(lines) + "\n"


class RabbitMQ:
    """A private RabbitMQ node: MQTT on host:port; everything it writes under workdir."""

    def __init__(self, host: str, port: int, workdir: Path, bindir: str, probe_user: tuple[str, str] | None):
        self.host, self.port, self.workdir, self.bindir = host, port, workdir, bindir
        self.probe_user = probe_user
        self.node = f"im{os.urandom(3).hex()}@localhost"
        self.epmd_port, self.dist_port = free_port(), free_port()
        self.log_path = workdir / "node.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def env(self) -> dict:
        w = self.workdir
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update(HOME=str(w / "home"), ERL_EPMD_PORT=str(self.epmd_port), ERL_EPMD_ADDRESS="127.0.0.1",
                   RABBITMQ_CONF_ENV_FILE=str(w / "rabbitmq-env.conf"), RABBITMQ_NODENAME=self.node,
                   RABBITMQ_NODE_IP_ADDRESS="127.0.0.1", RABBITMQ_NODE_PORT=str(free_port()),
                   RABBITMQ_DIST_PORT=str(self.dist_port), RABBITMQ_MNESIA_BASE=str(w / "mnesia"),
                   RABBITMQ_LOG_BASE=str(w / "log"), RABBITMQ_PID_FILE=str(w / "node.pid"),
                   RABBITMQ_ENABLED_PLUGINS_FILE=str(w / "enabled_plugins"),
                   RABBITMQ_CONFIG_FILE=str(w / "rabbitmq.conf"), RABBITMQ_LOGS="-")
        return env

    def start(self, timeout: float = START_TIMEOUT_S) -> "RabbitMQ":
        if self.running:
            raise RuntimeError("already running")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([f"{self.bindir}/rabbitmq-server"], env=self.env(), cwd=self.workdir,
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)  # its own process group: close() kills it whole
        end = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"rabbitmq-server exited with {self.proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() > end:
                self.kill()
                raise TimeoutError(f"RabbitMQ's MQTT listener not ready after {timeout}s:\n{self.log_tail()}")
            if mqtt_connects(self.host, self.port, self.probe_user, timeout=2.0):
                return self
            time.sleep(0.25)  # poll interval; the node needs ~20 s

    def ctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """rabbitmqctl against this node (same HOME, hence the same cookie; same epmd)."""
        return subprocess.run([f"{self.bindir}/rabbitmqctl", "-n", self.node, *args], env=self.env(),
                              capture_output=True, text=True, timeout=timeout)

    def add_users(self, users: Mapping[str, str], worker_user: str = WORKER_USER) -> None:
        """Add (or update) accounts with the protocol's rights on the running node: one rabbitmqctl call."""
        path = self.workdir / f"more-{os.urandom(3).hex()}.json"
        path.write_text(json.dumps(definitions(users, worker_user)), encoding="utf-8")
        r = self.ctl("import_definitions", str(path))
        if r.returncode != 0:
            raise RuntimeError(f"rabbitmqctl import_definitions failed: {r.stdout}{r.stderr}")
        # The import is asynchronous ("can take some time"): wait until the last account can log in.
        user = list(users)[-1] if users else None
        end = time.monotonic() + 30  # an import of a few accounts takes milliseconds; 30 s for a loaded CI
        while user is not None and not mqtt_connects(self.host, self.port, (user, users[user]), timeout=2.0):
            if time.monotonic() > end:
                raise RuntimeError(f"the accounts imported into RabbitMQ cannot log in:\n{self.log_tail()}")
            time.sleep(0.05)  # poll interval

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        if not self.running:
            return self.proc.returncode if self.proc else None
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            return self.proc.wait(timeout)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            return self.kill()

    def kill(self) -> int | None:
        """SIGKILL the node's whole process group (the shell script, beam, its helpers)."""
        if self.proc is None:
            return None
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return self.proc.wait()

    def _stop_epmd(self) -> None:
        """The private epmd daemonises (it outlives the node): find it by its port and kill it by PID."""
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if cmd and cmd[0].endswith(b"epmd") and f"ERL_EPMD_PORT={self.epmd_port}".encode() in env:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def close(self) -> None:
        """Stop the node and its epmd; remove the directory."""
        self.stop()
        self._stop_epmd()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "RabbitMQ":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def start_rabbitmq(users: Mapping[str, str] | Iterable[tuple[str, str]], *, port: int | None = None,
                   host: str = "127.0.0.1", worker_user: str = WORKER_USER,
                   timeout: float = START_TIMEOUT_S) -> RabbitMQ:
    """Lay out a temporary directory, start a node (MQTT on host:port, a free port if None) and return it."""
    bindir = find_rabbitmq()
    if bindir is None:
        raise FileNotFoundError("rabbitmq-server not found in /usr/lib/rabbitmq/bin (Debian: apt-get install "
                                "rabbitmq-server)")
    users = dict(users)
    defs = definitions(users, worker_user)  # ValueError before anything starts
    workdir = Path(tempfile.mkdtemp(prefix="im-rabbitmq-"))
    try:
        for d in ("home", "mnesia", "log"):
            (workdir / d).mkdir()
        (workdir / "rabbitmq-env.conf").write_text("", encoding="utf-8")  # the system's sets a node name
        shutil.copyfile(CONFIG_DIR / "enabled_plugins", workdir / "enabled_plugins")
        (workdir / "definitions.json").write_text(json.dumps(defs), encoding="utf-8")
        chosen = port or free_port(host)
        base = (CONFIG_DIR / "rabbitmq.conf").read_text(encoding="utf-8")
        (workdir / "rabbitmq.conf").write_text(
            render_config(base, host=host, port=chosen, definitions_path=workdir / "definitions.json"),
            encoding="utf-8")
        broker = RabbitMQ(host, chosen, workdir, bindir, next(iter(users.items()), None))
        try:
            return broker.start(timeout)
        except BaseException:
            broker.kill()
            broker._stop_epmd()
            raise
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise


def _parse_user(text: str) -> tuple[str, str]:
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise argparse.ArgumentTypeError(f"expected USER:PASSWORD, got {text!r}")
    return user, password


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a private RabbitMQ node with rabbitmq_mqtt and "
                                     "broker_config/rabbitmq/ on free ports, until Ctrl-C")
    parser.add_argument("--user", action="append", type=_parse_user, default=[], metavar="USER:PASSWORD",
                        help="an account (repeat); include the worker's, im-worker:SECRET")
    parser.add_argument("--port", type=int, help="the MQTT port (default: a free one)")
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    if not args.user:
        parser.error("give at least one --user USER:PASSWORD")
    try:
        broker = start_rabbitmq(args.user, port=args.port, host=args.host)
    except (FileNotFoundError, RuntimeError, TimeoutError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return run_until_stopped(broker, f"RabbitMQ node {broker.node}: MQTT on {broker.host}:{broker.port} "
                                     f"(pid {broker.proc.pid}); files in {broker.workdir}", "rabbitmq-server")


if __name__ == "__main__":
    raise SystemExit(main())
