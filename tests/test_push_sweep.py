"""Push notifications when no last will ever comes: the broker itself dies (Mosquitto SIGKILLed, or `serve`
with its embedded broker), so the devices connected to it leave without a will and no worker hears an
`offline`. What waited for them (pushes they never acked) must still reach their phones as a notification,
once presence has settled after the worker's reconnection (``--presence-settle``); and a restart must never
notify again what a gateway already accepted (each device's ``notified_seq``)."""

from __future__ import annotations


import pytest

from backend.store import Device, open_database
from conftest import eventually
from systems import System
from test_push import Gateway

SETTLE_S = 1.0  # the worker's --presence-settle here: the default 10 s would only make the test slower


@pytest.fixture(params=["embedded", "mosquitto"])
def system(request, tmp_path):
    s = System(request.param, f"sqlite:///{tmp_path}/im.db", extra=["--presence-settle", str(SETTLE_S)])
    yield s
    s.close()


def notified_seq(db_url: str, uid: str, device: str) -> int:
    db = open_database(db_url)
    try:
        return Device.get((Device.uid == uid) & (Device.device == device)).notified_seq
    finally:
        db.close()


def crash_broker(system) -> None:
    """SIGKILL the broker (no last will leaves it) and start it again on the same port."""
    if system.kind == "mosquitto":
        system.broker.kill()
        system.broker.restart()
    else:  # the embedded broker is `serve` itself, worker included
        system.server.kill()
        system.server.start()


def test_what_waited_when_the_broker_died_is_notified_once_presence_settles(system):
    gw = Gateway()
    made = [gw]
    try:
        # bob's phone is online and gets the push, but has not acked it (a phone about to lose its network).
        phone = system.client("bob", "phone", ack_delay=3600, auto_sync=False)
        made.append(phone)
        assert phone.push_register(gw.endpoint("bob-phone"))["kind"] != "error"
        alice = system.client("alice", "x", receiver=False)
        made.append(alice)
        receipt = alice.send("bob", "waits unacked").wait(10)
        assert receipt["status"] == "stored"
        assert eventually(lambda: len(phone.messages) == 1, 10), "the phone got the push (and holds its ack)"
        assert not gw.wait_requests(1, 0.5), "no notification while the phone is online"
        crash_broker(system)
        phone.kill()  # the phone never comes back: no will was published for it, none ever will be
        alice.kill()
        # Before the sweep: nothing, ever (no `offline` word, nothing new stored).
        assert gw.wait_requests(1, SETTLE_S + 15), "the phone was notified after the broker's crash"
        body = gw.requests[0]["body"]
        assert (body["uid"], body["device"], body["waiting"]) == ("bob", "phone", 1)
        assert body["newest_seq"] == receipt["seq"]
        assert eventually(lambda: notified_seq(system.db_url, "bob", "phone") == receipt["seq"], 10)
        # A restart after that (a worker killed, or the broker again) notifies nothing already notified.
        crash_broker(system)
        if system.kind == "mosquitto":
            system.server.kill()
            system.server.start()
        assert not gw.wait_requests(2, SETTLE_S + 4), ("notified twice", gw.requests)
    finally:
        for c in made:
            try:
                c.close() if isinstance(c, Gateway) else c.kill()
            except Exception:  # noqa: BLE001
                pass
