"""A chaos run shared by the fault tests: users chat while processes are SIGKILLed.

The system under test is anything with ``port``, ``kill_worker()``,
``start_worker()``, ``restart_broker()`` and ``db_url``; the run returns the
figures the tests assert on (and print).
"""

from __future__ import annotations

import random
import time
from collections import Counter
from dataclasses import dataclass, field

from backend.client import IMClient
from backend.store import Message, open_database

# Client settings for chaos: resend fast and never give up, so every message must end up stored.
CLIENT_KW = dict(resend_timeout=1.0, resend_wait_max=3.0, max_resends=1000, request_timeout=3.0)


@dataclass
class Report:
    sent: int = 0
    confirmed: int = 0
    received: int = 0
    duplicates_dropped: int = 0
    received_twice: list = field(default_factory=list)
    lost: list = field(default_factory=list)
    left_in_store: int = 0
    worker_kills: int = 0
    broker_restarts: int = 0
    phases: dict = field(default_factory=dict)

    def line(self) -> str:
        return (f"sent={self.sent} confirmed={self.confirmed} received={self.received} "
                f"duplicates_dropped_by_clients={self.duplicates_dropped} lost={len(self.lost)} "
                f"received_twice={len(self.received_twice)} left_in_store={self.left_in_store} "
                f"worker_kills={self.worker_kills} broker_restarts={self.broker_restarts} "
                f"phases(s)={ {k: round(v, 1) for k, v in self.phases.items()} }")


class User:
    def __init__(self, uid: str, password: str, port: int):
        self.uid, self.password, self.port = uid, password, port
        self.seen: set[int] = set()
        self.messages: list[dict] = []
        self.receiver: IMClient | None = None
        self.instances: list[IMClient] = []
        self.sender = self._client(client_id=f"{uid}:send", receiver=False)
        self.sender.connect(timeout=20)

    def _client(self, **kw) -> IMClient:
        c = IMClient(self.uid, self.password, port=self.port, seen=self.seen, messages=self.messages,
                     **CLIENT_KW, **kw)
        self.instances.append(c)
        return c

    def go_online(self, timeout: float = 5) -> bool:
        if self.receiver is not None:
            return True
        c = self._client(client_id=f"{self.uid}:phone")
        try:
            c.connect(timeout=timeout)
        except ConnectionError:
            c.kill()
            return False
        self.receiver = c
        return True

    def go_offline(self, abrupt: bool) -> None:
        c, self.receiver = self.receiver, None
        if c is not None:
            c.kill() if abrupt else c.close()


