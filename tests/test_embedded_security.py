"""The embedded broker admits only known accounts and enforces the protocol's topic rights."""

from __future__ import annotations

import json
import threading

import paho.mqtt.client as mqtt
import pytest

from backend import protocol as p
from conftest import PASSWORDS, raw_client
from conftest import stop_raw as stop


@pytest.mark.parametrize("username,password,client_id,why", [
    ("alice", "wrong", "alice", "unknown user or wrong password"),
    ("ghost", "whatever", "ghost", "unknown user or wrong password"),
    (None, None, "anon", "no username"),
])
def test_refused_at_connect(server, username, password, client_id, why):
    # (Someone else's client id, or any other, is no longer refused: sessions are scoped by user,
    # see test_any_client_id_is_accepted and test_another_users_client_id_reaches_only_ones_own_session.)
    c, rc, _ = raw_client(server.port, username, password, client_id)
    stop(c)
    assert rc is None or rc.is_failure
    assert server.wait_log(f"CONNECT refused: user {username!r}: {why}", 5), "the log says which rule failed"


def test_last_will_on_someone_elses_status_is_refused(server):
    c, rc, _ = raw_client(server.port, "alice", PASSWORDS["alice"], "alice:w", will=(p.status_topic("bob"), "online"))
    stop(c)
    assert rc is None or rc.is_failure
    assert server.wait_log("a will may only be on the user's own status topic", 5)


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


def _paho(port: int, uid: str, client_id: str, clean: bool = True):
    """(connected paho client, CONNACK's session-present flag); the loop runs."""
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean)
    c.username_pw_set(uid, PASSWORDS[uid])
    box: list = []
    done = threading.Event()
    c.on_connect = lambda cl, u, flags, rc, pr: (box.append((rc, flags.session_present)), done.set())
    c.connect("127.0.0.1", port)
    c.loop_start()
    assert done.wait(10) and not box[0][0].is_failure, f"{uid} as {client_id!r}: {box}"
    return c, box[0][1]


@pytest.mark.parametrize("client_id", ["", "paho-5f3a9c", "bob", "alice", "!im-worker"])
def test_any_client_id_is_accepted(server, client_id):
    """Standard clients make up random ids (or send none): they work; the id is scoped to the user."""
    c, _ = _paho(server.port, "alice", client_id)
    replies: list = []
    got = threading.Event()
    c.on_message = lambda cl, u, m: (replies.append(json.loads(m.payload)), got.set())
    subscribed = threading.Event()
    c.on_subscribe = lambda *a: subscribed.set()
    c.subscribe(p.reply_topic("alice"), 1)
    assert subscribed.wait(10)
    c.publish(p.send_topic("alice"), b"not json", qos=1)
    assert got.wait(10), "the worker answered through this connection"
    assert replies[0]["code"] == "bad_json"
    stop(c)


def test_mosquitto_sub_without_client_id(server):
    import shutil
    import subprocess
    if shutil.which("mosquitto_sub") is None:
        pytest.skip("mosquitto_sub not installed")
    c, _ = _paho(server.port, "alice", "alice:status")
    c.publish(p.status_topic("alice"), p.ONLINE, qos=1, retain=True).wait_for_publish(5)
    out = subprocess.run(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(server.port), "-u", "alice", "-P",
                          PASSWORDS["alice"], "-q", "1", "-t", p.status_topic("alice"), "-C", "1", "-W", "10"],
                         capture_output=True, text=True, timeout=20)
    stop(c)
    assert (out.returncode, out.stdout.strip()) == (0, p.ONLINE), out.stderr


def test_another_users_client_id_reaches_only_ones_own_session(server, clients):
    """bob connecting with alice's client id neither kicks her off nor clears her persistent session."""
    alice = clients(server, "alice")                          # client id `alice`, connected
    carol = clients(server, "carol", receiver=False)
    intruder, _ = _paho(server.port, "bob", "alice")          # accepted: it is bob's own `alice`
    carol.send("alice", "still with you?").wait(10)
    assert alice.wait_for_messages(1), "alice's connection is untouched"
    assert alice.client.is_connected()
    stop(intruder)

    # alice's persistent session survives bob's clean and persistent connects under its id.
    phone, present = _paho(server.port, "alice", "alice-phone", clean=False)
    phone.subscribe(p.inbox_topic("alice"), 1)
    stop(phone)
    for clean in (True, False):
        intruder, present = _paho(server.port, "bob", "alice-phone", clean=clean)
        assert not present or not clean, "bob's clean connect starts bob's own session"
        stop(intruder)
    phone, present = _paho(server.port, "alice", "alice-phone", clean=False)
    stop(phone)
    assert present, "alice's persistent session is still there"
