"""Lean paho load generators speaking docs/PROTOCOL.md, each run as its own process.

    python -m bench.loadgen online  ...   # sender + receiver: throughput (closed loop) or latency (fixed rate)
    python -m bench.loadgen drain   ...   # a receiver drains its backlog: count, then pages acked by cursor
    python -m bench.loadgen mqueue  ...   # Mosquitto's own offline queue: persistent subscriber replays N
    python -m bench.loadgen probe   ...   # count / page round trips, one at a time (growth)
    python -m bench.loadgen statuses ...  # many devices say `online` (retained), for the worker's memory

Passwords come as JSON in $BENCH_SECRETS ({"user": "password"}), never on the command line.
Output: ``MARK start`` / ``MARK end`` around the measured phase (the orchestrator samples the
CPU time of the broker and the worker there), then one ``RESULT {json}`` line.

All paho clients of one process are driven by ONE thread (:class:`Net`: select() over their
sockets, paho's loop_read/loop_write/loop_misc), so there are no network threads, no GIL
hand-offs and no wake-up socket writes per publish: the load generator costs as little CPU
per message as paho allows, leaving the 2 cores to the broker and the system under test.
The reference client (backend.client.IMClient) does much more per message (resend timers,
locks, per-message events). Every MQTT client here sets TCP_NODELAY.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import sys
import time
from typing import Any, Callable

import orjson  # as backend.protocol decodes: the client side of the protocol
import paho.mqtt.client as mqtt

from bench.stats import summary_ms

try:
    from backend.transport.connection import set_nodelay
except ImportError:  # pragma: no cover - run from the repository root, the backend is importable
    import socket

    def set_nodelay(client: mqtt.Client) -> None:
        sock = client.socket()
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

now = time.monotonic  # CLOCK_MONOTONIC: one clock for every process on this machine


def _secret(user: str) -> str | None:
    return json.loads(os.environ.get("BENCH_SECRETS", "{}")).get(user)


def mark(what: str) -> None:
    print(f"MARK {what}", flush=True)


def result(obj: dict) -> None:
    print("RESULT " + json.dumps(obj), flush=True)


def _cpu() -> float:
    return time.process_time()


class Net:
    """Drives every paho client of this process from the calling thread."""

    def __init__(self) -> None:
        self.peers: list[Peer] = []
        self._misc = now()

    def poll(self, timeout: float) -> None:
        socks = {}
        for p in self.peers:
            s = p.c.socket()
            if s is not None:
                socks[s] = p
        if not socks:
            time.sleep(timeout)
            return
        wants = [s for s, p in socks.items() if p.c.want_write()]
        readable, _, _ = select.select(list(socks), wants, [], timeout)
        for s in readable:
            socks[s].c.loop_read(1000)  # every packet already here, up to 1000
        for p in socks.values():
            if p.c.want_write():  # PUBACKs and publishes queued by the callbacks just run
                p.c.loop_write()
        t = now()
        if t - self._misc > 1.0:
            self._misc = t
            for p in socks.values():
                p.c.loop_misc()  # keepalive

    def until(self, done: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
        end = now() + timeout
        while not done():
            left = end - now()
            if left <= 0:
                return False
            self.poll(min(step, left))
        return True


class Peer:
    """One paho client on a :class:`Net`: connect and subscribe wait for the broker's answers."""

    def __init__(self, net: Net, host: str, port: int, username: str | None, client_id: str, *,
                 clean: bool = True, inflight: int = 0, on_message: Callable | None = None,
                 will: tuple[str, bytes] | None = None):
        self.net, self.host, self.port = net, host, port
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean,
                             protocol=mqtt.MQTTv311)
        if username:
            self.c.username_pw_set(username, _secret(username))
        if will:
            self.c.will_set(will[0], will[1], qos=1, retain=True)
        self.c.max_inflight_messages_set(inflight)  # 0: unlimited, and no O(in-flight) scan per PUBACK
        self.reason: Any = None
        self.subacks = 0
        self.c.on_connect = self._on_connect
        self.c.on_subscribe = self._on_subscribe
        if on_message is not None:
            self.c.on_message = on_message
        net.peers.append(self)

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        self.reason = reason_code
        set_nodelay(client)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        self.subacks += 1

    def connect(self, timeout: float = 15) -> "Peer":
        self.c.connect(self.host, self.port, keepalive=60)
        if not self.net.until(lambda: self.reason is not None, timeout) or self.reason.is_failure:
            raise SystemExit(f"connect failed: {self.reason}")
        return self

    def subscribe(self, topics: list[str], timeout: float = 15) -> None:
        before = self.subacks
        self.c.subscribe([(t, 1) for t in topics])
        if not self.net.until(lambda: self.subacks > before, timeout):
            raise SystemExit(f"no SUBACK for {topics}")

    def publish(self, topic: str, payload: bytes | str, retain: bool = False) -> mqtt.MQTTMessageInfo:
        return self.c.publish(topic, payload, qos=1, retain=retain)

    def published(self, info: mqtt.MQTTMessageInfo, timeout: float = 10) -> bool:
        return self.net.until(info.is_published, timeout)

    def close(self) -> None:
        self.c.disconnect()
        self.net.until(lambda: not self.c.want_write(), 2)
        self.net.peers.remove(self)


