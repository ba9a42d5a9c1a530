"""Password hashing and the ACL function (pure logic)."""

from backend import accounts, acl
from backend import protocol as p

W = accounts.WORKER_USERNAME


def test_hash_is_salted_and_verifies():
    h1, h2 = accounts.hash_password("secret"), accounts.hash_password("secret")
    assert h1 != h2 and h1.startswith("scrypt$") and "secret" not in h1
    assert accounts.verify_password("secret", h1)
    assert not accounts.verify_password("Secret", h1)
    assert not accounts.verify_password("secret", "garbage")


def test_users_act_only_as_themselves():
    for t in (p.send_topic("alice"), p.ack_topic("alice"), p.req_topic("alice"), p.status_topic("alice")):
        assert acl.may("alice", W, acl.PUBLISH, t)
        assert not acl.may("bob", W, acl.PUBLISH, t)
    for t in (p.inbox_topic("alice"), p.reply_topic("alice")):
        assert acl.may("alice", W, acl.SUBSCRIBE, t) and acl.may("alice", W, acl.RECEIVE, t)
        assert not acl.may("bob", W, acl.SUBSCRIBE, t) and not acl.may("bob", W, acl.RECEIVE, t)
        assert not acl.may("alice", W, acl.PUBLISH, t)
    for f in ("im/u/+/inbox", "im/#", "#", "$SYS/#", "im/u/alice/#", "im/u/+/send"):
        assert not acl.may("alice", W, acl.SUBSCRIBE, f)
    assert acl.may("alice", W, acl.SUBSCRIBE, "im/status/+")
    assert acl.may("alice", W, acl.RECEIVE, p.status_topic("bob"))
    assert not acl.may(None, W, acl.SUBSCRIBE, "im/status/+")


def test_worker_has_what_it_needs_and_no_more():
    for f in p.WORKER_SUBSCRIPTIONS:
        assert acl.may(W, W, acl.SUBSCRIBE, f)
    assert not acl.may(W, W, acl.SUBSCRIBE, "#")
    assert acl.may(W, W, acl.PUBLISH, p.inbox_topic("bob")) and acl.may(W, W, acl.PUBLISH, p.reply_topic("bob"))
    assert not acl.may(W, W, acl.PUBLISH, p.send_topic("bob"))
    # The user status derived from a user's devices (docs/PROTOCOL.md, "Devices"); never a device's own.
    assert acl.may(W, W, acl.PUBLISH, p.status_topic("bob"))
    assert not acl.may(W, W, acl.PUBLISH, p.status_topic("bob", "phone"))
    assert acl.may(W, W, acl.PUBLISH, p.inbox_topic("bob", "phone")) and acl.may(W, W, acl.PUBLISH, p.reply_topic("bob", "phone"))
    assert not acl.may(W, W, acl.PUBLISH, p.send_topic("bob", "phone"))
    for kind in ("send", "ack", "req", "status"):
        assert acl.may(W, W, acl.RECEIVE, getattr(p, f"{kind}_topic")("bob", "phone"))


def test_device_topics_are_their_users_own():
    for f in (p.send_topic, p.ack_topic, p.req_topic, p.status_topic):
        assert acl.may("alice", W, acl.PUBLISH, f("alice", "laptop"))
        assert not acl.may("bob", W, acl.PUBLISH, f("alice", "laptop"))
    for f in (p.inbox_topic, p.reply_topic):
        t = f("alice", "phone")
        assert acl.may("alice", W, acl.SUBSCRIBE, t) and acl.may("alice", W, acl.RECEIVE, t)
        assert not acl.may("bob", W, acl.SUBSCRIBE, t) and not acl.may("bob", W, acl.RECEIVE, t)
        assert not acl.may("alice", W, acl.PUBLISH, t)
    for f in ("im/u/alice/d/+/inbox", "im/u/alice/d/+/reply"):
        assert acl.may("alice", W, acl.SUBSCRIBE, f) and not acl.may("bob", W, acl.SUBSCRIBE, f)
    assert acl.may("alice", W, acl.SUBSCRIBE, "im/status/alice/+", presence="self")
    assert not acl.may("bob", W, acl.SUBSCRIBE, "im/status/alice/+", presence="self")
    for f in ("im/u/+/d/+/inbox", "im/u/alice/d/#", "im/u/alice/d/+/send", "im/u/alice/d/a.b/inbox"):
        assert not acl.may("alice", W, acl.SUBSCRIBE, f)
    assert not acl.may("alice", W, acl.PUBLISH, "im/u/alice/d/a.b/send"), "not a device id"
    assert acl.may("alice", W, acl.SUBSCRIBE, "im/status/+/+") and acl.may("alice", W, acl.RECEIVE, "im/status/bob/x")
    assert acl.may("alice", W, acl.SUBSCRIBE, "im/status/bob/+"), "one buddy's devices"
    assert not acl.may("alice", W, acl.SUBSCRIBE, "im/status/bob/+", presence="self")
    assert not acl.may("alice", W, acl.SUBSCRIBE, "im/status/b+b/+") and not acl.may("alice", W, acl.SUBSCRIBE, "im/status/#/+")
    assert not acl.may("alice", W, acl.RECEIVE, "im/status/bob/x", presence="self")
    assert acl.may("alice", W, acl.RECEIVE, "im/status/alice/x", presence="self")


def test_session_keys_are_scoped_by_user():
    """Any client id is accepted on the embedded broker; the session key keeps users apart."""
    keys = {acl.session_key(uid, cid) for uid in ("alice", "bob", "al") for cid in ("alice", "bob", "ice:bob", "", "!w")}
    assert len(keys) == 15, "no two (user, client id) pairs share a session"
    assert acl.session_key("bob", "alice").startswith("bob:") and not any(k.startswith("!") for k in keys)


def test_presence_visibility_self():
    assert not acl.may("alice", W, acl.SUBSCRIBE, "im/status/+", presence="self")
    assert not acl.may("alice", W, acl.RECEIVE, p.status_topic("bob"), presence="self")
    assert acl.may("alice", W, acl.SUBSCRIBE, p.status_topic("alice"), presence="self")
    assert acl.may(W, W, acl.RECEIVE, p.status_topic("bob"), presence="self"), "the worker still sees all"
