"""The worker beside real brokers run with broker_config/: Mosquitto, NATS and RabbitMQ.

The chat and the worker-kill tests run beside each broker (parametrised): the session shares one NATS
and one RabbitMQ node (tests/services.py: RabbitMQ takes ~15 s to start), and each test makes its own
uniquely named users (alice-<hex>, bob-<hex>), so tests never see each other's traffic. Mosquitto starts
in milliseconds: each test gets its own, as before. The worker runs as ``python -m backend worker`` with
the default share group, as an operator would start it: beside NATS and RabbitMQ it finds that $share
delivers nothing and subscribes plainly by itself. A missing broker binary skips, unless
IM_REQUIRE_SERVICES=1, in which case that is a failure.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from backend import protocol as p  # noqa: E402
from backend.client import IMClient  # noqa: E402
from scripts.mosquitto import find_mosquitto, find_mosquitto_passwd, start_mosquitto  # noqa: E402
sys.path.insert(0, str(REPO_ROOT / "tests"))
import services  # noqa: E402

REQUIRE_SERVICES = os.environ.get("IM_REQUIRE_SERVICES") == "1"
MISSING = [name for name, path in (("mosquitto", find_mosquitto()), ("mosquitto_passwd", find_mosquitto_passwd()))
           if path is None]
MISSING_REASON = (f"{' and '.join(MISSING)} not found (Debian: apt-get install mosquitto); "
                  "set IM_REQUIRE_SERVICES=1 to make this a failure instead of a skip")

PASSWORDS = {"alice": "alice-pw", "bob": "bob-pw", "im-worker": "worker-pw"}  # the private Mosquitto's accounts
WORKER_CLIENT_ID = "im-worker"
# Upper bound for anything that should take milliseconds; waits return as soon as the event happens.
WAIT_S = 15.0


class WorkerProcess:
    """``python -m backend worker`` beside the broker, its output in a log file."""

    def __init__(self, port: int, database: Path, log_path: Path, extra: tuple[str, ...] = (),
                 password: str = PASSWORDS["im-worker"]):
        self.port, self.database, self.log_path, self.extra = port, database, log_path, extra
        self.password = password
        self.proc: subprocess.Popen | None = None

    def start(self) -> "WorkerProcess":
        connects_before = self._connects()
        env = dict(os.environ, IM_BROKER_PASSWORD=self.password, PYTHONUNBUFFERED="1")
        env.pop("IM_DATABASE_URL", None)
        env.pop("IM_BROKER_URL", None)
        cmd = [sys.executable, "-m", "backend", "worker",
               "--broker", f"mqtt://im-worker@127.0.0.1:{self.port}",
               "--database-url", f"sqlite:///{self.database}",
               "--client-id", WORKER_CLIENT_ID, *self.extra]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT)
        # The worker logs "the broker at host:port delivers through shared subscriptions" (or "has no shared
        # subscriptions") once its start-up probe settled and its send/ack/req subscriptions are on their way.
        end = time.monotonic() + WAIT_S
        while self._connects() <= connects_before:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() > end:
                raise AssertionError(f"worker did not connect within {WAIT_S}s:\n{self.log_tail()}")
            time.sleep(0.02)  # poll interval while the subprocess starts
        return self

    def _connects(self) -> int:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return 0
        return len(re.findall(rf"the broker at 127\.0\.0\.1:{self.port} (delivers through|has no) shared", text))

    def kill(self) -> None:
        """SIGKILL: no DISCONNECT, no PUBACK for whatever it had not committed yet."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(WAIT_S)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(WAIT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@pytest.fixture
def private_mosquitto():
    services.require(not MISSING, MISSING_REASON)
    b = start_mosquitto(PASSWORDS)
    yield b
    b.close()


@pytest.fixture(params=services.BROKERS)
def broker(request):
    """Mosquitto (a private one per test), or the session's shared NATS or RabbitMQ node; ``broker.uid``
    maps alice and bob to this test's own uids, ``broker.worker_password`` is the worker account's."""
    if request.param == "mosquitto":
        b = request.getfixturevalue("private_mosquitto")
        b.uid, b.worker_password = {"alice": "alice", "bob": "bob"}, PASSWORDS["im-worker"]
        yield b
        return
    node = services.shared_broker(request.param)
    node.uid = services.unique_users("alice", "bob")
    node.worker_password = services.WORKER_PASSWORD
    for name, uid in node.uid.items():
        PASSWORDS[uid] = PASSWORDS[name]
    node.add_users({uid: PASSWORDS[uid] for uid in node.uid.values()})
    yield node


@pytest.fixture
def worker(broker, tmp_path):
    w = WorkerProcess(broker.port, tmp_path / "im.db", tmp_path / "worker.log",
                      password=broker.worker_password).start()
    yield w
    w.stop()
    # pytest shows this only for a failed test.
    print(f"--- worker log ---\n{w.log_tail()}\n--- broker log ---\n{broker.log_tail()}")


