"""Every connection lives and dies as MQTT says, on the embedded broker and beside Mosquitto.

* keepalive: a client silent for 1.5 x its keepalive is disconnected and its will published
  (MQTT 3.1.1 section 3.1.2.10); amqtt 0.12.1 alone never did;
* takeover: a CONNECT with a client id already connected closes the old connection first
  (MQTT-3.1.4-2), and the old connection's will never lands after the new one's ``online``;
* size: a packet announcing more than MAX_PACKET_BYTES closes its connection before its body
  is read, without growing the broker or stalling other users (embedded broker only; Mosquitto
  gets ``max_packet_size`` from broker_config/mosquitto.conf).

The silent clients are raw sockets: they send CONNECT and a PUBLISH, then stop reading and
writing while their socket stays open, as a phone that lost its radio.
"""

from __future__ import annotations

import socket
import struct
import threading
import time

import paho.mqtt.client as mqtt
import pytest

from backend import protocol as p
from backend.transport.embedded import MAX_PACKET_BYTES
from conftest import PASSWORDS, IMClient, Server, add_users
from services import WorkerProcess, mosquitto

KEEPALIVE_S = 5
GRACE_S = 1.5 * KEEPALIVE_S
# Mosquitto 2.0.11 checks keepalives coarsely: measured here, a client with keepalive 5 s was
# marked offline 8-11 s after its last packet. The embedded broker is held to a tighter bound below.
MOSQUITTO_SLACK_S = 10.0
EMBEDDED_SLACK_S = 2.5


# -- raw MQTT 3.1.1 ----------------------------------------------------------------------------
def _str(value: str | bytes) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    return struct.pack("!H", len(data)) + data


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def connect_packet(client_id: str, user: str, password: str, keepalive: int, will_offline: bool = True,
                   clean: bool = True) -> bytes:
    flags = 0xC0 | (0x02 if clean else 0)  # username, password
    payload = _str(client_id)
    if will_offline:
        flags |= 0x04 | 0x08 | 0x20  # will, QoS 1, retained
        payload += _str(p.status_topic(user)) + _str(p.OFFLINE)
    body = _str("MQTT") + bytes([4, flags]) + struct.pack("!H", keepalive) + payload + _str(user) + _str(password)
    return b"\x10" + _remaining_length(len(body)) + body


def publish_packet(topic: str, payload: bytes, retain: bool = False, packet_id: int = 1) -> bytes:
    body = _str(topic) + struct.pack("!H", packet_id) + payload
    return bytes([0x32 | (1 if retain else 0)]) + _remaining_length(len(body)) + body


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def silent_client(port: int, uid: str, client_id: str, keepalive: int = KEEPALIVE_S, clean: bool = True,
                  online: bool = True) -> socket.socket:
    """Connect (retained `offline` will), publish a retained `online`, then fall silent (socket left open)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(connect_packet(client_id, uid, PASSWORDS[uid], keepalive, clean=clean))
    connack = recv_exactly(sock, 4)
    assert connack[0] == 0x20 and connack[3] == 0, f"refused: {connack!r}"
    if online:
        sock.sendall(publish_packet(p.status_topic(uid), p.ONLINE.encode(), retain=True))
        assert recv_exactly(sock, 4)[0] == 0x40  # PUBACK: the broker has it
    return sock


def closed_by_server(sock: socket.socket, timeout: float) -> bool:
    """True once the server has closed the connection (EOF or reset), reading whatever it still sends."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        sock.settimeout(max(0.01, end - time.monotonic()))
        try:
            if not sock.recv(65536):
                return True
        except socket.timeout:
            return False
        except OSError:
            return True
    return False


class StatusWatcher:
    """carol watching im/status/UID: every status payload seen, with its arrival time."""

    def __init__(self, port: int, uid: str, keepalive: int = 60):
        self.seen: list[tuple[float, str]] = []
        self.cond = threading.Condition()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"carol:watch-{uid}")
        self.client.username_pw_set("carol", PASSWORDS["carol"])
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.connect("127.0.0.1", port, keepalive=keepalive)
        self.client.loop_start()
        self.client.subscribe(p.status_topic(uid), 1)
        assert subscribed.wait(10)

    def _on_message(self, client, userdata, msg) -> None:
        with self.cond:
            self.seen.append((time.monotonic(), msg.payload.decode()))
            self.cond.notify_all()

    def wait_for(self, status: str, after: int = 0, timeout: float = 10) -> float | None:
        """Arrival time of the first `status` among the payloads from index `after` on, or None."""
        def first():
            return next((t for t, s in self.seen[after:] if s == status), None)
        with self.cond:
            self.cond.wait_for(lambda: first() is not None, timeout)
            return first()

    def first(self, timeout: float = 3) -> str | None:
        """The first payload seen (a retained one, for a fresh subscriber), or None."""
        with self.cond:
            self.cond.wait_for(lambda: bool(self.seen), timeout)
            return self.seen[0][1] if self.seen else None

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def retained_status(port: int, uid: str) -> str | None:
    """What a fresh subscriber gets as im/status/UID's retained message."""
    w = StatusWatcher(port, uid)
    try:
        return w.first()
    finally:
        w.close()


