"""End to end through `python -m backend serve` (embedded amqtt broker + worker, SQLite)."""

from __future__ import annotations

import threading
import time

import paho.mqtt.client as mqtt

from backend import protocol as p
from conftest import PASSWORDS, eventually, raw_client, stop_raw


def test_two_users_chat_online(server, clients):
    alice = clients(server, "alice")
    bob = clients(server, "bob")
    out = alice.send("bob", "hello bob")
    receipt = out.wait(10)
    assert receipt["status"] == "stored" and receipt["to"] == "bob" and receipt["msg_id"] == out.msg_id
    assert bob.wait_for_messages(1)
    m = bob.messages[0]
    assert (m["kind"], m["from"], m["to"], m["content"], m["seq"], m["msg_id"]) == \
           ("msg", "alice", "bob", "hello bob", receipt["seq"], out.msg_id)
    assert isinstance(m["sent_at"], int) and m["type"] == "text"
    assert out.delivered.wait(10), "bob's ack must produce a delivered receipt"
    assert bob.count()["total"] == 0, "an acked message is deleted"
    # The reply goes both ways.
    back = bob.send("alice", "hi alice")
    assert back.wait(10)["status"] == "stored"
    assert alice.wait_for_messages(1) and alice.messages[0]["content"] == "hi alice"
    assert back.delivered.wait(10)


def test_offline_stored_announced_counted_pulled_in_pages(server, clients):
    alice = clients(server, "alice")
    carol = clients(server, "carol")
    sent = [alice.send("bob", f"a{i}") for i in range(5)] + [carol.send("bob", f"c{i}") for i in range(2)]
    seqs = [o.wait(10)["seq"] for o in sent]
    assert all(o.receipt["status"] == "stored" for o in sent)
    assert seqs[:5] == sorted(seqs[:5]), "seq increases in send order"

    bob = clients(server, "bob", auto_sync=False)
    assert bob.wait_for(lambda: bob.announcements, 10), "coming online announces the backlog"
    ann = bob.announcements[0]
    assert (ann["kind"], ann["total"], ann["by_sender"], ann["expired"]) == \
           ("count", 7, {"alice": 5, "carol": 2}, 0) and "req_id" not in ann
    assert ann["previews"]["alice"]["content"] == "a4" and ann["previews"]["carol"]["content"] == "c1"
    assert ann["previews"]["alice"]["seq"] == seqs[4] and ann["previews"]["alice"]["type"] == "text"
    assert bob.count()["by_sender"] == {"alice": 5, "carol": 2}
    assert not bob.messages, "messages stored while offline are not pushed; they wait for pull"

    # One sender only, oldest first.
    page = bob.pull(limit=10, from_uid="carol")
    assert [m["content"] for m in page["messages"]] == ["c0", "c1"] and page["more"] is False

    contents, cursor, requests = [], None, 0
    while True:
        page = bob.pull(limit=3, ack=cursor)
        requests += 1
        assert page["kind"] == "page" and page["req_id"]
        contents += [m["content"] for m in page["messages"]]
        if page["messages"]:
            assert [m["seq"] for m in page["messages"]] == sorted(m["seq"] for m in page["messages"])
            assert page["cursor"]
        cursor = page["cursor"]
        if cursor is None:
            assert page["messages"] == [] and page["more"] is False
            break
    assert requests == 4, "3 pages take 4 requests: the last one acks the third page"
    assert sorted(contents) == sorted([f"a{i}" for i in range(5)] + ["c0", "c1"])
    assert [c for c in contents if c.startswith("a")] == [f"a{i}" for i in range(5)]
    assert bob.count()["total"] == 0, "gone after the final ack"
    assert all(o.delivered.wait(10) for o in sent), "every sender hears delivered"


def test_disconnect_before_acking_a_page_gets_it_again(server, clients):
    alice = clients(server, "alice")
    for i in range(4):
        alice.send("bob", f"m{i}").wait(10)
    bob = clients(server, "bob", auto_sync=False)
    first = bob.pull(limit=2)
    bob.kill()  # gone without acking
    bob2 = clients(server, "bob", auto_sync=False)
    again = bob2.pull(limit=2)
    assert [m["seq"] for m in again["messages"]] == [m["seq"] for m in first["messages"]]
    # Acking the old cursor still deletes exactly that page, and acking twice is harmless.
    nxt = bob2.pull(limit=2, ack=first["cursor"])
    assert [m["content"] for m in nxt["messages"]] == ["m2", "m3"]
    repeat = bob2.pull(limit=2, ack=first["cursor"])
    assert [m["content"] for m in repeat["messages"]] == ["m2", "m3"]
    assert bob2.count()["total"] == 2


def test_resent_msg_id_is_duplicate_also_after_delivery(server, clients):
    alice = clients(server, "alice")
    bob = clients(server, "bob")
    sent = alice.send("bob", "once", msg_id="fixed-id-1")
    first = sent.wait(10)
    again = alice.send("bob", "once", msg_id="fixed-id-1").wait(10)
    assert again["status"] == "duplicate" and again["seq"] == first["seq"] and again["to"] == "bob"
    assert bob.wait_for_messages(1)
    assert sent.delivered.wait(10)
    late = alice.send("bob", "once", msg_id="fixed-id-1").wait(10)
    assert late["status"] == "duplicate" and late["seq"] == first["seq"]
    time.sleep(0.3)  # a wrongly re-stored copy would be pushed within this time
    assert [m["content"] for m in bob.messages] == ["once"]
    assert bob.count()["total"] == 0


