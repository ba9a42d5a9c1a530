"""Real services for the tests: Mosquitto (started with broker_config/) and the worker as a subprocess.

A missing service skips its tests with a visible reason, except when
IM_REQUIRE_SERVICES=1 (set by .ci/run): then it is a failure, never a silent skip.
"""

from __future__ import annotations

import contextlib
import os

import pytest

from conftest import BackendProcess

WORKER_USER, WORKER_PASSWORD = "im-worker", "worker-secret"


def require(available: bool, reason: str) -> None:
    if available:
        return
    if os.environ.get("IM_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{reason} (IM_REQUIRE_SERVICES=1: required here)")
    pytest.skip(reason)


def mosquitto(users: dict[str, str], extra_config: tuple[str, ...] = (), ws_port: int | None = None):
    """Start a Mosquitto with the project's config and these users (plus the worker's account);
    ``extra_config`` lines replace the config's own (e.g. "max_queued_messages 1000"); ``ws_port``: also an
    MQTT-over-WebSocket listener (0: a free port, then ``broker.ws_port``), for the web client."""
    from scripts.mosquitto import find_mosquitto, start_mosquitto
    require(find_mosquitto() is not None, "mosquitto binary not installed")
    return start_mosquitto({**users, WORKER_USER: WORKER_PASSWORD}, extra_config=extra_config, ws_port=ws_port)


# The brokers the worker is tested beside (tests parametrised over them: chat, offline, restart, ACL matrix).
BROKERS = ("mosquitto", "nats", "rabbitmq")
_NODES: dict = {}  # kind -> the one node of that broker this test session shares


def broker_available(kind: str) -> bool:
    if kind == "mosquitto":
        from scripts.mosquitto import find_mosquitto, find_mosquitto_passwd
        return find_mosquitto() is not None and find_mosquitto_passwd() is not None
    if kind == "nats":
        from scripts.nats import find_nats
        return find_nats() is not None
    from scripts.rabbitmq import find_rabbitmq
    return find_rabbitmq() is not None


def shared_broker(kind: str):
    """The test session's one node of ``kind`` (started at first use, stopped at exit), with the worker's
    account. RabbitMQ takes ~15 s to start, so tests share it: each test adds its own uniquely named users
    (``node.add_users``) and never meets another test's traffic. Mosquitto gets the same treatment."""
    require(broker_available(kind), f"{kind} not installed (Debian: apt-get install "
                                    f"{ {'nats': 'nats-server', 'rabbitmq': 'rabbitmq-server'}.get(kind, kind)})")
    node = _NODES.get(kind)
    if node is not None and getattr(node, "running", True):
        return node
    users = {WORKER_USER: WORKER_PASSWORD}
    if kind == "mosquitto":
        from scripts.mosquitto import start_mosquitto
        node = start_mosquitto(users)
        node.add_users = lambda more: [node.add_user(u, pw) for u, pw in more.items()]
    elif kind == "nats":
        from scripts.nats import start_nats
        node = start_nats(users)
    else:
        from scripts.rabbitmq import start_rabbitmq
        node = start_rabbitmq(users)
    if not _NODES:
        import atexit
        atexit.register(lambda: [n.close() for n in _NODES.values()])
    _NODES[kind] = node
    return node


def unique_users(*names: str) -> dict[str, str]:
    """name -> a uid of that name unique to this test (no '.': it works on every broker), e.g. alice-3f9a1c."""
    tag = os.urandom(3).hex()
    return {n: f"{n}-{tag}" for n in names}


# The NATS failover tests (the worker's in test_brokers.py, the client's in test_client_failover.py) are opt-in,
# IM_CLUSTER_TESTS=1: a node's SIGKILL stalls the survivors' JetStream for 20-40 s here (NATS 2.9.10: stores of
# QoS 1 publishes time out after 4 s and NATS closes those connections, the worker's included, then every
# consumer whose leader was on the dead node is re-elected, one by one, and the SUBSCRIBEs that create consumers
# wait or are refused meanwhile; the meta leader's death is the longest, ~34 s for a bare SUBSCRIBE), so each runs
# 40-58 s, at the suite's 60 s cap. In every run, tests/test_cluster.py's chaos kills a follower node under a
# worker and its clients (16-28 s).
# How long such a test waits for the chat to go on after the kill.
JETSTREAM_RECOVERY_S = 45.0


