"""Work sharing without $share: `worker --partitions 2 --partition I` (backend/partition.py, issue 15).

Unit tests: the ownership function, the flags, the core's announcements per owner. Then, beside Mosquitto, NATS
and RabbitMQ (the session's shared nodes: tests/services.py), two partitioned workers on one private PostgreSQL
schema: every send stored once by its sender's owner and confirmed, every message received once (pushes by the
storing worker, acks through the receiver's owner), a user coming online announced once; then one worker
SIGKILLed mid-traffic and restarted: its users' sends (one-shot QoS 1 publishes that nobody resends) wait in its
persistent session at the broker and are answered after its return, while the other partition is served on.
"""

from __future__ import annotations

import os
import random
import threading
import time
import urllib.request
import zlib

import paho.mqtt.client as mqtt
import pytest

from backend import core
from backend import protocol as p
from backend.client import IMClient
from backend.partition import Partition, partition_error, partition_of
from conftest import eventually, free_port
from services import (BROKERS, WORKER_PASSWORD, WORKER_USER, PrivateSchema, WorkerProcess, mosquitto,
                      session_present, shared_broker)

T0 = 1_000_000
# Upper bound for anything that takes milliseconds; waits return as soon as the event happens.
WAIT_S = 15.0
# Clients resend after 2 s (not 3 s) and never give up: the outage below must not outlast their resends.
CLIENT_KW = dict(resend_timeout=2.0, resend_wait_max=3.0, max_resends=1000, request_timeout=3.0)
# How long partition 1's worker stays dead: long enough that its users' sends pile up at the broker.
OUTAGE_S = 2.0


# --- units ---------------------------------------------------------------------
def test_ownership_is_crc32_stable_and_even():
    # Fixed values: any change of the function (hash(), another CRC) would move users between running workers.
    assert [partition_of(u, 2) for u in ("alice", "bob", "carol", "dave")] == \
        [zlib.crc32(u.encode()) % 2 for u in ("alice", "bob", "carol", "dave")] == [1, 0, 1, 0]
    assert partition_of("alice", 7) == 5 and partition_of("bob", 7) == 2 and partition_of("x", 1) == 0
    for n in (2, 3, 5):
        counts = [0] * n
        for i in range(10_000):
            counts[partition_of(f"user-{i}", n)] += 1
        assert all(abs(c - 10_000 / n) < 10_000 / n * 0.05 for c in counts), (n, counts)  # within 5%
    parts = [Partition(3, i) for i in range(3)]
    assert all(sum(q.owns(f"u{i}") for q in parts) == 1 for i in range(300))  # exactly one owner each


def test_owns_topic_filters_user_topics_only():
    mine, other = Partition(2, 1), Partition(2, 0)  # alice is partition 1's
    for topic in (p.send_topic("alice"), p.ack_topic("alice"), p.req_topic("alice"),
                  p.send_topic("alice", "phone"), "im/u/alice/x/send"):
        assert mine.owns_topic(topic) and not other.owns_topic(topic), topic
    for topic in (p.status_topic("alice"), p.status_topic("alice", "phone"), "im/worker/im-worker-p0of2"):
        assert mine.owns_topic(topic) and other.owns_topic(topic), topic  # every worker's
    assert Partition(2, 1).client_id == "im-worker-p1of2" and str(Partition(2, 1)) == "partition 1 of 2"


@pytest.mark.parametrize("n, i, expected", [
    (0, None, "--partitions 0: give 1 or more"), (-2, 0, "give 1 or more"),
    (2, None, "--partitions 2 needs --partition I (0 to 1)"), (2, 2, "--partition 2 is out of range"),
    (3, -1, "give 0 to 2"), (1, 1, "out of range for --partitions 1"), (1, None, None), (1, 0, None), (4, 3, None)])
def test_partition_flags_are_checked(n, i, expected):
    error = partition_error(n, i)
    assert (error is None) if expected is None else (expected in error), error
    if expected is not None and i is not None:
        with pytest.raises(ValueError, match="range|1 or more"):
            Partition(n, i)


