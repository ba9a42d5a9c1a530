"""The reference client given several broker addresses (issue 15): it moves to a live one when its own dies.

Always on (seconds): the client's addresses are a TCP proxy process in front of `serve` and `serve`'s own
port; SIGKILLing the proxy is, for the client, its node dying (the connection drops, the address refuses).
Opt-in (IM_CLUSTER_TESTS=1, like the worker's in test_brokers.py: JetStream takes 20-40 s to recover here
after a node dies, services.nats_cluster): a 3-node NATS cluster whose node under the clients is SIGKILLed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from backend.client import IMClient, broker_list
from conftest import PASSWORDS, eventually, free_port
from services import JETSTREAM_RECOVERY_S, WorkerProcess

TESTS = Path(__file__).resolve().parent
# Upper bound for what takes milliseconds to a second or two (a reconnect waits paho's 1 s backoff first).
WAIT_S = 15.0


class ProxyProcess:
    """tests/faultproxy.py's proxy in a process of its own, forwarding to ``upstream_port``, so that SIGKILL
    can end it as a crashed broker node ends: every connection dropped, the port refusing."""

    def __init__(self, upstream_port: int):
        code = ("import sys, time; sys.path.insert(0, sys.argv[1]); from faultproxy import FaultProxy; "
                "p = FaultProxy(int(sys.argv[2])).start(); print(p.port, flush=True); time.sleep(3600)")
        self.proc = subprocess.Popen([sys.executable, "-c", code, str(TESTS), str(upstream_port)],
                                     stdout=subprocess.PIPE, text=True)
        self.port = int(self.proc.stdout.readline())

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


def make(port_list, uid: str, **kw) -> IMClient:
    return IMClient(uid, PASSWORDS[uid], brokers=[("127.0.0.1", p) for p in port_list], **kw)


def test_broker_list_takes_pairs_and_the_workers_url_syntax():
    assert broker_list("mqtt://n1:1884,n2,mqtt://n3:1885", "bob") == ([("n1", 1884), ("n2", 1883), ("n3", 1885)], False)  # parsed only: the default port
    assert broker_list("mqtts://bob@n1,n2:9883", "bob") == ([("n1", 8883), ("n2", 9883)], True)
    assert broker_list([("a", 1), ("b", 2)], "bob") == ([("a", 1), ("b", 2)], False)
    for bad in ("", "n1:1883", "mqtt://alice@n1:1883", "mqtt://n1,mqtts://n2"):
        with pytest.raises(ValueError):
            broker_list(bad, "bob")
    with pytest.raises(ValueError):
        IMClient("bob", "pw", brokers=[("a", 0)])
    with pytest.raises(ValueError):
        IMClient("bob", "pw", brokers=[])


def test_client_skips_a_dead_address(shared_server):
    """[a port nobody listens on, the live broker]: the first connect fails, the client moves on and connects."""
    dave = make([free_port(), shared_server.port], "dave")
    try:
        dave.connect(WAIT_S)
        assert (dave.host, dave.port) == ("127.0.0.1", shared_server.port) and dave.failovers >= 1
        assert dave.count(WAIT_S)["total"] == 0  # subscribed and answered there
    finally:
        dave.kill()


def test_client_names_every_address_when_none_answers():
    bob = make([free_port(), free_port()], "bob")
    with pytest.raises(ConnectionError, match="any of 127.0.0.1:.*, 127.0.0.1:"):
        bob.connect(1.0)


def test_client_moves_on_when_its_node_dies_and_nothing_is_lost_or_shown_twice(shared_server):
    """alice and bob are on the proxy (their first address) and have `serve` as their second; carol is on
    `serve`. The proxy is SIGKILLed between messages: both move on, bob republishes `online` and syncs what
    was sent while he was away, alice's unconfirmed send is resent; each message reaches bob exactly once."""
    proxy = ProxyProcess(shared_server.port)
    alice = bob = carol = None
    try:
        bob = make([proxy.port, shared_server.port], "bob").connect(WAIT_S)
        alice = make([proxy.port, shared_server.port], "alice", receiver=False, resend_timeout=1.0).connect(WAIT_S)
        carol = make([shared_server.port], "carol", receiver=False).connect(WAIT_S)
        assert bob.port == proxy.port and alice.port == proxy.port
        assert alice.send("bob", "before").wait(WAIT_S)["status"] == "stored"
        assert bob.wait_for_messages(1, WAIT_S)
        syncs = bob.syncs

        proxy.kill()
        during = alice.send("bob", "during")  # published while alice's link is down: resent until a receipt
        assert carol.send("bob", "while-away").wait(WAIT_S)["status"] == "stored"
        r = during.wait(WAIT_S)
        assert r is not None and r["status"] in ("stored", "duplicate"), during.problem
        assert alice.port == shared_server.port and alice.failovers >= 1
        assert alice.send("bob", "after").wait(WAIT_S)["status"] == "stored"

        assert bob.wait_for(lambda: len(bob.messages) >= 4 and bob.syncs > syncs, WAIT_S), bob.messages
        assert bob.port == shared_server.port and bob.failovers >= 1
        contents = [m["content"] for m in bob.messages]
        assert sorted(contents) == ["after", "before", "during", "while-away"], contents
        seq = {m["content"]: m["seq"] for m in bob.messages}
        # alice's order is kept in the seqs (an app shows by seq: arrival interleaves pushes with the sync's pages)
        assert seq["during"] < seq["after"], bob.messages
        # bob is subscribed on his new address: a push reaches him there, once.
        assert carol.send("bob", "last").wait(WAIT_S)["status"] == "stored"
        assert bob.wait_for_messages(5, WAIT_S), bob.messages
        assert eventually(lambda: bob.count(WAIT_S)["total"] == 0, WAIT_S)  # all acked: nothing waits again
        assert len(bob.messages) == 5
    finally:
        for c in (alice, bob, carol):
            if c is not None:
                c.kill()
        if proxy.proc.poll() is None:
            proxy.kill()


