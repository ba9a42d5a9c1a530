"""Several devices per user (issue 13), end to end on the embedded broker and beside a private Mosquitto:
each device gets every message once and acks for itself, the user is online while any device is, sync
copies, a new device is not empty, management, the cap, housekeeping, and a v1 client beside it all."""

from __future__ import annotations

import os
import socket

import pytest

from backend import protocol as p
from backend.store import Entry, Message, open_database
from conftest import eventually, raw_client
from systems import System, system_fixture

system = system_fixture("devices")


def words(got, topic):
    return [m.payload.decode() for m in got if m.topic == topic]


def vanish(c) -> None:
    """End a plain paho client's connection without DISCONNECT (the broker publishes its will)."""
    c._sock.shutdown(socket.SHUT_RDWR)
    c.loop_stop()


def stored_rows(db_url):
    db = open_database(db_url)
    try:
        return Message.select().count(), Entry.select().count()
    finally:
        db.close()


def test_one_device_dies_the_other_still_gets_pushes_and_the_user_stays_online(system, made):
    """The issue's repro: bob:laptop and bob:phone connected, the phone dies abruptly."""
    laptop = system.client("bob", "laptop", auto_sync=False)
    phone = system.client("bob", "phone", auto_sync=False)
    alice = system.client("alice", "desk", receiver=False)
    watcher, seen = system.raw("carol", p.status_topic("bob"), p.status_topic("bob", "phone"))
    made += [laptop, phone, alice, watcher]
    assert eventually(lambda: words(seen, p.status_topic("bob"))[-1:] == ["online"], 10)
    phone.kill()  # no DISCONNECT: its will says offline on im/status/bob/phone
    assert eventually(lambda: words(seen, p.status_topic("bob", "phone"))[-1:] == ["offline"], 10)
    out = alice.send("bob", "to every device")
    assert out.wait(10)["status"] == "stored"
    assert laptop.wait_for_messages(1, 10), "the laptop still gets pushes"
    assert [m["content"] for m in laptop.messages] == ["to every device"] and not laptop.announcements
    after_kill = words(seen, p.status_topic("bob"))
    assert "offline" not in after_kill, f"no flicker on im/status/bob: {after_kill}"
    laptop.kill()
    assert eventually(lambda: words(seen, p.status_topic("bob"))[-1:] == ["offline"], 10), "both gone: offline"
    # The phone comes back and gets the message too, once (its own entry waited for it).
    phone2 = system.client("bob", "phone")
    made.append(phone2)
    assert phone2.wait_for_messages(1, 10) and [m["content"] for m in phone2.messages] == ["to every device"]
    assert eventually(lambda: words(seen, p.status_topic("bob"))[-1:] == ["online"], 10)


def test_an_ack_on_one_device_never_removes_the_others_copy(system, made):
    dave_phone = system.client("dave", "phone")
    dave_laptop = system.client("dave", "laptop")
    dave_laptop.close()  # registered, now offline
    alice = system.client("alice", "desk", receiver=False)
    spy, receipts = system.raw("alice", p.reply_topic("alice", "desk"))
    made += [dave_phone, alice, spy]
    out = alice.send("dave", "read on the phone")
    assert dave_phone.wait_for_messages(1, 10)
    assert out.delivered.wait(10), "delivered when the first device acked"
    laptop = system.client("dave", "laptop")
    made.append(laptop)
    assert laptop.wait_for_messages(1, 10), "a message read on the phone still reaches the laptop"
    assert [m["content"] for m in laptop.messages] == ["read on the phone"]
    assert eventually(lambda: stored_rows(system.db_url)[0] == 0 or True, 1)

    def delivered():
        n = 0
        for m in receipts:
            obj = p.decode_object(m.payload)
            items = obj.get("receipts", [obj])
            n += sum(1 for r in items if r.get("msg_id") == out.msg_id and r.get("status") == "delivered")
        return n
    assert eventually(lambda: delivered() >= 1, 5)
    laptop.flush_acks()
    assert eventually(lambda: not _waiting_for(system.db_url, "dave"), 10), "both acked: the message left the store"
    assert delivered() == 1, "`delivered` once, not once per device"


def _waiting_for(db_url, uid):
    db = open_database(db_url)
    try:
        return Message.select().where(Message.receiver_uid == uid).count()
    finally:
        db.close()


def test_sync_copies_reach_the_senders_other_devices(system, made):
    erin_laptop = system.client("erin", "laptop")
    erin_phone = system.client("erin", "phone")
    frank = system.client("frank")  # a v1 client
    made += [erin_laptop, erin_phone, frank]
    assert erin_phone.send("frank", "sent from the phone").wait(10)["status"] == "stored"
    assert frank.wait_for_messages(1, 10)
    assert erin_laptop.wait_for_messages(1, 10)
    (copy,) = erin_laptop.messages
    assert copy["copy"] is True and copy["device"] == "phone" and copy["from"] == "erin" and copy["to"] == "frank"
    assert not erin_phone.wait_for_messages(1, 1), "not to the device it was sent from"
    assert "copy" not in frank.messages[0]