# -- the two brokers -------------------------------------------------------------------------
class System:
    """One broker under test: ``pid`` is the process that holds the connections (serve, or mosquitto)."""

    def __init__(self, kind: str, port: int, pid: int, closers: list, server: Server | None = None, log=None):
        self.kind, self.port, self.pid, self._closers, self.server = kind, port, pid, closers, server
        self.log_path = log

    def log_text(self) -> str:
        return "".join(self.server.lines) if self.server is not None else self.log_path.read_text()

    def close(self) -> None:
        for close in self._closers:
            close()


@pytest.fixture(params=["embedded", "mosquitto"])
def system(request, db_url):
    if request.param == "embedded":
        add_users(db_url, *PASSWORDS)
        srv = Server(db_url).start()
        s = System("embedded", srv.port, srv.proc.pid, [srv.kill], srv)
    else:
        add_users(db_url)  # the schema; the accounts live in Mosquitto's password file
        broker = mosquitto(PASSWORDS)
        worker = WorkerProcess(broker.port, db_url).start()
        s = System("mosquitto", broker.port, broker.proc.pid, [worker.kill, broker.close], log=broker.log_path)
    yield s
    s.close()


# -- keepalive -------------------------------------------------------------------------------
def test_silent_client_is_disconnected_and_its_will_published(system):
    """bob falls silent after his `online`; on the embedded broker, at the same time, dave falls silent
    halfway through a packet and a third connection never finishes its CONNECT (all run concurrently)."""
    from backend.transport.embedded import CONNECT_TIMEOUT_S
    embedded = system.kind == "embedded"
    watcher = StatusWatcher(system.port, "bob")
    dave_watch = StatusWatcher(system.port, "dave")
    # erin has a 2 s keepalive and her paho loop running (it pings): she must stay connected throughout.
    erin_watch = StatusWatcher(system.port, "erin")
    erin = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="erin")
    erin.username_pw_set("erin", PASSWORDS["erin"])
    erin.will_set(p.status_topic("erin"), p.OFFLINE, qos=1, retain=True)
    erin.connect("127.0.0.1", system.port, keepalive=2)
    erin.loop_start()
    erin.publish(p.status_topic("erin"), p.ONLINE, qos=1, retain=True)
    assert erin_watch.wait_for(p.ONLINE) is not None
    try:
        if embedded:
            no_connect = socket.create_connection(("127.0.0.1", system.port), timeout=10)
            no_connect.sendall(b"\x10")  # the first byte of a CONNECT, then nothing
            no_connect_since = time.monotonic()
            dave = silent_client(system.port, "dave", "dave", keepalive=2)
            dave.sendall(publish_packet(p.send_topic("dave"), b"x" * 1000)[:200])  # 200 of ~1,020 bytes
            dave_since = time.monotonic()
        bob = silent_client(system.port, "bob", "bob:phone")
        last_sent = time.monotonic()
        assert watcher.wait_for(p.ONLINE) is not None
        slack = EMBEDDED_SLACK_S if embedded else MOSQUITTO_SLACK_S
        offline_at = watcher.wait_for(p.OFFLINE, timeout=GRACE_S + slack + 2)
        assert offline_at is not None, f"bob still {watcher.seen[-1][1]!r} after {GRACE_S + slack + 2:.0f} s of silence"
        elapsed = offline_at - last_sent
        assert elapsed <= GRACE_S + slack, f"offline after {elapsed:.1f} s"
        if embedded:
            assert elapsed >= GRACE_S - 0.3, f"disconnected after {elapsed:.1f} s, before 1.5 x keepalive"
            assert system.server.wait_log("nothing received for", 2)
        assert closed_by_server(bob, 3), "the silent connection is closed"
        assert retained_status(system.port, "bob") == p.OFFLINE
        assert [s for _, s in erin_watch.seen if s == p.OFFLINE] == [], "a client that pings stays connected"
        assert erin.is_connected()
        if embedded:
            dave_off = dave_watch.wait_for(p.OFFLINE, timeout=1)
            assert dave_off is not None and dave_off - dave_since <= 3 + EMBEDDED_SLACK_S, \
                "silent halfway through a packet is silent too"
            assert closed_by_server(dave, 1)
            assert closed_by_server(no_connect, CONNECT_TIMEOUT_S + 3), "no CONNECT: closed"
            waited = time.monotonic() - no_connect_since
            assert CONNECT_TIMEOUT_S - 0.5 <= waited <= CONNECT_TIMEOUT_S + 3, f"closed after {waited:.1f} s"
            assert system.server.wait_log("no CONNECT within", 2)
    finally:
        erin.disconnect()
        erin.loop_stop()
        for w in (watcher, dave_watch, erin_watch):
            w.close()


