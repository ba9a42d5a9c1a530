"""Housekeeping: expiring unread messages (tallied per device for its next count), and purging old
cursors, released (sender, msg_id) pairs and removed devices' ids in short transactions. A mixin of
:class:`backend.store.Store`."""

from __future__ import annotations

from typing import Iterator

import peewee as pw

from .models import Accepted, Device, Entry, Expired, Message, Page, RemovedDevice, now_ms

# A page's cursor stays valid this long; a page is normally acked within seconds, and a client
# holding an expired cursor just pulls again without it and drops the repeats by seq.
PAGE_TTL_MS = 24 * 3600 * 1000
# Unread messages expire after this age; 14 days is how long Signal's server keeps an offline queue.
EXPIRE_AFTER_MS = 14 * 24 * 3600 * 1000
# (sender, msg_id) pairs are remembered at least this long after their message left the store,
# so a late retransmit is still answered "duplicate"; a longer --expire-after lengthens it to match.
ACCEPTED_RETENTION_MS = EXPIRE_AFTER_MS
# Housekeeping (purge) works in transactions of at most this many rows: one statement over 200,000
# delivered messages held the store for 385 ms (every send waiting behind it); a chunk of 500 takes
# about 2 ms here, and the worker runs its batches between chunks.
PURGE_CHUNK = 500
# A removed device's id is remembered this long, so that it is told it was removed when it comes back.
# A year: an app left unopened for longer starts afresh anyway.
REMOVED_DEVICE_RETENTION_MS = 365 * 24 * 3600 * 1000


class MaintenanceStore:
    """The housekeeping half of the Store (a mixin: ``self.db``, ``self.expire_after_ms``)."""

    # -- maintenance ----------------------------------------------------------
    def expire(self, now: int | None = None) -> int:
        """Delete messages older than the expiry age, with their entries, tallying them per device for its
        next count (per user, for entries of a default device never registered). Each device's entries go in
        one DELETE whose row count is the tally, so two workers expiring at once never count one twice.
        Returns how many messages expired."""
        if not self.expire_after_ms:
            return 0
        cutoff = (now_ms() if now is None else now) - self.expire_after_ms
        total = 0
        # The common case, nothing old, answered by the send_time index alone.
        while True:
            seqs = [s for (s,) in Message.select(Message.seq).where(Message.send_time < cutoff)
                    .order_by(Message.send_time).limit(PURGE_CHUNK).tuples()]
            if not seqs:
                return total
            with self.db.atomic():
                owners = list(Entry.select(Entry.uid, Entry.device).where(Entry.seq.in_(seqs)).distinct().tuples())
                for uid, device in owners:
                    n = Entry.delete().where((Entry.uid == uid) & (Entry.device == device) &
                                             Entry.seq.in_(seqs)).execute()
                    if n:
                        self._add_expired(uid, device, n)
                total += Message.delete().where(Message.seq.in_(seqs) & (Message.send_time < cutoff)).execute()
            if len(seqs) < PURGE_CHUNK:
                return total

    def _add_expired(self, receiver: str, device: str, n: int) -> None:
        if Device.update(expired=Device.expired + n).where(
                (Device.uid == receiver) & (Device.device == device)).execute():
            return
        bump = Expired.update(count=Expired.count + n).where(Expired.receiver_uid == receiver)
        if bump.execute():
            return
        if not self.db.execute(Expired.insert(receiver_uid=receiver, count=n).on_conflict_ignore()).rowcount:
            bump.execute()  # another worker created the row meanwhile

    def purge(self, now: int | None = None) -> None:
        """Forget old cursors, and (sender, msg_id) pairs whose message left the store over
        ACCEPTED_RETENTION_MS ago (counted from the first purge that saw it gone: at most one
        purge interval late, never early). All at once; the worker runs purge_chunks instead."""
        for _ in self.purge_chunks(now):
            pass

    def purge_chunks(self, now: int | None = None) -> Iterator[int]:
        """purge() in short transactions of at most PURGE_CHUNK rows each, yielding after each (the
        rows it examined), so a caller can run its own work between them."""
        now = now_ms() if now is None else now
        while True:  # cursors past their TTL, by the created_at index
            with self.db.atomic():
                old = [c for (c,) in Page.select(Page.cursor).where(Page.created_at < now - PAGE_TTL_MS)
                       .limit(PURGE_CHUNK).tuples()]
                if old:
                    Page.delete().where(Page.cursor.in_(old)).execute()
            yield len(old)
            if len(old) < PURGE_CHUNK:
                break
        # Pairs whose message is gone get released_at: the unreleased ones, PURGE_CHUNK at a time in
        # seq order along the (released_at, seq) index.
        after = 0
        while True:
            with self.db.atomic():
                seqs = [q for (q,) in Accepted.select(Accepted.seq).where(
                    Accepted.released_at.is_null() & (Accepted.seq > after))
                    .order_by(Accepted.seq).limit(PURGE_CHUNK).tuples()]
                if seqs:
                    gone = ~pw.fn.EXISTS(Message.select(Message.seq).where(Message.seq == Accepted.seq))
                    Accepted.update(released_at=now).where(
                        Accepted.released_at.is_null() & (Accepted.seq > after) & (Accepted.seq <= seqs[-1]) & gone
                    ).execute()
            yield len(seqs)
            if len(seqs) < PURGE_CHUNK:
                break
            after = seqs[-1]
        with self.db.atomic():  # ids of removed devices remembered long enough (a small table)
            RemovedDevice.delete().where(RemovedDevice.removed_at < now - REMOVED_DEVICE_RETENTION_MS).execute()
        # Pairs released long enough ago are forgotten, oldest first, PURGE_CHUNK at a time.
        cutoff = now - max(ACCEPTED_RETENTION_MS, self.expire_after_ms or 0)
        key = pw.Tuple(Accepted.released_at, Accepted.seq)
        while True:
            with self.db.atomic():
                last = list(Accepted.select(Accepted.released_at, Accepted.seq).where(Accepted.released_at < cutoff)
                            .order_by(Accepted.released_at, Accepted.seq).limit(PURGE_CHUNK).tuples())
                if last:
                    Accepted.delete().where((Accepted.released_at < cutoff) & (key <= pw.Tuple(*last[-1]))).execute()
            yield len(last)
            if len(last) < PURGE_CHUNK:
                break