# --- online: sender -> (worker | relay) -> receiver ----------------------------------------------
class RxDevice:
    """One receiving connection of the receiver: its v1 topics (``dev`` ""), or a device's own topics
    (docs/PROTOCOL.md 12.1). It drops repeated seqs and acks for itself, in batches as backend.client."""

    def __init__(self, o: "Online", uid: str, dev: str):
        self.o, self.dev = o, dev
        base = f"im/u/{uid}/d/{dev}" if dev else f"im/u/{uid}"
        self.inbox, self.reply, self.ack_topic = f"{base}/inbox", f"{base}/reply", f"{base}/ack"
        self.status = f"im/status/{uid}/{dev}" if dev else f"im/status/{uid}"
        self.peer = Peer(o.net, o.a.host, o.a.port, uid, f"{uid}:bench-rx{('-' + dev) if dev else ''}",
                         on_message=self._on_rx, will=(self.status, b"offline"))
        self.seen_seqs: set[int] = set()
        self.got = bytearray(len(o.sent))
        self.pending_acks: list[int] = []
        self.ack_due: float | None = None

    def _on_rx(self, client, userdata, msg):
        t = now()
        o = self.o
        if msg.topic != self.inbox:
            return  # a count announcement on reply: nothing to do
        obj = orjson.loads(msg.payload)
        if o.worker_mode:
            seq = obj["seq"]
            self.pending_acks.append(seq)  # a repeat is acked again, as the protocol asks
            if self.ack_due is None:
                self.ack_due = t + o.ACK_DELAY_S
            if len(self.pending_acks) >= o.ACK_BATCH:
                self.flush_acks()
            if seq in self.seen_seqs:
                o.duplicates += 1
                return
            self.seen_seqs.add(seq)
        mid = obj.get("msg_id", "")
        if not mid.startswith(o.prefix):
            return
        key = mid[len(o.prefix):]
        if key[0] == "p":
            o.probe_hits += 1
            o.probe_got[key] = o.probe_got.get(key, 0) + 1
            if o.probe_got[key] == o.n_devices:
                o.probes_seen.add(key)
            return
        i = int(key)
        if self.got[i]:
            o.duplicates += 1
            return
        self.got[i] = 1
        o.device_pushes += 1
        if o.pushed_devices[i] + 1 == o.n_devices:
            o.pushed[i] = t  # the last of the user's devices has it
        o.pushed_devices[i] += 1
        o._event(i, t)

    def flush_acks(self) -> None:
        seqs, self.pending_acks, self.ack_due = self.pending_acks, [], None
        for k in range(0, len(seqs), self.o.ACK_BATCH):
            self.peer.publish(self.ack_topic, orjson.dumps({"seqs": seqs[k:k + self.o.ACK_BATCH]}))
            self.o.acks_sent += 1

    def connect(self) -> None:
        self.peer.connect()
        self.peer.subscribe([self.inbox, self.reply])
        self.peer.published(self.peer.publish(self.status, b"online", retain=True))