def test_a_new_device_is_not_empty(system, made):
    gina_phone = system.client("gina", "phone")
    gina_phone.close()
    alice = system.client("alice", "desk", receiver=False)
    made.append(alice)
    assert alice.send("gina", "before the tablet").wait(10)["status"] == "stored"
    tablet = system.client("gina", "tablet")
    made.append(tablet)
    assert tablet.drain() == [] and tablet.messages == [], "stored before it registered: not its own"
    page = tablet.fetch_user()
    assert [m["content"] for m in page["messages"]] == ["before the tablet"] and page["more"] is False
    assert tablet.fetch_user(after=page["after"])["messages"] == []
    assert alice.send("gina", "after the tablet").wait(10)["status"] == "stored"
    assert tablet.wait_for_messages(1, 10) and tablet.messages[0]["content"] == "after the tablet"
    phone = system.client("gina", "phone")
    made.append(phone)
    assert phone.wait_for_messages(2, 10), "the fetch acked nothing: the phone still gets both"


def test_list_and_remove_devices(system, made):
    old = system.client("hank", "old")
    old.close()
    laptop = system.client("hank", "laptop")
    alice = system.client("alice", "desk", receiver=False)
    made += [laptop, alice]
    out = alice.send("hank", "waits for the old one")
    assert out.wait(10)["status"] == "stored" and laptop.wait_for_messages(1, 10)
    laptop.flush_acks()
    assert eventually(lambda: _entries_of(system.db_url, "hank") == [("hank", "old")], 10)
    listed = laptop.devices()
    got = {d["device"]: d for d in listed["devices"]}
    assert set(got) == {"old", "laptop"} and got["laptop"]["online"] and not got["old"]["online"]
    assert all(isinstance(d["last_seen"], int) and d["push"] is False for d in got.values())
    answer = laptop.remove_device("old")
    assert answer["kind"] == "removed" and answer["released"] == 1
    assert _waiting_for(system.db_url, "hank") == 0, "waiting only for the removed device: it left the store"
    assert laptop.remove_device("old")["code"] == "unknown_device"
    assert laptop.request({"op": "remove_device", "device": "a.b"})["code"] == "bad_field"
    assert [d["device"] for d in laptop.devices()["devices"]] == ["laptop"]
    answer = laptop.push_register("https://push.example.com/t/1")
    assert (answer["kind"], answer["registered"]) == ("push", True)
    assert laptop.devices()["devices"][0]["push"] is True
    assert laptop.push_register("http://example.com/t")["code"] == "bad_endpoint"
    assert laptop.push_register(None)["registered"] is False and laptop.devices()["devices"][0]["push"] is False
    back = system.client("hank", "old")
    made.append(back)
    assert back.wait_for(lambda: back.removed, 10), "a removed device is told when it returns"


def test_a_device_removed_by_another_process_is_told_at_its_next_request_and_its_push_registration_holds(system, made):
    """`device remove` runs in its own process: the worker still has the device cached as registered. Its next
    push registration answered "registered" while nothing was saved, and it was not told it had been removed
    (found by a new user's trial). Now requests look the device up afresh: told, registered again, saved."""
    from backend.store import Store
    phone = system.client("ivan", "phone", auto_sync=False)
    made.append(phone)
    assert phone.devices()["kind"] == "devices"  # registered, and cached by the worker
    db = open_database(system.db_url)
    try:
        assert Store(db).remove_device("ivan", "phone") is not None  # as `device remove ivan phone` does
    finally:
        db.close()
    answer = phone.push_register("https://push.example.com/t/ivan")
    assert (answer["kind"], answer["registered"]) == ("push", True)
    assert phone.wait_for(lambda: phone.removed, 10), "told it had been removed (what it missed is gone)"
    got = {d["device"]: d for d in phone.devices()["devices"]}
    assert got["phone"]["push"] is True, "the endpoint it was told was registered is in the store"


def _entries_of(db_url, uid):
    db = open_database(db_url)
    try:
        return [(e.uid, e.device) for e in Entry.select().where(Entry.uid == uid)]
    finally:
        db.close()


