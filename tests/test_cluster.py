"""Beside a broker cluster (issue 15): a 3-node NATS cluster (JetStream R3) and a 3-node RabbitMQ cluster with
quorum queues for persistent sessions (scripts/nats.py, scripts/rabbitmq.py), nodes SIGKILLed under the workers
and the clients.

Each cluster starts once for the module (its start is not counted in a test's 60 s: ``func_only``; the
launcher has its own bound, CLUSTER_START_TIMEOUT_S): three RabbitMQ nodes start in 20-40 s here and sometimes
~120 s (BROKERS.md), three NATS nodes in ~3 s. Each test leaves every node running for the next. The NATS node
killed is a follower of JetStream's meta group: the meta leader's death stalls JetStream longest (NATS' own
recovery: scripts/nats.py meta_leader), which would put the chaos past its 60 s.

    python -m pytest tests/test_cluster.py
"""

from __future__ import annotations

import os
import random
import threading
import time

import pytest

import chaos
from backend import protocol as p
from backend.client import IMClient
from backend.store import Accepted, Device, Message, open_database
from conftest import eventually, raw_client
from conftest import stop_raw as stop
from services import WORKER_PASSWORD, WORKER_USER, PrivateSchema, ProbedWorker, WorkerProcess, require, \
    unique_users
from test_partitions import balanced_uids

# Upper bound for anything that takes milliseconds; waits return as soon as the event happens.
WAIT_S = 15.0
# The worker's move after its node's SIGKILL: paho notices the dead socket at once, then the next address;
# RabbitMQ elects a new leader for the session's quorum queue within seconds. Measured: 1-3 s.
MOVE_S = 30.0

# The cluster's start is timed by the launcher's own bound, not by the first test's 60 s.
pytestmark = pytest.mark.timeout(60, func_only=True)


@pytest.fixture(scope="module")
def rabbitmq_nodes():
    """A 3-node RabbitMQ cluster with the worker's account, for this module; each test adds its own users."""
    from scripts.rabbitmq import find_rabbitmq, start_rabbitmq_cluster
    require(find_rabbitmq() is not None, "rabbitmq-server not installed (Debian: apt-get install rabbitmq-server)")
    t0 = time.monotonic()
    nodes = start_rabbitmq_cluster({WORKER_USER: WORKER_PASSWORD})
    print(f"\nRabbitMQ cluster ready in {time.monotonic() - t0:.1f} s (nodes ready at {nodes.start_s} s"
          f"{', restarted once: ' + ', '.join(nodes.restarted) if nodes.restarted else ''})")
    yield nodes
    nodes.close()


@pytest.fixture(scope="module")
def nats_nodes():
    """A 3-node NATS cluster (JetStream R3) with the worker's account, for this module; nodes[0] (the one the
    chaos kills) a follower of JetStream's meta group (see the module's docstring)."""
    from scripts.nats import find_nats, leader_where, start_nats_cluster
    require(find_nats() is not None, "nats-server not installed (Debian: apt-get install nats-server)")
    t0 = time.monotonic()
    nodes = leader_where(start_nats_cluster({WORKER_USER: WORKER_PASSWORD}), -1)
    print(f"\nNATS cluster ready in {time.monotonic() - t0:.1f} s")
    yield nodes
    for n in nodes:
        n.close()


def add_users(nodes, *names: str) -> dict[str, str]:
    """name -> a unique uid with password '<uid>-pw' on the cluster (accounts are cluster-wide)."""
    uids = unique_users(*names)
    nodes[0].add_users({u: f"{u}-pw" for u in uids.values()})
    return uids


def connected_to(worker, node) -> bool:
    return any(f"connected to {node.host}:{node.port} " in line for line in worker.lines)


