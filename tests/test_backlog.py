"""Offline backlogs at scale: one-request sync, counts first, pages, expiry, quotas, exact acks.

Large stores are filled directly (bulk SQL), then drained through a real broker
and worker; query plans are read from the database, not inferred from times.
"""

from __future__ import annotations

import threading
import time

import peewee as pw
import pytest

from backend import core
from backend.client import IMClient
from backend.store import Message, Store, count_query, open_database, page_query
from conftest import PASSWORDS, Server, add_users, eventually
from services import POSTGRES_URL, WorkerProcess, fresh_database, mosquitto


def fill(db: pw.Database, receiver: str, n: int, senders: int, *, start: int = 0, sent_at: int | None = None) -> None:
    """n messages for ``receiver`` from ``senders`` senders, round robin, in one transaction (sent now:
    older rows would expire under the worker's feet)."""
    sent_at = int(time.time() * 1000) if sent_at is None else sent_at
    rows = [{"receiver_uid": receiver, "sender_uid": f"f{(start + i) % senders:03d}", "msg_id": f"b{start + i}",
             "msg_type": "text", "msg_content": f"backlog {start + i}", "send_time": sent_at} for i in range(n)]
    with db.atomic():
        (top,) = db.execute_sql("SELECT COALESCE(MAX(seq), 0) FROM message").fetchone()
        for i in range(0, n, 5000):
            Message.insert_many(rows[i:i + 5000]).execute()
        _entries(db, top)


def _entries(db: pw.Database, after: int = 0) -> None:
    """A bulk load writes each message's entry too (its receiver's default device): the rows a device pages."""
    db.execute_sql("INSERT INTO entry (uid, device, seq) SELECT receiver_uid, '', seq FROM message WHERE seq > "
                   + db.param, (after,))


def test_100k_from_500_senders_drained_in_pages_plus_two_requests(db_url):
    """Beside Mosquitto: on amqtt 0.12 a page of 500 from 500 senders with v1 receipts takes ~200 ms
    against ~40 ms (it routes the page's 500 `delivered` receipts far more slowly), which would put
    this test near a minute; the embedded path is covered by test_chat's paging."""
    db = open_database(db_url)
    fill(db, "bob", 100_000, 500)
    db.close()
    broker = mosquitto({"bob": "bob-pw"})
    worker = WorkerProcess(broker.port, db_url).start()
    bob = IMClient("bob", "bob-pw", port=broker.port, auto_sync=False, request_timeout=30).connect()
    try:
        requests = 0
        count = bob.count()
        requests += 1
        assert count["total"] == 100_000 and len(count["by_sender"]) == 500
        assert all(n == 200 for n in count["by_sender"].values())
        seen: set[str] = set()
        pages, cursor = 0, None
        started = time.monotonic()
        while True:
            page = bob.pull(limit=500, ack=cursor)
            requests += 1
            for m in page["messages"]:
                assert m["msg_id"] not in seen, "received twice"
                seen.add(m["msg_id"])
            if not page["messages"]:
                break
            pages += 1
            cursor = page["cursor"]
        took = time.monotonic() - started
        print(f"\ndrained 100,000 in {pages} pages of 500 with {requests} requests in {took:.1f}s "
              f"({100_000 / took:,.0f} msg/s)")
        assert len(seen) == 100_000 and pages == 200 and requests == pages + 2
        assert bob.count()["total"] == 0
    finally:
        bob.kill()
        worker.kill()
        broker.close()
    db = open_database(db_url)
    assert Message.select().count() == 0
    db.close()


