"""Start a private NATS server (MQTT on JetStream) with broker_config/nats/, for tests and manual use.

    from scripts.nats import start_nats
    broker = start_nats({"alice": "pw", "im-worker": "secret"})
    ... broker.host, broker.port (MQTT) ...
    broker.kill(); broker.start()   # same ports, same JetStream directory
    broker.close()                  # stop and remove the temporary directory

or from a shell (Ctrl-C stops it):

    python -m scripts.nats --user alice:pw --user bob:pw --user im-worker:secret [--port 18830]
    python -m scripts.nats --print-users im-worker:secret alice:pw   # a users.conf for broker_config/nats/

broker_config/nats/nats.conf is the base: its server_name, listen, http, jetstream store_dir and mqtt listen
lines are moved to free ports and a fresh temporary directory; ``users.conf`` there is written from
``users`` with the protocol's rights (:func:`users_config`). Readiness: GET /healthz answers 200, then an
MQTT CONNECT is accepted. Needs the standard library, paho-mqtt (for the readiness check) and nats-server.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Iterable, Mapping

from scripts.mosquitto import free_port

try:
    from scripts._foreground import run_until_stopped
    from scripts._launcher import BrokerProcess, parse_user
except ImportError:  # run as a file: python scripts/X.py
    from _foreground import run_until_stopped  # type: ignore[no-redef]
    from _launcher import BrokerProcess, parse_user  # type: ignore[no-redef]

REPO_ROOT = Path(__file__).resolve().parents[1]
BASE_CONFIG = REPO_ROOT / "broker_config" / "nats" / "nats.conf"
WORKER_USER = "im-worker"
_EXTRA_PATH = ("/usr/sbin", "/usr/local/sbin", "/opt/homebrew/bin", "/usr/local/bin")
# A single server with JetStream is ready in well under a second here; 30 s covers a slow CI disk.
START_TIMEOUT_S = 30.0
# NATS stops in milliseconds on SIGTERM (lame duck is SIGUSR2, not used); then SIGKILL.
STOP_TIMEOUT_S = 10.0
# A NATS username and uid: the protocol's uid alphabet minus '.', which NATS reads as a subject separator.
NATS_UID_RE = re.compile(r"^[A-Za-z0-9_-]{1,50}$")

# Subjects, from docs/PROTOCOL.md section 2 ('/' is '.', '+' is '*'). $MQTT.sub.> is where NATS delivers the
# messages of a QoS 1 subscription (a JetStream consumer's delivery subject): every MQTT user needs to
# subscribe there, or each QoS 1 SUBSCRIBE fails. MQTT clients themselves cannot subscribe to $MQTT/...
# topics (NATS refuses them), so it opens nothing to a user.
# im.status.*: the worker publishes each device-aware user's derived status (docs/PROTOCOL.md, Devices).
WORKER_PUBLISH = ["im.u.*.inbox", "im.u.*.reply", "im.u.*.d.*.inbox", "im.u.*.d.*.reply", "im.status.*",
                  "im.worker.*", "im.worker.probe.*"]
WORKER_SUBSCRIBE = ["im.u.*.send", "im.u.*.ack", "im.u.*.req", "im.u.*.d.*.send", "im.u.*.d.*.ack",
                    "im.u.*.d.*.req", "im.u.*.*.send", "im.u.*.*.ack", "im.u.*.*.req", "im.status.*",
                    "im.status.*.*", "im.worker.*", "im.worker.probe.*", "$MQTT.sub.>"]


def user_permissions(user: str, worker_user: str = WORKER_USER) -> dict:
    """The NATS permissions of one account: the worker's, or a user's own topics plus everyone's status."""
    if user == worker_user:
        return {"publish": {"allow": WORKER_PUBLISH}, "subscribe": {"allow": WORKER_SUBSCRIBE}}
    if not NATS_UID_RE.match(user):
        raise ValueError(f"user {user!r}: a uid on NATS is 1-50 of A-Z a-z 0-9 _ - (no '.': NATS reads it as "
                         "a subject separator; docs/PROTOCOL.md)")
    own = f"im.u.{user}"
    return {"publish": {"allow": [f"{own}.send", f"{own}.ack", f"{own}.req", f"{own}.d.*.send", f"{own}.d.*.ack",
                                  f"{own}.d.*.req", f"im.status.{user}", f"im.status.{user}.*"]},
            "subscribe": {"allow": [f"{own}.inbox", f"{own}.reply", f"{own}.d.*.inbox", f"{own}.d.*.reply",
                                    "im.status.*", "im.status.*.*", "$MQTT.sub.>"]}}