class Online:
    """One receiver and one sender, or several (``--sender a,b,c``: message i goes from sender
    i mod k, so a shared subscription has several topics to spread). Message i has msg_id TAG-i. In latency mode its send time is
    the time it was *scheduled*, so a late sender cannot hide queueing (no coordinated omission)."""

    ACK_BATCH, ACK_DELAY_S = 100, 0.05  # as backend.client: acks of pushes go out in batches
    BURST = 16  # most sends between two reads of the sockets

    def __init__(self, a: argparse.Namespace):
        self.a = a
        self.worker_mode = a.mode == "worker"
        self.tag = os.urandom(3).hex()
        self.prefix = self.tag + "-"
        self.content = ("x" * a.content_bytes).encode()
        # "receipts": "batch" as backend.client sends by default; `--receipts each` measures v1's shape.
        self.receipts_field = b',"receipts":"batch"' if a.receipts == "batch" else b""
        total = a.warmup + a.count + int(a.rate * a.duration) + 1
        self.sent = [0.0] * total
        self.pushed = [0.0] * total
        self.stored = [0.0] * total
        self.delivered = [0.0] * total  # complete: every device has it and the delivered receipt came
        self.receipted = [0.0] * total
        self.completed = 0
        self.duplicates = self.errors = 0
        self.first_error: dict | None = None
        self.probe_hits = 0
        self.probes_seen: set[str] = set()
        self.probe_got: dict[str, int] = {}
        self.acks_sent = 0
        self.device_pushes = 0
        self.pushed_devices = bytearray(total)
        r = a.receiver
        self.senders = [u for u in a.sender.split(",") if u]
        self.send_topics = [f"im/u/{u}/send" for u in self.senders]
        self.net = Net()
        # The receiver: one v1 client (--devices 0), or N device-aware devices d1..dN, each its own
        # connection with its own topics, status and acks (docs/PROTOCOL.md 12). A message is complete
        # when every device has it (and, through the worker, when its sender holds the delivered receipt).
        self.n_devices = max(1, a.devices)
        self.events_needed = self.n_devices + (1 if self.worker_mode else 0)
        self.events = bytearray(total)
        devs = [f"d{k + 1}" for k in range(a.devices)] if a.devices else [""]
        self.rxs = [RxDevice(self, r, dev) for dev in devs]
        self.rx = self.rxs[0]
        self.txs = [Peer(self.net, a.host, a.port, u, f"{u}:bench-tx", on_message=self._on_tx) for u in self.senders]

    def _event(self, i: int, t: float) -> None:
        """One of a message's completion events: a device got it, or its delivered receipt came."""
        e = self.events[i] + 1
        self.events[i] = e
        if e == self.events_needed:
            self.completed += 1
            if self.worker_mode:
                self.delivered[i] = t

    def flush_acks(self) -> None:
        for rx in self.rxs:
            rx.flush_acks()

    # sender: stored / delivered receipts
    def _on_tx(self, client, userdata, msg):
        obj = orjson.loads(msg.payload)
        if obj.get("kind") == "receipts":
            for item in obj["receipts"]:
                self._receipt(item)
        else:
            self._receipt(obj)

    def _receipt(self, obj: dict) -> None:
        t = now()
        if obj.get("kind") != "receipt":
            self.errors += 1
            self.first_error = self.first_error or obj
            return
        mid = obj["msg_id"]
        if not mid.startswith(self.prefix) or mid[len(self.prefix)] == "p":
            return
        i = int(mid[len(self.prefix):])
        if obj["status"] == "delivered":
            if not self.receipted[i]:
                self.receipted[i] = t
                self._event(i, t)
        elif not self.stored[i]:
            self.stored[i] = t

    def send(self, i: int, t: float) -> None:
        self.sent[i] = t
        k = i % len(self.txs)
        self.txs[k].publish(self.send_topics[k], b'{"msg_id":"%s%d","to":"%s","content":"%s"%s}' % (
            self.prefix.encode(), i, self.a.receiver.encode(), self.content, self.receipts_field))

    def poll(self, timeout: float) -> None:
        self.net.poll(timeout)
        t = now()
        for rx in self.rxs:
            if rx.ack_due is not None and t >= rx.ack_due:
                rx.flush_acks()

    def connect(self) -> None:
        for rx in self.rxs:
            rx.connect()
        for tx, u in zip(self.txs, self.senders):
            tx.connect()
            tx.subscribe([f"im/u/{u}/reply"])
        # Probe until a round of probes makes the whole trip: the worker (or relay) is subscribed and
        # has seen the receiver's online status. With several senders each sends two probes a round,
        # so that every worker behind a shared subscription is likely to get one. Probes not pushed
        # wait in the store; harmless.
        per = 1 if len(self.txs) == 1 else 2
        for k in range(60):
            keys = []
            for j in range(per * len(self.txs)):
                key = f"p{k}_{j}"
                keys.append(key)
                tx = j % len(self.txs)
                self.txs[tx].publish(self.send_topics[tx], json.dumps(
                    {"msg_id": self.prefix + key, "to": self.a.receiver, "content": "probe"}))
            end = now() + 0.5
            while not self.probes_seen.issuperset(keys) and now() < end:
                self.poll(0.02)
            if self.probes_seen.issuperset(keys):
                return
        raise SystemExit("no round of probes came through in 30 s")

    def closed_loop(self, first: int, n: int, window: int, timeout: float) -> bool:
        """Send n messages keeping at most `window` incomplete; True if all completed in time."""
        base = self.completed
        end = now() + timeout
        i = first
        while self.completed - base < n:
            # A few sends, then read: a long burst of sends would hold back this process's PUBACKs to
            # the broker, which keeps only 20 messages in flight per client (broker_config/).
            burst = 0
            while i < first + n and (i - first) - (self.completed - base) < window and burst < self.BURST:
                self.send(i, now())
                i += 1
                burst += 1
            if now() > end:
                return False
            if self.errors:
                raise SystemExit(f"the server refused a send: {self.first_error}")
            self.poll(0.0 if burst == self.BURST else 0.01)
        return True

    def open_loop(self, first: int, rate: float, duration: float, grace: float) -> tuple[int, float, float]:
        """Send at `rate`/s for `duration` s on a fixed schedule; wait up to `grace` s after the last."""
        n = int(rate * duration)
        base = self.completed
        t0 = now() + 0.02
        k = 0
        while k < n:
            t = now()
            while k < n and t0 + k / rate <= t:
                self.send(first + k, t0 + k / rate)  # latency counts from the schedule
                k += 1
            self.poll(max(0.0, min(0.002, t0 + k / rate - now())))
        sent_end = now()
        end = t0 + n / rate + grace
        while self.completed - base < n and now() < end:
            self.poll(0.01)
        return n, t0, sent_end


