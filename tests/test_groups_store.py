"""Groups through the core and the store together (SQLite, PostgreSQL, MariaDB), as the worker drives them
(plan, one transaction, after_commit): the join window, leave and removal (waiting messages released),
re-join without old history, non-members refused, one order for every member, roles and the cap,
coalesced "delivered to k of n" receipts, counts by group."""

from __future__ import annotations

import json
import time

import pytest

from backend import core
from backend import protocol as p
from backend.store import Entry, Member, MemberReceipt, Message, Store
from services import MYSQL_URL, POSTGRES_URL, fresh_database


@pytest.fixture(params=["sqlite", "postgresql", "mariadb"])
def url(request, tmp_path):
    return {"sqlite": f"sqlite:///{tmp_path}/g.db", "postgresql": POSTGRES_URL, "mariadb": MYSQL_URL}[request.param]


class Server:
    """A worker without the network: inbound (topic, payload) in, publishes out, one transaction per batch."""

    def __init__(self, url, **store_kw):
        self.db = fresh_database(url)
        self.store = Store(self.db, **store_kw)
        self.core = core.Delivery(send_rate=0)
        self.now = int(time.time() * 1000)

    def online(self, uid, dev=""):
        return self.batch([(p.status_topic(uid, dev), b"online")])

    def offline(self, uid, dev=""):
        return self.batch([(p.status_topic(uid, dev), b"offline")])

    def batch(self, inbound):
        self.now += 1
        plan = self.core.plan(inbound, self.now)
        outs = self.store.apply(plan.ops) if plan.ops else []
        pubs = plan.replies + self.core.after_commit(outs, self.now)
        return pubs + self.core.flush_receipts(None)

    def req(self, uid, payload, dev=""):
        (reply,) = [x.payload for x in self.batch([(p.req_topic(uid, dev), json.dumps(payload).encode())])
                    if x.topic == p.reply_topic(uid, dev)]
        return reply

    def send(self, uid, payload, dev=""):
        return self.batch([(p.send_topic(uid, dev), json.dumps(payload).encode())])

    def ack(self, uid, seqs, dev=""):
        return self.batch([(p.ack_topic(uid, dev), json.dumps({"seqs": list(seqs)}).encode())])

    def drain(self, uid, dev=""):
        """Pull everything waiting for the device and ack it: the messages, in page order."""
        got, cursor = [], None
        while True:
            page = self.req(uid, {"op": "pull", "req_id": "d", **({"ack": cursor} if cursor else {})}, dev)
            got += page["messages"]
            cursor = page["cursor"]
            if not page["messages"]:
                return got


def inbox(pubs, uid, dev=""):
    return [x.payload for x in pubs if x.topic == p.inbox_topic(uid, dev)]


def texts(msgs):
    return [m["content"] if m["type"] != "group_event" else (m["event"]["event"], tuple(m["event"].get("members", ())))
            for m in msgs]


@pytest.fixture
def srv(url):
    s = Server(url, max_group_members=5)
    yield s
    s.db.close()


def create(srv, owner="alice", members=("bob", "carol"), gid="team"):
    return srv.req(owner, {"op": "group_create", "req_id": "c", "group": gid, "name": "Team", "members": list(members)})


def test_a_member_gets_exactly_the_messages_of_its_window(srv):
    create(srv)
    srv.send("alice", {"msg_id": "1", "group": "team", "content": "before dave"})
    assert srv.req("alice", {"op": "group_add", "req_id": "a", "group": "team", "members": ["dave"]})["kind"] == "group"
    srv.send("bob", {"msg_id": "2", "group": "team", "content": "with dave"})
    bob = srv.drain("bob")  # (leaving releases what waits, as a removal does)
    srv.req("bob", {"op": "group_leave", "req_id": "l", "group": "team"})
    srv.send("alice", {"msg_id": "3", "group": "team", "content": "without bob"})
    dave = srv.drain("dave")  # (what waits for a member when it is removed is released: see the next test)
    srv.req("alice", {"op": "group_remove", "req_id": "r", "group": "team", "members": ["dave"]})
    srv.send("carol", {"msg_id": "4", "group": "team", "content": "after dave"})

    dave += srv.drain("dave")
    assert texts(dave) == [("added", ("dave",)), "with dave", ("left", ("bob",)), "without bob", ("removed", ("dave",))]
    bob += srv.drain("bob")
    assert texts(bob) == [("created", ("alice", "bob", "carol")), "before dave", ("added", ("dave",)),
                          ("left", ("bob",))], "bob's own message is not pushed back to the device that sent it"
    carol = srv.drain("carol")
    assert [m["gseq"] for m in carol] == list(range(1, 8)), "carol was there throughout: every gseq but her own"
    assert all(m["group"] == "team" and m["to"] == "team" for m in carol)
    # the same message has the same gseq for everyone
    assert {m["msg_id"]: m["gseq"] for m in dave if m["type"] == "text"}.items() <= \
        {m["msg_id"]: m["gseq"] for m in carol}.items()