def users_config(users: Mapping[str, str], worker_user: str = WORKER_USER,
                 permissions: Mapping[str, dict] | None = None) -> str:
    """users.conf text (included in nats.conf's authorization block): one entry per account.
    ``permissions``: accounts whose permissions are given instead of the protocol's (tests)."""
    permissions = permissions or {}
    lines = ["# Written by scripts/nats.py: one entry per account, with the protocol's rights (docs/PROTOCOL.md).",
             "users = ["]
    for user, password in users.items():
        perms = permissions[user] if user in permissions else user_permissions(user, worker_user)
        entry = {"user": user, "password": password, "permissions": perms}
        lines.append("  " + json.dumps(entry))  # NATS' config syntax accepts JSON
    lines.append("]")
    return "\n".join(lines) + "\n"


def find_nats() -> str | None:
    return shutil.which("nats-server", path=os.pathsep.join([os.environ.get("PATH", ""), *_EXTRA_PATH]))


def render_config(base: str, *, host: str, port: int, client_port: int, http_port: int, workdir: Path,
                  server_name: str = "im-nats-test", cluster: tuple[int, list[int]] | None = None) -> str:
    """The base config moved to these ports and workdir (line by line: the keys it sets are unique per block)."""
    out, block = [], []
    for line in base.splitlines():
        s = line.strip()
        if s.endswith("{"):
            block.append(s.split()[0])
        elif s == "}" and block:
            block.pop()
        key = s.split(":")[0].strip() if ":" in s and not s.startswith("#") else ""
        if key == "server_name" and not block:
            line = f"server_name: {server_name}"
        elif key == "listen" and block == ["mqtt"]:
            line = f"  listen: {host}:{port}"
        elif key == "listen" and not block:
            line = f"listen: {host}:{client_port}"
        elif key == "http" and not block:
            line = f"http: {host}:{http_port}"
        elif key == "store_dir" and block == ["jetstream"]:
            line = f'  store_dir: "{workdir / "jetstream"}"'
        out.append(line)
    if cluster is not None:  # (this server's route port, every server's route port)
        own, routes = cluster
        out += ["# A cluster of private servers (scripts/nats.py start_nats_cluster).", "cluster {",
                "  name: im-test", f"  listen: {host}:{own}",
                "  routes: [" + ", ".join(f"nats-route://{host}:{r}" for r in routes) + "]", "}"]
    return "\n".join(out) + "\n"


class Nats(BrokerProcess):
    """A nats-server process: MQTT on host:port, its monitor on http_port, JetStream and log in workdir.
    ``kill()``: SIGKILL, a crash (JetStream recovers its files at the next start)."""

    START_TIMEOUT_S, STOP_TIMEOUT_S = START_TIMEOUT_S, STOP_TIMEOUT_S

    def __init__(self, host: str, port: int, http_port: int, workdir: Path, binary: str,
                 probe_user: tuple[str, str] | None):
        self.host, self.port, self.http_port, self.workdir, self.binary = host, port, http_port, workdir, binary
        self.probe_user = probe_user
        self.name = "im-nats-test"  # its server_name (render_config's default; a cluster's are im-nats-N)
        self.users: dict[str, str] = {}
        self.permissions: dict[str, dict] = {}
        self.config_path, self.log_path = workdir / "nats.conf", workdir / "nats.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = START_TIMEOUT_S, wait_healthy: bool = True) -> "Nats":
        """Run the server; return once /healthz says ok and an MQTT CONNECT is accepted. ``wait_healthy=False``:
        once the CONNECT is accepted (a node rejoining a running cluster: its /healthz answers 503 until each of
        its JetStream consumers has caught up, which took over 30 s here after a SIGKILL on a loaded machine)."""
        self.launch_process([self.binary, "-c", str(self.config_path)])
        return self.wait_ready(timeout, wait_healthy)

    def wait_ready(self, timeout: float = START_TIMEOUT_S, wait_healthy: bool = True) -> "Nats":
        """Until GET /healthz answers 200 (unless not ``wait_healthy``) and an MQTT CONNECT is accepted."""
        end = time.monotonic() + timeout
        healthy = not wait_healthy
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nats-server exited with {self.proc.returncode} on start:\n{self.log_tail()}")
            if time.monotonic() > end:
                self.kill()
                raise TimeoutError(f"nats-server not ready after {timeout}s:\n{self.log_tail()}")
            if not healthy:
                try:
                    with urllib.request.urlopen(f"http://{self.host}:{self.http_port}/healthz", timeout=1) as r:
                        healthy = r.status == 200
                except OSError:
                    pass
            if healthy and mqtt_connects(self.host, self.port, self.probe_user):
                return self
            time.sleep(0.05)  # poll interval, not a guess at the start-up time

    def add_users(self, users: Mapping[str, str], worker_user: str = WORKER_USER,
                  permissions: Mapping[str, dict] | None = None) -> None:
        """Add (or update) accounts on the running server: users.conf rewritten, then SIGHUP (a reload).
        ``permissions``: accounts given other permissions than the protocol's (kept until changed again)."""
        self.users.update(users)
        for user in users:
            self.permissions.pop(user, None)
        self.permissions.update(permissions or {})
        text = users_config(self.users, worker_user, self.permissions)
        (self.workdir / "users.conf").write_text(text, encoding="utf-8")
        if self.running:
            before = self.log_path.read_text(errors="replace").count("Reloaded server configuration")
            self.proc.send_signal(signal.SIGHUP)
            end = time.monotonic() + START_TIMEOUT_S
            while self.log_path.read_text(errors="replace").count("Reloaded server configuration") <= before:
                if time.monotonic() > end or not self.running:
                    raise RuntimeError(f"nats-server did not reload its users:\n{self.log_tail()}")
                time.sleep(0.02)  # poll interval; a reload takes milliseconds


