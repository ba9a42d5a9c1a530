"""The fault proxy itself (tests/faultproxy.py), against a plain TCP echo server: each fault does what it says."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from faultproxy import FaultProxy


class Echo:
    """A TCP server that echoes; ``events`` records how each of its connections ended (eof / reset)."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.events: list[str] = []
        self.conns: list[socket.socket] = []
        self.ended = threading.Condition()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(c)
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c):
        try:
            while data := c.recv(65536):
                c.sendall(data)
            event = "eof"
        except ConnectionResetError:
            event = "reset"
        except OSError:
            event = "closed"
        c.close()
        with self.ended:
            self.events.append(event)
            self.ended.notify_all()

    def wait_event(self, timeout=5.0):
        with self.ended:
            self.ended.wait_for(lambda: self.events, timeout)
            return list(self.events)

    def close(self):
        self.sock.close()
        for c in self.conns:
            c.close()


@pytest.fixture
def echo():
    e = Echo()
    yield e
    e.close()


@pytest.fixture
def proxy(echo):
    made = []

    def make(**kw):
        p = FaultProxy(echo.port, **kw).start()
        made.append(p)
        return p
    yield make
    for p in made:
        p.close()


def connect(p: FaultProxy) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", p.port), timeout=5)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def recv_exactly(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return buf


def test_forwards_in_order_with_latency_and_jitter(proxy):
    p = proxy(latency_s=0.05, jitter_s=0.04, seed=1)
    s = connect(p)
    t0 = time.monotonic()
    s.sendall(b"ping")
    assert recv_exactly(s, 4) == b"ping"
    assert time.monotonic() - t0 >= 2 * 0.01  # two legs, each at least latency - jitter
    # many small writes under jitter still arrive in order
    want = b"".join(b"%04d" % i for i in range(200))
    for i in range(200):
        s.sendall(b"%04d" % i)
    assert recv_exactly(s, len(want)) == want
    s.close()


def test_bandwidth_limit(proxy):
    p = proxy(bandwidth_bps=200_000)
    s = connect(p)
    data = b"x" * 100_000
    t0 = time.monotonic()
    threading.Thread(target=s.sendall, args=(data,), daemon=True).start()
    assert recv_exactly(s, len(data)) == data
    took = time.monotonic() - t0
    assert took >= 0.45, took  # 100 kB at 200 kB/s is 0.5 s (each way, pipelined)
    s.close()


def test_reset_is_an_rst_on_both_sides(proxy, echo):
    p = proxy()
    s = connect(p)
    s.sendall(b"hi")
    assert recv_exactly(s, 2) == b"hi"
    assert p.reset() == 1
    with pytest.raises(ConnectionResetError):
        s.recv(10)
    assert echo.wait_event() == ["reset"]
    assert p.connections() == []


def test_blackhole_keeps_both_sides_open_and_silent(proxy, echo):
    p = proxy()
    s = connect(p)
    s.sendall(b"hi")
    assert recv_exactly(s, 2) == b"hi"
    (cid,) = p.connections()
    assert cid == s.getsockname()[1]  # connections are named by the client's port
    assert p.blackhole(cid) == 1
    s.sendall(b"lost")  # the write succeeds locally...
    s.settimeout(1.0)
    with pytest.raises(socket.timeout):  # ...and nothing comes back: no echo, no FIN, no RST
        s.recv(10)
    assert echo.events == []  # the far side saw nothing either: its connection is still open
    echo.conns[0].shutdown(socket.SHUT_RDWR)  # the far side gives up: its FIN vanishes too
    with pytest.raises(socket.timeout):
        s.recv(10)
    assert p.stats.bytes_dropped >= 4
    s.close()


def test_down_refuses_then_recovers(proxy):
    p = proxy()
    p.set_down("refuse")
    with pytest.raises((ConnectionResetError, BrokenPipeError)):  # at once, or at the first read
        with socket.create_connection(("127.0.0.1", p.port), timeout=5) as s:
            s.recv(10)
    assert p.stats.refused == 1
    p.set_down(None)
    s = connect(p)
    s.sendall(b"back")
    assert recv_exactly(s, 4) == b"back"
    s.close()


def test_clean_close_passes_a_fin(proxy, echo):
    p = proxy()
    s = connect(p)
    s.sendall(b"bye")
    s.shutdown(socket.SHUT_WR)
    assert recv_exactly(s, 3) == b"bye"
    assert s.recv(10) == b""  # the echo server saw our FIN, closed, and its FIN came back
    assert echo.wait_event() == ["eof"]
    s.close()


def test_closed_port_refuses_then_listens_again_on_the_same_port(proxy):
    p = proxy()
    port = p.port
    s0 = connect(p)
    s0.sendall(b"open")
    assert recv_exactly(s0, 4) == b"open"
    p.set_down("closed")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5)
    s0.sendall(b"still")  # a connection already open is left alone
    assert recv_exactly(s0, 5) == b"still"
    s0.close()
    p.set_down(None)
    assert p.port == port
    s = connect(p)
    s.sendall(b"up")
    assert recv_exactly(s, 2) == b"up"
    s.close()
