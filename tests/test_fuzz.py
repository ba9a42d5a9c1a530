"""Hostile input: 10,000 generated payloads against the decoder and core; 1,000 end to end while
valid traffic flows. Nothing crashes, every bad payload gets its error, valid traffic loses nothing."""

from __future__ import annotations

import collections
import time

from hypothesis import HealthCheck, given, settings

from backend import core
from backend import protocol as p
from backend.client import IMClient
from conftest import PASSWORDS, Server, add_users
from hostile import decoder_error, expected_error, hostile_batch, hostile_payloads

KNOWN_CODES = {"bad_json", "not_an_object", "payload_too_large", "missing_field", "bad_field", "too_long",
               "bad_uid", "content_too_large", "too_many", "unknown_op", "bad_limit", "unknown_cursor",
               "rate_limited"}
TOPIC = {"send": p.send_topic, "ack": p.ack_topic, "req": p.req_topic}
DELIVERY = core.Delivery(send_rate=0)


def _check(kind: str, payload: bytes) -> None:
    plan = DELIVERY.plan([(TOPIC[kind]("mallory"), payload)], 1)
    want = decoder_error(kind, payload)
    if want is None:  # valid for the decoder: a store operation (or nothing, for an empty ack)
        assert not plan.replies
        assert len(plan.ops) <= 1
    else:
        assert plan.ops == [] and len(plan.replies) == 1
        reply = plan.replies[0]
        assert reply.topic == p.reply_topic("mallory")
        assert reply.payload["kind"] == "error" and reply.payload["code"] == want in KNOWN_CODES
        assert isinstance(reply.payload["message"], str)
        p.encode(reply.payload)  # the answer itself is always encodable


# 3 x 3,400 = 10,200 generated payloads, split by topic so that each test stays well under a minute.
FUZZ = settings(max_examples=3_400, deadline=None, database=None, suppress_health_check=list(HealthCheck))


@FUZZ
@given(hostile_payloads("send"))
def test_fuzz_send(item):
    _check(*item)


@FUZZ
@given(hostile_payloads("ack"))
def test_fuzz_ack(item):
    _check(*item)


@FUZZ
@given(hostile_payloads("req"))
def test_fuzz_req(item):
    _check(*item)


def test_thousand_hostile_payloads_end_to_end_while_valid_traffic_flows(db_url):
    users = {"alice", "bob", "mallory"}
    add_users(db_url, *users)
    server = Server(db_url)
    server.start(extra=["--send-rate", "0"])  # this test is about the decoder; rate limits have their own
    made = []
    try:
        bob = IMClient("bob", PASSWORDS["bob"], port=server.port).connect()
        alice = IMClient("alice", PASSWORDS["alice"], port=server.port, receiver=False).connect()
        mallory = IMClient("mallory", "mallory-pw", port=server.port, receiver=False).connect()
        made += [bob, alice, mallory]
        batch = hostile_batch(1000, seed=2026)
        want = collections.Counter(c for c in (expected_error(k, pl, users) for k, pl in batch) if c)
        assert sum(want.values()) >= 850, "the generator makes mostly bad payloads"
        valid = []
        for i, (kind, payload) in enumerate(batch):
            mallory.send_raw(kind, payload)
            if i % 5 == 0:
                valid.append(alice.send("bob", f"valid {i}"))
        assert all(o.wait(20) and o.receipt["status"] == "stored" for o in valid)
        assert mallory.wait_for(lambda: len(mallory.errors) >= sum(want.values()), 30), \
            (len(mallory.errors), sum(want.values()))
        time.sleep(0.2)  # a stray extra error would arrive within this
        got = collections.Counter(e["code"] for e in mallory.errors)
        assert got == want
        from_alice = lambda: [m["content"] for m in bob.messages if m["from"] == "alice"]  # noqa: E731
        assert bob.wait_for(lambda: len(from_alice()) >= len(valid), 20)
        assert sorted(from_alice()) == sorted(f"valid {i}" for i in range(0, 1000, 5))
        assert server.proc.poll() is None, "the worker is still up"
        assert "Traceback" not in "".join(server.lines)
    finally:
        for c in made:
            c.kill()
        server.kill()
