"""The ACL matrix, on the embedded broker and beside Mosquitto, NATS and RabbitMQ started with broker_config/:
user A tries to act as user B on every protocol topic, and nothing succeeds.

NATS and RabbitMQ are the test session's shared nodes (tests/services.py); this module is the only one that
uses the plain names alice..dave on them. Each forgery goes on its own connection: RabbitMQ closes a
connection at its first refused SUBSCRIBE or PUBLISH, which would hide the forgeries after it."""

from __future__ import annotations


import pytest

from backend import protocol as p
from backend.client import IMClient
from conftest import PASSWORDS, Server, add_users, raw_client
from conftest import stop_raw as stop
import time

from services import ProbedWorker, WorkerProcess, mosquitto, shared_broker

USERS = ("alice", "bob", "carol", "dave")


class Embedded:
    def __init__(self, db_url):
        add_users(db_url, *USERS)
        self.server = Server(db_url).start()
        self.port = self.server.port

    def close(self):
        self.server.kill()


class BesideMosquitto:
    def __init__(self, db_url):
        self.broker = mosquitto({u: PASSWORDS[u] for u in USERS})
        self.port = self.broker.port
        self.worker = WorkerProcess(self.port, db_url).start()

    def close(self):
        self.worker.kill()
        self.broker.close()


class BesideShared:
    """The session's NATS or RabbitMQ node with these users, and a worker with the default share group."""

    def __init__(self, kind, db_url):
        node = shared_broker(kind)
        node.add_users({u: PASSWORDS[u] for u in USERS})
        self.port = node.port
        self.worker = ProbedWorker(self.port, db_url).start(timeout=30)

    def close(self):
        self.worker.kill()


@pytest.fixture(params=["embedded", "mosquitto", "nats", "rabbitmq"], scope="module")
def system(request, tmp_path_factory):
    db_url = f"sqlite:///{tmp_path_factory.mktemp('acl')}/im.db"
    kind = request.param
    s = Embedded(db_url) if kind == "embedded" else BesideMosquitto(db_url) if kind == "mosquitto" else \
        BesideShared(kind, db_url)
    yield s
    s.close()


@pytest.mark.parametrize("who", ["wrong password", "unknown user", "anonymous"])
def test_refused_at_connect(system, who):
    username, password = {"wrong password": ("alice", "nope"), "unknown user": ("mallory", "x"),
                          "anonymous": (None, None)}[who]
    c, rc, _ = raw_client(system.port, username, password, f"{username or 'anon'}:x")
    stop(c)
    assert rc is None or rc.is_failure, f"{who} was admitted"


def test_alice_cannot_act_as_bob(system):
    # bob has one message waiting (he is offline), and a status of his own.
    dave = IMClient("dave", PASSWORDS["dave"], port=system.port, receiver=False).connect()
    waiting = dave.send("bob", "for bob's eyes only").wait(10)
    assert waiting["status"] == "stored"
    bob0 = IMClient("bob", PASSWORDS["bob"], port=system.port, auto_sync=False).connect()
    bob0.close()  # leaves a retained `offline` of his own
    carol = IMClient("carol", PASSWORDS["carol"], port=system.port, auto_sync=False).connect()

    spies, got = [], []

    def spy(i):
        c, rc, received = raw_client(system.port, "alice", PASSWORDS["alice"], f"alice:spy{i}")
        assert rc is not None and not rc.is_failure
        spies.append(c)
        got.append(received)
        return c

    def settled(c, info=None):
        """Until the broker answered (PUBACK / SUBACK) or closed the connection (RabbitMQ's answer)."""
        end = time.monotonic() + 5
        while time.monotonic() < end and c.is_connected() and not (info is not None and info.is_published()):
            time.sleep(0.02)  # poll: paho offers no single event for "acknowledged or disconnected"

    filters = (p.inbox_topic("bob"), p.reply_topic("bob"), "im/u/+/inbox", "im/u/+/reply", "im/#", "#", "$SYS/#",
               "$MQTT/sub/#", "im/u/bob/#")
    for i, f in enumerate(filters):  # each subscriber stays connected: whatever it is given shows in `got`
        c = spy(f"s{i}")
        c.subscribe(f, qos=1)
    # Speak as bob on each of his topics; overwrite his retained status.
    forgeries = [(p.send_topic("bob"), p.encode({"msg_id": "forged", "to": "carol", "content": "as bob"}), False),
                 (p.ack_topic("bob"), p.encode({"seqs": [waiting["seq"]]}), False),
                 (p.req_topic("bob"), p.encode({"req_id": "steal", "op": "pull"}), False),
                 (p.status_topic("bob"), b"online-forged", True),
                 (p.inbox_topic("bob"), p.encode({"kind": "msg", "seq": 10**9, "from": "alice"}), False),
                 (p.reply_topic("bob"), p.encode({"kind": "receipt"}), False)]
    for i, (topic, payload, retain) in enumerate(forgeries):
        c = spy(f"p{i}")
        settled(c, c.publish(topic, payload, qos=1, retain=retain))

    # A real message from alice through her own topics still works (and proves the worker ran past the forgeries).
    alice = IMClient("alice", PASSWORDS["alice"], port=system.port, receiver=False).connect()
    assert alice.send("carol", "real").wait(10)["status"] == "stored"
    assert carol.wait_for(lambda: carol.announcements or carol.messages, 10)
    bob = IMClient("bob", PASSWORDS["bob"], port=system.port, auto_sync=False).connect()
    try:
        page = bob.pull(limit=10)
        assert [m["content"] for m in page["messages"]] == ["for bob's eyes only"], "bob's message untouched"
        carol.drain()
        assert [m["content"] for m in carol.messages] == ["real"], "nothing was delivered as bob's"
        watcher, _, seen = raw_client(system.port, "dave", PASSWORDS["dave"], "dave:w")
        watcher.subscribe(p.status_topic("bob"), 1)
        assert dave.wait_for(lambda: bool(seen), 5)
        stop(watcher)
        assert seen[-1].payload == b"online" and seen[-1].retain
    finally:
        for c in spies:
            stop(c)
        for c in (dave, carol, alice, bob):
            c.kill()
    own = (p.inbox_topic("alice"), p.reply_topic("alice"))  # her wildcards may match her own topics: fine
    leaked = [m.topic for received in got for m in received
              if not m.topic.startswith("im/status/") and m.topic not in own]
    assert leaked == [], f"alice received {leaked}"