def test_client_moves_to_a_live_nats_node_when_its_node_dies(tmp_path, alice_bob_cluster, made):
    """A 3-node NATS cluster (JetStream R3): the worker is on node 3; alice and bob, given all three addresses,
    are on node 1. Node 1 is SIGKILLed: both move to a live node by themselves (subscribing again while NATS
    refuses during JetStream's recovery), and the chat goes on: nothing lost, nothing shown twice. Opt-in
    (services.nats_cluster: JetStream's own recovery takes 20-40 s here); node 1 is a follower of its meta group."""
    nodes, uids = alice_bob_cluster
    worker = WorkerProcess(nodes[2].port, f"sqlite:///{tmp_path}/im.db")
    made.append(worker)
    worker.start(timeout=30)
    addresses = ",".join(f"127.0.0.1:{n.port}" for n in nodes)
    # alice resends every 2 s at most: the test measures the move and JetStream's recovery, not the backoff.
    alice = IMClient(uids["alice"], f"{uids['alice']}-pw", brokers=f"mqtt://{addresses}", receiver=False,
                     resend_timeout=1.0, resend_wait_max=2.0, max_resends=100).connect(WAIT_S)
    made.append(alice)
    bob = IMClient(uids["bob"], f"{uids['bob']}-pw", brokers=f"mqtt://{addresses}").connect(WAIT_S)
    made.append(bob)
    assert alice.port == bob.port == nodes[0].port
    assert alice.send(uids["bob"], "before").wait(WAIT_S)["status"] == "stored"
    assert bob.wait_for_messages(1, WAIT_S)

    nodes[0].kill()
    second = alice.send(uids["bob"], "after")
    r = second.wait(JETSTREAM_RECOVERY_S)
    assert r is not None and r["status"] in ("stored", "duplicate"), (second.problem, worker.lines[-20:])
    assert alice.port != nodes[0].port and bob.port != nodes[0].port
    assert bob.wait_for(lambda: len(bob.messages) >= 2, 30), (bob.messages, worker.lines[-20:])
    assert [m["content"] for m in bob.messages] == ["before", "after"]


def test_a_device_beside_a_cluster_says_online_again_after_each_connection(shared_server, monkeypatch):
    """Beside a cluster (several addresses) a device-aware client restates its `online` after each connection
    (CLUSTER_ONLINE_RESTATE_S, here shortened): a cluster can hand a worker its statuses late, reordered or not
    at all while a node's death settles, and the newest word wins. A client given one address does not."""
    import backend.client as client_module
    from backend import protocol as p
    from conftest import raw_client, stop_raw
    monkeypatch.setattr(client_module, "CLUSTER_ONLINE_RESTATE_S", (0.3, 0.6))
    watcher, rc, seen = raw_client(shared_server.port, "carol", PASSWORDS["carol"], "carol:watch-restate")
    assert rc is not None and not rc.is_failure
    watcher.subscribe(p.status_topic("dave", "tablet"), 1)
    words = lambda: [m.payload.decode() for m in seen]  # noqa: E731
    dave = make([free_port(), shared_server.port], "dave", device="tablet")
    single = IMClient("erin", PASSWORDS["erin"], port=shared_server.port, device="tablet")
    try:
        dave.connect(WAIT_S)
        single.connect(WAIT_S)
        assert eventually(lambda: dave.status_restated == 2, WAIT_S), dave.status_restated
        assert eventually(lambda: words()[-3:] == ["online", "online", "online"], WAIT_S), words()
        assert dave.count(WAIT_S)["total"] >= 0  # still served: each restatement was answered by a count at most
        assert single.status_restated == 0
    finally:
        dave.kill()
        single.kill()
        stop_raw(watcher)