def run(system, uids: list[str], passwords: dict[str, str], *, messages: int, worker_kills: int,
        broker_restarts: int, seed: int, pace_s: float = 0.004, toggle_p: float = 0.05) -> Report:
    rng = random.Random(seed)
    users = {u: User(u, passwords[u], system.port) for u in uids}
    for u in users.values():
        if rng.random() < 0.5:
            u.go_online()
    kill_at = set(rng.sample(range(messages // 10, messages - messages // 10), worker_kills))
    restart_at = set(rng.sample(sorted(set(range(messages // 5, messages - messages // 5)) - kill_at),
                                broker_restarts))
    report = Report()
    t0 = time.monotonic()
    sent = []
    for i in range(messages):
        if i in kill_at:
            system.kill_worker()
            report.worker_kills += 1
            system.start_worker()
        if i in restart_at:
            system.restart_broker()
            report.broker_restarts += 1
        if rng.random() < toggle_p:
            u = users[rng.choice(uids)]
            if u.receiver is None:
                u.go_online()
            else:
                u.go_offline(abrupt=rng.random() < 0.5)
        s, r = rng.sample(uids, 2)
        sent.append(users[s].sender.send(r, f"{s}->{r} #{i}"))
        time.sleep(pace_s)  # pacing, not synchronisation
    report.sent = len(sent)
    report.phases["send"] = time.monotonic() - t0

    # Everyone comes back; every send must be confirmed, every message received.
    for u in users.values():
        assert u.go_online(timeout=20), f"{u.uid} could not reconnect"
    deadline = time.monotonic() + 40
    for o in sent:
        o.wait(max(0.1, deadline - time.monotonic()))
    report.phases["confirm"] = time.monotonic() - t0
    report.confirmed = sum(1 for o in sent if o.receipt and o.receipt.get("status") in ("stored", "duplicate"))
    expected: dict[str, set[str]] = {u: set() for u in uids}
    for o in sent:
        expected[o.to].add(o.msg_id)
    for u in users.values():
        want = expected[u.uid]
        got = lambda: {m["msg_id"] for m in u.messages}  # noqa: E731
        end = time.monotonic() + 20
        while not want <= got() and time.monotonic() < end:
            try:
                u.receiver.drain(limit=200)
            except (TimeoutError, RuntimeError):
                pass
            u.receiver.wait_for(lambda: want <= got(), 1.0)
        report.lost += sorted(want - got())
        counts = Counter((m["from"], m["msg_id"]) for m in u.messages)
        report.received_twice += [k for k, n in counts.items() if n > 1]
        report.received += len(u.messages)
    report.phases["receive"] = time.monotonic() - t0
    report.left_in_store = store_left_after_acks([u.receiver for u in users.values()], system.db_url, 15)
    report.phases["store_empty"] = time.monotonic() - t0
    report.duplicates_dropped = sum(c.duplicates_dropped for u in users.values() for c in u.instances)
    kill_all(users.values())
    return report


def kill_all(devices) -> None:
    """End every client instance of these chaos devices (or users: anything with ``instances``), whatever state
    each is in: a test's clean-up must reach all of them."""
    for d in devices:
        for c in d.instances:
            try:
                c.kill()
            except Exception:  # noqa: BLE001
                pass


class Device:
    """One device of a user in a devices chaos run: its IMClients (one per time it comes up) share ``seen`` and
    ``messages``, so dedup and the record of what it showed hold across its reconnections. ``client_kw``: how
    to reach the broker (``port=...``, or ``brokers=...``) and any other IMClient option."""

    def __init__(self, uid: str, device: str, password: str, **client_kw):
        self.uid, self.device, self.password, self.client_kw = uid, device, password, client_kw
        self.seen: set[int] = set()
        self.messages: list[dict] = []
        self.instances: list[IMClient] = []
        self.client: IMClient | None = None

    client_class = IMClient  # a test that records the connection's history passes its own subclass

    def went_down(self) -> None:
        """Called when a connection attempt fails and when the test takes the device down (a hook)."""

    def up(self, timeout: float = 10) -> bool:
        if self.client is not None:
            return True
        c = self.client_class(self.uid, self.password, device=self.device, seen=self.seen, messages=self.messages,
                              **CLIENT_KW, **self.client_kw)
        self.instances.append(c)
        try:
            c.connect(timeout=timeout)
        except ConnectionError:
            c.kill()
            self.went_down()
            return False
        self.client = c
        return True

    def down(self, abrupt: bool) -> None:
        c, self.client = self.client, None
        if c is not None:
            self.went_down()
            c.kill() if abrupt else c.close()


def store_left_after_acks(clients, db_url: str, timeout: float = 20) -> int:
    """After a chaos run: the clients' batched acks sent, the messages still stored once they landed (or
    ``timeout`` s passed): 0 when every receiver acked everything."""
    for c in clients:
        c.flush_acks()
    db = open_database(db_url)
    try:
        end = time.monotonic() + timeout
        while Message.select().count() and time.monotonic() < end:
            time.sleep(0.1)  # acks in flight; polling the database is the only way to see them land
        return Message.select().count()
    finally:
        db.close()


def collect_device_deliveries(devs: dict, want_for) -> tuple[list, list, int]:
    """After a devices chaos run: each device (``devs``: (uid, device) -> an object with ``client`` and
    ``messages``) drains until it holds every msg_id in ``want_for(uid, device)``, for up to 20 s. Returns
    (lost, twice, received): the (uid, device, msg_id) never shown, those shown more than once, and how many
    messages the devices showed in all."""
    lost, twice, received = [], [], 0
    for (uid, device), dev in devs.items():
        want = want_for(uid, device)
        got = lambda: {m["msg_id"] for m in dev.messages}  # noqa: E731
        end = time.monotonic() + 20
        while not want <= got() and time.monotonic() < end:
            try:
                dev.client.drain(limit=200)
            except (TimeoutError, RuntimeError):
                pass
            dev.client.wait_for(lambda: want <= got(), 1.0)
        lost += [(uid, device, m) for m in sorted(want - got())]
        counts = Counter(m["msg_id"] for m in dev.messages)
        twice += [(uid, device, k) for k, c in counts.items() if c > 1]
        received += len(dev.messages)
    return lost, twice, received
