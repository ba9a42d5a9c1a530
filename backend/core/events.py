"""What flows through the core: the operations a plan asks of the store, the outcomes the store reports
back, the actions (publishes) for the transport, and the payloads built from them. Plain frozen
dataclasses and pure functions: no state."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .. import protocol as p


# --- operations the store runs (one transaction per plan) -------------------
@dataclass(frozen=True)
class StoreMessage:
    sender: str
    msg_id: str
    to: str
    type: str
    content: str
    ts: int | None
    sent_at: int
    # Was the receiver online at this message's place in the batch? Decided when planning, so a
    # batch [send to bob, bob online] counts the message in bob's announcement and does not also push it.
    push: bool = False
    # The sender asked for its receipts batched ("receipts": "batch"); kept with the row for `delivered`.
    batch_receipts: bool = False
    sender_device: str = ""  # the device it was sent from ("": the v1 topics); its receipts go there
    # The devices, of the receiver and of the sender (sync copies), online at this message's place in the
    # batch: each of them that gets an entry is pushed to after the commit (push: any of them).
    push_to: frozenset[tuple[str, str]] = frozenset()
    # A message to a group (``to`` is then the group id): every member's devices get an entry; those online
    # after the commit are pushed to (the core knows presence, the store knows the members).
    group: str | None = None

    @property
    def origin(self) -> tuple[str, str]:
        return self.sender, self.sender_device


@dataclass(frozen=True)
class DeleteAcked:
    receiver: str
    seqs: tuple[int, ...]
    device: str = ""  # the device that acks: only its entries go

    @property
    def origin(self) -> tuple[str, str]:
        return self.receiver, self.device


@dataclass(frozen=True)
class CountBacklog:
    receiver: str
    req_id: str | None  # None: an unsolicited announcement (online, exhausted pushes, repeats)
    device: str = ""
    # May this count register its device? Not for an `online` on im/status/{uid} that may be the worker's
    # own derived status coming back, or a retained one replayed at (re)connect.
    register: bool = field(default=True, compare=False)

    @property
    def origin(self) -> tuple[str, str]:
        return self.receiver, self.device


@dataclass(frozen=True)
class PullPage:
    receiver: str
    req_id: str
    limit: int
    from_uid: str | None
    ack: str | None
    order: str = "oldest"  # or "newest": the latest page first, scrolling back
    device: str = ""
    scope: str = "device"  # "user": read-only, what waits for any of the user's devices, from `after`
    after: int = 0

    @property
    def origin(self) -> tuple[str, str]:
        return self.receiver, self.device


@dataclass(frozen=True)
class ListDevices:
    receiver: str
    req_id: str
    device: str = ""

    @property
    def origin(self) -> tuple[str, str]:
        return self.receiver, self.device


@dataclass(frozen=True)
class RemoveDevice:
    receiver: str
    req_id: str
    device: str  # the device asking
    target: str  # the device to remove ("" the default device)

    @property
    def origin(self) -> tuple[str, str]:
        return self.receiver, self.device


@dataclass(frozen=True)
class SetPushEndpoint:
    receiver: str
    req_id: str
    device: str
    endpoint: str | None  # None: unregister

    @property
    def origin(self) -> tuple[str, str]:
        return self.receiver, self.device


@dataclass(frozen=True)
class GroupOp:
    """A group request (create, add, remove, leave, rename, role, list, members, receipts: protocol.GROUP_OPS)."""

    receiver: str  # the user asking
    req_id: str
    device: str
    request: p.GroupRequest

    @property
    def origin(self) -> tuple[str, str]:
        return self.receiver, self.device


@dataclass(frozen=True)
class ReadHistory:
    """A page of a conversation's history (--history-days), newest first: read-only."""

    receiver: str
    req_id: str
    device: str
    request: p.HistoryRequest

    @property
    def origin(self) -> tuple[str, str]:
        return self.receiver, self.device


@dataclass(frozen=True)
class ListConversations:
    """The caller's conversations with kept messages (--history-days), the most recent first: read-only."""

    receiver: str
    req_id: str
    device: str
    request: p.ConversationsRequest

    @property
    def origin(self) -> tuple[str, str]:
        return self.receiver, self.device


@dataclass(frozen=True)
class RelayTyping:
    """A typing notice to a group: the store names its members (a read: never a write, never a registration);
    the core relays the notice to their online devices (core/signals.py)."""

    uid: str
    device: str
    group: str
    state: str

    @property
    def origin(self) -> tuple[str, str]:
        return self.uid, self.device


@dataclass(frozen=True)
class TypingMembers:
    op: RelayTyping
    members: tuple[str, ...]  # empty: no such group, or the typist is not a member (dropped, as it is not stored)


Operation = (RelayTyping | StoreMessage | DeleteAcked | CountBacklog | PullPage | ListDevices | RemoveDevice | SetPushEndpoint
             | GroupOp | ReadHistory | ListConversations)


# --- what the store reports back --------------------------------------------
@dataclass(frozen=True)
class DeletedRow:
    """An entry a device acked (``receiver``, ``device``); ``receipt``: its sender is owed `delivered` now
    (the first of the receiver's devices to ack it; never for a sync copy)."""

    receiver: str
    seq: int
    sender: str
    msg_id: str
    batch_receipts: bool = False
    sender_device: str = ""
    device: str = ""
    receipt: bool = True
    # A group message: its group and gseq, and (with ``receipt``: this member's first device acked it) how many
    # members have acked it now of how many it was for: the sender's "delivered to k of n".
    group: str = ""
    gseq: int = 0
    delivered: int = 0
    members: int = 0


