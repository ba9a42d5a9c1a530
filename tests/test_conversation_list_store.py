"""The conversation list (op conversations, docs/PROTOCOL.md 14.9) through the core and the store together, on
SQLite, PostgreSQL and MariaDB, as the worker drives them: 1:1 conversations both ways, the caller's groups (not
the others'), the most recent first, limit and paging, what left the history window absent (what still waits for
the caller kept), never any content, and history_off on a server that keeps none."""

from __future__ import annotations

import json

import pytest

from backend.store import Message, now_ms
from test_groups_store import Server, create


@pytest.fixture(params=["sqlite", "postgresql", "mariadb"])
def url(request, tmp_path):
    from services import MYSQL_URL, POSTGRES_URL
    return {"sqlite": f"sqlite:///{tmp_path}/c.db", "postgresql": POSTGRES_URL, "mariadb": MYSQL_URL}[request.param]


@pytest.fixture
def hist(url):
    s = Server(url, history_days=1)
    yield s
    s.db.close()


def convs(srv, uid, **kw):
    answer = srv.req(uid, {"op": "conversations", "req_id": "c", **kw})
    assert answer["kind"] == "conversations" and answer["req_id"] == "c", answer
    return answer


def keys(answer):
    return [("group", c["group"]) if "group" in c else ("with", c["with"]) for c in answer["conversations"]]


def test_conversations_both_ways_groups_newest_first_paged_without_content(hist):
    hist.send("alice", {"msg_id": "a1", "to": "bob", "content": "SECRET to bob"})
    hist.send("carol", {"msg_id": "c1", "to": "alice", "content": "SECRET from carol"})
    create(hist, members=("bob",))  # alice's group "team"
    hist.send("bob", {"msg_id": "g1", "group": "team", "content": "SECRET in team"})
    create(hist, owner="dave", members=("carol",), gid="other")  # alice is not a member
    hist.send("dave", {"msg_id": "o1", "group": "other", "content": "SECRET in other"})
    hist.send("erin", {"msg_id": "e1", "to": "bob", "content": "SECRET not alice's"})
    for uid in ("alice", "bob", "carol", "dave"):
        hist.drain(uid)

    answer = convs(hist, "alice")
    assert keys(answer) == [("group", "team"), ("with", "carol"), ("with", "bob")] and not answer["more"]
    team, carol, bob = answer["conversations"]
    assert team["name"] == "Team" and team["last_from"] == "bob" and team["last_gseq"] == 2
    assert carol["last_from"] == "carol" and bob["last_from"] == "alice", "received and sent, by the newest"
    assert team["last_seq"] > carol["last_seq"] > bob["last_seq"] and answer["before"] == bob["last_seq"]
    assert all(abs(c["last_sent_at"] - now_ms()) < 60_000 for c in answer["conversations"])
    assert "SECRET" not in json.dumps(answer), "no content, not even a preview"
    assert keys(convs(hist, "bob")) == [("with", "erin"), ("group", "team"), ("with", "alice")]
    assert keys(convs(hist, "dave")) == [("group", "other")]

    # a newer message moves its conversation to the top
    hist.send("bob", {"msg_id": "b2", "to": "alice", "content": "SECRET again"})
    assert keys(convs(hist, "alice"))[0] == ("with", "bob")
    # pages: limit, more, before
    first = convs(hist, "alice", limit=2)
    assert keys(first) == [("with", "bob"), ("group", "team")] and first["more"]
    rest = convs(hist, "alice", limit=2, before=first["before"])
    assert keys(rest) == [("with", "carol")] and not rest["more"]
    assert hist.req("alice", {"op": "conversations", "req_id": "c", "limit": 501})["code"] == "bad_limit"
    assert hist.req("alice", {"op": "conversations", "req_id": "c", "before": -1})["code"] == "bad_field"

    # a member added later: the group from its join (the added event, its newest readable message)
    hist.req("alice", {"op": "group_add", "req_id": "a", "group": "team", "members": ["frank"]})
    (team,) = convs(hist, "frank")["conversations"]
    assert team["group"] == "team" and team["last_from"] == "alice" and team["last_gseq"] == 3
    # one who left: no longer listed
    hist.req("frank", {"op": "group_leave", "req_id": "l", "group": "team"})
    assert convs(hist, "frank")["conversations"] == []


def test_conversations_past_the_history_window_are_gone_but_what_waits_stays(hist):
    hist.send("alice", {"msg_id": "a1", "to": "bob", "content": "old, delivered"})
    create(hist, members=("bob",))
    hist.drain("bob")
    hist.drain("alice")
    hist.send("carol", {"msg_id": "c1", "to": "alice", "content": "old, still waiting for alice"})
    assert len(convs(hist, "alice")["conversations"]) == 3
    # two days later (the window is one): everything is older than the window
    Message.update(send_time=Message.send_time - 2 * 86_400_000).execute()
    assert keys(convs(hist, "alice")) == [("with", "carol")], "only what waits for alice"
    assert keys(convs(hist, "bob")) == [], "all of bob's past the window, none waiting for him"
    hist.store.expire_history(now=now_ms())
    assert keys(convs(hist, "alice")) == [("with", "carol")]
    assert keys(convs(hist, "carol")) == [], "carol's sent message waits, but not for one of carol's devices"
    hist.drain("alice")
    assert convs(hist, "alice")["conversations"] == []


def test_conversations_are_refused_when_the_server_keeps_no_history(url):
    s = Server(url)
    try:
        s.send("alice", {"msg_id": "a1", "to": "bob", "content": "waits"})
        assert s.req("bob", {"op": "conversations", "req_id": "c"})["code"] == "history_off"
    finally:
        s.db.close()
