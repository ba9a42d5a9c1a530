"""Wire protocol v1: topics, limits, the JSON codec and payload validation.

Everything here is pure: it turns topic strings and payload bytes into typed
requests (plain dataclasses) or raises :class:`ProtocolError` with the
snake_case code that goes back to the sender on its reply topic.  The field
names are a public contract (docs/PROTOCOL.md): fields may be added, never
renamed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import orjson

PREFIX = "im"

# --- limits (each a default with its reason) --------------------------------
# The articles' offline table uses varchar(50) for uids; we keep that bound.
UID_MAX = 50
# The articles' offline table uses varchar(70) for msg_id (room for a UUID and a prefix).
MSG_ID_MAX = 70
# A request id only has to be unique among a client's outstanding requests; 64 fits a UUID twice.
REQ_ID_MAX = 64
# 64 KiB of content: WhatsApp caps a text at 65,536 characters; larger media go by URL.
CONTENT_MAX = 64 * 1024
# A message type is a short label ("text", "image"...); 32 bytes is plenty and keeps rows small.
TYPE_MAX = 32
# Whole payload a client sends, checked before parsing: JSON may escape every content byte as \uXXXX
# (6 bytes), plus 4 KiB of envelope. (What the server sends has its own bound, REPLY_PAYLOAD_MAX.)
PAYLOAD_MAX = 6 * CONTENT_MAX + 4 * 1024
# Every payload the server sends (a page, a count) is at most 1 MiB: under the embedded broker's 2 MiB
# packet limit and the message_size_limit broker_config/ gives Mosquitto, with room for MQTT's header.
# A page is cut by bytes as well as by count; one message (64 KiB of content escaped at worst, ~400 KB)
# always fits, so a page always holds at least one.
REPLY_PAYLOAD_MAX = 1024 * 1024
# What a page's envelope may take beside its messages: kind, a req_id escaped at worst (6 x 64 bytes),
# the cursor and `more`, with room to spare.
PAGE_ENVELOPE_MAX = 1024
# An ack carries at most one page's worth of seqs (a page is at most PULL_LIMIT_MAX messages),
# plus slack for batched acks of pushes.
ACK_SEQS_MAX = 1000
# Default and largest page: 100 keeps a typical page well under 1 MiB; 500 short chat messages make
# about 75 KB. A page of large messages is cut earlier, at REPLY_PAYLOAD_MAX bytes (docs/PROTOCOL.md).
PULL_LIMIT_DEFAULT = 100
PULL_LIMIT_MAX = 500
# A cursor is a token we issued (32 hex chars now); anything longer, or outside this alphabet, is not ours.
CURSOR_MAX = 64
CURSOR_RE = re.compile(r"^[A-Za-z0-9_-]{1,%d}$" % CURSOR_MAX)
# A count's preview of each sender's newest message: enough characters for a conversation list line.
PREVIEW_CHARS = 100
PULL_ORDERS = ("oldest", "newest")
# How a sender wants its receipts: "each" (v1's default, one `receipt` payload per message) or
# "batch" (a sender's receipts gathered for up to 10 ms into one `receipts` payload; docs/PROTOCOL.md 4.4).
RECEIPT_MODES = ("each", "batch")

UID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,%d}$" % UID_MAX)
# A device id: 1-32 characters, no '.' (NATS and RabbitMQ rewrite it inside topic levels); 32 holds a
# UUID's hex. The default device (a v1 client on the v1 topics) is "", which is never a valid DEV.
DEVICE_MAX = 32
DEVICE_RE = re.compile(r"^[A-Za-z0-9_-]{1,%d}$" % DEVICE_MAX)
# A push endpoint is an HTTPS URL of the app's push gateway; 2 KiB is the practical URL limit of browsers.
PUSH_ENDPOINT_MAX = 2048
PULL_SCOPES = ("device", "user")

CLIENT_TOPICS = ("send", "ack", "req")
# Conversations (docs/PROTOCOL.md section 15): typing notices, read markers, the read-receipt setting.
CONVERSATION_OPS = ("typing", "read", "settings")
TYPING_STATES = ("typing", "stopped")
REQUEST_OPS = ("count", "pull", "devices", "remove_device", "push_register", "push_unregister", "history",
               "conversations")
# A history page (op history, --history-days): as many messages as a pull's default page, at most a pull's most.
HISTORY_LIMIT_DEFAULT = 50
# A page of the conversation list (op conversations, --history-days): as history's page. An entry is about 100
# bytes, under 1 KB at worst (a 100-character group name, escaped), so the most, 500, stays under REPLY_PAYLOAD_MAX.
CONVERSATIONS_LIMIT_DEFAULT = 50
# Group requests (docs/PROTOCOL.md section 14), answered with a `group` or `groups` payload.
GROUP_OPS = ("group_create", "group_add", "group_remove", "group_leave", "group_rename", "group_role", "groups",
             "group_members", "group_receipts")
# A group id: as a device id (1-32 characters, no '.', which NATS and RabbitMQ rewrite); the creator chooses it.
GROUP_MAX = 32
GROUP_RE = DEVICE_RE
# A group's name: a label for people, 100 bytes (WhatsApp allows 100 characters).
GROUP_NAME_MAX = 100
# Members named in one request: the default member cap (--max-group-members), so a group can be filled at once.
GROUP_REQUEST_MEMBERS_MAX = 1000
GROUP_EVENT_TYPE = "group_event"  # a membership change's message type: the server's alone in a group
GROUP_ROLES = ("admin", "member")  # what group_role may set; "owner" passes only by the owner leaving


# --- topics -----------------------------------------------------------------
# Each takes the device: "" (the default device) gives the v1 topic, any other the device's own
# topic under the user's prefix (im/u/{uid}/d/{dev}/..., im/status/{uid}/{dev}).
def _client_topic(uid: str, device: str, kind: str) -> str:
    return f"{PREFIX}/u/{uid}/d/{device}/{kind}" if device else f"{PREFIX}/u/{uid}/{kind}"


def send_topic(uid: str, device: str = "") -> str:
    return _client_topic(uid, device, "send")


def ack_topic(uid: str, device: str = "") -> str:
    return _client_topic(uid, device, "ack")


def req_topic(uid: str, device: str = "") -> str:
    return _client_topic(uid, device, "req")


def inbox_topic(uid: str, device: str = "") -> str:
    return _client_topic(uid, device, "inbox")


def reply_topic(uid: str, device: str = "") -> str:
    return _client_topic(uid, device, "reply")


def status_topic(uid: str, device: str = "") -> str:
    return f"{PREFIX}/status/{uid}/{device}" if device else f"{PREFIX}/status/{uid}"


# What the worker subscribes to (beside any broker): v1 topics and the device topics.
WORKER_SUBSCRIPTIONS = tuple(f"{PREFIX}/u/+/{kind}" for kind in CLIENT_TOPICS) + \
    tuple(f"{PREFIX}/u/+/d/+/{kind}" for kind in CLIENT_TOPICS) + (f"{PREFIX}/status/+", f"{PREFIX}/status/+/+")

# Workers' lifecycle: a worker's last will (and its polite stop) publishes WORKER_GONE on
# im/worker/<client id>. Pushes it was retransmitting and acks in flight to it (its session is clean)
# die with it, so the other workers re-announce to the receivers they count online.
WORKER_TOPIC_FILTER = f"{PREFIX}/worker/+"
WORKER_GONE = b"gone"


def worker_topic(client_id: str) -> str:
    """im/worker/<client id>, with MQTT's special characters in the id replaced (a topic level holds no / + #),
    and '.' and ' ' too: NATS refuses a CONNECT whose will topic holds them (the default client id has the host
    name, often with dots)."""
    return f"{PREFIX}/worker/" + re.sub(r"[/+#. ]", "_", client_id or "-")


ONLINE = "online"
OFFLINE = "offline"


def valid_uid(uid: Any) -> bool:
    return isinstance(uid, str) and UID_RE.match(uid) is not None


def valid_device(device: Any) -> bool:
    """A device-aware device's id (the default device "" is not one)."""
    return isinstance(device, str) and DEVICE_RE.match(device) is not None


