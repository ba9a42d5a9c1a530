"""Storage of a user's devices: registration at first contact (with the cap, adoption and the notice
to a device removed earlier), removal and its released entries, push endpoints, housekeeping of
silent devices, and the read-only pages of a user's scope (docs/PROTOCOL.md, section 12).

:class:`DeviceStore` is a mixin of :class:`backend.store.Store` (it uses the store's database and
settings). Its models are models.py's (Device, Entry, RemovedDevice).
"""

from __future__ import annotations

import time

import peewee as pw

from .. import core
from .. import protocol as p
from .maintenance import PURGE_CHUNK
from .models import Device, Entry, Message, RemovedDevice, now_ms
from .queries import PAGE_FIELDS, _chunks, _for_update

# Devices per user (--max-devices): Signal links up to 5 devices beside the phone; 10 covers a phone, a
# tablet, two computers and several browser tabs, and bounds the entries one message costs (one per device).
MAX_DEVICES = 10
# A device's last_seen is written at most once a minute per worker (not on every message): enough for a
# 14-day silence rule. The same period bounds how long a worker may still take a device removed by another
# worker as registered (it is then registered afresh, and told, at its next contact after that).
DEVICE_SEEN_S = 60.0
DEVICE_SEEN_MAX = 100_000
# Users per push look-up query: a batch names at most 256, but keep any IN list far below SQLite's old
# limit of 999 bound parameters.
PUSH_LOOKUP_CHUNK = 500
# Devices one presence sweep notifies at most: MAX_QUEUED of backend/push.py (10,000) is what the notifier holds;
# a larger backlog of un-notified devices is taken up by the next sweep (after the next reconnection).
PUSH_SWEEP_MAX = 10_000


def _push_query() -> pw.ModelSelect:
    """(uid, device, endpoint, entries waiting, newest waiting seq) per device with a push endpoint and entries."""
    return (Device.select(Device.uid, Device.device, Device.push_endpoint, pw.fn.COUNT(Entry.seq), pw.fn.MAX(Entry.seq))
            .join(Entry, on=((Entry.uid == Device.uid) & (Entry.device == Device.device)))
            .where(Device.push_endpoint.is_null(False))
            .group_by(Device.uid, Device.device, Device.push_endpoint, Device.notified_seq))


def _waiting_per_device(q: pw.ModelSelect) -> list[tuple[str, str, str, int, int]]:
    return [(u, d, e, int(n), int(s)) for u, d, e, n, s in q.tuples()]