@contextlib.contextmanager
def nats_cluster(*names: str):
    """A 3-node NATS cluster (JetStream R3) with the worker's account and a unique uid per name (password
    ``<uid>-pw``): yields (nodes, {name: uid}), ``nodes[0]`` being the node the test kills: a follower of
    JetStream's meta group (the leader's death stalls JetStream longest: scripts/nats.py meta_leader). Opt-in,
    IM_CLUSTER_TESTS=1 (else the test skips: see above). Closes the nodes after."""
    if os.environ.get("IM_CLUSTER_TESTS") != "1":
        pytest.skip("NATS cluster failover test: set IM_CLUSTER_TESTS=1 to run it (40-58 s: JetStream's own "
                    "recovery after a node's death takes 20-40 s here)")
    from scripts.nats import find_nats, leader_where, start_nats_cluster
    require(find_nats() is not None, "nats-server not installed")
    uids = unique_users(*names)
    nodes = start_nats_cluster({WORKER_USER: WORKER_PASSWORD, **{u: f"{u}-pw" for u in uids.values()}})
    try:
        yield leader_where(nodes, -1), uids
    finally:
        for n in nodes:
            n.close()


class WorkerProcess(BackendProcess):
    """`python -m backend worker` beside a broker; start() returns once the broker granted its send/ack/req
    subscriptions (after its $share probe, when it has a share group): sends published from then on reach it."""

    ready = "backend.worker: subscribed to send/ack/req"

    def __init__(self, port: int, db_url: str, client_id: str | None = "im-worker", host: str = "127.0.0.1",
                 extra: list[str] | None = None, username: str | None = WORKER_USER, scheme: str = "mqtt"):
        super().__init__()
        self.port, self.db_url, self.client_id, self.host = port, db_url, client_id, host
        self.extra, self.username, self.scheme = extra or [], username, scheme

    def args(self) -> list[str]:
        user = f"{self.username}@" if self.username else ""
        return ["worker", "--broker", f"{self.scheme}://{user}{self.host}:{self.port}", "--database-url", self.db_url,
                *(["--client-id", self.client_id] if self.client_id else []), *self.extra]

    def env(self) -> dict:
        return {"IM_BROKER_PASSWORD": WORKER_PASSWORD}


class ProbedWorker(WorkerProcess):
    """A worker with the default share group (its $share probe's verdict is in ``lines`` once started)."""


class MosquittoWorkers:
    """The system the chaos runs kill: a Mosquitto from broker_config/ and ``workers`` worker processes
    (distinct client ids) sharing one database. ``kill_worker`` SIGKILLs one at random (seeded)."""

    def __init__(self, db_url: str, passwords: dict[str, str], workers: int = 1, seed: int = 3):
        import random
        self.db_url = db_url
        self.broker = mosquitto(passwords)
        self.port = self.broker.port
        ids = ["im-worker"] if workers == 1 else [f"im-worker-w{i}" for i in range(workers)]
        self.workers = [WorkerProcess(self.port, db_url, client_id=cid) for cid in ids]
        for w in self.workers:  # all at once: on an empty database they race to create the schema
            w.start(wait=False)
        for w in self.workers:
            assert w.wait_log(w.ready, 20), "".join(w.lines)
        self.rng = random.Random(seed)
        self.victim: WorkerProcess | None = None

    def kill_worker(self) -> None:
        self.victim = self.rng.choice(self.workers)
        self.victim.kill()

    def start_worker(self) -> None:
        # Same id (its session is clean: nothing of the dead one waits at the broker); traffic goes on meanwhile.
        self.victim.start(wait=False)

    def restart_broker(self) -> None:
        self.broker.kill()  # a crash: whatever it held since its last autosave is gone
        self.broker.start()

    def close(self) -> None:
        for w in self.workers:
            w.kill()
        self.broker.close()


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