def test_worker_resumes_its_quorum_session_on_another_rabbitmq_node(rabbitmq_nodes, tmp_path):
    """The worker (persistent session: a quorum queue replicated over the 3 nodes) is on node 1, alice on
    node 2, bob on node 3. Node 1 is SIGKILLed; at once alice publishes 20 sends with a raw client that never
    resends: they wait in the worker's session queue while it moves. The worker resumes its session on a live
    node and bob gets all 21 messages, in order, once each. Node 1 then comes back and rejoins the cluster.
    (Before the worker kept presence on a resumed session, it counted bob offline there: RabbitMQ's retained
    store is per node, bob's `online` is on node 3. The 20 were stored and bob was never told: 1 of 21.)"""
    nodes = rabbitmq_nodes
    n1, n2, n3 = nodes
    uids = add_users(nodes, "alice", "bob")
    alice_uid, bob_uid = uids["alice"], uids["bob"]
    worker = ProbedWorker(n1.port, f"sqlite:///{tmp_path}/im.db",
                          client_id=f"im-worker-{os.urandom(3).hex()}", extra=["--persistent-session"])
    worker.args = lambda: ["worker", "--broker", nodes.urls(WORKER_USER), "--database-url", worker.db_url,
                           "--client-id", worker.client_id, "--persistent-session"]
    bob = alice = None
    try:
        worker.start(timeout=30)
        assert connected_to(worker, n1), "".join(worker.lines)
        bob = IMClient(bob_uid, f"{bob_uid}-pw", n3.host, n3.port).connect(WAIT_S)
        alice, rc, _ = raw_client(n2.port, alice_uid, f"{alice_uid}-pw", f"{alice_uid}:raw")
        assert rc is not None and not rc.is_failure

        def send(i: int):
            body = {"msg_id": f"m{i}", "to": bob_uid, "content": f"#{i}"}
            return alice.publish(p.send_topic(alice_uid), p.encode(body), qos=1)

        send(0).wait_for_publish(WAIT_S)
        assert bob.wait_for_messages(1, WAIT_S), "".join(worker.lines)

        n1.kill()
        t_kill = time.monotonic()
        pending = [send(i) for i in range(1, 21)]  # while the worker is away: only its session can hold them
        for info in pending:
            info.wait_for_publish(MOVE_S)  # RabbitMQ confirms once the quorum queue (new leader) has it
        assert all(info.is_published() for info in pending), "RabbitMQ never confirmed alice's sends"
        assert worker.wait_log("disconnected from the broker", WAIT_S)
        assert eventually(lambda: connected_to(worker, n2) or connected_to(worker, n3), MOVE_S), \
            "".join(worker.lines[-20:])
        assert worker.wait_log("resumed its persistent session", WAIT_S), "".join(worker.lines[-20:])
        t_moved = time.monotonic() - t_kill
        assert bob.wait_for_messages(21, MOVE_S), (len(bob.messages), "".join(worker.lines[-20:]))
        t_all = time.monotonic() - t_kill
        contents = [m["content"] for m in bob.messages]
        assert contents == [f"#{i}" for i in range(21)], contents
        print(f"\nworker moved {t_moved:.1f} s after its node's SIGKILL; the 20 sends queued meanwhile reached "
              f"bob {t_all:.1f} s after it")

        t0 = time.monotonic()
        n1.start()  # same name and data: it rejoins the cluster
        assert nodes.running_nodes(n2) == {n.node for n in nodes}
        print(f"node 1 back in {time.monotonic() - t0:.1f} s")
    finally:
        if alice is not None:
            stop(alice)
        if bob is not None:
            bob.kill()
        worker.kill()
        for n in nodes:
            if not n.running:
                n.start()


def test_restarted_worker_knows_who_is_online_on_other_rabbitmq_nodes(rabbitmq_nodes, tmp_path):
    """RabbitMQ keeps each retained message on one node: bob's `online` is on node 3. The worker (persistent
    session) on node 1 is SIGKILLed and started again: its new process takes presence from the store's last
    words and what its session queued, so a message for bob is pushed to him at once (before: it asked node 1
    for bob's retained status, heard nothing, counted him offline, and bob was never told)."""
    nodes = rabbitmq_nodes
    n1, n2, n3 = nodes
    uids = add_users(nodes, "alice", "bob")
    worker = ProbedWorker(n1.port, f"sqlite:///{tmp_path}/im.db", client_id=f"im-worker-{os.urandom(3).hex()}")
    worker.args = lambda: ["worker", "--broker", nodes.urls(WORKER_USER), "--database-url", worker.db_url,
                           "--client-id", worker.client_id, "--persistent-session", "--share-group", ""]
    bob = alice = None
    try:
        worker.start(timeout=30)
        bob = IMClient(uids["bob"], f"{uids['bob']}-pw", n3.host, n3.port).connect(WAIT_S)
        assert bob.count(WAIT_S)["total"] == 0  # answered after the worker took in (and stored) bob's `online`
        worker.kill()
        worker.start(timeout=30)
        assert connected_to(worker, n1), "".join(worker.lines)
        assert worker.wait_log("presence: resumed a persistent session", WAIT_S), "".join(worker.lines)
        alice = IMClient(uids["alice"], f"{uids['alice']}-pw", n2.host, n2.port, receiver=False).connect(WAIT_S)
        out = alice.send(uids["bob"], "after the restart")
        assert out.wait(WAIT_S)["status"] == "stored"
        assert bob.wait_for_messages(1, WAIT_S), "bob was not told: the new worker counted him offline"
        assert bob.announcements == [], bob.announcements
    finally:
        for c in (alice, bob):
            if c is not None:
                c.kill()
        worker.kill()


