"""Presence per device: who is online (rebuilt from the status topics), the derived user status the
worker publishes for users with device-aware devices, and forgetting a device that went offline.
A mixin of :class:`backend.core.Delivery` (it uses the state Delivery.__init__ sets up)."""

from __future__ import annotations

from .. import protocol as p
from .events import GroupAnswered, Key, Outcome, Plan, Publish, Stored


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