@dataclass(frozen=True)
class Topic:
    """A parsed protocol topic: ``kind`` is send/ack/req/inbox/reply/status; ``device`` is "" on the
    v1 topics (the user's default device)."""

    kind: str
    uid: str
    device: str = ""


_KINDS = CLIENT_TOPICS + ("inbox", "reply")


def parse_topic(topic: str) -> Topic | None:
    """Return the topic's kind, uid and device, or None when it is not a protocol topic or its uid or
    device is invalid."""
    parts = topic.split("/")
    n = len(parts)
    if n < 3 or parts[0] != PREFIX:
        return None
    device, with_device = "", False
    if parts[1] == "u" and n == 4 and parts[3] in _KINDS:
        uid, kind = parts[2], parts[3]
    elif parts[1] == "u" and n == 6 and parts[3] == "d" and parts[5] in _KINDS:
        uid, device, kind, with_device = parts[2], parts[4], parts[5], True
    elif parts[1] == "status" and n in (3, 4):
        uid, kind = parts[2], "status"
        if n == 4:
            device, with_device = parts[3], True
    else:
        return None
    if not valid_uid(uid) or (with_device and not valid_device(device)):
        return None
    return Topic(kind=kind, uid=uid, device=device)


# --- errors -----------------------------------------------------------------
class ProtocolError(Exception):
    """A payload we refuse; ``code`` is the stable, machine-readable part."""

    def __init__(self, code: str, message: str, *, msg_id: str | None = None, req_id: str | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.msg_id = msg_id
        self.req_id = req_id

    def to_wire(self) -> dict[str, Any]:
        return error_payload(self.code, self.message, msg_id=self.msg_id, req_id=self.req_id)


def error_payload(code: str, message: str, *, msg_id: str | None = None, req_id: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"kind": "error", "code": code, "message": message}
    if msg_id is not None:
        out["msg_id"] = msg_id
    if req_id is not None:
        out["req_id"] = req_id
    return out


# --- codec ------------------------------------------------------------------
# orjson does the common case (about 10 times faster than json on a 500-message page); the stdlib
# json module decides every payload orjson refuses, so what is accepted and each error code stay
# exactly as the stdlib would have them (it also takes lone-surrogate escapes, which validation then
# refuses field by field with a precise code).
def encode(obj: dict[str, Any]) -> bytes:
    """Compact UTF-8 JSON (non-ASCII kept as is: sizes are counted in UTF-8 bytes)."""
    try:
        return orjson.dumps(obj)
    except TypeError:  # an integer beyond 64 bits (the stdlib writes it), or a lone surrogate (it raises too)
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _decode_stdlib(payload: bytes) -> Any:
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("bad_json", "payload is not UTF-8") from None
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        raise ProtocolError("bad_json", "payload is not valid JSON") from None


def decode_object(payload: bytes, max_bytes: int = PAYLOAD_MAX) -> dict[str, Any]:
    """Parse a payload into a JSON object or raise ProtocolError. ``max_bytes``: PAYLOAD_MAX for what
    clients send; a client reading the server's payloads passes its own, larger bound."""
    if len(payload) > max_bytes:
        raise ProtocolError("payload_too_large", f"payload is {len(payload)} bytes; the limit is {max_bytes}")
    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError as e:
        if e.msg.startswith("depth limit"):
            # Nested deeper than orjson's 1,024 levels: no protocol payload comes close, and the stdlib would
            # answer by how deep the caller's stack already is (RecursionError or not): always bad_json.
            raise ProtocolError("bad_json", "payload is nested too deeply") from None
        obj = _decode_stdlib(payload)
    if not isinstance(obj, dict):
        raise ProtocolError("not_an_object", "payload must be a JSON object")
    return obj


def _utf8_len(s: str) -> int:
    try:
        return len(s.encode("utf-8"))
    except UnicodeEncodeError:  # lone surrogates from \ud800 escapes
        return -1


def _string(obj: dict[str, Any], field: str, max_bytes: int, *, required: bool = True, default: str | None = None,
            **ids: str | None) -> str | None:
    if field not in obj or obj[field] is None and not required:
        if required:
            raise ProtocolError("missing_field", f"'{field}' is required", **ids)
        return default
    value = obj[field]
    if not isinstance(value, str):
        raise ProtocolError("bad_field", f"'{field}' must be a string", **ids)
    size = _utf8_len(value)
    if size < 0:
        raise ProtocolError("bad_field", f"'{field}' is not valid Unicode", **ids)
    if size > max_bytes:
        raise ProtocolError("too_long", f"'{field}' is {size} bytes; the limit is {max_bytes}", **ids)
    return value


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# --- client -> server payloads ----------------------------------------------
@dataclass(frozen=True)
class Send:
    msg_id: str
    to: str  # the receiver's uid, or the group id when ``group`` is set
    type: str
    content: str
    ts: int | None
    batch_receipts: bool = False  # "receipts": "batch"
    group: str | None = None  # a message to a group (its members), instead of to one user


@dataclass(frozen=True)
class Ack:
    seqs: tuple[int, ...]


@dataclass(frozen=True)
class CountRequest:
    req_id: str


@dataclass(frozen=True)
class PullRequest:
    req_id: str
    limit: int
    from_uid: str | None
    ack: str | None
    order: str = "oldest"
    scope: str = "device"  # "user": read-only pages of what waits for any of the user's devices
    after: int = 0  # scope "user": the cursor is the last seq seen (nothing is acked)


@dataclass(frozen=True)
class DevicesRequest:
    req_id: str


@dataclass(frozen=True)
class RemoveDeviceRequest:
    req_id: str
    device: str  # "" names the default device (the v1 topics)


@dataclass(frozen=True)
class PushRequest:
    req_id: str
    endpoint: str | None  # None: push_unregister


def push_endpoint_problem(url: Any) -> str | None:
    """None if ``url`` may be a push endpoint, else one line saying why not. backend.push decides when it
    is present (its rules: https, no credentials, no link-local or reserved hosts...)."""
    try:
        from .push import valid_endpoint
    except ImportError:  # a build without the push sender: the plain rule
        valid_endpoint = None
    if valid_endpoint is not None:
        return valid_endpoint(url)
    if not isinstance(url, str) or not 0 < len(url) <= PUSH_ENDPOINT_MAX:
        return f"push endpoint must be a string of 1-{PUSH_ENDPOINT_MAX} characters"
    if not url.startswith("https://") or len(url) == len("https://") or any(c.isspace() for c in url):
        return "push endpoint must be an https:// URL"
    return None


def _conversation_target(obj: dict[str, Any], user_field: str, ids: dict[str, str | None]) -> tuple[str, bool]:
    """The conversation a payload names: ``user_field`` (``to``, ``with``: a uid) or ``group`` (a group id), not
    both. Returns (the uid or group id, whether it is a group)."""
    group = obj.get("group")
    if group is not None:
        if user_field in obj:
            raise ProtocolError("bad_field", f"give '{user_field}' (a user) or 'group', not both", **ids)
        if not valid_group(group):
            raise ProtocolError("bad_group", "'group' must be 1-32 characters of A-Z a-z 0-9 _ -", **ids)
        return group, True
    if user_field not in obj:
        raise ProtocolError("missing_field", f"'{user_field}' (or 'group') is required", **ids)
    target = obj[user_field]
    if not isinstance(target, str):
        raise ProtocolError("bad_field", f"'{user_field}' must be a string", **ids)
    if not valid_uid(target):
        raise ProtocolError("bad_uid", f"'{user_field}' must be 1-50 characters of A-Z a-z 0-9 _ . -", **ids)
    return target, False


def parse_send(payload: bytes, content_max: int = CONTENT_MAX) -> Send:
    obj = decode_object(payload)
    raw_id = obj.get("msg_id")
    msg_id = raw_id if isinstance(raw_id, str) and 0 < _utf8_len(raw_id) <= MSG_ID_MAX else None
    ids = {"msg_id": msg_id}
    if "msg_id" not in obj:
        raise ProtocolError("missing_field", "'msg_id' is required")
    if not isinstance(raw_id, str) or not raw_id:
        raise ProtocolError("bad_field", "'msg_id' must be a non-empty string")
    if _utf8_len(raw_id) < 0:
        raise ProtocolError("bad_field", "'msg_id' is not valid Unicode")
    if _utf8_len(raw_id) > MSG_ID_MAX:
        raise ProtocolError("too_long", f"'msg_id' must be at most {MSG_ID_MAX} bytes")
    to, is_group = _conversation_target(obj, "to", ids)
    group = to if is_group else None
    msg_type = _string(obj, "type", TYPE_MAX, required=False, default="text", **ids)
    if not msg_type:
        raise ProtocolError("bad_field", "'type' must not be empty", **ids)
    if "content" not in obj:
        raise ProtocolError("missing_field", "'content' is required", **ids)
    content = obj["content"]
    if not isinstance(content, str):
        raise ProtocolError("bad_field", "'content' must be a string", **ids)
    size = _utf8_len(content)
    if size < 0:
        raise ProtocolError("bad_field", "'content' is not valid Unicode", **ids)
    if size > content_max:
        raise ProtocolError("content_too_large", f"content is {size} bytes; the limit is {content_max}", **ids)
    ts = obj.get("ts")
    if ts is not None and not (_int(ts) and 0 <= ts < 2**53):
        raise ProtocolError("bad_field", "'ts' must be integer milliseconds since the epoch", **ids)
    mode = obj.get("receipts")
    if mode is not None and mode not in RECEIPT_MODES:
        raise ProtocolError("bad_field", "'receipts' must be \"each\" or \"batch\"", **ids)
    if group is not None and msg_type == GROUP_EVENT_TYPE:
        raise ProtocolError("bad_field", f"'type' {GROUP_EVENT_TYPE!r} is the server's own (membership changes)", **ids)
    return Send(msg_id=msg_id, to=to, type=msg_type, content=content, ts=ts, batch_receipts=mode == "batch",
                group=group)


def parse_ack(payload: bytes) -> Ack:
    obj = decode_object(payload)
    if "seqs" not in obj:
        raise ProtocolError("missing_field", "'seqs' is required")
    seqs = obj["seqs"]
    if not isinstance(seqs, list) or not all(_int(s) and 0 < s < 2**63 for s in seqs):
        raise ProtocolError("bad_field", "'seqs' must be a list of positive integers")
    if len(seqs) > ACK_SEQS_MAX:
        raise ProtocolError("too_many", f"at most {ACK_SEQS_MAX} seqs per ack")
    return Ack(seqs=tuple(dict.fromkeys(seqs)))


def parse_request(payload: bytes) -> (CountRequest | PullRequest | DevicesRequest | RemoveDeviceRequest | PushRequest
                                      | GroupRequest | TypingRequest | ReadRequest | SettingsRequest):
    obj = decode_object(payload)
    if obj.get("op") == "typing":
        return parse_typing(obj)  # no answer, so no req_id needed (one given is echoed in an error)
    raw = obj.get("req_id")
    req_id = raw if isinstance(raw, str) and 0 < _utf8_len(raw) <= REQ_ID_MAX else None
    if "req_id" not in obj:
        raise ProtocolError("missing_field", "'req_id' is required")
    if not isinstance(raw, str) or not raw:
        raise ProtocolError("bad_field", "'req_id' must be a non-empty string")
    if _utf8_len(raw) < 0:
        raise ProtocolError("bad_field", "'req_id' is not valid Unicode")
    if req_id is None:
        raise ProtocolError("too_long", f"'req_id' must be at most {REQ_ID_MAX} bytes")
    ids = {"req_id": req_id}
    op = obj.get("op")
    if op is None:
        raise ProtocolError("missing_field", "'op' is required", **ids)
    if op in GROUP_OPS:
        return parse_group_request(op, obj, req_id)
    if op in CONVERSATION_OPS:
        return parse_conversation(op, obj, req_id)
    if op not in REQUEST_OPS:
        raise ProtocolError("unknown_op", f"'op' must be one of "
                            f"{', '.join(REQUEST_OPS + GROUP_OPS + CONVERSATION_OPS)}", **ids)
    if op == "count":
        return CountRequest(req_id=req_id)
    if op == "devices":
        return DevicesRequest(req_id=req_id)
    if op == "remove_device":
        device = obj.get("device")
        if not isinstance(device, str) or not (device == "" or valid_device(device)):
            raise ProtocolError("bad_field", "'device' must be a device id (1-32 characters of A-Z a-z 0-9 _ -) "
                                "or \"\" for the default device", **ids)
        return RemoveDeviceRequest(req_id=req_id, device=device)
    if op == "history":
        return parse_history(obj, req_id)
    if op == "conversations":
        return parse_conversations(obj, req_id)
    if op == "push_unregister":
        return PushRequest(req_id=req_id, endpoint=None)
    if op == "push_register":
        endpoint = obj.get("endpoint")
        if endpoint is None:
            raise ProtocolError("missing_field", "'endpoint' is required", **ids)
        problem = push_endpoint_problem(endpoint)
        if problem is not None:
            raise ProtocolError("bad_endpoint", problem, **ids)
        return PushRequest(req_id=req_id, endpoint=endpoint)
    limit = obj.get("limit", PULL_LIMIT_DEFAULT)
    if not _int(limit) or not 1 <= limit <= PULL_LIMIT_MAX:
        raise ProtocolError("bad_limit", f"'limit' must be an integer from 1 to {PULL_LIMIT_MAX}", **ids)
    from_uid = obj.get("from")
    if from_uid is not None and not valid_uid(from_uid):
        raise ProtocolError("bad_uid", "'from' must be a valid uid", **ids)
    ack = obj.get("ack")
    if ack is not None and (not isinstance(ack, str) or not CURSOR_RE.match(ack)):
        raise ProtocolError("unknown_cursor", "'ack' is not a cursor this server issued", **ids)
    order = obj.get("order") or "oldest"  # null means absent, as for the other optional fields
    if order not in PULL_ORDERS:
        raise ProtocolError("bad_field", "'order' must be \"oldest\" or \"newest\"", **ids)
    scope = obj.get("scope") or "device"
    if scope not in PULL_SCOPES:
        raise ProtocolError("bad_field", "'scope' must be \"device\" or \"user\"", **ids)
    after = obj.get("after", 0)
    if after is None:
        after = 0
    if not (_int(after) and 0 <= after < 2**63):
        raise ProtocolError("bad_field", "'after' must be a seq (a non-negative integer)", **ids)
    if scope == "user" and ack is not None:
        raise ProtocolError("bad_field", "a pull with \"scope\": \"user\" is read-only: it takes 'after', not 'ack'",
                            **ids)
    return PullRequest(req_id=req_id, limit=limit, from_uid=from_uid, ack=ack, order=order, scope=scope, after=after)


@dataclass(frozen=True)
class TypingRequest:
    """{"op": "typing", "to": uid[, "state": "typing"|"stopped"]}: relayed, never stored, never answered."""

    to: str
    state: str = "typing"
    req_id: str | None = None  # optional: echoed in an error only
    group: bool = False  # ``to`` is a group id ({"op": "typing", "group": gid}): its online members' devices


@dataclass(frozen=True)
class ReadRequest:
    """{"op": "read", "req_id", "with": uid, "seq": S}: the messages from ``peer`` with seq <= S are read;
    {"op": "read", "req_id", "group": gid, "seq": S}: the group's messages with seq <= S (``kind`` "g")."""

    req_id: str
    peer: str
    seq: int
    kind: str = "u"


@dataclass(frozen=True)
class SettingsRequest:
    """{"op": "settings", "req_id"[, "read_receipts": bool]}: None reads the settings without changing them."""

    req_id: str
    read_receipts: bool | None = None


def parse_typing(obj: dict[str, Any]) -> TypingRequest:
    raw = obj.get("req_id")
    req_id = raw if isinstance(raw, str) and 0 < _utf8_len(raw) <= REQ_ID_MAX else None
    ids = {"req_id": req_id}
    to, is_group = _conversation_target(obj, "to", ids)
    state = obj.get("state") or "typing"  # null means absent
    if state not in TYPING_STATES:
        raise ProtocolError("bad_field", "'state' must be \"typing\" or \"stopped\"", **ids)
    return TypingRequest(to=to, state=state, req_id=req_id, group=is_group)


def parse_conversation(op: str, obj: dict[str, Any], req_id: str) -> ReadRequest | SettingsRequest:
    """The `read` and `settings` requests (``req_id`` already checked)."""
    ids = {"req_id": req_id}
    if op == "settings":
        value = obj.get("read_receipts")
        if value is not None and not isinstance(value, bool):
            raise ProtocolError("bad_field", "'read_receipts' must be true or false", **ids)
        return SettingsRequest(req_id=req_id, read_receipts=value)
    peer, is_group = _conversation_target(obj, "with", ids)
    kind = "g" if is_group else "u"
    if "seq" not in obj:
        raise ProtocolError("missing_field", "'seq' is required", **ids)
    seq = obj["seq"]
    if not (_int(seq) and 0 <= seq < 2**63):
        raise ProtocolError("bad_field", "'seq' must be a seq (a non-negative integer)", **ids)
    return ReadRequest(req_id=req_id, peer=peer, seq=seq, kind=kind)


def valid_group(group: Any) -> bool:
    return isinstance(group, str) and GROUP_RE.match(group) is not None


@dataclass(frozen=True)
class GroupRequest:
    """One of GROUP_OPS. ``members``: the uids named (create, add, remove); ``member`` and ``role``: group_role;
    ``seq``: group_receipts (the sender's message). Fields an op does not take are empty."""

    req_id: str
    op: str
    group: str = ""
    name: str | None = None
    members: tuple[str, ...] = ()
    member: str = ""
    role: str = ""
    history: bool = False
    seq: int = 0


def parse_group_request(op: str, obj: dict[str, Any], req_id: str) -> GroupRequest:
    ids = {"req_id": req_id}
    if op == "groups":
        return GroupRequest(req_id=req_id, op=op)
    group = obj.get("group")
    if group is None:
        raise ProtocolError("missing_field", "'group' is required", **ids)
    if not valid_group(group):
        raise ProtocolError("bad_group", "'group' must be 1-32 characters of A-Z a-z 0-9 _ -", **ids)
    out: dict[str, Any] = {"req_id": req_id, "op": op, "group": group}
    if op in ("group_create", "group_rename"):
        name = _string(obj, "name", GROUP_NAME_MAX, required=op == "group_rename", default=group, **ids)
        if not name:
            raise ProtocolError("bad_field", "'name' must not be empty", **ids)
        out["name"] = name
    if op in ("group_create", "group_add", "group_remove"):
        members = obj.get("members", [] if op == "group_create" else None)
        if members is None:
            raise ProtocolError("missing_field", "'members' is required", **ids)
        if not isinstance(members, list) or not all(valid_uid(m) for m in members):
            raise ProtocolError("bad_field", "'members' must be a list of uids", **ids)
        if len(members) > GROUP_REQUEST_MEMBERS_MAX:
            raise ProtocolError("too_many", f"at most {GROUP_REQUEST_MEMBERS_MAX} members per request", **ids)
        out["members"] = tuple(dict.fromkeys(members))
    if op == "group_create":
        history = obj.get("history", False)
        if not isinstance(history, bool):
            raise ProtocolError("bad_field", "'history' must be true or false", **ids)
        out["history"] = history
    if op == "group_role":
        member, role = obj.get("member"), obj.get("role")
        if not valid_uid(member):
            raise ProtocolError("bad_uid", "'member' must be a valid uid", **ids)
        if role not in GROUP_ROLES:
            raise ProtocolError("bad_field", "'role' must be \"admin\" or \"member\"", **ids)
        out["member"], out["role"] = member, role
    if op == "group_receipts":
        seq = obj.get("seq")
        if not (_int(seq) and 0 < seq < 2**63):
            raise ProtocolError("bad_field", "'seq' must be the seq of your message (a positive integer)", **ids)
        out["seq"] = seq
    return GroupRequest(**out)


@dataclass(frozen=True)
class HistoryRequest:
    """A page of a conversation's history, newest first: with the user ``with_uid``, or in ``group``; messages
    with a seq below ``before`` (0: from the newest)."""

    req_id: str
    with_uid: str | None
    group: str | None
    before: int
    limit: int


def parse_history(obj: dict[str, Any], req_id: str) -> HistoryRequest:
    ids = {"req_id": req_id}
    with_uid, group = obj.get("with"), obj.get("group")
    if (with_uid is None) == (group is None):
        raise ProtocolError("missing_field", "give the conversation: 'with' (a uid) or 'group'", **ids)
    if with_uid is not None and not valid_uid(with_uid):
        raise ProtocolError("bad_uid", "'with' must be a valid uid", **ids)
    if group is not None and not valid_group(group):
        raise ProtocolError("bad_group", "'group' must be 1-32 characters of A-Z a-z 0-9 _ -", **ids)
    before = obj.get("before") or 0
    if not (_int(before) and 0 <= before < 2**63):
        raise ProtocolError("bad_field", "'before' must be a seq (a non-negative integer)", **ids)
    limit = obj.get("limit", HISTORY_LIMIT_DEFAULT)
    if not _int(limit) or not 1 <= limit <= PULL_LIMIT_MAX:
        raise ProtocolError("bad_limit", f"'limit' must be an integer from 1 to {PULL_LIMIT_MAX}", **ids)
    return HistoryRequest(req_id=req_id, with_uid=with_uid, group=group, before=before, limit=limit)


@dataclass(frozen=True)
class ConversationsRequest:
    """The caller's conversations with kept messages, the most recent first: those whose newest message has a
    seq below ``before`` (0: from the most recent)."""

    req_id: str
    before: int
    limit: int


def parse_conversations(obj: dict[str, Any], req_id: str) -> ConversationsRequest:
    ids = {"req_id": req_id}
    before = obj.get("before") or 0
    if not (_int(before) and 0 <= before < 2**63):
        raise ProtocolError("bad_field", "'before' must be a seq (a non-negative integer)", **ids)
    limit = obj.get("limit", CONVERSATIONS_LIMIT_DEFAULT)
    if not _int(limit) or not 1 <= limit <= PULL_LIMIT_MAX:
        raise ProtocolError("bad_limit", f"'limit' must be an integer from 1 to {PULL_LIMIT_MAX}", **ids)
    return ConversationsRequest(req_id=req_id, before=before, limit=limit)


def parse_status(payload: bytes) -> str | None:
    """A status payload is the bare word online or offline; an empty one (a cleared retained
    status) means offline; any other word is ignored (None)."""
    text = payload.strip().decode("utf-8", "replace")
    if not text:
        return OFFLINE
    return text if text in (ONLINE, OFFLINE) else None


# --- server -> client payloads ----------------------------------------------
def receipt(msg_id: str, to: str, seq: int, status: str) -> dict[str, Any]:
    return {"kind": "receipt", "msg_id": msg_id, "to": to, "seq": seq, "status": status}


def receipts(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Several receipts for one sender in one payload (senders that sent with "receipts": "batch")."""
    return {"kind": "receipts", "receipts": items}


def page_fit(messages: list[dict[str, Any]], budget: int = REPLY_PAYLOAD_MAX - PAGE_ENVELOPE_MAX) -> int:
    """How many of ``messages`` (from the first) fit in a page's ``budget`` bytes: at least one, so a
    page is never empty while messages wait. One encode() of the list answers for ordinary pages (0.2 ms
    for 500 chat messages here); only a page that does not fit is measured entry by entry."""
    if len(encode(messages)) <= budget:  # type: ignore[arg-type]
        return len(messages)
    size = 0
    for i, m in enumerate(messages):
        size += len(encode(m)) + 1  # the entry and its comma
        if size > budget:
            return max(i, 1)
    return len(messages)


def fit_count(payload: dict[str, Any], limit: int = REPLY_PAYLOAD_MAX) -> dict[str, Any]:
    """A count payload cut to at most ``limit`` bytes. A count has one entry per sender, and a receiver
    with thousands of senders waiting would pass the limit: the previews of the senders whose newest
    message is oldest go first, then (if still too large) the senders with the fewest messages leave
    ``by_sender``, and ``senders_cut`` says how many left. ``total`` always counts everything."""
    if len(encode(payload)) <= limit:
        return payload
    previews, by_sender = payload.get("previews", {}), payload.get("by_sender", {})
    size = len(encode({**payload, "previews": {}, "by_sender": {}, "senders_cut": 0}))
    preview_size = {k: len(encode({k: v})) - 1 for k, v in previews.items()}  # the entry and its comma
    sender_size = {k: len(encode({k: v})) - 1 for k, v in by_sender.items()}
    size += sum(preview_size.values()) + sum(sender_size.values())
    keep_previews = dict(previews)
    for k in sorted(previews, key=lambda k: previews[k].get("seq", 0) if isinstance(previews[k], dict) else 0):
        if size <= limit:
            break
        del keep_previews[k]
        size -= preview_size[k]
    keep_senders = dict(by_sender)
    for k in sorted(by_sender, key=lambda k: by_sender[k]):
        if size <= limit:
            break
        del keep_senders[k]
        size -= sender_size[k]
    out = {**payload, "by_sender": keep_senders, "previews": keep_previews}
    if len(keep_senders) < len(by_sender):
        out["senders_cut"] = len(by_sender) - len(keep_senders)
    return out
