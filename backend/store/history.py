"""Conversation history (``--history-days N``, docs/PROTOCOL.md section 14.9): delivered messages are kept N
days instead of leaving the store at the last ack, and a device pages back through a 1:1 conversation or a
group it is a member of, newest first. A mixin of :class:`backend.store.Store`.

Kept messages are ``message`` rows with no entry left: pages, counts and pushes read entries, so nothing of
the delivery path changes; only the deletions at the last ack (``Store.delete``, ``DeviceStore._release``)
are skipped, and housekeeping (:meth:`HistoryStore.expire_history`) deletes the kept rows past N days.
"""

from __future__ import annotations

import peewee as pw

from .. import core
from .models import GROUP_PREFIX, Accepted, Entry, Group, Member, Message, now_ms
from .queries import PAGE_FIELDS, _chunks
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

    def conversations(self, op: core.ListConversations) -> core.Outcome:
        """The caller's conversations whose newest message is kept (sent within the history window, or still
        waiting for one of its devices), the most recent first, below ``before`` (a last_seq). No content.

        All index range scans, none of ``message`` as a whole: the messages the caller received, by the
        (receiver_uid, sender_uid, seq) index (covering: the newest per sender); those it sent, by ``accepted``'s
        key (sender_uid, msg_id) (kept past their message: purge releases a pair only once the message is gone,
        then keeps it ACCEPTED_RETENTION_MS more); its groups, by ``group_member``'s uid index, and each group's
        newest message by the (receiver_uid, seq) index. Then the candidates' rows by seq. The cost grows with the
        caller's own messages of the window (and of the retention, sent ones), not with the table."""
        r, uid = op.request, op.receiver
        if not self.history_ms:
            return core.Refused(op, "history_off", "this server keeps no history (it runs with --history-days 0): "
                                                   "a count lists the conversations with messages waiting")
        newest = pw.fn.MAX(Message.seq)
        # key -> candidate seqs (both directions of a 1:1 conversation: the newest of each)
        candidates: dict[tuple[str, str], list[int]] = {}
        for sender, seq in (Message.select(Message.sender_uid, newest).where(Message.receiver_uid == uid)
                            .group_by(Message.sender_uid).tuples()):
            candidates.setdefault(("with", sender), []).append(int(seq))
        for receiver, seq in (Accepted.select(Accepted.receiver_uid, pw.fn.MAX(Accepted.seq))
                              .where(Accepted.sender_uid == uid).group_by(Accepted.receiver_uid).tuples()):
            if not receiver.startswith(GROUP_PREFIX):  # the groups it wrote to: by its membership below
                candidates.setdefault(("with", receiver), []).append(int(seq))
        groups = {group_receiver(gid): (gid, name, int(joined), bool(history)) for gid, name, joined, history in
                  Member.select(Member.gid, Group.name, Member.joined_gseq, Group.history)
                  .join(Group, on=(Group.gid == Member.gid)).where(Member.uid == uid).tuples()}
        for chunk in _chunks(list(groups)):
            if chunk:
                for receiver, seq in (Message.select(Message.receiver_uid, newest)
                                      .where(Message.receiver_uid.in_(chunk)).group_by(Message.receiver_uid).tuples()):
                    candidates[("group", groups[receiver][0])] = [int(seq)]
        seqs = sorted({s for ss in candidates.values() for s in ss})
        rows = {}  # seq -> (sender, send_time, gseq), of those still stored
        for chunk in _chunks(seqs):
            if chunk:
                rows.update((s, (snd, t, g)) for s, snd, t, g in Message.select(
                    Message.seq, Message.sender_uid, Message.send_time, Message.gseq)
                    .where(Message.seq.in_(chunk)).tuples())
        cutoff = now_ms() - self.history_ms
        old = [s for s, (_, t, _) in rows.items() if t < cutoff]
        waiting = set()  # old ones still waiting for a device of the caller (its pages show them)
        for chunk in _chunks(old):
            if chunk:
                waiting.update(s for (s,) in Entry.select(Entry.seq).where((Entry.uid == uid) & Entry.seq.in_(chunk))
                               .tuples())
        out = []
        for (kind, peer), seqs_of in candidates.items():
            kept = [s for s in seqs_of if s in rows and (rows[s][1] >= cutoff or s in waiting)]
            if not kept:
                continue
            seq = max(kept)
            sender, sent_at, gseq = rows[seq]
            if r.before and seq >= r.before:
                continue
            entry = {kind: peer, "last_seq": seq, "last_sent_at": int(sent_at), "last_from": sender}
            if kind == "group":
                _, name, joined, history = groups[group_receiver(peer)]
                if not history and (gseq is None or gseq < joined):
                    continue  # its newest message is from before the caller's join: not the caller's to read
                entry.update(name=name, last_gseq=int(gseq))
            out.append(entry)
        out.sort(key=lambda e: e["last_seq"], reverse=True)
        return core.ConversationList(op, tuple(out[:r.limit]), len(out) > r.limit)

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
