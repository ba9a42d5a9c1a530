"""The delivery logic, sans I/O: events in, operations and actions out.

No sockets, no database handles, no clock: the transport hands the core what
arrived (a topic and payload) and the time, and the core answers with

* a :class:`Plan` - the store operations to run in ONE transaction, and the
  replies that need no store (validation errors); and then, once that
  transaction committed, with
* :class:`Publish` actions computed from the store's :class:`Outcome`.

So "store first, ack after commit" is a property of the call order: nothing is
published and no inbound packet is acknowledged before ``after_commit``.  A
crash between any two steps is a unit test (tests/test_core.py).

The core also owns the in-memory state that is allowed to be lost: who is
online (rebuilt from retained status topics), which pushes await an ack
(retransmitted with backoff, then left for pull), and which online receivers
are owed a count announcement (``CountBacklog(uid, None)``) because something
of theirs waits that they may not know of. Its liveness rule: no receiver that
stays online is left unaware of a stored message (docs/PROTOCOL.md, section 1):

* every ``online`` a device publishes is answered by an announcement, not only
  a change of state;
* a push that runs out of retries, or is never tracked (table full), while its
  receiver is online queues an announcement; so does a ``duplicate`` for a
  message still stored for an online receiver that this worker is not pushing
  (another worker stored it, and may have died before pushing);
* an announcement can itself be dropped (a broker drops QoS 1 messages past its
  queue limit): while a receiver stays online with a non-empty backlog and does
  not pull, it is announced again, ANNOUNCE_REPEAT_MS doubling up to
  ANNOUNCE_REPEAT_MAX_MS; an empty count or an empty page ends it.

Queued announcements come out of the next :meth:`Delivery.plan` (the transport
plans one with no inbound packets when :meth:`Delivery.announcements_due` says
so) and :meth:`Delivery.next_deadline` says when the next is due.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Any, Callable

from . import protocol as p

WORKER_TOPIC_PREFIX = p.WORKER_TOPIC_FILTER[:-1]  # im/worker/

# --- timing defaults --------------------------------------------------------
# MobileIMSDK resends an unacked message after 2-3 s (its QoS4 "resend interval").
PUSH_ACK_TIMEOUT_MS = 3000
# MobileIMSDK gives up after 2 resends; we do the same, then the message waits for pull.
PUSH_MAX_RETRIES = 2
# Each retry waits twice as long as the one before (3 s, 6 s): a slow link gets room.
PUSH_BACKOFF = 2.0
# Per-user send rate, a token bucket: 20 messages a second sustained, bursts of 100. Far above a
# person typing or a phone flushing its outbox (Telegram lets a bot send 30 messages a second in
# all), far below a flood. Excess gets a `rate_limited` error, never a silent drop.
SEND_RATE_PER_S = 20.0
SEND_BURST = 100
# Buckets of users idle long enough to be full again are forgotten past this many entries.
BUCKETS_MAX = 100_000
# A sender's batched receipts wait at most this long for more of its receipts, from later transactions,
# before they go out in one payload. The worker commits as soon as anything waits, so on a slow broker
# (amqtt hands it one or two sends per transaction) one payload per transaction is nearly one per
# message. 10 ms is nothing beside a sender's 3 s resend timer.
RECEIPT_DELAY_MS = 10
# One `receipts` payload holds at most this many: a receipt is at most ~560 bytes (a 70-byte msg_id escaped
# at worst), so 1,000 stay under REPLY_PAYLOAD_MAX (1 MiB) even when a busy sender's receipts of several
# transactions are gathered; a page's ack (500 deletions) still fits in one.
RECEIPTS_PER_PAYLOAD_MAX = 1000
# Bound the retransmit table so a flood of unacked pushes cannot grow memory without end;
# past it new pushes are not tracked: their receiver gets an announcement instead (the store has them).
PENDING_PUSH_MAX = 100_000
# An online receiver with messages waiting that has not pulled since its last announcement is announced
# to again after 30 s (the first announcement may have been dropped by the broker): a person looking at
# a connected app waits no longer than that for a message it was never told of, and 30 s is far above
# a drain's round trips (milliseconds) and the client's own request timeout (10 s).
ANNOUNCE_REPEAT_MS = 30_000
# ...doubling up to 10 minutes: a receiver that stays connected but never pulls (a broken app, a paused
# device) costs one count query every 10 minutes, and a dropped announcement is still repaired.
ANNOUNCE_REPEAT_MAX_MS = 600_000
# Announcements queued by pushes that ran out of retries or by duplicates are at least 1 s apart per
# receiver: a burst of 480 exhausted pushes costs one count, not 480, and one second is nothing beside
# the 21 s a push takes to run out of retries.
ANNOUNCE_MIN_GAP_MS = 1000
# Bound on the receivers being watched for repeated announcements (memory); past it a new receiver still
# gets its announcements from `online` and exhausted pushes, but no repeat if one is dropped.
ANNOUNCE_WATCH_MAX = 100_000
# When another worker is gone, every receiver online is re-announced, spread over this long: 10,000
# online receivers cost 10,000 small counts, which must not stall live traffic in one transaction.
WORKER_GONE_SPREAD_MS = 10_000


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


Operation = StoreMessage | DeleteAcked | CountBacklog | PullPage | ListDevices | RemoveDevice | SetPushEndpoint


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


@dataclass(frozen=True)
class Stored:
    op: StoreMessage
    seq: int
    duplicate: bool = False
    to: str = ""  # the first message's receiver, for a duplicate
    waiting: bool = False  # for a duplicate: the first message is still stored (not acked, not expired)
    # The (uid, device) entries the message got: the receiver's devices, then the sender's other devices
    # (sync copies). Empty means the receiver's default device alone (v1, and unit tests).
    devices: tuple[tuple[str, str], ...] = ()


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


Outcome = Stored | Deleted | Counted | Paged | Refused | Listed | DeviceRemoved | PushEndpointSet | DeviceReset


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


@dataclass
class _Watch:
    """An online receiver owed (repeated) announcements while its backlog may be unknown to it."""

    due: int | None  # when the next announcement is planned (ms); None: none planned
    wait: int  # the wait after the next announcement before the one after it
    last: int | None = None  # when the last announcement was planned


@dataclass
class _Pending:
    receiver: str
    device: str
    seq: int
    payload: dict[str, Any]
    attempts: int
    deadline: int


def push_payload(seq: int, msg_id: str, sender: str, to: str, msg_type: str, content: str, sent_at: int,
                 ts: int | None = None, copy_from: str | None = None) -> dict[str, Any]:
    """A message as pushed or paged. ``copy_from`` (not None): a sync copy of what the user itself sent,
    from that device ("" the default device), marked ``"copy": true`` (and ``"device"``)."""
    out = {"kind": "msg", "seq": seq, "msg_id": msg_id, "from": sender, "to": to,
           "type": msg_type, "content": content, "sent_at": sent_at}
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


class Delivery:
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
        self._pending: dict[tuple[str, str, int], _Pending] = {}
        self._timers: list[tuple[int, str, str, int]] = []  # (deadline, receiver, device, seq), lazily invalidated
        self.receipt_delay_ms = receipt_delay_ms
        self._held: dict[Key, tuple[int, list[dict[str, Any]]]] = {}  # sender's device -> (due, batched receipts)
        self.announce_repeat_ms, self.announce_repeat_max_ms = announce_repeat_ms, announce_repeat_max_ms
        self.announce_min_gap_ms = announce_min_gap_ms
        self._watch: dict[Key, _Watch] = {}
        self._announce_timers: list[tuple[int, str, str]] = []  # (due, uid, device), lazily invalidated

    # -- inbound -------------------------------------------------------------
    def plan(self, inbound: list[tuple], now_ms: int) -> Plan:
        """Turn a batch of (topic, payload) into store operations and replies that need no store (errors,
        the derived user status). The announcements that are due come first (``inbound`` may be empty:
        see announcements_due). An item may carry a third element, True for a retained replay."""
        plan = Plan()
        self._plan_due_announcements(plan, now_ms)
        for item in inbound:
            self._plan_one(plan, item[0], item[1], now_ms, len(item) > 2 and bool(item[2]))
        return plan

    def _plan_one(self, plan: Plan, topic: str, payload: bytes, now_ms: int, retained: bool = False) -> None:
        if topic.startswith(WORKER_TOPIC_PREFIX):
            if payload.strip() == p.WORKER_GONE:
                self.worker_gone(now_ms)
            return
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
                if isinstance(r, p.CountRequest):
                    plan.ops.append(CountBacklog(receiver=uid, req_id=r.req_id, device=dev))
                elif isinstance(r, p.PullRequest):
                    plan.ops.append(PullPage(receiver=uid, req_id=r.req_id, limit=r.limit, from_uid=r.from_uid,
                                             ack=r.ack, order=r.order, device=dev, scope=r.scope, after=r.after))
                elif isinstance(r, p.DevicesRequest):
                    plan.ops.append(ListDevices(receiver=uid, req_id=r.req_id, device=dev))
                elif isinstance(r, p.RemoveDeviceRequest):
                    plan.ops.append(RemoveDevice(receiver=uid, req_id=r.req_id, device=dev, target=r.device))
                else:
                    plan.ops.append(SetPushEndpoint(receiver=uid, req_id=r.req_id, device=dev, endpoint=r.endpoint))
        except p.ProtocolError as e:
            plan.replies.append(Publish(p.reply_topic(uid, dev), e.to_wire()))

    def _push_targets(self, to: str, sender: str, sender_device: str) -> frozenset[Key]:
        """The receiver's online devices and the sender's other online devices (sync copies)."""
        out = [(to, d) for d in self._devices.get(to, ())]
        if sender != to:
            out += [(sender, d) for d in self._devices.get(sender, ()) if d != sender_device]
        return frozenset(out)

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

    # -- presence, per device ------------------------------------------------------
    def _presence(self, plan: Plan, uid: str, dev: str, status: str | None, now_ms: int,
                  retained: bool = False) -> None:
        if status is None:
            return  # any other word (a client's "away") says nothing about reachability: ignored
        if dev:
            self._aware.add(uid)
        elif uid in self._aware and status == p.OFFLINE and self._published.get(uid) == p.OFFLINE:
            # Our own derived `offline` coming back (or a v1 client's will that agrees with it): the default
            # device keeps its last state, so a v1 client beside device-aware ones is not cut off by our echo.
            return
        if status == p.ONLINE:
            # Every `online`, not only a change: a device that reconnected after a drop the worker never
            # saw (it still counted it online) publishes `online` again, and must hear what waits.
            self._devices.setdefault(uid, set()).add(dev)
            self.online.add(uid)
            # Partitions: the owner alone announces a live `online`; a retained replay (this worker's own
            # (re)connection) is announced by the worker that hears it, which may have stored messages for the
            # user, unpushed, before it knew the user online (the owner never heard of those).
            if retained or self.mine(uid):
                self._watch_fresh((uid, dev))
                # A v1 `online` registers the default device unless it may be our own derived word (the user has
                # device-aware devices; echoes can arrive late) or a retained replay: then a v1 client is
                # registered by its first send, ack or request instead.
                register = bool(dev) or not (retained or uid in self._aware)
                self._plan_announcement(plan, uid, dev, now_ms, register)
        else:
            self.set_offline(uid, dev)
        if uid in self._aware:
            self._derive(plan, uid, None if dev else status)

    def user_status(self, uid: str) -> str:
        """The derived user status: online while any device-aware device of the user is online. (The
        default device does not count for a user with device-aware devices: its word on im/status/{uid}
        is the one we publish; docs/PROTOCOL.md, "Devices", the mixed case.)"""
        return p.ONLINE if any(self._devices.get(uid, ())) else p.OFFLINE

    def _derive(self, plan: Plan, uid: str, word_there: str | None) -> None:
        """Publish the derived user status (retained) when it changed, or when a word on im/status/{uid}
        (``word_there``: a v1 client's will, a stale echo) contradicts it. Several workers publish the same
        word: idempotent. One device leaving while another stays changes nothing: no flicker."""
        derived = self.user_status(uid)
        if derived != self._published.get(uid) or (word_there is not None and word_there != derived):
            self._published[uid] = derived
            if self.mine(uid):  # partitions: published by the owner alone
                plan.replies.append(Publish(p.status_topic(uid), derived, retain=True))

    def set_offline(self, uid: str, device: str = "") -> None:
        """Forget a device's presence, its pending pushes and announcements: they wait for its next pull."""
        devs = self._devices.get(uid)
        if devs is not None:
            devs.discard(device)
            if not devs:
                del self._devices[uid]
                self.online.discard(uid)
        self._watch.pop((uid, device), None)
        for key in [k for k in self._pending if k[0] == uid and k[1] == device]:
            del self._pending[key]

    def mine(self, uid: str) -> bool:
        """Is ``uid`` this worker's (always, unless partitioned: see ``owns``)?"""
        return self.owns is None or self.owns(uid)

    def is_online(self, uid: str, device: str = "") -> bool:
        return device in self._devices.get(uid, ())

    def online_devices(self) -> set[Key]:
        """Every (uid, device) online now: housekeeping never removes these as silent."""
        return {(u, d) for u, devs in self._devices.items() for d in devs}

    def offline_receivers(self, outcomes: list[Outcome]) -> list[tuple[str, int]]:
        """(receiver, seq) of the messages just stored for a user none of whose devices is online: the hook
        for push notifications (backend/push.py; the store's push_endpoints(uid) names the endpoints)."""
        return [(o.op.to, o.seq) for o in outcomes
                if isinstance(o, Stored) and not o.duplicate and not self.user_online(o.op.to)]

    def user_online(self, uid: str) -> bool:
        devs = self._devices.get(uid, ())
        return any(devs) if uid in self._aware else bool(devs)

    def reset_presence(self) -> None:
        """Called on (re)connect to the broker: retained statuses will rebuild presence (and announce)."""
        self.online.clear()
        self._devices.clear()
        self._published.clear()
        self._pending.clear()
        self._timers.clear()
        self._watch.clear()
        self._announce_timers.clear()

    # -- announcements (per device) ---------------------------------------------------
    def _watch_fresh(self, key: Key) -> _Watch | None:
        """The device's watch with its backoff reset (new evidence that something may wait for it)."""
        w = self._watch.get(key)
        if w is None:
            if len(self._watch) >= ANNOUNCE_WATCH_MAX:
                return None
            w = self._watch[key] = _Watch(due=None, wait=self.announce_repeat_ms)
        w.wait = self.announce_repeat_ms
        return w

    def _set_due(self, w: _Watch, key: Key, due: int) -> None:
        w.due = due
        heapq.heappush(self._announce_timers, (due, key[0], key[1]))

    def _plan_announcement(self, plan: Plan, uid: str, dev: str, now_ms: int, register: bool = False) -> None:
        """Count for an announcement in this plan; the next one is due after the watch's wait (doubling),
        unless the count finds nothing or the device pulls meanwhile."""
        plan.ops.append(CountBacklog(receiver=uid, req_id=None, device=dev, register=register or bool(dev)))
        w = self._watch.get((uid, dev))
        if w is not None:
            w.last = now_ms
            self._set_due(w, (uid, dev), now_ms + w.wait)
            w.wait = min(w.wait * 2, self.announce_repeat_max_ms)

    def announce(self, uid: str, now_ms: int, device: str | None = None) -> None:
        """Queue a count announcement for the device (None: each online device of ``uid``): planned at once,
        or ANNOUNCE_MIN_GAP_MS after the last one (bursts coalesce). Ignored for a device not online."""
        devices = tuple(self._devices.get(uid, ())) if device is None else (device,)
        for dev in devices:
            if not self.is_online(uid, dev):
                continue
            w = self._watch_fresh((uid, dev))
            if w is None:
                continue
            earliest = now_ms if w.last is None else max(now_ms, w.last + self.announce_min_gap_ms)
            if w.due is None or earliest < w.due:
                self._set_due(w, (uid, dev), earliest)

    def worker_gone(self, now_ms: int) -> None:
        """Another worker ended: pushes it was retransmitting and acks in flight to it died with it (worker
        sessions are clean), so every receiver online gets an announcement, spread over WORKER_GONE_SPREAD_MS
        (a count that finds nothing sends nothing)."""
        online = sorted(k for k in self.online_devices() if self.mine(k[0]))  # partitions: the owner's job
        for i, key in enumerate(online):
            w = self._watch_fresh(key)
            if w is None:
                return
            due = now_ms + i * WORKER_GONE_SPREAD_MS // len(online)
            if w.due is None or due < w.due:
                self._set_due(w, key, due)

    def _announce_deadline(self) -> int | None:
        timers = self._announce_timers
        while timers:
            due, uid, dev = timers[0]
            w = self._watch.get((uid, dev))
            if w is not None and w.due == due and self.is_online(uid, dev):
                return due
            heapq.heappop(timers)
        return None

    def announcements_due(self, now_ms: int) -> bool:
        """Is an announcement due? Then the transport plans a batch even with nothing inbound."""
        due = self._announce_deadline()
        return due is not None and due <= now_ms

    def _plan_due_announcements(self, plan: Plan, now_ms: int) -> None:
        while True:
            due = self._announce_deadline()
            if due is None or due > now_ms:
                return
            _, uid, dev = heapq.heappop(self._announce_timers)
            self._plan_announcement(plan, uid, dev, now_ms)

    def _backlog_empty(self, key: Key) -> None:
        self._watch.pop(key, None)

    def _backlog_read(self, key: Key, now_ms: int) -> None:
        """The device pulled (or counted) and something waits: it knows. Remind it only if it then goes quiet."""
        w = self._watch.get(key)
        if w is not None:
            self._set_due(w, key, now_ms + self.announce_repeat_ms)

    # -- after the transaction committed ----------------------------------------
    def after_commit(self, outcomes: list[Outcome], now_ms: int) -> list[Publish]:
        """Publishes for a committed transaction, in outcome order. Batched receipts are held (per
        sender, up to receipt_delay_ms) and come out of flush_receipts() as one `receipts` payload."""
        out: list[Publish] = []
        batched: dict[Key, list[dict[str, Any]]] = {}  # sender's device -> its receipts, in order
        for o in outcomes:
            if isinstance(o, Stored):
                self._stored(out, batched, o, now_ms)
            elif isinstance(o, Deleted):
                self._delivered(out, batched, o.rows)
            elif isinstance(o, Counted):
                key = o.op.origin
                payload: dict[str, Any] = {"kind": "count", "total": o.total, "by_sender": o.by_sender,
                                           "previews": o.previews, "expired": o.expired}
                if o.total == 0:
                    self._backlog_empty(key)
                elif o.op.req_id is not None:
                    self._backlog_read(key, now_ms)
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
        self._delivered(out, batched, o.deleted)
        out.append(Publish(p.reply_topic(*key), {
            "kind": "page", "req_id": o.op.req_id, "messages": list(o.messages),
            "cursor": o.cursor, "more": o.more}))

    def flush_receipts(self, now_ms: int | None = None) -> list[Publish]:
        """The held batched receipts that are due (all of them with ``now_ms`` None), one payload per sender."""
        if not self._held:
            return []
        due = [s for s, (at, _) in self._held.items() if now_ms is None or at <= now_ms]
        out = []
        for s in due:
            items, n = self._held.pop(s)[1], RECEIPTS_PER_PAYLOAD_MAX
            out += [Publish(p.reply_topic(*s), p.receipts(items[i:i + n])) for i in range(0, len(items), n)]
        return out

    @staticmethod
    def _receipt(out: list[Publish], batched: dict[Key, list[dict[str, Any]]], sender: Key, batch: bool,
                 receipt: dict[str, Any]) -> None:
        if batch:
            batched.setdefault(sender, []).append(receipt)
        else:
            out.append(Publish(p.reply_topic(*sender), receipt))

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
        for uid, dev in o.devices or ((op.to, ""),):
            if (uid, dev) in op.push_to and self.is_online(uid, dev):
                if uid == op.to:
                    if shared is None:
                        shared = push_payload(o.seq, op.msg_id, op.sender, op.to, op.type, op.content, op.sent_at, op.ts)
                    push = shared
                else:
                    push = push_payload(o.seq, op.msg_id, op.sender, op.to, op.type, op.content, op.sent_at, op.ts,
                                        op.sender_device)
                out.append(Publish(p.inbox_topic(uid, dev), push))
                self._track(uid, dev, o.seq, push, now_ms)
        self._receipt(out, batched, op.origin, op.batch_receipts, p.receipt(op.msg_id, op.to, o.seq, "stored"))

    def _delivered(self, out: list[Publish], batched: dict[Key, list[dict[str, Any]]],
                   rows: tuple[DeletedRow, ...]) -> None:
        for r in rows:
            self._pending.pop((r.receiver, r.device, r.seq), None)
            if r.receipt:  # the first of the receiver's devices to ack; never a sync copy
                self._receipt(out, batched, (r.sender, r.sender_device), r.batch_receipts,
                              p.receipt(r.msg_id, r.receiver, r.seq, "delivered"))

    # -- retransmission (per device) ----------------------------------------------
    def _track(self, receiver: str, device: str, seq: int, push: dict[str, Any], now_ms: int) -> None:
        if len(self._pending) >= PENDING_PUSH_MAX:
            self.announce(receiver, now_ms, device)  # not tracked, so never retransmitted: tell the device instead
            return
        deadline = now_ms + self.ack_timeout_ms
        self._pending[(receiver, device, seq)] = _Pending(receiver, device, seq, push, 1, deadline)
        heapq.heappush(self._timers, (deadline, receiver, device, seq))

    def next_deadline(self) -> int | None:
        """The earliest time something is due: a push's retransmission, held receipts or an announcement."""
        dues = [min((at for at, _ in self._held.values()), default=None), self._announce_deadline()]
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
            out.append(Publish(p.inbox_topic(entry.receiver, entry.device), entry.payload))
        return out

    def tick(self, now_ms: int) -> list[Publish]:
        """Resend overdue pushes, taking every one as still stored (single worker, tests)."""
        return self.resend(self.due(now_ms), None, now_ms)

    @property
    def pending_pushes(self) -> int:
        return len(self._pending)
