"""What the worker finds out by itself beside each broker: whether $share delivers (the start-up probe), who
is online after a restart (RabbitMQ sends no retained status to im/status/+), and uids a broker splits.

Mosquitto (a private one per test), NATS and RabbitMQ (the session's shared nodes, tests/services.py) with
per-test uids; the worker is ``python -m backend worker`` with the default --share-group, as an operator
starts it."""

from __future__ import annotations

import os

import pytest

from backend.client import IMClient
from backend import protocol as p
from conftest import eventually, raw_client
from conftest import stop_raw as stop
from services import BROKERS, JETSTREAM_RECOVERY_S, WORKER_USER, ProbedWorker, mosquitto, shared_broker, \
    unique_users

# Upper bound for anything that takes milliseconds; waits return as soon as the event happens.
WAIT_S = 15.0


@pytest.fixture(params=BROKERS)
def beside(request, tmp_path):
    """(kind, port, uids, db_url): a broker with this test's users alice and bob (unique uids)."""
    uids = unique_users("alice", "bob")
    passwords = {uid: f"{uid}-pw" for uid in uids.values()}
    if request.param == "mosquitto":
        node = mosquitto(passwords)
        yield request.param, node, uids, f"sqlite:///{tmp_path}/im.db"
        node.close()
        return
    node = shared_broker(request.param)
    node.add_users(passwords)
    yield request.param, node, uids, f"sqlite:///{tmp_path}/im.db"


def client(node, uid, **kw) -> IMClient:
    return IMClient(uid, f"{uid}-pw", node.host, node.port, **kw).connect(WAIT_S)


def test_share_probe_says_what_it_found_and_the_chat_works(beside):
    kind, node, uids, db_url = beside
    worker = ProbedWorker(node.port, db_url).start(timeout=30)
    try:
        verdict = next(line for line in worker.lines if "backend.worker: the broker at" in line)
        if kind == "mosquitto":
            assert "delivers through shared subscriptions" in verdict, verdict
        else:  # NATS and RabbitMQ: granted (or refused), never delivered; one WARNING line, then plain
            assert "WARNING" in verdict and "has no shared subscriptions" in verdict and "plainly" in verdict, verdict
        bob = client(node, uids["bob"])
        alice = client(node, uids["alice"])
        out = alice.send(uids["bob"], "hello")
        assert out.wait(WAIT_S)["status"] == "stored"
        assert bob.wait_for_messages(1, WAIT_S), "".join(worker.lines)
        assert out.delivered.wait(WAIT_S)
        for c in (alice, bob):
            c.close()
        # The worker's own probes (backend/doctor.py) find the rights of broker_config/ enforced on each broker.
        assert worker.wait_log("enforces the per-user rights", WAIT_S), "".join(worker.lines)
    finally:
        worker.kill()


@pytest.mark.parametrize("device", [None, "phone"])
def test_worker_restarted_while_bob_is_online_still_pushes_to_him(beside, device):
    """RabbitMQ sends no retained status to the worker's im/status/+ (or a device's im/status/+/+) after its
    restart: without the store's last statuses (and the exact re-subscription) bob stays 'offline' to the new
    worker and gets no push (failed before, with the v1 client). ``device``: bob as a device-aware client."""
    kind, node, uids, db_url = beside
    worker = ProbedWorker(node.port, db_url).start(timeout=30)
    bob = client(node, uids["bob"], **({"device": device} if device else {}))
    try:
        assert bob.count(WAIT_S)["total"] == 0  # answered after the worker took in bob's `online`
        worker.kill()  # SIGKILL: its clean session is gone; bob stays connected and online
        worker.start(timeout=30)
        # Synchronisation only (the assertions below are what matters): the new worker asked about bob.
        worker.wait_log("presence: asked the broker for the retained word of", 5)
        alice = client(node, uids["alice"], receiver=False)
        out = alice.send(uids["bob"], "after the restart")
        assert out.wait(WAIT_S)["status"] == "stored"
        assert bob.wait_for_messages(1, WAIT_S), "".join(worker.lines)
        assert bob.announcements == [], "bob was told to pull: the new worker did not count him online"
        assert out.delivered.wait(WAIT_S)
        alice.close()
    finally:
        bob.close()
        worker.kill()


