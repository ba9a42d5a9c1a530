"""Groups end to end (issue 14), on the embedded broker and beside a private Mosquitto: a group of three
chats with members online on two devices and offline, every member device gets every message once in the
group's order, the sender sees "delivered to k of n", membership changes reach every member device, a
non-member is refused, and the store is empty once everyone acked."""

from __future__ import annotations

import json

import pytest

from backend import core
from backend.store import Entry, Message, open_database
from conftest import eventually, run_cli, stop_raw
from systems import system_fixture

system = system_fixture("groups")


def rows(db_url):
    db = open_database(db_url)
    try:
        return Message.select().count(), Entry.select().count()
    finally:
        db.close()


def group_texts(client, group):
    return [m["content"] for m in sorted(client.messages, key=lambda m: m.get("gseq", 0))
            if m.get("group") == group and m["type"] != core.GROUP_EVENT_TYPE]


@pytest.fixture
def made():
    out = []
    yield out
    for c in out:
        c.close()


def test_a_group_of_three_chats_online_and_offline(system, made):
    alice = system.client("alice", "desk")
    bob_phone, bob_laptop = system.client("bob", "phone"), system.client("bob", "laptop")
    made += [alice, bob_phone, bob_laptop]
    created = alice.create_group("trio", ["bob", "carol"], name="The three")
    assert created["kind"] == "group" and [m["uid"] for m in created["members"]] == ["alice", "bob", "carol"]
    sent = [alice.send_group("trio", f"hello {i}") for i in range(3)]
    sent.append(bob_phone.send_group("trio", "bob here"))
    for out in sent:
        receipt = out.wait(10)
        assert receipt["status"] == "stored" and receipt["group"] == "trio" and receipt["gseq"] >= 2, receipt
    # bob's laptop gets alice's three and bob's own as a sync copy; his phone gets alice's three
    assert bob_laptop.wait_for(lambda: len(group_texts(bob_laptop, "trio")) == 4, 10), bob_laptop.messages
    assert bob_phone.wait_for(lambda: len(group_texts(bob_phone, "trio")) == 3, 10), bob_phone.messages
    # the group's order is the order the store took them in (alice's and bob's were sent at once): their gseqs
    by_gseq = [t for _, t in sorted((o.receipt["gseq"], t) for o, t in
                                    zip(sent, ["hello 0", "hello 1", "hello 2", "bob here"]))]
    assert group_texts(bob_laptop, "trio") == by_gseq
    assert [m.get("copy") for m in bob_laptop.messages if m["content"] == "bob here"] == [True]
    # carol was offline: she comes online, is told what waits, and pulls it in the group's order
    carol = system.client("carol")
    made.append(carol)
    assert carol.wait_for(lambda: len(group_texts(carol, "trio")) == 4, 10), carol.messages
    assert group_texts(carol, "trio") == by_gseq
    gseqs = {m["msg_id"]: m["gseq"] for m in carol.messages}
    assert all(gseqs[m["msg_id"]] == m["gseq"] for m in bob_laptop.messages), "one order for every member"
    # "delivered to k of n": alice's messages reach 2 of 2 once bob and carol acked
    assert eventually(lambda: all(o.progress == (2, 2) for o in sent[:3]), 10), [o.progress for o in sent[:3]]
    for c in (bob_phone, bob_laptop, carol, alice):
        c.flush_acks()
    assert eventually(lambda: rows(system.db_url) == (0, 0), 10), "every device acked: the store is empty"


def test_membership_changes_reach_every_member_device_and_non_members_are_refused(system, made):
    dave, erin = system.client("dave"), system.client("erin", "tab")
    frank = system.client("frank")
    made += [dave, erin, frank]
    dave.create_group("pair", ["erin"])
    out = frank.send_group("pair", "let me in")
    assert out.wait(10)["code"] == "not_a_member"
    assert dave.group_add("pair", ["frank"])["kind"] == "group"
    assert frank.send_group("pair", "in now").wait(10)["status"] == "stored"
    assert erin.wait_for(lambda: group_texts(erin, "pair") == ["in now"], 10)
    events = [m["event"]["event"] for m in sorted(erin.messages, key=lambda m: m["gseq"])
              if m["type"] == core.GROUP_EVENT_TYPE]
    assert events == ["created", "added"]
    assert frank.wait_for(lambda: any(m.get("event", {}).get("event") == "added" for m in frank.messages), 10)
    assert frank.group_leave("pair")["left"] is True
    assert frank.send_group("pair", "gone").wait(10)["code"] == "not_a_member"
    assert [g["group"] for g in erin.groups()["groups"]] == ["pair"]