class DeviceStore:
    """The device half of the Store (a mixin: ``self.db``, ``self.max_devices``, ``self._seen``...)."""

    def _register(self, op: core.Operation, out: list[core.Outcome]) -> core.Outcome | None:
        """Make sure the device an operation comes from is registered (its first contact registers it) and
        note it was seen (at most once a DEVICE_SEEN_S per worker). Returns a refusal (too_many_devices) or
        None; appends DeviceReset when a removed device comes back."""
        key = op.origin
        mono = time.monotonic()
        if self._seen.get(key, 0.0) > mono:
            return None
        uid, device = key
        now = now_ms()
        if Device.select().where((Device.uid == uid) & (Device.device == device)).exists():
            # Its last_seen is written at the transaction's end, in key order (_write_last_seen): written here, its
            # row lock taken amid the acks' message locks deadlocked with another worker's batch taking them in
            # the other order (PostgreSQL, three workers, every member of a group acking one message).
            self._last_seen[key] = now
            self._note_seen(key, mono)
            return None
        if isinstance(op, core.CountBacklog) and not op.register:
            return None  # an `online` that may be the worker's own derived status coming back (core/presence.py)
        if self.max_devices is not None:
            n = Device.select().where(Device.uid == uid).count()
            if n >= self.max_devices:
                return core.Refused(op, "too_many_devices", f"'{uid}' has {n} devices registered, the most this "
                                    "server keeps; remove one (op remove_device, or `device remove`) and try again")
        if self._deferred:
            self._write_entries(out)  # the messages before this operation were stored before it registered
        inserted = self.db.execute(Device.insert(uid=uid, device=device, registered_at=now, last_seen=now)
                                   .on_conflict_ignore()).rowcount
        if inserted and RemovedDevice.delete().where((RemovedDevice.uid == uid) &
                                                     (RemovedDevice.device == device)).execute():
            out.append(core.DeviceReset(uid, device))
        if inserted and device and not Device.select().where((Device.uid == uid) & (Device.device == "")).exists():
            # The user's first device-aware device adopts what waits for the unregistered default device
            # (stored before the user ever connected, or by the version before devices).
            Entry.update(device=device).where((Entry.uid == uid) & (Entry.device == "")).execute()
        self._note_seen(key, mono)
        return None

    def _seen_fresh(self, key: tuple[str, str]) -> bool:
        """Was this device registered and its last_seen noted lately (its next operation needs no registration)?"""
        return self._seen.get(key, 0.0) > time.monotonic()

    def _write_last_seen(self) -> None:
        """The last_seen updates of this transaction's devices, in (uid, device) order (see _register)."""
        seen, self._last_seen = self._last_seen, {}
        for (uid, device), at in sorted(seen.items()):
            Device.update(last_seen=at).where((Device.uid == uid) & (Device.device == device)).execute()

    def _note_seen(self, key: tuple[str, str], mono: float) -> None:
        if len(self._seen) > DEVICE_SEEN_MAX:
            self._seen.clear()
        # A short expiry age (tests, demos) shortens the period, so last_seen never lags a tenth of it.
        period = DEVICE_SEEN_S if not self.expire_after_ms else min(DEVICE_SEEN_S, self.expire_after_ms / 10_000)
        self._seen[key] = mono + period

    def registered_devices(self, uids) -> dict[str, list[str]]:
        """The registered devices of each of ``uids`` that has any (uid -> device ids, by id); a uid with none is
        left out (its default device "" is implied: it is where its entries go)."""
        uids = list(uids)
        q = self.db.param
        out: dict[str, list[str]] = {}
        for chunk in _chunks(uids):
            for uid, device in self.db.execute_sql(f"SELECT uid, device FROM device WHERE uid IN "
                                                   f"({', '.join([q] * len(chunk))}) ORDER BY uid, device", chunk):
                out.setdefault(uid, []).append(device)
        return out

    def devices(self, uid: str) -> list[dict]:
        """The user's devices: [{"device", "registered_at", "last_seen" (ms), "push" (has an endpoint)}]."""
        return [{"device": d, "registered_at": r, "last_seen": s, "push": e is not None}
                for d, r, s, e in Device.select(Device.device, Device.registered_at, Device.last_seen,
                                                Device.push_endpoint)
                .where(Device.uid == uid).order_by(Device.registered_at, Device.device).tuples()]

    def remove_device(self, uid: str, device: str, now: int | None = None) -> int | None:
        """Unregister a device: its entries are released, a message that waited only for it leaves the store,
        and its id is remembered (it is told when it comes back). Returns the entries released, or None when
        the user has no such device."""
        now = now_ms() if now is None else now
        gone = Device.delete().where((Device.uid == uid) & (Device.device == device)).execute()
        self._seen.pop((uid, device), None)
        seqs = [s for (s,) in Entry.select(Entry.seq).where((Entry.uid == uid) & (Entry.device == device))
                .order_by(Entry.seq).tuples()]
        if not gone and not seqs:
            return None
        for i in range(0, len(seqs), PURGE_CHUNK):
            self._release(uid, device, seqs[i:i + PURGE_CHUNK])
        if gone:
            self.db.execute(RemovedDevice.insert(uid=uid, device=device, removed_at=now).on_conflict_replace()
                            if not isinstance(self.db, pw.PostgresqlDatabase) else
                            RemovedDevice.insert(uid=uid, device=device, removed_at=now).on_conflict(
                                conflict_target=[RemovedDevice.uid, RemovedDevice.device],
                                update={RemovedDevice.removed_at: now}))
        return len(seqs)

    def _release(self, uid: str, device: str, seqs: list[int]) -> None:
        """Delete a device's entries for these seqs, and the messages left with no entry. The messages are
        locked first (in seq order), so two devices releasing the last two entries of one message at once
        (two workers) never both see the other's entry and leave the message behind."""
        q = self.db.param
        marks = ", ".join([q] * len(seqs))
        self.db.execute_sql(f"SELECT seq FROM message WHERE seq IN ({marks}) ORDER BY seq{_for_update(self.db)}",
                            seqs).fetchall()
        self.db.execute_sql(f"DELETE FROM entry WHERE uid = {q} AND device = {q} AND seq IN ({marks})",
                            (uid, device, *seqs))
        if not self.history_ms:  # (kept for history otherwise: history.py)
            self.db.execute_sql(f"DELETE FROM message WHERE seq IN ({marks}) AND NOT EXISTS "
                                "(SELECT 1 FROM entry WHERE entry.seq = message.seq)", seqs)

    def set_push_endpoint(self, op: core.SetPushEndpoint) -> core.Outcome:
        Device.update(push_endpoint=op.endpoint).where(
            (Device.uid == op.receiver) & (Device.device == op.device)).execute()
        return core.PushEndpointSet(op)

    def push_endpoints(self, uid: str) -> dict[str, str]:
        """device -> push endpoint, for the user's devices that registered one (the push notifier's look-up)."""
        return dict(Device.select(Device.device, Device.push_endpoint)
                    .where((Device.uid == uid) & Device.push_endpoint.is_null(False)).tuples())

    def push_targets(self, uids: list[str]) -> list[tuple[str, str, str, int, int]]:
        """(uid, device, endpoint, waiting, newest_seq) for each device of these users that has a push endpoint
        and entries waiting: the worker's notifications after a batch (one query per batch, not per message;
        a user without an endpoint costs an index probe of the device table and nothing more)."""
        out = []
        for i in range(0, len(uids), PUSH_LOOKUP_CHUNK):
            out += _waiting_per_device(_push_query().where(Device.uid.in_(uids[i:i + PUSH_LOOKUP_CHUNK])))
        return out

    def push_sweep(self, limit: int = PUSH_SWEEP_MAX,
                   stored_before_ms: int | None = None) -> list[tuple[str, str, str, int, int]]:
        """(uid, device, endpoint, waiting, newest_seq), like push_targets, for every device with a push endpoint
        whose newest waiting entry is newer than the newest seq it was notified of (``notified_seq``): what no
        notification covers yet, whoever the user is. The worker runs it once presence has settled after each
        (re)connection: a broker that died took its clients' last wills with it, and a killed worker took its
        queued notifications. One grouped query over the devices with an endpoint (at most ``limit`` rows)."""
        q = _push_query()
        if stored_before_ms is not None:  # only what has waited that long: fresh entries may be pushes in flight
            q = q.join(Message, on=(Message.seq == Entry.seq)).where(Message.send_time <= stored_before_ms)
        return _waiting_per_device(q.having(pw.fn.MAX(Entry.seq) > Device.notified_seq).limit(limit))

    def mark_notified(self, notified: list[tuple[str, str, int]]) -> None:
        """Record (uid, device, newest_seq) of notifications a gateway accepted; a seq never moves backwards."""
        with self.db.atomic():
            for uid, device, seq in notified:
                (Device.update(notified_seq=seq)
                 .where((Device.uid == uid) & (Device.device == device) & (Device.notified_seq < seq)).execute())

    def has_push_endpoints(self) -> bool:
        """Has any device a push endpoint? (The worker skips its look-ups while none has.)"""
        return Device.select().where(Device.push_endpoint.is_null(False)).exists()

    def drop_push_endpoint(self, uid: str, device: str, endpoint: str) -> bool:
        """Forget an endpoint its gateway called gone (404/410), unless the device registered another since."""
        return bool(Device.update(push_endpoint=None).where(
            (Device.uid == uid) & (Device.device == device) & (Device.push_endpoint == endpoint)).execute())

    def expire_devices(self, now: int | None = None, online: set[tuple[str, str]] = frozenset()) -> int:
        """Remove the device-aware devices silent for longer than the expiry age (never one in ``online``:
        their last_seen is refreshed first). The default device "" is never removed for silence: a v1 client's
        messages leave by their own age, exactly as before devices. Returns how many were removed."""
        if not self.expire_after_ms:
            return 0
        now = now_ms() if now is None else now
        keys = sorted(online)
        for i in range(0, len(keys), PURGE_CHUNK):
            with self.db.atomic():
                for uid, device in keys[i:i + PURGE_CHUNK]:
                    Device.update(last_seen=now).where((Device.uid == uid) & (Device.device == device)).execute()
        removed = 0
        while True:
            silent = list(Device.select(Device.uid, Device.device).where(
                (Device.last_seen < now - self.expire_after_ms) & (Device.device != ""))
                .order_by(Device.last_seen).limit(PURGE_CHUNK).tuples())
            for uid, device in silent:
                with self.db.atomic():
                    if self.remove_device(uid, device, now) is not None:
                        removed += 1
            if len(silent) < PURGE_CHUNK:
                return removed

    def pull_user(self, op: core.PullPage) -> core.Outcome:
        """Read-only: what waits for ANY of the user's devices (and its sync copies), by seq after
        ``op.after``, each message once; nothing is acked or deleted. A range scan per device (at most
        max_devices), merged."""
        devices = [d for (d,) in Device.select(Device.device).where(Device.uid == op.receiver).tuples()]
        if "" not in devices:
            devices.append("")  # entries of the unregistered default device (stored before any device)
        seqs: set[int] = set()
        for d in devices:
            seqs.update(s for (s,) in Entry.select(Entry.seq).where(
                (Entry.uid == op.receiver) & (Entry.device == d) & (Entry.seq > op.after))
                .order_by(Entry.seq).limit(op.limit + 1).tuples())
        chosen = sorted(seqs)[:op.limit + 1]
        more = len(chosen) > op.limit
        chosen = chosen[:op.limit]
        rows = sorted(Message.select(*PAGE_FIELDS).where(Message.seq.in_(chosen)).tuples()) if chosen else []
        entries = [self._push_dict(r, op.receiver) for r in rows]
        fit = p.page_fit(entries)
        if fit < len(entries):
            entries, more = entries[:fit], True
        return core.Paged(op, tuple(entries), None, more)
