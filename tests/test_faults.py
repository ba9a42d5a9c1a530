"""Delivery under faults, on the embedded default: `serve` SIGKILLed mid-traffic, again and again.

In `serve` the broker and the worker share a process, so every kill takes the
broker's in-memory sessions with it: here the guarantee rests on the sender's
retransmission until `stored`, the receiver's pull after it comes back, and
dedup by seq.  (tests/test_mosquitto_faults.py covers the path where the
broker survives and redelivers what the worker never PUBACKed.)
"""

from __future__ import annotations

import chaos
from conftest import Server, add_users

UIDS = [f"u{i:02d}" for i in range(10)]


class EmbeddedSystem:
    def __init__(self, db_url: str):
        self.db_url = db_url
        self.server = Server(db_url).start()
        self.port = self.server.port

    def kill_worker(self) -> None:
        self.server.kill()

    def start_worker(self) -> None:
        self.server.start()

    def restart_broker(self) -> None:
        self.server.kill()
        self.server.start()


def test_chaos_on_embedded_broker(db_url, capsys):
    passwords = {u: f"{u}-pw" for u in UIDS}
    add_users(db_url, *UIDS)
    system = EmbeddedSystem(db_url)
    try:
        report = chaos.run(system, UIDS, passwords, messages=1200, worker_kills=4, broker_restarts=1, seed=7)
    finally:
        system.server.kill()
    with capsys.disabled():  # shown in every run, not only on failure
        print("\nembedded chaos:", report.line())
    assert report.confirmed == report.sent
    assert report.lost == [], f"lost: {report.lost[:10]}"
    assert report.received_twice == []
    assert report.received == report.sent
    assert report.left_in_store == 0
    assert report.worker_kills == 4 and report.broker_restarts == 1