@pytest.fixture
def clients(broker):
    """connect(uid, **IMClient options): a reference client logged in to the test broker."""
    made: list[IMClient] = []

    def connect(name: str, **kw) -> IMClient:
        uid = broker.uid.get(name, name) if hasattr(broker, "uid") else name
        c = IMClient(uid, PASSWORDS[uid], broker.host, broker.port, **kw).connect(WAIT_S)
        made.append(c)
        return c

    yield connect
    for c in made:
        c.close()


class RawSubscriber:
    """A plain paho client logged in as ``uid`` that records every message it receives."""

    def __init__(self, uid: str, port: int, client_id: str):
        self.received: list[tuple[str, bytes]] = []
        self.granted: list[str] = []
        self._connected, self._subscribed = threading.Event(), threading.Event()
        self._arrived = threading.Condition()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True,
                                  protocol=mqtt.MQTTv311)
        self.client.username_pw_set(uid, PASSWORDS[uid])
        self.client.on_connect = lambda c, u, f, rc, props: self._connected.set()

        def on_message(c, u, m):
            with self._arrived:
                self.received.append((m.topic, m.payload))
                self._arrived.notify_all()

        self.client.on_message = on_message

        def on_subscribe(c, u, mid, reason_codes, props):
            self.granted = [str(rc) for rc in reason_codes]
            self._subscribed.set()

        self.client.on_subscribe = on_subscribe
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self._connected.wait(WAIT_S), f"raw client {client_id} did not connect"

    def subscribe(self, *filters: str) -> None:
        self._subscribed.clear()
        self.client.subscribe([(f, 1) for f in filters])
        assert self._subscribed.wait(WAIT_S), "no SUBACK"

    def wait_for_messages(self, n: int, timeout: float = WAIT_S) -> bool:
        with self._arrived:
            return self._arrived.wait_for(lambda: len(self.received) >= n, timeout)

    def publish(self, topic: str, payload: bytes) -> None:
        """QoS 1 and wait for the PUBACK: Mosquitto has then handled (or refused) it."""
        self.client.publish(topic, payload, qos=1).wait_for_publish(WAIT_S)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_online_offline_and_acl(broker, worker, clients):
    port = broker.port
    A, B = broker.uid["alice"], broker.uid["bob"]
    alice = clients("alice")
    bob = clients("bob")
    # Alice's second connection, as a plain MQTT client: it tries to read what is Bob's. (Mosquitto grants
    # such subscriptions and delivers nothing; NATS refuses them, RabbitMQ closes the connection: the ACL
    # matrix, tests/test_acl_matrix.py, tries every forgery on every broker.)
    spying = isinstance(broker.uid, dict) and A == "alice"
    spy = RawSubscriber("alice", port, client_id="alice:spy") if spying else None
    try:
        if spy:
            spy.subscribe(p.inbox_topic("bob"), p.reply_topic("bob"), "im/u/+/inbox", p.send_topic("bob"))
        # bob's count is answered only after the worker took in bob's earlier "online" status
        # (both come from bob's connection, in order): the next message to bob is a push.
        assert bob.count(WAIT_S)["total"] == 0

        # Alice, allowed only her own send topic, forges a send as Bob: Mosquitto drops it.
        if spy:
            spy.publish(p.send_topic("bob"), p.encode({"msg_id": "forged-1", "to": "bob", "content": "forged"}))

        # --- online: stored receipt, push, ack, delivered receipt ---
        out = alice.send(B, "hello bob")
        receipt = out.wait(WAIT_S)
        assert receipt is not None and receipt["kind"] == "receipt", receipt
        assert receipt["status"] == "stored" and receipt["to"] == B and receipt["msg_id"] == out.msg_id
        assert bob.wait_for_messages(1, WAIT_S), "bob got no push"
        pushed = bob.messages[0]
        assert (pushed["msg_id"], pushed["from"], pushed["to"], pushed["content"]) == \
            (out.msg_id, A, B, "hello bob")
        assert pushed["seq"] == receipt["seq"]
        assert bob.announcements == []  # it came as a push, not through a backlog pull
        assert out.delivered.wait(WAIT_S), "bob's ack did not lead to a delivered receipt"

        # --- ACL: the spy got none of bob's traffic, and the forged send went nowhere ---
        assert spy is None or spy.received == [], f"alice read bob's topics: {spy.received}"
        assert [m["msg_id"] for m in bob.messages] == [out.msg_id]
        assert alice.errors == [] and bob.errors == []
    finally:
        if spy:
            spy.close()

    # --- offline: three messages wait in the store ---
    # close() publishes the retained "offline" and waits for its PUBACK, so the worker hears it
    # before any of the sends below (one queue, in order): they are stored, not pushed.
    bob.close()
    outs = [alice.send(B, f"offline {i}") for i in range(3)]
    for o in outs:
        r = o.wait(WAIT_S)
        assert r is not None and r.get("status") == "stored", r

    bob2 = clients("bob", auto_sync=False)
    count = bob2.count(WAIT_S)
    assert count["kind"] == "count" and count["total"] == 3 and count["by_sender"] == {A: 3}, count
    drained = bob2.drain(limit=2)
    assert [m["msg_id"] for m in drained] == [o.msg_id for o in outs]
    assert [m["content"] for m in drained] == ["offline 0", "offline 1", "offline 2"]
    assert [m["seq"] for m in drained] == sorted(m["seq"] for m in drained)
    # Each page's ack (the next pull) deleted it: alice hears "delivered" for all three.
    for o in outs:
        assert o.delivered.wait(WAIT_S), f"no delivered receipt for {o.msg_id}"
    assert bob2.count(WAIT_S)["total"] == 0


