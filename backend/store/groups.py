"""Storage of groups (docs/PROTOCOL.md section 14): groups and their members; a group message stored once,
with one entry per member device; membership changes stored as messages in the group's own order; the
release of a leaving member's waiting messages; and the members' receipts. A mixin of
:class:`backend.store.Store`.

Order. A send or a membership change first bumps the group's ``gseq`` (an UPDATE of its row: the row's
lock on PostgreSQL and MariaDB, and SQLite has one writer), and only then reads the members and inserts
the message. So a message is for exactly the members after every change with a lower gseq (the join
window), and within a group, seq order is gseq order (a page by seq is the group's order).
"""

from __future__ import annotations

import json
import time
from typing import Any

import peewee as pw

from .. import core
from .models import GROUP_PREFIX, Entry, Group, Member, MemberReceipt, Message, ReadMarker, User, now_ms
from .queries import _aad, _chunks

# Members per group (--max-group-members): OpenIM's default (Tinode's is 128). Raising it raises the entries one
# message writes (one per member device) and the pushes one message makes.
MAX_GROUP_MEMBERS = 1000
# The most --max-group-members may be: message.delivered is a 16-bit column in databases made before groups.
MAX_GROUP_MEMBERS_LIMIT = 30_000
# Per-member receipt lists (group_receipts) for groups of at most this many members; larger ones get the counts
# (the bound: a list of 1,000 names is no one's reading).
GROUP_RECEIPTS_LIST_MAX = 32
# Rows one INSERT writes for an event's entries: 3 parameters each, under SQLite's old limit of 999.
EVENT_ENTRY_CHUNK = 300
# A group's members are cached this long for typing notices (several a second in a busy group, each otherwise a
# query); a member added or removed meanwhile may miss, or see, a few seconds of "typing...".
TYPING_MEMBERS_CACHE_S = 5.0
TYPING_MEMBERS_CACHE_MAX = 10_000
# Member acks one INSERT notes: 3 parameters each, under SQLite's old 999-parameter limit.
MEMBER_ACK_CHUNK = 300
# Member rows one INSERT writes: 5 parameters each, under SQLite's old 999-parameter limit.
MEMBER_ROWS = 100

ROLE_RANK = {"member": 0, "admin": 1, "owner": 2}


def group_receiver(gid: str) -> str:
    """The receiver_uid of a group's messages."""
    return GROUP_PREFIX + gid


