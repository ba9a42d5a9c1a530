"""Groups end to end (issue 14), on the embedded broker and beside a private Mosquitto: a group of three
chats with members online on two devices and offline, every member device gets every message once in the
group's order, the sender sees "delivered to k of n", membership changes reach every member device, a
non-member is refused, and the store is empty once everyone acked."""

from __future__ import annotations

import pytest

from backend import core
from backend.store import Entry, Message, open_database
from conftest import eventually, stop_raw
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
