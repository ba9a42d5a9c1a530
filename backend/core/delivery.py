"""The :class:`Delivery` class: a batch of inbound packets in, a :class:`~backend.core.events.Plan` out
(validation, rate limits, the routing of each operation), and after the commit the outcomes in,
publishes out. Presence, announcements, pushes and receipts are its mixins (presence.py,
announcements.py, pushes.py, receipts.py)."""

from __future__ import annotations

from typing import Any, Callable

from .. import protocol as p
from .announcements import ANNOUNCE_MIN_GAP_MS, ANNOUNCE_REPEAT_MAX_MS, ANNOUNCE_REPEAT_MS, AnnouncementsMixin, _Watch
from .events import (ConversationList, CountBacklog, Counted, DeleteAcked, Deleted, DeviceRemoved, DeviceReset, GroupAnswered, GroupOp,
                     HistoryPage, Key, ListConversations, Listed, ListDevices, Outcome, Paged, Plan, Publish, PullPage, PushEndpointSet,
                     ReadHistory, Refused, RemoveDevice, SetPushEndpoint, Stored, StoreMessage, TypingMembers,
                     device_removed_payload)
from .groups import GroupsMixin
from .presence import PresenceMixin
from .pushes import PUSH_ACK_TIMEOUT_MS, PUSH_BACKOFF, PUSH_MAX_RETRIES, PushesMixin, _Pending
from .reads import CONVERSATION_OUTCOMES, ReadsMixin
from .receipts import RECEIPT_DELAY_MS, ReceiptsMixin
from .signals import SignalsMixin

WORKER_TOPIC_PREFIX = p.WORKER_TOPIC_FILTER[:-1]  # im/worker/

# Per-user send rate, a token bucket: 20 messages a second sustained, bursts of 100. Far above a
# person typing or a phone flushing its outbox (Telegram lets a bot send 30 messages a second in
# all), far below a flood. Excess gets a `rate_limited` error, never a silent drop.
SEND_RATE_PER_S = 20.0
SEND_BURST = 100
# Buckets of users idle long enough to be full again are forgotten past this many entries.
BUCKETS_MAX = 100_000