@dataclass(frozen=True)
class Stored:
    op: StoreMessage
    seq: int
    duplicate: bool = False
    to: str = ""  # the first message's receiver, for a duplicate
    waiting: bool = False  # for a duplicate: the first message is still stored (not acked, not expired)
    # The (uid, device) entries the message got: the receiver's devices, then the sender's other devices
    # (sync copies). Empty means the receiver's default device alone (v1, and unit tests). A group message: every
    # member device but the sending one.
    devices: tuple[tuple[str, str], ...] = ()
    gseq: int = 0  # a group message's place in the group's order
    members: int = 0  # a group message: the members (other than the sender) it is for


@dataclass(frozen=True)
class GroupEvent:
    """A membership change stored as a group message (type ``group_event``), for the devices in ``devices``
    (every member's after the change, and the removed or leaving members')."""

    group: str
    seq: int
    gseq: int
    by: str
    event: dict[str, Any]
    sent_at: int
    devices: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class GroupAnswered:
    """A group request answered: ``payload`` to the asking device; ``events`` to push to online members."""

    op: GroupOp
    payload: dict[str, Any]
    events: tuple[GroupEvent, ...] = ()


@dataclass(frozen=True)
class Deleted:
    op: DeleteAcked
    rows: tuple[DeletedRow, ...]


@dataclass(frozen=True)
class Counted:
    op: CountBacklog
    total: int
    by_sender: dict[str, int]
    previews: dict[str, dict[str, Any]] = field(default_factory=dict)  # each sender's newest message
    expired: int = 0  # messages that expired unread since the last count
    unread: dict[str, int] | None = None  # answers to a count request: conversation -> unread (core/reads.py)
    read_by: dict[str, int] | None = None  # answers to a count request: reader -> how far it read our messages
    unread_groups: dict[str, int] | None = None  # answers to a count request: group -> unread (others' messages)
    by_group: dict[str, int] = field(default_factory=dict)  # of the total, what waits per group


@dataclass(frozen=True)
class Paged:
    op: PullPage
    messages: tuple[dict[str, Any], ...]
    cursor: str | None
    more: bool
    deleted: tuple[DeletedRow, ...] = ()


@dataclass(frozen=True)
class Listed:
    op: ListDevices
    devices: tuple[dict[str, Any], ...]  # device, registered_at, last_seen, push (the core adds online)


@dataclass(frozen=True)
class DeviceRemoved:
    op: RemoveDevice
    released: int  # entries released (messages that waited only for it left the store)


@dataclass(frozen=True)
class PushEndpointSet:
    op: SetPushEndpoint


@dataclass(frozen=True)
class DeviceReset:
    """A device that had been removed (silent past the expiry age, or by remove_device) came back and was
    registered afresh: what waited for it is gone, and it must be told before anything else."""

    uid: str
    device: str


@dataclass(frozen=True)
class Refused:
    """The store refused an operation for a reason the sender must hear (unknown cursor...)."""

    op: Operation
    code: str
    message: str


@dataclass(frozen=True)
class HistoryPage:
    op: ReadHistory
    messages: tuple[dict[str, Any], ...]  # newest first
    more: bool


@dataclass(frozen=True)
class ConversationList:
    op: ListConversations
    conversations: tuple[dict[str, Any], ...]  # the most recent first; no content
    more: bool


Outcome = (TypingMembers | Stored | Deleted | Counted | Paged | Refused | Listed | DeviceRemoved | PushEndpointSet | DeviceReset
           | GroupAnswered | HistoryPage | ConversationList)


# --- actions for the transport ----------------------------------------------
@dataclass(frozen=True)
class Publish:
    topic: str
    payload: dict[str, Any] | str  # a str is sent as is (a status word), a dict as JSON
    qos: int = 1
    retain: bool = False


@dataclass
class Plan:
    """What one batch of inbound packets asks of the store, in arrival order."""

    ops: list[Operation] = field(default_factory=list)
    replies: list[Publish] = field(default_factory=list)  # validation errors: need no store



GROUP_EVENT_TYPE = p.GROUP_EVENT_TYPE  # the type of a membership change's message; its content is the event as JSON


def push_payload(seq: int, msg_id: str, sender: str, to: str, msg_type: str, content: str, sent_at: int,
                 ts: int | None = None, copy_from: str | None = None, gseq: int | None = None) -> dict[str, Any]:
    """A message as pushed or paged. ``copy_from`` (not None): a sync copy of what the user itself sent,
    from that device ("" the default device), marked ``"copy": true`` (and ``"device"``). ``gseq`` (not None):
    a message to the group ``to``, in the group's order; a membership change also carries its ``event``."""
    out = {"kind": "msg", "seq": seq, "msg_id": msg_id, "from": sender, "to": to,
           "type": msg_type, "content": content, "sent_at": sent_at}
    if gseq is not None:
        out["group"], out["gseq"] = to, gseq
        if msg_type == GROUP_EVENT_TYPE:
            try:
                out["event"] = json.loads(content)
            except ValueError:  # a client's own message typed group_event: its content stays as sent
                pass
    if ts is not None:
        out["ts"] = ts  # the sender's own clock, as it sent it
    if copy_from is not None:
        out["copy"] = True
        if copy_from:
            out["device"] = copy_from
    return out


def device_removed_payload() -> dict[str, Any]:
    return p.error_payload("device_removed", "this device was removed (silent for longer than the expiry age, or "
                           "by a remove_device request) and is registered afresh: what waited for it is gone; "
                           "fetch the conversation again (pull with \"scope\": \"user\")")


Key = tuple[str, str]  # (uid, device); device "" is the user's default device (the v1 topics)
