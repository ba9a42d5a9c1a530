"""Beside any broker, beyond one machine: several workers on Mosquitto + PostgreSQL, an unconfigured
Mosquitto, metrics and the health check."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request

import chaos
from backend.client import IMClient
from conftest import eventually, free_port
from services import (MYSQL_URL, POSTGRES_URL, MosquittoWorkers, WorkerProcess, fresh_database, mosquitto,
                      reachable, require, session_present)

UIDS = [f"s{i:02d}" for i in range(12)]
PASSWORDS = {u: f"{u}-pw" for u in UIDS}


def _scale_out(db_url: str, capsys) -> None:
    from backend.store import drop_schema
    db = fresh_database(db_url)
    drop_schema(db)  # the three workers create it, concurrently
    db.close()
    system = MosquittoWorkers(db_url, PASSWORDS, workers=3)
    try:
        report = chaos.run(system, UIDS, PASSWORDS, messages=1500, worker_kills=3, broker_restarts=0, seed=5,
                           pace_s=0.004)
        served = [sum("connected to" in ln for ln in w.lines) for w in system.workers]
    finally:
        system.close()
    with capsys.disabled():
        print(f"\nscale-out chaos ({db_url.split(':')[0]}, 3 workers):", report.line())
    assert report.worker_kills == 3
    assert report.confirmed == report.sent
    assert report.lost == [], f"lost: {report.lost[:10]}"
    assert report.received_twice == []
    assert report.received == report.sent
    assert report.left_in_store == 0
    assert all(served), "every worker connected"


def test_three_workers_on_postgresql_one_killed_mid_load(capsys):
    _scale_out(POSTGRES_URL, capsys)


def test_three_workers_on_mariadb_one_killed_mid_load(capsys):
    require(reachable(MYSQL_URL) is None, reachable(MYSQL_URL) or "")
    _scale_out(MYSQL_URL, capsys)


def test_beside_an_unconfigured_mosquitto(db_url):
    """A Mosquitto as a user's own often is (anonymous allowed, no ACL): the worker works beside it, says
    loudly that it is insecure, and leaves no session behind (its session is clean)."""
    from scripts.mosquitto import find_mosquitto, start_mosquitto
    require(find_mosquitto() is not None, "mosquitto binary not installed")
    broker = start_mosquitto({}, open_=True)  # private, on a free port: tests never touch the machine's 1883
    port = broker.port
    tag = os.urandom(3).hex()
    alice, bob = f"alice-{tag}", f"bob-{tag}"
    worker_id = f"im-worker-test-{tag}"
    worker = WorkerProcess(port, db_url, client_id=worker_id, username=None,
                           extra=["--share-group", f"g{tag}"]).start()
    clients = []
    try:
        b = IMClient(bob, port=port).connect()
        a = IMClient(alice, port=port).connect()
        clients += [a, b]
        out = a.send(bob, "hello beside mosquitto")
        assert out.wait(10)["status"] == "stored"
        assert b.wait_for_messages(1) and out.delivered.wait(10)
        b.close()
        a.send(bob, "while you were away").wait(10)
        b2 = IMClient(bob, port=port, auto_sync=False).connect()
        clients.append(b2)
        assert b2.count()["by_sender"] == {alice: 1}
        assert [m["content"] for m in b2.drain()] == ["while you were away"]
        assert worker.wait_log("does NOT enforce the per-user rights", 10)
        for c in clients:
            c.kill()
        assert worker.stop() == 0
        # Nothing of the worker stays at the broker: its client id finds no session.
        assert not session_present(port, worker_id)
    finally:
        for c in clients:
            c.kill()
        worker.kill()
        broker.close()


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_metrics_move_as_messages_flow(db_url):
    broker = mosquitto({"alice": "alice-pw", "bob": "bob-pw"})
    port = free_port()
    worker = WorkerProcess(broker.port, db_url, extra=["--metrics-port", str(port)]).start()
    base = f"http://127.0.0.1:{port}"
    try:
        assert eventually(lambda: _get(base + "/healthz")[0] == 200)
        before = _get(base + "/metrics")[1]
        assert _metric(before, "im_messages_stored_total") == 0 and _metric(before, "im_broker_connected") == 1
        bob = IMClient("bob", "bob-pw", port=broker.port).connect()
        alice = IMClient("alice", "alice-pw", port=broker.port).connect()
        outs = [alice.send("bob", f"m{i}") for i in range(5)]
        assert all(o.delivered.wait(10) for o in outs)
        alice.send_raw("send", b"not json")
        assert alice.wait_for(lambda: alice.errors, 10)
        text = _get(base + "/metrics")[1]
        assert _metric(text, "im_messages_stored_total") == 5
        assert _metric(text, "im_messages_pushed_total") == 5
        assert _metric(text, "im_messages_acked_total") == 5
        assert _metric(text, 'im_errors_total{code="bad_json"}') == 1
        assert _metric(text, "im_store_batch_seconds_count") >= 1
        alice.kill()
        bob.kill()
        broker.kill()  # the broker goes away: the health check says so
        assert eventually(lambda: _get(base + "/healthz")[0] == 503, 15)
        assert _metric(_get(base + "/metrics")[1], "im_broker_connected") == 0
    finally:
        worker.kill()
        broker.close()


def test_json_logs_are_one_object_per_line():
    import logging
    from backend.cli import JsonFormatter
    rec = logging.LogRecord("backend.worker", logging.WARNING, __file__, 1, "dropped %s", ("x",), None)
    out = json.loads(JsonFormatter().format(rec))
    assert out["level"] == "WARNING" and out["logger"] == "backend.worker" and out["message"] == "dropped x"


def test_bad_broker_url_is_a_clear_error(db_url):
    from conftest import run_cli
    r = run_cli("worker", "--broker", "ftp://nowhere", "--database-url", db_url)
    assert r.returncode == 2 and "mqtt://" in r.stderr