class PrivateSchema:
    """A PostgreSQL schema of its own for one test (``url`` selects it through search_path), dropped on close:
    tests running at the same time on the shared database never see each other's tables."""

    def __init__(self, base_url: str = POSTGRES_URL):
        from playhouse.db_url import connect
        why = reachable(base_url)
        require(why is None, why or "")
        self.name = f"im_test_{os.urandom(4).hex()}"
        self._admin = connect(base_url)
        self._admin.execute_sql(f"CREATE SCHEMA {self.name}")
        sep = "&" if "?" in base_url else "?"
        self.url = f"{base_url}{sep}options=-csearch_path%3D{self.name}"

    def close(self) -> None:
        self._admin.execute_sql(f"DROP SCHEMA IF EXISTS {self.name} CASCADE")
        self._admin.close()


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


class PrivatePostgres:
    """A throwaway PostgreSQL cluster of the installed version (initdb, pg_ctl) on a free port, for the
    tests that stop the database server itself. As root it runs as the ``postgres`` system user
    (PostgreSQL refuses to run as root). ``stop()`` is ``pg_ctl -m immediate``: a crash, with recovery
    from the WAL at the next ``start()``."""

    def __init__(self, port: int):
        import shutil
        import subprocess
        import tempfile
        self.port = port
        self.bindir = self._bindir()
        require(self.bindir is not None, "PostgreSQL server binaries (initdb, pg_ctl) not installed")
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            import pwd
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                require(False, "running as root and there is no postgres user to run a private PostgreSQL as")
            self.as_user = [shutil.which("runuser") or "/usr/sbin/runuser", "-u", "postgres", "--"]
        self.dir = tempfile.mkdtemp(prefix="im-pg-")  # in /tmp: pytest's tmp_path is closed to other users
        if self.as_user:
            shutil.chown(self.dir, "postgres", "postgres")
        self._run = lambda *args: subprocess.run([*self.as_user, *args], capture_output=True, text=True, timeout=60)
        r = self._run(f"{self.bindir}/initdb", "-D", f"{self.dir}/data", "-U", "postgres", "--auth=trust",
                      "-E", "UTF8", "--no-sync")
        if r.returncode != 0:
            raise RuntimeError(f"initdb failed: {r.stdout}{r.stderr}")
        self.url = f"postgresql://postgres@127.0.0.1:{port}/postgres"

    @staticmethod
    def _bindir() -> str | None:
        import glob
        import shutil
        import subprocess
        if shutil.which("pg_config"):
            d = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True).stdout.strip()
            if os.path.exists(f"{d}/initdb") and os.path.exists(f"{d}/pg_ctl"):
                return d
        for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):  # Debian keeps them here
            if os.path.exists(f"{d}/initdb"):
                return d
        return None

    def start(self) -> None:
        r = self._run(f"{self.bindir}/pg_ctl", "-D", f"{self.dir}/data", "-l", f"{self.dir}/log", "-w", "-t", "30",
                      "-o", f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1", "start")
        if r.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed: {r.stdout}{r.stderr}")

    def stop(self) -> None:
        """Immediate shutdown: every backend killed at once, nothing flushed (recovery on the next start)."""
        self._run(f"{self.bindir}/pg_ctl", "-D", f"{self.dir}/data", "-m", "immediate", "-w", "stop")

    def close(self) -> None:
        import shutil
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def session_present(port: int, client_id: str, auth: tuple[str, str] | None = None) -> bool:
    """Connect once to 127.0.0.1:port with clean session off and return the CONNACK's session-present flag;
    then connect again with a clean session, which removes the session the first connection made (tests
    leave nothing behind)."""
    import threading
    import paho.mqtt.client as mqtt
    flags: list[bool] = []
    for clean in (False, True):
        done = threading.Event()
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean)
        if auth is not None:
            c.username_pw_set(*auth)
        c.on_connect = lambda cl, u, f, rc, pr: (flags.append(f.session_present), done.set())
        c.connect("127.0.0.1", port)
        c.loop_start()
        assert done.wait(10)
        c.disconnect()
        c.loop_stop()
    return flags[0]
