"""Worker sessions beside Mosquitto: clean by default, so a worker that is gone swallows nothing.

Two workers started without --id share the `$share` group on a private Mosquitto and a private PostgreSQL
schema; one is SIGKILLed and never comes back. With persistent sessions (before), Mosquitto kept handing the
dead worker's session every other payload, where it parked: one-shot publishes vanished and the reference
client's sends waited for their 3 s resend. Now every payload reaches the live worker at once.
"""

from __future__ import annotations

import re
import threading
import time

import paho.mqtt.client as mqtt

from backend import protocol as p
from backend.client import IMClient
from services import WORKER_PASSWORD, WORKER_USER, PrivateSchema, WorkerProcess, mosquitto, session_present

PASSWORDS = {"alice": "alice-pw", "bob": "bob-pw"}
N = 200
# Every receipt within this: a payload parked at a dead session is answered only by the client's first resend,
# after 3 s (backend/client.py); a live worker answers in milliseconds, and 2 s leaves room for a loaded machine.
RECEIPT_WITHIN_S = 2.0


class RawSender:
    """alice as a plain paho client: each send is ONE QoS 1 publish (as mosquitto_pub), never resent."""

    def __init__(self, port: int):
        self.receipts: dict[str, dict] = {}
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="alice:raw", clean_session=True,
                             protocol=mqtt.MQTTv311)
        self.c.username_pw_set("alice", PASSWORDS["alice"])
        self.c.on_message = self._on_message
        self.c.on_subscribe = lambda *a: self._subscribed.set()
        self.c.on_connect = lambda c, *a: c.subscribe(p.reply_topic("alice"), qos=1)
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        assert self._subscribed.wait(10)

    def _on_message(self, client, userdata, msg):
        reply = p.decode_object(msg.payload)
        with self._cond:
            self.receipts[reply.get("msg_id")] = reply
            self._cond.notify_all()

    def send(self, msg_id: str) -> None:
        self.c.publish(p.send_topic("alice"), p.encode({"msg_id": msg_id, "to": "bob", "content": msg_id}), qos=1)

    def wait_all(self, ids: list[str], timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: all(i in self.receipts for i in ids), timeout)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def test_a_worker_killed_for_good_swallows_nothing():
    schema = PrivateSchema()
    broker = mosquitto(PASSWORDS)
    # No --id: each picks its own unique client id; --send-rate 0 so alice's 400 sends are not rate limited.
    workers = [WorkerProcess(broker.port, schema.url, client_id=None, extra=["--send-rate", "0"])
               for _ in range(2)]
    clients = []
    sender = None
    try:
        workers[0].start()  # the first creates the schema
        workers[1].start()
        ids = [re.search(r"connected to \S+ as (\S+)", "".join(w.lines)).group(1) for w in workers]
        assert ids[0] != ids[1] and all(i.startswith("im-worker-") for i in ids), ids
        workers[1].kill()  # for good: never restarted

        # One-shot QoS 1 publishes, nobody resends: every one must be answered.
        sender = RawSender(broker.port)
        raw_ids = [f"raw-{i}" for i in range(N)]
        start = time.monotonic()
        for msg_id in raw_ids:
            sender.send(msg_id)
        answered = sender.wait_all(raw_ids, 15)
        raw_s = time.monotonic() - start
        missing = [i for i in raw_ids if i not in sender.receipts]
        assert answered, f"{len(missing)} of {N} one-shot sends never answered (parked at the dead worker?)"
        assert all(sender.receipts[i]["status"] == "stored" for i in raw_ids)

        # The reference client: every receipt promptly, none waiting for a resend.
        alice = IMClient("alice", PASSWORDS["alice"], port=broker.port).connect()
        clients.append(alice)
        outs = []
        for i in range(N):
            t0 = time.monotonic()
            o = alice.send("bob", f"client-{i}")
            assert o.wait(10) is not None, f"no receipt for client-{i}"
            outs.append((o, time.monotonic() - t0))
        slowest = max(s for _, s in outs)
        resent = sum(o.attempts > 1 for o, _ in outs)
        print(f"\n{N} one-shot sends answered in {raw_s:.2f}s; {N} IMClient sends, slowest receipt "
              f"{slowest * 1000:.0f} ms, {resent} resent")
        assert all(o.receipt["status"] == "stored" for o, _ in outs)
        assert resent == 0 and slowest < RECEIPT_WITHIN_S, (resent, slowest)

        bob = IMClient("bob", PASSWORDS["bob"], port=broker.port, auto_sync=False).connect()
        clients.append(bob)
        assert bob.count(10)["total"] == 2 * N  # all stored, none twice
        # The live worker was never kicked off (the two default ids never collided).
        assert not any("disconnected" in line for line in workers[0].lines), "".join(workers[0].lines)
    finally:
        for c in clients:
            c.kill()
        if sender is not None:
            sender.close()
        for w in workers:
            w.kill()
        broker.close()
        schema.close()