def run_online(a: argparse.Namespace) -> None:
    o = Online(a)
    o.connect()
    if a.warmup and not o.closed_loop(0, a.warmup, a.window, a.timeout):
        raise SystemExit(f"warm-up of {a.warmup} messages did not complete in {a.timeout}s")
    first = a.warmup
    out: dict[str, Any] = {"mode": a.mode, "content_bytes": a.content_bytes, "devices": a.devices}
    cpu0 = _cpu()
    comp = o.delivered if o.worker_mode else o.pushed
    if a.rate:
        mark("start")
        n, t0, sent_end = o.open_loop(first, a.rate, a.duration, a.grace)
        end = now()
        mark("end")
        idx = range(first, first + n)
        got = [i for i in idx if o.pushed[i]]
        out.update(offered_rate=a.rate, duration_s=a.duration, n=n,
                   send_rate=round(n / max(1e-9, sent_end - t0), 1),
                   received=len(got), completed=sum(1 for i in idx if comp[i]),
                   achieved_rate=round(len(got) / max(1e-9, max((o.pushed[i] for i in got), default=t0) - t0), 1),
                   push_latency=summary_ms([o.pushed[i] - o.sent[i] for i in got], n - len(got), end - t0))
        if o.worker_mode:
            dl = [i for i in idx if o.delivered[i]]
            st = [i for i in idx if o.stored[i]]
            out["delivered_latency"] = summary_ms([o.delivered[i] - o.sent[i] for i in dl], n - len(dl), end - t0)
            out["stored_latency"] = summary_ms([o.stored[i] - o.sent[i] for i in st], n - len(st), end - t0)
    else:
        mark("start")
        ok = o.closed_loop(first, a.count, a.window, a.timeout)
        mark("end")
        idx = range(first, first + a.count)
        done = [i for i in idx if comp[i]]
        t0 = o.sent[first]
        last = max((comp[i] for i in done), default=t0)
        pushed = [o.pushed[i] for i in idx if o.pushed[i]]
        out.update(n=a.count, window=a.window, complete=ok, completed=len(done),
                   elapsed_s=round(last - t0, 4), rate=round(len(done) / max(1e-9, last - t0), 1),
                   push_rate=round(len(pushed) / max(1e-9, max(pushed, default=t0) - t0), 1),
                   push_latency=summary_ms([o.pushed[i] - o.sent[i] for i in idx if o.pushed[i]]))
        # Deliveries to devices: each complete message reached every one of the receiver's devices.
        out["device_rate"] = round(out["rate"] * o.n_devices, 1)
        if o.worker_mode:
            out["delivered_latency"] = summary_ms([o.delivered[i] - o.sent[i] for i in done])
    out.update(loadgen_cpu_s=round(_cpu() - cpu0, 3), duplicates=o.duplicates, errors=o.errors,
               first_error=o.first_error, ack_packets=o.acks_sent, device_pushes=o.device_pushes)
    if o.worker_mode:
        o.flush_acks()
    for rx in o.rxs:
        rx.peer.published(rx.peer.publish(rx.status, b"offline", retain=True), 5)
    for tx in o.txs:
        tx.close()
    for rx in o.rxs:
        rx.peer.close()
    result(out)


