"""The database goes away mid-traffic and comes back: the worker recovers by itself and loses nothing.

On both brokers (`serve`, and a worker beside a private Mosquitto), users chat while the worker's
PostgreSQL goes away, in two ways:

* **killed and refused** (the machine's PostgreSQL, in a database this test creates for itself,
  reached through the fault proxy of tests/faultproxy.py): for the first half of the outage the
  worker's sessions, and only its own (selected by the database and the application_name the test
  gives it), are killed with ``pg_terminate_backend`` again and again, so every reconnection dies
  too; for the second half the database's port is closed (connection refused) and whatever
  connection was open is reset; then the port opens again;
* **stopped** (a private PostgreSQL cluster, tests/services.py ``PrivatePostgres``):
  ``pg_ctl stop -m immediate`` (every backend killed at once, nothing flushed), a few seconds
  down, then started again, recovering from its WAL.

The promises checked:

* nothing acknowledged before its commit: every message with a ``stored`` receipt is in the
  database (``accepted``, written in the same transaction as the message), read directly (never
  through the proxy), checked many times during the traffic and, for the stopped server, after the
  crash recovery: what was acknowledged before the crash survived it;
* nothing lost, nothing shown twice, the store empty at the end;
* the worker recovers by itself (the same process, never restarted), and ``/healthz`` answers 503
  during the outage and 200 after it, within ``RECOVER_BOUND_S``.
"""

from __future__ import annotations

import os
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from urllib.parse import urlparse, urlunparse

import pytest

import chaos
from backend.client import IMClient
from conftest import Server, add_users, eventually, free_port
from faultproxy import FaultProxy
from services import POSTGRES_URL, PrivatePostgres, WorkerProcess, mosquitto, reachable, require

UIDS = [f"u{i:02d}" for i in range(6)]
PASSWORDS = {u: f"{u}-pw" for u in UIDS}
MESSAGES = 240
PACE_S = 0.035  # about 8.5 s of sending, the outage in its middle
OUTAGE_AT = 40  # the outage starts before this message (about 1.4 s in)
KILL_S, CLOSED_S = 3.0, 3.0  # sessions killed again and again, then the port closed: 6 s in all
STOPPED_S = 5.0  # the private server down this long
KILL_EVERY_S = 0.25  # also how often the commits are checked during an outage
# The worker retries a failed transaction after 0.2 s doubling to 5 s (DB_RETRY_MAX_S): it must be
# serving again within that plus a transaction and a health check's poll.
RECOVER_BOUND_S = 8.0
HEALTH_POLL_S = 0.1


def _with(url: str, *, port: int | None = None, database: str | None = None, query: str = "") -> str:
    """``url`` with another port or database, and ``query`` added to its query string."""
    u = urlparse(url)
    auth = u.netloc.rpartition("@")[0]
    netloc = f"{auth + '@' if auth else ''}{u.hostname}:{port or u.port or 5432}"
    return urlunparse(u._replace(netloc=netloc, path=f"/{database}" if database else u.path,
                                 query="&".join(q for q in (u.query, query) if q)))


class Admin:
    """A plain psycopg2 session (never through the proxy), in autocommit; reconnects after a failure."""

    def __init__(self, url: str):
        self.url = url
        self.conn = None

    def run(self, sql: str, args: tuple = ()) -> list:
        import psycopg2
        if self.conn is None:
            u = urlparse(self.url)
            self.conn = psycopg2.connect(host=u.hostname, port=u.port or 5432, user=u.username, password=u.password,
                                         dbname=u.path.lstrip("/"), application_name="im-test-admin",
                                         connect_timeout=5)
            self.conn.autocommit = True
        try:
            with self.conn.cursor() as cur:
                cur.execute(sql, args)
                return cur.fetchall() if cur.description else []
        except psycopg2.OperationalError:
            self.close()
            raise

    def close(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            except Exception:  # noqa: BLE001
                pass
            self.conn = None


class Health:
    """Polls the worker's /healthz every HEALTH_POLL_S, keeping (monotonic time, status) pairs."""

    def __init__(self, port: int):
        self.url = f"http://127.0.0.1:{port}/healthz"
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def status(self) -> int:
        try:
            with urllib.request.urlopen(self.url, timeout=2) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
        except OSError:
            return 0

    def _run(self) -> None:
        while not self._stop.wait(HEALTH_POLL_S):
            self.samples.append((time.monotonic(), self.status()))

    def start(self) -> "Health":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)