def test_group_read_markers_and_typing_between_real_clients(system, made):
    gina, hank_phone, hank_tab = system.client("gina"), system.client("hank", "phone"), system.client("hank", "tab")
    ivan = system.client("ivan")
    spy, replies = system.raw("gina", "im/u/gina/reply")
    made += [gina, hank_phone, hank_tab, ivan]
    gina.create_group("readers", ["hank", "ivan"])
    out = gina.send_group("readers", "read me")
    seq = out.wait(10)["seq"]
    assert hank_phone.wait_for(lambda: any(m["seq"] == seq for m in hank_phone.messages), 10)
    answer = hank_phone.mark_read("readers", seq, group=True)
    assert (answer["kind"], answer["group"], answer["seq"], answer["unread"]) == ("read", "readers", seq, 0)
    assert hank_tab.wait_for(lambda: hank_tab.group_read_markers.get("readers") == seq, 10), "hank's other device"

    def read_counts():
        out = []
        for m in list(replies):
            obj = core_decode(m.payload)
            out += [(r["read"], r["members"]) for r in obj.get("receipts", []) if r.get("status") == "read"]
        return out
    assert eventually(lambda: (1, 2) in read_counts(), 10), read_counts()
    assert ivan.count()["unread_groups"] == {"readers": 1}
    ivan.typing("readers", group=True)
    assert hank_tab.wait_for(lambda: hank_tab.is_typing("ivan"), 10)
    assert not gina.is_typing("hank")
    stop_raw(spy)


def core_decode(payload):
    from backend import protocol
    return protocol.decode_object(payload)


def _raw_member(system, uid: str, device: str, *topics: str):
    """A plain paho member device: says `online` on its device's status topic and waits for the worker to have
    taken that in (its count request's answer, on the same connection, comes after it); subscribed to ``topics``
    only (its reply topic always)."""
    import threading
    from backend import protocol as p
    c, got = system.raw(uid, p.reply_topic(uid, device), *topics)
    answered = threading.Event()
    c.message_callback_add(p.reply_topic(uid, device), lambda cl, u, m: (
        got.append(m), answered.set() if b'"req_id":"ready"' in m.payload else None))
    c.publish(p.status_topic(uid, device), p.ONLINE, qos=1, retain=True).wait_for_publish(5)
    c.publish(p.req_topic(uid, device), b'{"op":"count","req_id":"ready"}', qos=1).wait_for_publish(5)
    assert answered.wait(10), "the worker answered the count"
    return c, got


def test_a_group_push_goes_at_qos_0_and_one_the_broker_dropped_comes_again(system, made):
    """A group's pushes go at MQTT QoS 0 (docs/PROTOCOL.md, section 14): the broker keeps no copy, acks no
    packet, redelivers nothing. A push the broker dropped (here: the device said `online` before it subscribed
    to its inbox, so no subscription took the push) is the worker's to send again: the member gets it by the
    retransmission (3 s after the push), at QoS 0, and its ack takes it out of the store."""
    from backend import protocol as p
    alice = system.client("alice", "qos0")
    made.append(alice)
    ivan, got = _raw_member(system, "ivan", "lossy")
    try:
        alice.create_group("lossy", ["ivan"])
        seq = alice.send_group("lossy", "dropped once").wait(10)["seq"]
        # Both pushes (the `created` event, the message) reached a broker with no subscription for them: gone.
        ivan.subscribe(p.inbox_topic("ivan", "lossy"), 1)

        def pushed():
            return [(m.qos, p.decode_object(m.payload)) for m in list(got) if m.topic == p.inbox_topic("ivan", "lossy")]
        assert eventually(lambda: any(obj["seq"] == seq for _, obj in pushed()), 15), pushed()
        msg = next(obj for _, obj in pushed() if obj["seq"] == seq)
        assert (msg["content"], msg["group"]) == ("dropped once", "lossy")
        # Mosquitto delivers at the lower of the publish's and the subscription's QoS (MQTT 3.1.1, 3.8.4); amqtt
        # 0.12 (the embedded broker) at the subscription's.
        assert {qos for qos, _ in pushed()} == ({0} if system.kind == "mosquitto" else {1}), "group pushes at QoS 0"
        ivan.publish(p.ack_topic("ivan", "lossy"), p.encode({"seqs": [obj["seq"] for _, obj in pushed()]}),
                     qos=1).wait_for_publish(5)

        def waiting():
            db = open_database(system.db_url)
            try:
                return Entry.select().where((Entry.uid == "ivan") & (Entry.device == "lossy")).count()
            finally:
                db.close()
        assert eventually(lambda: waiting() == 0, 10), "acked: nothing waits for the device"
    finally:
        ivan.publish(p.status_topic("ivan", "lossy"), b"", qos=1, retain=True).wait_for_publish(5)
        stop_raw(ivan)


