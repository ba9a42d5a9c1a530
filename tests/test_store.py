"""The store on real databases (SQLite, PostgreSQL, MariaDB): exact deletes, duplicates, pages, seqs never reused."""

from __future__ import annotations

import pytest

from backend import core
from backend.store import Accepted, Entry, Message, Page, Store
from services import MYSQL_URL, POSTGRES_URL, fresh_database


@pytest.fixture(params=["sqlite", "postgresql", "mariadb"])
def store(request, tmp_path):
    url = {"sqlite": f"sqlite:///{tmp_path}/s.db", "postgresql": POSTGRES_URL, "mariadb": MYSQL_URL}[request.param]
    db = fresh_database(url)
    yield Store(db)
    db.close()


def msg(sender, to, msg_id, t=1000):
    return core.StoreMessage(sender=sender, msg_id=msg_id, to=to, type="text", content=f"{msg_id}!", ts=None, sent_at=t)


def pull(receiver, limit=100, ack=None, from_uid=None):
    return core.PullPage(receiver=receiver, req_id="r", limit=limit, from_uid=from_uid, ack=ack)


def test_store_then_duplicate_gives_first_seq(store):
    a, b = store.apply([msg("alice", "bob", "1"), msg("alice", "bob", "1")])
    assert not a.duplicate and b.duplicate and b.seq == a.seq and b.to == "bob"
    assert Message.select().count() == 1


def test_resends_among_many_stores_are_answered_in_their_place(store):
    # More than one entry chunk (ENTRY_CHUNK): the pairs of a chunk are inserted together, a resend found there.
    (early,) = store.apply([msg("alice", "bob", "early")])
    ops = []
    for i in range(150):
        ops.append(msg("alice", "bob", str(i)))
        if i % 3 == 2:
            ops.append(msg("alice", "bob", str(i - 1)))  # a resend of a message earlier in the batch
    ops.append(msg("alice", "bob", "early"))  # a resend of a message committed before
    out = store.apply(ops)
    assert len(out) == len(ops)
    first: dict[str, int] = {}
    for op, o in zip(ops, out):
        assert isinstance(o, core.Stored) and o.op is op
        if op.msg_id == "early" or op.msg_id in first:
            assert o.duplicate and o.waiting and o.seq == first.get(op.msg_id, early.seq) and o.to == "bob"
        else:
            assert not o.duplicate and o.devices == (("bob", ""),)
            first[op.msg_id] = o.seq
    assert Message.select().count() == 151 and Entry.select().count() == 151 and Accepted.select().count() == 151


def test_duplicate_is_recognised_after_delivery(store):
    (a,) = store.apply([msg("alice", "bob", "1")])
    (d,) = store.apply([core.DeleteAcked("bob", (a.seq,))])
    assert d.rows == (core.DeletedRow("bob", a.seq, "alice", "1"),)
    (again,) = store.apply([msg("alice", "bob", "1")])
    assert again.duplicate and again.seq == a.seq
    assert Message.select().count() == 0


def test_seq_is_never_reused_after_the_newest_row_is_deleted(store):
    (a,) = store.apply([msg("alice", "bob", "1")])
    store.apply([core.DeleteAcked("bob", (a.seq,))])
    (b,) = store.apply([msg("alice", "bob", "2")])
    assert b.seq > a.seq


def test_ack_deletes_only_the_receivers_own_rows(store):
    (a,) = store.apply([msg("alice", "bob", "1")])
    (d,) = store.apply([core.DeleteAcked("carol", (a.seq,))])
    assert d.rows == () and Message.select().count() == 1


def test_count_by_sender_with_previews(store):
    long = core.StoreMessage(sender="alice", msg_id="2", to="bob", type="image", content="\u00e9" * 300, ts=None,
                             sent_at=2000)
    store.apply([msg("alice", "bob", "1"), long, msg("carol", "bob", "3"), msg("x", "dave", "4")])
    (c,) = store.apply([core.CountBacklog("bob", "r")])
    assert (c.total, c.by_sender, c.expired) == (3, {"alice": 2, "carol": 1}, 0)
    assert c.previews["alice"]["type"] == "image" and c.previews["alice"]["sent_at"] == 2000
    assert c.previews["alice"]["content"] == "\u00e9" * 100, "first 100 characters, not bytes"
    assert c.previews["carol"]["content"] == "3!" and c.previews["carol"]["seq"] > c.previews["alice"]["seq"]