def test_alice_cannot_act_as_any_of_bobs_devices(system):
    """The same on the device topics (docs/PROTOCOL.md, "Devices"): bob:phone has a message waiting."""
    phone = IMClient("bob", PASSWORDS["bob"], port=system.port, device="phone", auto_sync=False).connect()
    phone.close()  # registered, and offline (its retained `offline`)
    dave = IMClient("dave", PASSWORDS["dave"], port=system.port, device="d", receiver=False).connect()
    waiting = dave.send("bob", "for bob's phone only").wait(10)
    assert waiting["status"] == "stored"
    carol = IMClient("carol", PASSWORDS["carol"], port=system.port, device="c", auto_sync=False).connect()

    spy, rc, got = raw_client(system.port, "alice", PASSWORDS["alice"], "alice:spy2")
    assert rc is not None and not rc.is_failure
    for f in (p.inbox_topic("bob", "phone"), p.reply_topic("bob", "phone"), "im/u/bob/d/+/inbox",
              "im/u/bob/d/+/reply", "im/u/+/d/+/inbox", "im/u/+/d/+/reply", "im/u/bob/d/#"):
        spy.subscribe(f, qos=1)
    spy.publish(p.send_topic("bob", "phone"), p.encode({"msg_id": "forged", "to": "carol", "content": "as bob"}), qos=1)
    spy.publish(p.ack_topic("bob", "phone"), p.encode({"seqs": [waiting["seq"]]}), qos=1)
    spy.publish(p.req_topic("bob", "phone"), p.encode({"req_id": "steal", "op": "pull"}), qos=1)
    spy.publish(p.req_topic("bob", "phone"), p.encode({"req_id": "rm", "op": "remove_device", "device": "phone"}),
                qos=1)
    spy.publish(p.status_topic("bob", "phone"), "online", qos=1, retain=True)
    spy.publish(p.status_topic("bob"), "online", qos=1, retain=True)
    spy.publish(p.inbox_topic("bob", "phone"), p.encode({"kind": "msg", "seq": 10**9, "from": "alice"}), qos=1)
    spy.publish(p.reply_topic("bob", "phone"), p.encode({"kind": "receipt"}), qos=1).wait_for_publish(5)

    alice = IMClient("alice", PASSWORDS["alice"], port=system.port, device="a", receiver=False).connect()
    assert alice.send("carol", "real").wait(10)["status"] == "stored"
    assert carol.wait_for(lambda: carol.announcements or carol.messages, 10)
    bob = IMClient("bob", PASSWORDS["bob"], port=system.port, device="phone", auto_sync=False).connect()
    try:
        assert not bob.removed, "nobody removed bob's phone"
        page = bob.pull(limit=10)
        assert [m["content"] for m in page["messages"]] == ["for bob's phone only"], "bob's message untouched"
        carol.drain()
        assert [m["content"] for m in carol.messages] == ["real"], "nothing was delivered as bob's"
    finally:
        stop(spy)
        for c in (dave, carol, alice, bob):
            c.kill()
    own = ("im/u/alice/",)  # her wildcards may match her own topics: fine
    leaked = [m.topic for m in got if not m.topic.startswith("im/status/") and not m.topic.startswith(own)]
    assert leaked == [], f"alice received {leaked}"