def test_a_removed_members_waiting_messages_are_released_and_a_rejoin_starts_afresh(srv):
    create(srv)
    srv.send("alice", {"msg_id": "1", "group": "team", "content": "one"})
    srv.send("alice", {"msg_id": "2", "group": "team", "content": "two"})
    srv.drain("carol")
    # only bob owes messages 1 and 2 now; removing him releases them: they leave the store
    srv.req("alice", {"op": "group_remove", "req_id": "r", "group": "team", "members": ["bob"]})
    assert not Message.select().where(Message.msg_id.in_(["1", "2"])).exists()
    srv.req("alice", {"op": "group_add", "req_id": "a", "group": "team", "members": ["bob"]})
    srv.send("carol", {"msg_id": "3", "group": "team", "content": "three"})
    assert texts(srv.drain("bob")) == [("removed", ("bob",)), ("added", ("bob",)), "three"], \
        "no old history after re-joining (and what waited at the removal was released, the created event too)"


def test_non_members_are_refused_and_roles_hold(srv):
    create(srv)
    out = srv.send("mallory", {"msg_id": "m", "group": "team", "content": "let me in"})
    assert [x.payload["code"] for x in out] == ["not_a_member"]
    out = srv.send("mallory", {"msg_id": "m2", "group": "nothere", "content": "x"})
    assert [x.payload["code"] for x in out] == ["unknown_group"]
    assert srv.req("mallory", {"op": "group_members", "req_id": "x", "group": "team"})["code"] == "not_a_member"
    assert srv.req("bob", {"op": "group_add", "req_id": "x", "group": "team", "members": ["m"]})["code"] == "forbidden"
    assert srv.req("bob", {"op": "group_create", "req_id": "x", "group": "team"})["code"] == "group_exists"
    assert create(srv)["kind"] == "group", "a resent create is answered with the group"
    assert srv.req("alice", {"op": "group_role", "req_id": "x", "group": "team", "member": "bob",
                             "role": "admin"})["kind"] == "group"
    assert srv.req("bob", {"op": "group_remove", "req_id": "x", "group": "team", "members": ["alice"]})["code"] == \
        "forbidden", "an admin cannot remove the owner"
    full = srv.req("bob", {"op": "group_add", "req_id": "x", "group": "team", "members": ["d", "e", "f"]})
    assert full["code"] == "too_many_members", "the cap (5 here) holds"
    # the gseq refused operations took was given back: the next message follows on
    before = srv.req("alice", {"op": "group_members", "req_id": "x", "group": "team"})["gseq"]
    srv.send("alice", {"msg_id": "n", "group": "team", "content": "next"})
    assert srv.req("alice", {"op": "group_members", "req_id": "x", "group": "team"})["gseq"] == before + 1
    # the owner leaving passes ownership on (to the admin)
    srv.req("alice", {"op": "group_leave", "req_id": "x", "group": "team"})
    state = srv.req("bob", {"op": "group_members", "req_id": "x", "group": "team"})
    assert state["owner"] == "bob" and {"uid": "bob", "role": "owner"} in state["members"]
    mine = srv.req("carol", {"op": "groups", "req_id": "x"})["groups"]
    assert [(g["group"], g["role"], g["members"]) for g in mine] == [("team", "member", 2)]