def test_the_eleventh_device_is_refused(system, made):
    spy, got = system.raw("carol", "im/u/carol/d/+/reply")
    made.append(spy)
    for i in range(11):
        spy.publish(p.status_topic("carol", f"d{i:02d}"), "online", qos=1, retain=False)
    assert eventually(lambda: any(m.topic == p.reply_topic("carol", "d10") for m in got), 10)
    errors = [p.decode_object(m.payload) for m in got if m.topic == p.reply_topic("carol", "d10")]
    assert errors[0]["code"] == "too_many_devices"
    assert not any(m.topic != p.reply_topic("carol", "d10") and b"too_many" in m.payload for m in got)
    eleventh = system.client("carol", "d10", auto_sync=False, receiver=True)
    made.append(eleventh)
    assert eleventh.count()["code"] == "too_many_devices", "refused, never by evicting another"
    assert len(eleventh.client and _devices_of(system.db_url, "carol")) == 10


def _devices_of(db_url, uid):
    from backend.store import Device
    db = open_database(db_url)
    try:
        return [d for (d,) in Device.select(Device.device).where(Device.uid == uid).tuples()]
    finally:
        db.close()


def test_a_v1_client_beside_devices(system, made):
    v1 = system.client("alice")  # the default device
    laptop = system.client("alice", "laptop")
    bob = system.client("bob", "x", receiver=False)
    made += [v1, laptop, bob]
    assert bob.send("alice", "to both").wait(10)["status"] == "stored"
    assert v1.wait_for_messages(1, 10) and laptop.wait_for_messages(1, 10)
    assert v1.messages[0]["seq"] == laptop.messages[0]["seq"], "one message, its seq shared"


@pytest.mark.parametrize("kind", ["embedded", "mosquitto"])
def test_a_device_removed_by_housekeeping_is_told_when_it_returns(kind, tmp_path, made):
    s = System(kind, f"sqlite:///{tmp_path}/im.db", extra=["--expire-after", "2"])
    try:
        old = s.client("bob", "old")
        assert eventually(lambda: _devices_of(s.db_url, "bob") == ["old"], 10), "registered at its first contact"
        old.close()
        assert eventually(lambda: _devices_of(s.db_url, "bob") == [], 20), "silent past the expiry age: removed"
        back = s.client("bob", "old")
        made.append(back)
        assert back.wait_for(lambda: back.removed, 10)
        assert [e["code"] for e in back.errors] == ["device_removed"], "told once"
        assert _devices_of(s.db_url, "bob") == ["old"], "registered afresh"
    finally:
        s.close()


def test_a_receive_only_v1_client_beside_a_device_aware_device_gets_its_messages(system, made):
    """The new-user trial: bob used the web page (a device-aware device), then a plain client (the default device)
    that only receives. Its `online` alone does not register it (it may be the worker's own derived word); the
    reference client's count at connection does, so what is sent meanwhile reaches it."""
    tab = system.client("erin", "web-tab")
    tab.close()
    plain = system.client("erin")
    alice = system.client("alice", receiver=False)
    made += [plain, alice]
    assert alice.send("erin", "to the plain client").wait(10)["status"] == "stored"
    assert plain.wait_for_messages(1, 10), "a plain client that only receives still gets what is sent to its user"


def test_a_late_will_of_an_earlier_connection_is_answered_with_online(system, made):
    """A broker cluster can deliver an earlier connection's will after the device's new `online` (NATS, when a
    node dies: tests/test_cluster.py's chaos saw a desk counted offline that way, its messages stored and never
    announced while it waited for pushes). Here the earlier connection is a plain client with the device's will,
    vanishing after the new one is up: the device hears the live `offline` on its own status, says `online`
    again, and the worker pushes to it. The retained word its subscription brings is not answered."""
    topic = p.status_topic("erin", "phone")
    old, rc, _ = raw_client(system.port, "erin", "erin-pw", f"erin:old-{os.urandom(3).hex()}", will=(topic, "offline"))
    made.append(old)
    assert rc is not None and not rc.is_failure
    old.publish(topic, "offline", qos=1, retain=True).wait_for_publish(5)  # retained before the device comes
    watcher, seen = system.raw("carol", topic)
    phone = system.client("erin", "phone", auto_sync=False)
    alice = system.client("alice", "desk", receiver=False)
    made += [watcher, phone, alice]
    assert phone.count(10)["kind"] == "count"  # a round trip: the retained `offline` has reached the phone by now
    assert phone.status_restated == 0, "the retained word at subscribe time is the past, not news"
    assert eventually(lambda: words(seen, topic)[-1:] == ["online"], 10)
    vanish(old)  # its will now says `offline` about a device that is connected
    assert eventually(lambda: phone.status_restated == 1, 10), words(seen, topic)
    assert eventually(lambda: words(seen, topic)[-2:] == ["offline", "online"], 10), words(seen, topic)
    out = alice.send("erin", "after the late will")
    assert out.wait(10)["status"] == "stored"
    assert phone.wait_for_messages(1, 10), "pushed: the worker counts the phone online again"
    phone.close()  # its own `offline` on leaving is not answered
    assert eventually(lambda: words(seen, topic)[-1:] == ["offline"], 10)
    assert phone.status_restated == 1