class Delivery(PresenceMixin, AnnouncementsMixin, PushesMixin, ReceiptsMixin, GroupsMixin, SignalsMixin, ReadsMixin):
    """The worker's brain. Not thread-safe: the worker's network thread alone drives it."""

    def __init__(self, *, content_max: int = p.CONTENT_MAX, ack_timeout_ms: int = PUSH_ACK_TIMEOUT_MS,
                 max_retries: int = PUSH_MAX_RETRIES, backoff: float = PUSH_BACKOFF,
                 send_rate: float = SEND_RATE_PER_S, send_burst: int = SEND_BURST,
                 receipt_delay_ms: int = RECEIPT_DELAY_MS, announce_repeat_ms: int = ANNOUNCE_REPEAT_MS,
                 announce_repeat_max_ms: int = ANNOUNCE_REPEAT_MAX_MS, announce_min_gap_ms: int = ANNOUNCE_MIN_GAP_MS,
                 owns: Callable[[str], bool] | None = None):
        """``owns(uid)``: with partitioned workers (backend/partition.py), whether this worker owns ``uid``;
        presence is still tracked for every user (pushes go to anyone online), but the announcements every
        worker would make alike (after a live ``online``, after another worker's ``gone``) and the derived user
        status are left to the owner, so a device hears them once. None: every uid is this worker's."""
        self.owns = owns
        self.content_max = content_max
        self.ack_timeout_ms = ack_timeout_ms
        self.max_retries = max_retries
        self.backoff = backoff
        self.send_rate, self.send_burst = send_rate, send_burst
        self._buckets: dict[str, tuple[float, int]] = {}  # uid -> (tokens, at ms)
        # Presence per device: a user is online while any of its devices is (the default device "" by the
        # last word on im/status/{uid}). `online` holds the users, `_devices` each one's online devices.
        self.online: set[str] = set()
        self._devices: dict[str, set[str]] = {}
        self._aware: set[str] = set()  # users seen with device-aware devices: their user status is derived
        self._published: dict[str, str] = {}  # the derived status last published per user (since connect)
        self._unpushed: dict[Key, int] = {}  # partitions: another partition's devices stored for, unpushed (ms)
        self._pending: dict[tuple[str, str, int], _Pending] = {}
        self._timers: list[tuple[int, str, str, int]] = []  # (deadline, receiver, device, seq), lazily invalidated
        self.receipt_delay_ms = receipt_delay_ms
        self._held: dict[Key, tuple[int, list[dict[str, Any]]]] = {}  # sender's device -> (due, batched receipts)
        self._progress: dict[Key, tuple[int, dict[tuple[int, str], dict[str, Any]]]] = {}  # group receipts (groups.py)
        self.announce_repeat_ms, self.announce_repeat_max_ms = announce_repeat_ms, announce_repeat_max_ms
        self.announce_min_gap_ms = announce_min_gap_ms
        self._watch: dict[Key, _Watch] = {}
        self._announce_timers: list[tuple[int, str, str]] = []  # (due, uid, device), lazily invalidated
        self._init_signals()  # typing notices (signals.py)

    # -- inbound -------------------------------------------------------------
    def plan(self, inbound: list[tuple], now_ms: int) -> Plan:
        """Turn a batch of (topic, payload) into store operations and replies that need no store (errors,
        the derived user status). The announcements that are due come first (``inbound`` may be empty:
        see announcements_due). An item may carry a third element, True for a retained replay, and a fourth,
        ``p.parse_topic(topic)`` (the transport parsed it already: not parsed twice per packet)."""
        plan = Plan()
        self._plan_due_announcements(plan, now_ms)
        for item in inbound:
            n = len(item)
            self._plan_one(plan, item[0], item[1], now_ms, n > 2 and bool(item[2]), item[3] if n > 3 else False)
        return plan

    def _plan_one(self, plan: Plan, topic: str, payload: bytes, now_ms: int, retained: bool = False,
                  parsed: p.Topic | None | bool = False) -> None:
        if topic.startswith(WORKER_TOPIC_PREFIX):
            if payload.strip() == p.WORKER_GONE:
                self.worker_gone(now_ms)
            return
        if parsed is False:  # not given
            parsed = p.parse_topic(topic)
        if parsed is None or parsed.kind in ("inbox", "reply"):
            return  # not ours to answer: no valid uid to reply to (logged by the transport)
        uid, dev = parsed.uid, parsed.device
        if parsed.kind == "status":
            self._presence(plan, uid, dev, p.parse_status(payload), now_ms, retained)
            return
        try:
            if parsed.kind == "send":
                allowed = self._take_token(uid, now_ms)  # every payload on send counts, valid or not
                m = p.parse_send(payload, self.content_max)
                if not allowed:
                    raise p.ProtocolError("rate_limited", f"more than {self.send_rate:g} messages a second "
                                          f"(bursts of {self.send_burst}); send it again later", msg_id=m.msg_id)
                if m.group is not None:  # the store names the member devices; pushed after the commit
                    plan.ops.append(StoreMessage(sender=uid, msg_id=m.msg_id, to=m.to, type=m.type, content=m.content,
                                                 ts=m.ts, sent_at=now_ms, batch_receipts=m.batch_receipts,
                                                 sender_device=dev, group=m.group))
                    return
                push_to = self._push_targets(m.to, uid, dev)
                plan.ops.append(StoreMessage(sender=uid, msg_id=m.msg_id, to=m.to, type=m.type,
                                             content=m.content, ts=m.ts, sent_at=now_ms,
                                             push=m.to in self.online, batch_receipts=m.batch_receipts,
                                             sender_device=dev, push_to=push_to))
            elif parsed.kind == "ack":
                a = p.parse_ack(payload)
                if a.seqs:
                    plan.ops.append(DeleteAcked(receiver=uid, seqs=a.seqs, device=dev))
            else:
                r = p.parse_request(payload)
                if isinstance(r, (p.TypingRequest, p.ReadRequest, p.SettingsRequest)):
                    self._plan_conversation(plan, uid, dev, r, now_ms)  # reads.py, signals.py
                elif isinstance(r, p.CountRequest):
                    plan.ops.append(CountBacklog(receiver=uid, req_id=r.req_id, device=dev))
                elif isinstance(r, p.PullRequest):
                    plan.ops.append(PullPage(receiver=uid, req_id=r.req_id, limit=r.limit, from_uid=r.from_uid,
                                             ack=r.ack, order=r.order, device=dev, scope=r.scope, after=r.after))
                elif isinstance(r, p.DevicesRequest):
                    plan.ops.append(ListDevices(receiver=uid, req_id=r.req_id, device=dev))
                elif isinstance(r, p.GroupRequest):
                    plan.ops.append(GroupOp(receiver=uid, req_id=r.req_id, device=dev, request=r))
                elif isinstance(r, p.HistoryRequest):
                    plan.ops.append(ReadHistory(receiver=uid, req_id=r.req_id, device=dev, request=r))
                elif isinstance(r, p.ConversationsRequest):
                    plan.ops.append(ListConversations(receiver=uid, req_id=r.req_id, device=dev, request=r))
                elif isinstance(r, p.RemoveDeviceRequest):
                    plan.ops.append(RemoveDevice(receiver=uid, req_id=r.req_id, device=dev, target=r.device))
                else:
                    plan.ops.append(SetPushEndpoint(receiver=uid, req_id=r.req_id, device=dev, endpoint=r.endpoint))
        except p.ProtocolError as e:
            plan.replies.append(Publish(p.reply_topic(uid, dev), e.to_wire()))

    def _push_targets(self, to: str, sender: str, sender_device: str) -> frozenset[Key]:
        """The receiver's online devices and the sender's other online devices (sync copies)."""
        devices = self._devices
        mine = devices.get(sender) if sender != to else None
        if mine and (len(mine) > 1 or sender_device not in mine):
            return frozenset([(to, d) for d in devices.get(to, ())] + [(sender, d) for d in mine if d != sender_device])
        # The common case: no other device of the sender's online (v1 clients, one device each).
        return frozenset([(to, d) for d in devices.get(to, ())])

    def _take_token(self, uid: str, now_ms: int) -> bool:
        if self.send_rate <= 0:
            return True
        tokens, at = self._buckets.get(uid, (float(self.send_burst), now_ms))
        tokens = min(float(self.send_burst), tokens + (now_ms - at) * self.send_rate / 1000)
        ok = tokens >= 1
        self._buckets[uid] = (tokens - 1 if ok else tokens, now_ms)
        if len(self._buckets) > BUCKETS_MAX:
            full_after_ms = self.send_burst / self.send_rate * 1000
            self._buckets = {u: b for u, b in self._buckets.items() if now_ms - b[1] < full_after_ms}
        return ok

    # -- after the transaction committed ----------------------------------------
    def after_commit(self, outcomes: list[Outcome], now_ms: int) -> list[Publish]:
        """Publishes for a committed transaction, in outcome order. Batched receipts are held (per
        sender, up to receipt_delay_ms) and come out of flush_receipts() as one `receipts` payload."""
        out: list[Publish] = []
        batched: dict[Key, list[dict[str, Any]]] = {}  # sender's device -> its receipts, in order
        for o in outcomes:
            if isinstance(o, Stored):
                if o.op.group is None:
                    self._stored(out, batched, o, now_ms)
                else:
                    self._stored_group(out, batched, o, now_ms)
            elif isinstance(o, GroupAnswered):
                self._group_answered(out, o, now_ms)
            elif isinstance(o, TypingMembers):
                self._typing_to_group(out, o)  # signals.py
            elif isinstance(o, HistoryPage):
                r = o.op.request
                conv = {"with": r.with_uid} if r.with_uid is not None else {"group": r.group}
                last = o.messages[-1]["seq"] if o.messages else None
                out.append(Publish(p.reply_topic(*o.op.origin), {"kind": "history", "req_id": o.op.req_id, **conv,
                                                                  "messages": list(o.messages), "before": last,
                                                                  "more": o.more}))
            elif isinstance(o, ConversationList):
                last = o.conversations[-1]["last_seq"] if o.conversations else None
                out.append(Publish(p.reply_topic(*o.op.origin), {
                    "kind": "conversations", "req_id": o.op.req_id, "conversations": list(o.conversations),
                    "before": last, "more": o.more}))
            elif isinstance(o, Deleted):
                self._delivered(out, batched, o.rows, now_ms)
            elif isinstance(o, Counted):
                key = o.op.origin
                payload: dict[str, Any] = {"kind": "count", "total": o.total, "by_sender": o.by_sender,
                                           "previews": o.previews, "expired": o.expired}
                if o.by_group:
                    payload["by_group"] = o.by_group
                if o.total == 0:
                    self._backlog_empty(key)
                elif o.op.req_id is not None:
                    self._backlog_read(key, now_ms)
                if o.unread is not None:
                    payload["unread"], payload["read_by"] = o.unread, o.read_by or {}
                if o.unread_groups:
                    payload["unread_groups"] = o.unread_groups
                if o.op.req_id is not None:
                    payload["req_id"] = o.op.req_id
                elif o.total == 0 and o.expired == 0:
                    continue  # nothing waits: no announcement
                out.append(Publish(p.reply_topic(*key), p.fit_count(payload)))
            elif isinstance(o, Paged):
                self._paged(out, batched, o, now_ms)
            elif isinstance(o, Refused):
                op = o.op
                ids: dict[str, str | None] = {}
                if isinstance(op, StoreMessage):
                    ids["msg_id"] = op.msg_id
                elif not isinstance(op, DeleteAcked):
                    ids["req_id"] = op.req_id
                out.append(Publish(p.reply_topic(*op.origin), p.error_payload(o.code, o.message, **ids)))
            elif isinstance(o, Listed):
                uid = o.op.receiver
                devices = [{**d, "online": self.is_online(uid, d["device"])} for d in o.devices]
                out.append(Publish(p.reply_topic(*o.op.origin), {"kind": "devices", "req_id": o.op.req_id,
                                                                  "devices": devices}))
            elif isinstance(o, DeviceRemoved):
                uid, target = o.op.receiver, o.op.target
                self._watch.pop((uid, target), None)
                for key in [k for k in self._pending if k[0] == uid and k[1] == target]:
                    del self._pending[key]
                out.append(Publish(p.reply_topic(*o.op.origin), {"kind": "removed", "req_id": o.op.req_id,
                                                                  "device": target, "released": o.released}))
            elif isinstance(o, PushEndpointSet):
                out.append(Publish(p.reply_topic(*o.op.origin), {"kind": "push", "req_id": o.op.req_id,
                                                                  "registered": o.op.endpoint is not None}))
            elif isinstance(o, CONVERSATION_OUTCOMES):
                self._conversation_done(out, batched, o, now_ms)  # reads.py
            elif isinstance(o, DeviceReset):
                out.append(Publish(p.reply_topic(o.uid, o.device), device_removed_payload()))
        for key, items in batched.items():
            held = self._held.get(key)
            if held is None:
                self._held[key] = (now_ms + self.receipt_delay_ms, items)
            else:
                held[1].extend(items)
        if self.receipt_delay_ms <= 0:
            out.extend(self.flush_receipts(now_ms))
        return out

    def _paged(self, out: list[Publish], batched: dict[Key, list[dict[str, Any]]], o: Paged, now_ms: int) -> None:
        key = o.op.origin
        if o.op.scope == "user":  # read-only: no cursor, nothing acked, no bearing on announcements
            last = o.messages[-1]["seq"] if o.messages else o.op.after
            out.append(Publish(p.reply_topic(*key), {
                "kind": "page", "req_id": o.op.req_id, "scope": "user", "messages": list(o.messages),
                "cursor": None, "after": last, "more": o.more}))
            return
        if o.messages:
            self._backlog_read(key, now_ms)
        elif o.op.from_uid is None:
            self._backlog_empty(key)  # the drain reached its end
        self._delivered(out, batched, o.deleted, now_ms)
        out.append(Publish(p.reply_topic(*key), {
            "kind": "page", "req_id": o.op.req_id, "messages": list(o.messages),
            "cursor": o.cursor, "more": o.more}))
