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
    # A retained replay (after this worker's own (re)connection) is announced by the worker that hears it, owner
    # or not: it may have stored messages for bob, unpushed, before it knew him online (the owner never heard).
    fresh = core.Delivery(owns=lambda u: False)
    plan = fresh.plan([(p.status_topic("bob"), b"online", True)], T0)
    assert [(type(o), o.receiver) for o in plan.ops] == [(core.CountBacklog, "bob")]


def _counts_for(plan, uid, dev=""):
    return [o for o in plan.ops if isinstance(o, core.CountBacklog) and (o.receiver, o.device) == (uid, dev)]


def test_a_late_online_is_announced_by_the_worker_that_stored_meanwhile():
    """bob's phone came online: its owner heard it and counted (0 waiting, say), but alice's worker heard it
    seconds later (a NATS cluster re-delivers a dead node's statuses late) and meanwhile stored a message for
    the phone, unpushed. That worker announces the phone when its late `online` comes; a worker that stored
    nothing for it does not, nor one whose entry is older than the window."""
    other = core.Delivery(owns=lambda u: u != "bob")
    other.plan([_status("bob", "online", "laptop")], T0)  # the user is known online; the phone is not
    send = (p.send_topic("alice", "desk"), p.encode({"msg_id": "m1", "to": "bob", "content": "hi"}))
    op = other.plan([send], T0).ops[0]
    out = other.after_commit([core.Stored(op, 7, devices=(("bob", "laptop"), ("bob", "phone")))], T0)
    assert [a.topic for a in out][:1] == [p.inbox_topic("bob", "laptop")]  # the phone: stored, not pushed
    heard, delay = T0 + 3_000, core.UNPUSHED_ANNOUNCE_DELAY_MS
    assert _counts_for(other.plan([_status("bob", "online", "phone")], heard), "bob", "phone") == []
    # After the owner's announcement and the phone's sync: this count finds nothing if they covered the entry
    # (one announcement per device), and announces it if the entry came after the owner's count.
    assert not other.announcements_due(heard + delay - 1) and other.announcements_due(heard + delay)
    plan = other.plan([], heard + delay)
    assert len(_counts_for(plan, "bob", "phone")) == 1, plan.ops
    # Nothing stored meanwhile: no count from a non-owner (its owner's job).
    quiet = core.Delivery(owns=lambda u: u != "bob")
    quiet.plan([_status("bob", "online", "phone")], T0)
    assert not quiet.announcements_due(T0 + delay + 60_000)
    # An entry older than the window: the owner's count at the `online` covered it.
    old = core.Delivery(owns=lambda u: u != "bob")
    op = old.plan([send], T0).ops[0]
    old.after_commit([core.Stored(op, 8, devices=(("bob", "phone"),))], T0)
    late = T0 + core.UNPUSHED_WINDOW_MS + 1
    old.plan([_status("bob", "online", "phone")], late)
    assert not old.announcements_due(late + delay + 60_000)
    # The owner announces every live `online` itself and remembers nothing.
    owner = core.Delivery(owns=lambda u: u == "bob")
    op = owner.plan([send], T0).ops[0]
    owner.after_commit([core.Stored(op, 9, devices=(("bob", "phone"),))], T0)
    assert owner._unpushed == {}


def test_a_non_owner_announces_a_device_that_came_online_while_its_message_was_stored():
    """The phone's `online` reached alice's worker in the same batch as her send, after it: the send was
    planned without a push to the phone, and the phone's owner may have counted before this commit."""
    other = core.Delivery(owns=lambda u: u != "bob")
    send = (p.send_topic("alice", "desk"), p.encode({"msg_id": "m2", "to": "bob", "content": "hi"}))
    plan = other.plan([send, _status("bob", "online", "phone")], T0)
    store = [o for o in plan.ops if isinstance(o, core.StoreMessage)][0]
    assert ("bob", "phone") not in store.push_to
    other.after_commit([core.Stored(store, 10, devices=(("bob", "phone"),))], T0)
    assert len(_counts_for(other.plan([], T0 + core.UNPUSHED_ANNOUNCE_DELAY_MS), "bob", "phone")) == 1


def test_a_non_owner_remembers_group_members_it_stored_for_unpushed():
    other = core.Delivery(owns=lambda u: u != "bob")
    send = (p.send_topic("alice", "desk"), p.encode({"msg_id": "g1", "group": "team", "content": "hi"}))
    op = other.plan([send], T0).ops[0]
    assert op.group == "team"
    other.after_commit([core.Stored(op, 11, devices=(("bob", "phone"), ("carol", "desk")), gseq=1, members=2)], T0)
    assert set(other._unpushed) == {("bob", "phone")}  # carol is this worker's: her owner announces her
    other.plan([_status("bob", "online", "phone")], T0 + 5_000)
    assert len(_counts_for(other.plan([], T0 + 5_000 + core.UNPUSHED_ANNOUNCE_DELAY_MS), "bob", "phone")) == 1