def test_worker_session_is_clean_by_default():
    """Nothing of a stopped worker stays at the broker: its client id gets no session back."""
    broker = mosquitto({})
    try:
        import tempfile
        with tempfile.TemporaryDirectory() as tmp:
            w = WorkerProcess(broker.port, f"sqlite:///{tmp}/im.db", client_id="im-worker-clean").start()
            assert w.stop() == 0
        assert not session_present(broker.port, "im-worker-clean", (WORKER_USER, WORKER_PASSWORD))
    finally:
        broker.close()


def test_no_test_uses_the_machines_own_brokers():
    """Tests leave nothing on the machine's services: none connects to their fixed ports (Mosquitto 1883, NATS
    4222, RabbitMQ 5672); each starts a private broker on a free port (scripts/mosquitto.py)."""
    import pathlib
    pattern = re.compile(r"port\s*=\s*(1883|4222|5672)\b|,\s*(1883|4222|5672)\s*\)|127\.0\.0\.1:(1883|4222|5672)\b")
    offenders = []
    for path in sorted(pathlib.Path(__file__).parent.glob("*.py")):
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if pattern.search(line) and "default" not in line and "pattern = re.compile" not in line:
                offenders.append(f"{path.name}:{n}: {line.strip()}")
    assert offenders == [], offenders


class RawReceiver:
    """bob as a plain paho client that is online but never acks a push: what a worker that dies mid-retransmission
    leaves behind. It records the count announcements (count payloads without a req_id) with their time."""

    def __init__(self, port: int):
        self.announcements: list[tuple[float, dict]] = []
        self.pushes = 0
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bob:raw", clean_session=True,
                             protocol=mqtt.MQTTv311)
        self.c.username_pw_set("bob", PASSWORDS["bob"])
        self.c.will_set(p.status_topic("bob"), p.OFFLINE, qos=1, retain=True)
        self.c.on_message = self._on_message
        self.c.on_subscribe = lambda *a: self._subscribed.set()
        self.c.on_connect = lambda c, *a: c.subscribe([(p.inbox_topic("bob"), 1), (p.reply_topic("bob"), 1)])
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        assert self._subscribed.wait(10)
        self.c.publish(p.status_topic("bob"), p.ONLINE, qos=1, retain=True).wait_for_publish(10)

    def _on_message(self, client, userdata, msg):
        obj = p.decode_object(msg.payload, max_bytes=4 * 1024 * 1024)
        with self._cond:
            if obj.get("kind") == "count" and "req_id" not in obj:
                self.announcements.append((time.monotonic(), obj))
            elif obj.get("kind") == "msg":
                self.pushes += 1
            self._cond.notify_all()

    def wait(self, predicate, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(predicate, timeout)

    def close(self) -> None:
        self.c.publish(p.status_topic("bob"), b"", qos=1, retain=True).wait_for_publish(5)  # leave no retained status
        self.c.disconnect()
        self.c.loop_stop()


def test_a_dead_workers_receivers_are_announced_by_the_others():
    """Worker A pushes to bob, who is online but does not ack; A is SIGKILLed. Its last will ("gone" on
    im/worker/<id>) makes worker B re-announce at once what waits for bob, instead of B's next reminder 30 s
    later (before: nothing within 15 s)."""
    schema = PrivateSchema()
    broker = mosquitto(PASSWORDS)
    a = WorkerProcess(broker.port, schema.url, client_id="im-worker-a")
    b = WorkerProcess(broker.port, schema.url, client_id="im-worker-b")
    bob = alice = None
    try:
        a.start()
        bob = RawReceiver(broker.port)
        alice = IMClient("alice", PASSWORDS["alice"], port=broker.port, receiver=False).connect()
        assert alice.send("bob", "hello").wait(10)["status"] == "stored"
        assert bob.wait(lambda: bob.pushes >= 1, 10)  # A pushed; bob never acks
        b.start()  # B learns bob is online from his retained status, and announces once
        assert bob.wait(lambda: len(bob.announcements) >= 1, 10)
        before = len(bob.announcements)
        a.kill()
        killed = time.monotonic()
        assert bob.wait(lambda: len(bob.announcements) > before, 15), "no announcement after worker A died"
        at, count = bob.announcements[before]
        print(f"\nannounced {at - killed:.2f}s after worker A was killed: {count['total']} waiting")
        assert count["total"] == 1 and at - killed < 10
    finally:
        for c in (alice, bob):
            if c is not None:
                c.close()
        for w in (a, b):
            w.kill()
        broker.close()
        schema.close()
