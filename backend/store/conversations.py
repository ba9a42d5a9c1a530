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

import peewee as pw

from .. import core
from ..core import reads
from .models import Accepted, Device, ReadMarker, UserSettings, now_ms

# Conversations one count answer lists in `unread` at most, the most recent first: a user with thousands of
# conversations with unread messages still gets a count well under 1 MiB (an entry is about 60 bytes).
UNREAD_CONVERSATIONS_MAX = 1000


class ConversationStore:
    """The read-marker half of the Store (a mixin: ``self.db``)."""

    def run_conversation(self, op: core.MarkRead | core.SetSettings) -> core.Outcome:
        if isinstance(op, core.SetSettings):
            return self.set_settings(op)
        if op.kind != "u":
            return core.Refused(op, "bad_field", f"unknown conversation kind {op.kind!r}")
        return self.mark_read(op)

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
                devices = tuple(d for (d,) in Device.select(Device.device).where(Device.uid == op.peer)
                                .order_by(Device.device).tuples()) or ("",)
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
