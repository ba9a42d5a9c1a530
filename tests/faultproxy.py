"""A fault-injecting TCP proxy for the tests: a mobile link between clients and a broker (or a database).

No maintained library fits here (toxiproxy is a Go server packaged neither in Debian nor on PyPI),
so this is a small asyncio proxy run on its own event loop in a daemon thread, steered from the
test's thread:

* **latency and jitter**: every chunk is held ``latency_s`` +/- ``jitter_s`` (uniform, seeded)
  before it is written on, in order (a chunk never overtakes the one before it, as in TCP);
* **bandwidth**: each direction of each connection is limited to ``bandwidth_bps`` bytes a second;
* **resets**: ``reset()`` aborts a connection on both sides with an RST (SO_LINGER 0), as a NAT or
  a mobile network dropping its state;
* **black holes**: ``blackhole()`` stops forwarding in both directions and keeps both sockets open:
  what either side sends is read and thrown away, no FIN and no RST ever arrives, so only a
  keepalive can tell the connection is dead (a phone whose radio went away);
* **down**: ``set_down("closed")`` stops listening (a new connection is refused by the kernel, as a
  stopped server's port); ``set_down("refuse")`` accepts and resets each new connection at once (as
  a firewall's RST); ``set_down("blackhole")`` accepts them and black-holes them; ``set_down(None)``
  restores, on the same port.

Connections are named by the peer port of the client side (``getsockname()[1]`` of the client's
socket), so a test can pick a given client's link.
"""

from __future__ import annotations

import asyncio
import random
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

# Bytes read per recv(): a chunk is the unit that latency and bandwidth are applied to.
CHUNK = 16 * 1024
# Chunks held per direction of a connection before the proxy stops reading from that side.
QUEUE_CHUNKS = 64
_EOF = object()


def _rst(writer: asyncio.StreamWriter | None) -> None:
    """Close with an RST instead of a FIN: SO_LINGER on with a zero timeout, then abort."""
    if writer is None:
        return
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()


@dataclass
class _Conn:
    cid: int  # the client's own port
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    blackholed: bool = False
    closed: bool = False
    eofs: int = 0  # directions closed cleanly (FIN passed on); at 2 the connection is done
    tasks: list = field(default_factory=list)


@dataclass
class Stats:
    accepted: int = 0
    refused: int = 0
    resets: int = 0
    blackholed: int = 0
    bytes_up: int = 0  # client -> upstream, forwarded
    bytes_down: int = 0  # upstream -> client, forwarded
    bytes_dropped: int = 0  # read from a black-holed connection and thrown away


