"""Announcements per device: the unsolicited counts that tell an online receiver what waits for it,
repeated with backoff while it does not pull, coalesced in bursts, spread out when another worker is
gone. A mixin of :class:`backend.core.Delivery`."""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from .events import CountBacklog, Key, Plan

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


@dataclass
class _Watch:
    """An online receiver owed (repeated) announcements while its backlog may be unknown to it."""

    due: int | None  # when the next announcement is planned (ms); None: none planned
    wait: int  # the wait after the next announcement before the one after it
    last: int | None = None  # when the last announcement was planned



class AnnouncementsMixin:
    """The announcement half of Delivery (``self._watch``, ``self._announce_timers``...)."""

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

    def changed_elsewhere(self, uids, now_ms: int) -> None:
        """Another process stored something for these users (the CLI's group changes, read from the store's
        outbox): each online device of theirs is announced (partitions: by the owner), and its sync fetches it."""
        for uid in uids:
            if self.mine(uid):
                self.announce(uid, now_ms)

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
