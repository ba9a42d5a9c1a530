"""Groups in the core: a group message and a membership change are pushed to every member device online after
the commit (the store names the devices: it knows the members; the core knows presence), and the members'
acks come back to the sender as one coalesced "delivered to k of n" per message. A mixin of
:class:`backend.core.Delivery` (docs/PROTOCOL.md section 14)."""

from __future__ import annotations

import json
from typing import Any

from .. import protocol as p
from .events import GROUP_EVENT_TYPE, DeletedRow, GroupAnswered, Key, Publish, Stored, push_payload

# A sender's "delivered to k of n" for a group message is coalesced this long: a 1,000-member group acks within
# a second or two, and one receipt a second per message is what a progress display needs (not one per member).
GROUP_RECEIPT_DELAY_MS = 1000
# A group's pushes (its messages, their sync copies, its membership events) and their retransmissions go at MQTT
# QoS 0: each is tracked and retransmitted by the worker until the member device acks it (core/pushes.py), then
# announced, and a device counts at each connection, so MQTT's own PUBACK round (one per member device, on the
# worker's, the broker's and the device's side) bought nothing the app-level ack does not; the bench measured it
# (docs/BENCHMARKS.md, Groups). A 1:1 push stays at QoS 1.
GROUP_PUSH_QOS = 0


def group_receipt(msg_id: str, group: str, seq: int, gseq: int | None, status: str, **counts: int) -> dict[str, Any]:
    """A receipt for a group message: v1's fields (``to`` is the group) plus ``group``, ``gseq`` (None: left out)
    and, for ``delivered``, the counts ``delivered`` (members that acked, on any device) and ``members`` (it was
    for); for ``read``, ``read`` (members whose read marker passed it) and ``members``."""
    out = {**p.receipt(msg_id, group, seq, status), "group": group}
    if gseq is not None:
        out["gseq"] = gseq
    out.update(counts)
    return out


class GroupsMixin:
    """The group half of Delivery (``self._progress``: sender device -> (due ms, {(seq, status): receipt}))."""

    def _stored_group(self, out: list[Publish], batched: dict[Key, list[dict[str, Any]]], o: Stored,
                      now_ms: int) -> None:
        op = o.op
        if o.duplicate:
            first = o.to[1:] if o.to.startswith("#") else o.to
            self._receipt(out, batched, op.origin, op.batch_receipts,
                          group_receipt(op.msg_id, first, o.seq, 0, "duplicate"))
            return
        shared = copy = None  # built once: every member device gets the same dict (never mutated)
        partitioned = self.owns is not None
        for uid, dev in o.devices:
            if not self.is_online(uid, dev):
                if partitioned:  # another partition's member hears of it at a late `online` too (presence.py)
                    self._not_pushed(uid, dev, now_ms)
                continue  # counted and pulled (the store holds its entry), or announced when it comes online
            if uid != op.sender:
                if shared is None:
                    shared = push_payload(o.seq, op.msg_id, op.sender, op.group, op.type, op.content, op.sent_at,
                                          op.ts, None, o.gseq)
                push = shared
            else:  # the sender's other device: a sync copy
                if copy is None:
                    copy = push_payload(o.seq, op.msg_id, op.sender, op.group, op.type, op.content, op.sent_at,
                                        op.ts, op.sender_device, o.gseq)
                push = copy
            out.append(Publish(p.inbox_topic(uid, dev), push, GROUP_PUSH_QOS))
            self._track(uid, dev, o.seq, push, now_ms, GROUP_PUSH_QOS)
        self._receipt(out, batched, op.origin, op.batch_receipts,
                      group_receipt(op.msg_id, op.group, o.seq, o.gseq, "stored"))

    def _group_answered(self, out: list[Publish], o: GroupAnswered, now_ms: int) -> None:
        """The membership changes' pushes (to the online member devices, the asking one too: every device
        reads the change in the group's order), then the answer."""
        for ev in o.events:
            push = push_payload(ev.seq, f"event-{ev.gseq}", ev.by, ev.group, GROUP_EVENT_TYPE,
                                json.dumps(ev.event, separators=(",", ":")), ev.sent_at, None, None, ev.gseq)
            for uid, dev in ev.devices:
                if self.is_online(uid, dev):
                    out.append(Publish(p.inbox_topic(uid, dev), push, GROUP_PUSH_QOS))
                    self._track(uid, dev, ev.seq, push, now_ms, GROUP_PUSH_QOS)
                elif self.owns is not None:
                    self._not_pushed(uid, dev, now_ms)
        out.append(Publish(p.reply_topic(*o.op.origin), o.payload))

    def _group_delivered(self, r: DeletedRow, now_ms: int) -> None:
        """A member's first ack of a group message: the sender's receipt for it, replacing any not yet sent."""
        self._hold_progress((r.sender, r.sender_device), group_receipt(
            r.msg_id, r.group, r.seq, r.gseq, "delivered", delivered=r.delivered, members=r.members), now_ms)

    def _group_read(self, group: str, rows, devices_of: dict[str, tuple[str, ...]], now_ms: int) -> None:
        """A member's read marker passed other members' messages: each sender's "read by k of n", on every
        registered device of it (as 1:1 `read` receipts go), replacing any not yet sent."""
        for sender, msg_id, seq, gseq, k, n in rows:
            receipt = group_receipt(msg_id, group, seq, gseq, "read", read=k, members=n)
            for dev in devices_of.get(sender, ("",)):
                self._hold_progress((sender, dev), receipt, now_ms)

    def _hold_progress(self, key: Key, receipt: dict[str, Any], now_ms: int) -> None:
        """Hold a group receipt for its sender device, in place of the same message's earlier one of that status."""
        held = self._progress.get(key)
        slot = (receipt["seq"], receipt["status"])
        if held is None:
            self._progress[key] = (now_ms + GROUP_RECEIPT_DELAY_MS, {slot: receipt})
        else:
            held[1][slot] = receipt

    def group_offline_members(self, o: Stored | GroupAnswered) -> set[str]:
        """The members a group message or membership change was stored for none of whose devices is online
        (push notifications)."""
        if isinstance(o, Stored):
            devices = o.devices if not o.duplicate else ()
        else:
            devices = [d for ev in o.events for d in ev.devices]
        return {uid for uid, _ in devices if not self.user_online(uid)}
