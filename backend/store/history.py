"""Conversation history (``--history-days N``, docs/PROTOCOL.md section 14.9): delivered messages are kept N
days instead of leaving the store at the last ack, and a device pages back through a 1:1 conversation or a
group it is a member of, newest first. A mixin of :class:`backend.store.Store`.

Kept messages are ``message`` rows with no entry left: pages, counts and pushes read entries, so nothing of
the delivery path changes; only the deletions at the last ack (``Store.delete``, ``DeviceStore._release``)
are skipped, and housekeeping (:meth:`HistoryStore.expire_history`) deletes the kept rows past N days.
"""

from __future__ import annotations

from .. import core
from .models import Group, Member, Message, now_ms
from .queries import PAGE_FIELDS
from .groups import group_receiver

# History is off by default: the store keeps what waits and nothing after the last ack (the design this
# project grew from); a deployment opts in with --history-days.
HISTORY_DAYS = 0
DAY_MS = 24 * 3600 * 1000
# Kept messages deleted per housekeeping transaction: PURGE_CHUNK's reason (short transactions between batches).
HISTORY_PURGE_CHUNK = 500


class HistoryStore:
    """The history half of the Store (a mixin: ``self.db``, ``self.history_ms``)."""

    def history(self, op: core.ReadHistory) -> core.Outcome:
        """A page of the conversation, newest first, below ``before``: a 1:1 conversation's messages both ways,
        or a group's from the member's join (all of them if the group lets new members read history)."""
        r, uid = op.request, op.receiver
        if not self.history_ms:
            return core.Refused(op, "history_off", "this server keeps no history (it runs with --history-days 0): "
                                                   "only what waits is stored")
        cutoff = now_ms() - self.history_ms
        q = Message.select(*PAGE_FIELDS).where(Message.send_time >= cutoff)
        if r.before:
            q = q.where(Message.seq < r.before)
        if r.group is not None:
            member = Member.get_or_none((Member.gid == r.group) & (Member.uid == uid))
            if member is None:
                return core.Refused(op, "not_a_member", f"you are not a member of group '{r.group}'")
            q = q.where(Message.receiver_uid == group_receiver(r.group))
            if not Group.select(Group.history).where(Group.gid == r.group).scalar():
                q = q.where(Message.gseq >= member.joined_gseq)  # nothing from before its join
            rows = list(q.order_by(Message.seq.desc()).limit(r.limit + 1).tuples())
        else:
            # Both directions, each a range scan of the (receiver_uid, sender_uid, seq) index, merged.
            rows = []
            for sender, receiver in ((uid, r.with_uid), (r.with_uid, uid)):
                rows.extend(q.where((Message.receiver_uid == receiver) & (Message.sender_uid == sender))
                            .order_by(Message.seq.desc()).limit(r.limit + 1).tuples())
            rows = sorted(set(rows), key=lambda row: row[0], reverse=True)[:r.limit + 1]
        more = len(rows) > r.limit
        return core.HistoryPage(op, tuple(self._push_dict(row, uid) for row in rows[:r.limit]), more)

    def expire_history(self, now: int | None = None) -> int:
        """Delete kept messages (no entry left) older than the history age, in short transactions; the
        unread ones expire by the expiry age as before (maintenance.expire). Returns how many went."""
        if not self.history_ms:
            return 0
        cutoff = (now_ms() if now is None else now) - self.history_ms
        total, after = 0, 0
        while True:  # by seq (old messages have the low seqs), past the unread ones that stay
            with self.db.atomic():
                seqs = [s for (s,) in Message.select(Message.seq).where((Message.send_time < cutoff) &
                                                                        (Message.seq > after))
                        .order_by(Message.seq).limit(HISTORY_PURGE_CHUNK).tuples()]
                if seqs:
                    after = seqs[-1]
                    q = self.db.param
                    total += self.db.execute_sql(
                        f"DELETE FROM message WHERE seq IN ({', '.join([q] * len(seqs))}) AND NOT EXISTS "
                        "(SELECT 1 FROM entry WHERE entry.seq = message.seq)", seqs).rowcount
            if len(seqs) < HISTORY_PURGE_CHUNK:
                return total
