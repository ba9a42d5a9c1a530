"""Read markers, unread counts and the read-receipt setting in the store (SQLite, PostgreSQL, MariaDB): never backwards, never past
the newest message, the messages a move makes read (and the cap), unread per conversation never negative,
delivered messages still counted, the setting, and the migration of a database made before them."""

from __future__ import annotations

import peewee as pw
import pytest

from backend import core
from backend.core import reads
from backend.store import Accepted, ReadMarker, Store, UserSettings, open_database
from services import MYSQL_URL, POSTGRES_URL, fresh_database


@pytest.fixture(params=["sqlite", "postgresql", "mariadb"])
def store(request, tmp_path):
    url = {"sqlite": f"sqlite:///{tmp_path}/s.db", "postgresql": POSTGRES_URL, "mariadb": MYSQL_URL}[request.param]
    db = fresh_database(url)
    yield Store(db)
    db.close()


def send(store, sender, to, n, prefix="m", device=""):
    ops = [core.StoreMessage(sender=sender, msg_id=f"{prefix}{i}", to=to, type="text", content="x", ts=None,
                             sent_at=1000, sender_device=device) for i in range(n)]
    return [o.seq for o in store.apply(ops)]


def mark(store, uid, peer, seq):
    (o,) = store.apply([core.MarkRead(uid, "r", peer, seq)])
    return o


def count(store, uid):
    (c,) = store.apply([core.CountBacklog(uid, "r")])
    return c


def test_a_marker_moves_forward_only_and_never_past_the_newest_message(store):
    seqs = send(store, "bob", "alice", 4)
    send(store, "carol", "alice", 2)  # another conversation: never counted in bob's
    m = mark(store, "alice", "bob", seqs[1])
    assert (m.upto, m.advanced, m.unread) == (seqs[1], True, 2)
    assert m.read == (("m0", seqs[0]), ("m1", seqs[1])), "the newly read messages, oldest first"
    back = mark(store, "alice", "bob", seqs[0])
    assert (back.upto, back.advanced, back.read) == (seqs[1], False, ()), "never backwards"
    where = mark(store, "alice", "bob", 0)
    assert (where.upto, where.unread) == (seqs[1], 2), "seq 0 asks where the marker is"
    far = mark(store, "alice", "bob", 10**15)
    assert far.upto == seqs[-1] and far.unread == 0, "clamped to the newest message bob sent alice"
    assert far.read == (("m2", seqs[2]), ("m3", seqs[3])), "only what was not read before"
    new = send(store, "bob", "alice", 1, prefix="n")
    assert mark(store, "alice", "bob", 10**15).upto == new[0]


def test_a_marker_with_nothing_to_read_writes_nothing(store):
    m = mark(store, "alice", "nobody", 50)
    assert (m.upto, m.advanced, m.unread, m.read) == (0, False, 0, ())
    assert ReadMarker.select().count() == 0


def test_unread_counts_per_conversation_include_delivered_messages_and_never_go_negative(store):
    seqs = send(store, "bob", "alice", 3)
    send(store, "carol", "alice", 2)
    assert count(store, "alice").unread == {"bob": 3, "carol": 2}
    store.apply([core.DeleteAcked("alice", tuple(seqs))])  # acked (delivered) is not read
    c = count(store, "alice")
    assert c.total == 2 and c.unread == {"bob": 3, "carol": 2}
    mark(store, "alice", "bob", seqs[1])
    assert count(store, "alice").unread == {"bob": 1, "carol": 2}
    mark(store, "alice", "bob", 10**15)
    mark(store, "alice", "bob", 1)
    assert count(store, "alice").unread == {"carol": 2}, "a read conversation is left out, never negative"
    (announced,) = store.apply([core.CountBacklog("alice", None)])
    assert announced.unread is None, "announcements do not count unread"


def test_settings_turn_read_receipts_off_and_on(store):
    seqs = send(store, "bob", "alice", 3)
    (s,) = store.apply([core.SetSettings("alice", "r")])
    assert (s.read_receipts, s.changed) == (True, False) and UserSettings.select().count() == 0
    (s,) = store.apply([core.SetSettings("alice", "r", read_receipts=False)])
    assert (s.read_receipts, s.changed) == (False, True)
    (s,) = store.apply([core.SetSettings("alice", "r", read_receipts=False)])
    assert s.changed is False
    m = mark(store, "alice", "bob", seqs[0])
    assert m.advanced and not m.receipts and m.read == (), "no receipts, the marker still moves"
    store.apply([core.SetSettings("alice", "r", read_receipts=True)])
    m = mark(store, "alice", "bob", seqs[2])
    assert m.receipts and [s for _, s in m.read] == seqs[1:]
    assert m.sender_devices == ("",), "bob never registered a device: its default one"


