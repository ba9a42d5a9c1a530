"""Who may use which topic: the protocol's "who may use it" column as one pure function.

The embedded broker's topic plugin calls :func:`may`; Mosquitto gets the same
rules from broker_config/acl (pattern lines with %u).
"""

from __future__ import annotations

from . import protocol as p

PUBLISH, SUBSCRIBE, RECEIVE = "publish", "subscribe", "receive"


def session_key(uid: str, client_id: str) -> str:
    """The embedded broker's key for a user's session: ``uid:client_id``.

    Any client id is accepted; scoping it by the user means no one can take over or clear
    another user's session, whatever id they pick (':' never appears in a uid, so the key
    names its user unambiguously; the worker's ids start with '!', which no uid does).
    """
    return f"{uid}:{client_id}"


def may(username: str | None, worker_username: str, action: str, topic: str, presence: str = "all") -> bool:
    """``presence``: "all" lets every user see every status (a buddy list); "self" only their own."""
    if not username:
        return False
    if username == worker_username:
        return _worker_may(action, topic)
    if not p.valid_uid(username):
        return False
    uid = username
    parsed = p.parse_topic(topic)
    own = parsed is not None and parsed.uid == uid
    if action == PUBLISH:
        # Its own send/ack/req and status, on the v1 topics and on any of its devices' topics.
        return own and parsed.kind in ("send", "ack", "req", "status")
    if own and parsed.kind in ("inbox", "reply", "status"):
        return action in (SUBSCRIBE, RECEIVE)
    if action == SUBSCRIBE and topic in (f"{p.PREFIX}/u/{uid}/d/+/inbox", f"{p.PREFIX}/u/{uid}/d/+/reply",
                                         f"{p.PREFIX}/status/{uid}/+"):
        return True  # its own devices' topics, with a wildcard for the device
    if presence != "all":
        return False
    if action == SUBSCRIBE and topic in (f"{p.PREFIX}/status/+", f"{p.PREFIX}/status/+/+"):
        return True
    if action == SUBSCRIBE and topic.startswith(f"{p.PREFIX}/status/") and topic.endswith("/+"):
        return p.valid_uid(topic[len(p.PREFIX) + 8:-2])  # one user's devices: im/status/{uid}/+
    return parsed is not None and parsed.kind == "status" and action in (SUBSCRIBE, RECEIVE)


def _worker_may(action: str, topic: str) -> bool:
    if action == SUBSCRIBE:
        return topic in p.WORKER_SUBSCRIPTIONS or topic == p.WORKER_TOPIC_FILTER
    if topic.startswith(p.WORKER_TOPIC_FILTER[:-1]) and topic.count("/") == 2:
        return action in (PUBLISH, RECEIVE)  # the workers' "gone" signal (its will)
    parsed = p.parse_topic(topic)
    if parsed is None:
        return False
    if action == PUBLISH:
        # Pushes and answers to every device; the derived user status (retained) on im/status/{uid} only.
        return parsed.kind in ("inbox", "reply") or (parsed.kind == "status" and not parsed.device)
    return parsed.kind in ("send", "ack", "req", "status")  # RECEIVE
