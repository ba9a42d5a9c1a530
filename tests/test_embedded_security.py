"""The embedded broker admits only known accounts and enforces the protocol's topic rights."""

from __future__ import annotations

import threading

import paho.mqtt.client as mqtt
import pytest

from backend import protocol as p
from conftest import PASSWORDS, raw_client
from conftest import stop_raw as stop


@pytest.mark.parametrize("username,password,client_id", [
    ("alice", "wrong", "alice"), ("ghost", "whatever", "ghost"), (None, None, "anon"),
    ("alice", PASSWORDS["alice"], "bob"),          # right password, someone else's client id
    ("alice", PASSWORDS["alice"], "alice2"),
])
def test_refused_at_connect(server, username, password, client_id):
    c, rc, _ = raw_client(server.port, username, password, client_id)
    stop(c)
    assert rc is None or rc.is_failure


def test_last_will_on_someone_elses_status_is_refused(server):
    c, rc, _ = raw_client(server.port, "alice", PASSWORDS["alice"], "alice:w", will=(p.status_topic("bob"), "online"))
    stop(c)
    assert rc is None or rc.is_failure


def test_client_id_takeover_refused_and_session_kept(server, clients):
    bob = clients(server, "bob")
    c, rc, _ = raw_client(server.port, "alice", "wrong-password", "bob")
    stop(c)
    assert rc is None or rc.is_failure
    alice = clients(server, "alice")
    alice.send("bob", "still here?").wait(10)
    assert bob.wait_for_messages(1), "a refused CONNECT with bob's client id must not kick bob off"


def test_no_one_reads_or_speaks_for_another(server, clients):
    bob = clients(server, "bob")
    spy, rc, got = raw_client(server.port, "alice", PASSWORDS["alice"], "alice:spy")
    assert not rc.is_failure
    result = spy.subscribe([(p.inbox_topic("bob"), 1), (p.reply_topic("bob"), 1), ("im/u/+/inbox", 1),
                            ("im/#", 1), ("#", 1), ("$SYS/#", 1)])
    assert result[0] == mqtt.MQTT_ERR_SUCCESS
    # Speak as bob: publish on bob's send, ack and req topics, and overwrite bob's status.
    spy.publish(p.send_topic("bob"), p.encode({"msg_id": "forged", "to": "carol", "content": "x"}), qos=1)
    spy.publish(p.req_topic("bob"), p.encode({"req_id": "r", "op": "pull"}), qos=1)
    spy.publish(p.ack_topic("bob"), p.encode({"seqs": [1, 2, 3]}), qos=1)
    spy.publish(p.status_topic("bob"), "offline", qos=1, retain=True).wait_for_publish(5)
    spy.publish(p.inbox_topic("bob"), p.encode({"kind": "msg", "seq": 999}), qos=1).wait_for_publish(5)
    carol = clients(server, "carol", auto_sync=False)
    alice = clients(server, "alice")
    out = alice.send("bob", "private")
    assert bob.wait_for_messages(1) and out.delivered.wait(10)
    assert [m["content"] for m in bob.messages] == ["private"], "nothing forged reached bob's inbox"
    assert carol.count()["total"] == 0, "nothing was stored as sent by bob"
    stop(spy)
    leaked = [m.topic for m in got if m.topic.startswith("im/u/")]
    assert leaked == [], f"alice saw {leaked}"
    # bob's retained status is still his own `online`.
    watcher, _, seen = raw_client(server.port, "carol", PASSWORDS["carol"], "carol:w")
    watcher.subscribe(p.status_topic("bob"), 1)
    assert carol.wait_for(lambda: bool(seen), 5)
    stop(watcher)
    assert seen[-1].payload == b"online"


def test_retained_messages_only_for_own_subscriptions(server, clients):
    """amqtt 0.12.1 sends every retained message matching any client's subscription on CONNECT; not here."""
    bob = clients(server, "bob")
    bob.client.publish(p.inbox_topic("bob"), b"retained?", qos=1, retain=True)  # refused: not bob's to publish
    spy, rc, got = raw_client(server.port, "alice", PASSWORDS["alice"], "alice:r")
    assert not rc.is_failure
    alice = clients(server, "alice")
    alice.send("bob", "sync").wait(10)
    assert bob.wait_for_messages(1)
    stop(spy)
    assert [m.topic for m in got] == [], "a fresh client with no subscriptions receives nothing"


def test_presence_visibility_self_hides_others_status(db_url):
    from conftest import Server, add_users
    add_users(db_url, *PASSWORDS)
    srv = Server(db_url)
    srv.start(extra=["--presence", "self"])
    try:
        bob, rc, _ = raw_client(srv.port, "bob", PASSWORDS["bob"], "bob:s")
        bob.publish(p.status_topic("bob"), "online", qos=1, retain=True).wait_for_publish(5)
        spy, rc, got = raw_client(srv.port, "alice", PASSWORDS["alice"], "alice:s")
        spy.subscribe([("im/status/+", 1), (p.status_topic("bob"), 1), (p.status_topic("alice"), 1)])
        spy.publish(p.status_topic("alice"), "online", qos=1, retain=True).wait_for_publish(5)
        deadline = threading.Event()
        deadline.wait(0.5)  # bob's retained status would arrive within this
        assert [m.topic for m in got] == [p.status_topic("alice")]
        stop(spy)
        stop(bob)
    finally:
        srv.kill()
