"""Processes for the benchmark: brokers, the worker, the relay, load generators, bulk fills.

Every component runs as its own process on a port the kernel picked, never a fixed one.
CPU time of each process is read from /proc (Linux) at the load generator's MARK lines, so
each result says how much of the 2 cores the broker, the worker (or relay) and the load
generator used while it was measured.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PY = sys.executable
WORKER_PW = "bench-worker-pw"
USER_PW = "bench-pw"
_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds of a process (threads included), from /proc; None elsewhere."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK
    except (OSError, IndexError, ValueError):
        return None


def cpu_seconds_named(comm: str) -> float:
    """User + system CPU seconds of every live process named ``comm`` (e.g. all of PostgreSQL's
    processes: its per-connection backends, WAL writer, ...). A process that exits between two
    samples takes its CPU time with it."""
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/comm", "rb") as f:
                if f.read().strip() != comm.encode():
                    continue
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / _CLK_TCK
        except (OSError, IndexError, ValueError):
            continue
    return total


def machine_cpu_seconds() -> float | None:
    """CPU seconds the whole machine spent busy (all cores, every process), from /proc/stat."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return (sum(v[:3]) + sum(v[5:8])) / _CLK_TCK  # user nice system + irq softirq steal
    except (OSError, ValueError):
        return None


def _env(extra: dict | None = None) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    for k in ("IM_DATABASE_URL", "IM_BROKER_URL", "IM_CRASH_AT"):
        env.pop(k, None)
    env.update(extra or {})
    return env


class Proc:
    """A child process whose output goes to a log file; wait_for() polls that file for a line."""

    def __init__(self, name: str, cmd: list[str], log_path: Path, env: dict | None = None):
        self.name, self.cmd, self.log_path = name, cmd, log_path
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=_env(env), stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def wait_for(self, text: str, timeout: float = 30) -> None:
        end = time.monotonic() + timeout
        while text not in self.log():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            if time.monotonic() > end:
                raise TimeoutError(f"{self.name}: no {text!r} within {timeout}s:\n{self.log()[-3000:]}")
            time.sleep(0.02)

    def stop(self, timeout: float = 5) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


# --- brokers ------------------------------------------------------------------------------------
@dataclass
class Broker:
    kind: str  # "mosquitto" | "amqtt" | "nats" | "rabbitmq"
    port: int
    pid: int  # the process whose CPU is the broker's (RabbitMQ: its beam.smp)
    worker_user: str
    worker_client_id: str
    relay_client_id: str
    stop: Callable[[], None]
    host: str = "127.0.0.1"
    secrets: dict = field(default_factory=dict)  # user -> password, for $BENCH_SECRETS


def mosquitto_available() -> bool:
    from scripts.mosquitto import find_mosquitto, find_mosquitto_passwd
    return find_mosquitto() is not None and find_mosquitto_passwd() is not None


def start_mosquitto_broker(workdir: Path, users: Iterable[str], queue_limit: int | None = None) -> Broker:
    """Mosquitto with broker_config/ as the tests run it; queue_limit replaces max_queued_messages."""
    from scripts.mosquitto import BASE_CONFIG, start_mosquitto
    config = BASE_CONFIG
    if queue_limit is not None:
        text = BASE_CONFIG.read_text(encoding="utf-8")
        text, n = re.subn(r"(?m)^max_queued_messages\s+\d+", f"max_queued_messages {queue_limit}", text)
        if n == 0:
            text += f"\nmax_queued_messages {queue_limit}\n"
        config = workdir / "mosquitto-bench.conf"
        config.write_text(text, encoding="utf-8")
    secrets = {u: USER_PW for u in users}
    secrets["im-worker"] = WORKER_PW
    m = start_mosquitto(secrets, config=config)
    return Broker("mosquitto", m.port, m.proc.pid, "im-worker", "im-worker", "bench-relay", m.close,
                  secrets=secrets)


def add_users(db_url: str, users: Iterable[str]) -> None:
    from backend import accounts
    from backend.store import open_database
    db = open_database(db_url)
    try:
        for uid in users:
            accounts.add_user(uid, USER_PW)
    finally:
        db.close()