def test_ten_receivers_drain_at_once_while_senders_keep_sending(db_url):
    receivers = [f"r{i}" for i in range(10)]
    senders = [f"w{i}" for i in range(3)]
    pw_ = {u: f"{u}-pw" for u in receivers + senders}
    db = fresh_database(db_url)
    for r in receivers:
        fill(db, r, 400, 20)
    db.close()
    broker = mosquitto(pw_)
    worker = WorkerProcess(broker.port, db_url).start()
    made: list[IMClient] = []
    try:
        outs = []
        snd = [IMClient(s, pw_[s], port=broker.port, receiver=False).connect() for s in senders]
        made += snd
        stop = threading.Event()

        def keep_sending(c: IMClient) -> None:
            i = 0
            while not stop.is_set() and i < 100:
                outs.append(c.send(receivers[i % 10], f"live {c.uid} {i}"))
                i += 1
                time.sleep(0.01)  # pacing, not synchronisation

        threads = [threading.Thread(target=keep_sending, args=(c,)) for c in snd]
        for t in threads:
            t.start()
        rcv = [IMClient(r, pw_[r], port=broker.port, request_timeout=20).connect() for r in receivers]  # auto_sync
        made += rcv
        for t in threads:
            t.join()
        assert all(o.wait(20) and o.receipt["status"] == "stored" for o in outs)
        for c in rcv:
            want = 400 + sum(1 for o in outs if o.to == c.uid)
            assert c.wait_for(lambda c=c, want=want: len(c.messages) >= want, 30), (c.uid, len(c.messages), want)
            ids = [m["msg_id"] for m in c.messages]
            assert len(ids) == len(set(ids)) == want, "nothing lost, nothing doubled"
        db = open_database(db_url)
        assert eventually(lambda: Message.select().count() == 0, 20)
        db.close()
    finally:
        for c in made:
            c.kill()
        worker.kill()
        broker.close()


def _bulk_other_receivers(db: pw.Database, n: int) -> None:
    """n rows for 10,000 other receivers, generated inside the database (fast on both engines)."""
    if isinstance(db, pw.PostgresqlDatabase):
        db.execute_sql(
            "INSERT INTO message (receiver_uid, sender_uid, msg_id, msg_type, msg_content, send_time) "
            "SELECT 'other' || mod(g, 10000), 's' || mod(g, 97), 'm' || g, 'text', 'x', 1000 "
            "FROM generate_series(1, %s) AS g", (n,))
        _entries(db)
        db.execute_sql("ANALYZE message")
        db.execute_sql("ANALYZE entry")
    else:
        db.execute_sql(
            "WITH RECURSIVE g(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM g WHERE x < ?) "
            "INSERT INTO message (receiver_uid, sender_uid, msg_id, msg_type, msg_content, send_time) "
            "SELECT 'other' || (x % 10000), 's' || (x % 97), 'm' || x, 'text', 'x', 1000 FROM g", (n,))
        _entries(db)
        db.execute_sql("ANALYZE")


def _plan(db: pw.Database, query: pw.ModelSelect) -> str:
    sql, params = query.sql()
    if isinstance(db, pw.PostgresqlDatabase):
        return "\n".join(r[0] for r in db.execute_sql("EXPLAIN " + sql, params).fetchall())
    return "\n".join(str(r[-1]) for r in db.execute_sql("EXPLAIN QUERY PLAN " + sql, params).fetchall())


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
def test_small_receivers_queries_use_the_index_beside_a_million_rows(engine, tmp_path, capsys):
    url = f"sqlite:///{tmp_path}/big.db" if engine == "sqlite" else POSTGRES_URL
    db = fresh_database(url)
    try:
        _bulk_other_receivers(db, 1_000_000)
        fill(db, "small", 30, 3)
        if engine == "postgresql":
            db.execute_sql("ANALYZE message")
            db.execute_sql("ANALYZE entry")
        queries = {"count": count_query("small"), "page": page_query("small", 101),
                   "page from": page_query("small", 101, "f001"), "newest": page_query("small", 101, order="newest")}
        times = {}
        store = Store(db)
        for name, q in queries.items():
            plan = _plan(db, q)
            # A range scan of the device's entries (the entry key), each message by its primary key.
            if engine == "sqlite":
                assert "INDEX sqlite_autoindex_entry_1 (uid=? AND device=?)" in plan, f"{name}: {plan}"
                assert "USING INTEGER PRIMARY KEY (rowid=?)" in plan and "SCAN " not in plan, f"{name}: {plan}"
            else:
                assert "Index" in plan and "entry_pkey" in plan and "message_pkey" in plan, f"{name}: {plan}"
                assert "Seq Scan" not in plan, f"{name}: {plan}"
        for name, op in {"count": core.CountBacklog("small", "r"),
                         "page": core.PullPage("small", "r", 100, None, None)}.items():
            started = time.perf_counter()
            for _ in range(20):
                store.apply([op])
            times[name] = (time.perf_counter() - started) / 20 * 1000
        with capsys.disabled():
            print(f"\n{engine}, 1,000,000 other rows: count {times['count']:.2f} ms, page {times['page']:.2f} ms")
        assert Message.select().where(Message.receiver_uid == "small").count() == 30
    finally:
        db.close()