def test_online_members_are_pushed_and_the_sender_gets_k_of_n(srv):
    create(srv, members=("bob", "carol", "dave"))
    srv.online("bob", "phone")
    srv.online("bob", "laptop")
    srv.online("carol")
    srv.online("alice", "tab")  # alice's other device gets a sync copy
    pubs = srv.send("alice", {"msg_id": "g1", "group": "team", "content": "hi", "receipts": "batch"}, dev="desk")
    pushed = {x.topic: x.payload for x in pubs if x.topic.endswith("/inbox")}
    assert set(pushed) == {p.inbox_topic("bob", "phone"), p.inbox_topic("bob", "laptop"), p.inbox_topic("carol"),
                           p.inbox_topic("alice", "tab")}, "dave is offline: he will pull"
    assert pushed[p.inbox_topic("alice", "tab")].get("copy") is True
    seq = pushed[p.inbox_topic("carol")]["seq"]
    (stored,) = [x.payload for x in pubs if x.topic == p.reply_topic("alice", "desk")]
    assert stored["receipts"][0]["status"] == "stored" and stored["receipts"][0]["group"] == "team"
    # bob acks on both devices, carol on hers: 2 members of 3; one coalesced receipt
    srv.ack("bob", [seq], "phone")
    srv.ack("bob", [seq], "laptop")
    out = srv.ack("carol", [seq])
    receipts = [r for x in out if x.topic == p.reply_topic("alice", "desk") for r in x.payload["receipts"]]
    assert [(r["status"], r["delivered"], r["members"]) for r in receipts] == [("delivered", 2, 3)]
    assert srv.req("alice", {"op": "group_receipts", "req_id": "x", "group": "team", "seq": seq},
                   dev="desk")["delivered_by"] == ["bob", "carol"]
    count = srv.req("dave", {"op": "count", "req_id": "x"})
    assert count["by_group"] == {"team": 2} and count["total"] == 2, "the created event and g1 wait for dave"
    srv.drain("dave")
    srv.drain("alice", "tab")
    srv.drain("alice")  # the default device alice created the group from: a device of hers, so it gets the copy
    assert not Message.select().where(Message.msg_id == "g1").exists(), "every device acked: it left the store"
    assert MemberReceipt.select().count() == 0, "its members' receipts went with it"
    for uid, dev in (("bob", "phone"), ("bob", "laptop"), ("carol", "")):
        srv.drain(uid, dev)  # the created event, stored before they came online
    assert Entry.select().count() == 0 and Message.select().count() == 0


def test_a_resent_group_message_is_a_duplicate(srv):
    create(srv)
    srv.send("alice", {"msg_id": "g1", "group": "team", "content": "once"})
    out = srv.send("alice", {"msg_id": "g1", "group": "team", "content": "once"})
    assert [x.payload["status"] for x in out if x.topic == p.reply_topic("alice")] == ["duplicate"]
    assert [m["content"] for m in srv.drain("bob") if m["type"] == "text"] == ["once"]


def test_group_event_type_is_the_servers_alone(srv):
    create(srv)
    out = srv.send("alice", {"msg_id": "e", "group": "team", "type": "group_event", "content": "{}"})
    assert [x.payload["code"] for x in out] == ["bad_field"]
    assert Member.select().count() == 3


@pytest.fixture
def hist(url):
    s = Server(url, history_days=1)
    yield s
    s.db.close()


def test_history_pages_back_through_a_conversation_from_the_join_and_expires(hist):
    create(hist, members=("bob",))
    for i in range(5):
        hist.send("alice", {"msg_id": f"g{i}", "group": "team", "content": f"g{i}"})
    hist.send("alice", {"msg_id": "d1", "to": "bob", "content": "direct 1"})
    hist.send("bob", {"msg_id": "d2", "to": "alice", "content": "direct 2"})
    hist.drain("bob")
    hist.drain("alice")
    assert Entry.select().count() == 0 and Message.select().count() == 8, "acked, and kept for history"
    page = hist.req("bob", {"op": "history", "req_id": "h", "group": "team", "limit": 3})
    assert [m["content"] for m in page["messages"]] == ["g4", "g3", "g2"] and page["more"]
    page = hist.req("bob", {"op": "history", "req_id": "h", "group": "team", "limit": 3, "before": page["before"]})
    assert [m["content"] for m in page["messages"]][:2] == ["g1", "g0"] and not page["more"]
    chat = hist.req("bob", {"op": "history", "req_id": "h", "with": "alice"})
    assert [(m["from"], m["content"]) for m in chat["messages"]] == [("bob", "direct 2"), ("alice", "direct 1")]
    # a member added later sees nothing from before its join (the group does not say new members see history)
    hist.req("alice", {"op": "group_add", "req_id": "a", "group": "team", "members": ["carol"]})
    hist.send("alice", {"msg_id": "g5", "group": "team", "content": "g5"})
    late = hist.req("carol", {"op": "history", "req_id": "h", "group": "team"})
    assert [m.get("event", {}).get("event") or m["content"] for m in late["messages"]] == ["g5", "added"]
    assert hist.req("mallory", {"op": "history", "req_id": "h", "group": "team"})["code"] == "not_a_member"
    # past the history age the kept messages go; what still waits stays (it expires by the expiry age)
    assert hist.store.expire_history(now=hist.now + 2 * 86_400_000) == 8
    assert Message.select().count() == Message.select().join(Entry, on=(Entry.seq == Message.seq)).distinct().count()


def test_history_is_refused_when_the_server_keeps_none(srv):
    assert srv.req("bob", {"op": "history", "req_id": "h", "with": "alice"})["code"] == "history_off"


