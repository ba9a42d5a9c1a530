"""Beside a broker cluster (issue 15): a 3-node RabbitMQ cluster with quorum queues for persistent sessions
(scripts/rabbitmq.py start_rabbitmq_cluster), nodes SIGKILLed under the worker.

Opt-in (IM_CLUSTER_TESTS=1), as tests/test_brokers.py's NATS cluster test: three RabbitMQ nodes start in
30-40 s here and sometimes ~120 s (BROKERS.md), so the module starts the cluster once (its start is not
counted in a test's 60 s: ``func_only``; it has its own bound, CLUSTER_START_TIMEOUT_S) and each test
leaves every node running for the next.

    IM_CLUSTER_TESTS=1 python -m pytest tests/test_cluster.py tests/test_brokers.py -k "cluster or nats_node"
"""

from __future__ import annotations

import os
import time

import pytest

from backend import protocol as p
from backend.client import IMClient
from conftest import eventually, raw_client
from conftest import stop_raw as stop
from services import WORKER_PASSWORD, WORKER_USER, ProbedWorker, require, unique_users

# Upper bound for anything that takes milliseconds; waits return as soon as the event happens.
WAIT_S = 15.0
# The worker's move after its node's SIGKILL: paho notices the dead socket at once, then the next address;
# RabbitMQ elects a new leader for the session's quorum queue within seconds. Measured: 1-3 s.
MOVE_S = 30.0

# The cluster's start is timed by the launcher's own bound, not by the first test's 60 s.
pytestmark = [
    pytest.mark.skipif(os.environ.get("IM_CLUSTER_TESTS") != "1",
                       reason="cluster tests: set IM_CLUSTER_TESTS=1 to run them (a RabbitMQ cluster starts in "
                              "30-120 s here)"),
    pytest.mark.timeout(60, func_only=True),
]


@pytest.fixture(scope="module")
def rabbit_nodes():
    """A 3-node RabbitMQ cluster with the worker's account, for this module; each test adds its own users."""
    from scripts.rabbitmq import find_rabbitmq, start_rabbitmq_cluster
    require(find_rabbitmq() is not None, "rabbitmq-server not installed (Debian: apt-get install rabbitmq-server)")
    t0 = time.monotonic()
    nodes = start_rabbitmq_cluster({WORKER_USER: WORKER_PASSWORD})
    print(f"\nRabbitMQ cluster ready in {time.monotonic() - t0:.1f} s (nodes ready at {nodes.start_s} s"
          f"{', restarted once: ' + ', '.join(nodes.restarted) if nodes.restarted else ''})")
    yield nodes
    nodes.close()


def add_users(nodes, *names: str) -> dict[str, str]:
    """name -> a unique uid with password '<uid>-pw' on the cluster (accounts are cluster-wide)."""
    uids = unique_users(*names)
    nodes[0].add_users({u: f"{u}-pw" for u in uids.values()})
    return uids


def connected_to(worker, node) -> bool:
    return any(f"connected to {node.host}:{node.port} " in line for line in worker.lines)


def test_worker_resumes_its_quorum_session_on_another_rabbitmq_node(rabbit_nodes, tmp_path):
    """The worker (persistent session: a quorum queue replicated over the 3 nodes) is on node 1, alice on
    node 2, bob on node 3. Node 1 is SIGKILLed; at once alice publishes 20 sends with a raw client that never
    resends: they wait in the worker's session queue while it moves. The worker resumes its session on a live
    node and bob gets all 21 messages, in order, once each. Node 1 then comes back and rejoins the cluster.
    (Before the worker kept presence on a resumed session, it counted bob offline there: RabbitMQ's retained
    store is per node, bob's `online` is on node 3. The 20 were stored and bob was never told: 1 of 21.)"""
    nodes = rabbit_nodes
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
