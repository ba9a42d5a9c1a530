"""Presence per device: who is online (rebuilt from the status topics), the derived user status the
worker publishes for users with device-aware devices, and forgetting a device that went offline.
A mixin of :class:`backend.core.Delivery` (it uses the state Delivery.__init__ sets up)."""

from __future__ import annotations

from .. import protocol as p
from .events import GroupAnswered, Key, Outcome, Plan, Publish, Stored

# Partitioned workers: a worker that stores an entry for another partition's device it counts offline remembers
# the device, and if that device's live `online` reaches it within this long, it announces the device itself.
# The owner's announcement came when the owner heard that `online`, perhaps before this entry was stored: a
# cluster can hand the same status to two workers seconds apart (NATS re-delivered a dead node's statuses 3-6 s
# late, tests/test_cluster.py). Two minutes is over twice the longest JetStream stall measured here (20-40 s,
# tests/services.py JETSTREAM_RECOVERY_S); older entries were counted by the owner's announcement anyway.
UNPUSHED_WINDOW_MS = 120_000
# Bound on the devices remembered so (memory); past it the oldest is forgotten (the owner's count covers it
# unless its `online` is late, the case above).
UNPUSHED_MAX = 100_000
# Such a worker counts this long after hearing the `online`: the owner's announcement and the device's sync (a
# pull and its ack: milliseconds, about a second under load) come first, and a count that then finds nothing
# sends nothing. So the device hears one announcement, its owner's, unless this worker's entry came after the
# owner's count (the case above): one announcement per device, not one per worker (docs/PROTOCOL.md 10.2).
UNPUSHED_ANNOUNCE_DELAY_MS = 3000


class PresenceMixin:
    """The presence half of Delivery (``self._devices``, ``self.online``, ``self._aware``...)."""

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
            late = self._unpushed.pop((uid, dev), None) if self._unpushed else None
            if retained or self.mine(uid):
                self._watch_fresh((uid, dev))
                # A v1 `online` registers the default device unless it may be our own derived word (the user has
                # device-aware devices; echoes can arrive late) or a retained replay: then a v1 client is
                # registered by its first send, ack or request instead.
                register = bool(dev) or not (retained or uid in self._aware)
                self._plan_announcement(plan, uid, dev, now_ms, register)
            elif late is not None and now_ms - late <= UNPUSHED_WINDOW_MS:
                # Another partition's device, told by its owner, maybe before what we stored for it meanwhile.
                self._announce_later(uid, dev, now_ms)
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

    def _not_pushed(self, uid: str, dev: str, now_ms: int) -> None:
        """An entry was stored for (uid, dev) and not pushed (the device is offline as far as this worker knows).
        The owner of ``uid`` announces the device at its next `online`; another partition's worker remembers
        it, so that a late `online` (heard after the owner's count, which may predate this entry) is announced
        here too (UNPUSHED_WINDOW_MS), after the owner's (UNPUSHED_ANNOUNCE_DELAY_MS). A device that is online by
        now heard its `online` within this batch, after the message was planned: announced so at once."""
        if self.owns is None or self.owns(uid):
            return
        key = (uid, dev)
        if self.is_online(uid, dev):
            self._announce_later(uid, dev, now_ms)
            return
        unpushed = self._unpushed
        unpushed.pop(key, None)  # re-inserted last: the oldest go first past the bound
        unpushed[key] = now_ms
        if len(unpushed) > UNPUSHED_MAX:
            del unpushed[next(iter(unpushed))]

    def _announce_later(self, uid: str, dev: str, now_ms: int) -> None:
        """A non-owner's count for the device, UNPUSHED_ANNOUNCE_DELAY_MS from now (after the owner's)."""
        w = self._watch_fresh((uid, dev))
        due = now_ms + UNPUSHED_ANNOUNCE_DELAY_MS
        if w is not None and (w.due is None or due < w.due):
            self._set_due(w, (uid, dev), due)

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
        out = []
        for o in outcomes:
            if isinstance(o, Stored) and o.op.group is None:
                if not o.duplicate and not self.user_online(o.op.to):
                    out.append((o.op.to, o.seq))
            elif isinstance(o, (Stored, GroupAnswered)):  # a group message or membership change: its members
                seq = o.seq if isinstance(o, Stored) else o.events[-1].seq if o.events else 0
                out += [(uid, seq) for uid in sorted(self.group_offline_members(o))]
        return out

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
