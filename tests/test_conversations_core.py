"""The sans-I/O core's conversations (typing notices, read markers, the read-receipt setting): events in,
operations and publishes out. No broker, no database (tests/test_conversations.py runs them for real)."""

from __future__ import annotations

import json

import pytest

from backend import core
from backend import protocol as p

T0 = 1_000_000


def req(uid, body, device=""):
    return (p.req_topic(uid, device), json.dumps(body).encode())


def online(uid, device=""):
    return (p.status_topic(uid, device), b"online")


def test_typing_is_relayed_qos0_to_the_receivers_online_devices_and_never_reaches_the_store():
    d = core.Delivery()
    d.plan([online("bob", "phone"), online("bob", "laptop"), online("alice", "desk")], T0)
    plan = d.plan([req("alice", {"op": "typing", "to": "bob"}, "desk")], T0)
    assert plan.ops == [], "never a store operation: no database write, no device registration"
    assert [(a.topic, a.qos) for a in plan.replies] == [(p.inbox_topic("bob", "laptop"), 0),
                                                        (p.inbox_topic("bob", "phone"), 0)]
    assert plan.replies[0].payload == {"kind": "typing", "from": "alice", "to": "bob", "state": "typing",
                                       "expires_in": core.TYPING_EXPIRES_MS}
    assert core.TYPING_EXPIRES_MS <= 30_000
    stopped = d.plan([req("alice", {"op": "typing", "to": "bob", "state": "stopped"})], T0)
    assert {a.payload["state"] for a in stopped.replies} == {"stopped"}
    assert d.take_signal_counts() == (4, 0) and d.take_signal_counts() == (0, 0)


def test_typing_to_someone_offline_goes_nowhere_and_is_not_kept():
    d = core.Delivery()
    plan = d.plan([req("alice", {"op": "typing", "to": "bob"})], T0)
    assert plan.ops == [] and plan.replies == []
    d.plan([online("bob")], T0)
    assert d.plan([], T0 + 1).replies == [], "nothing held for later"


def test_typing_is_rate_limited_per_user_and_drops_are_counted():
    d = core.Delivery()
    d.plan([online("bob")], T0)
    body = {"op": "typing", "to": "bob"}
    plan = d.plan([req("alice", body)] * 50, T0)
    assert len(plan.replies) == core.TYPING_BURST
    assert d.take_signal_counts() == (core.TYPING_BURST, 50 - core.TYPING_BURST)
    assert len(d.plan([req("carol", body)], T0).replies) == 1, "another user has its own bucket"
    assert d.plan([req("alice", body)], T0 + 10).replies == [], "still empty 10 ms later"
    later = T0 + int(1000 / core.TYPING_RATE_PER_S)
    assert len(d.plan([req("alice", body)], later).replies) == 1, "one token back after 1/rate seconds"


@pytest.mark.parametrize("body, code", [
    ({"op": "typing"}, "missing_field"),
    ({"op": "typing", "to": 7}, "bad_field"),
    ({"op": "typing", "to": "bob/inbox"}, "bad_uid"),
    ({"op": "typing", "to": "bob", "state": "asleep"}, "bad_field"),
    ({"op": "read", "req_id": "r1", "seq": 1}, "missing_field"),
    ({"op": "read", "req_id": "r1", "with": "bob"}, "missing_field"),
    ({"op": "read", "req_id": "r1", "with": "bob", "seq": -1}, "bad_field"),
    ({"op": "read", "req_id": "r1", "with": "bob", "seq": 1.5}, "bad_field"),
    ({"op": "read", "req_id": "r1", "with": "bob", "seq": True}, "bad_field"),
    ({"op": "read", "with": "bob", "seq": 1}, "missing_field"),
    ({"op": "settings", "req_id": "r1", "read_receipts": "no"}, "bad_field"),
])
def test_bad_conversation_requests_get_an_error_and_plan_nothing(body, code):
    d = core.Delivery()
    d.plan([online("bob")], T0)
    plan = d.plan([req("alice", body)], T0)
    assert plan.ops == []
    (reply,) = plan.replies
    assert reply.topic == p.reply_topic("alice") and reply.payload["code"] == code
    assert reply.payload.get("req_id") == body.get("req_id")


def test_a_typing_error_echoes_a_req_id_when_one_was_given():
    plan = core.Delivery().plan([req("alice", {"op": "typing", "req_id": "t1", "to": 1})], T0)
    assert plan.replies[0].payload["req_id"] == "t1"


