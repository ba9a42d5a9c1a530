"""Storage of conversations' read state (docs/PROTOCOL.md, section 15): read markers that only move
forward and never pass the newest message, the messages a marker move makes read (for `read`
receipts), unread counts per conversation, and the per-user read-receipt setting.

A 1:1 conversation's messages are the ``accepted`` rows (sender, msg_id, receiver, seq): they outlive
delivery (ACCEPTED_RETENTION_MS after the message left the store, 14 days by default), so a message
read on one device stays counted for the others after it was acked. A message older than that is no
longer counted unread (and gets no `read` receipt).

:class:`ConversationStore` is a mixin of :class:`backend.store.Store` (``self.db``). Its models are
models.py's (ReadMarker, UserSettings, Accepted).
"""

from __future__ import annotations

import bisect

import peewee as pw

from .. import core
from ..core import reads
from .groups import group_receiver
from .queries import _chunks
from .models import Accepted, Group, Member, Message, ReadMarker, UserSettings, now_ms

# Conversations one count answer lists in `unread` at most, the most recent first: a user with thousands of
# conversations with unread messages still gets a count well under 1 MiB (an entry is about 60 bytes).
UNREAD_CONVERSATIONS_MAX = 1000


class ConversationStore:
    """The read-marker half of the Store (a mixin: ``self.db``)."""

    def run_conversation(self, op: core.MarkRead | core.SetSettings) -> core.Outcome:
        if isinstance(op, core.SetSettings):
            return self.set_settings(op)
        if op.kind == "g":
            return self.mark_group_read(op)
        if op.kind != "u":
            return core.Refused(op, "bad_field", f"unknown conversation kind {op.kind!r}")
        return self.mark_read(op)

    # -- group read markers ----------------------------------------------------------------------
    def mark_group_read(self, op: core.MarkRead) -> core.Outcome:
        """Move a member's marker of a group (a seq of the group's messages: seq order is the group's order)
        forward, never past the group's newest message; the other members' newly read messages get "read by k of
        n" receipts (k: the members whose marker passed the message while their read receipts were on)."""
        gid, uid = op.peer, op.uid
        if Member.get_or_none((Member.gid == gid) & (Member.uid == uid)) is None:
            return core.Refused(op, "not_a_member", f"you are not a member of group '{gid}'")
        receiver = group_receiver(gid)
        newest = Accepted.select(pw.fn.MAX(Accepted.seq)).where(Accepted.receiver_uid == receiver).scalar() or 0
        receipts = self.read_receipts_on(uid)
        now = now_ms()
        old = self.marker(uid, gid, "g", lock=True)
        if old is None:  # a member from before markers were set at the join: from nothing
            self.db.execute(ReadMarker.insert(uid=uid, kind="g", conversation=gid, upto=0, receipted=0,
                                              updated_at=now).on_conflict_ignore())
            old = self.marker(uid, gid, "g", lock=True) or 0
        upto = max(old, min(op.seq, int(newest)))
        if upto > old:
            fields = {"upto": upto, "updated_at": now, **({"receipted": upto} if receipts else {})}
            ReadMarker.update(**fields).where(self._marker_key(uid, "g", gid)).execute()
        others = (Accepted.receiver_uid == receiver) & (Accepted.sender_uid != uid)
        unread = Accepted.select().where(others & (Accepted.seq > upto)).count()
        rows: list = []
        devices_of: dict[str, tuple[str, ...]] = {}
        if upto > old and receipts:
            read = list(Accepted.select(Accepted.sender_uid, Accepted.msg_id, Accepted.seq)
                        .where(others & (Accepted.seq > old) & (Accepted.seq <= upto))
                        .order_by(Accepted.seq.desc()).limit(reads.READ_RECEIPTS_MAX).tuples())
            if read:
                markers = {u: int(m) for u, m in ReadMarker.select(ReadMarker.uid, ReadMarker.receipted).where(
                    (ReadMarker.kind == "g") & (ReadMarker.conversation == gid) & (ReadMarker.receipted > 0)).tuples()}
                ordered = sorted(markers.values())
                members = (Group.select(Group.members).where(Group.gid == gid).scalar() or 1) - 1
                # (the gseq of those still stored; a receipt of one that left the store has none: its sender knows
                # it from the stored receipt)
                gseqs = {s: g for chunk in _chunks([s for _, _, s in read])
                         for s, g in Message.select(Message.seq, Message.gseq).where(Message.seq.in_(chunk)).tuples()}
                for sender, msg_id, seq in reversed(read):
                    k = len(ordered) - bisect.bisect_left(ordered, seq) - (markers.get(sender, 0) >= seq)
                    rows.append((sender, msg_id, int(seq), gseqs.get(seq), k, members))
                devices_of = {u: tuple(ds) for u, ds in self.registered_devices({r[0] for r in rows}).items()}
        return core.Marked(op, upto, upto > old, unread, receipts=receipts, group_read=tuple(rows),
                           devices_of=devices_of)

    def unread_groups(self, uid: str) -> dict[str, int]:
        """Unread messages (of the other members) per group of the user, after its marker; groups with none are
        left out. One count per group the user is in (at most UNREAD_CONVERSATIONS_MAX groups)."""
        out = {}
        for gid, upto in (Member.select(Member.gid, pw.fn.COALESCE(ReadMarker.upto, 0))
                          .join(ReadMarker, pw.JOIN.LEFT_OUTER, on=((ReadMarker.uid == Member.uid) &
                                (ReadMarker.kind == "g") & (ReadMarker.conversation == Member.gid)))
                          .where(Member.uid == uid).limit(UNREAD_CONVERSATIONS_MAX).tuples()):
            n = Accepted.select().where((Accepted.receiver_uid == group_receiver(gid)) & (Accepted.sender_uid != uid)
                                        & (Accepted.seq > upto)).count()
            if n:
                out[gid] = n
        return out

    def set_join_markers(self, gid: str, uids: list[str], seq: int) -> None:
        """New members read a group from their join (the join event's seq): what came before is not theirs to
        read, nor unread. A re-joining member's old marker is replaced."""
        ReadMarker.delete().where((ReadMarker.kind == "g") & (ReadMarker.conversation == gid) &
                                  ReadMarker.uid.in_(uids)).execute()
        now = now_ms()
        rows = [{"uid": u, "kind": "g", "conversation": gid, "upto": seq, "receipted": 0, "updated_at": now}
                for u in uids]
        for i in range(0, len(rows), 100):
            ReadMarker.insert_many(rows[i:i + 100]).execute()

    # -- 1:1 read markers ----------------------------------------------------------------------
    def _conversation(self, uid: str, peer: str) -> pw.Expression:
        """The messages ``peer`` sent ``uid`` (the accepted pairs: delivered ones included)."""
        return (Accepted.receiver_uid == uid) & (Accepted.sender_uid == peer)

    def _marker_key(self, uid: str, kind: str, conversation: str) -> pw.Expression:
        return (ReadMarker.uid == uid) & (ReadMarker.kind == kind) & (ReadMarker.conversation == conversation)

    def marker(self, uid: str, peer: str, kind: str = "u", lock: bool = False) -> int | None:
        """The stored marker (None: never set); ``lock``: hold its row until the transaction ends."""
        q = ReadMarker.select(ReadMarker.upto).where(self._marker_key(uid, kind, peer))
        if lock and not isinstance(self.db, pw.SqliteDatabase):  # SQLite: one writer at a time anyway
            q = q.for_update()
        row = q.tuples().first()
        return None if row is None else int(row[0])

    def mark_read(self, op: core.MarkRead) -> core.Marked:
        """Move ``op.uid``'s marker of its conversation with ``op.peer`` to ``op.seq``, clamped to the newest
        message ``op.peer`` sent it, never backwards. Two workers marking the same conversation at once
        serialise on the marker's row, so each newly read message is reported by one of them."""
        newest = Accepted.select(pw.fn.MAX(Accepted.seq)).where(self._conversation(op.uid, op.peer)).scalar() or 0
        target = min(op.seq, int(newest))
        now = now_ms()
        receipts = self.read_receipts_on(op.uid)
        old = self.marker(op.uid, op.peer, op.kind, lock=True)
        stored = old  # what the row holds now (None: no row)
        if old is None and target > 0:
            if self.db.execute(ReadMarker.insert(uid=op.uid, kind=op.kind, conversation=op.peer, upto=target,
                                                 receipted=target if receipts else 0, updated_at=now)
                               .on_conflict_ignore()).rowcount:
                stored = target
            else:  # another worker made the row meanwhile: take it as it is now (locked)
                old = stored = self.marker(op.uid, op.peer, op.kind, lock=True)
        old = old or 0
        upto = max(old, target)
        if stored is not None and upto > stored:
            fields = {"upto": upto, "updated_at": now, **({"receipted": upto} if receipts else {})}
            ReadMarker.update(**fields).where(self._marker_key(op.uid, op.kind, op.peer)).execute()
        read: tuple[tuple[str, int], ...] = ()
        devices: tuple[str, ...] = ()
        if upto > old:
            if receipts:
                rows = (Accepted.select(Accepted.msg_id, Accepted.seq)
                        .where(self._conversation(op.uid, op.peer) & (Accepted.seq > old) & (Accepted.seq <= upto))
                        .order_by(Accepted.seq.desc()).limit(reads.READ_RECEIPTS_MAX).tuples())
                read = tuple((m, int(s)) for m, s in reversed(list(rows)))
                # The `read` receipts go to every device of the sender (at most --max-devices), or its default one.
                devices = tuple(self.registered_devices([op.peer]).get(op.peer, ("",)))
        unread = Accepted.select().where(self._conversation(op.uid, op.peer) & (Accepted.seq > upto)).count()
        return core.Marked(op, upto, upto > old, unread, read, receipts, devices)

    def unread(self, uid: str) -> dict[str, int]:
        """Unread messages per conversation (the peer's uid -> n > 0), the most recent conversations first,
        at most UNREAD_CONVERSATIONS_MAX. One range scan of the user's accepted pairs."""
        marker = (ReadMarker.uid == Accepted.receiver_uid) & (ReadMarker.kind == "u") & \
            (ReadMarker.conversation == Accepted.sender_uid)
        q = (Accepted.select(Accepted.sender_uid, pw.fn.COUNT(Accepted.seq))
             .join(ReadMarker, pw.JOIN.LEFT_OUTER, on=marker)
             .where((Accepted.receiver_uid == uid) & (Accepted.seq > pw.fn.COALESCE(ReadMarker.upto, 0)))
             .group_by(Accepted.sender_uid).order_by(pw.fn.MAX(Accepted.seq).desc())
             .limit(UNREAD_CONVERSATIONS_MAX))
        return {sender: int(n) for sender, n in q.tuples()}

    def read_by(self, uid: str) -> dict[str, int]:
        """How far each user ``uid`` wrote to has read its messages, as it was told by `read` receipts (moves made
        while that user's read receipts were off are not shown): reader -> seq, the most recently moved first, at
        most UNREAD_CONVERSATIONS_MAX."""
        q = (ReadMarker.select(ReadMarker.uid, ReadMarker.receipted)
             .where((ReadMarker.kind == "u") & (ReadMarker.conversation == uid) & (ReadMarker.receipted > 0))
             .order_by(ReadMarker.updated_at.desc()).limit(UNREAD_CONVERSATIONS_MAX))
        return {reader: int(seq) for reader, seq in q.tuples()}

    # -- settings ------------------------------------------------------------------------------------
    def read_receipts_on(self, uid: str) -> bool:
        row = UserSettings.select(UserSettings.read_receipts).where(UserSettings.uid == uid).tuples().first()
        return row is None or bool(row[0])

    def set_settings(self, op: core.SetSettings) -> core.SettingsSet:
        before = self.read_receipts_on(op.uid)
        if op.read_receipts is None or op.read_receipts == before:
            return core.SettingsSet(op, before, False)
        value, now = int(op.read_receipts), now_ms()
        where = UserSettings.uid == op.uid
        if not UserSettings.update(read_receipts=value, updated_at=now).where(where).execute():
            if not self.db.execute(UserSettings.insert(uid=op.uid, read_receipts=value, updated_at=now)
                                   .on_conflict_ignore()).rowcount:
                UserSettings.update(read_receipts=value, updated_at=now).where(where).execute()  # a race: ours wins
        return core.SettingsSet(op, op.read_receipts, True)
