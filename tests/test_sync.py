"""The reference client's sync end to end: pages too large for the send-topic limit, and syncs that get
no answer (the worker stopped or killed in the middle of a drain).

Both used to leave a connected client without its messages for good: it dropped every page over
PAYLOAD_MAX as "unreadable", and it never tried a failed sync again while it stayed connected.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

import pytest

from backend import protocol as p
from conftest import PASSWORDS, Server, add_users, eventually
from test_announce import store_count

# A quote and a control character: 2 bytes of content that JSON escapes to 8 (\" and \u0001).
BAD = '"\x01'


def test_pages_of_large_badly_escaping_messages_are_cut_and_drained(server, clients, db_url):
    contents = [BAD * 29_997 + f"{i:06d}" for i in range(7)]  # 60,000 bytes each, ~240,000 escaped
    assert all(len(c.encode()) == 60_000 for c in contents)
    alice = clients(server, "alice", receiver=False)
    sent = [alice.send("bob", c) for c in contents]
    assert all(o.wait(30) and o.receipt["status"] == "stored" for o in sent)

    # A look at the pages first (no ack: nothing is deleted): cut by bytes, `more` still true.
    peek = clients(server, "bob", auto_sync=False)
    page = peek.pull(limit=100)
    assert 1 <= len(page["messages"]) < 7 and page["more"] is True
    assert len(p.encode(page)) <= p.REPLY_PAYLOAD_MAX
    # The announcement stays small: previews are the first 100 characters (800 bytes escaped at worst).
    assert peek.wait_for(lambda: peek.announcements, 15)
    assert len(p.encode(peek.announcements[0])) < 2_000
    assert peek.announcements[0]["total"] == 7
    peek.kill()

    bob = clients(server, "bob")  # auto sync: the announcement makes it drain
    assert bob.wait_for_messages(7, 30), f"bob got {len(bob.messages)} of 7 (errors: {bob.errors})"
    assert sorted(m["content"] for m in bob.messages) == sorted(contents)
    assert len({m["seq"] for m in bob.messages}) == 7
    assert eventually(lambda: store_count(db_url) == 0, 15)


class _Seen(logging.Handler):
    """Sets an event when the client logs a line containing ``text``."""

    def __init__(self, text: str):
        super().__init__(logging.WARNING)
        self.text, self.event = text, threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.event.set()


N_WAITING = 1000  # ten pages of 100: the worker dies after the first


@pytest.mark.parametrize("fault", ["stopped", "killed"])
def test_a_sync_without_answers_is_tried_again_until_drained(beside, fault):
    system = beside(worker_args=("--send-rate", "0"))
    alice = system.client("alice", receiver=False)
    sent = [alice.send("bob", f"waiting {i}") for i in range(N_WAITING)]
    assert all(o.wait(30) and o.receipt["status"] == "stored" for o in sent)

    failed = _Seen("sync failed")
    logging.getLogger("backend.client").addHandler(failed)
    hit = threading.Event()

    def on_message(m):  # the first message of the first page: the worker dies now, mid-drain
        if not hit.is_set():
            hit.set()
            os.kill(system.worker.proc.pid, signal.SIGSTOP if fault == "stopped" else signal.SIGKILL)

    try:
        bob = system.client("bob", on_message=on_message, request_timeout=3)
        assert failed.event.wait(30), "the drain's next page never came, so the sync failed"
        # The worker comes back: stopped (a stall: GC, swap, a database that hangs), or killed and restarted.
        if fault == "stopped":
            os.kill(system.worker.proc.pid, signal.SIGCONT)
        else:
            system.worker.start()
        assert bob.wait_for(lambda: len(bob.messages) >= N_WAITING, 45), \
            f"bob got {len(bob.messages)} of {N_WAITING} (sync failures: {getattr(bob, 'sync_failures', '?')})"
    finally:
        logging.getLogger("backend.client").removeHandler(failed)
        if fault == "stopped" and system.worker.proc.poll() is None:
            os.kill(system.worker.proc.pid, signal.SIGCONT)
    assert sorted(m["msg_id"] for m in bob.messages) == sorted(o.msg_id for o in sent)
    assert len({m["seq"] for m in bob.messages}) == N_WAITING
    assert bob.sync_failures >= 1
    assert eventually(lambda: store_count(system.db_url) == 0, 20)


@pytest.fixture
def beside(db_url):
    from test_announce import Beside
    made: list = []

    def make(**kw):
        made.append(Beside(db_url, **kw))
        return made[-1]

    yield make
    for b in made:
        b.close()


def test_client_accepts_server_payloads_up_to_its_own_bound():
    from backend.client import REPLY_ACCEPT_MAX
    assert REPLY_ACCEPT_MAX >= 4 * p.REPLY_PAYLOAD_MAX
    big = p.encode({"kind": "page", "req_id": "r", "messages": [], "cursor": None, "more": False,
                    "pad": "x" * 2_000_000})
    assert p.decode_object(big, REPLY_ACCEPT_MAX)["kind"] == "page"
    with pytest.raises(p.ProtocolError):
        p.decode_object(big)  # what clients send keeps its own limit


@pytest.fixture
def fast_server(db_url):
    """`serve` without the send rate limit (one sender fills a backlog at once)."""
    add_users(db_url, *PASSWORDS)
    srv = Server(db_url).start(extra=["--send-rate", "0"])
    yield srv
    srv.kill()


def test_announcements_during_a_sync_make_one_more_sync_and_nothing_twice(fast_server, clients, db_url):
    server = fast_server
    alice = clients(server, "alice", receiver=False)
    sent = [alice.send("bob", f"backlog {i}") for i in range(1500)]  # 15 pages of 100
    assert all(o.wait(30) and o.receipt["status"] == "stored" for o in sent)
    during: list[int] = []

    def on_message(m):  # in the middle of the drain, bob's device says `online` three more times
        if len(during) < 3 and len(bob.messages) in (200, 400, 600):
            during.append(len(bob.announcements))
            bob.client.publish(p.status_topic("bob"), p.ONLINE, qos=1, retain=True)

    bob = clients(server, "bob", on_message=on_message)
    assert bob.wait_for(lambda: len(bob.messages) >= 1500 and bob.syncs >= 2, 30), (len(bob.messages), bob.syncs)
    assert len(during) == 3 and len(bob.announcements) >= 2  # announcements came while the sync ran
    assert sorted(m["msg_id"] for m in bob.messages) == sorted(o.msg_id for o in sent)
    assert bob.duplicates_dropped == 0 and bob.errors == [] and bob.sync_failures == 0
    assert eventually(lambda: store_count(db_url) == 0, 15)


def test_a_reconnect_syncs_at_once(server, clients):
    import socket
    from test_announce import count_reconnects
    bob = clients(server, "bob")
    reconnects = count_reconnects(bob)
    assert bob.syncs == 0  # nothing waited: no announcement, no sync
    bob.client.socket().shutdown(socket.SHUT_RDWR)  # the link breaks under paho, which reconnects by itself
    assert bob.wait_for(lambda: reconnects and bob.syncs >= 1, 20), "a reconnect is followed by a sync"
    assert bob.errors == [] and bob.sync_failures == 0