@pytest.mark.parametrize("argv, expected", [
    (["--partitions", "2", "--partition", "2"], "--partition 2 is out of range for --partitions 2: give 0 to 1"),
    (["--partitions", "0"], "--partitions 0: give 1 or more"),
    (["--partitions", "3"], "--partitions 3 needs --partition I (0 to 2)"),
    (["--partitions", "2", "--partition", "0", "--share-group", "g"], "exclude each other"),
])
def test_worker_refuses_bad_partition_flags_in_one_line(argv, expected, tmp_path, capsys):
    from backend.cli import main
    assert main(["worker", "--database-url", f"sqlite:///{tmp_path}/im.db", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert not (tmp_path / "im.db").exists()  # refused before anything was opened


def _status(uid, word, dev=""):
    return (p.status_topic(uid, dev), word.encode())


def test_core_announces_only_the_users_it_owns():
    """Every worker sees every status (each must know who is online to push), but only bob's owner counts for
    him after his `online` and after another worker's `gone`; alice's worker still pushes to him."""
    owner, other = core.Delivery(owns=lambda u: u == "bob"), core.Delivery(owns=lambda u: u != "bob")
    for d, counts in ((owner, 1), (other, 0)):
        plan = d.plan([_status("bob", "online")], T0)
        assert sum(isinstance(o, core.CountBacklog) for o in plan.ops) == counts
        assert d.is_online("bob")  # presence for every user, owned or not
        d.worker_gone(T0)
        assert sum(isinstance(o, core.CountBacklog) for o in d.plan([], T0 + 20_000).ops) == counts
    send = (p.send_topic("alice"), p.encode({"msg_id": "m1", "to": "bob", "content": "hi"}))
    op = other.plan([send], T0).ops[0]
    assert isinstance(op, core.StoreMessage) and op.push_to == {("bob", "")}
    out = other.after_commit([core.Stored(op, 7)], T0)
    assert [a.topic for a in out] == [p.inbox_topic("bob"), p.reply_topic("alice")]
    # The derived user status (a device-aware user) is published by the owner alone.
    derived = [[a for a in d.plan([_status("bob", "online", "phone")], T0).replies if a.retain]
               for d in (owner, other)]
    assert [len(x) for x in derived] == [1, 0]
    assert core.Delivery().mine("anyone")  # unpartitioned: every uid


# --- real processes beside each broker -------------------------------------------------
def balanced_uids(per_partition: int) -> list[list[str]]:
    """``per_partition`` uids owned by each of 2 partitions, unique to this test (no '.': every broker)."""
    tag = os.urandom(3).hex()
    out: list[list[str]] = [[], []]
    i = 0
    while min(len(x) for x in out) < per_partition:
        uid = f"u{i}-{tag}"
        if len(out[partition_of(uid, 2)]) < per_partition:
            out[partition_of(uid, 2)].append(uid)
        i += 1
    return out


class PartitionWorker(WorkerProcess):
    def __init__(self, port: int, db_url: str, index: int, tag: str):
        self.metrics_port = free_port()
        super().__init__(port, db_url, client_id=f"im-worker-p{index}of2-{tag}",
                         extra=["--partitions", "2", "--partition", str(index), "--send-rate", "0",
                                "--metrics-port", str(self.metrics_port)])

    def metric(self, name: str) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            text = r.read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " ")
                   or line.startswith(name + "{"))