def test_a_change_made_elsewhere_is_announced_to_online_devices_by_their_owner():
    """The CLI's group changes reach the workers through the store's outbox: each online device of the users
    named is announced, by the owner alone with partitions; an offline user gets nothing (its next connection
    counts)."""
    for owns, counts in ((None, 2), (lambda u: u == "bob", 2), (lambda u: u != "bob", 0)):
        d = core.Delivery(owns=owns)
        d.plan([_status("bob", "online", "phone"), _status("bob", "online", "laptop")], T0)
        d.plan([], T0 + 1)  # the `online` announcements are out of the way
        d.changed_elsewhere(["bob", "carol"], T0 + 5_000)
        plan = d.plan([], T0 + 5_000)
        got = sorted((o.receiver, o.device) for o in plan.ops if isinstance(o, core.CountBacklog))
        assert len(got) == counts and all(r == "bob" for r, _ in got), got


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


class System:
    """Two partitioned workers (client ids unique to the test) on a private schema beside ``node``, and one
    IMClient per user (3 uids of each partition); ``late``: a receiver of each partition that stays offline."""

    def __init__(self, kind: str, node, schema: PrivateSchema):
        self.kind, self.node, self.schema = kind, node, schema
        self.uids = balanced_uids(3)
        self.late = [u for (u,) in balanced_uids(1)]
        self.everyone = self.uids[0] + self.uids[1]
        node.add_users({u: f"{u}-pw" for u in self.everyone + self.late})
        tag = os.urandom(3).hex()
        self.workers = [PartitionWorker(node.port, schema.url, i, tag) for i in range(2)]
        self.clients: dict[str, IMClient] = {}
        self.others: list = []  # further clients, killed or closed at the end
        self.rng = random.Random(7)

    def start(self) -> "System":
        for w in self.workers:  # both at once: on an empty schema they race to create it (as tests/services.py)
            w.start(wait=False)
        for i, w in enumerate(self.workers):
            assert w.wait_log(w.ready, 30), "".join(w.lines)
            assert any(f"keeping partition {i} of 2" in line for line in w.lines), "".join(w.lines)
            assert not any("shared subscriptions" in line for line in w.lines)  # no $share probe at all
        for uid in self.everyone:
            self.clients[uid] = self.client(uid)
        for uid in self.everyone:  # answered by its owner once that worker took in its `online`: pushes from now on
            assert self.clients[uid].count(WAIT_S)["total"] == 0
        return self

    def client(self, uid: str, **kw) -> IMClient:
        return IMClient(uid, f"{uid}-pw", self.node.host, self.node.port, **CLIENT_KW, **kw).connect(WAIT_S)

    def send_random(self, label: str):
        s, r = self.rng.sample(self.everyone, 2)
        return s, self.clients[s].send(r, f"{s}->{r} {label}")

    def check_received(self, want: dict[str, set]) -> None:
        """Every user's client shows every message it was sent exactly once, and none else."""
        for uid, c in self.clients.items():
            assert c.wait_for(lambda: {m["msg_id"] for m in c.messages} >= want[uid], 30), \
                (uid, sorted(want[uid] - {m["msg_id"] for m in c.messages})[:5])
            ids_seen = [m["msg_id"] for m in c.messages]
            assert len(ids_seen) == len(set(ids_seen)) == len(want[uid]), (uid, len(ids_seen), len(want[uid]))

    def check_store(self, accepted: int) -> None:
        """Each send stored once (``accepted`` in all), and every message acked out of the store."""
        from backend.store import Accepted, Message, open_database
        db = open_database(self.schema.url, create=False)
        try:
            assert Accepted.select().count() == accepted
            for c in self.clients.values():
                c.flush_acks()
            assert eventually(lambda: Message.select().count() == 0, WAIT_S), Message.select().count()
        finally:
            db.close()

    def close(self) -> None:
        for w in self.workers:  # first: a worker process left behind would outlive the test run
            w.kill()
        for c in [*self.clients.values(), *self.others]:
            try:
                c.kill() if isinstance(c, IMClient) else c.close()
            except AttributeError:  # paho's loop_stop can race its own thread's end (as conftest's clients)
                pass
        if self.kind != "mosquitto":  # the shared node keeps persistent sessions: remove the workers'
            for w in self.workers:
                session_present(self.node.port, w.client_id, (WORKER_USER, WORKER_PASSWORD))


@pytest.fixture(params=BROKERS)
def system(request):
    schema = PrivateSchema()
    if request.param == "mosquitto":
        node = mosquitto({})
        node.add_users = lambda more: [node.add_user(u, pw) for u, pw in more.items()]
    else:
        node = shared_broker(request.param)
    try:
        s = System(request.param, node, schema)
        yield s
        s.close()
    finally:
        if request.param == "mosquitto":
            node.close()
        schema.close()