@pytest.mark.parametrize("topic", ["im/u/bob/#", "$SYS/x"])
def test_publish_on_an_invalid_topic_closes_the_connection(db_url, topic):
    """amqtt stops serving such a connection but left it open, its will unsent; now it is closed."""
    add_users(db_url, *PASSWORDS)
    srv = Server(db_url).start()
    try:
        watcher = StatusWatcher(srv.port, "bob")
        bob = silent_client(srv.port, "bob", "bob", keepalive=60)
        assert watcher.wait_for(p.ONLINE) is not None
        bob.sendall(publish_packet(topic, b"{}", packet_id=2))
        assert closed_by_server(bob, 5)
        assert watcher.wait_for(p.OFFLINE, timeout=5) is not None, "its will is published"
        watcher.close()
    finally:
        srv.kill()


# -- client-id takeover ----------------------------------------------------------------------
@pytest.mark.parametrize("clean", [True, False], ids=["clean", "persistent"])
def test_takeover_closes_the_old_connection_and_its_will_lands_first(system, clean):
    watcher = StatusWatcher(system.port, "bob")
    old = silent_client(system.port, "bob", "bob", keepalive=60, clean=clean)  # half-open, will `offline`
    assert watcher.wait_for(p.ONLINE) is not None
    bob = IMClient("bob", PASSWORDS["bob"], port=system.port, clean_session=clean).connect()  # client id `bob`
    alice = IMClient("alice", PASSWORDS["alice"], port=system.port, receiver=False).connect()
    try:
        assert closed_by_server(old, 5), "the old connection is closed (MQTT-3.1.4-2)"
        old.close()  # had it stayed open, its will would fire now
        # After the push round trip below, anything the old connection's end set off has landed.
        alice.send("bob", "are you there?").wait(10)
        assert bob.wait_for_messages(1, 10), "the new connection gets pushes"
        statuses = [s for _, s in watcher.seen]
        assert statuses[-1] == p.ONLINE, f"status sequence {statuses}: the old will landed after `online`"
        assert retained_status(system.port, "bob") == p.ONLINE
        if system.kind == "embedded":
            assert system.server.wait_log("connected again: closing its previous connection", 2)
        print(f"{system.kind}: statuses seen {statuses}")
    finally:
        bob.kill()
        alice.kill()
        watcher.close()


# -- oversize packets ------------------------------------------------------------------------
def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_oversize_packet_closes_the_connection_before_its_body(system):
    port = system.port
    alice = IMClient("alice", PASSWORDS["alice"], port=port).connect()
    carol = IMClient("carol", PASSWORDS["carol"], port=port).connect()
    try:
        alice.send("carol", "warm-up").wait(10)  # every code path loaded before the RSS baseline
        assert carol.wait_for_messages(1)
        rss_before = _rss_kb(system.pid)
        bob = silent_client(port, "bob", "bob:big", keepalive=60, online=False)
        announced = 200 * 1024 * 1024
        topic = _str(p.send_topic("bob"))
        header = b"\x32" + _remaining_length(announced)
        blast_done = threading.Event()

        def blast():  # the header, then as much of the 200 MiB as the broker takes
            try:
                bob.sendall(header + topic + b"\x00\x01" + b'{"content":"SECRET' + b"A" * (4 * 1024 * 1024))
            except OSError:
                pass
            blast_done.set()

        started = time.monotonic()
        threading.Thread(target=blast, daemon=True).start()
        sent = alice.send("carol", "still here?")
        assert sent.wait(5) is not None, "another user's send is answered meanwhile"
        answered = time.monotonic() - started
        assert closed_by_server(bob, 5), "the oversize packet's connection is closed"
        closed = time.monotonic() - started
        assert blast_done.wait(5)
        assert carol.wait_for_messages(2)
        rss_after = _rss_kb(system.pid)
        assert rss_after - rss_before < 8 * 1024, f"the broker grew by {(rss_after - rss_before) / 1024:.1f} MB"
        if system.kind == "embedded":
            assert system.server.wait_log("over the limit", 2)
            line = next(line for line in system.server.lines if "over the limit" in line)
            assert "bob" in line and str(announced + len(header)) in line
        assert "SECRET" not in system.log_text()
        print(f"{system.kind} oversize: closed after {closed * 1000:.0f} ms, alice answered after {answered * 1000:.0f} ms, "
              f"RSS {rss_before / 1024:.1f} -> {rss_after / 1024:.1f} MB; limit {MAX_PACKET_BYTES} bytes")
    finally:
        alice.kill()
        carol.kill()