def test_rabbitmq_split_uid_is_refused_and_never_stored_under_another(tmp_path):
    """RabbitMQ turns '.' into '/': bob.x's im/u/bob.x/send reaches the worker as im/u/bob/x/send. The account
    is refused by the broker's setup (no '.'), and the worker, if it meets such a topic, says so in one line
    and stores nothing (never as 'bob', never as anyone)."""
    from scripts.rabbitmq import definitions
    with pytest.raises(ValueError, match="no '.'"):
        definitions({"bob.x": "pw"})
    node = shared_broker("rabbitmq")
    tag = os.urandom(3).hex()
    dotted, bob = f"bob{tag}.x", f"bob{tag}"
    # Made around the refusal (as a careless operator might, with rabbitmqctl): its rights let it publish.
    node.add_users({bob: "pw"})
    path = tmp_path / "dotted.json"
    import json
    defs = definitions({f"bob{tag}_x": "pw"})
    for section in ("users", "permissions", "topic_permissions"):
        for entry in defs[section]:
            entry["name" if section == "users" else "user"] = dotted
    defs["topic_permissions"][0]["write"] = ".*"
    path.write_text(json.dumps(defs))
    r = node.ctl("import_definitions", str(path))
    assert r.returncode == 0, r.stdout + r.stderr
    from scripts.nats import mqtt_connects
    assert eventually(lambda: mqtt_connects(node.host, node.port, (dotted, "pw")), WAIT_S)  # the import is async
    worker = ProbedWorker(node.port, f"sqlite:///{tmp_path}/im.db").start(timeout=30)
    try:
        c, rc, _ = raw_client(node.port, dotted, "pw", f"{dotted}:raw")
        assert rc is not None and not rc.is_failure
        c.publish(p.send_topic(dotted), p.encode({"msg_id": "split-1", "to": bob, "content": "x"}), qos=1)
        assert worker.wait_log("the broker split a uid into topic levels", WAIT_S), "".join(worker.lines)
        stop(c)
        line = next(line for line in worker.lines if "split a uid" in line)
        assert f"im/u/{bob}/x/send" in line and "ERROR" in line
        from backend.store import Message, open_database
        db = open_database(f"sqlite:///{tmp_path}/im.db")
        assert Message.select().count() == 0, "a payload of the split uid was stored"
        db.close()
    finally:
        worker.kill()


def test_worker_with_a_dotted_client_id_is_heard_gone_on_nats(tmp_path):
    """The default client id holds the host name (often with dots). NATS refuses a topic with '.' in a level
    ("characters ' ' and '.' not supported for MQTT topics"), so the will on im/worker/<client id> never
    reached the other workers (failed before the fix: no `gone` within 15 s)."""
    from services import WORKER_PASSWORD, WORKER_USER
    node = shared_broker("nats")
    watcher, rc, got = raw_client(node.port, WORKER_USER, WORKER_PASSWORD, f"watcher-{os.urandom(3).hex()}")
    worker = ProbedWorker(node.port, f"sqlite:///{tmp_path}/im.db", client_id="host.example.org-1")
    try:
        assert rc is not None and not rc.is_failure
        watcher.subscribe(p.WORKER_TOPIC_FILTER, qos=1)
        worker.start(timeout=WAIT_S)
        worker.kill()  # SIGKILL: the broker publishes its will
        assert eventually(lambda: any(m.payload == p.WORKER_GONE for m in got), WAIT_S), node.log_tail(5)
    finally:
        worker.kill()
        stop(watcher)


def test_split_uid_is_recognised_only_for_five_level_client_topics():
    from backend.transport.subscriptions import mangled_uid, probe_topic
    assert mangled_uid("im/u/bob/x/send") == "bob.x"
    assert mangled_uid("im/u/a/b/c/req") == "a.b.c"
    assert mangled_uid("im/u/bob/send") is None  # a v1 topic
    assert mangled_uid("im/u/bob/d/laptop/send") is None  # a device topic
    assert mangled_uid("im/u/bob/x/inbox") is None  # not a client topic
    assert probe_topic("host.example org/1") == "im/worker/probe/host_example_org_1"