def mqtt_connects(host: str, port: int, user: tuple[str, str] | None, timeout: float = 2.0) -> bool:
    """Does an MQTT 3.1.1 CONNECT (clean session) get an accepted CONNACK within ``timeout``?"""
    import paho.mqtt.client as mqtt
    done, ok = threading.Event(), []
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"im-ready-{os.urandom(3).hex()}",
                    protocol=mqtt.MQTTv311)
    if user:
        c.username_pw_set(*user)

    def on_connect(client, userdata, flags, rc, props):
        ok.append(not rc.is_failure)
        done.set()

    c.on_connect = on_connect
    try:
        c.connect(host, port, keepalive=10)
    except OSError:
        return False
    c.loop_start()
    try:
        return done.wait(timeout) and ok[0]
    finally:
        c.disconnect()
        c.loop_stop()


def start_nats(users: Mapping[str, str] | Iterable[tuple[str, str]], *, port: int | None = None,
               host: str = "127.0.0.1", config: Path | str = BASE_CONFIG, worker_user: str = WORKER_USER,
               timeout: float = START_TIMEOUT_S) -> Nats:
    """Lay out a temporary directory, start nats-server (MQTT on host:port, a free port if None), return it.

    Raises FileNotFoundError without the binary, ValueError for a username NATS cannot hold (a '.')."""
    binary = find_nats()
    if binary is None:
        raise FileNotFoundError("nats-server not found (Debian: apt-get install nats-server)")
    users = dict(users)
    text = users_config(users, worker_user)  # ValueError before anything is started
    workdir = Path(tempfile.mkdtemp(prefix="im-nats-"))
    try:
        (workdir / "users.conf").write_text(text, encoding="utf-8")
        os.chmod(workdir / "users.conf", 0o600)
        base = Path(config).read_text(encoding="utf-8")
        probe = next(iter(users.items()), None)
        for attempt in range(3):  # a free port may be taken before nats-server binds it
            mqtt_port = port or free_port(host)
            http_port, client_port = free_port(host), free_port(host)
            (workdir / "nats.conf").write_text(render_config(
                base, host=host, port=mqtt_port, client_port=client_port, http_port=http_port, workdir=workdir),
                encoding="utf-8")
            broker = Nats(host, mqtt_port, http_port, workdir, binary, probe)
            broker.users = dict(users)
            try:
                return broker.start(timeout)
            except RuntimeError:
                if attempt == 2 or "address already in use" not in broker.log_tail():
                    raise
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    raise AssertionError("unreachable")


# A cluster is started again, on new ports, once if it did not come up: its ports are chosen free (free_port)
# and bound only when the servers start, so another process may take one meanwhile (a CI run saw a node's route
# port answered by another test's HTTP server: "Router parser ERROR ... HTTP/1.1 400", the node never ready).
CLUSTER_START_ATTEMPTS = 2


def start_nats_cluster(users: Mapping[str, str], *, nodes: int = 3, host: str = "127.0.0.1",
                       worker_user: str = WORKER_USER, timeout: float = START_TIMEOUT_S) -> list[Nats]:
    """``nodes`` servers routed into one cluster (JetStream replicates the MQTT streams over them), each with
    its own ports and directory; returns once every one is healthy and takes an MQTT CONNECT (~3 s here).
    ``kill()`` / ``start()`` one to lose and bring back a node; ``close()`` each at the end. Raises the last
    attempt's TimeoutError or RuntimeError (with a server's log tail) if no attempt came up."""
    binary = find_nats()
    if binary is None:
        raise FileNotFoundError("nats-server not found (Debian: apt-get install nats-server)")
    for _ in range(CLUSTER_START_ATTEMPTS - 1):
        try:
            return _start_cluster_once(binary, dict(users), nodes, host, worker_user, timeout)
        except (TimeoutError, RuntimeError):
            pass  # every server of that attempt is closed: again, on new ports
    return _start_cluster_once(binary, dict(users), nodes, host, worker_user, timeout)