class KilledThenRefused:
    """The machine's PostgreSQL, a database of the test's own, the worker's sessions reached through the proxy."""

    def __init__(self):
        why = reachable(POSTGRES_URL)
        require(why is None, why or "")
        self.dbname = f"im_outage_{os.getpid()}_{os.urandom(3).hex()}"
        self.admin = Admin(POSTGRES_URL)
        self.admin.run(f'CREATE DATABASE "{self.dbname}"')
        self.direct_url = _with(POSTGRES_URL, database=self.dbname)
        u = urlparse(POSTGRES_URL)
        self.proxy = FaultProxy(u.port or 5432, u.hostname or "127.0.0.1").start()
        self.app = f"im-outage-worker-{os.getpid()}"  # how the test finds the worker's sessions, and only them
        self.worker_url = _with(self.direct_url, port=self.proxy.port, query=f"application_name={self.app}")
        self.kills = 0

    def _kill_sessions(self) -> int:
        rows = self.admin.run("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                              "WHERE datname = %s AND application_name = %s", (self.dbname, self.app))
        return rows[0][0]

    def outage(self, check) -> None:
        end = time.monotonic() + KILL_S
        while time.monotonic() < end:
            self.kills += self._kill_sessions()
            check()
            time.sleep(KILL_EVERY_S)  # the kill rate, not synchronisation
        self.proxy.set_down("closed")
        self.proxy.reset()
        self.kills += self._kill_sessions()
        end = time.monotonic() + CLOSED_S
        while time.monotonic() < end:
            check()
            time.sleep(KILL_EVERY_S)
        self.proxy.set_down(None)

    def describe(self) -> str:
        return f"sessions killed {self.kills} times for {KILL_S:.0f}s, then the port closed {CLOSED_S:.0f}s"

    def check_figures(self) -> None:
        assert self.kills > 0, "no session of the worker was found to kill"

    def close(self) -> None:
        self.proxy.close()
        try:
            self.admin.run(f'DROP DATABASE IF EXISTS "{self.dbname}" WITH (FORCE)')
        finally:
            self.admin.close()


class Stopped:
    """A private PostgreSQL cluster, stopped with pg_ctl -m immediate and started again."""

    def __init__(self):
        self.server = PrivatePostgres(free_port())
        self.server.start()
        self.direct_url = self.worker_url = self.server.url

    def outage(self, check) -> None:
        check()
        self.server.stop()
        end = time.monotonic() + STOPPED_S
        while time.monotonic() < end:
            time.sleep(KILL_EVERY_S)  # down for a while; nothing to check against a stopped server
        self.server.start()

    def describe(self) -> str:
        return f"server stopped (pg_ctl -m immediate) for {STOPPED_S:.0f}s, then started (crash recovery)"

    def check_figures(self) -> None:
        pass

    def close(self) -> None:
        self.server.close()


@pytest.mark.parametrize("broker_kind", ["embedded", "mosquitto"])
def test_database_sessions_killed_then_refused(broker_kind, capsys):
    outage_with(KilledThenRefused, broker_kind, capsys)


@pytest.mark.parametrize("broker_kind", ["embedded", "mosquitto"])
def test_database_server_stopped(broker_kind, capsys):
    outage_with(Stopped, broker_kind, capsys)


def outage_with(database_class, broker_kind: str, capsys) -> None:
    """outage_run with a fresh ``database_class()`` (KilledThenRefused, Stopped), closed whatever happens."""
    database = database_class()
    try:
        outage_run(broker_kind, database, capsys)
    finally:
        database.close()


def outage_run(broker_kind: str, database, capsys) -> None:
    add_users(database.direct_url, *UIDS)  # the schema, created directly (and the accounts, for `serve`)
    worker_url = database.worker_url
    metrics_port = free_port()
    if broker_kind == "mosquitto":
        broker = mosquitto(PASSWORDS)
        worker = WorkerProcess(broker.port, worker_url, extra=["--metrics-port", str(metrics_port)]).start()
        port = broker.port
    else:  # `serve`: the broker and the worker in one process, its accounts in the same database
        broker = None
        worker = Server(worker_url).start(extra=["--metrics-port", str(metrics_port)])
        port = worker.port
    health = Health(metrics_port)
    checker = Admin(database.direct_url)  # reads the worker's database directly, never through the proxy
    phones: dict[str, IMClient] = {}
    senders: dict[str, IMClient] = {}
    checks = 0
    violations: set = set()  # (sender, msg_id) seen with a stored receipt and nothing committed
    try:
        assert eventually(lambda: health.status() == 200, 10), "the worker is not healthy before the outage"
        for u in UIDS:
            phones[u] = IMClient(u, PASSWORDS[u], port=port, client_id=f"{u}:phone", **chaos.CLIENT_KW).connect()
            senders[u] = IMClient(u, PASSWORDS[u], port=port, client_id=f"{u}:send", receiver=False,
                                  **chaos.CLIENT_KW).connect()
        sent: list = []  # (sender, Outgoing)
        sent_lock = threading.Lock()

        def check_committed() -> None:
            """Every stored receipt's message is committed: read the receipts first, then the database."""
            nonlocal checks
            with sent_lock:
                acked = {(s, o.msg_id) for s, o in sent if o.receipt and o.receipt.get("status") == "stored"}
            try:
                in_db = set(checker.run("SELECT sender_uid, msg_id FROM accepted"))
            except Exception:  # noqa: BLE001 - the database is down: nothing to compare with now
                return
            violations.update(acked - in_db)
            checks += 1

        timeline: dict[str, float] = {}

        def outage() -> None:
            timeline["start"] = time.monotonic()
            database.outage(check_committed)
            timeline["end"] = time.monotonic()

        saboteur = threading.Thread(target=outage, daemon=True)
        health.start()
        t0 = time.monotonic()
        for i in range(MESSAGES):
            if i == OUTAGE_AT:
                saboteur.start()
            s, r = UIDS[i % len(UIDS)], UIDS[(i * 7 + 1) % len(UIDS)]
            if s == r:
                r = UIDS[(UIDS.index(s) + 1) % len(UIDS)]
            o = senders[s].send(r, f"{s}->{r} #{i}")
            with sent_lock:
                sent.append((s, o))
            if i % 25 == 0:
                check_committed()
            time.sleep(PACE_S)  # pacing, not synchronisation
        saboteur.join(30)
        assert "end" in timeline, "the outage did not finish"

        deadline = time.monotonic() + 30
        for _, o in sent:
            o.wait(max(0.1, deadline - time.monotonic()))
        check_committed()
        confirmed = sum(1 for _, o in sent if o.receipt and o.receipt.get("status") in ("stored", "duplicate"))
        expected = {u: {o.msg_id for _, o in sent if o.to == u} for u in UIDS}
        got = lambda u: {m["msg_id"] for m in phones[u].messages}  # noqa: E731
        for u in UIDS:
            if not phones[u].wait_for(lambda: expected[u] <= got(u), 10):
                try:
                    phones[u].drain(limit=200)  # what a push never brought, as an app pulls on reconnect
                except (TimeoutError, RuntimeError):
                    pass
        lost = sorted(m for u in UIDS for m in expected[u] - got(u))
        twice = [k for u in UIDS for k, n in Counter((m["from"], m["msg_id"]) for m in phones[u].messages).items()
                 if n > 1]
        received = sum(len(phones[u].messages) for u in UIDS)
        duplicates_dropped = sum(c.duplicates_dropped for c in (*phones.values(), *senders.values()))
        for c in phones.values():
            c.flush_acks()
        left = lambda: checker.run("SELECT count(*) FROM message")[0][0]  # noqa: E731
        eventually(lambda: left() == 0, 10)
        left_in_store = left()
        health.stop()

        start, end = timeline["start"], timeline["end"]
        during = [code for t, code in health.samples if start <= t <= end]
        after = [(t, code) for t, code in health.samples if t > end]
        first_ok = next((t for t, code in after if code == 200), None)
        recovered_s = None if first_ok is None else first_ok - end
        last_bad = max((t for t, code in after if code != 200), default=end)
        worker_alive = worker.proc.poll() is None
        failed = sum(1 for line in worker.lines if "transaction failed" in line)
        contents = [f"{s}->{o.to} #" for s, o in sent[:50]]
        leaked = [line for line in worker.lines if any(c in line for c in contents)]
        with capsys.disabled():  # shown in every run, not only on failure
            print(f"\ndatabase outage, {broker_kind}: sent={len(sent)} confirmed={confirmed} received={received} lost={len(lost)} "
                  f"duplicates_dropped_by_clients={duplicates_dropped} received_twice={len(twice)} "
                  f"left_in_store={left_in_store} outage={end - start:.1f}s ({database.describe()}; "
                  f"{failed} transactions failed) "
                  f"healthz_503_during={sum(1 for c in during if c == 503)}/{len(during)} "
                  f"time_to_recover={'never' if recovered_s is None else f'{recovered_s:.1f}s'} "
                  f"unhealthy_after_recovery={sum(1 for t, c in after if c != 200 and t > (first_ok or end))} "
                  f"commit_checks={checks} acked_before_commit={len(violations)} "
                  f"total={time.monotonic() - t0:.1f}s")
        assert not violations, f"stored receipts with nothing committed: {sorted(violations)[:10]}"
        assert worker_alive, "the worker died:\n" + "".join(worker.lines[-30:])
        database.check_figures()
        assert 503 in during, f"/healthz never said 503 during the outage: {during}"
        assert recovered_s is not None and recovered_s <= RECOVER_BOUND_S, f"recovered after {recovered_s}"
        assert last_bad <= first_ok, "/healthz fell back to unhealthy after recovering"
        assert confirmed == len(sent)
        assert lost == [], f"lost {len(lost)}: {lost[:10]}"
        assert twice == []
        assert received == len(sent)
        assert left_in_store == 0
        assert leaked == [], f"message content in the worker's log: {leaked[:3]}"
    finally:
        checker.close()
        health.stop()
        for c in (*phones.values(), *senders.values()):
            try:
                c.kill()
            except Exception:  # noqa: BLE001
                pass
        worker.kill()
        if broker is not None:
            broker.close()