# --- request/answer helper (drain, probe) -------------------------------------------------------
class Requester:
    def __init__(self, host: str, port: int, uid: str, client_id: str):
        self.uid = uid
        self.answers: dict[str, dict] = {}
        self.pushes = 0
        self.net = Net()
        self.peer = Peer(self.net, host, port, uid, client_id, on_message=self._on_msg,
                         will=(f"im/status/{uid}", b"offline"))

    def _on_msg(self, client, userdata, msg):
        if msg.topic.endswith("/inbox"):
            self.pushes += 1
            return
        obj = orjson.loads(msg.payload)
        if "req_id" in obj:
            self.answers[obj["req_id"]] = obj

    def request(self, body: dict, timeout: float = 10.0, tries: int = 3) -> dict:
        """Publish and wait for the answer with this req_id; resend the same request on silence."""
        payload = json.dumps(body)
        req_id = body["req_id"]
        for _ in range(tries):
            self.peer.publish(f"im/u/{self.uid}/req", payload)
            if self.net.until(lambda: req_id in self.answers, timeout, step=0.01):
                return self.answers.pop(req_id)
        raise SystemExit(f"no answer to {body}")


def run_drain(a: argparse.Namespace) -> None:
    """Come online, count, then pull pages of `limit`, each request acking the page before."""
    cpu0 = _cpu()
    mark("start")
    t0 = now()
    r = Requester(a.host, a.port, a.uid, f"{a.uid}:bench-drain")
    r.peer.connect()
    r.peer.subscribe([f"im/u/{a.uid}/inbox", f"im/u/{a.uid}/reply"])
    r.peer.publish(f"im/status/{a.uid}", b"online", retain=True)
    t_count = now()
    count = r.request({"req_id": "c", "op": "count"}, timeout=a.timeout)
    count_s = now() - t_count
    seqs: set[int] = set()
    received = pages = 0
    cursor = None
    page_s: list[float] = []
    while True:
        body: dict[str, Any] = {"req_id": f"p{pages}", "op": "pull", "limit": a.limit}
        if cursor:
            body["ack"] = cursor
        t = now()
        page = r.request(body, timeout=a.timeout)
        page_s.append(now() - t)
        if page.get("kind") != "page":
            raise SystemExit(f"pull failed: {page}")
        pages += 1
        for m in page["messages"]:
            seqs.add(m["seq"])
        received += len(page["messages"])
        cursor = page["cursor"]
        if cursor is None:
            break
    elapsed = now() - t0
    mark("end")
    r.peer.published(r.peer.publish(f"im/status/{a.uid}", b"offline", retain=True), 5)
    r.peer.close()
    result({"expected": a.expect, "count_total": count.get("total"), "received": received, "distinct": len(seqs),
            "pages": pages, "limit": a.limit, "elapsed_s": round(elapsed, 4), "rate": round(len(seqs) / elapsed, 1),
            "count_ms": round(count_s * 1000, 3), "page_latency": summary_ms(page_s), "pushes": r.pushes,
            "loadgen_cpu_s": round(_cpu() - cpu0, 3)})


