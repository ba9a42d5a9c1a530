"""The worker's hot path in-process, without a broker: CPU microseconds per message of the core (plan, after
commit) and the store (apply) on the single-device path (a v1 receiver online, one sender with batched
receipts), for comparing commits with less noise than the end-to-end bench on a shared machine.

    python -m bench.hotpath [--tree PATH] [--passes N] [--database-url URL]

``--tree``: the source tree whose ``backend`` is measured (another worktree, e.g. an older commit's), default
this one. Transactions replay the batch mix a worker met under the quick online load (Mosquitto, SQLite,
15,000 messages: MIX, sends and acked seqs per transaction); acks take the oldest pushed seqs, 100 per ack
packet, as the bench's receiver. Each topic is parsed once before the core (as the worker's own batch step).
The first pass warms up; the rest are measured with ``time.process_time`` (user + system CPU of this process).
Prints one JSON line: plan_us, store_us, after_us, total_us per message. PostgreSQL: a database of your own
(its public schema is dropped and created again).
"""

from __future__ import annotations

import argparse
import collections
import inspect
import json
import sys
import tempfile
import time

# (sends, acked seqs) per transaction, as a worker took them under the quick online load.
MIX = (
    "0/0 1/0 20/0 124/0 13/0 43/0 0/100 0/100 0/1 20/0 60/0 17/0 163/0 256/0 256/0 228/200 0/300 0/100 0/100 "
    "16/0 5/0 65/0 90/0 112/0 20/0 256/0 136/100 0/300 0/600 20/0 78/0 109/0 209/0 256/0 164/0 164/200 0/200 "
    "16/200 44/0 79/0 61/0 0/200 80/0 44/0 134/0 166/100 176/400 20/100 80/200 0/100 0/100 20/0 20/0 149/0 "
    "83/0 136/0 204/0 220/0 68/400 0/200 20/100 40/0 62/0 198/0 99/100 151/0 130/200 0/100 100/200 0/100 "
    "18/100 46/0 64/0 68/0 95/100 177/0 232/200 100/100 0/100 19/100 221/0 8/0 8/0 14/0 6/0 115/0 109/776 "
    "0/100 0/100 20/0 256/0 49/0 256/0 254/46 141/500 19/100 27/200 20/0 236/0 2/0 194/0 40/0 255/66 53/600 "
    "20/0 46/100 0/100 119/0 26/0 255/100 255/100 164/200 101/200 100/300 144/0 253/300 256/0 27/0 0/21 20/0 "
    "20/0 232/41 28/0 21/0 0/100 1/0 19/0 19/100 51/0 51/100 20/0 100/100 80/500 19/100 81/100 20/0 72/0 21/0 "
    "95/0 256/0 83/84 145/0 8/200 19/100 65/400 19/100 150/0 217/100 255/100 179/100 99/300 81/300 20/0 "
    "100/100 60/0 164/0 256/0 200/466 0/300 1/0 22/0 20/0 40/0 1/0 19/90 20/0 134/0 34/0 243/22 221/0 101/500 "
    "22/200 0/100 0/100 1/0 4/0 16/0 219/0 6/0 256/0 79/65 7/300 0/200 0/100 0/23 0/0 "
)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.hotpath", description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", help="source tree whose backend is measured (default: this one)")
    ap.add_argument("--passes", type=int, default=3, help="passes over the batch mix, the first a warm-up (default 3)")
    ap.add_argument("--database-url", help="default: a new SQLite file; postgresql://...: its public schema is dropped")
    a = ap.parse_args(argv)
    if a.tree:
        sys.path.insert(0, a.tree)
    from backend import core
    from backend import protocol as proto
    from backend.store import Store, open_database
    url = a.database_url or f"sqlite:///{tempfile.mkdtemp(prefix='hotpath')}/im.db"
    if url.startswith("postgres"):
        import psycopg2
        conn = psycopg2.connect(url)
        conn.autocommit = True
        conn.cursor().execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
        conn.close()
    store = Store(open_database(url))
    delivery = core.Delivery(send_rate=0)
    parsed_too = "parsed" in inspect.signature(core.Delivery._plan_one).parameters  # older cores parse again
    spent: collections.Counter = collections.Counter()

    def transaction(inbound: list, now: int, measured: bool) -> list:
        c0 = time.process_time()
        if parsed_too:
            items = [(t, pl, False, proto.parse_topic(t)) for t, pl in inbound]
        else:  # an older core: the worker parsed each topic, then the core parsed it again
            items = []
            for t, pl in inbound:
                proto.parse_topic(t)
                items.append((t, pl))
        plan = delivery.plan(items, now)
        c1 = time.process_time()
        outcomes = store.apply(plan.ops)
        c2 = time.process_time()
        pubs = delivery.after_commit(outcomes, now) + delivery.flush_receipts(now + 100)
        delivery.next_deadline()  # as the worker's loop: drops the timers of acked pushes
        c3 = time.process_time()
        if measured:
            spent["plan"] += c1 - c0
            spent["store"] += c2 - c1
            spent["after"] += c3 - c2
        return pubs

    transaction([("im/status/bob", b"online")], int(time.time() * 1000), False)
    mix = [tuple(int(x) for x in pair.split("/")) for pair in "".join(MIX).split()]
    content, pushed, n, k = "x" * 100, collections.deque(), 0, 0
    for p in range(a.passes):
        for sends, acks in mix:
            inbound = [("im/u/alice/send", json.dumps({"msg_id": f"m{k}_{i}", "to": "bob", "content": content,
                                                        "receipts": "batch"}).encode()) for i in range(sends)]
            k += 1
            take = [pushed.popleft() for _ in range(min(acks, len(pushed)))]
            inbound += [("im/u/bob/ack", json.dumps({"seqs": take[i:i + 100]}).encode()) for i in range(0, len(take), 100)]
            if inbound:
                pubs = transaction(inbound, int(time.time() * 1000), p > 0)
                pushed.extend(x.payload["seq"] for x in pubs if isinstance(x.payload, dict) and x.payload.get("kind") == "msg")
                n += sends if p > 0 else 0
    per = {f"{key}_us": round(spent[key] / n * 1e6, 1) for key in ("plan", "store", "after")}
    print(json.dumps({"tree": a.tree or ".", "messages": n, **per, "total_us": round(sum(spent.values()) / n * 1e6, 1)}))


if __name__ == "__main__":
    main()
