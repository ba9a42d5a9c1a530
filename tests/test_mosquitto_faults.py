"""Delivery under faults beside Mosquitto: the worker SIGKILLed 5 times, the broker SIGKILLed once.

Here the broker outlives the worker, so what the worker received but never
PUBACKed (its transaction had not committed) is redelivered to its persistent
session; senders retransmit what a dead broker lost; receivers pull what a
push never brought, and drop repeats by seq.
"""

from __future__ import annotations

import chaos
from conftest import add_users
from services import MosquittoWorkers

UIDS = [f"u{i:02d}" for i in range(20)]
PASSWORDS = {u: f"{u}-pw" for u in UIDS}


def test_chaos_beside_mosquitto(db_url, capsys):
    add_users(db_url)  # creates the schema; accounts live in Mosquitto's password file here
    system = MosquittoWorkers(db_url, PASSWORDS)
    try:
        report = chaos.run(system, UIDS, PASSWORDS, messages=3000, worker_kills=5, broker_restarts=1, seed=11,
                           pace_s=0.003)
    finally:
        system.close()
    with capsys.disabled():  # shown in every run, not only on failure
        print("\nmosquitto chaos:", report.line())
    assert report.worker_kills == 5 and report.broker_restarts == 1
    assert report.confirmed == report.sent
    assert report.lost == [], f"lost: {report.lost[:10]}"
    assert report.received_twice == []
    assert report.received == report.sent
    assert report.left_in_store == 0