def test_newest_first_pages_and_their_acks(store):
    store.apply([msg("alice", "bob", str(i)) for i in range(5)])
    (p1,) = store.apply([core.PullPage("bob", "r", 2, None, None, "newest")])
    assert [m["msg_id"] for m in p1.messages] == ["4", "3"] and p1.more
    (p2,) = store.apply([core.PullPage("bob", "r", 2, None, p1.cursor, "newest")])
    assert sorted(r.msg_id for r in p2.deleted) == ["3", "4"]
    assert [m["msg_id"] for m in p2.messages] == ["2", "1"]
    (p3,) = store.apply([core.PullPage("bob", "r", 2, None, p2.cursor, "newest")])
    assert [m["msg_id"] for m in p3.messages] == ["0"] and not p3.more
    (p4,) = store.apply([core.PullPage("bob", "r", 2, None, p3.cursor, "newest")])
    assert p4.messages == () and Message.select().count() == 0


def test_quota_refuses_past_the_limit_and_frees_up_after_acks(store):
    q = Store(store.db, quota=2)
    a, b, c, dup = q.apply([msg("alice", "bob", "1"), msg("alice", "bob", "2"), msg("alice", "bob", "3"),
                            msg("alice", "bob", "1")])
    assert not a.duplicate and not b.duplicate and dup.duplicate
    assert isinstance(c, core.Refused) and c.code == "quota_exceeded"
    (other,) = q.apply([msg("alice", "carol", "4")])
    assert isinstance(other, core.Stored), "the quota is per receiver"
    q.apply([core.DeleteAcked("bob", (a.seq,))])
    (again,) = q.apply([msg("alice", "bob", "3")])
    assert isinstance(again, core.Stored) and not again.duplicate


def test_expiry_counts_per_receiver_then_resets(store):
    s = Store(store.db, expire_after_ms=1000)
    s.apply([msg("alice", "bob", "old1", t=0), msg("carol", "bob", "old2", t=10), msg("alice", "dave", "old3", t=0),
             msg("alice", "bob", "fresh", t=5000)])
    assert s.expire(now=3000) == 3
    (c,) = s.apply([core.CountBacklog("bob", "r")])
    assert (c.total, c.expired) == (1, 2)
    (c2,) = s.apply([core.CountBacklog("bob", "r")])
    assert c2.expired == 0, "reported once"
    (d,) = s.apply([core.CountBacklog("dave", None)])
    assert (d.total, d.expired) == (0, 1)
    (dup,) = s.apply([msg("alice", "bob", "old1", t=6000)])
    assert dup.duplicate, "an expired message's id is still remembered"


def test_pages_ack_exactly_their_own_messages(store):
    store.apply([msg("alice", "bob", str(i)) for i in range(5)])
    (p1,) = store.apply([pull("bob", limit=2)])
    assert [m["msg_id"] for m in p1.messages] == ["0", "1"] and p1.more
    # A message that arrives after page 1 was handed out must survive page 1's ack.
    (late,) = store.apply([msg("carol", "bob", "late")])
    (p2,) = store.apply([pull("bob", limit=2, ack=p1.cursor)])
    assert [r.msg_id for r in p2.deleted] == ["0", "1"]
    assert [m["msg_id"] for m in p2.messages] == ["2", "3"]
    (p3,) = store.apply([pull("bob", limit=10, ack=p2.cursor)])
    assert [m["msg_id"] for m in p3.messages] == ["4", "late"] and not p3.more
    (p4,) = store.apply([pull("bob", ack=p3.cursor)])
    assert p4.messages == () and p4.cursor is None and not p4.more
    assert Message.select().count() == 0


