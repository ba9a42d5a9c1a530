"""Pushes and their retransmission: a stored message is pushed to its receiver's online devices (and
sync copies to the sender's other devices), each push tracked until acked, resent with backoff, then
left for pull. A mixin of :class:`backend.core.Delivery`."""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Any

from .. import protocol as p
from .events import Key, Publish, Stored, push_payload

# --- timing defaults --------------------------------------------------------
# MobileIMSDK resends an unacked message after 2-3 s (its QoS4 "resend interval").
PUSH_ACK_TIMEOUT_MS = 3000
# MobileIMSDK gives up after 2 resends; we do the same, then the message waits for pull.
PUSH_MAX_RETRIES = 2
# Each retry waits twice as long as the one before (3 s, 6 s): a slow link gets room.
PUSH_BACKOFF = 2.0
# Bound the retransmit table so a flood of unacked pushes cannot grow memory without end;
# past it new pushes are not tracked: their receiver gets an announcement instead (the store has them).
PENDING_PUSH_MAX = 100_000


@dataclass
class _Pending:
    receiver: str
    device: str
    seq: int
    payload: dict[str, Any]
    attempts: int
    deadline: int
    qos: int = 1  # a group's pushes go at QoS 0 (core/groups.py: GROUP_PUSH_QOS), retransmissions too



class PushesMixin:
    """The push half of Delivery (``self._pending``, ``self._timers``...)."""

    def _stored(self, out: list[Publish], batched: dict[Key, list[dict[str, Any]]], o: Stored, now_ms: int) -> None:
        op = o.op
        if o.duplicate:
            self._receipt(out, batched, op.origin, op.batch_receipts, p.receipt(op.msg_id, o.to, o.seq, "duplicate"))
            if o.waiting:
                # Still stored and perhaps not ours to push: the worker that stored it may have died before
                # its push (worker sessions are clean, so the sender's resend is what reaches us). Tell the
                # receiver's online devices we are not pushing it to; the count covers it either way.
                for dev in tuple(self._devices.get(o.to, ())):
                    if (o.to, dev, o.seq) not in self._pending:
                        self.announce(o.to, now_ms, dev)
            return
        # The pushes go out before the `stored` receipt: the worker's packets reach the broker in order,
        # so a sender that has its receipt (and so never resends) knows the pushes reached the broker too.
        shared = None  # the receiver's devices share one push dict (never mutated): built and encoded once
        push_to, online, partitioned = op.push_to, self._devices, self.owns is not None
        for key in o.devices or ((op.to, ""),):
            uid, dev = key
            if key in push_to and dev in online.get(uid, ()):  # planned for it, and still online (is_online)
                if uid == op.to:
                    if shared is None:
                        shared = push_payload(o.seq, op.msg_id, op.sender, op.to, op.type, op.content, op.sent_at, op.ts)
                    push = shared
                else:
                    push = push_payload(o.seq, op.msg_id, op.sender, op.to, op.type, op.content, op.sent_at, op.ts,
                                        op.sender_device)
                out.append(Publish(p.inbox_topic(uid, dev), push))
                self._track(uid, dev, o.seq, push, now_ms)
            elif partitioned:
                self._not_pushed(uid, dev, now_ms)
        self._receipt(out, batched, op.origin, op.batch_receipts, p.receipt(op.msg_id, op.to, o.seq, "stored"))

    # -- retransmission (per device) ----------------------------------------------
    def _track(self, receiver: str, device: str, seq: int, push: dict[str, Any], now_ms: int, qos: int = 1) -> None:
        if len(self._pending) >= PENDING_PUSH_MAX:
            self.announce(receiver, now_ms, device)  # not tracked, so never retransmitted: tell the device instead
            return
        deadline = now_ms + self.ack_timeout_ms
        self._pending[(receiver, device, seq)] = _Pending(receiver, device, seq, push, 1, deadline, qos)
        heapq.heappush(self._timers, (deadline, receiver, device, seq))

    def next_deadline(self, receipts_only: bool = False) -> int | None:
        """The earliest time something is due: a push's retransmission, held receipts or an announcement.
        ``receipts_only``: held receipts alone (what the transport can do while a batch is in its transaction:
        retransmissions and announcements wait for it, so their past deadlines must not make it spin)."""
        receipts = min((at for at, _ in self._held.values()), default=None)
        if self._progress:  # coalesced group receipts (core/groups.py)
            at = min(at for at, _ in self._progress.values())
            receipts = at if receipts is None else min(receipts, at)
        if receipts_only:
            return receipts
        dues = [receipts, self._announce_deadline()]
        while self._timers:
            deadline, receiver, device, seq = self._timers[0]
            entry = self._pending.get((receiver, device, seq))
            if entry is not None and entry.deadline == deadline:
                dues.append(deadline)
                break
            heapq.heappop(self._timers)
        return min((d for d in dues if d is not None), default=None)

    def due(self, now_ms: int) -> list[tuple[str, str, int]]:
        """Pushes (receiver, device, seq) whose ack is overdue and that still have retries left; exhausted
        ones are dropped (they wait for pull) and their device, if online, is queued an announcement. The
        caller asks the store which of them still wait (Store.alive), then calls resend."""
        out: list[tuple[str, str, int]] = []
        while self._timers and self._timers[0][0] <= now_ms:
            deadline, receiver, device, seq = heapq.heappop(self._timers)
            key = (receiver, device, seq)
            entry = self._pending.get(key)
            if entry is None or entry.deadline != deadline:
                continue
            if entry.attempts > self.max_retries or not self.is_online(receiver, device):
                del self._pending[key]
                # The device is still online but never acked: the push (or its ack) was lost, perhaps
                # dropped by a broker whose queue for it was full. Tell it what waits.
                self.announce(receiver, now_ms, device)
                continue
            out.append(key)
        return out

    def resend(self, due: list[tuple[str, str, int]], alive: set | None, now_ms: int) -> list[Publish]:
        """Resend the due pushes that still wait for their device (``alive``: the (receiver, device, seq)
        keys, or bare seqs, still stored; None: all). An entry acked through another worker is gone from
        the store, so it is not pushed again."""
        out: list[Publish] = []
        for key in due:
            entry = self._pending.get(key)
            if entry is None:
                continue
            if alive is not None and key not in alive and key[2] not in alive:
                del self._pending[key]
                continue
            wait = int(self.ack_timeout_ms * self.backoff ** entry.attempts)
            entry.attempts += 1
            entry.deadline = now_ms + wait
            heapq.heappush(self._timers, (entry.deadline, *key))
            out.append(Publish(p.inbox_topic(entry.receiver, entry.device), entry.payload, entry.qos))
        return out

    def tick(self, now_ms: int) -> list[Publish]:
        """Resend overdue pushes, taking every one as still stored (single worker, tests)."""
        return self.resend(self.due(now_ms), None, now_ms)

    @property
    def pending_pushes(self) -> int:
        return len(self._pending)