def test_read_and_settings_are_store_operations():
    d = core.Delivery()
    plan = d.plan([req("alice", {"op": "read", "req_id": "r1", "with": "bob", "seq": 7}, "phone"),
                   req("alice", {"op": "settings", "req_id": "r2", "read_receipts": False}),
                   req("alice", {"op": "settings", "req_id": "r3"})], T0)
    assert plan.ops == [core.MarkRead("alice", "r1", "bob", 7, "phone"),
                        core.SetSettings("alice", "r2", "", False), core.SetSettings("alice", "r3", "", None)]
    assert plan.replies == []


def _marked(d, advanced=True, receipts=True, read=(("b-1", 5), ("b-2", 7))):
    plan = d.plan([req("alice", {"op": "read", "req_id": "r1", "with": "bob", "seq": 9}, "phone")], T0)
    (op,) = plan.ops
    return d.after_commit([core.Marked(op, 7, advanced, 2, read, receipts, ("", "desk"))], T0)


def test_a_marker_move_answers_syncs_the_readers_other_devices_and_sends_read_receipts_to_the_sender():
    d = core.Delivery()
    d.plan([online("alice", "phone"), online("alice", "laptop")], T0)  # bob's presence plays no part
    out = _marked(d)
    assert [(a.topic, a.payload) for a in out] == [
        (p.reply_topic("alice", "phone"), {"kind": "read", "req_id": "r1", "with": "bob", "seq": 7, "unread": 2}),
        (p.inbox_topic("alice", "laptop"), {"kind": "read", "with": "bob", "seq": 7, "unread": 2}),
    ]
    flushed = d.flush_receipts(T0 + core.RECEIPT_DELAY_MS)
    assert sorted(a.topic for a in flushed) == sorted([p.reply_topic("bob"), p.reply_topic("bob", "desk")])
    for a in flushed:
        assert a.payload == {"kind": "receipts", "receipts": [
            {"kind": "receipt", "msg_id": "b-1", "to": "alice", "seq": 5, "status": "read"},
            {"kind": "receipt", "msg_id": "b-2", "to": "alice", "seq": 7, "status": "read"}]}


def test_no_read_receipts_when_turned_off_but_the_other_devices_are_still_synced():
    d = core.Delivery()
    d.plan([online("alice", "phone"), online("alice", "laptop"), online("bob")], T0)
    out = _marked(d, receipts=False, read=())
    assert [a.topic for a in out] == [p.reply_topic("alice", "phone"), p.inbox_topic("alice", "laptop")]
    assert d.flush_receipts() == []


def test_a_marker_that_did_not_move_only_answers():
    d = core.Delivery()
    d.plan([online("alice", "phone"), online("alice", "laptop"), online("bob")], T0)
    out = _marked(d, advanced=False, read=())
    assert [a.topic for a in out] == [p.reply_topic("alice", "phone")]
    assert d.flush_receipts() == []


def test_settings_answer_and_a_change_is_synced_to_the_other_devices():
    d = core.Delivery()
    d.plan([online("alice", "phone"), online("alice", "laptop")], T0)
    plan = d.plan([req("alice", {"op": "settings", "req_id": "s1", "read_receipts": False}, "phone")], T0)
    out = d.after_commit([core.SettingsSet(plan.ops[0], False, True)], T0)
    assert [(a.topic, a.payload) for a in out] == [
        (p.reply_topic("alice", "phone"), {"kind": "settings", "req_id": "s1", "read_receipts": False}),
        (p.inbox_topic("alice", "laptop"), {"kind": "settings", "read_receipts": False})]
    out = d.after_commit([core.SettingsSet(plan.ops[0], False, False)], T0)
    assert [a.topic for a in out] == [p.reply_topic("alice", "phone")]


def test_count_answers_carry_unread_and_announcements_do_not():
    d = core.Delivery()
    answer = d.after_commit([core.Counted(core.CountBacklog("bob", "r1"), 1, {"alice": 1}, unread={"alice": 3},
                                          read_by={"carol": 9})], T0)
    assert list(answer[0].payload)[-3:] == ["unread", "read_by", "req_id"]
    assert answer[0].payload["unread"] == {"alice": 3} and answer[0].payload["read_by"] == {"carol": 9}
    announced = d.after_commit([core.Counted(core.CountBacklog("bob", None), 1, {"alice": 1})], T0)
    assert "unread" not in announced[0].payload and "read_by" not in announced[0].payload


def test_a_refused_mark_is_answered_with_its_req_id():
    d = core.Delivery()
    plan = d.plan([req("alice", {"op": "read", "req_id": "r9", "with": "bob", "seq": 1})], T0)
    out = d.after_commit([core.Refused(plan.ops[0], "bad_field", "no")], T0)
    assert out[0].payload == {"kind": "error", "code": "bad_field", "message": "no", "req_id": "r9"}