class OneShot:
    """A uid's raw paho client: each send is ONE QoS 1 publish (as mosquitto_pub), never resent; the receipts of
    its sends (msg_ids raw-...; the uid's IMClient gets its own on the same reply topic) are timed on arrival."""

    def __init__(self, port: int, uid: str):
        self.uid, self.receipts, self.cond = uid, {}, threading.Condition()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{uid}:raw", protocol=mqtt.MQTTv311)
        self.c.username_pw_set(uid, f"{uid}-pw")
        subscribed = threading.Event()
        self.c.on_subscribe = lambda *a: subscribed.set()
        self.c.on_connect = lambda c, *a: c.subscribe(p.reply_topic(uid), qos=1)
        self.c.on_message = self._on_message
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        assert subscribed.wait(WAIT_S)

    def _on_message(self, client, userdata, msg):
        reply = p.decode_object(msg.payload)
        items = reply.get("receipts", [reply]) if reply.get("kind") == "receipts" else [reply]
        with self.cond:
            for r in items:
                if r.get("status") in ("stored", "duplicate") and str(r.get("msg_id")).startswith("raw-"):
                    self.receipts.setdefault(r["msg_id"], (r["status"], time.monotonic()))
            self.cond.notify_all()

    def send(self, to: str, msg_id: str) -> None:
        self.c.publish(p.send_topic(self.uid), p.encode({"msg_id": msg_id, "to": to, "content": msg_id}), qos=1)

    def wait_all(self, ids, timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: all(i in self.receipts for i in ids), timeout)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


@pytest.fixture(params=BROKERS)
def beside(request):
    """(kind, node, uids by partition, schema): the broker with this test's users, a private schema."""
    uids = balanced_uids(3)
    late = balanced_uids(1)[1][0]  # a receiver of partition 1 that comes online later
    passwords = {u: f"{u}-pw" for u in uids[0] + uids[1] + [late]}
    schema = PrivateSchema()
    if request.param == "mosquitto":
        node = mosquitto(passwords)
    else:
        node = shared_broker(request.param)
        node.add_users(passwords)
    yield request.param, node, uids, late, schema
    if request.param == "mosquitto":
        node.close()
    schema.close()