def read_receipts(pubs, uid, dev=""):
    return [r for x in pubs if x.topic == p.reply_topic(uid, dev) and x.payload.get("kind") == "receipts"
            for r in x.payload["receipts"] if r["status"] == "read"]


def test_group_read_markers_sync_devices_count_unread_and_tell_the_sender_k_of_n(srv):
    create(srv, members=("bob", "carol", "dave"))
    srv.online("alice")
    seqs = []
    for i in range(3):
        out = srv.send("alice", {"msg_id": f"r{i}", "group": "team", "content": f"r{i}"})
        seqs += [x.payload["seq"] for x in out if x.topic == p.reply_topic("alice")]
    srv.send("bob", {"msg_id": "b", "group": "team", "content": "from bob"})
    count = srv.req("carol", {"op": "count", "req_id": "c"})
    assert count["unread_groups"] == {"team": 4}, "others' messages after carol's join (her join event is read)"
    srv.online("carol", "phone")
    srv.online("carol", "laptop")
    pubs = srv.batch([(p.req_topic("carol", "phone"), json.dumps(
        {"op": "read", "req_id": "m", "group": "team", "seq": seqs[1]}).encode())])
    (answer,) = [x.payload for x in pubs if x.topic == p.reply_topic("carol", "phone")]
    assert (answer["group"], answer["seq"], answer["unread"]) == ("team", seqs[1], 2)
    assert [x.payload for x in pubs if x.topic == p.inbox_topic("carol", "laptop")] == \
        [{"kind": "read", "group": "team", "seq": seqs[1], "unread": 2}], "the user's other device is told"
    receipts = read_receipts(pubs, "alice")
    assert [(r["msg_id"], r["read"], r["members"]) for r in receipts] == [("r0", 1, 3), ("r1", 1, 3)]
    # dave reads everything; bob has read receipts off: his reads are not counted
    srv.req("bob", {"op": "settings", "req_id": "s", "read_receipts": False})
    srv.req("bob", {"op": "read", "req_id": "m", "group": "team", "seq": 10**12})
    pubs = srv.batch([(p.req_topic("dave"), json.dumps({"op": "read", "req_id": "m", "group": "team",
                                                         "seq": 10**12}).encode())])
    assert [(r["msg_id"], r["read"]) for r in read_receipts(pubs, "alice")] == [("r0", 2), ("r1", 2), ("r2", 1)]
    assert [(r["msg_id"], r["read"]) for r in read_receipts(pubs, "bob")] == [("b", 1)]
    # never backwards, never past the newest
    back = srv.req("dave", {"op": "read", "req_id": "m", "group": "team", "seq": 1})
    assert back["seq"] == seqs[2] + 1 and back["unread"] == 0
    assert srv.req("mallory", {"op": "read", "req_id": "m", "group": "team", "seq": 1})["code"] == "not_a_member"


def test_group_typing_reaches_online_member_devices_and_writes_nothing(srv):
    create(srv, members=("bob", "carol"))
    srv.online("bob", "phone")
    srv.online("carol")
    srv.online("mallory")
    counts = [m.select().count() for m in (Message, Entry, Member)]
    pubs = srv.batch([(p.req_topic("alice"), json.dumps({"op": "typing", "group": "team"}).encode())])
    got = {x.topic: x for x in pubs}
    assert set(got) == {p.inbox_topic("bob", "phone"), p.inbox_topic("carol")}
    notice = got[p.inbox_topic("carol")]
    assert notice.qos == 0 and notice.payload["group"] == "team" and notice.payload["from"] == "alice"
    assert srv.batch([(p.req_topic("mallory"), json.dumps({"op": "typing", "group": "team"}).encode())]) == [], \
        "a non-member's notice goes nowhere"
    assert [m.select().count() for m in (Message, Entry, Member)] == counts


