"""A group at the member cap, end to end: 1,000 members (the owner, who sends, and 999 light clients, each its own
MQTT connection, all on one epoll loop: bench/groupload.py) beside a private Mosquitto and one worker on SQLite.
Every member is online; a few group messages: every member gets each exactly once (after dropping repeated seqs,
none of which should come here), its `created` event first, and the store holds nothing once they acked."""

from __future__ import annotations

import time

import pytest

from backend.store import open_database
from services import WorkerProcess, mosquitto

# Several workers (or a thousand connections), a broker and their clients at once: one after another with the other
# chaos tests, never two together on the 2 cores (tests/conftest.py, "chaos").
pytestmark = pytest.mark.xdist_group("chaos")

MEMBERS = 1000  # the default cap (--max-group-members): the owner and 999 others
MESSAGES = 5
PASSWORD = "pw"


def _waiting(db_url: str) -> dict[str, int]:
    """Rows in the store's tables that hold what receivers still owe an ack for."""
    from bench.groupload import WAITING_TABLES, table_counts
    counts = table_counts(db_url[len("sqlite:///"):])
    return {t: counts[t] for t in WAITING_TABLES if t in counts}


def test_a_thousand_member_group_gets_every_message_once_and_the_store_drains(tmp_path, capsys):
    from bench.groupload import open_group, send_loop
    t0 = time.monotonic()
    uids = [f"gm{k}" for k in range(MEMBERS - 1)]
    passwords = {u: PASSWORD for u in uids + ["owner"]}
    broker = mosquitto(passwords)
    db_url = f"sqlite:///{tmp_path / 'im.db'}"
    open_database(db_url).close()  # the schema, before the worker and this test read it
    worker = WorkerProcess(broker.port, db_url)
    loop = ms = tx = None
    try:
        worker.start()
        loop, tx, ms = open_group("127.0.0.1", broker.port, "owner", uids, "big", MESSAGES, passwords=passwords,
                                  timeout=40)
        t_setup = time.monotonic() - t0
        for m in ms.members:
            (ev,) = m.events
            assert ev["event"]["event"] == "created" and ev["from"] == "owner", ev
        prefix = tx.prefix.encode()

        def send(i, t):
            tx.peer.publish("im/u/owner/send", b'{"msg_id":"%s%d","group":"big","type":"text","content":"hi %d",'
                                               b'"receipts":"batch"}' % (prefix, i, i))

        ok, _ = send_loop(loop, ms.tally, send, 0, MESSAGES, MESSAGES, 30)
        assert ok, f"{ms.tally.completed} of {MESSAGES} messages reached all {len(uids)} members"
        assert loop.until(lambda: tx.n_stored == MESSAGES, 10), "every send got its stored receipt"
        assert tx.errors == [] and ms.errors == []
        ms.flush_all()
        assert loop.until(lambda: sum(_waiting(db_url).values()) == 0, 15, step=0.1), _waiting(db_url)
        took = time.monotonic() - t0
        with capsys.disabled():
            print(f"\ngroup of {MEMBERS}: set-up {t_setup:.1f} s, {MESSAGES} messages to {len(uids)} members, "
                  f"repeats dropped {ms.repeats}, pulls {ms.pulls}, ack packets {ms.ack_packets} ({took:.1f} s)")
        for m in ms.members:
            assert sum(m.got) == MESSAGES, f"{m.uid} got {sum(m.got)} of {MESSAGES}"
            assert m.other == [], m.other[:2]
        assert ms.twice == 0 and ms.foreign == 0
        assert ms.tally.deliveries == MESSAGES * len(uids)
    finally:
        if ms is not None:
            ms.close()
        if tx is not None:
            tx.peer.close()
        worker.kill()
        broker.close()


def test_bench_tiny_groups_against_mosquittos_own_fan_out(tmp_path):
    """`python -m bench --tiny --only groups` runs both sides and reports the ratio, the store's cost and a
    drained store (the figures themselves: docs/BENCHMARKS.md)."""
    from test_bench import HAVE_MOSQUITTO, _bench, _require_mosquitto, _result
    _require_mosquitto()
    if not HAVE_MOSQUITTO:
        pytest.skip("mosquitto not installed: the groups scenario runs on Mosquitto")
    proc = _bench(tmp_path, "--only", "groups")
    assert "groups_fanout" in proc.stdout
    res, md = _result(tmp_path)
    gr = res["scenarios"]["groups"]
    w, b = gr["worker"], gr["baseline"]
    for side in (w, b):
        th = side["throughput"]
        assert th["complete"] and th["completed"] == gr["n"] and th["delivery_rate"] > 0, th
        assert th["deliveries"] == gr["n"] * gr["receivers"]
        assert side["one_at_a_time"]["complete"]
    assert w["twice"] == 0 and w["members_missing"] == 0 and w["left_waiting_rows"] == 0, w
    assert gr["ratio"] == w["throughput"]["delivery_rate"] / b["throughput"]["delivery_rate"]
    cost = w["cost"]
    assert cost["rows_per_member"] > 0 and cost["receivers"] == gr["receivers"]
    assert any(t["id"] == "groups_fanout" for t in res["targets"])
    assert "## 6. Groups" in md