class FaultProxy:
    """``FaultProxy(upstream_port).start()``; clients connect to ``proxy.port``. ``close()`` ends it all."""

    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1", *, host: str = "127.0.0.1",
                 latency_s: float = 0.0, jitter_s: float = 0.0, bandwidth_bps: float | None = None,
                 seed: int = 0):
        self.upstream = (upstream_host, upstream_port)
        self.host, self.port = host, 0
        self.latency_s, self.jitter_s, self.bandwidth_bps = latency_s, jitter_s, bandwidth_bps
        self.down: str | None = None
        self.stats = Stats()
        self._rng = random.Random(seed)
        self._conns: dict[int, _Conn] = {}
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.base_events.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="faultproxy", daemon=True)

    # -- control, from any thread ----------------------------------------------------
    def start(self) -> "FaultProxy":
        self._thread.start()
        self._call(self._listen)
        return self

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        self._call(self._shutdown)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def set_link(self, *, latency_s: float | None = None, jitter_s: float | None = None,
                 bandwidth_bps: float | None = -1) -> None:
        """Change the link's delay and bandwidth for what is forwarded from now on (None: unlimited)."""
        if latency_s is not None:
            self.latency_s = latency_s
        if jitter_s is not None:
            self.jitter_s = jitter_s
        if bandwidth_bps != -1:
            self.bandwidth_bps = bandwidth_bps

    def connections(self, include_blackholed: bool = False) -> list[int]:
        """The ids (client ports) of the open connections, oldest first."""
        return self._call(self._list, include_blackholed)

    def reset(self, cid: int | None = None) -> int:
        """RST one connection (``cid``) or all of them, on both sides; returns how many."""
        return self._call(self._reset, cid)

    def blackhole(self, cid: int | None = None) -> int:
        """Silence one connection (``cid``) or all of them: nothing more passes, nothing is closed."""
        return self._call(self._blackhole, cid)

    def set_down(self, mode: str | None) -> None:
        """None: accept and forward; "closed": not listening; "refuse": RST every new connection;
        "blackhole": accept and silence it. Open connections are left as they are (see reset/blackhole)."""
        assert mode in (None, "closed", "refuse", "blackhole"), mode
        was, self.down = self.down, mode
        if mode == "closed" and was != "closed":
            self._call(self._unlisten)
        elif mode != "closed" and was == "closed":
            self._call(self._listen)

    def _call(self, fn, *args):
        async def run():
            return fn(*args)
        if asyncio.iscoroutinefunction(fn):
            return asyncio.run_coroutine_threadsafe(fn(*args), self._loop).result(10)
        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)

    # -- on the proxy's loop ----------------------------------------------------------------
    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.host, self.port)  # 0 the first time
        self.port = self._server.sockets[0].getsockname()[1]

    async def _unlisten(self) -> None:
        self._server.close()  # the listening socket only (no wait_closed: from 3.12 it waits for every connection)

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for c in list(self._conns.values()):
            self._close(c, rst=True)

    def _list(self, include_blackholed: bool) -> list[int]:
        return [c.cid for c in self._conns.values() if not c.closed and (include_blackholed or not c.blackholed)]

    def _reset(self, cid: int | None) -> int:
        victims = [c for c in self._conns.values() if cid is None or c.cid == cid]
        for c in victims:
            self._close(c, rst=True)
        self.stats.resets += len(victims)
        return len(victims)

    def _blackhole(self, cid: int | None) -> int:
        victims = [c for c in self._conns.values() if (cid is None or c.cid == cid) and not c.blackholed]
        for c in victims:
            c.blackholed = True
        self.stats.blackholed += len(victims)
        return len(victims)

    def _close(self, c: _Conn, rst: bool) -> None:
        if c.closed:
            return
        c.closed = True
        self._conns.pop(c.cid, None)
        for w in (c.client, c.upstream):
            if w is None:
                continue
            if rst:
                _rst(w)
            else:
                w.close()
        for t in c.tasks:
            if t is not asyncio.current_task():
                t.cancel()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        cid = writer.get_extra_info("peername")[1]
        c = _Conn(cid, writer)
        if self.down == "refuse":
            self.stats.refused += 1
            _rst(writer)
            return
        self.stats.accepted += 1
        self._conns[cid] = c
        _nodelay(writer)
        if self.down == "blackhole":
            c.blackholed = True
            self.stats.blackholed += 1
            c.tasks.append(asyncio.current_task())
            await self._swallow(c, reader)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            self._close(c, rst=True)  # the upstream refused: so do we
            return
        if c.closed:  # reset while connecting
            _rst(up_writer)
            return
        c.upstream = up_writer
        _nodelay(up_writer)
        c.tasks = [asyncio.ensure_future(self._pump(c, reader, up_writer, up=True)),
                   asyncio.ensure_future(self._pump(c, up_reader, writer, up=False))]

    async def _swallow(self, c: _Conn, reader: asyncio.StreamReader) -> None:
        """A black-holed side: read and drop until the peer closes; answer nothing, close nothing."""
        try:
            while data := await reader.read(CHUNK):
                self.stats.bytes_dropped += len(data)
        except (OSError, asyncio.CancelledError):
            pass

    async def _pump(self, c: _Conn, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, up: bool) -> None:
        """One direction: read chunks, hold each until its delivery time, write it on in order."""
        # Bounded: a slow link pushes back on the sender (TCP flow control) instead of buffering without end.
        queue: asyncio.Queue = asyncio.Queue(maxsize=QUEUE_CHUNKS)
        sender = asyncio.ensure_future(self._deliver(c, queue, writer, up))
        c.tasks.append(sender)
        last = free = 0.0  # delivery time of the previous chunk; when the link's bandwidth is free again
        try:
            while True:
                data = await reader.read(CHUNK)
                if c.blackholed:
                    if not data:
                        return await self._hold(c)  # a FIN from this side: swallowed too, sockets stay open
                    self.stats.bytes_dropped += len(data)
                    continue
                if not data:
                    await queue.put((last, _EOF))
                    return
                now = time.monotonic()
                delay = max(0.0, self.latency_s + self._rng.uniform(-self.jitter_s, self.jitter_s))
                at = max(last, now + delay)
                if self.bandwidth_bps:
                    start = max(free, now)
                    free = start + len(data) / self.bandwidth_bps
                    at = max(at, free + delay)
                last = at
                await queue.put((at, data))
        except (OSError, asyncio.IncompleteReadError):
            if not c.blackholed:
                self._close(c, rst=True)  # a reset on one side is passed on as a reset
        except asyncio.CancelledError:
            pass

    async def _hold(self, c: _Conn) -> None:
        while not c.closed:
            await asyncio.sleep(1)

    async def _deliver(self, c: _Conn, queue: asyncio.Queue, writer: asyncio.StreamWriter, up: bool) -> None:
        try:
            while True:
                at, data = await queue.get()
                wait = at - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                if c.blackholed:
                    continue  # packets in flight vanish too
                if data is _EOF:
                    if writer.can_write_eof():
                        writer.write_eof()  # a FIN passes on as a FIN (half-close)
                    c.eofs += 1
                    if c.eofs == 2:
                        self._close(c, rst=False)
                    return
                writer.write(data)
                if up:
                    self.stats.bytes_up += len(data)
                else:
                    self.stats.bytes_down += len(data)
                await writer.drain()
        except (OSError, ConnectionError):
            if not c.blackholed:
                self._close(c, rst=True)
        except asyncio.CancelledError:
            pass


def _nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