def start_amqtt_broker(workdir: Path, db_url: str, users: Iterable[str]) -> Broker:
    """The embedded broker (bench/amqtt_host.py) with these accounts in db_url."""
    from backend.accounts import WORKER_USERNAME
    users = list(users)
    add_users(db_url, users)
    port = free_port()
    p = Proc("amqtt", [PY, "-m", "bench.amqtt_host", "--port", str(port), "--database-url", db_url],
             workdir / f"amqtt-{port}.log", env={"BENCH_WORKER_PASSWORD": WORKER_PW})
    try:
        p.wait_for("amqtt ready", 30)
    except Exception:
        p.stop()
        raise
    secrets = {u: USER_PW for u in users}
    secrets[WORKER_USERNAME] = WORKER_PW
    return Broker("amqtt", port, p.pid, WORKER_USERNAME, "!im-worker", "!bench-relay", p.stop, secrets=secrets)


# Brokers without shared subscriptions ($share granted, nothing delivered; ../shared/BROKERS.md): the worker
# subscribes plainly beside them (--share-group ''), and several workers share the work by uid partitions.
PLAIN_BROKERS = ("nats", "rabbitmq")


def broker_available(kind: str) -> bool:
    """Whether this machine has the broker's binaries (amqtt is a Python dependency: always)."""
    if kind == "mosquitto":
        return mosquitto_available()
    if kind == "nats":
        from scripts.nats import find_nats
        return find_nats() is not None
    if kind == "rabbitmq":
        from scripts.rabbitmq import find_rabbitmq
        return find_rabbitmq() is not None
    return True


def _group_pid(pgid: int, comm: bytes) -> int | None:
    """The process named ``comm`` in process group ``pgid`` (RabbitMQ's beam.smp under its start script)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                head, rest = f.read().rsplit(b")", 1)
            if int(rest.split()[2]) == pgid and head.split(b"(", 1)[1] == comm:
                return int(entry)
        except (OSError, IndexError, ValueError):
            continue
    return None


def start_nats_broker(users: Iterable[str]) -> Broker:
    """A private nats-server (broker_config/nats/, MQTT on JetStream) on free ports; stop() removes it."""
    from scripts.nats import WORKER_USER, start_nats
    secrets = {u: USER_PW for u in users}
    secrets[WORKER_USER] = WORKER_PW
    n = start_nats(secrets)
    return Broker("nats", n.port, n.proc.pid, WORKER_USER, "im-worker", "bench-relay", n.close, secrets=secrets)


class SharedNodes:
    """RabbitMQ nodes kept for a whole run: one takes about 20 s to start (BROKERS.md), against 1 s for NATS
    and milliseconds for Mosquitto, so every RabbitMQ step of a run uses the same node (its users added as
    steps need them). Every client of a step has a clean session, or has its session discarded when the step
    ends (:func:`discard_sessions`), so the broker holds no queue of an earlier step. close() stops them."""

    def __init__(self) -> None:
        self.nodes: dict[str, object] = {}
        self.start_s: dict[str, float] = {}
        self.failed: dict[str, str] = {}  # a node that did not start is not tried again in this run

    def rabbitmq(self, users: Iterable[str]) -> Broker:
        from scripts.rabbitmq import WORKER_USER, start_rabbitmq
        want = {u: USER_PW for u in users}
        node = self.nodes.get("rabbitmq")
        if node is None or not node.running:
            if "rabbitmq" in self.failed:
                raise RuntimeError(f"the RabbitMQ node did not start earlier in this run: {self.failed['rabbitmq']}")
            t = time.monotonic()
            try:
                node = start_rabbitmq({WORKER_USER: WORKER_PW, **want})
            except Exception as e:
                self.failed["rabbitmq"] = f"{type(e).__name__}: {str(e)[:300]}"
                raise
            self.start_s["rabbitmq"] = round(time.monotonic() - t, 1)
            node.bench_users = set(want)
            node.beam_pid = _group_pid(node.proc.pid, b"beam.smp") or node.proc.pid
            self.nodes["rabbitmq"] = node
        missing = {u: pw for u, pw in want.items() if u not in node.bench_users}
        if missing:
            node.add_users(missing)
            node.bench_users |= set(missing)
        secrets = {**want, WORKER_USER: WORKER_PW}
        return Broker("rabbitmq", node.port, node.beam_pid, WORKER_USER, "im-worker", "bench-relay",
                      lambda: None, secrets=secrets)

    def close(self) -> None:
        for node in self.nodes.values():
            node.close()
        self.nodes.clear()


def discard_sessions(broker: Broker, user: str, client_ids: Iterable[str]) -> None:
    """Connect once with a clean session under each client id, which deletes the persistent session (and on
    RabbitMQ its queue) a stopped worker left, so it collects nothing from the steps that follow."""
    import paho.mqtt.client as mqtt
    from backend.transport.connection import set_nodelay
    for cid in client_ids:
        done = threading.Event()
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid, clean_session=True, protocol=mqtt.MQTTv311)
        c.username_pw_set(user, broker.secrets.get(user))
        c.on_connect = lambda client, *a: (set_nodelay(client), done.set())
        c.connect(broker.host, broker.port, keepalive=30)
        c.loop_start()
        try:
            done.wait(15)  # a CONNACK takes milliseconds; a loaded RabbitMQ may take seconds
        finally:
            c.disconnect()
            c.loop_stop()


def start_broker(kind: str, workdir: Path, db_url: str, users: Iterable[str], shared: SharedNodes | None = None,
                 **kw) -> Broker:
    """A broker of this kind with these accounts: a fresh process, except RabbitMQ with ``shared``."""
    if kind == "mosquitto":
        return start_mosquitto_broker(workdir, users, **kw)
    if kind == "nats":
        return start_nats_broker(users)
    if kind == "rabbitmq":
        nodes = shared or SharedNodes()
        b = nodes.rabbitmq(users)
        if shared is None:
            b.stop = nodes.close  # a node of its own: stopped with the broker
        return b
    return start_amqtt_broker(workdir, db_url, users)


# --- the system under test and its baseline -----------------------------------------------------
_HELP: dict[str, str] = {}


def _help(command: str) -> str:
    """``python -m backend COMMAND --help``: the options this checkout's backend has."""
    if command not in _HELP:
        _HELP[command] = subprocess.run([PY, "-m", "backend", command, "--help"], cwd=REPO, env=_env(),
                                        capture_output=True, text=True, timeout=60).stdout
    return _HELP[command]


