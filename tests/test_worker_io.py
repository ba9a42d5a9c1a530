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
