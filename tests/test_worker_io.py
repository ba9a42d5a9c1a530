"""The worker's own socket handling against a real Mosquitto: coalesced writes, partial sends.

The worker queues its publishes and PUBACKs and writes the whole queue with one send()
(backend/transport/worker.py, _Client._packet_write). A queue larger than the socket's
buffer is written in pieces; every packet must still arrive whole, once, in order.
"""

from __future__ import annotations

import select
import threading
import time

import paho.mqtt.client as mqtt

from backend import protocol as p
from backend.transport.connection import _Client, set_nodelay
from conftest import raw_client, stop_raw
from services import WORKER_PASSWORD, WORKER_USER, mosquitto


def test_coalesced_writes_survive_partial_sends():
    broker = mosquitto({"bob": "bob-pw"})
    n, size = 3000, 2048  # 6 MB queued at once: far beyond a socket buffer, so send() returns short
    got: list[bytes] = []
    done = threading.Event()
    bob, rc, _ = raw_client(broker.port, "bob", "bob-pw", "bob:io")
    try:
        assert rc == 0
        subscribed = threading.Event()
        bob.on_subscribe = lambda *a: subscribed.set()
        bob.on_message = lambda c, u, m: (got.append(m.payload), len(got) >= n and done.set())
        bob.subscribe(p.inbox_topic("bob"), qos=1)
        assert subscribed.wait(10)

        w = _Client(mqtt.CallbackAPIVersion.VERSION2, client_id="im-worker-io", protocol=mqtt.MQTTv311)
        w.username_pw_set(WORKER_USER, WORKER_PASSWORD)
        w.max_inflight_messages_set(0)
        w.on_socket_register_write = lambda client, userdata, sock: None  # as the Worker: queue, then write
        connected = threading.Event()
        w.on_connect = lambda *a: connected.set()
        w.connect("127.0.0.1", broker.port)
        set_nodelay(w)
        _drive(w, connected.is_set, 10)
        assert connected.is_set()
        infos = [w.publish(p.inbox_topic("bob"), b"%06d" % i + b"x" * (size - 6), qos=1) for i in range(n)]
        assert len(w._out_packet) >= n, "publish() only queued (the external-loop hook is set)"
        _drive(w, lambda: all(i.is_published() for i in infos), 30)
        assert all(i.is_published() for i in infos), "every PUBLISH reached the broker and was PUBACKed"
        assert done.wait(30), f"bob got {len(got)} of {n}"
        assert [int(m[:6]) for m in got] == list(range(n)), "whole, once, in order"
        assert all(len(m) == size and m[6:] == b"x" * (size - 6) for m in got)
        w.disconnect()
        w.loop_write()
    finally:
        stop_raw(bob)
        broker.close()


def _drive(client: mqtt.Client, until, timeout: float) -> None:
    """The worker's loop in miniature: select, read, write what is queued, keepalive."""
    end = time.monotonic() + timeout
    while not until() and time.monotonic() < end:
        sock = client.socket()
        r, w, _ = select.select([sock], [sock] if client.want_write() else [], [], 0.05)
        if r or client.buffered():  # as Worker._readable: bytes already read into the client's chunk
            client.loop_read()
        if client.want_write():
            client.loop_write()
        client.loop_misc()