def partitions_supported() -> bool:
    """Whether this checkout's worker takes ``--partitions N --partition I`` (work sharing without $share)."""
    return "--partitions" in _help("worker")


def bench_options(command: str) -> list[str]:
    """Options every benchmarked worker gets: one load-generator user sends the whole load, so the
    per-user send rate limit (a flood guard, 20 msg/s by default) is off."""
    return ["--send-rate", "0"] if "--send-rate" in _help(command) else []


def start_worker(broker: Broker, db_url: str, workdir: Path, tag: str = "worker", worker_id: str | None = None,
                 wait: bool = True, partition: tuple[int, int] | None = None, persistent: bool = False) -> Proc:
    """``python -m backend worker`` beside the broker, as an operator runs it. With ``worker_id``
    (scale-out) it runs as ``--id ID --client-id im-worker-ID``, one session per worker; the
    shared-subscription group is the default one (plain subscriptions beside amqtt, NATS and RabbitMQ,
    which have no $share: the worker's start-up probe would find that out in 3 s).
    ``partition`` (I, N): ``--partitions N --partition I`` (a persistent session, docs/PARTITIONS contract);
    ``persistent``: ``--persistent-session`` (needs ``worker_id``)."""
    from urllib.parse import quote
    url = f"mqtt://{quote(broker.worker_user, safe='')}@{broker.host}:{broker.port}"
    cmd = [PY, "-m", "backend", "worker", "--broker", url, "--database-url", db_url]
    if worker_id is None:
        cmd += ["--client-id", broker.worker_client_id]
    else:
        cmd += ["--id", worker_id, "--client-id", f"im-worker-{worker_id}"]
    if partition is not None:
        cmd += ["--partitions", str(partition[1]), "--partition", str(partition[0])]
    elif (broker.kind == "amqtt" or broker.kind in PLAIN_BROKERS) and "--share-group" in _help("worker"):
        cmd += ["--share-group", ""]  # amqtt 0.12, NATS and RabbitMQ have no $share subscriptions
    if persistent:
        cmd += ["--persistent-session"]
    cmd += bench_options("worker")
    p = Proc(tag, cmd, workdir / f"{tag}-{broker.port}.log", env={"IM_BROKER_PASSWORD": WORKER_PW})
    if not wait:
        return p
    try:
        p.wait_for("backend.worker: connected", 30)
    except Exception:
        p.stop()
        raise
    return p