def test_worker_sigkill_loses_nothing(broker, worker, clients):
    B = broker.uid["bob"]
    alice = clients("alice")
    n, kill_after = 50, 10
    outs: list = []

    def send_all():
        for i in range(n):
            outs.append(alice.send(B, f"m{i}"))
            time.sleep(0.002)  # pace the stream so the kill lands in the middle of it

    sender = threading.Thread(target=send_all, name="alice-sender")
    sender.start()
    assert alice.wait_for(lambda: sum(o.done.is_set() for o in outs) >= kill_after, WAIT_S), worker.log_tail()
    worker.kill()  # mid-stream: whatever it had taken but not committed is not PUBACKed
    done_at_kill, sent_at_kill = sum(o.done.is_set() for o in outs), len(outs)
    sender.join(WAIT_S)
    assert len(outs) == n
    # The worker's session is clean: what it had not PUBACKed, and what arrived while it was down, is gone
    # from the broker; alice's client resends every send that got no receipt.
    worker.start()

    for o in outs:
        r = o.wait(WAIT_S)
        assert r is not None and r.get("kind") == "receipt" and r["status"] in ("stored", "duplicate"), \
            (o.msg_id, r, worker.log_tail())
        assert not o.failed
    assert len({o.receipt["seq"] for o in outs}) == n  # one seq per msg_id: repeats answered "duplicate"
    statuses = [o.receipt["status"] for o in outs]
    resent = sum(o.attempts > 1 for o in outs)
    print(f"at the kill: {sent_at_kill} sent, {done_at_kill} with a receipt; "
          f"{statuses.count('duplicate')} first answered 'duplicate', {resent} resent by alice")

    bob = clients("bob", auto_sync=False)
    assert bob.count(WAIT_S)["total"] == n
    drained = bob.drain(limit=20)
    ids = [m["msg_id"] for m in drained]
    assert len(ids) == n and len(set(ids)) == n, f"{len(ids)} messages, {len(set(ids))} distinct"
    assert set(ids) == {o.msg_id for o in outs}
    assert bob.count(WAIT_S)["total"] == 0


def test_broker_restart_keeps_the_worker_session(private_mosquitto, tmp_path):
    """--persistent-session with persistence true: what Mosquitto queued for the offline worker survives a
    broker restart."""
    broker = private_mosquitto
    worker = WorkerProcess(broker.port, tmp_path / "im.db", tmp_path / "worker.log",
                           extra=("--persistent-session",)).start()
    worker.stop()  # clean DISCONNECT: its persistent session stays, and queues from now on
    # A raw publisher, so no client resend can stand in for what the broker kept.
    raw = RawSubscriber("alice", broker.port, client_id="alice:raw")
    ids = [f"kept-{i}" for i in range(5)]
    for msg_id in ids:
        raw.publish(p.send_topic("alice"), p.encode({"msg_id": msg_id, "to": "bob", "content": msg_id}))
    raw.close()

    broker.restart()  # SIGTERM (Mosquitto writes mosquitto.db), then the same port and directory
    listener = RawSubscriber("alice", broker.port, client_id="alice:raw")
    try:
        listener.subscribe(p.reply_topic("alice"))
        worker.start()
        # The worker stores what the broker kept and answers each with a receipt.
        assert listener.wait_for_messages(len(ids)), (listener.received, worker.log_tail())
        receipts = [p.decode_object(payload) for _, payload in listener.received]
    finally:
        listener.close()
    assert [(r["kind"], r["msg_id"], r["status"]) for r in receipts] == [("receipt", i, "stored") for i in ids]

    bob = IMClient("bob", PASSWORDS["bob"], broker.host, broker.port, auto_sync=False).connect(WAIT_S)
    try:
        assert bob.count(WAIT_S)["total"] == len(ids)
        assert [m["msg_id"] for m in bob.drain()] == ids
    finally:
        bob.close()
        worker.stop()