def test_light_qos0_publishes_and_inbound_messages_against_mosquitto():
    """The worker's own paths for a QoS 0 publish (a group's pushes) and for an inbound PUBLISH (connection.py:
    paho's packets without paho's per-message Condition): QoS 0 and QoS 1 publishes queued together reach a
    subscriber whole, once, in order, at their QoS, each info published once written; what the worker receives
    keeps its topic, payload, QoS, retain flag and packet id, and a manual PUBACK settles the sender's QoS 1."""
    broker = mosquitto({"bob": "bob-pw"})
    got: list[mqtt.MQTTMessage] = []
    done = threading.Event()
    n = 500
    bob, rc, _ = raw_client(broker.port, "bob", "bob-pw", "bob:io0")
    try:
        assert rc == 0
        subscribed = threading.Event()
        bob.on_subscribe = lambda *a: subscribed.set()
        bob.on_message = lambda c, u, m: (got.append(m), len(got) >= n and done.set())
        bob.subscribe(p.inbox_topic("bob"), qos=1)
        assert subscribed.wait(10)
        w = _Client(mqtt.CallbackAPIVersion.VERSION2, client_id="im-worker-io0", protocol=mqtt.MQTTv311,
                    manual_ack=True)
        w.username_pw_set(WORKER_USER, WORKER_PASSWORD)
        w.max_inflight_messages_set(0)
        w.on_socket_register_write = lambda client, userdata, sock: None
        inbound: list[mqtt.MQTTMessage] = []
        w.on_message = lambda c, u, m: inbound.append(m)
        connected = threading.Event()
        w.on_connect = lambda *a: connected.set()
        w.connect("127.0.0.1", broker.port)
        set_nodelay(w)
        _drive(w, connected.is_set, 10)
        infos = [w.publish(p.inbox_topic("bob"), b"%06d" % i + b"y" * 200, qos=i % 3 == 0) for i in range(n)]
        assert not any(i.is_published() for i in infos), "queued only"
        _drive(w, lambda: all(i.is_published() for i in infos), 30)
        assert all(i.is_published() for i in infos)
        assert done.wait(30), f"bob got {len(got)} of {n}"
        # In order within each QoS: Mosquitto sends a QoS 0 message at once and queues a QoS 1 one behind its
        # in-flight window (20), so the two kinds may interleave differently on the way out.
        for qos in (0, 1):
            assert [int(m.payload[:6]) for m in got if m.qos == qos] == [i for i in range(n) if int(i % 3 == 0) == qos]
        assert len(got) == n, "whole, once"
        assert all(m.payload[6:] == b"y" * 200 for m in got)
        # inbound: bob publishes on the worker's subscription, at QoS 0 and 1, one retained
        w.subscribe(p.ack_topic("+"), qos=1)
        _drive(w, lambda: False, 0.3)
        sent = [bob.publish(p.ack_topic("bob"), b'{"seqs":[%d]}' % i, qos=i % 2) for i in range(4)]
        _drive(w, lambda: len(inbound) >= 4, 10)
        assert [(m.topic, m.payload, m.qos, m.retain) for m in inbound] == [
            (p.ack_topic("bob"), b'{"seqs":[%d]}' % i, i % 2, False) for i in range(4)]
        assert all(m.mid > 0 for m in inbound if m.qos == 1) and not inbound[1].info.is_published()
        for m in inbound:
            if m.qos:
                w.ack(m.mid, m.qos)  # manual_ack: the worker PUBACKs after its commit
        _drive(w, lambda: False, 0.2)
        for s in sent:
            s.wait_for_publish(5)  # bob's QoS 1 publishes were PUBACKed by the worker
        w.disconnect()
        w.loop_write()
    finally:
        stop_raw(bob)
        broker.close()


def test_light_qos0_publish_packet_is_pahos_own_and_its_info_wakes_a_waiter():
    """connection._Client.publish builds a QoS 0 PUBLISH byte for byte as paho does (short and long topics,
    payloads past one and two length bytes, retain); _Info.wait_for_publish in another thread wakes when the
    packet is written."""
    import socket as socketlib
    a, b = socketlib.socketpair()
    try:
        c = _Client(mqtt.CallbackAPIVersion.VERSION2, client_id="x", protocol=mqtt.MQTTv311)
        c.on_socket_register_write = lambda client, userdata, sock: None
        c._sock = a
        for topic, size, retain in (("im/u/a/inbox", 10, False), ("im/u/" + "b" * 300 + "/inbox", 200, True),
                                    ("t", 20000, False)):
            info = c.publish(topic, b"z" * size, qos=0, retain=retain)
            mine = c._out_packet.pop()
            mqtt.Client._send_publish(c, info.mid, topic.encode(), b"z" * size, 0, retain, False, None, None)
            pahos = c._out_packet.pop()
            assert bytes(mine["packet"]) == bytes(pahos["packet"]) and mine["to_process"] == len(mine["packet"])
            assert (mine["command"], mine["qos"], mine["mid"]) == (mqtt.PUBLISH, 0, info.mid)
        info = c.publish("im/u/a/inbox", b"hello", qos=0)
        woke = threading.Event()
        waiter = threading.Thread(target=lambda: (info.wait_for_publish(5), woke.set()))
        waiter.start()
        time.sleep(0.05)  # not a synchronisation: the waiter may or may not be waiting yet; both must work
        assert not woke.is_set() and not info.is_published()
        c.loop_write()
        assert woke.wait(5) and info.is_published()
        waiter.join(5)
        assert b.recv(100).endswith(b"hello")
    finally:
        a.close()
        b.close()