def test_refused_subscription_is_retried_until_granted(tmp_path):
    """NATS answers a SUBSCRIBE it refuses with 0x80 (it does so while JetStream is unavailable): the worker
    says so in one line and retries with backoff; once the broker grants it, requests are answered."""
    from scripts.nats import WORKER_PUBLISH, WORKER_SUBSCRIBE
    node = shared_broker("nats")
    tag = os.urandom(3).hex()
    account, uid = f"im-worker-{tag}", f"carol-{tag}"
    without_req = [f for f in WORKER_SUBSCRIBE if f != "im.u.*.req"]
    node.add_users({account: "pw", uid: f"{uid}-pw"},
                   permissions={account: {"publish": {"allow": WORKER_PUBLISH}, "subscribe": {"allow": without_req}}})

    class Worker(ProbedWorker):
        def args(self):
            return [a.replace("im-worker@", f"{account}@") for a in super().args()]

        def env(self):
            return {"IM_BROKER_PASSWORD": "pw"}

    worker = Worker(node.port, f"sqlite:///{tmp_path}/im.db")
    try:
        worker.start(timeout=WAIT_S)
        assert worker.wait_log("the broker refused the subscription to im/u/+/req", WAIT_S), "".join(worker.lines)
        # Granted now (as NATS does once JetStream is back): the worker's next retry succeeds.
        node.add_users({account: "pw"}, permissions={account: {"publish": {"allow": WORKER_PUBLISH},
                                                               "subscribe": {"allow": WORKER_SUBSCRIBE}}})
        assert worker.wait_log("subscribed to im/u/+/req after the broker's earlier refusal", 20), \
            "".join(worker.lines)
        carol = client(node, uid, auto_sync=False)
        assert carol.count(WAIT_S)["total"] == 0
        carol.close()
    finally:
        worker.kill()


def test_worker_moves_to_a_live_node_when_its_nats_node_dies(tmp_path, alice_bob_cluster, made):
    """A 3-node NATS cluster (JetStream R3): the worker, given all three addresses, is on node 1, alice on
    node 2, bob on node 3. Node 1 is SIGKILLed: the worker moves to a live node by itself, and the chat goes
    on (alice's client resends what got no receipt); nothing lost, nothing shown twice. Opt-in
    (services.nats_cluster: JetStream's own recovery takes 20-40 s here); node 1 is a follower of its meta group."""
    nodes, uids = alice_bob_cluster
    worker = ProbedWorker(nodes[0].port, f"sqlite:///{tmp_path}/im.db")
    made.append(worker)
    worker.args = lambda: ["worker", "--broker", f"mqtt://{WORKER_USER}@127.0.0.1:{nodes[0].port},"
                           f"127.0.0.1:{nodes[1].port},127.0.0.1:{nodes[2].port}",
                           "--database-url", worker.db_url, "--client-id", "im-worker"]
    worker.start(timeout=30)
    assert any(f"connected to 127.0.0.1:{nodes[0].port}" in line for line in worker.lines)
    # alice resends every 2 s at most (the default backoff reaches 21 and 45 s): the test measures the
    # worker's move and JetStream's recovery (up to ~34 s here), not the client's backoff.
    alice = client(nodes[1], uids["alice"], receiver=False, resend_timeout=1.0, resend_wait_max=2.0,
                   max_resends=100)
    made.append(alice)
    bob = client(nodes[2], uids["bob"])
    made.append(bob)
    first = alice.send(uids["bob"], "before")
    assert first.wait(WAIT_S)["status"] == "stored"
    assert bob.wait_for_messages(1, WAIT_S)

    nodes[0].kill()
    moved = lambda: any(f"connected to 127.0.0.1:{n.port}" in line for n in nodes[1:]  # noqa: E731
                        for line in worker.lines)
    assert eventually(moved, 30), "".join(worker.lines[-20:])
    second = alice.send(uids["bob"], "after")  # resent by alice's client until a live worker answers
    r = second.wait(JETSTREAM_RECOVERY_S)
    assert r is not None and r["status"] in ("stored", "duplicate"), "".join(worker.lines[-20:])
    assert bob.wait_for(lambda: len(bob.messages) >= 2, 30), (bob.messages, "".join(worker.lines[-20:]))
    assert [m["content"] for m in bob.messages] == ["before", "after"]