def run_mqueue(a: argparse.Namespace) -> None:
    """The baseline for offline drain: the broker's own offline queue for a persistent session."""
    topic = f"im/u/{a.uid}/inbox"
    cid = f"{a.uid}:bench-queue"
    net = Net()
    sub = Peer(net, a.host, a.port, a.uid, cid, clean=False).connect()
    sub.subscribe([topic])
    sub.close()  # a clean DISCONNECT: the session and its subscription stay; messages queue for it
    acked = [0]
    pub = Peer(net, a.host, a.port, a.pub_user, a.pub_client_id)
    pub.c.on_publish = lambda *_: acked.__setitem__(0, acked[0] + 1)
    pub.connect()
    content = ("x" * a.content_bytes).encode()
    t_fill = now()
    end = t_fill + a.timeout
    for i in range(a.n):  # the same shape as the worker's pushes and page entries
        while i - acked[0] >= 100:
            net.poll(0.01)
            if now() > end:
                raise SystemExit(f"the broker acknowledged {acked[0]} of {a.n} publishes")
        pub.publish(topic, b'{"kind":"msg","seq":%d,"msg_id":"m-%d","from":"s%d","to":"%s","type":"text",'
                           b'"content":"%s","sent_at":%d}' % (i + 1, i, i % 10, a.uid.encode(), content,
                                                               int(time.time() * 1000)))
    if not net.until(lambda: acked[0] >= a.n, a.timeout):
        raise SystemExit(f"the broker acknowledged {acked[0]} of {a.n} publishes")
    fill_s = now() - t_fill
    pub.close()
    time.sleep(0.2)
    seqs: set[int] = set()
    last = [0.0]

    def on_message(client, userdata, msg):
        p = msg.payload
        seqs.add(int(p[20:p.index(b",", 20)]))  # b'{"kind":"msg","seq":' is 20 bytes
        last[0] = now()

    cpu0 = _cpu()
    mark("start")
    t0 = now()
    rx = Peer(net, a.host, a.port, a.uid, cid, clean=False, on_message=on_message)
    rx.connect()
    ok = net.until(lambda: len(seqs) >= a.n, a.timeout, step=0.01)
    t1 = last[0] if ok else now()
    mark("end")
    rx.close()
    result({"n": a.n, "received": len(seqs), "complete": ok, "fill_s": round(fill_s, 3),
            "elapsed_s": round(t1 - t0, 4), "rate": round(len(seqs) / (t1 - t0), 1),
            "loadgen_cpu_s": round(_cpu() - cpu0, 3)})


