"""Hostile payloads for the protocol decoder: a hypothesis strategy (fuzzing) and a seeded generator
(end to end), plus the oracle that says which error each one must get."""

from __future__ import annotations

import json
import random

from hypothesis import strategies as st

from backend import protocol as p

VALID = {
    "send": {"msg_id": "m1", "to": "bob", "type": "text", "content": "hi", "ts": 1},
    "ack": {"seqs": [1, 2]},
    "req": {"req_id": "r1", "op": "pull", "limit": 10},
}
FIELDS = {"send": ["msg_id", "to", "type", "content", "ts"], "ack": ["seqs"],
          "req": ["req_id", "op", "limit", "from", "ack", "order"]}

json_scalars = st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70) | \
    st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=80)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=5) |
                           st.dictionaries(st.text(max_size=10), inner, max_size=5), max_leaves=20)


@st.composite
def hostile_payloads(draw, kind: str) -> tuple[str, bytes]:
    how = draw(st.integers(0, 6))
    if how == 0:
        return kind, draw(st.binary(max_size=300))
    if how == 1:
        return kind, json.dumps(draw(json_values)).encode()
    obj = dict(VALID[kind])
    if how == 2:  # one field replaced by anything
        obj[draw(st.sampled_from(FIELDS[kind]))] = draw(json_values)
    elif how == 3:  # one field missing
        obj.pop(draw(st.sampled_from(FIELDS[kind])), None)
    elif how == 4:  # truncated text
        text = json.dumps(obj).encode()
        return kind, text[:draw(st.integers(0, len(text)))]
    elif how == 5:  # unknown extra fields and odd unicode
        obj[draw(st.text(max_size=5))] = draw(st.text(max_size=50))
        obj[draw(st.sampled_from(FIELDS[kind]))] = draw(st.text(alphabet=st.characters(), max_size=120))
    else:  # deep nesting or a big string
        depth = draw(st.integers(1, 3000))
        return kind, (b"[" * depth + b"]" * draw(st.integers(0, depth)))
    return kind, json.dumps(obj, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")


def hostile_batch(n: int, seed: int) -> list[tuple[str, bytes]]:
    """n hostile payloads, reproducibly (for the end-to-end run, outside hypothesis's engine)."""
    rng = random.Random(seed)
    out = []
    junk = [None, True, 0, -1, 1.5, 2**64, "", "x" * 80, [], {}, [1, "a"], {"a": 1}, "bad uid!", "\ud800"]
    for i in range(n):
        kind = rng.choice(sorted(VALID))
        obj = dict(VALID[kind])
        how = rng.randrange(6)
        if how == 0:
            out.append((kind, rng.randbytes(rng.randrange(0, 200))))
            continue
        if how == 1:
            obj[rng.choice(FIELDS[kind])] = rng.choice(junk)
        elif how == 2:
            obj.pop(rng.choice(FIELDS[kind]), None)
        elif how == 3:
            text = json.dumps(obj).encode()
            out.append((kind, text[:rng.randrange(len(text))]))
            continue
        elif how == 4:
            out.append((kind, b"[" * rng.randrange(1, 2000)))
            continue
        else:
            obj[rng.choice(FIELDS[kind])] = "".join(chr(rng.randrange(1, 0x2FFFF)) for _ in range(rng.randrange(60)))
        if kind == "send":
            obj["msg_id"] = obj.get("msg_id") if not isinstance(obj.get("msg_id"), str) else f"h{i}"
        out.append((kind, json.dumps(obj).encode("utf-8", "surrogatepass")))
    return out


def decoder_error(kind: str, payload: bytes) -> str | None:
    """The error code the decoder itself gives (None: the payload decodes)."""
    parse = {"send": p.parse_send, "ack": p.parse_ack, "req": p.parse_request}[kind]
    try:
        parse(payload)
    except p.ProtocolError as e:
        return e.code
    return None


def expected_error(kind: str, payload: bytes, known_users: set[str] | None = None) -> str | None:
    """The error code the server must answer with (decoder or store), or None for a payload that is valid."""
    try:
        if kind == "send":
            m = p.parse_send(payload)
            if known_users is not None and m.to not in known_users:
                return "unknown_receiver"
        elif kind == "ack":
            p.parse_ack(payload)
        else:
            r = p.parse_request(payload)
            if isinstance(r, p.PullRequest) and r.ack is not None:
                return "unknown_cursor"  # no cursor was ever issued to this user
    except p.ProtocolError as e:
        return e.code
    return None
