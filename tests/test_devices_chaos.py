"""Devices under chaos, on PostgreSQL: beside Mosquitto with three workers, and on the embedded broker
(`serve`, whose every kill takes the broker too). 6 users with 3 devices each; the phones and tablets go
offline and online on their own (cleanly and abruptly), the worker is SIGKILLed 5 times and the broker
restarted once. Every device of every receiver ends with every message
addressed to its user, and every sync copy of what its user sent from another device, exactly once; the
store ends empty."""

from __future__ import annotations

import random
import time

import pytest

import chaos
from backend.store import Device, open_database
from conftest import add_users
from services import MosquittoWorkers, PrivateSchema
from test_faults import EmbeddedSystem

UIDS = [f"m{i}" for i in range(6)]
PASSWORDS = {u: f"{u}-pw" for u in UIDS}
DEVICES = ("desk", "phone", "tab")  # the desk stays connected and sends; the others come and go


class Dev(chaos.Device):
    def __init__(self, uid: str, device: str, port: int):
        super().__init__(uid, device, PASSWORDS[uid], port=port)


@pytest.mark.parametrize("kind", ["mosquitto", "embedded"])
def test_every_device_gets_everything_once_through_kills_and_a_broker_restart(kind, capsys):
    schema = PrivateSchema()
    if kind == "mosquitto":
        system = MosquittoWorkers(schema.url, PASSWORDS, workers=3, seed=7)
    else:
        add_users(schema.url, *UIDS)
        system = EmbeddedSystem(schema.url)
    rng = random.Random(13)
    devs = {(u, d): Dev(u, d, system.port) for u in UIDS for d in DEVICES}
    try:
        for dev in devs.values():
            assert dev.up(20)
        db = open_database(schema.url)
        end = time.monotonic() + 20
        while Device.select().count() < len(devs) and time.monotonic() < end:
            time.sleep(0.1)  # registrations land through the workers; the database is where they show
        assert Device.select().count() == len(devs), "every device registered at its first contact"
        db.close()
        n = 600
        kill_at = set(rng.sample(range(60, n - 60), 5))
        restart_at = rng.choice(sorted(set(range(120, n - 120)) - kill_at))
        sent = []
        t0 = time.monotonic()
        for i in range(n):
            if i in kill_at:
                system.kill_worker()
                system.start_worker()
            if i == restart_at:
                system.restart_broker()
            if rng.random() < 0.08:
                dev = devs[(rng.choice(UIDS), rng.choice(DEVICES[1:]))]
                dev.up(5) if dev.client is None else dev.down(abrupt=rng.random() < 0.5)
            s, r = rng.sample(UIDS, 2)
            sent.append((s, devs[(s, "desk")].client.send(r, f"{s}->{r} #{i}")))
            time.sleep(0.01)  # pacing, not synchronisation
        for dev in devs.values():
            assert dev.up(20), f"{dev.uid}:{dev.device} could not reconnect"
        deadline = time.monotonic() + 40
        for _, o in sent:
            o.wait(max(0.1, deadline - time.monotonic()))
        confirmed = sum(1 for _, o in sent if o.receipt and o.receipt.get("status") in ("stored", "duplicate"))
        assert confirmed == n, f"{n - confirmed} sends never confirmed"
        def want_for(uid, device):
            want = {o.msg_id for s, o in sent if o.to == uid}
            if device != "desk":
                want |= {o.msg_id for s, o in sent if s == uid}  # sync copies of what its desk sent
            return want

        lost, twice, received = chaos.collect_device_deliveries(devs, want_for)
        for (uid, _), dev in devs.items():
            assert all(m.get("copy") is True for m in dev.messages if m["from"] == uid), "copies are marked"
        left = chaos.store_left_after_acks([d.client for d in devs.values()], schema.url)
        took = time.monotonic() - t0
        dropped = sum(c.duplicates_dropped for d in devs.values() for c in d.instances)
        with capsys.disabled():
            print(f"\ndevices chaos ({kind}, postgresql): sent={n} device deliveries={received} "
                  f"lost={len(lost)} twice={len(twice)} repeats_dropped_by_clients={dropped} left_in_store={left} "
                  f"({took:.1f} s)")
        assert lost == [], lost[:10]
        assert twice == []
        assert received == 3 * n + 2 * n, "each message to 3 devices, its copies to 2"
        assert left == 0
    finally:
        chaos.kill_all(devs.values())
        system.close() if kind == "mosquitto" else system.server.kill()
        schema.close()