def test_two_partitions_share_the_work_and_a_killed_one_catches_up(beside, capsys):
    kind, node, uids, late_uid, schema = beside
    rng = random.Random(7)
    tag = os.urandom(3).hex()
    workers = [PartitionWorker(node.port, schema.url, i, tag) for i in range(2)]
    everyone = uids[0] + uids[1]
    clients: dict[str, IMClient] = {}
    raw = late = None
    t_start = time.monotonic()
    try:
        workers[0].start(timeout=30)  # the first creates the schema
        workers[1].start(timeout=30)
        for i, w in enumerate(workers):
            assert any(f"keeping partition {i} of 2" in line for line in w.lines), "".join(w.lines)
            assert not any("shared subscriptions" in line for line in w.lines)  # no $share probe at all
        for uid in everyone:
            clients[uid] = IMClient(uid, f"{uid}-pw", node.host, node.port, **CLIENT_KW).connect(WAIT_S)
        for uid in everyone:  # answered by its owner once that worker took in its `online`: pushes from now on
            assert clients[uid].count(WAIT_S)["total"] == 0

        # Phase 1: 60 sends between 6 users, 3 of each partition, and 2 for a receiver that is offline.
        sent = []
        for i in range(60):
            s, r = rng.sample(everyone, 2)
            sent.append((s, clients[s].send(r, f"{s}->{r} #{i}")))
        for s in (uids[0][0], uids[1][0]):
            sent.append((s, clients[s].send(late_uid, f"{s}->late")))
        assert all(o.wait(WAIT_S) is not None and o.receipt["status"] == "stored" for _, o in sent), \
            [o.receipt for _, o in sent if not o.receipt or o.receipt["status"] != "stored"][:3]
        # Each send taken by its sender's owner alone: stored once, in all (the other worker skipped it).
        stored = [w.metric("im_messages_stored_total") for w in workers]
        assert stored == [sum(s in uids[i] for s, _ in sent) for i in range(2)], stored
        assert all(w.metric("im_partition_skipped_total") > 0 for w in workers)
        # Pushed by the storing worker, acked through the receiver's owner, `delivered` back to the sender.
        assert all(o.delivered.wait(WAIT_S) for _, o in sent[:60])
        late = IMClient(late_uid, f"{late_uid}-pw", node.host, node.port, **CLIENT_KW).connect(WAIT_S)
        assert late.wait_for(lambda: len(late.messages) == 2, WAIT_S)
        assert len(late.announcements) == 1, late.announcements  # from its owner only, not from both workers

        # Phase 2: partition 1's worker SIGKILLed mid-traffic; partition 1's users go on sending, one of them
        # with one-shot publishes that nobody resends: they can only wait at the broker, in its session.
        raw = OneShot(node.port, uids[1][1])
        phase2, one_shots = [], []
        for i in range(40):
            if i == 10:
                workers[1].kill()
                t_kill = time.monotonic()
            s, r = rng.sample(everyone, 2)
            phase2.append((s, clients[s].send(r, f"{s}->{r} ##{i}")))
            if i >= 10 and i % 2:
                one_shots.append((f"raw-{tag}-{i}", rng.choice(uids[0])))
                raw.send(one_shots[-1][1], one_shots[-1][0])
            time.sleep(0.02)  # pacing: traffic goes on while the worker is dead
        served = [o for s, o in phase2 if s in uids[0]]
        assert all(o.wait(WAIT_S) is not None for o in served), "partition 0 stopped with partition 1's worker"
        waited = time.monotonic() - t_kill
        if waited < OUTAGE_S:
            time.sleep(OUTAGE_S - waited)  # the outage's length: not a synchronisation
        assert raw.receipts == {}, "answered while partition 1's worker was dead"
        t_back = time.monotonic()
        workers[1].start(timeout=30)
        ids = [m for m, _ in one_shots]
        assert raw.wait_all(ids, 30), f"{sum(i not in raw.receipts for i in ids)} of {len(ids)} one-shot sends " \
                                      f"never answered: lost with the dead worker"
        assert all(raw.receipts[i][0] == "stored" and raw.receipts[i][1] > t_back for i in ids)
        assert all(o.wait(30) is not None and o.receipt["status"] in ("stored", "duplicate") for _, o in phase2)

        # Every receiver shows every message it was sent exactly once; nothing stored twice, nothing left.
        want: dict[str, set] = {u: set() for u in everyone}
        for _, o in sent[:60] + phase2:
            want[o.to].add(o.msg_id)
        for msg_id, to in one_shots:
            want[to].add(msg_id)
        for uid, c in clients.items():
            assert c.wait_for(lambda: {m["msg_id"] for m in c.messages} >= want[uid], 30), \
                (uid, sorted(want[uid] - {m["msg_id"] for m in c.messages})[:5])
            ids_seen = [m["msg_id"] for m in c.messages]
            assert len(ids_seen) == len(set(ids_seen)) == len(want[uid]), (uid, len(ids_seen), len(want[uid]))
        from backend.store import Accepted, Message, open_database
        db = open_database(schema.url, create=False)
        try:
            assert Accepted.select().count() == len(sent) + len(phase2) + len(one_shots)
            for c in clients.values():
                c.flush_acks()
            assert eventually(lambda: Message.select().count() == 0, WAIT_S), Message.select().count()
        finally:
            db.close()
        dropped = sum(c.duplicates_dropped for c in clients.values())
        with capsys.disabled():
            print(f"\npartitions beside {kind}: {len(sent)} + {len(phase2)} sends + {len(ids)} one-shot, "
                  f"worker 1 dead {t_back - t_kill:.1f}s, one-shots answered "
                  f"{max(t for _, t in raw.receipts.values()) - t_back:.1f}s after its restart, "
                  f"{dropped} repeats dropped by clients, {time.monotonic() - t_start:.1f}s in all")
    finally:
        for c in [*clients.values(), late]:
            if c is not None:
                c.kill()
        if raw is not None:
            raw.close()
        for w in workers:
            w.kill()
        if kind != "mosquitto":  # the shared node keeps persistent sessions: remove the workers'
            for w in workers:
                session_present(node.port, w.client_id, (WORKER_USER, WORKER_PASSWORD))