def test_repeated_ack_of_a_cursor_deletes_nothing_more(store):
    store.apply([msg("alice", "bob", str(i)) for i in range(3)])
    (p1,) = store.apply([pull("bob", limit=1)])
    store.apply([pull("bob", limit=1, ack=p1.cursor)])
    (again,) = store.apply([pull("bob", limit=1, ack=p1.cursor)])
    assert again.deleted == () and Message.select().count() == 2


def test_unknown_and_foreign_cursors_are_refused(store):
    store.apply([msg("alice", "bob", "1")])
    (p1,) = store.apply([pull("bob")])
    (r1,) = store.apply([pull("bob", ack="f" * 32)])
    (r2,) = store.apply([pull("carol", ack=p1.cursor)])
    assert isinstance(r1, core.Refused) and r1.code == "unknown_cursor"
    assert isinstance(r2, core.Refused) and r2.code == "unknown_cursor"
    assert Message.select().count() == 1


def test_from_filter(store):
    store.apply([msg("alice", "bob", "1"), msg("carol", "bob", "2"), msg("alice", "bob", "3")])
    (pg,) = store.apply([pull("bob", from_uid="alice")])
    assert [m["msg_id"] for m in pg.messages] == ["1", "3"]


def test_unknown_receiver_when_accounts_are_known(store):
    from backend import accounts
    accounts.add_user("bob", "pw")
    strict = Store(store.db, known_accounts=True)
    r, ok = strict.apply([msg("alice", "nobody", "1"), msg("alice", "bob", "2")])
    assert isinstance(r, core.Refused) and r.code == "unknown_receiver"
    assert not ok.duplicate and Message.select().count() == 1


def test_purge_keeps_ids_of_waiting_messages(store):
    from backend.store import ACCEPTED_RETENTION_MS, PAGE_TTL_MS, now_ms
    (a,) = store.apply([msg("alice", "bob", "waiting", t=0)])
    (b,) = store.apply([msg("alice", "bob", "gone", t=0)])
    store.apply([pull("bob")])
    store.apply([core.DeleteAcked("bob", (b.seq,))])
    t = now_ms()
    store.purge(now=t)  # sees "gone" gone: its retention starts now, not when it was stored
    store.purge(now=t + ACCEPTED_RETENTION_MS - 1)
    assert sorted(x.msg_id for x in Accepted.select()) == ["gone", "waiting"]
    store.purge(now=t + max(ACCEPTED_RETENTION_MS, PAGE_TTL_MS) + 1)
    assert [x.msg_id for x in Accepted.select()] == ["waiting"], "a waiting message's id is never forgotten"
    assert Page.select().count() == 0


def test_purge_in_chunks_walks_every_row_exactly_once(store, monkeypatch):
    """The worker's purge runs in short transactions (PURGE_CHUNK rows); across chunk boundaries it
    releases every gone message, keeps every waiting one, and forgets exactly the old ones."""
    import backend.store.maintenance as st  # PURGE_CHUNK is read where it is defined
    monkeypatch.setattr(st, "PURGE_CHUNK", 3)
    out = store.apply([msg("alice", "bob", f"m{i}", t=0) for i in range(11)])
    gone = [o.seq for i, o in enumerate(out) if i % 3 != 0]  # m0, m3, m6, m9 keep waiting
    store.apply([core.DeleteAcked("bob", tuple(gone))])
    for _ in range(4):  # four cursors past their TTL: two chunks of cursors
        store.apply([pull("bob", limit=1)])
    t = st.now_ms() + st.PAGE_TTL_MS + 1
    steps = list(store.purge_chunks(now=t))
    assert len(steps) >= 2 + 4 + 1, f"short transactions, not one: {steps}"
    assert Page.select().count() == 0
    released = {x.msg_id for x in Accepted.select().where(Accepted.released_at == t)}
    assert released == {f"m{i}" for i in range(11) if i % 3 != 0}
    assert Accepted.select().where(Accepted.released_at.is_null()).count() == 4
    later = t + max(st.ACCEPTED_RETENTION_MS, st.EXPIRE_AFTER_MS) + 1
    list(store.purge_chunks(now=later))
    assert sorted(x.msg_id for x in Accepted.select()) == ["m0", "m3", "m6", "m9"], "only the released are forgotten"


