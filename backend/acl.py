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
    if action == PUBLISH:
        return topic in (p.send_topic(uid), p.ack_topic(uid), p.req_topic(uid), p.status_topic(uid))
    if topic in (p.inbox_topic(uid), p.reply_topic(uid), p.status_topic(uid)):
        return action in (SUBSCRIBE, RECEIVE)
    if presence != "all":
        return False
    if action == SUBSCRIBE and topic == f"{p.PREFIX}/status/+":
        return True
    parsed = p.parse_topic(topic)
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
        return parsed.kind in ("inbox", "reply")
    return parsed.kind in ("send", "ack", "req", "status")  # RECEIVE