def progress(phase: str, phases: dict) -> None:
    """IM_CLUSTER_PROGRESS=1 (with -s): each phase's end as it happens, to see where a slow run spends its time."""
    if os.environ.get("IM_CLUSTER_PROGRESS"):
        print(f"  {phase}: {phases[phase]:.1f} s", flush=True)


def progress_lines(worker) -> None:
    if os.environ.get("IM_CLUSTER_PROGRESS"):
        print("".join(worker.lines[-30:]), flush=True)


# --- chaos on each cluster --------------------------------------------------------------------------------
class Dev(chaos.Device):
    """A device given every node's address, starting on node ``first`` (clients spread over the nodes).
    ``toggle()`` takes it down or up on a thread of its own (a connect may first meet the dead node): the
    traffic never waits for it."""

    def __init__(self, uid: str, device: str, nodes, first: int, clean_session: bool = True):
        order = [nodes[(first + k) % len(nodes)] for k in range(len(nodes))]
        super().__init__(uid, device, f"{uid}-pw", brokers=[(n.host, n.port) for n in order],
                         clean_session=clean_session)
        self.busy: threading.Thread | None = None

    def toggle(self, abrupt: bool) -> None:
        if self.busy is not None and self.busy.is_alive():
            return
        action = (lambda: self.up(10)) if self.client is None else (lambda: self.down(abrupt))
        self.busy = threading.Thread(target=action, daemon=True)
        self.busy.start()

    def settle(self) -> None:
        if self.busy is not None:
            self.busy.join(15)


def all_up(devs, timeout: float = 20) -> list[str]:
    """Bring every device up at once (threads: each connect takes ~1 s on a loaded cluster); the ones that failed."""
    for d in devs:
        d.settle()
    failed: list[str] = []
    threads = [threading.Thread(target=lambda d=d: d.up(timeout) or failed.append(f"{d.uid}:{d.device}"))
               for d in devs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 5)
    return failed


class ClusterWorker(WorkerProcess):
    """`worker --partitions 2 --partition I` given every node's address, starting with node ``first``."""

    def __init__(self, nodes, db_url: str, index: int, first: int, tag: str):
        super().__init__(nodes[first].port, db_url, client_id=f"im-worker-p{index}of2-{tag}",
                         extra=["--partitions", "2", "--partition", str(index)])
        order = [nodes[(first + k) % len(nodes)] for k in range(len(nodes))]
        self.urls = f"mqtt://{WORKER_USER}@" + ",".join(f"{n.host}:{n.port}" for n in order)

    def args(self) -> list[str]:
        return ["worker", "--broker", self.urls, "--database-url", self.db_url, "--client-id", self.client_id,
                *self.extra, "--log-level", "DEBUG"]  # in/out per packet, by ids: an untold device's story


def story(worker, uids: set[str]) -> str:
    """A worker's INFO-and-above lines and its DEBUG lines about ``uids`` (their status, inbox and reply topics)."""
    keep = [line for line in worker.lines if " DEBUG " not in line or any(f"/{u}/" in line or line.rstrip().endswith(
        f"/{u}") or f"/{u} " in line for u in uids)]
    return f"--- {worker.client_id} ({len(keep)} of {len(worker.lines)} lines)\n" + "".join(keep[-400:])


def rejoin(kind: str, node) -> None:
    """Start a killed node again: back once it takes an MQTT CONNECT (a NATS node's /healthz waits for every
    JetStream consumer to catch up, over 30 s here under load; the test checks the deliveries themselves)."""
    node.start(wait_healthy=False) if kind == "nats" else node.start()


