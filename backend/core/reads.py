"""Read markers and the read-receipt setting (docs/PROTOCOL.md, section 15): the operations the store
runs for them, its outcomes, and what is published after the commit. A mixin of
:class:`backend.core.Delivery`.

A device says "read up to seq S in my conversation with bob" (:class:`MarkRead`). The store moves the
user's marker forward only (never back) and never past the newest message bob sent the user, and
reports the messages that became read. After the commit:

* the asking device gets the answer (``{"kind": "read", "req_id", "with", "seq", "unread"}``);
* the user's other online devices get the same without ``req_id`` on their inbox, when the marker moved
  (unread counts stay in sync across devices);
* unless the user turned read receipts off, every registered device of bob (its default device if it
  has none) gets a ``read`` receipt per newly read message (the newest READ_RECEIPTS_MAX), batched in
  ``receipts`` payloads on its reply topic.

In a group (``kind="g"``, section 14.6) the marker is a seq of the group's messages (within a group seq order is
gseq order); the senders of the newly read messages get an aggregate `read` receipt per message, "read by k of
n" (the members whose marker passed it, while their read receipts were on), coalesced like the group's
`delivered` receipts (core/groups.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .. import protocol as p
from .events import Key, Plan, Publish

# Read receipts one marker move sends at most: the newest 1,000 newly read messages, one `receipts`
# payload's worth (RECEIPTS_PER_PAYLOAD_MAX). A `read` receipt also means every earlier message of the same
# sender to the same reader is read (the marker only moves forward), so a sender that gets only the newest
# 1,000 after a reader caught up on more marks the older ones read too.
READ_RECEIPTS_MAX = 1000


@dataclass(frozen=True)
class MarkRead:
    uid: str  # the reader
    req_id: str
    peer: str  # the conversation: for kind "u", the other user's uid
    seq: int  # read up to this seq (clamped to the newest message, never backwards)
    device: str = ""  # the device asking
    kind: str = "u"  # "u": a 1:1 conversation; "g": a group (gseqs; wired by the groups code)

    @property
    def origin(self) -> tuple[str, str]:
        return self.uid, self.device


@dataclass(frozen=True)
class SetSettings:
    uid: str
    req_id: str
    device: str = ""
    read_receipts: bool | None = None  # None: read them, change nothing

    @property
    def origin(self) -> tuple[str, str]:
        return self.uid, self.device


@dataclass(frozen=True)
class Marked:
    op: MarkRead
    upto: int  # the stored marker after the request (never lower than before)
    advanced: bool  # it moved forward
    unread: int  # messages of the conversation after the marker (never negative)
    read: tuple[tuple[str, int], ...] = ()  # (msg_id, seq) newly read, oldest first, at most READ_RECEIPTS_MAX
    receipts: bool = True  # the reader sends read receipts (its setting)
    sender_devices: tuple[str, ...] = ()  # where the `read` receipts go: the peer's registered devices
    # A group: (sender, msg_id, seq, gseq, k, n) per newly read message of another member (read by k of n), and
    # each such sender's registered devices (where its receipts go).
    group_read: tuple[tuple[str, str, int, int, int, int], ...] = ()
    devices_of: dict[str, tuple[str, ...]] | None = None


@dataclass(frozen=True)
class SettingsSet:
    op: SetSettings
    read_receipts: bool
    changed: bool


CONVERSATION_OPS = (MarkRead, SetSettings)
CONVERSATION_OUTCOMES = (Marked, SettingsSet)


def read_payload(peer: str, upto: int, unread: int, req_id: str | None = None, kind: str = "u") -> dict[str, Any]:
    out: dict[str, Any] = {"kind": "read"}
    if req_id is not None:
        out["req_id"] = req_id
    out.update({"with" if kind == "u" else "group": peer, "seq": upto, "unread": unread})
    return out


def settings_payload(read_receipts: bool, req_id: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"kind": "settings"}
    if req_id is not None:
        out["req_id"] = req_id
    out["read_receipts"] = read_receipts
    return out


class ReadsMixin:
    """The read-marker half of Delivery (it reads ``self._devices``, the presence)."""

    def _plan_conversation(self, plan: Plan, uid: str, dev: str, r: Any, now_ms: int) -> None:
        """A parsed typing, read or settings request: typing is relayed from the plan, the others are store ops."""
        if isinstance(r, p.TypingRequest):
            self._plan_typing(plan, uid, dev, r, now_ms)
        elif isinstance(r, p.ReadRequest):
            plan.ops.append(MarkRead(uid=uid, req_id=r.req_id, peer=r.peer, seq=r.seq, device=dev, kind=r.kind))
        else:
            plan.ops.append(SetSettings(uid=uid, req_id=r.req_id, device=dev, read_receipts=r.read_receipts))

    def _other_devices(self, uid: str, dev: str) -> list[Key]:
        return sorted((uid, d) for d in self._devices.get(uid, ()) if d != dev)

    def _conversation_done(self, out: list[Publish], batched: dict[Key, list[dict[str, Any]]], o: Any,
                           now_ms: int = 0) -> None:
        """Publishes for a committed Marked or SettingsSet."""
        if isinstance(o, SettingsSet):
            out.append(Publish(p.reply_topic(*o.op.origin), settings_payload(o.read_receipts, o.op.req_id)))
            if o.changed:
                sync = settings_payload(o.read_receipts)
                out += [Publish(p.inbox_topic(*k), sync) for k in self._other_devices(*o.op.origin)]
            return
        op = o.op
        out.append(Publish(p.reply_topic(*op.origin), read_payload(op.peer, o.upto, o.unread, op.req_id, op.kind)))
        if not o.advanced:
            return
        sync = read_payload(op.peer, o.upto, o.unread, None, op.kind)
        out += [Publish(p.inbox_topic(*k), sync) for k in self._other_devices(*op.origin)]
        if o.group_read:
            self._group_read(op.peer, o.group_read, o.devices_of or {}, now_ms)  # coalesced: read by k of n
        if o.receipts and o.read and op.kind == "u" and op.peer != op.uid:
            # Every registered device of the sender, online or not as far as this worker knows (as `delivered` goes
            # to the sending device's reply topic): each shows the conversation (the others got sync copies of
            # what it sent), and which device sent a message is no longer known once it left the store.
            items = [p.receipt(msg_id, op.uid, seq, "read") for msg_id, seq in o.read]
            for d in o.sender_devices:
                batched.setdefault((op.peer, d), []).extend(items)
