"""Bad input on every client topic: a clear error on the sender's reply topic, and nothing else changes.

Each case publishes a bad payload and then a valid message right behind it;
the bad one must be answered with its error code, the valid one must be
stored, and at the end the receiver holds exactly the valid messages.
"""

from __future__ import annotations

import json

import pytest

from backend import protocol as p

J = lambda obj: json.dumps(obj).encode()  # noqa: E731
OK = {"msg_id": "m", "to": "bob", "content": "x"}

CASES = [
    # send
    ("send", b"not json", "bad_json"),
    ("send", b"\xff\xfe\x00", "bad_json"),
    ("send", b'{"msg_id": "a", "to": "bob", "content": NaN}', "bad_json"),
    ("send", b"[1, 2]", "not_an_object"),
    ("send", b'"a string"', "not_an_object"),
    ("send", b"", "bad_json"),
    ("send", J({}), "missing_field"),
    ("send", J({**OK, "msg_id": 12}), "bad_field"),
    ("send", J({**OK, "msg_id": ""}), "bad_field"),
    ("send", J({**OK, "msg_id": "x" * (p.MSG_ID_MAX + 1)}), "too_long"),
    ("send", J({k: v for k, v in OK.items() if k != "to"}), "missing_field"),
    ("send", J({**OK, "to": "bad uid!"}), "bad_uid"),
    ("send", J({**OK, "to": "u" * 51}), "bad_uid"),
    ("send", J({**OK, "to": 7}), "bad_field"),
    ("send", J({k: v for k, v in OK.items() if k != "content"}), "missing_field"),
    ("send", J({**OK, "content": 5}), "bad_field"),
    ("send", J({**OK, "content": "x" * (p.CONTENT_MAX + 1)}), "content_too_large"),
    ("send", json.dumps({**OK, "content": "\u00e9" * (p.CONTENT_MAX // 2 + 1)}, ensure_ascii=False).encode(),
     "content_too_large"),
    ("send", J({**OK, "content": "\u00e9" * (p.CONTENT_MAX // 2 + 1)}), "content_too_large"),
    ("send", J({**OK, "type": 3}), "bad_field"),
    ("send", J({**OK, "type": ""}), "bad_field"),
    ("send", J({**OK, "ts": "yesterday"}), "bad_field"),
    ("send", J({**OK, "ts": True}), "bad_field"),
    ("send", b'{"msg_id": "s", "to": "bob", "content": "\\ud800"}', "bad_field"),
    ("send", b"[" * (p.PAYLOAD_MAX + 1), "payload_too_large"),
    ("send", b"[" * 5000 + b"]" * 5000, "bad_json"),
    # ack
    ("ack", b"{oops", "bad_json"),
    ("ack", J([1, 2]), "not_an_object"),
    ("ack", J({}), "missing_field"),
    ("ack", J({"seqs": "1,2"}), "bad_field"),
    ("ack", J({"seqs": [1, "2"]}), "bad_field"),
    ("ack", J({"seqs": [-1]}), "bad_field"),
    ("ack", J({"seqs": [1.5]}), "bad_field"),
    ("ack", J({"seqs": list(range(1, p.ACK_SEQS_MAX + 2))}), "too_many"),
    # req
    ("req", b"nope", "bad_json"),
    ("req", J({"op": "count"}), "missing_field"),
    ("req", J({"req_id": 5, "op": "count"}), "bad_field"),
    ("req", J({"req_id": "r" * (p.REQ_ID_MAX + 1), "op": "count"}), "too_long"),
    ("req", J({"req_id": "r1"}), "missing_field"),
    ("req", J({"req_id": "r1", "op": "delete_everything"}), "unknown_op"),
    ("req", J({"req_id": "r1", "op": "pull", "limit": 0}), "bad_limit"),
    ("req", J({"req_id": "r1", "op": "pull", "limit": p.PULL_LIMIT_MAX + 1}), "bad_limit"),
    ("req", J({"req_id": "r1", "op": "pull", "limit": "10"}), "bad_limit"),
    ("req", J({"req_id": "r1", "op": "pull", "from": "no such/uid"}), "bad_uid"),
    ("req", J({"req_id": "r1", "op": "pull", "ack": "0123456789abcdef0123456789abcdef"}), "unknown_cursor"),
    ("req", J({"req_id": "r1", "op": "pull", "ack": 42}), "unknown_cursor"),
]


@pytest.fixture(scope="module")
def alice(shared_server):
    from backend.client import IMClient
    from conftest import PASSWORDS
    c = IMClient("alice", PASSWORDS["alice"], port=shared_server.port).connect()
    yield c
    c.kill()


@pytest.mark.parametrize("kind,payload,code", CASES, ids=[f"{k}-{c}-{i}" for i, (k, _, c) in enumerate(CASES)])
def test_bad_payload_gets_error_and_valid_traffic_flows(alice, kind, payload, code):
    before = len(alice.errors)
    alice.send_raw(kind, payload)
    valid = alice.send("bob", f"valid after {kind}/{code}")
    assert alice.wait_for(lambda: len(alice.errors) > before, 10), f"no error for {payload[:60]!r}"
    err = alice.errors[before]
    assert err["kind"] == "error" and err["code"] == code, err
    assert isinstance(err["message"], str) and err["message"]
    if kind == "req" and code not in ("missing_field", "bad_field", "too_long", "bad_json", "not_an_object"):
        assert err["req_id"] == "r1"
    assert valid.wait(10)["status"] == "stored", "valid traffic right behind a bad payload is stored"


def test_receiver_holds_exactly_the_valid_messages(shared_server, alice):
    from backend.client import IMClient
    from conftest import PASSWORDS
    bob = IMClient("bob", PASSWORDS["bob"], port=shared_server.port, auto_sync=False).connect()
    try:
        got = bob.drain(limit=p.PULL_LIMIT_MAX)
        assert sorted(m["content"] for m in got) == sorted(f"valid after {k}/{c}" for k, _, c in CASES)
        assert all(m["from"] == "alice" for m in got)
    finally:
        bob.kill()


def test_someone_elses_cursor_is_unknown_and_deletes_nothing(shared_server, alice):
    from backend.client import IMClient
    from conftest import PASSWORDS
    alice.send("bob", "for bob only").wait(10)
    bob = IMClient("bob", PASSWORDS["bob"], port=shared_server.port, auto_sync=False).connect()
    carol = IMClient("carol", PASSWORDS["carol"], port=shared_server.port, auto_sync=False).connect()
    try:
        page = bob.pull(limit=10)
        assert page["cursor"]
        stolen = carol.pull(ack=page["cursor"])
        assert stolen["kind"] == "error" and stolen["code"] == "unknown_cursor" and stolen["req_id"]
        assert bob.count()["total"] == len(page["messages"]) >= 1
    finally:
        bob.kill()
        carol.kill()
