"""The group store's two candidate shapes on SQLite, side by side, in one process (no broker, no worker): the
CPU cost of storing a group message and of its members' acks in each. Why the store keeps the one it keeps is in
docs/BENCHMARKS.md (Groups, "The storage shape").

    python -m bench.groupshape [--messages N] [--members M] [--ack-batch K]

* **entries** (what backend/store does): one ``message`` row, and one ``entry`` row per member device that owes
  its ack, made by one ``INSERT ... SELECT`` from the members; an ack deletes its entries, and the message goes
  when no entry is left.
* **cursors** (Tinode's and OpenIM's per-member read/received seq): one ``message`` row with the group's next
  gseq, and one cursor per member device, "acked up to gseq"; an ack moves cursors, and the messages at or below
  the lowest cursor go.

A group of ``--members`` (default 1,000: the default cap), default devices, the sender a member; each message is
stored in one transaction, then acked by every receiver in transactions of ``--ack-batch`` (default 100, as the
worker's batches gather acks), then gone. SQLite as the store opens it (WAL, ``synchronous=FULL``). Measured with
``time.process_time`` (this process's CPU; the fsyncs' waiting is not CPU and is the same count of commits in
both). Prints one JSON line per shape: send_ms per group message, send_us and ack_us per member, left (messages
still stored at the end: 0).
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import tempfile
import time


def _connect(path: str) -> sqlite3.Connection:
    c = sqlite3.connect(path, isolation_level=None)
    c.execute("pragma journal_mode=wal")
    c.execute("pragma synchronous=full")
    return c


def _timed(c: sqlite3.Connection, members: list[str], n: int, ack_batch: int, store, ack) -> tuple[float, float]:
    """The CPU seconds of ``n`` group messages from ``members[0]``, each stored in one transaction
    (``store(i) -> key``), then acked by the other members, ``ack_batch`` per transaction (``ack(key, uids)``)."""
    sender, receivers = members[0], members[1:]
    send = acked = 0.0
    for i in range(n):
        t = time.process_time()
        c.execute("begin")
        key = store(i, sender)
        c.execute("commit")
        send += time.process_time() - t
        t = time.process_time()
        for k in range(0, len(receivers), ack_batch):
            c.execute("begin")
            ack(key, receivers[k:k + ack_batch])
            c.execute("commit")
        acked += time.process_time() - t
    return send, acked


def _entries(c: sqlite3.Connection, members: list[str], n: int, ack_batch: int) -> tuple[float, float]:
    c.executescript("""
        create table message(seq integer primary key autoincrement, gid text, gseq int, sender text, content blob);
        create table entry(uid text, device text, seq int, primary key(uid, device, seq)) without rowid;
        create index entry_seq on entry(seq);
        create table member(gid text, uid text, primary key(gid, uid)) without rowid;""")
    c.executemany("insert into member values('g', ?)", [(u,) for u in members])

    def store(i: int, sender: str) -> int:
        seq = c.execute("insert into message(gid, gseq, sender, content) values('g', ?, ?, ?)",
                        (i + 1, sender, b"x" * 100)).lastrowid
        c.execute("insert into entry select uid, '', ? from member where gid = 'g' and uid != ?", (seq, sender))
        return seq

    def ack(seq: int, batch: list[str]) -> None:
        c.execute(f"delete from entry where device = '' and seq = ? and uid in ({','.join('?' * len(batch))})"
                  " returning uid", (seq, *batch)).fetchall()
        c.execute("delete from message where seq = ? and not exists (select 1 from entry where seq = ?)", (seq, seq))

    return _timed(c, members, n, ack_batch, store, ack)


def _cursors(c: sqlite3.Connection, members: list[str], n: int, ack_batch: int) -> tuple[float, float]:
    c.executescript("""
        create table message(seq integer primary key autoincrement, gid text, gseq int, sender text, content blob);
        create index message_gseq on message(gid, gseq);
        create table chat_group(gid text primary key, max_gseq int);
        create table cursor(gid text, uid text, device text, acked int, primary key(gid, uid, device)) without rowid;""")
    c.execute("insert into chat_group values('g', 0)")
    c.executemany("insert into cursor values('g', ?, '', 0)", [(u,) for u in members])

    def store(i: int, sender: str) -> int:
        gseq = c.execute("update chat_group set max_gseq = max_gseq + 1 where gid = 'g' returning max_gseq").fetchone()[0]
        c.execute("insert into message(gid, gseq, sender, content) values('g', ?, ?, ?)", (gseq, sender, b"x" * 100))
        c.execute("update cursor set acked = ? where gid = 'g' and uid = ? and device = ''", (gseq, sender))
        return gseq

    def ack(gseq: int, batch: list[str]) -> None:
        c.execute(f"update cursor set acked = ? where gid = 'g' and device = '' and acked < ?"
                  f" and uid in ({','.join('?' * len(batch))}) returning uid", (gseq, gseq, *batch)).fetchall()
        c.execute("delete from message where gid = 'g' and gseq <= (select min(acked) from cursor where gid = 'g')")

    return _timed(c, members, n, ack_batch, store, ack)


def measure(shape: str, n: int, members: int, ack_batch: int) -> dict:
    """One shape's costs (see the module's docstring)."""
    uids = [f"user{i:05d}" for i in range(members)]
    fd, path = tempfile.mkstemp(suffix=".db")
    os.close(fd)
    c = _connect(path)
    try:
        send, ack = (_entries if shape == "entries" else _cursors)(c, uids, n, ack_batch)
        left = c.execute("select count(*) from message").fetchone()[0]
    finally:
        c.close()
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(path + suffix):
                os.unlink(path + suffix)
    deliveries = n * (members - 1)
    return {"shape": shape, "messages": n, "members": members, "ack_batch": ack_batch,
            "send_ms": round(send / n * 1e3, 3), "send_us": round(send / deliveries * 1e6, 2),
            "ack_us": round(ack / deliveries * 1e6, 2), "total_us": round((send + ack) / deliveries * 1e6, 2),
            "left": left}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.groupshape", description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=200, help="group messages per shape (default 200)")
    ap.add_argument("--members", type=int, default=1000, help="members of the group, the sender one (default 1000)")
    ap.add_argument("--ack-batch", type=int, default=100, help="acks per transaction (default 100)")
    ap.add_argument("--passes", type=int, default=2, help="alternating passes of both shapes (default 2)")
    a = ap.parse_args(argv)
    for _ in range(a.passes):
        for shape in ("entries", "cursors"):
            print(json.dumps(measure(shape, a.messages, a.members, a.ack_batch)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
