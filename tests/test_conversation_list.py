"""The conversation list (op conversations, docs/PROTOCOL.md 14.9) end to end: `serve --history-days 1` and
IMClient, a new device of a user listing the conversations its other device had (1:1 both ways, a group), then
opening one through history; `serve` without history answers history_off."""

from __future__ import annotations

import pytest

from conftest import PASSWORDS, Server, add_users


@pytest.fixture
def hist_server(db_url):
    add_users(db_url, *PASSWORDS)
    srv = Server(db_url, extra=["--history-days", "1"]).start()
    yield srv
    srv.kill()


def test_a_new_device_lists_the_conversations_of_the_recent_past(hist_server, clients):
    phone = clients(hist_server, "alice", device="phone")
    bob = clients(hist_server, "bob", device="desk")
    assert bob.send("alice", "hello alice").wait(10)["status"] == "stored"
    assert phone.wait_for_messages(1)
    phone.flush_acks()
    assert phone.send("carol", "carol, are you there?").wait(10)["status"] == "stored"  # carol is offline
    assert phone.create_group("team", ["bob"], name="Team").get("kind") == "group"
    last = phone.send_group("team", "hi team").wait(10)

    laptop = clients(hist_server, "alice", device="laptop")  # a new device: nothing of this waits for it
    answer = laptop.conversations()
    assert answer["kind"] == "conversations" and not answer["more"]
    got = [(c.get("with") or c["group"], c["last_from"]) for c in answer["conversations"]]
    assert got == [("team", "alice"), ("carol", "alice"), ("bob", "bob")], answer
    assert answer["conversations"][0]["last_seq"] == last["seq"] and answer["conversations"][0]["name"] == "Team"
    assert "hi team" not in str(answer) and "hello alice" not in str(answer)
    page = laptop.conversations(limit=1, before=answer["conversations"][0]["last_seq"])
    assert [c.get("with") for c in page["conversations"]] == ["carol"] and page["more"]
    # opening one: its history, as before
    chat = laptop.history(with_uid="bob")
    assert [m["content"] for m in chat["messages"]] == ["hello alice"]


def test_a_server_without_history_answers_history_off(server, clients):
    alice = clients(server, "alice")
    answer = alice.conversations()
    assert (answer["kind"], answer["code"]) == ("error", "history_off"), answer