def test_a_group_push_to_a_persistent_session_that_just_dropped_comes_after_its_reconnection(system, made):
    """Where QoS 0 differs for the device: Mosquitto queues no QoS 0 message for a persistent session that is
    offline (``queue_qos0_messages`` is off), where it would have kept a QoS 1 push. The device's connection ended
    without its `offline` (a clean DISCONNECT discards the will), so the worker still counts it online and pushes;
    the broker drops the push. After the device's reconnection the worker's retransmission brings it."""
    import threading
    import paho.mqtt.client as mqtt
    from backend import protocol as p
    if system.kind != "mosquitto":
        pytest.skip("Mosquitto's queue for an offline persistent session")
    alice = system.client("alice", "qos0b")
    made.append(alice)
    got, ready = [], threading.Event()
    inbox = p.inbox_topic("hank", "sticky")

    def member():
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="hank:sticky", clean_session=False)
        c.username_pw_set("hank", "hank-pw")
        c.on_message = lambda cl, u, m: (got.append(m), ready.set() if b'"req_id":"ready"' in m.payload else None)
        c.connect("127.0.0.1", system.port)
        c.loop_start()
        return c
    hank = member()
    try:
        hank.subscribe([(inbox, 1), (p.reply_topic("hank", "sticky"), 1)])
        hank.publish(p.status_topic("hank", "sticky"), p.ONLINE, qos=1, retain=True).wait_for_publish(5)
        hank.publish(p.req_topic("hank", "sticky"), b'{"op":"count","req_id":"ready"}', qos=1).wait_for_publish(5)
        assert ready.wait(10), "the worker answered the count"
        alice.create_group("sticky", ["hank"])
        assert eventually(lambda: any(m.topic == inbox for m in list(got)), 10), "the created event reached hank"
        hank.disconnect()
        hank.loop_stop()
        seq = alice.send_group("sticky", "while the link was down").wait(10)["seq"]
        got.clear()
        hank = member()  # the same persistent session: its subscriptions kept, no message queued for it

        def pushes():
            return [p.decode_object(m.payload) for m in list(got) if m.topic == inbox]
        assert eventually(lambda: any(obj["seq"] == seq for obj in pushes()), 15), pushes()
        assert next(obj for obj in pushes() if obj["seq"] == seq)["content"] == "while the link was down"
        # the worker's retransmission, at QoS 0 (a QoS 1 push would have come from the broker's queue, at QoS 1)
        assert {m.qos for m in list(got) if m.topic == inbox} == {0}
        hank.publish(p.ack_topic("hank", "sticky"), p.encode({"seqs": [seq]}), qos=1).wait_for_publish(5)
    finally:
        hank.publish(p.status_topic("hank", "sticky"), b"", qos=1, retain=True).wait_for_publish(5)
        hank.disconnect()
        hank.loop_stop()


def test_a_group_changed_from_the_command_line_reaches_its_online_members(system, made):
    """`python -m backend group create/add/remove` writes the database directly, with no broker connection: its
    users go to the store's outbox in the change's transaction, and the running worker announces their online
    devices within OUTBOX_POLL_S (2 s); their syncs fetch the membership event. Before, they learned of it only
    at their next count (a reconnection, a pull of their own)."""
    hank, ivan = system.client("hank", "phone"), system.client("ivan", "desk")
    made += [hank, ivan]

    def events(client, group):
        return [json.loads(m["content"])["event"] for m in sorted(client.messages, key=lambda m: m["gseq"])
                if m.get("group") == group and m["type"] == core.GROUP_EVENT_TYPE]

    r = run_cli("group", "create", "clique", "gina", "hank", "--database-url", system.db_url)
    assert r.returncode == 0, r.stderr
    assert hank.wait_for(lambda: events(hank, "clique") == ["created"], 10), hank.messages
    assert run_cli("group", "add", "clique", "ivan", "--database-url", system.db_url).returncode == 0
    assert ivan.wait_for(lambda: events(ivan, "clique") == ["added"], 10), ivan.messages
    assert hank.wait_for(lambda: events(hank, "clique") == ["created", "added"], 10), hank.messages
    assert run_cli("group", "remove", "clique", "hank", "--database-url", system.db_url).returncode == 0
    assert hank.wait_for(lambda: events(hank, "clique") == ["created", "added", "removed"], 10), hank.messages
    assert hank.announcements, "told by announcements, not by a request of its own"
