"""Liveness end to end: a connected device is always told of what waits for it, and always gets it.

* A receiver that stops reading its socket while 1,500 messages arrive (Mosquitto with its default
  queue of 1,000 drops the rest of the pushes, their retries, and the first announcements too) gets
  every message once it reads again, without reconnecting, told by a repeated announcement.
* A device that publishes `online` while the worker already counts it online is announced to.
* Pages of large, badly escaping messages are cut by bytes, and the reference client drains them.
* A client whose sync gets no answer (the worker stopped or killed mid-drain) keeps trying until
  it has everything.

Real brokers, real worker processes, real signals; waits are on events, with generous timeouts.
"""

from __future__ import annotations

import signal
import time

import pytest

from backend import protocol as p
from backend.client import IMClient
from backend.store import Message, open_database
from conftest import PASSWORDS, add_users, eventually
from services import WorkerProcess, mosquitto


def store_count(db_url: str) -> int:
    db = open_database(db_url)
    try:
        return Message.select().count()
    finally:
        db.close()


class Beside:
    """A private Mosquitto (``extra`` config lines) and one worker process on a SQLite file."""

    def __init__(self, db_url: str, extra_config=(), worker_args=()):
        add_users(db_url)  # the schema; accounts live in Mosquitto's password file here
        self.db_url = db_url
        self.broker = mosquitto(PASSWORDS, extra_config=tuple(extra_config))
        self.port = self.broker.port
        self.worker = WorkerProcess(self.port, db_url, extra=list(worker_args))
        self.worker.start()
        self.clients: list[IMClient] = []

    def client(self, uid: str, **kw) -> IMClient:
        c = IMClient(uid, PASSWORDS[uid], port=self.port, **kw).connect()
        self.clients.append(c)
        return c

    def close(self) -> None:
        for c in self.clients:
            c.kill()
        self.worker.kill()
        self.broker.close()


@pytest.fixture
def beside(db_url):
    made: list[Beside] = []

    def make(**kw) -> Beside:
        made.append(Beside(db_url, **kw))
        return made[-1]

    yield make
    for b in made:
        b.close()


def count_reconnects(c: IMClient) -> list[int]:
    """A list that grows by one at each CONNACK from now on (paho reconnecting by itself)."""
    seen: list[int] = []
    original = c.client.on_connect

    def on_connect(*args):
        seen.append(1)
        original(*args)

    c.client.on_connect = on_connect
    return seen


# Mosquitto's own default queue for a client (broker_config/ raises it to 100,000): 1,000 queued
# QoS 1 messages, past which it drops them, plus max_inflight_messages 20 in flight.
DEFAULT_QUEUE = ("max_queued_messages 1000",)
N_FLOOD = 1500
# The scenario of the report: bob's app does not read for 25 s. That is past the last retry of every
# dropped push (sent within the first ~3 s, retried at +3 s and +9 s, given up at +21 s), so the pushes,
# their retries and the first announcements all meet a full queue. Not a synchronisation: the duration
# of the fault being modelled.
BOB_DEAF_S = 25
# Repeat announcements after 3 s (not the default 30 s) so the test stays well under a minute.
WORKER_ARGS = ("--send-rate", "0", "--announce-repeat", "3")