# The chaos timeline (seconds from the first send): worker 0's node SIGKILLed, worker 1 SIGKILLed (and started
# again at once), node 1 started again (RabbitMQ takes 12-25 s to be back, NATS ~3 s), the last send.
KILL_NODE_AT, KILL_WORKER_AT, RESTART_NODE_AT, TRAFFIC_S = 1.5, 3.0, 4.5, 6.0
# How long after the last receipt every device must hold everything by itself: NATS' JetStream takes 20-40 s to
# recover from a node's death here (services.py), and a device's sync waits for its refused SUBSCRIBE's retry
# (up to 16 s) or its failed pulls' backoff (1 s doubling: after a 20 s stall the next try can be 10 s later); a
# phone was 45 messages short after 15 s once, and a desk 8 after 25 s in a CI run beside a browser trial, all
# of them waiting for it in the store. NATS gets what the test's 60 s leave (TOLD_BY_S from the test's start).
# Two of those shortfalls were faults, not slowness, found with the workers at DEBUG beside two busy cores (2 of 5
# runs failed): a device's earlier connection's will reached the worker after its new `online` (the client now
# answers it: docs/PROTOCOL.md section 3, "A late will"), and a non-owner worker heard a phone's `online` 3 s after
# the owner had counted, storing for it unpushed meanwhile (it now announces: section 10.2). Then 8 of 8 passed.
TOLD_S = {"nats": 40.0, "rabbitmq": 25.0}
# The told phase ends by this many seconds after the test's start: the store's check (up to 10 s) and the clean-up
# must still fit in the test's 60 s (the traffic ends ~13 s after the start; the told phase then has up to ~35 s).
TOLD_BY_S = 48.0


@pytest.fixture(params=["nats", "rabbitmq"])
def cluster(request):
    """(kind, nodes): each cluster of this module in turn (started in the fixture's setup, not the test's time)."""
    return request.param, request.getfixturevalue(f"{request.param}_nodes")


