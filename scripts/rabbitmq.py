"""Start a private RabbitMQ node (rabbitmq_mqtt) with broker_config/rabbitmq/, for tests and manual use.

    from scripts.rabbitmq import start_rabbitmq
    broker = start_rabbitmq({"alice": "pw", "im-worker": "secret"})   # about 20 s
    ... broker.host, broker.port (MQTT) ...
    broker.add_users({"carol": "pw"})   # more accounts on the running node (one rabbitmqctl call)
    broker.close()                      # stop the node and its epmd, remove the temporary directory

    from scripts.rabbitmq import start_rabbitmq_cluster
    nodes = start_rabbitmq_cluster({"im-worker": "secret", "alice": "pw"})   # 3 nodes, 30-40 s
    nodes.urls("im-worker")             # mqtt://im-worker@127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3
    nodes[0].kill(); nodes[0].start()   # SIGKILL a node, bring it back (same name and data; 12-16 s)
    nodes.close()                       # stop every node and the epmd, remove the temporary directory

or from a shell (Ctrl-C stops it):

    python -m scripts.rabbitmq --user alice:pw --user bob:pw --user im-worker:secret [--port 18830]

The node runs from the binaries in /usr/lib/rabbitmq/bin/ directly (the /usr/sbin wrappers switch to the
rabbitmq user and its cookie), with a private HOME (its Erlang cookie), epmd port, node name, distribution
port, mnesia and log directories (../shared/BROKERS.md), so it never meets the machine's own RabbitMQ.
broker_config/rabbitmq/rabbitmq.conf is the base (its MQTT listener moved to the chosen port); accounts,
vhost rights and topic permissions (the same regular expressions as broker_config/rabbitmq/setup.sh) are
loaded at boot from a definitions file. Readiness: an MQTT CONNECT is accepted.
A cluster's nodes share one HOME (one cookie, written before they start) and one private epmd, and find
each other by classic_config peer discovery (the commented cluster block of rabbitmq.conf, turned on).
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
    from scripts._launcher import BrokerProcess, parse_user
except ImportError:  # run as a file: python scripts/X.py
    from _foreground import run_until_stopped  # type: ignore[no-redef]
    from _launcher import BrokerProcess, parse_user  # type: ignore[no-redef]

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "broker_config" / "rabbitmq"
BIN_DIRS = ("/usr/lib/rabbitmq/bin", "/usr/local/lib/rabbitmq/bin", "/opt/homebrew/sbin")
WORKER_USER = "im-worker"
# One node starts in 18-26 s here (BROKERS.md); a loaded CI machine gets room to spare.
START_TIMEOUT_S = 120.0
# Three nodes started together are ready in 28-40 s here, one start in 3.5 took ~120 s (BROKERS.md): room for
# a stalled node's restart on a loaded CI machine.
CLUSTER_START_TIMEOUT_S = 240.0
# A node not ready this long after its launch is restarted once: it stalled (twice the usual 28-40 s).
NODE_STALL_S = 80.0
# A started node whose MQTT listener still refuses CONNECTs this long is stalled (its peers took 1-3 s more).
BOOT_STALL_S = 25.0
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


def render_config(base: str, *, host: str, port: int, definitions_path: Path,
                  cluster_nodes: list[str] | None = None) -> str:
    """The base config with its MQTT listener on host:port and the definitions file to load; with
    ``cluster_nodes`` (every member's node name), the commented cluster block's settings, active."""
    lines = []
    for line in base.splitlines():
        if line.startswith("mqtt.listeners.tcp.default"):
            line = f"mqtt.listeners.tcp.default = {host}:{port}"
        lines.append(line)
    lines.append(f"load_definitions = {definitions_path}")
    if cluster_nodes:
        lines.append("# A cluster of private nodes (scripts/rabbitmq.py start_rabbitmq_cluster): the base's "
                     "commented cluster settings.")
        for line in base.splitlines():
            m = re.match(r"^# (cluster_[a-z_.]+ = \S+)$", line)
            if m and not m.group(1).startswith("cluster_formation.classic_config.nodes."):
                lines.append(m.group(1))
        lines += [f"cluster_formation.classic_config.nodes.{i} = {n}" for i, n in enumerate(cluster_nodes, 1)]
    return "\n".join(lines) + "\n"


class RabbitMQ(BrokerProcess):
    """A private RabbitMQ node: MQTT on host:port; everything it writes under workdir. Signals go to the node's
    process group (the shell script, beam, its helpers)."""

    START_TIMEOUT_S, STOP_TIMEOUT_S = START_TIMEOUT_S, STOP_TIMEOUT_S

    def __init__(self, host: str, port: int, workdir: Path, bindir: str, probe_user: tuple[str, str] | None,
                 *, node: str | None = None, epmd_port: int | None = None, home: Path | None = None,
                 cluster: "RabbitMQCluster | None" = None):
        """``node``, ``epmd_port``, ``home``: a cluster member's, shared with its peers (one epmd, one cookie)."""
        self.host, self.port, self.workdir, self.bindir = host, port, workdir, bindir
        self.probe_user = probe_user
        self.node = node or f"im{os.urandom(3).hex()}@localhost"
        self.epmd_port, self.dist_port = epmd_port or free_port(), free_port()
        self.home = home or workdir / "home"
        self.cluster = cluster
        # A single node whose MQTT port was chosen free (not given): launched again on new ports if it exits over
        # a taken one (a CI run lost that race: "listen_error ... eaddrinuse", the shared node's tests errored).
        self.port_movable = False
        self.log_path = workdir / "node.log"
        self.proc: subprocess.Popen | None = None
        self.closed = False

    def env(self) -> dict:
        w = self.workdir
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update(HOME=str(self.home), ERL_EPMD_PORT=str(self.epmd_port), ERL_EPMD_ADDRESS="127.0.0.1",
                   RABBITMQ_CONF_ENV_FILE=str(w / "rabbitmq-env.conf"), RABBITMQ_NODENAME=self.node,
                   RABBITMQ_NODE_IP_ADDRESS="127.0.0.1", RABBITMQ_NODE_PORT=str(free_port()),
                   RABBITMQ_DIST_PORT=str(self.dist_port), RABBITMQ_MNESIA_BASE=str(w / "mnesia"),
                   RABBITMQ_LOG_BASE=str(w / "log"), RABBITMQ_PID_FILE=str(w / "node.pid"),
                   RABBITMQ_ENABLED_PLUGINS_FILE=str(w / "enabled_plugins"),
                   RABBITMQ_CONFIG_FILE=str(w / "rabbitmq.conf"), RABBITMQ_LOGS="-")
        return env

    def start(self, timeout: float = START_TIMEOUT_S) -> "RabbitMQ":
        """Run the node (again, after kill() or stop(): same name, same data); return once MQTT takes a CONNECT."""
        self.launch()
        return self.wait_ready(timeout)

    def launch(self) -> None:
        """Run rabbitmq-server without waiting (start() waits)."""
        self.launch_process([f"{self.bindir}/rabbitmq-server"], env=self.env(),
                            start_new_session=True)  # its own process group: close() kills it whole
        self.launched_at = time.monotonic()
        self._log_from = self.log_path.stat().st_size if self.log_path.exists() else 0
        self.booted_at: float | None = None  # when this launch's log first said the node had started

    def stalled(self, stall_s: float) -> bool:
        """Not ready ``stall_s`` after its launch, or BOOT_STALL_S after its log said it had started (a node whose
        MQTT plugin waits for a client id tracker leader that never comes: BROKERS.md)."""
        now = time.monotonic()
        if self.booted_at is None:
            try:
                with open(self.log_path, "rb") as f:
                    f.seek(self._log_from)
                    if b"Server startup complete" in f.read():
                        self.booted_at = now
            except OSError:
                pass
        booted_long_ago = self.booted_at is not None and now - self.booted_at > BOOT_STALL_S
        return now - self.launched_at > stall_s or booted_long_ago

    def ready(self) -> bool:
        """Does the node's MQTT listener accept a CONNECT of the probe user now? (Raises if the node exited.)"""
        if self.proc.poll() is not None:
            raise RuntimeError(f"rabbitmq-server {self.node} exited with {self.proc.returncode}:\n{self.log_tail()}")
        return mqtt_connects(self.host, self.port, self.probe_user, timeout=2.0)

    def relaunch_elsewhere(self, mqtt_port: bool) -> None:
        """Launch again on a new distribution port (and a new MQTT port if ``mqtt_port``, rewriting the config):
        a free port may be taken by another process between free_port() and the node's bind."""
        self.dist_port = free_port()
        if mqtt_port:
            self.port = free_port(self.host)
            conf = self.workdir / "rabbitmq.conf"
            conf.write_text(re.sub(r"(?m)^mqtt\.listeners\.tcp\.default = .*$",
                                   f"mqtt.listeners.tcp.default = {self.host}:{self.port}",
                                   conf.read_text(encoding="utf-8")), encoding="utf-8")
        self.launch()

    def port_taken(self) -> bool:
        """Did this node exit because a port it needed was in use?"""
        tail = self.log_tail(200)
        return "dist_port_already_used" in tail or "eaddrinuse" in tail.lower()

    def _ready_or_relaunched(self, retried: set) -> bool:
        """ready(), except that a node which exited over a taken port is launched again (once per cause):
        its distribution port may move; its MQTT port only before the cluster is handed out."""
        try:
            return self.ready()
        except RuntimeError:
            if "port" in retried or not self.port_taken():
                raise
            retried.add("port")
            self.relaunch_elsewhere(mqtt_port=self.port_movable if self.cluster is None else not self.cluster.handed_out)
            return False

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> "RabbitMQ":
        """Until the MQTT listener takes a CONNECT. A cluster member that stalls (:meth:`stalled`) is SIGKILLed
        and launched again, once; one that exits over a taken port likewise, on another (a single node too when
        its MQTT port was chosen free: ``port_movable``)."""
        end = time.monotonic() + timeout
        retried = self.cluster is None
        relaunched: set = set() if self.cluster is not None or self.port_movable else {"port"}
        while not self._ready_or_relaunched(relaunched):
            if time.monotonic() > end:
                self.kill()
                raise TimeoutError(f"RabbitMQ's MQTT listener not ready after {timeout}s:\n{self.log_tail()}")
            if not retried and self.stalled(NODE_STALL_S):
                retried = True
                self.kill()
                self.cluster.restarted.append(self.node)
                self.launch()
            time.sleep(0.25)  # poll interval; the node needs ~20 s
        return self

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

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

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
        stop_epmd(self.epmd_port)

    def close(self) -> None:
        """Stop the node and its epmd; remove the directory. A cluster member stops its node; the last member
        closed stops the cluster's epmd and removes the cluster's directory."""
        self.stop()
        self.closed = True
        if self.cluster is not None:
            if all(n.closed for n in self.cluster):
                self.cluster.close()
            return
        self._stop_epmd()
        shutil.rmtree(self.workdir, ignore_errors=True)


def stop_epmd(port: int) -> None:
    """A private epmd daemonises (it outlives its nodes): find it by its port and kill it by PID."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmd and cmd[0].endswith(b"epmd") and f"ERL_EPMD_PORT={port}".encode() in env:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass


def _layout(workdir: Path, defs: dict, *, host: str, port: int, cluster_nodes: list[str] | None = None) -> None:
    """A node's files in workdir: data and log directories, an empty env file, plugins, definitions, config."""
    for d in ("mnesia", "log"):
        (workdir / d).mkdir(parents=True)
    (workdir / "rabbitmq-env.conf").write_text("", encoding="utf-8")  # the system's sets a node name
    shutil.copyfile(CONFIG_DIR / "enabled_plugins", workdir / "enabled_plugins")
    (workdir / "definitions.json").write_text(json.dumps(defs), encoding="utf-8")
    base = (CONFIG_DIR / "rabbitmq.conf").read_text(encoding="utf-8")
    (workdir / "rabbitmq.conf").write_text(
        render_config(base, host=host, port=port, definitions_path=workdir / "definitions.json",
                      cluster_nodes=cluster_nodes), encoding="utf-8")


def _prepare(users: Mapping[str, str] | Iterable[tuple[str, str]], worker_user: str) -> tuple[str, dict, dict]:
    """(bin directory, accounts, their definitions), or FileNotFoundError / ValueError before anything starts."""
    bindir = find_rabbitmq()
    if bindir is None:
        raise FileNotFoundError("rabbitmq-server not found in /usr/lib/rabbitmq/bin (Debian: apt-get install "
                                "rabbitmq-server)")
    users = dict(users)
    return bindir, users, definitions(users, worker_user)


def start_rabbitmq(users: Mapping[str, str] | Iterable[tuple[str, str]], *, port: int | None = None,
                   host: str = "127.0.0.1", worker_user: str = WORKER_USER,
                   timeout: float = START_TIMEOUT_S) -> RabbitMQ:
    """Lay out a temporary directory, start a node (MQTT on host:port, a free port if None) and return it."""
    bindir, users, defs = _prepare(users, worker_user)
    workdir = Path(tempfile.mkdtemp(prefix="im-rabbitmq-"))
    try:
        (workdir / "home").mkdir()
        chosen = port or free_port(host)
        _layout(workdir, defs, host=host, port=chosen)
        broker = RabbitMQ(host, chosen, workdir, bindir, next(iter(users.items()), None))
        broker.port_movable = port is None
        try:
            return broker.start(timeout)
        except BaseException:
            broker.kill()
            broker._stop_epmd()
            raise
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise


class RabbitMQCluster(list):
    """The members of a private RabbitMQ cluster (:class:`RabbitMQ` nodes: ``kill()``, ``start()`` to lose and
    bring back one, same name and data), sharing one HOME (one Erlang cookie) and one epmd, all under
    ``workdir``. ``close()`` stops every node and the epmd and removes the directory (closing each member
    does the same once the last is closed). ``start_s``: seconds each node took to be ready at the start."""

    def __init__(self, workdir: Path, epmd_port: int):
        super().__init__()
        self.workdir, self.epmd_port = workdir, epmd_port
        self.start_s: list[float] = []
        self.handed_out = False  # the members' MQTT ports are known to callers: they never move after this
        self.restarted: list[str] = []  # nodes restarted once at the start because they stalled

    __hash__ = object.__hash__  # one cluster is one object (its members refer to it)

    def __eq__(self, other) -> bool:
        return self is other

    def urls(self, user: str | None = None) -> str:
        """Every member's MQTT address as one --broker list: mqtt://[user@]h:p1,h:p2,h:p3."""
        first = f"mqtt://{user + '@' if user else ''}"
        return first + ",".join(f"{n.host}:{n.port}" for n in self)

    def running_nodes(self, via: RabbitMQ | None = None) -> set[str]:
        """The node names ``via`` (default: the first running member) sees running in its cluster."""
        via = via or next(n for n in self if n.running)
        r = via.ctl("cluster_status", "--formatter", "json")
        if r.returncode != 0:
            raise RuntimeError(f"rabbitmqctl cluster_status failed: {r.stdout}{r.stderr}")
        return set(json.loads(r.stdout)["running_nodes"])

    def close(self) -> None:
        for n in self:
            if not n.closed:
                n.stop()
                n.closed = True
        stop_epmd(self.epmd_port)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "RabbitMQCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def start_rabbitmq_cluster(users: Mapping[str, str] | Iterable[tuple[str, str]], *, nodes: int = 3,
                           host: str = "127.0.0.1", worker_user: str = WORKER_USER,
                           timeout: float = CLUSTER_START_TIMEOUT_S,
                           stall_s: float = NODE_STALL_S) -> RabbitMQCluster:
    """``nodes`` RabbitMQ nodes formed into one cluster by classic_config peer discovery (each its own MQTT
    port, distribution port, data and log directories; one HOME and cookie, one private epmd), started
    together. Returns once each node's MQTT listener accepts a CONNECT of the first user and every node is
    running in one cluster (30-40 s here). A node not ready ``stall_s`` after its launch, or BOOT_STALL_S after
    its log says it started, is SIGKILLed and started again, once (a node sometimes stalls in the MQTT plugin's
    client id tracker: "client ID registration timed out"; a restart lets it join). Raises TimeoutError after
    ``timeout`` seconds in all, leaving nothing behind. Persistent MQTT sessions are quorum queues
    (broker_config/rabbitmq/rabbitmq.conf), replicated over the members."""
    bindir, users, defs = _prepare(users, worker_user)
    probe = next(iter(users.items()), None)
    workdir = Path(tempfile.mkdtemp(prefix="im-rabbitmq-cluster-"))
    cluster = RabbitMQCluster(workdir, free_port())
    try:
        home = workdir / "home"
        home.mkdir()
        # The cookie written before any node starts: nodes started together would each write their own.
        cookie = home / ".erlang.cookie"
        cookie.write_text(base64.b32encode(os.urandom(15)).decode(), encoding="ascii")
        os.chmod(cookie, 0o400)
        tag = os.urandom(2).hex()
        names = [f"im{tag}n{i}@localhost" for i in range(1, nodes + 1)]
        for i, name in enumerate(names, 1):
            port = free_port(host)
            _layout(workdir / f"n{i}", defs, host=host, port=port, cluster_nodes=names)
            cluster.append(RabbitMQ(host, port, workdir / f"n{i}", bindir, probe, node=name,
                                    epmd_port=cluster.epmd_port, home=home, cluster=cluster))
        t0 = time.monotonic()
        for node in cluster:  # all at once; the first to take peer discovery's lock forms the cluster
            node.launch()
        ready: dict[str, float] = {}
        relaunched: dict[str, set] = {node.node: set() for node in cluster}
        end = t0 + timeout
        while len(ready) < len(cluster):
            for node in cluster:
                if node.node in ready:
                    continue
                if node._ready_or_relaunched(relaunched[node.node]):
                    ready[node.node] = time.monotonic() - t0
                elif node.node not in cluster.restarted and node.stalled(stall_s):
                    node.kill()
                    cluster.restarted.append(node.node)
                    node.launch()
            if time.monotonic() > end:
                late = [n for n in cluster if n.node not in ready]
                raise TimeoutError(f"RabbitMQ cluster not ready after {timeout:.0f}s: "
                                   + "; ".join(f"{n.node}:\n{n.log_tail(15)}" for n in late))
            time.sleep(0.25)  # poll interval; the nodes need ~30 s
        cluster.start_s = [round(ready[n.node], 1) for n in cluster]
        while (seen := cluster.running_nodes(cluster[0])) != set(names):
            if time.monotonic() > end:
                raise RuntimeError(f"the RabbitMQ nodes did not form one cluster: {cluster[0].node} sees "
                                   f"{sorted(seen)}")
            time.sleep(0.5)  # poll interval; a joining node shows up within a second or two
        cluster.handed_out = True
        return cluster
    except BaseException:
        for node in cluster:
            node.kill()
        cluster.close()
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a private RabbitMQ node with rabbitmq_mqtt and "
                                     "broker_config/rabbitmq/ on free ports, until Ctrl-C")
    parser.add_argument("--user", action="append", type=parse_user, default=[], metavar="USER:PASSWORD",
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
