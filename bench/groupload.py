"""Load generator for group fan-out: many light member connections driven by one epoll loop.

    python -m bench.groupload fanout ...  # baseline: one publisher, N subscribers of one topic (the broker's fan-out)
    python -m bench.groupload group  ...  # a group of N members and one sender through the worker (PROTOCOL.md 14)

Passwords come as JSON in $BENCH_SECRETS ({"user": "password"}), as for bench/loadgen.py. Output: ``MARK
start`` / ``MARK end`` around the throughput phase (the orchestrator samples CPU there), then one
``RESULT {json}`` line.

Every member is its own MQTT connection (paho, QoS 1, TCP_NODELAY, clean session) on the v1 topics of its
own account; all of them, and the sender, are driven by one thread (:class:`Loop`: epoll over their sockets,
so past select()'s 1,024 descriptors). A member of the group drops seqs it has seen, acks every push
(batched by 100 seqs or 50 ms, as backend.client), and on an announcement pulls pages acking each by cursor
until the empty page: what the protocol asks of a receiver, so the store drains. A fan-out subscriber only
PUBACKs (MQTT's own acknowledgement), as the broker asks of it.

A message is complete when the last of its N receivers has it; its latency is from its send to then.
:class:`Members` is also what tests/test_group_scale.py drives (through :func:`open_group`).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import selectors
import sqlite3
import sys
import time
from collections import deque
from typing import Any, Callable

import orjson
import paho.mqtt.client as mqtt

from bench.stats import summary_ms

from backend.transport.connection import set_nodelay

now = time.monotonic
ACK_BATCH, ACK_DELAY_S = 100, 0.05  # as backend.client: acks of pushes gathered by 100 or 50 ms
PULL_LIMIT = 500  # a member's pull page size when an announcement says something waits
CONNECT_BATCH = 200  # connections opened before waiting for their CONNACKs (stays under the listen backlog)
KEEPALIVE_S = 300  # long: 1,000 idle members need no PINGs during a run; loop_misc runs every 10 s anyway


@functools.lru_cache(maxsize=1)
def _secrets() -> dict:
    return json.loads(os.environ.get("BENCH_SECRETS", "{}"))


def _secret(user: str) -> str | None:
    return _secrets().get(user)


def mark(what: str) -> None:
    print(f"MARK {what}", flush=True)


class Loop:
    """Drives many paho clients from the calling thread: epoll for reads, a set of peers with bytes to write."""

    def __init__(self) -> None:
        self.sel = selectors.DefaultSelector()
        self.peers: list[Peer] = []
        self.writers: set[Peer] = set()
        self.hooks: list[Callable[[], None]] = []  # run after each round of reads (ack timers)
        self.dead: list[str] = []
        self._misc = now()

    def poll(self, timeout: float) -> None:
        if self.sel.get_map():
            events = self.sel.select(timeout)
        else:
            time.sleep(timeout)
            events = []
        for key, _ in events:
            p: Peer = key.data
            c = p.c
            # Every packet waiting, not one per poll: paho's loop_read reads one packet when nothing of ours is in
            # flight. Its _packet_read is what loop_read calls (paho is pinned: requirements.txt).
            for _ in range(256):
                rc = c._packet_read()
                if rc == mqtt.MQTT_ERR_AGAIN:
                    break
                if rc:
                    c._loop_rc_handle(rc)
                    self._lost(p, rc)
                    break
            self.writers.add(p)
        for hook in self.hooks:
            hook()
        if self.writers:
            busy = set()
            for p in self.writers:
                if p.c.want_write():
                    p.c.loop_write()
                    if p.c.want_write():
                        busy.add(p)  # socket buffer full: try again next poll
            self.writers = busy
        t = now()
        if t - self._misc > 10.0:
            self._misc = t
            for p in self.peers:
                p.c.loop_misc()

    def _lost(self, p: "Peer", rc) -> None:
        self.dead.append(f"{p.client_id}: {mqtt.error_string(rc)}")
        try:
            self.sel.unregister(p.sock)
        except (KeyError, ValueError):
            pass

    def until(self, done: Callable[[], bool], timeout: float, step: float = 0.02) -> bool:
        end = now() + timeout
        while not done():
            if self.dead:
                raise SystemExit(f"connections lost: {self.dead[:5]} ({len(self.dead)} in all)")
            left = end - now()
            if left <= 0:
                return False
            self.poll(min(step, left))
        return True


class Peer:
    """One paho client on a :class:`Loop`."""

    def __init__(self, loop: Loop, host: str, port: int, username: str, client_id: str, *,
                 on_message: Callable | None = None, will: tuple[str, bytes] | None = None,
                 password: str | None = None):
        self.loop, self.host, self.port, self.client_id = loop, host, port, client_id
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True,
                             protocol=mqtt.MQTTv311)
        self.c.username_pw_set(username, password if password is not None else _secret(username))
        if will:
            self.c.will_set(will[0], will[1], qos=1, retain=True)
        self.c.max_inflight_messages_set(0)  # unlimited: the broker's own window (20) is what bounds
        self.connack: Any = None
        self.subacks = 0
        self.sock = None
        self.c.on_connect = self._on_connect
        self.c.on_subscribe = lambda *a: setattr(self, "subacks", self.subacks + 1)
        if on_message is not None:
            self.c.on_message = on_message
        loop.peers.append(self)

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        self.connack = reason_code

    def start_connect(self) -> None:
        """Open the TCP connection and send CONNECT; the CONNACK comes through the loop."""
        self.c.connect(self.host, self.port, keepalive=KEEPALIVE_S)
        set_nodelay(self.c)
        self.sock = self.c.socket()
        self.loop.sel.register(self.sock, selectors.EVENT_READ, self)

    def publish(self, topic: str, payload: bytes | str, retain: bool = False) -> mqtt.MQTTMessageInfo:
        info = self.c.publish(topic, payload, qos=1, retain=retain)
        self.loop.writers.add(self)
        return info

    def subscribe(self, topics: list[str]) -> None:
        self.c.subscribe([(t, 1) for t in topics])
        self.loop.writers.add(self)

    def close(self) -> None:
        try:
            self.c.disconnect()
            self.c.loop_write()
        except Exception:  # noqa: BLE001 - closing anyway
            pass
        try:
            self.loop.sel.unregister(self.sock)
        except (KeyError, ValueError):
            pass
        self.c._sock_close()


def connect_all(loop: Loop, peers: list[Peer], timeout: float) -> None:
    """Connect every peer, CONNECT_BATCH at a time; SystemExit if any is refused or silent."""
    for k in range(0, len(peers), CONNECT_BATCH):
        batch = peers[k:k + CONNECT_BATCH]
        for p in batch:
            p.start_connect()
        if not loop.until(lambda: all(p.connack is not None for p in batch), timeout):
            missing = sum(1 for p in batch if p.connack is None)
            raise SystemExit(f"{missing} connections got no CONNACK in {timeout} s")
        bad = [p.client_id for p in batch if p.connack.is_failure]
        if bad:
            raise SystemExit(f"connections refused: {bad[:5]} ({len(bad)} in all)")


def subscribe_all(loop: Loop, peers: list[Peer], topics_of: Callable[[Peer], list[str]], timeout: float) -> None:
    before = {id(p): p.subacks for p in peers}
    for p in peers:
        p.subscribe(topics_of(p))
    if not loop.until(lambda: all(p.subacks > before[id(p)] for p in peers), timeout):
        raise SystemExit(f"SUBACKs missing after {timeout} s")


# --- the members ---------------------------------------------------------------------------------
class Tally:
    """Arrivals of messages 0..total-1 at ``receivers`` receivers: per message how many have it and when
    the last one got it."""

    def __init__(self, total: int, receivers: int):
        self.total, self.receivers = total, receivers
        self.count = [0] * total
        self.last = [0.0] * total
        self.completed = 0
        self.deliveries = 0

    def arrived(self, i: int, t: float) -> None:
        c = self.count[i] + 1
        self.count[i] = c
        self.deliveries += 1
        if c == self.receivers:
            self.last[i] = t
            self.completed += 1


class Member:
    """A member of the group (worker mode) or a subscriber of the fan-out topic (baseline)."""

    def __init__(self, ms: "Members", uid: str):
        self.ms, self.uid = ms, uid
        self.inbox, self.reply = f"im/u/{uid}/inbox", f"im/u/{uid}/reply"
        self.status = f"im/status/{uid}"
        self.peer = Peer(ms.loop, ms.host, ms.port, uid, f"{uid}:bench-g", on_message=self._on_message,
                         will=(self.status, b"offline") if ms.worker_mode else None,
                         password=ms.password_of(uid))
        self.seen: set[int] = set()  # seqs (worker mode)
        self.got = bytearray(ms.tally.total)  # message indexes this member has
        self.pending: list[int] = []
        self.ack_due: float | None = None
        self.ready = False
        self.pulling = False
        self.pull_again = False
        self.cursor: str | None = None
        self.pulls = 0
        self.events: list[dict] = []  # group_event messages (worker mode)
        self.other: list[dict] = []  # messages of this group not sent by the load generator

    def _on_message(self, client, userdata, msg) -> None:
        t = now()
        ms = self.ms
        if not ms.worker_mode:
            p = msg.payload  # b'{"kind":"msg","seq":I,...': the index is the seq
            self._arrived(int(p[20:p.index(b",", 20)]), t)
            return
        obj = orjson.loads(msg.payload)
        if msg.topic == self.inbox:
            seq = obj["seq"]
            self.pending.append(seq)  # a repeat is acked again, as the protocol asks
            if self.ack_due is None:
                self.ack_due = t + ms.ack_delay_s
                ms.ack_queue.append(self)
            self._msg(obj, seq, t)
            return
        kind = obj.get("kind")
        if kind == "count":
            if obj.get("req_id") == "ready":
                self.ready = True
            if obj.get("req_id") is None and obj.get("total", 0) > 0:
                self.sync()
        elif kind == "page":
            for m in obj["messages"]:
                self._msg(m, m["seq"], t)
            self.cursor = obj.get("cursor")
            if self.cursor is not None:
                self._pull()
            else:
                self.pulling = False
                if self.pull_again:
                    self.sync()
        elif kind == "error":
            ms.errors.append({"uid": self.uid, **obj})

    def _msg(self, obj: dict, seq: int, t: float) -> None:
        ms = self.ms
        if seq in self.seen:
            ms.repeats += 1
            return
        self.seen.add(seq)
        if obj.get("group") != ms.group:
            ms.foreign += 1
            return
        if obj.get("type") == "group_event":
            self.events.append(obj)
            return
        mid = obj.get("msg_id", "")
        if mid.startswith(ms.prefix):
            self._arrived(int(mid[len(ms.prefix):]), t)
        else:
            self.other.append(obj)

    def _arrived(self, i: int, t: float) -> None:
        if self.got[i]:
            self.ms.twice += 1  # the same message under another seq: never expected
            return
        self.got[i] = 1
        self.ms.tally.arrived(i, t)

    def sync(self) -> None:
        """Pull pages until the empty page (an announcement during a sync means: once more after it)."""
        if self.pulling:
            self.pull_again = True
            return
        self.pulling, self.pull_again, self.cursor = True, False, None
        self._pull()

    def _pull(self) -> None:
        body: dict[str, Any] = {"op": "pull", "req_id": f"p{self.pulls}", "limit": PULL_LIMIT}
        if self.cursor:
            body["ack"] = self.cursor
        self.pulls += 1
        self.ms.pulls += 1
        self.peer.publish(f"im/u/{self.uid}/req", orjson.dumps(body))

    def flush_acks(self) -> None:
        seqs, self.pending, self.ack_due = self.pending, [], None
        for k in range(0, len(seqs), ACK_BATCH):
            self.peer.publish(f"im/u/{self.uid}/ack", orjson.dumps({"seqs": seqs[k:k + ACK_BATCH]}))
            self.ms.ack_packets += 1


class Members:
    """N member connections on one loop, and the message tally they share.

    ``worker_mode``: members of a group on their v1 topics (online status, pushes acked, announcements pulled);
    else subscribers of ``topic`` (the baseline). ``passwords``: uid -> password (default $BENCH_SECRETS)."""

    def __init__(self, host: str, port: int, uids: list[str], total: int, *, worker_mode: bool,
                 group: str = "", prefix: str = "", topic: str = "", passwords: dict | None = None,
                 loop: Loop | None = None, ack_delay_s: float = ACK_DELAY_S):
        self.host, self.port, self.worker_mode = host, port, worker_mode
        self.ack_delay_s = ack_delay_s
        self.group, self.prefix, self.topic = group, prefix, topic
        self.passwords = passwords
        self.loop = loop or Loop()
        self.tally = Tally(total, len(uids))
        self.ack_queue: deque[Member] = deque()
        self.hold_acks = False  # the cost phase: entries stay in the store until released
        self.repeats = self.twice = self.foreign = self.pulls = self.ack_packets = 0
        self.errors: list[dict] = []
        self.members = [Member(self, u) for u in uids]
        self.loop.hooks.append(self._acks_due)

    def password_of(self, uid: str) -> str | None:
        return self.passwords.get(uid) if self.passwords is not None else _secret(uid)

    def _acks_due(self) -> None:
        q = self.ack_queue
        if self.hold_acks or not q:
            return
        t = now()
        while q and (q[0].ack_due is None or q[0].ack_due <= t or len(q[0].pending) >= ACK_BATCH):
            m = q.popleft()
            if m.ack_due is not None:
                m.flush_acks()

    def flush_all(self) -> None:
        for m in self.members:
            if m.pending:
                m.flush_acks()
        self.ack_queue.clear()

    def connect(self, timeout: float = 60) -> None:
        """Connect, subscribe and (worker mode) say `online`, then ask each member's count: its answer comes
        after the worker has taken in the status (same connection, same worker), so the member is online there."""
        peers = [m.peer for m in self.members]
        connect_all(self.loop, peers, timeout)
        if not self.worker_mode:
            subscribe_all(self.loop, peers, lambda p: [self.topic], timeout)
            return
        by_peer = {id(m.peer): m for m in self.members}
        subscribe_all(self.loop, peers, lambda p: [by_peer[id(p)].inbox, by_peer[id(p)].reply], timeout)
        for m in self.members:
            m.peer.publish(m.status, b"online", retain=True)
            m.peer.publish(f"im/u/{m.uid}/req", b'{"op":"count","req_id":"ready"}')
        if not self.loop.until(lambda: all(m.ready for m in self.members), timeout):
            raise SystemExit(f"{sum(not m.ready for m in self.members)} members got no count answer in {timeout} s")

    def close(self) -> None:
        for m in self.members:
            m.peer.close()


class Sender:
    """The group's creator and sender on its v1 topics: creates the group, sends, collects receipts. It is a
    member too, online: what the group stores for it (its own `created` event, say) is pushed and acked at once,
    or pulled on an announcement, so the store drains."""

    def __init__(self, loop: Loop, host: str, port: int, uid: str, prefix: str, total: int,
                 password: str | None = None):
        self.uid, self.prefix = uid, prefix
        self.peer = Peer(loop, host, port, uid, f"{uid}:bench-gs", on_message=self._on_message, password=password,
                         will=(f"im/status/{uid}", b"offline"))
        self.loop = loop
        self.answers: dict[str, dict] = {}
        self.stored = [0.0] * total
        self.n_stored = 0
        self.delivered_receipts = 0
        self.errors: list[dict] = []
        self.inbox: list[dict] = []  # what the group sent to the sender (not its own messages)
        self.pulls = 0

    def _on_message(self, client, userdata, msg) -> None:
        obj = orjson.loads(msg.payload)
        if msg.topic.endswith("/inbox"):
            self.inbox.append(obj)
            self.peer.publish(f"im/u/{self.uid}/ack", b'{"seqs":[%d]}' % obj["seq"])
            return
        kind = obj.get("kind")
        if kind == "receipts":
            for r in obj["receipts"]:
                self._receipt(r)
        elif kind == "receipt":
            self._receipt(obj)
        elif kind == "page" and obj.get("req_id", "").startswith("sync"):
            self.inbox += obj["messages"]
            if obj.get("cursor"):
                self._pull(obj["cursor"])
        elif kind == "count" and obj.get("req_id") is None:
            if obj.get("total", 0) > 0:
                self._pull(None)
        elif "req_id" in obj:
            self.answers[obj["req_id"]] = obj
        elif kind == "error":
            self.errors.append(obj)

    def _pull(self, cursor: str | None) -> None:
        body: dict[str, Any] = {"op": "pull", "req_id": f"sync{self.pulls}", "limit": PULL_LIMIT}
        if cursor:
            body["ack"] = cursor
        self.pulls += 1
        self.peer.publish(f"im/u/{self.uid}/req", orjson.dumps(body))

    def _receipt(self, r: dict) -> None:
        mid = r.get("msg_id", "")
        if r.get("kind") != "receipt":
            self.errors.append(r)
            return
        if not mid.startswith(self.prefix):
            return
        i = int(mid[len(self.prefix):])
        if r.get("status") in ("stored", "duplicate"):
            if not self.stored[i]:
                self.stored[i] = now()
                self.n_stored += 1
        elif r.get("status") == "delivered":
            self.delivered_receipts += 1

    def connect(self, timeout: float = 30) -> None:
        connect_all(self.loop, [self.peer], timeout)
        subscribe_all(self.loop, [self.peer], lambda p: [f"im/u/{self.uid}/inbox", f"im/u/{self.uid}/reply"],
                      timeout)
        self.peer.publish(f"im/status/{self.uid}", b"online", retain=True)
        self.request({"op": "count", "req_id": "ready"}, timeout)

    def request(self, body: dict, timeout: float = 30) -> dict:
        self.peer.publish(f"im/u/{self.uid}/req", orjson.dumps(body))
        if not self.loop.until(lambda: body["req_id"] in self.answers, timeout):
            raise SystemExit(f"no answer to {body['op']} in {timeout} s")
        return self.answers.pop(body["req_id"])


def open_group(host: str, port: int, sender: str, uids: list[str], group: str, total: int, *,
               passwords: dict | None = None, timeout: float = 60,
               ack_delay_s: float = ACK_DELAY_S) -> tuple[Loop, Sender, Members]:
    """Members online, then the sender creates ``group`` with them; returns once every member has its
    `created` event (so the worker pushes to every one of them). The group's messages are
    ``{prefix}{i}`` for i < total, prefix ``group + "-"``."""
    loop = Loop()
    prefix = f"{group}-"
    ms = Members(host, port, uids, total, worker_mode=True, group=group, prefix=prefix, passwords=passwords,
                 loop=loop, ack_delay_s=ack_delay_s)
    ms.connect(timeout)
    tx = Sender(loop, host, port, sender, prefix, total, password=(passwords or {}).get(sender))
    tx.connect(timeout)
    ans = tx.request({"op": "group_create", "req_id": "create", "group": group, "name": "bench",
                      "members": uids, "history": False}, timeout)
    if ans.get("kind") != "group":
        raise SystemExit(f"group_create failed: {ans}")
    if not loop.until(lambda: all(m.events for m in ms.members), timeout):
        raise SystemExit(f"{sum(not m.events for m in ms.members)} members never got the group's created event")
    return loop, tx, ms


def send_loop(loop: Loop, tally: Tally, send: Callable[[int, float], None], first: int, n: int, window: int,
              timeout: float, check: Callable[[], None] = lambda: None) -> tuple[bool, list[float]]:
    """Closed loop: send messages first..first+n-1 keeping at most `window` incomplete. Returns (all complete
    in time, send times by index offset)."""
    base = tally.completed
    sent = [0.0] * n
    end = now() + timeout
    k = 0
    while tally.completed - base < n:
        while k < n and k - (tally.completed - base) < window:
            t = now()
            sent[k] = t
            send(first + k, t)
            k += 1
        if now() > end:
            return False, sent
        check()
        loop.poll(0.005)
    return True, sent


def phase_result(tally: Tally, first: int, n: int, sent: list[float], ok: bool) -> dict:
    idx = range(first, first + n)
    done = [i for i in idx if tally.last[i]]
    t0 = sent[0] if sent else now()
    t1 = max((tally.last[i] for i in done), default=t0)
    el = max(1e-9, t1 - t0)
    return {"n": n, "complete": ok, "completed": len(done), "elapsed_s": round(el, 4),
            "msg_rate": round(len(done) / el, 1), "deliveries": len(done) * tally.receivers,
            "delivery_rate": round(len(done) * tally.receivers / el, 1),
            "latency_last": summary_ms([tally.last[i] - sent[i - first] for i in done])}


# --- store accounting (worker mode, SQLite) -------------------------------------------------------
def table_counts(db_path: str) -> dict[str, int]:
    con = sqlite3.connect(db_path, timeout=10)
    try:
        names = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table' "
                                           "AND name NOT LIKE 'sqlite_%'")]
        return {n: con.execute(f'SELECT COUNT(*) FROM "{n}"').fetchone()[0] for n in names}
    finally:
        con.close()


def btree_bytes(db_path: str) -> dict[str, dict[str, int]]:
    """Per table and index (b-tree name): payload bytes and allocated page bytes (SQLite's dbstat)."""
    con = sqlite3.connect(db_path, timeout=10)
    try:
        rows = con.execute("SELECT name, SUM(payload), SUM(pgsize) FROM dbstat GROUP BY name").fetchall()
        return {n: {"payload": p or 0, "pages": g or 0} for n, p, g in rows}
    except sqlite3.Error:
        return {}
    finally:
        con.close()


# Tables whose rows are what waits for receivers (the store is drained when they are back to their count).
WAITING_TABLES = ("message", "entry", "member_receipt")


def waiting_rows(db_path: str) -> int:
    c = table_counts(db_path)
    return sum(v for k, v in c.items() if k in WAITING_TABLES)


# --- the two commands ------------------------------------------------------------------------------
def run_fanout(a: argparse.Namespace) -> None:
    """Baseline: the publisher (the worker's account, allowed on im/status/+) publishes push-shaped payloads
    to one topic every member subscribes to; the broker fans each out to N subscribers."""
    total = a.warmup + a.count + a.latency_count
    uids = [f"{a.prefix}{k}" for k in range(a.members)]
    topic = f"im/status/fanout-{os.urandom(3).hex()}"
    ms = Members(a.host, a.port, uids, total, worker_mode=False, topic=topic)
    loop = ms.loop
    t = now()
    ms.connect(a.timeout)
    connect_s = now() - t
    pub = Peer(loop, a.host, a.port, a.pub_user, f"bench-fanout-{os.urandom(2).hex()}")
    connect_all(loop, [pub], a.timeout)
    content = b"x" * a.content_bytes

    def send(i: int, t: float) -> None:
        pub.publish(topic, b'{"kind":"msg","seq":%d,"msg_id":"fan-%d","from":"gs","to":"bench","group":"bench",'
                           b'"gseq":%d,"type":"text","content":"%s","sent_at":%d}'
                    % (i, i, i + 1, content, int(time.time() * 1000)))

    out = _measure(a, loop, ms.tally, send)
    out.update(mode="fanout", members=a.members, receivers=a.members, connect_s=round(connect_s, 2),
               twice=ms.twice)
    ms.close()
    pub.close()
    print("RESULT " + json.dumps(out), flush=True)


def _measure(a: argparse.Namespace, loop: Loop, tally: Tally, send, check=lambda: None) -> dict:
    out: dict[str, Any] = {"window": a.window, "content_bytes": a.content_bytes}
    if a.warmup:
        ok, _ = send_loop(loop, tally, send, 0, a.warmup, a.window, a.timeout, check)
        if not ok:
            raise SystemExit(f"warm-up: {tally.completed} of {a.warmup} messages complete in {a.timeout} s")
    mark("start")
    ok, sent = send_loop(loop, tally, send, a.warmup, a.count, a.window, a.timeout, check)
    mark("end")
    out["throughput"] = phase_result(tally, a.warmup, a.count, sent, ok)
    if a.latency_count:  # one message at a time: the fan-out's own latency, no queue behind it
        first = a.warmup + a.count
        ok, sent = send_loop(loop, tally, send, first, a.latency_count, 1, a.timeout, check)
        out["one_at_a_time"] = phase_result(tally, first, a.latency_count, sent, ok)
    return out


def run_group(a: argparse.Namespace) -> None:
    total = a.warmup + a.count + a.latency_count + a.cost_count
    uids = [f"{a.prefix}{k}" for k in range(a.members - 1)]  # the sender is the group's Nth member
    group = f"bench-{os.urandom(3).hex()}"
    t = now()
    loop, tx, ms = open_group(a.host, a.port, a.sender, uids, group, total, timeout=a.timeout,
                              ack_delay_s=a.ack_delay_ms / 1000)
    setup_s = now() - t
    content = b"x" * a.content_bytes
    prefix = tx.prefix.encode()

    def send(i: int, t: float) -> None:
        tx.peer.publish(f"im/u/{a.sender}/send", b'{"msg_id":"%s%d","group":"%s","type":"text","content":"%s",'
                                                 b'"receipts":"batch"}' % (prefix, i, group.encode(), content))

    def check() -> None:
        if tx.errors or ms.errors:
            raise SystemExit(f"the server refused: {(tx.errors + ms.errors)[:3]}")

    out = _measure(a, loop, ms.tally, send, check)
    out.update(mode="group", members=a.members, receivers=len(uids), setup_s=round(setup_s, 2),
               ack_delay_ms=a.ack_delay_ms)
    if a.db and a.cost_count:
        out["cost"] = _cost(a, loop, tx, ms, send, check)
    ms.flush_all()
    if a.db:  # every push acked: the store holds nothing of the group's messages any more
        loop.until(lambda: waiting_rows(a.db) == 0, a.timeout, step=0.1)
        out["left_waiting_rows"] = waiting_rows(a.db)
    out.update(repeats=ms.repeats, twice=ms.twice, foreign=ms.foreign, pulls=ms.pulls, ack_packets=ms.ack_packets,
               stored_receipts=tx.n_stored, delivered_receipts=tx.delivered_receipts,
               members_missing=sum(1 for m in ms.members if sum(m.got) != ms.tally.total))
    ms.close()
    tx.peer.close()
    print("RESULT " + json.dumps(out), flush=True)


def _cost(a, loop: Loop, tx: Sender, ms: Members, send, check) -> dict:
    """What the store writes per group message: members hold their acks, the sender sends cost_count messages,
    and the rows (and SQLite b-tree bytes) added once all are stored are compared with before."""
    ms.flush_all()
    if not loop.until(lambda: waiting_rows(a.db) == 0, a.timeout, step=0.05):
        raise SystemExit(f"the store did not drain before the cost phase: {table_counts(a.db)}")
    before, bytes_before = table_counts(a.db), btree_bytes(a.db)
    ms.hold_acks = True
    first = a.warmup + a.count + a.latency_count
    k0 = tx.n_stored
    for i in range(first, first + a.cost_count):
        send(i, now())
    if not loop.until(lambda: tx.n_stored - k0 >= a.cost_count, a.timeout):
        raise SystemExit("cost phase: not every message was stored")
    check()
    after, bytes_after = table_counts(a.db), btree_bytes(a.db)
    ms.hold_acks = False
    loop.until(lambda: ms.tally.completed >= first + a.cost_count, a.timeout)
    k, r = a.cost_count, len(ms.members)
    rows = {n: after[n] - before.get(n, 0) for n in after if after[n] != before.get(n, 0)}
    out: dict[str, Any] = {"messages": k, "receivers": r, "rows_added": rows,
                           "rows_per_message": round(sum(rows.values()) / k, 2),
                           "rows_per_member": round(sum(rows.values()) / (k * r), 4)}
    if bytes_after:
        names = set(bytes_after) | set(bytes_before)
        d = {n: {key: bytes_after.get(n, {}).get(key, 0) - bytes_before.get(n, {}).get(key, 0)
                 for key in ("payload", "pages")} for n in names}
        d = {n: v for n, v in d.items() if v["payload"] or v["pages"]}
        out["bytes_added"] = d
        payload, pages = sum(v["payload"] for v in d.values()), sum(v["pages"] for v in d.values())
        out["payload_bytes_per_message"] = round(payload / k, 1)
        out["page_bytes_per_message"] = round(pages / k, 1)
        out["payload_bytes_per_member"] = round(payload / (k * r), 1)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.groupload")
    sub = ap.add_subparsers(dest="cmd", required=True)
    fo = sub.add_parser("fanout")
    fo.add_argument("--pub-user", required=True, help="an account allowed to publish on im/status/+ (the worker's)")
    gr = sub.add_parser("group")
    gr.add_argument("--sender", default="gs")
    gr.add_argument("--db", default="", help="the worker's SQLite file: rows per message, store drained at the end")
    gr.add_argument("--cost-count", type=int, default=5, help="messages sent while members hold their acks")
    gr.add_argument("--ack-delay-ms", type=float, default=ACK_DELAY_S * 1000,
                    help="how long a member gathers acks (default 50, as backend.client; an experiment's knob)")
    for p in (fo, gr):
        p.add_argument("--members", type=int, required=True,
                       help="group members, the sender included (fan-out: subscribers, the publisher not included)")
        p.add_argument("--prefix", default="gm", help="member uids: PREFIX0, PREFIX1, ...")
        p.add_argument("--count", type=int, required=True, help="messages measured (closed loop)")
        p.add_argument("--window", type=int, default=20, help="most messages not yet complete")
        p.add_argument("--warmup", type=int, default=10)
        p.add_argument("--latency-count", type=int, default=20, help="then this many, one at a time")
        p.add_argument("--content-bytes", type=int, default=100)
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--port", type=int, required=True)
        # Each phase's bound (connect, create, a closed loop, the drain): minutes would mean a stuck run.
        p.add_argument("--timeout", type=float, default=120.0)
    a = ap.parse_args(argv)
    {"fanout": run_fanout, "group": run_group}[a.cmd](a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