class GroupStore:
    """The group half of the Store (a mixin: ``self.db``, ``self.keyring``, ``self.max_group_members``...)."""

    def _prepare_groups(self) -> dict[str, str]:
        q = self.db.param
        mysql = isinstance(self.db, pw.MySQLDatabase)
        ignore = "INSERT IGNORE INTO" if mysql else "INSERT INTO"
        tail = "" if mysql else " ON CONFLICT DO NOTHING"
        return {
            "bump": f"UPDATE chat_group SET gseq = gseq + 1 WHERE gid = {q}",
            "unbump": f"UPDATE chat_group SET gseq = gseq - 1 WHERE gid = {q}",
            "head": f"SELECT gseq, members FROM chat_group WHERE gid = {q}",
            "role": f"SELECT role FROM group_member WHERE gid = {q} AND uid = {q}",
            "insert": "INSERT INTO message (receiver_uid, sender_uid, msg_id, msg_type, msg_content, send_time, "
                      "client_ts, key_id, batch_receipts, sender_device, gseq, members) "
                      f"VALUES ({', '.join([q] * 12)})" + (" RETURNING seq" if isinstance(self.db, pw.PostgresqlDatabase)
                                                           else ""),
            # Every member device but the sending one; a member with no device registered yet gets its default
            # device "" (as a 1:1 receiver does).
            "entries": f"INSERT INTO entry (seq, uid, device) "
                       f"SELECT {q}, d.uid, d.device FROM group_member m JOIN device d ON d.uid = m.uid "
                       f"WHERE m.gid = {q} AND NOT (d.uid = {q} AND d.device = {q}) "
                       f"UNION ALL SELECT {q}, m.uid, '' FROM group_member m WHERE m.gid = {q} AND m.uid <> {q} "
                       "AND NOT EXISTS (SELECT 1 FROM device d WHERE d.uid = m.uid)"
                       + ("" if mysql else " RETURNING uid, device"),
            "entries_of": f"SELECT uid, device FROM entry WHERE seq = {q}",
            "member_acked": f"{ignore} member_receipt (seq, uid, at) VALUES ({q}, {q}, {q}){tail}",
        }

    # Requests that change a group (and so take its row lock); the others only read.
    _CHANGES = frozenset({"group_add", "group_remove", "group_leave", "group_rename", "group_role"})

    def _lock_groups(self, ops) -> None:
        """Take the row locks of every group a transaction will change, at its start and in gid order (PostgreSQL,
        MariaDB): a transaction that acked (locked) a message and then sends to a group could otherwise deadlock
        with one that changed that group and then releases that message."""
        if isinstance(self.db, pw.SqliteDatabase):
            return  # one writer at a time
        gids = sorted({op.group for op in ops if isinstance(op, core.StoreMessage) and op.group is not None} |
                      {op.request.group for op in ops if isinstance(op, core.GroupOp) and op.request.op in self._CHANGES})
        if gids:
            q = self.db.param
            self.db.execute_sql(f"SELECT gid FROM chat_group WHERE gid IN ({', '.join([q] * len(gids))}) "
                                "ORDER BY gid FOR UPDATE", gids).fetchall()

    # -- sending ----------------------------------------------------------------
    def store_group_message(self, op: core.StoreMessage) -> core.Outcome:
        """Store a message to a group for every member device but the sending one, in the group's order.
        Refused: unknown_group, not_a_member; a resend is a duplicate (by sender and msg_id) as for 1:1."""
        first = self._first(op.sender, op.msg_id)
        if first is not None:
            return self._duplicate(op, first)
        gid, sql = op.group, self._gsql
        receiver = group_receiver(gid)
        head = self._bump(gid)
        if head is None:
            return core.Refused(op, "unknown_group", f"no group '{gid}'")
        gseq, members = head
        if self.db.execute_sql(sql["role"], (gid, op.sender)).fetchone() is None:
            self.db.execute_sql(sql["unbump"], (gid,))  # still under the group's lock: nobody took gseq after it
            return core.Refused(op, "not_a_member", f"you are not a member of group '{gid}'")
        content, key_id = op.content, None
        if self.keyring is not None:
            key_id, content = self.keyring.seal(op.content, _aad(op.sender, receiver, op.msg_id))
        seq = self._insert_group_message(receiver, op.sender, op.msg_id, op.type, content, op.sent_at, op.ts, key_id,
                                         op.batch_receipts, op.sender_device, gseq, members - 1)
        if self.db.execute_sql(self._sql["accept"], (op.sender, op.msg_id, receiver, seq, op.sent_at)).rowcount != 1:
            # Another worker stored the same (sender, msg_id) after our look-up: theirs wins.
            self.db.execute_sql(self._sql["unstore"], (seq,))
            self.db.execute_sql(sql["unbump"], (gid,))
            return self._duplicate(op, self._first(op.sender, op.msg_id))
        params = (seq, gid, op.sender, op.sender_device, seq, gid, op.sender)
        if isinstance(self.db, pw.MySQLDatabase):
            self.db.execute_sql(sql["entries"], params)
            devices = [tuple(r) for r in self.db.execute_sql(sql["entries_of"], (seq,)).fetchall()]
        else:
            devices = [tuple(r) for r in self.db.execute_sql(sql["entries"], params).fetchall()]
        return core.Stored(op, seq, devices=tuple(devices), gseq=gseq, members=members - 1)

    def _bump(self, gid: str) -> tuple[int, int] | None:
        """Take the group's next gseq (and its row lock): (gseq, members now), or None if there is no such group."""
        if not self.db.execute_sql(self._gsql["bump"], (gid,)).rowcount:
            return None
        gseq, members = self.db.execute_sql(self._gsql["head"], (gid,)).fetchone()
        return int(gseq), int(members)

    def _insert_group_message(self, receiver: str, sender: str, msg_id: str, msg_type: str, content: str,
                              sent_at: int, ts: int | None, key_id: str | None, batch: bool, sender_device: str,
                              gseq: int, members: int) -> int:
        cur = self.db.execute_sql(self._gsql["insert"], (receiver, sender, msg_id, msg_type, content, sent_at, ts,
                                                         key_id, int(batch), sender_device, gseq, members))
        return cur.fetchone()[0] if isinstance(self.db, pw.PostgresqlDatabase) else cur.lastrowid

    def typing_members(self, op: core.RelayTyping) -> core.TypingMembers:
        """The members a group typing notice goes to (none if the typist is not one): a read, cached briefly."""
        now = time.monotonic()
        cached = self._typing_cache.get(op.group)
        if cached is None or cached[0] < now:
            if len(self._typing_cache) > TYPING_MEMBERS_CACHE_MAX:
                self._typing_cache.clear()
            cached = (now + TYPING_MEMBERS_CACHE_S, frozenset(self.group_member_uids(op.group)))
            self._typing_cache[op.group] = cached
        members = cached[1]
        return core.TypingMembers(op, tuple(sorted(members)) if op.uid in members else ())

    def members_acked(self, pairs: list[tuple[int, str]]) -> set[tuple[int, str]]:
        """Note that members acked group messages ((seq, uid) pairs); returns those noted now for the first time
        (the member's first device). One statement per MEMBER_ACK_CHUNK pairs where INSERT has RETURNING."""
        now = now_ms()
        if not self._returning:  # MariaDB/MySQL (and old SQLite): one INSERT IGNORE each, its row count tells
            return {(seq, uid) for seq, uid in pairs
                    if self.db.execute_sql(self._gsql["member_acked"], (seq, uid, now)).rowcount == 1}
        q = self.db.param
        out: set[tuple[int, str]] = set()
        for i in range(0, len(pairs), MEMBER_ACK_CHUNK):
            chunk = pairs[i:i + MEMBER_ACK_CHUNK]
            values = ", ".join([f"({q}, {q}, {q})"] * len(chunk))
            out.update((int(s), u) for s, u in self.db.execute_sql(
                f"INSERT INTO member_receipt (seq, uid, at) VALUES {values} ON CONFLICT DO NOTHING RETURNING seq, uid",
                [x for seq, uid in chunk for x in (seq, uid, now)]).fetchall())
        return out

    # -- requests -------------------------------------------------------------
    def group_request(self, op: core.GroupOp) -> core.Outcome:
        r = op.request
        if r.op == "groups":
            return core.GroupAnswered(op, {"kind": "groups", "req_id": op.req_id, "groups": self.groups_of(op.receiver)})
        if r.op == "group_create":
            return self._create(op)
        group = Group.get_or_none(Group.gid == r.group)
        role = self._role(r.group, op.receiver) if group is not None else None
        if group is None or role is None:
            # A non-member is not told whether the group exists (its id may be private).
            return core.Refused(op, "not_a_member", f"you are not a member of group '{r.group}'")
        if r.op == "group_members":
            return core.GroupAnswered(op, self._state(op, r.group))
        if r.op == "group_receipts":
            return self._receipts(op, group)
        if r.op == "group_leave":
            return self._leave(op, group, role)
        if ROLE_RANK[role] < ROLE_RANK["admin"] or (r.op == "group_role" and role != "owner"):
            return core.Refused(op, "forbidden", f"{r.op} needs the group's {'owner' if r.op == 'group_role' else 'owner or an admin'}")
        if r.op == "group_add":
            return self._add(op, group)
        if r.op == "group_remove":
            return self._remove(op, role)
        if r.op == "group_rename":
            if r.name == group.name:
                return core.GroupAnswered(op, self._state(op, r.group))
            Group.update(name=r.name).where(Group.gid == r.group).execute()
            event = self._event(r.group, op.receiver, {"event": "renamed", "name": r.name})
            return core.GroupAnswered(op, self._state(op, r.group), (event,))
        return self._set_role(op)

    def _role(self, gid: str, uid: str) -> str | None:
        row = self.db.execute_sql(self._gsql["role"], (gid, uid)).fetchone()
        return row[0] if row else None

    def _unknown_users(self, uids) -> list[str]:
        if not self.known_accounts:
            return []
        known: set[str] = set()
        uids = list(uids)
        for chunk in _chunks(uids):
            known.update(u for (u,) in User.select(User.uid).where(User.uid.in_(chunk)).tuples())
        return [u for u in uids if u not in known]

    def _create(self, op: core.GroupOp) -> core.Outcome:
        r, uid = op.request, op.receiver
        existing = Group.get_or_none(Group.gid == r.group)
        if existing is not None:
            if existing.owner == uid and self._role(r.group, uid) is not None:
                return core.GroupAnswered(op, self._state(op, r.group))  # a resent create: answered as it is
            return core.Refused(op, "group_exists", f"group '{r.group}' exists; choose another id")
        members = [uid] + [m for m in r.members if m != uid]
        refused = self._check_new_members(op, members[1:], 0, len(members))
        if refused is not None:
            return refused
        now = now_ms()
        inserted = self.db.execute(Group.insert(gid=r.group, name=r.name, owner=uid, history=int(r.history), gseq=0,
                                                members=len(members), created_at=now).on_conflict_ignore()).rowcount
        if not inserted:  # another worker created it this instant: the same request resent, or another user's
            if Group.select(Group.owner).where(Group.gid == r.group).scalar() == uid:
                return core.GroupAnswered(op, self._state(op, r.group))
            return core.Refused(op, "group_exists", f"group '{r.group}' exists; choose another id")
        gseq, _ = self._bump(r.group)
        self._insert_members(r.group, members, {uid: "owner"}, gseq, now)
        event = self._event(r.group, uid, {"event": "created", "name": r.name, "members": members}, gseq=gseq)
        self.set_join_markers(r.group, members, event.seq)
        return core.GroupAnswered(op, self._state(op, r.group), (event,))

    def _check_new_members(self, op: core.GroupOp, new: list[str], have: int, total: int) -> core.Outcome | None:
        unknown = self._unknown_users(new)
        if unknown:
            return core.Refused(op, "unknown_user", f"no user {', '.join(repr(u) for u in unknown[:5])}"
                                + (" and more" if len(unknown) > 5 else ""))
        if total > self.max_group_members:
            return core.Refused(op, "too_many_members", f"a group holds at most {self.max_group_members} members "
                                f"(it has {have}); this request would make {total}")
        return None

    def _insert_members(self, gid: str, uids: list[str], roles: dict[str, str], gseq: int, now: int) -> None:
        rows = [{"gid": gid, "uid": u, "role": roles.get(u, "member"), "joined_gseq": gseq, "joined_at": now}
                for u in uids]
        for i in range(0, len(rows), MEMBER_ROWS):
            Member.insert_many(rows[i:i + MEMBER_ROWS]).execute()

    def _add(self, op: core.GroupOp, group: Group) -> core.Outcome:
        r = op.request
        gseq, members = self._bump(r.group)  # the lock first: the member count below is then exact
        have = {u for (u,) in Member.select(Member.uid).where(Member.gid == r.group).tuples()}
        new = [u for u in r.members if u not in have]
        refused = self._check_new_members(op, new, members, members + len(new)) if new else None
        if refused is not None or not new:
            self.db.execute_sql(self._gsql["unbump"], (r.group,))
            # Nothing to add: the state as it stands, read after the unbump (it said gseq + 1 before).
            return refused or core.GroupAnswered(op, self._state(op, r.group))
        self._insert_members(r.group, new, {}, gseq, now_ms())
        Group.update(members=Group.members + len(new)).where(Group.gid == r.group).execute()
        event = self._event(r.group, op.receiver, {"event": "added", "members": new}, gseq=gseq)
        self.set_join_markers(r.group, new, event.seq)
        return core.GroupAnswered(op, self._state(op, r.group), (event,))

    def _remove(self, op: core.GroupOp, role: str) -> core.Outcome:
        r = op.request
        gseq, _ = self._bump(r.group)
        roles = dict(Member.select(Member.uid, Member.role).where(
            (Member.gid == r.group) & Member.uid.in_(list(r.members))).tuples())
        gone = [u for u in r.members if u in roles]
        above = [u for u in gone if ROLE_RANK[roles[u]] >= ROLE_RANK[role]]
        if above or not gone:
            self.db.execute_sql(self._gsql["unbump"], (r.group,))
            if above:
                return core.Refused(op, "forbidden", f"{', '.join(above[:5])}: an {role} cannot remove the owner or "
                                    "another member of its rank (leave the group to leave it)")
            return core.GroupAnswered(op, self._state(op, r.group))  # none of them is a member: nothing changes
        return self._drop_members(op, gone, gseq, {"event": "removed", "members": gone})

    def _leave(self, op: core.GroupOp, group: Group, role: str) -> core.Outcome:
        uid = op.receiver
        gseq, members = self._bump(group.gid)
        event: dict[str, Any] = {"event": "left", "members": [uid]}
        if role == "owner" and members > 1:
            # Ownership passes to the longest-standing admin, else the longest-standing member.
            heir = (Member.select(Member.uid).where((Member.gid == group.gid) & (Member.uid != uid))
                    .order_by(Member.role != "admin", Member.joined_gseq, Member.uid).limit(1).scalar())
            Member.update(role="owner").where((Member.gid == group.gid) & (Member.uid == heir)).execute()
            Group.update(owner=heir).where(Group.gid == group.gid).execute()
            event["owner"] = heir
        return self._drop_members(op, [uid], gseq, event)

    def _drop_members(self, op: core.GroupOp, gone: list[str], gseq: int, event: dict[str, Any]) -> core.Outcome:
        """Close the windows of ``gone``: their rows go, their waiting messages of this group are released, and
        the change is told to the members left and to them (their last message of the group)."""
        gid = op.request.group
        Member.delete().where((Member.gid == gid) & Member.uid.in_(gone)).execute()
        left = Group.update(members=Group.members - len(gone)).where(Group.gid == gid).execute() and \
            Group.select(Group.members).where(Group.gid == gid).scalar()
        for uid in gone:
            self._release_member(gid, uid)
        ReadMarker.delete().where((ReadMarker.kind == "g") & (ReadMarker.conversation == gid) &
                                  ReadMarker.uid.in_(gone)).execute()  # (their reads no longer count)
        ev = self._event(gid, op.receiver, event, gseq=gseq, also=gone)
        if not left:
            Group.delete().where(Group.gid == gid).execute()  # the last member left: the id is free again
        payload = self._state(op, gid) if op.receiver not in gone else {
            "kind": "group", "req_id": op.req_id, "group": gid, "left": True, "gseq": gseq}
        return core.GroupAnswered(op, payload, (ev,))

    def _release_member(self, gid: str, uid: str) -> None:
        """A member's waiting messages of this group are released: its entries go, and a message left with none
        leaves the store."""
        rows = (Entry.select(Entry.device, Entry.seq).join(Message, on=(Message.seq == Entry.seq))
                .where((Entry.uid == uid) & (Message.receiver_uid == group_receiver(gid))).order_by(Entry.seq).tuples())
        by_device: dict[str, list[int]] = {}
        for device, seq in rows:
            by_device.setdefault(device, []).append(seq)
        for device, seqs in by_device.items():
            for chunk in _chunks(seqs):
                self._release(uid, device, chunk)

    def _set_role(self, op: core.GroupOp) -> core.Outcome:
        r = op.request
        role = self._role(r.group, r.member)
        if role is None:
            return core.Refused(op, "not_a_member", f"'{r.member}' is not a member of group '{r.group}'")
        if role == "owner":
            return core.Refused(op, "forbidden", "the owner's role passes only when the owner leaves")
        if role == r.role:
            return core.GroupAnswered(op, self._state(op, r.group))
        gseq, _ = self._bump(r.group)
        Member.update(role=r.role).where((Member.gid == r.group) & (Member.uid == r.member)).execute()
        event = self._event(r.group, op.receiver, {"event": "role", "member": r.member, "role": r.role}, gseq=gseq)
        return core.GroupAnswered(op, self._state(op, r.group), (event,))

    def _event(self, gid: str, by: str, event: dict[str, Any], *, gseq: int | None = None,
               also: list[str] = ()) -> core.GroupEvent:
        """Store a membership change as a group message (type group_event) for every member device (and those
        of ``also``: members just removed), taking the next gseq unless given one."""
        if gseq is None:
            gseq, _ = self._bump(gid)
        event = {**event, "by": by}
        uids = self.group_member_uids(gid) + list(also)
        sent_at = now_ms()
        seq = self._insert_group_message(group_receiver(gid), by, f"event-{gseq}", core.GROUP_EVENT_TYPE,
                                         json.dumps(event, separators=(",", ":")), sent_at, None, None, False, "",
                                         gseq, 0)
        registered = self.registered_devices(uids)
        devices = [(u, d) for u in uids for d in registered.get(u, ("",))]
        rows = [(seq, u, d) for u, d in devices]
        for i in range(0, len(rows), EVENT_ENTRY_CHUNK):
            Entry.insert_many(rows[i:i + EVENT_ENTRY_CHUNK], fields=[Entry.seq, Entry.uid, Entry.device]).execute()
        return core.GroupEvent(gid, seq, gseq, by, event, sent_at, tuple(devices))

    # -- answers ------------------------------------------------------------------
    def _state(self, op: core.GroupOp, gid: str) -> dict[str, Any]:
        g = Group.get(Group.gid == gid)
        members = [{"uid": u, "role": r} for u, r in Member.select(Member.uid, Member.role).where(Member.gid == gid)
                   .order_by(Member.joined_gseq, Member.uid).tuples()]
        return {"kind": "group", "req_id": op.req_id, "group": gid, "name": g.name, "owner": g.owner,
                "history": bool(g.history), "gseq": g.gseq, "members": members}

    def groups_of(self, uid: str) -> list[dict[str, Any]]:
        """The user's groups: [{"group", "name", "role", "members" (how many), "gseq" (the newest)}]."""
        return [{"group": g, "name": n, "role": r, "members": m, "gseq": s}
                for g, n, r, m, s in Member.select(Member.gid, Group.name, Member.role, Group.members, Group.gseq)
                .join(Group, on=(Group.gid == Member.gid)).where(Member.uid == uid).order_by(Member.gid).tuples()]

    def group_member_uids(self, gid: str) -> list[str]:
        return [u for (u,) in Member.select(Member.uid).where(Member.gid == gid).tuples()]

    def _receipts(self, op: core.GroupOp, group: Group) -> core.Outcome:
        r = op.request
        row = Message.select(Message.sender_uid, Message.delivered, Message.members, Message.gseq).where(
            (Message.seq == r.seq) & (Message.receiver_uid == group_receiver(r.group))).tuples().first()
        out: dict[str, Any] = {"kind": "group_receipts", "req_id": op.req_id, "group": r.group, "seq": r.seq}
        if row is None:
            # Gone: every member it was for acked it, or it expired, or it is not a message of this group.
            out["stored"] = False
            return core.GroupAnswered(op, out)
        sender, delivered, members, gseq = row
        if sender != op.receiver:
            return core.Refused(op, "forbidden", "receipts are for the message's sender")
        out.update(stored=True, gseq=gseq, delivered=delivered, members=members)
        if group.members <= GROUP_RECEIPTS_LIST_MAX:
            out["delivered_by"] = sorted(u for (u,) in MemberReceipt.select(MemberReceipt.uid)
                                         .where(MemberReceipt.seq == r.seq).tuples())
        return core.GroupAnswered(op, out)