def run_probe(a: argparse.Namespace) -> None:
    """Round trips one at a time: count, first page (no ack), then a drain (each pull acks the last)."""
    r = Requester(a.host, a.port, a.uid, f"{a.uid}:bench-probe")
    r.peer.connect()
    r.peer.subscribe([f"im/u/{a.uid}/reply"])  # no online status: no announcement, no pushes
    r.request({"req_id": "warm", "op": "count"}, timeout=1.0, tries=30)  # until the worker answers
    out: dict[str, Any] = {"uid": a.uid, "reps": a.reps, "limit": a.limit}
    mark("start")
    for name in ("count", "page", "page_ack"):
        times: list[float] = []
        cursor = None
        for k in range(a.reps):
            body: dict[str, Any] = {"req_id": f"{name}{k}", "op": "count" if name == "count" else "pull"}
            if name != "count":
                body["limit"] = a.limit
            if name == "page_ack" and cursor:
                body["ack"] = cursor
            t = now()
            ans = r.request(body, timeout=a.timeout)
            times.append(now() - t)
            if name == "count":
                out["count_total"] = ans.get("total")
            else:
                cursor = ans.get("cursor")
        out[name] = summary_ms(times)
    mark("end")
    r.peer.close()
    result(out)


def run_statuses(a: argparse.Namespace) -> None:
    """Devices come online: users PREFIX0..PREFIX{users-1}, each connects once, publishes a retained
    `online` on im/status/{uid}/d1..dN (docs/PROTOCOL.md 12.4) and disconnects; the statuses stay."""
    net = Net()
    mark("start")
    t0 = now()
    n = 0
    for k in range(a.users):
        uid = f"{a.prefix}{k}"
        peer = Peer(net, a.host, a.port, uid, f"{uid}:bench-status").connect()
        infos = [peer.publish(f"im/status/{uid}/d{j + 1}", b"online", retain=True) for j in range(a.per_user)]
        if not net.until(lambda: all(i.is_published() for i in infos), a.timeout):
            raise SystemExit(f"the broker did not acknowledge {uid}'s statuses in {a.timeout}s")
        n += len(infos)
        peer.close()
    elapsed = now() - t0
    mark("end")
    result({"devices": n, "users": a.users, "elapsed_s": round(elapsed, 3)})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.loadgen")
    sub = ap.add_subparsers(dest="cmd", required=True)
    on = sub.add_parser("online")
    on.add_argument("--mode", choices=["worker", "relay"], required=True)
    on.add_argument("--sender", default="alice", help="sender user, or several separated by commas")
    on.add_argument("--receiver", default="bob")
    on.add_argument("--devices", type=int, default=0,
                    help="the receiver's devices: 0 (default) one v1 client; N: N device-aware devices d1..dN")
    on.add_argument("--count", type=int, default=0, help="closed loop: messages to measure")
    on.add_argument("--window", type=int, default=1000, help="closed loop: most messages not yet complete")
    on.add_argument("--rate", type=float, default=0.0, help="open loop: messages per second")
    on.add_argument("--duration", type=float, default=0.0)
    on.add_argument("--grace", type=float, default=5.0)
    on.add_argument("--warmup", type=int, default=200)
    on.add_argument("--content-bytes", type=int, default=100)
    on.add_argument("--receipts", choices=["batch", "each"], default="batch",
                    help="the senders' receipt mode (docs/PROTOCOL.md 4.4); backend.client asks for batch")
    dr = sub.add_parser("drain")
    dr.add_argument("--uid", default="bob")
    dr.add_argument("--limit", type=int, default=500)
    dr.add_argument("--expect", type=int, default=0)
    mq = sub.add_parser("mqueue")
    mq.add_argument("--uid", default="bob")
    mq.add_argument("--n", type=int, required=True)
    mq.add_argument("--pub-user", required=True)
    mq.add_argument("--pub-client-id", default="bench-pub")
    mq.add_argument("--content-bytes", type=int, default=100)
    pr = sub.add_parser("probe")
    pr.add_argument("--uid", required=True)
    pr.add_argument("--reps", type=int, default=20)
    pr.add_argument("--limit", type=int, default=100)
    st = sub.add_parser("statuses")
    st.add_argument("--prefix", default="u")
    st.add_argument("--users", type=int, required=True)
    st.add_argument("--per-user", type=int, default=10)
    for p in (on, dr, mq, pr, st):
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--port", type=int, required=True)
        p.add_argument("--timeout", type=float, default=60.0)
    a = ap.parse_args(argv)
    {"online": run_online, "drain": run_drain, "mqueue": run_mqueue, "probe": run_probe,
     "statuses": run_statuses}[a.cmd](a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