def test_chaos_on_a_cluster_nothing_lost_nothing_twice_every_device_told(cluster, capsys):
    """Issue 15's acceptance: 4 users (2 of each partition), each with a desk (stays, sends) and a phone (comes
    and goes), their devices spread over the 3 nodes; 2 partitioned workers, worker 0 on node 1, worker 1 on
    node 2. Mid-traffic node 1 (worker 0's) is SIGKILLed (worker 0 and the devices there move to live nodes),
    worker 1 is SIGKILLed once and restarted, node 1 is restarted later. Then: every send confirmed and stored
    once, every device shows every message for its user (and the sync copies of its user's sends) exactly once,
    having been told of it with no drain asked by the test (pushes; announcements and the syncs they start; the
    sync after each reconnection), and the store ends empty."""
    kind, nodes = cluster
    rng = random.Random(11)
    tag = os.urandom(3).hex()
    uids = balanced_uids(2)
    everyone = uids[0] + uids[1]
    passwords = {u: f"{u}-pw" for u in everyone}
    t0 = time.monotonic()
    phases: dict[str, float] = {}

    def phase(name: str) -> None:
        phases[name] = time.monotonic() - t0
        progress(name, phases)

    for n in (nodes[:1] if kind == "rabbitmq" else nodes):  # RabbitMQ's accounts are cluster-wide; NATS' per node
        n.add_users(passwords)
    schema = PrivateSchema()
    phase("accounts")
    workers = [ClusterWorker(nodes, schema.url, i, first=i, tag=tag) for i in range(2)]
    # Beside RabbitMQ the devices keep persistent sessions (quorum queues, replicated): a clean session's queue is
    # a classic queue on the node the client was on, and while that node is down RabbitMQ refuses the client id
    # on every node ("home node ... of durable queue ... is down or inaccessible"): the device could not move.
    devs = {(u, d): Dev(u, d, nodes, first=k, clean_session=kind != "rabbitmq") for k, (u, d) in
            enumerate((u, d) for u in everyone for d in ("desk", "phone"))}
    restarter: threading.Thread | None = None
    try:
        for w in workers:  # both at once: they race to create the schema, which the store allows
            w.start(wait=False)
        for w in workers:
            ok = w.wait_log(w.ready, 20)
            progress_lines(w)
            assert ok, "".join(w.lines)
        phase("workers")
        assert all_up(devs.values()) == []
        db = open_database(schema.url, create=False)
        try:  # registrations land through the workers; the database is where they show (sync copies need them)
            assert eventually(lambda: Device.select().count() == len(devs), 20), "every device registered"
        finally:
            db.close()
        phase("devices")
        sent = []
        events = {KILL_NODE_AT: "kill node", KILL_WORKER_AT: "kill worker", RESTART_NODE_AT: "restart node"}
        start = time.monotonic()
        while (now := time.monotonic() - start) < TRAFFIC_S:
            for at in [at for at in events if now >= at]:
                what = events.pop(at)
                if what == "kill node":
                    nodes[0].kill()  # worker 0's node: it and the devices there move
                elif what == "kill worker":
                    workers[1].kill()
                    workers[1].start(wait=False)  # same client id: its persistent session kept its share meanwhile
                else:
                    restarter = threading.Thread(target=lambda: rejoin(kind, nodes[0]), daemon=True)
                    restarter.start()
            if rng.random() < 0.1:
                devs[(rng.choice(everyone), "phone")].toggle(abrupt=rng.random() < 0.5)
            s, r = rng.sample(everyone, 2)
            sent.append((s, devs[(s, "desk")].client.send(r, f"{s}->{r} #{len(sent)}")))
            time.sleep(0.05)  # pacing, not synchronisation
        n = len(sent)
        phase("send")
        assert all_up(devs.values()) == []
        phase("all_up")
        deadline = time.monotonic() + 20
        for _, o in sent:
            if o.wait(max(0.0, deadline - time.monotonic())) is None and time.monotonic() > deadline:
                break
        confirmed = sum(1 for _, o in sent if o.receipt and o.receipt.get("status") in ("stored", "duplicate"))
        phase("confirm")
        if confirmed < n and os.environ.get("IM_CLUSTER_PROGRESS"):
            print(f"{n - confirmed} sends never confirmed; unconfirmed senders "
                  f"{sorted({s for s, o in sent if not o.receipt})}", *("".join(w.lines[-25:]) for w in workers))

        def want_for(uid, device):
            want = {o.msg_id for s, o in sent if o.to == uid}
            if device != "desk":
                want |= {o.msg_id for s, o in sent if s == uid}  # sync copies of what its desk sent
            return want

        # Told: each device ends with all of it by itself; no drain asked by the test.
        deadline = min(time.monotonic() + TOLD_S[kind], t0 + TOLD_BY_S)
        untold = []
        for key, dev in devs.items():
            want = want_for(*key)
            if not dev.client.wait_for(lambda: want <= {m["msg_id"] for m in dev.messages},
                                       max(0.1, deadline - time.monotonic())):
                c = dev.client
                untold.append((key, len(want - {m["msg_id"] for m in dev.messages}),
                               dict(connected=c.client.is_connected(), broker=f"{c.host}:{c.port}", syncs=c.syncs,
                                    sync_failures=c.sync_failures, refusals=c.subscribe_refusals,
                                    moves=c.failovers, restated=c.status_restated, ups=len(dev.instances),
                                    phases=dict(phases))))
        phase("told")
        lost, twice, received = chaos.collect_device_deliveries(devs, want_for)
        for dev in devs.values():
            dev.client.flush_acks()
        db = open_database(schema.url, create=False)
        try:
            stored_once = Accepted.select().count()
            eventually(lambda: Message.select().count() == 0, 10)  # acks in flight; asserted below
            left = Message.select().count()
        finally:
            db.close()
        phase("store_empty")
        if restarter is not None:
            restarter.join(30)
        dropped = sum(c.duplicates_dropped for d in devs.values() for c in d.instances)
        restated = sum(c.status_restated for d in devs.values() for c in d.instances)
        moves = sum(c.failovers for d in devs.values() for c in d.instances)
        with capsys.disabled():
            print(f"\nchaos on the {kind} cluster: sent={n} confirmed={confirmed} device deliveries={received} "
                  f"lost={len(lost)} twice={len(twice)} untold={len(untold)} client moves={moves} "
                  f"repeats_dropped_by_clients={dropped} late_wills_answered={restated} accepted={stored_once} left_in_store={left} "
                  f"phases(s)={ {k: round(v, 1) for k, v in phases.items()} }")
        assert confirmed == n, (f"{n - confirmed} sends never confirmed", *("".join(w.lines[-15:]) for w in workers))
        assert lost == [], lost[:10]
        assert twice == [], twice[:10]
        # The message: each untold device's state, and what each worker logged about it (its INFO lines, and the
        # packets to and from the untold users' topics), whole (pytest cuts a compared list, not a string message).
        assert untold == [], "\n".join([*map(repr, untold), *(story(w, {key[0] for key, *_ in untold}) for w in workers)])
        assert received == 3 * n, "each message to the receiver's 2 devices, its copy to the sender's phone"
        assert stored_once == n
        assert left == 0
        assert nodes[0].running, "node 1 did not come back"
    finally:
        for d in devs.values():
            d.settle()
        chaos.kill_all(devs.values())
        for w in workers:
            w.kill()
        if restarter is not None:
            restarter.join(60)
        for node in nodes:
            if not node.running:
                rejoin(kind, node)
        schema.close()