def _start_cluster_once(binary: str, users: dict, nodes: int, host: str, worker_user: str,
                        timeout: float) -> list[Nats]:
    text = users_config(users, worker_user)
    base = BASE_CONFIG.read_text(encoding="utf-8")
    routes = [free_port(host) for _ in range(nodes)]
    servers: list[Nats] = []
    try:
        for i in range(nodes):
            workdir = Path(tempfile.mkdtemp(prefix=f"im-nats-c{i}-"))
            (workdir / "users.conf").write_text(text, encoding="utf-8")
            mqtt_port, http_port, client_port = free_port(host), free_port(host), free_port(host)
            (workdir / "nats.conf").write_text(render_config(
                base, host=host, port=mqtt_port, client_port=client_port, http_port=http_port, workdir=workdir,
                server_name=f"im-nats-{i + 1}", cluster=(routes[i], routes)), encoding="utf-8")
            server = Nats(host, mqtt_port, http_port, workdir, binary, next(iter(users.items()), None))
            server.name = f"im-nats-{i + 1}"
            server.users = dict(users)
            servers.append(server)
        for server in servers:  # all at once: JetStream needs a quorum of them before any is ready
            server.launch_process([binary, "-c", str(server.config_path)])
        for server in servers:
            server.wait_ready(timeout)
        return servers
    except BaseException:
        for server in servers:
            server.close()
        raise


def meta_leader(servers: list[Nats], timeout: float = START_TIMEOUT_S) -> Nats:
    """The server of ``servers`` that leads JetStream's meta group (the first running one's /jsz says which),
    waiting up to ``timeout`` s for a leader. Its death stalls JetStream longest: measured here (NATS 2.9.10,
    3 nodes), a QoS 1 SUBSCRIBE on a live node was refused for 34 s after the meta leader's SIGKILL, and for
    under 2 s after a follower's (README.md, the broker table's "cluster failover")."""
    by_name = {s.name: s for s in servers}
    end = time.monotonic() + timeout
    while True:
        for s in servers:
            if not s.running:
                continue
            try:
                with urllib.request.urlopen(f"http://{s.host}:{s.http_port}/jsz", timeout=1) as r:
                    leader = (json.load(r).get("meta_cluster") or {}).get("leader")
            except (OSError, ValueError):
                continue
            if leader in by_name:
                return by_name[leader]
        if time.monotonic() > end:
            raise TimeoutError(f"no JetStream meta leader among {sorted(by_name)} after {timeout}s")
        time.sleep(0.1)  # poll interval; an election takes a few seconds at most


def leader_where(servers: list[Nats], index: int) -> list[Nats]:
    """``servers`` reordered so that JetStream's meta leader is at ``index`` (0: first, -1: last), the others in
    their order: a test that kills ``servers[0]`` chooses whether it kills the meta leader or a follower."""
    leader = meta_leader(servers)
    rest = [s for s in servers if s is not leader]
    rest.insert(index % len(servers), leader)
    return rest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run nats-server with broker_config/nats/ (MQTT + JetStream) on "
                                     "free ports and a temporary directory, until Ctrl-C")
    parser.add_argument("--user", action="append", type=parse_user, default=[], metavar="USER:PASSWORD",
                        help="an account (repeat); include the worker's, im-worker:SECRET")
    parser.add_argument("--port", type=int, help="the MQTT port (default: a free one)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--print-users", nargs="+", type=parse_user, metavar="USER:PASSWORD",
                        help="print a users.conf for these accounts and exit")
    args = parser.parse_args(argv)
    try:
        if args.print_users:
            print(users_config(dict(args.print_users)), end="")
            return 0
        if not args.user:
            parser.error("give at least one --user USER:PASSWORD")
        broker = start_nats(args.user, port=args.port, host=args.host)
    except (FileNotFoundError, RuntimeError, TimeoutError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return run_until_stopped(broker, f"nats-server: MQTT on {broker.host}:{broker.port}, monitor on "
                                     f"{broker.http_port} (pid {broker.proc.pid}); files in {broker.workdir}",
                             "nats-server")


if __name__ == "__main__":
    raise SystemExit(main())