def test_exact_ack_when_ids_become_visible_out_of_commit_order():
    """Two workers on PostgreSQL: seq N is taken by a transaction that has not committed when
    seq N+1 commits. A page read in between holds only N+1; its ack must not delete N."""
    db = fresh_database(POSTGRES_URL)
    store = Store(db)
    slow_has_seq, release = threading.Event(), threading.Event()
    result: dict = {}

    def slow_worker() -> None:  # its own connection (peewee connections are per thread)
        with db.atomic():
            (o,) = [store.store_message(core.StoreMessage("alice", "slow", "bob", "text", "lower seq", None, 1))]
            result["slow"] = o.seq
            slow_has_seq.set()
            release.wait(10)
        db.close()

    t = threading.Thread(target=slow_worker)
    t.start()
    assert slow_has_seq.wait(10)
    (fast,) = store.apply([core.StoreMessage("carol", "fast", "bob", "text", "higher seq", None, 2)])
    assert fast.seq > result["slow"], "ids were handed out in this order"
    (page,) = store.apply([core.PullPage("bob", "r", 100, None, None)])
    assert [m["seq"] for m in page.messages] == [fast.seq], "the uncommitted lower seq is invisible"
    release.set()
    t.join(10)
    (nxt,) = store.apply([core.PullPage("bob", "r", 100, None, page.cursor)])
    assert [r.seq for r in nxt.deleted] == [fast.seq]
    assert [m["msg_id"] for m in nxt.messages] == ["slow"], "the lower seq survived the ack of the page after it"
    db.close()


def test_expiry_reported_in_the_next_count(tmp_path, clients):
    db_url = f"sqlite:///{tmp_path}/e.db"
    add_users(db_url, *PASSWORDS)
    server = Server(db_url)
    server.start(extra=["--expire-after", "1"])
    try:
        alice = clients(server, "alice")
        assert alice.send("bob", "you will never read this").wait(10)["status"] == "stored"
        db = open_database(db_url)
        assert eventually(lambda: Message.select().count() == 0, 15), "expired in the background"
        db.close()
        bob = clients(server, "bob", auto_sync=False)
        assert bob.wait_for(lambda: bob.announcements, 10)
        assert bob.announcements[0]["expired"] == 1 and bob.announcements[0]["total"] == 0
        assert bob.count()["expired"] == 0, "reported once"
    finally:
        server.kill()


def test_quota_gets_an_error_receipt_never_a_silent_drop(db_url, clients):
    add_users(db_url, *PASSWORDS)
    server = Server(db_url)
    server.start(extra=["--quota", "3"])
    try:
        alice = clients(server, "alice")
        outs = [alice.send("bob", f"q{i}") for i in range(5)]
        results = [o.wait(10) for o in outs]
        assert [r["status"] if r["kind"] == "receipt" else r["code"] for r in results] == \
               ["stored", "stored", "stored", "quota_exceeded", "quota_exceeded"]
        assert results[3]["msg_id"] == outs[3].msg_id
        bob = clients(server, "bob", auto_sync=False)
        got = bob.drain(limit=10)
        assert [m["content"] for m in got] == ["q0", "q1", "q2"]
        assert alice.send("bob", "room again").wait(10)["status"] == "stored"
    finally:
        server.kill()


def test_newest_first_paging_end_to_end(server, clients):
    alice = clients(server, "alice")
    for i in range(5):
        alice.send("bob", f"n{i}").wait(10)
    bob = clients(server, "bob", auto_sync=False)
    got, cursor = [], None
    while True:
        page = bob.request({"op": "pull", "limit": 2, "order": "newest", **({"ack": cursor} if cursor else {})})
        got.append([m["content"] for m in page["messages"]])
        cursor = page["cursor"]
        if cursor is None:
            break
    assert got == [["n4", "n3"], ["n2", "n1"], ["n0"], []]
    assert bob.count()["total"] == 0