def test_unknown_receiver_is_an_error(server, clients):
    alice = clients(server, "alice")
    r = alice.send("nobody", "hi").wait(10)
    assert r["kind"] == "error" and r["code"] == "unknown_receiver" and r["msg_id"]


def test_auto_sync_drains_the_backlog_on_connect(server, clients):
    alice = clients(server, "alice")
    for i in range(7):
        alice.send("dave", f"d{i}").wait(10)
    dave = clients(server, "dave")  # auto_sync: the announcement starts a drain
    assert dave.wait_for_messages(7)
    assert [m["content"] for m in dave.messages] == [f"d{i}" for i in range(7)]
    assert eventually(lambda: dave.count()["total"] == 0), "the drain's final request acked the last page"


def test_unacked_push_is_resent_then_left_for_pull(server, clients):
    """A receiver that gets the push but never acks: the worker resends, and nothing is deleted."""
    alice = clients(server, "alice")
    got: list[dict] = []
    raw = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="erin:raw", clean_session=True)
    raw.username_pw_set("erin", PASSWORDS["erin"])
    raw.on_message = lambda c, u, m: got.append(p.decode_object(m.payload))
    raw.connect("127.0.0.1", server.port)
    raw.loop_start()
    try:
        raw.subscribe(p.inbox_topic("erin"), qos=1)
        raw.publish(p.status_topic("erin"), "online", qos=1, retain=True).wait_for_publish(5)
        out = alice.send("erin", "are you there?")
        assert out.wait(10)["status"] == "stored"
        deadline = time.monotonic() + 10
        while len(got) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(got) >= 2 and {m["seq"] for m in got} == {out.receipt["seq"]}, "resent with the same seq"
        assert not out.delivered.is_set()
    finally:
        raw.publish(p.status_topic("erin"), "offline", qos=1, retain=True).wait_for_publish(5)
        raw.disconnect()
        raw.loop_stop()
    erin = clients(server, "erin", auto_sync=False)
    assert erin.count()["total"] == 1, "never acked, so still stored for pull"


def test_rate_limited_sends_are_refused_then_resent_not_lost(db_url, clients):
    from conftest import Server, add_users
    add_users(db_url, *PASSWORDS)
    srv = Server(db_url)
    srv.start(extra=["--send-rate", "10", "--send-burst", "5"])
    try:
        bob = clients(srv, "bob")
        alice = clients(srv, "alice", resend_timeout=0.3, resend_wait_max=1.0, max_resends=50)
        outs = [alice.send("bob", f"r{i}") for i in range(20)]
        assert all(o.wait(20) and o.receipt["status"] == "stored" for o in outs)
        assert alice.rate_limited > 0 and any(e["code"] == "rate_limited" for e in alice.errors)
        assert bob.wait_for_messages(20, 20)
        assert sorted(m["content"] for m in bob.messages) == sorted(f"r{i}" for i in range(20))
    finally:
        srv.kill()


def test_batched_receipts_on_the_wire_and_v1_receipts_beside_them(server, clients):
    """A sender that opts in ("receipts": "batch") gets `receipts` payloads; one that does not, v1's
    single receipts, from the same worker at the same time (docs/PROTOCOL.md 4.4)."""
    bob = clients(server, "bob", ack_delay=5.0)  # holds its acks so both senders' messages go in one ack
    got = {}
    for uid in ("alice", "carol"):
        c, rc, msgs = raw_client(server.port, uid, PASSWORDS.get(uid, f"{uid}-pw"), f"{uid}:raw")
        subscribed = threading.Event()
        c.on_subscribe = lambda *a, ev=subscribed: ev.set()
        c.subscribe(p.reply_topic(uid), qos=1)
        assert subscribed.wait(10)
        got[uid] = (c, msgs)
    for i in range(3):
        got["alice"][0].publish(p.send_topic("alice"), p.encode(
            {"msg_id": f"a{i}", "to": "bob", "content": "x", "receipts": "batch"}), qos=1)
        got["carol"][0].publish(p.send_topic("carol"), p.encode({"msg_id": f"c{i}", "to": "bob", "content": "y"}), qos=1)
    assert bob.wait_for_messages(6)
    bob.flush_acks()

    def payloads(uid):
        return [p.decode_object(m.payload) for m in got[uid][1]]

    def alice_items(status):
        return [r["msg_id"] for o in payloads("alice") for r in o.get("receipts", []) if r["status"] == status]

    assert eventually(lambda: sorted(alice_items("delivered")) == ["a0", "a1", "a2"])
    assert sorted(alice_items("stored")) == ["a0", "a1", "a2"]
    assert {o["kind"] for o in payloads("alice")} == {"receipts"}
    delivered_payloads = [o for o in payloads("alice") if any(r["status"] == "delivered" for r in o["receipts"])]
    assert len(delivered_payloads) == 1, "one ack from bob: one payload of delivered receipts for alice"
    assert len(payloads("alice")) <= 4, "batched: at most 3 stored payloads + 1 delivered (v1 would send 6)"
    assert eventually(lambda: len(payloads("carol")) == 6)
    assert {o["kind"] for o in payloads("carol")} == {"receipt"}
    assert sorted(o["msg_id"] for o in payloads("carol") if o["status"] == "delivered") == ["c0", "c1", "c2"]
    for c, _ in got.values():
        stop_raw(c)