def test_a_deaf_receiver_is_told_of_every_push_its_broker_dropped(beside):
    system = beside(extra_config=DEFAULT_QUEUE, worker_args=WORKER_ARGS)
    bob = system.client("bob")
    alice = system.client("alice", receiver=False)
    reconnects = count_reconnects(bob)
    bob.client.loop_stop()  # bob's app stops reading its socket; the connection stays open
    deaf_until = time.monotonic() + BOB_DEAF_S
    sent = [alice.send("bob", f"flood {i}") for i in range(N_FLOOD)]
    assert all(o.wait(40) for o in sent), "every message is stored (receipt) while bob is deaf"
    assert all(o.receipt["status"] in ("stored", "duplicate") for o in sent)
    time.sleep(max(0.0, deaf_until - time.monotonic()))  # the fault's duration (see BOB_DEAF_S)
    heard_before = len(bob.announcements)
    bob.client.loop_start()  # bob reads again
    assert bob.wait_for(lambda: len(bob.messages) >= N_FLOOD, 30), \
        f"bob got {len(bob.messages)} of {N_FLOOD}; announcements: {bob.announcements}"
    assert sorted(m["msg_id"] for m in bob.messages) == sorted(o.msg_id for o in sent)
    assert len({m["seq"] for m in bob.messages}) == N_FLOOD  # exactly once, after dedup by seq
    assert reconnects == [], "bob never reconnected: an announcement told him"
    assert any(a["total"] > 0 for a in bob.announcements[heard_before:]), bob.announcements
    assert eventually(lambda: store_count(system.db_url) == 0, 20)


def _online_again_is_announced(port: int) -> None:
    alice = IMClient("alice", PASSWORDS["alice"], port=port, receiver=False).connect()
    bob = IMClient("bob", PASSWORDS["bob"], port=port, auto_sync=False, ack_delay=60).connect()  # acks late
    try:
        assert alice.send("bob", "waiting for bob").wait(15)["status"] == "stored"
        assert bob.wait_for_messages(1, 15)  # pushed, not yet acked: it waits in the store
        # bob's device dropped and came back without the worker noticing (it still counts him online):
        # it says `online` again, and must hear of what waits.
        before = len(bob.announcements)
        bob.client.publish(p.status_topic("bob"), p.ONLINE, qos=1, retain=True)
        assert bob.wait_for(lambda: len(bob.announcements) > before, 15), "no announcement for a repeated online"
        assert bob.announcements[-1]["total"] == 1 and "req_id" not in bob.announcements[-1]
    finally:
        alice.kill()
        bob.kill()


def test_online_while_already_online_is_announced_beside_mosquitto(beside):
    system = beside()
    _online_again_is_announced(system.port)


def test_online_while_already_online_is_announced_on_the_embedded_broker(server):
    _online_again_is_announced(server.port)


def test_a_message_stored_by_a_worker_that_died_before_pushing_reaches_the_online_receiver(db_url):
    """Two workers; one dies right after committing a message, before its push (IM_CRASH_AT). The sender
    never got its receipt, so it resends; the resend reaches the live worker, which answers `duplicate`
    and, as the message still waits and bob is online, announces it: bob pulls it. Nobody restarts."""
    add_users(db_url)
    broker = mosquitto(PASSWORDS)
    live = WorkerProcess(broker.port, db_url, client_id="im-worker-live")
    doomed = WorkerProcess(broker.port, db_url, client_id="im-worker-doomed")
    clients: list[IMClient] = []
    try:
        live.start()
        doomed.start(env={"IM_CRASH_AT": "before_push"})
        bob = IMClient("bob", PASSWORDS["bob"], port=broker.port).connect()
        alice = IMClient("alice", PASSWORDS["alice"], port=broker.port, receiver=False).connect()
        clients += [bob, alice]
        # The shared subscription takes turns: of four sends, some reach the doomed worker.
        sent = [alice.send("bob", f"to be pushed {i}") for i in range(4)]
        assert doomed.proc.wait(15) == -signal.SIGKILL, "the doomed worker died before a push"
        assert all(o.wait(40) for o in sent), "the resends are answered by the live worker"
        assert bob.wait_for(lambda: {m["msg_id"] for m in bob.messages} >= {o.msg_id for o in sent}, 30), \
            f"bob got {sorted(m['content'] for m in bob.messages)}; announcements {bob.announcements}"
        assert len(bob.messages) == len({m["seq"] for m in bob.messages}) == 4
        assert any(o.receipt["status"] == "duplicate" for o in sent)
        assert eventually(lambda: store_count(db_url) == 0, 20)
    finally:
        for c in clients:
            c.kill()
        live.kill()
        doomed.kill()
        broker.close()