def test_two_partitions_share_the_work(system, capsys):
    """60 sends between 6 users, 3 of each partition: each stored once, by its sender's owner (the other worker
    skipped it); pushed by that worker, acked through the receiver's owner, `delivered` back. Receivers coming
    online later (a v1 client of partition 1, a device of partition 0's user) are announced to once, by their
    owner, not once per worker."""
    s = system.start()
    phone = s.client(s.late[0], device="phone")  # registers the device (its owner's count); then it goes away
    assert phone.count(WAIT_S)["total"] == 0
    phone.close()
    t0 = time.monotonic()
    sent = [s.send_random(f"#{i}") for i in range(60)]
    late = [(u, s.clients[u].send(to, f"{u}->late")) for u in (s.uids[0][0], s.uids[1][0]) for to in s.late]
    assert all(o.wait(WAIT_S) is not None and o.receipt["status"] == "stored" for _, o in sent + late), \
        [o.receipt for _, o in sent + late if not o.receipt or o.receipt["status"] != "stored"][:3]
    stored = [w.metric("im_messages_stored_total") for w in s.workers]
    assert stored == [sum(u in s.uids[i] for u, _ in sent + late) for i in range(2)], stored
    skipped = [w.metric("im_partition_skipped_total") for w in s.workers]
    assert all(skipped), skipped
    assert all(o.delivered.wait(WAIT_S) for _, o in sent)
    want: dict[str, set] = {u: set() for u in s.everyone}
    for _, o in sent:
        want[o.to].add(o.msg_id)
    s.check_received(want)
    elapsed = time.monotonic() - t0
    for uid, kw in ((s.late[1], {}), (s.late[0], {"device": "phone"})):
        c = s.client(uid, **kw)
        s.others.append(c)
        assert c.wait_for(lambda: len(c.messages) == 2, WAIT_S), (uid, kw, c.messages)
        assert len(c.announcements) == 1, (kw, c.announcements)  # from its owner only, not from both workers
    s.check_store(len(sent) + len(late))
    with capsys.disabled():
        print(f"\npartitions beside {s.kind}: {len(sent)} sends stored {stored[0]:.0f} + {stored[1]:.0f} by the "
              f"two workers, skipped {skipped[0]:.0f} + {skipped[1]:.0f} packets, all received in {elapsed:.1f}s")


def test_a_killed_partition_waits_at_the_broker_and_catches_up(system, capsys):
    """Partition 1's worker SIGKILLed mid-traffic while its users go on sending, one of them with one-shot QoS 1
    publishes that nobody resends: those can only wait at the broker, in the worker's persistent session. The
    other partition is served on; after the restart every send is answered, nothing lost or shown twice."""
    s = system.start()
    raw = OneShot(s.node.port, s.uids[1][1])
    s.others.append(raw)
    sent, one_shots = [], []
    for i in range(40):
        if i == 10:
            s.workers[1].kill()
            t_kill = time.monotonic()
        sent.append(s.send_random(f"#{i}"))
        if i >= 10 and i % 2:
            one_shots.append((f"raw-{i}-{os.urandom(3).hex()}", s.rng.choice(s.uids[0])))
            raw.send(one_shots[-1][1], one_shots[-1][0])
        time.sleep(0.02)  # pacing: traffic goes on while the worker is dead
    served = [o for u, o in sent if u in s.uids[0]]
    assert all(o.wait(WAIT_S) is not None for o in served), "partition 0 stopped with partition 1's worker"
    waited = time.monotonic() - t_kill
    if waited < OUTAGE_S:
        time.sleep(OUTAGE_S - waited)  # the outage's length: not a synchronisation
    assert raw.receipts == {}, "answered while partition 1's worker was dead"
    t_back = time.monotonic()
    s.workers[1].start(timeout=30)
    ids = [m for m, _ in one_shots]
    assert raw.wait_all(ids, 30), f"{sum(i not in raw.receipts for i in ids)} of {len(ids)} one-shot sends never " \
                                  f"answered: lost with the dead worker"
    assert all(raw.receipts[i][0] == "stored" and raw.receipts[i][1] > t_back for i in ids)
    assert all(o.wait(30) is not None and o.receipt["status"] in ("stored", "duplicate") for _, o in sent)
    caught_up = time.monotonic() - t_back
    want: dict[str, set] = {u: set() for u in s.everyone}
    for _, o in sent:
        want[o.to].add(o.msg_id)
    for msg_id, to in one_shots:
        want[to].add(msg_id)
    s.check_received(want)
    s.check_store(len(sent) + len(one_shots))
    dropped = sum(c.duplicates_dropped for c in s.clients.values())
    with capsys.disabled():
        print(f"\npartition 1 killed beside {s.kind}: {len(sent)} sends + {len(ids)} one-shot, dead "
              f"{t_back - t_kill:.1f}s, every send answered {caught_up:.1f}s after its restart, "
              f"{dropped} repeats dropped by clients (by seq)")