def test_acks_of_many_devices_in_one_batch_count_each_member_once(srv):
    """The acks of one transaction go in one statement set (Store.delete_many): the same outcomes as one by one."""
    create(srv, members=("bob", "carol", "dave"))
    for uid, dev in (("bob", "phone"), ("bob", "laptop"), ("carol", ""), ("dave", ""), ("alice", "")):
        srv.online(uid, dev)
    out = srv.send("alice", {"msg_id": "g1", "group": "team", "content": "to all", "receipts": "batch"})
    seq = [x.payload for x in out if x.topic == p.inbox_topic("carol")][0]["seq"]
    out = srv.send("alice", {"msg_id": "d1", "to": "bob", "content": "to bob's two devices"})
    dseq = [x.payload for x in out if x.topic == p.inbox_topic("bob", "phone")][0]["seq"]
    acks = [(p.ack_topic(u, d), json.dumps({"seqs": [seq] + ([dseq] if u == "bob" else [])}).encode())
            for u, d in (("bob", "phone"), ("bob", "laptop"), ("carol", ""), ("dave", ""))]
    pubs = srv.batch(acks)
    receipts = [r for x in pubs if x.topic == p.reply_topic("alice") for r in x.payload.get("receipts", [x.payload])]
    assert [(r["msg_id"], r["status"], r.get("delivered"), r.get("members")) for r in receipts
            if r["status"] == "delivered"] == [("d1", "delivered", None, None), ("g1", "delivered", 3, 3)], receipts
    assert not Entry.select().where(Entry.seq.in_([seq, dseq])).exists(), "every device acked (alice sent from hers)"
    assert MemberReceipt.select().count() == 0 and not Message.select().where(Message.seq.in_([seq, dseq])).exists()


def test_group_pushes_and_their_retransmissions_go_at_qos_0_and_a_1to1_push_at_qos_1(srv):
    """docs/PROTOCOL.md, section 14: a group's pushes (its membership events, its messages, their sync copies) and
    their retransmissions are published at MQTT QoS 0, answers and receipts at QoS 1; a 1:1 push stays at QoS 1."""
    srv.online("bob")
    srv.online("alice", "tab")
    pubs = srv.batch([(p.req_topic("alice"), json.dumps({"op": "group_create", "req_id": "c", "group": "team",
                                                        "members": ["bob"]}).encode())])
    assert {(x.topic, x.qos) for x in pubs} == {(p.inbox_topic("bob"), 0), (p.inbox_topic("alice", "tab"), 0),
                                                (p.reply_topic("alice"), 1)}
    pubs = srv.send("alice", {"msg_id": "g1", "group": "team", "content": "hi"})
    assert {(x.topic, x.qos) for x in pubs} == {(p.inbox_topic("bob"), 0), (p.inbox_topic("alice", "tab"), 0),
                                                (p.reply_topic("alice"), 1)}
    seq = inbox(pubs, "bob")[0]["seq"]
    again = srv.core.resend(srv.core.due(srv.now + 10 * core.PUSH_ACK_TIMEOUT_MS), None, srv.now)
    assert {(x.topic, x.qos) for x in again if x.payload["seq"] == seq} == {(p.inbox_topic("bob"), 0),
                                                                           (p.inbox_topic("alice", "tab"), 0)}
    pubs = srv.send("alice", {"msg_id": "d1", "to": "bob", "content": "just us"})
    assert [(x.qos, x.payload["content"]) for x in pubs if x.topic == p.inbox_topic("bob")] == [(1, "just us")]


def test_the_outbox_reads_on_from_the_last_row_and_forgets_old_rows(url):
    """What the CLI's group changes leave for the workers (store/outbox.py): rows in the change's transaction,
    read in order past the last row read, one per distinct uid, deleted once older than OUTBOX_KEEP_MS."""
    from backend.store import OUTBOX_KEEP_MS
    s = Server(url)
    assert s.store.outbox_head() == 0 and s.store.outbox_since(0) == []
    with s.db.atomic():
        s.store.note_outbox(["bob", "carol", "bob"], now=1_000)
    head = s.store.outbox_head()
    rows = s.store.outbox_since(0)
    assert [u for _, u in rows] == ["bob", "carol"] and rows[-1][0] == head
    s.store.note_outbox([f"u{i}" for i in range(1_200)], now=2_000)  # past one INSERT's 400 rows
    later = s.store.outbox_since(head)
    assert len(later) == 1_200 and [u for _, u in later[:2]] == ["u0", "u1"]
    assert s.store.outbox_since(head, limit=10) == later[:10]
    assert s.store.purge_outbox(now=1_000 + OUTBOX_KEEP_MS + 1) == 2  # bob's and carol's: older than kept
    assert len(s.store.outbox_since(0)) == 1_200


def test_adding_members_already_there_changes_nothing_and_says_the_current_gseq(srv):
    """A trial found `group add` of a member already there answering gseq + 1 (read before the undone bump)."""
    gseq = create(srv, "alice", ("bob",))["gseq"]
    again = srv.req("alice", {"op": "group_add", "req_id": "a", "group": "team", "members": ["bob"]})
    assert again["kind"] == "group" and again["gseq"] == gseq, again
    shown = srv.req("alice", {"op": "group_members", "req_id": "m", "group": "team"})
    assert shown["gseq"] == gseq and [m["uid"] for m in shown["members"]] == ["alice", "bob"]