def test_case_and_unicode_are_kept_exactly(store):
    a, b = store.apply([msg("alice", "bob", "A1"), msg("alice", "bob", "a1")])
    assert not b.duplicate, "msg_ids compare byte for byte"
    big = core.StoreMessage(sender="Bob", msg_id="e", to="bob", type="text", content="\U0001F600" * 16384,
                            ts=None, sent_at=1)
    (c,) = store.apply([big])
    (pg,) = store.apply([pull("bob", limit=10)])
    assert [m["from"] for m in pg.messages] == ["alice", "alice", "Bob"]
    assert pg.messages[2]["content"] == "\U0001F600" * 16384, "64 KiB of 4-byte characters survive"


def test_schema_migration_adds_missing_columns(store):
    from backend.store import create_schema
    from playhouse.migrate import SchemaMigrator, migrate
    migrator = SchemaMigrator.from_database(store.db)
    store.apply([msg("alice", "bob", "old")])
    migrate(migrator.drop_index("accepted", "accepted_released_at_seq"), migrator.drop_column("accepted", "released_at"),
            migrator.drop_column("message", "batch_receipts"))
    create_schema(store.db)  # an older database: the column and its index come back, nothing is lost
    assert "released_at" in {c.name for c in store.db.get_columns("accepted")}
    assert [(m.msg_id, m.batch_receipts) for m in Message.select()] == [("old", False)], "old rows: v1 receipts"
    assert "accepted_released_at_seq" in {i.name for i in store.db.get_indexes("accepted")}


def test_batched_receipts_flag_is_kept_with_the_row_until_the_ack(store):
    batched = core.StoreMessage(sender="alice", msg_id="b", to="bob", type="text", content="x", ts=None, sent_at=1,
                                batch_receipts=True)
    a, b = store.apply([msg("alice", "bob", "a"), batched])
    (page,) = store.apply([pull("bob")])
    (done,) = store.apply([pull("bob", ack=page.cursor)])
    assert [(r.msg_id, r.batch_receipts) for r in done.deleted] == [("a", False), ("b", True)]


def test_pages_are_cut_by_bytes_and_always_hold_one(store):
    from backend import protocol as p
    big = '"\x01' * 30_000  # 60,000 bytes that JSON escapes to 240,000: 7 of them make 1.68 MB
    store.apply([core.StoreMessage(sender="alice", msg_id=str(i), to="bob", type="text", content=big, ts=None,
                                   sent_at=1000) for i in range(7)])
    (first,) = store.apply([pull("bob", limit=100)])
    assert len(first.messages) == 4 and first.more  # cut by bytes, not by the limit: `more` says so
    (payload,) = [a.payload for a in core.Delivery().after_commit([first], 0)]
    assert p.REPLY_PAYLOAD_MAX - 250_000 < len(p.encode(payload)) <= p.REPLY_PAYLOAD_MAX
    (second,) = store.apply([pull("bob", limit=100, ack=first.cursor)])
    assert [m["msg_id"] for m in second.messages] == ["4", "5", "6"] and not second.more
    assert all(m["content"] == big for m in first.messages + second.messages)
    (last,) = store.apply([pull("bob", ack=second.cursor)])
    assert last.messages == () and Message.select().count() == 0


def test_last_statuses_are_remembered_per_topic(store):
    """The worker's presence memory (docs/PROTOCOL.md 10.1): the last word per status topic, upserted."""
    store.save_statuses({"im/status/bob": "online", "im/status/carol": "online"}, now=1)
    store.save_statuses({"im/status/carol": "offline", "im/status/bob/laptop": "online"}, now=2)
    store.save_statuses({"im/status/bob": "online"}, now=3)
    assert store.last_online() == ["im/status/bob", "im/status/bob/laptop"]  # most recent first
    assert store.last_online(limit=1) == ["im/status/bob"]