def test_read_receipts_go_to_every_registered_device_of_the_sender(store):
    store.apply([core.CountBacklog("bob", None, "laptop")])  # registers the laptop
    seqs = send(store, "bob", "alice", 1, device="phone")  # and the phone, sending
    assert mark(store, "alice", "bob", seqs[0]).sender_devices == ("laptop", "phone")


def test_read_receipts_are_capped_to_the_newest(store, monkeypatch):
    monkeypatch.setattr(reads, "READ_RECEIPTS_MAX", 3)
    seqs = send(store, "bob", "alice", 10)
    m = mark(store, "alice", "bob", seqs[-1])
    assert [s for _, s in m.read] == seqs[-3:] and m.unread == 0


def test_a_database_made_before_read_markers_is_migrated(tmp_path):
    url = f"sqlite:///{tmp_path}/old.db"
    db = open_database(url)
    Store(db).apply([core.StoreMessage(sender="bob", msg_id="a", to="alice", type="text", content="x", ts=None,
                                       sent_at=1)])
    db.drop_tables([ReadMarker, UserSettings])
    db.execute_sql("DROP INDEX accepted_receiver_uid_sender_uid_seq")
    db.close()
    db = open_database(url)
    try:
        assert {"read_marker", "user_settings"} <= set(db.get_tables())
        assert "accepted_receiver_uid_sender_uid_seq" in {i.name for i in db.get_indexes("accepted")}
        store = Store(db)
        assert mark(store, "alice", "bob", 99).unread == 0 and Accepted.select().count() == 1
    finally:
        db.close()


def test_the_conversation_query_uses_its_index(tmp_path):
    db = open_database(f"sqlite:///{tmp_path}/s.db")
    store = Store(db)
    plan = store.db.execute_sql("EXPLAIN QUERY PLAN SELECT MAX(seq) FROM accepted WHERE receiver_uid = ? AND "
                                "sender_uid = ?", ("a", "b")).fetchall()
    assert any("accepted_receiver_uid_sender_uid_seq" in str(row) for row in plan), plan
    assert isinstance(store.db, pw.SqliteDatabase)
    db.close()


def test_read_by_tells_a_sender_how_far_each_reader_read_as_its_receipts_said(store):
    to_bob = send(store, "alice", "bob", 3)
    to_carol = send(store, "alice", "carol", 2, prefix="c")
    assert count(store, "alice").read_by == {}
    mark(store, "bob", "alice", to_bob[1])
    store.apply([core.SetSettings("carol", "r", read_receipts=False)])
    mark(store, "carol", "alice", to_carol[0])
    assert count(store, "alice").read_by == {"bob": to_bob[1]}, "carol's move was made with receipts off"
    store.apply([core.SetSettings("carol", "r", read_receipts=True)])
    assert count(store, "alice").read_by == {"bob": to_bob[1]}, "turning receipts on tells nothing of the past"
    mark(store, "carol", "alice", to_carol[1])
    assert count(store, "alice").read_by == {"carol": to_carol[1], "bob": to_bob[1]}, "most recent first"
    (announced,) = store.apply([core.CountBacklog("alice", None)])
    assert announced.read_by is None


def test_two_workers_moving_one_marker_at_once_report_each_read_message_once(store):
    """Two stores (two workers' threads, each its own connection) move alice's marker of bob's conversation in
    turns that race: the marker ends at the larger, and each newly read message is reported by one of them."""
    import threading
    if isinstance(store.db, pw.SqliteDatabase):
        pytest.skip("one writer at a time: two workers on one SQLite file take turns (and retry 'database is locked')")
    seqs = send(store, "bob", "alice", 40)
    reported: list[list[int]] = [[], []]
    failed: list[BaseException] = []

    def worker(i: int) -> None:
        mine = Store(store.db)
        try:
            for seq in seqs[i::2]:
                (o,) = mine.apply([core.MarkRead("alice", "r", "bob", seq)])
                reported[i] += [s for _, s in o.read]
        except BaseException as e:  # noqa: BLE001 - reported below
            failed.append(e)
        finally:
            store.db.close()  # this thread's connection

    threads = [threading.Thread(target=worker, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not failed, failed
    assert sorted(reported[0] + reported[1]) == seqs, "every message once, none twice"
    assert mark(store, "alice", "bob", 0).upto == seqs[-1]