def start_relay(broker: Broker, workdir: Path) -> Proc:
    p = Proc("relay", [PY, "-m", "bench.relay", "--port", str(broker.port), "--username", broker.worker_user,
                       "--client-id", broker.relay_client_id],
             workdir / f"relay-{broker.port}.log", env={"BENCH_SECRETS": json.dumps(broker.secrets)})
    try:
        p.wait_for("relay ready", 30)
    except Exception:
        p.stop()
        raise
    return p


def start_serve(db_url: str, users: Iterable[str], workdir: Path) -> tuple[Proc, int, dict]:
    """``python -m backend serve`` (embedded broker + worker in one process) with these accounts."""
    users = list(users)
    add_users(db_url, users)
    port = free_port()
    p = Proc("serve", [PY, "-m", "backend", "serve", "--host", "127.0.0.1", "--port", str(port),
                       "--database-url", db_url, *bench_options("serve")], workdir / f"serve-{port}.log")
    try:
        p.wait_for("backend.worker: connected", 30)
    except Exception:
        p.stop()
        raise
    return p, port, {u: USER_PW for u in users}


# --- load generators ----------------------------------------------------------------------------
def run_groupload(args: list[str], secrets: dict, watch: dict, timeout: float, log_path: Path) -> dict:
    """``python -m bench.groupload ARGS`` (many member connections), measured as :func:`run_loadgen`."""
    return run_loadgen(args, secrets, watch, timeout, log_path, module="bench.groupload")


def run_loadgen(args: list[str], secrets: dict, watch: dict[str, int | None | Callable[[], float | None]],
                timeout: float, log_path: Path, module: str = "bench.loadgen") -> dict:
    """Run ``python -m bench.loadgen ARGS``; sample the CPU of `watch` (name -> pid, or a function
    returning CPU seconds) at its MARK lines.

    Returns its RESULT with ``cpu_s`` (name -> CPU seconds used inside the measured phase) and
    ``cpu_util`` (name -> share of one core over the measured phase's wall time).
    """
    cmd = [PY, "-m", module, *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env({"BENCH_SECRETS": json.dumps(secrets)}),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watch = {**watch, "loadgen": proc.pid}
    marks: dict[str, tuple[float, dict]] = {}
    out: dict = {}
    lines: list[str] = []
    err: list[str] = []
    t_err = threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True)
    t_err.start()
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("MARK "):
                marks[line.split()[1]] = (time.monotonic(), {k: p() if callable(p) else cpu_seconds(p)
                                                             for k, p in watch.items()})
            elif line.startswith("RESULT "):
                out = json.loads(line[len("RESULT "):])
        proc.wait()
    finally:
        timer.cancel()
    t_err.join(2)
    with open(log_path, "a", encoding="utf-8") as f:
        f.write(" ".join(cmd) + "\n" + "".join(lines) + "".join(err) + "\n")
    if proc.returncode != 0 or not out:
        raise RuntimeError(f"loadgen {' '.join(args)} failed ({proc.returncode}):\n{''.join(err)[-3000:]}")
    if "start" in marks and "end" in marks:
        (t0, c0), (t1, c1) = marks["start"], marks["end"]
        wall = max(1e-9, t1 - t0)
        out["cpu_s"] = {k: round(c1[k] - c0[k], 3) for k in c0 if c0[k] is not None and c1.get(k) is not None}
        out["cpu_util"] = {k: round(v / wall, 3) for k, v in out["cpu_s"].items()}
        out["wall_s"] = round(wall, 4)
    return out


# --- bulk fills (growth, offline backlog) ----------------------------------------------------------
def fill_messages(db_url: str, n: int, receiver_of: Callable[[int], str], *, content_bytes: int = 100,
                  chunk: int = 50_000, batch_receipts: bool = True, devices: tuple[str, ...] = ("",)) -> float:
    """Insert n rows into the Message table (backend.store's model and schema) in bulk; returns seconds.

    Each message gets an entry per device in ``devices`` ("" the default device, the v1 topics: what
    count, pull and ack read; docs/PROTOCOL.md 12.3), and with more than the default device every
    receiver gets those devices registered. No Accepted rows: count, pull and ack read and delete
    nothing else. (A real store also holds one Accepted row per message, for duplicate detection on
    send.) The rows are marked as sent with "receipts": "batch", as backend.client sends, unless
    ``batch_receipts`` is False.
    """
    from backend.store import Device, Entry, Message, open_database
    db = open_database(db_url)  # creates the schema exactly as the worker does
    db.close()
    path = db_url[len("sqlite:///"):]
    f = Message._meta.fields
    cols = [f[name].column_name for name in ("receiver_uid", "sender_uid", "msg_id", "msg_type", "msg_content",
                                             "send_time", "client_ts", "batch_receipts")]
    sql = (f'INSERT INTO "{Message._meta.table_name}" ({", ".join(cols)}) '
           f'VALUES ({", ".join("?" * len(cols))})')
    content = "x" * content_bytes
    base_ms = int(time.time() * 1000) - n
    t0 = time.monotonic()
    con = sqlite3.connect(path)
    try:
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=OFF")  # a fill, not a promise: the worker opens it with FULL
        seq0 = con.execute(f'SELECT COALESCE(MAX(seq), 0) FROM "{Message._meta.table_name}"').fetchone()[0]
        for start in range(0, n, chunk):
            rows = [(receiver_of(i), f"s{i % 10}", f"fill-{i}", "text", content, base_ms + i, None, int(batch_receipts))
                    for i in range(start, min(n, start + chunk))]
            con.executemany(sql, rows)
            con.commit()
        msg, ent, dev = Message._meta.table_name, Entry._meta.table_name, Device._meta.table_name
        for d in devices:  # only this fill's rows (the offline scenario fills a drained store again)
            con.execute(f'INSERT INTO "{ent}" (uid, device, seq) SELECT receiver_uid, ?, seq FROM "{msg}" '
                        f'WHERE seq > ?', (d, seq0))
        if devices != ("",):
            now_ms = int(time.time() * 1000)
            for d in devices:
                con.execute(f'INSERT OR IGNORE INTO "{dev}" (uid, device, registered_at, last_seen, expired) '
                            f'SELECT DISTINCT receiver_uid, ?, ?, ?, 0 FROM "{msg}"', (d, now_ms, now_ms))
        con.commit()
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        con.close()
    return time.monotonic() - t0


def database_reachable(url: str) -> str | None:
    """None if the database at ``url`` answers, else why not (as tests/services.py)."""
    try:
        from backend.store import open_database
        db = open_database(url, create=False)
        try:
            db.execute_sql("SELECT 1")
        finally:
            db.close()
        return None
    except Exception as e:  # noqa: BLE001 - any driver's error: say it and skip
        return f"{url.split('://')[0]} not reachable at {url.split('@')[-1]}: {str(e).strip()[:160]}"


@contextlib.contextmanager
def private_schema(url: str):
    """A PostgreSQL schema of its own in the database at ``url``, empty, dropped at the end; yields the URL
    that selects it (search_path), as tests/services.py's PrivateSchema: a bench run beside the test suite
    never drops or fills the tables another process is using."""
    from backend.store import create_schema, open_database
    name = f"im_bench_{os.urandom(4).hex()}"
    admin = open_database(url, create=False)
    try:
        admin.execute_sql(f"CREATE SCHEMA {name}")
        sep = "&" if "?" in url else "?"
        scoped = f"{url}{sep}options=-csearch_path%3D{name}"
        db = open_database(scoped, create=False)
        try:
            create_schema(db)
        finally:
            db.close()
        yield scoped
    finally:
        admin.execute_sql(f"DROP SCHEMA IF EXISTS {name} CASCADE")
        admin.close()


def reset_schema(url: str) -> None:
    """Drop our tables in ``url`` and create them again, empty (backend.store's own schema)."""
    from backend.store import create_schema, drop_schema, open_database
    db = open_database(url, create=False)
    try:
        drop_schema(db)
        create_schema(db)
    finally:
        db.close()


def count_messages(db_url: str) -> int:
    con = sqlite3.connect(db_url[len("sqlite:///"):])
    try:
        from backend.store import Message
        return con.execute(f'SELECT COUNT(*) FROM "{Message._meta.table_name}"').fetchone()[0]
    finally:
        con.close()
