"""The :class:`Store`: runs a plan's operations in one transaction and reports the core's outcomes;
here the message operations (store with duplicate detection and quota, delete on ack, count, pull by
pages with cursors, sealed content). Devices, last statuses and housekeeping are its mixins
(devices.py, statuses.py, maintenance.py, conversations.py)."""

from __future__ import annotations

import logging
import secrets
import time
from typing import Iterable

import peewee as pw

from .. import core
from .. import protocol as p
from ..crypto import InvalidTag, KeyError_, KeyRing
from .conversations import ConversationStore
from .devices import MAX_DEVICES, DeviceStore
from .groups import MAX_GROUP_MEMBERS, GroupStore
from .history import DAY_MS, HISTORY_DAYS, HistoryStore
from .maintenance import EXPIRE_AFTER_MS, MaintenanceStore
from .models import GROUP_PREFIX, Device, Entry, Expired, Message, Page, User, now_ms
from .outbox import OutboxStore
from .queries import PAGE_FIELDS, _aad, _chunks, _returning_delete, count_query, page_query
from .statuses import StatusStore

log = logging.getLogger("backend.store")

# Known accounts are cached this long (embedded broker): a removed user may still receive for a few
# seconds, as a message sent just before the removal would have been.
KNOWN_CACHE_S = 10.0
KNOWN_CACHE_MAX = 100_000
# Messages whose (sender, msg_id) pairs and entries are written together: SQLite allows (before 3.32) 999 parameters
# and 500 compound terms; 100 messages take 500 parameters for their pairs (_accept), at most 200 uids for their
# devices' look-up, and on PostgreSQL at most 100 terms and 700 parameters for the entries (_entries_returning).
ENTRY_CHUNK = 100
# Entry rows one plain INSERT writes (SQLite, _entries_one_writer): 3 parameters each, below the old limit of 999.
ENTRY_ROWS = 300
# Operations that check their device in the database, never in the worker's cache (sends and acks do, for speed):
# a device removed elsewhere hears it at its next count, pull or push registration, not a minute later.
_FRESH_DEVICE_OPS = (core.CountBacklog, core.PullPage, core.SetPushEndpoint)


class Store(DeviceStore, GroupStore, HistoryStore, StatusStore, MaintenanceStore, ConversationStore, OutboxStore):
    """Runs plans against the database. One instance per worker thread. Device registration, removal, push
    endpoints and the user-scope pages are DeviceStore's (devices.py); groups GroupStore's (groups.py); last
    statuses StatusStore's (statuses.py), housekeeping MaintenanceStore's (maintenance.py), read markers and
    settings ConversationStore's (conversations.py)."""

    def __init__(self, db: pw.Database, *, known_accounts: bool = False, quota: int | None = None,
                 expire_after_ms: int | None = EXPIRE_AFTER_MS, keyring: KeyRing | None = None,
                 max_devices: int | None = MAX_DEVICES, max_group_members: int = MAX_GROUP_MEMBERS,
                 history_days: float = HISTORY_DAYS):
        self.db = db
        self.keyring = keyring  # None: content stored as sent (it may still be end-to-end encrypted)
        # With the embedded broker the worker knows every account: a message to nobody is an error.
        self.known_accounts = known_accounts
        # Per-receiver backlog limit (None: none). Checked before each insert; several workers storing
        # for one receiver at the same instant may pass it by a few messages, never by a batch.
        self.quota = quota or None
        self.expire_after_ms = expire_after_ms
        self.max_devices = max_devices or None
        self.max_group_members = max_group_members
        # Delivered messages are kept this long for history (history.py); 0: they leave at the last ack.
        self.history_ms = int(history_days * DAY_MS)
        self._sql = self._prepare(db)  # the hot path's SQL text, built once
        self._gsql = self._prepare_groups()
        self._typing_cache: dict[str, tuple[float, frozenset[str]]] = {}  # group -> (until, members): groups.py
        self._returning = _returning_delete(db)
        self._mysql = isinstance(db, pw.MySQLDatabase)
        self._one_writer = isinstance(db, pw.SqliteDatabase)
        self._known_cache: dict[str, float] = {}  # uid -> known until (monotonic s)
        self._seen: dict[tuple[str, str], float] = {}  # (uid, device) -> registered, last_seen fresh until
        self._deferred: list | None = None  # inside apply(): messages whose entries are not written yet
        self._last_seen: dict[tuple[str, str], int] = {}  # inside apply(): devices seen, written at its end
        # A resend is found by its failed insert into `accepted` (the message row inserted just before is then
        # deleted): one statement less per message than looking it up first, and inside apply() the pairs of the
        # messages stored in a row are inserted together (_accept). With a quota or known accounts the look-up
        # comes first and each pair is inserted at once, so a resend is answered `duplicate` rather than refused.
        self._look_first = bool(self.quota or known_accounts)

    def apply(self, ops: Iterable[core.Operation]) -> list[core.Outcome]:
        """Run the operations in one transaction; the caller publishes only after this returns. Outcomes
        are in operation order, one each, except that a device registered afresh after its removal gets a
        DeviceReset just before its operation's outcome."""
        ops = list(ops)
        with self.db.atomic():
            self._lock_groups(ops)
            out: list[core.Outcome] = []
            # The (sender, msg_id) pairs and entries of the messages stored in a row are written together
            # (_write_entries): one statement each for up to ENTRY_CHUNK messages instead of one each. Written
            # before any other operation, and before a device is registered, so every operation sees the
            # messages before it as they will be committed.
            self._deferred = [] if not self._mysql else None
            try:
                i = 0
                while i < len(ops):
                    op = ops[i]
                    if isinstance(op, core.DeleteAcked) and self._seen_fresh(op.origin):
                        # A run of acks from devices seen lately (nothing to register) goes in one statement set.
                        j = i + 1
                        while (j < len(ops) and isinstance(ops[j], core.DeleteAcked)
                               and self._seen_fresh(ops[j].origin)):
                            j += 1
                        if j - i > 1:
                            if self._deferred:
                                self._write_entries(out)
                            run = ops[i:j]
                            results = self.delete_many([(o.receiver, o.device, o.seqs) for o in run])
                            out += [core.Deleted(o, rows) for o, rows in zip(run, results)]
                            i = j
                            continue
                    i += 1
                    if self._deferred and not isinstance(op, core.StoreMessage):
                        self._write_entries(out)
                    if isinstance(op, _FRESH_DEVICE_OPS):
                        # Not on the hot path: look the device up afresh, in case another process (`device remove`,
                        # another worker) removed it since this worker cached it; it is then told (DeviceReset).
                        self._seen.pop(op.origin, None)
                    # A group typing notice is a read and nothing else: no registration, no last_seen write.
                    refused = self._register(op, out) if not isinstance(op, core.RelayTyping) else None
                    out.append(refused if refused is not None else self._run(op))
                    if self._deferred and self._deferred[-1][0] is None:
                        self._deferred[-1][0] = len(out) - 1
                if self._deferred:
                    self._write_entries(out)
                self._write_last_seen()
            finally:
                self._deferred = None
                self._last_seen = {}
            return out

    def _write_entries(self, out: list[core.Outcome]) -> None:
        """Write the deferred messages' entries (``self._deferred``: [index in out, op, seq]) and give each
        Stored outcome its devices: the receiver's devices registered now, or its default device, and the
        sender's other devices (sync copies), receiver's first. The messages of one receiver, sender and sending
        device share their targets: looked up once for them all (a look-up per message was two thirds of the
        entries' time: bench profile)."""
        deferred, self._deferred = self._deferred, []
        for i in range(0, len(deferred), ENTRY_CHUNK):
            chunk = deferred[i:i + ENTRY_CHUNK] if self._look_first else self._accept(deferred[i:i + ENTRY_CHUNK], out)
            if not chunk:
                continue
            groups: dict[tuple[str, str, str], list[int]] = {}
            for _, op, seq in chunk:
                key = (op.to, op.sender, op.sender_device)
                seqs = groups.get(key)
                if seqs is None:
                    groups[key] = [seq]
                else:
                    seqs.append(seq)
            by_seq = self._entries_one_writer(groups) if self._one_writer else self._entries_returning(groups)
            for index, op, seq in chunk:
                out[index] = core.Stored(op, seq, devices=by_seq.get(seq, ()))

    def _entries_returning(self, groups: dict[tuple[str, str, str], list[int]]) -> dict[int, tuple]:
        """Entries of several workers' database (PostgreSQL): one statement, each group's targets joined with its
        seqs, the devices read back from what it inserted (one snapshot: exactly the entries written)."""
        q, targets = self.db.param, self._sql["targets_of"]
        terms, params = [], []
        for (to, sender, sender_device), seqs in groups.items():
            terms.append(f"SELECT v.column1, t.uid, t.device FROM (VALUES {', '.join([f'({q})'] * len(seqs))}) "
                         f"AS v, ({targets}) AS t")
            params += seqs
            params += (to, to, to, sender, sender_device, to)
        text = "INSERT INTO entry (seq, uid, device) " + " UNION ALL ".join(terms) + " RETURNING seq, uid, device"
        by_seq: dict[int, list[tuple[str, str]]] = {}
        for seq, uid, device in self.db.execute_sql(text, params).fetchall():
            devices = by_seq.get(seq)
            if devices is None:
                by_seq[seq] = [(uid, device)]
            else:
                devices.append((uid, device))
        to_of = {seq: to for (to, _, _), seqs in groups.items() for seq in seqs}
        for seq, devices in by_seq.items():
            if len(devices) > 1:
                devices.sort(key=lambda k: k[0] != to_of[seq])
        return {seq: tuple(devices) for seq, devices in by_seq.items()}

    def _entries_one_writer(self, groups: dict[tuple[str, str, str], list[int]]) -> dict[int, tuple]:
        """Entries on SQLite: the devices of every uid of the chunk in one query, then plain rows. SQLite has one
        writer and this transaction is it (it stored the messages), so nothing registers a device between the two
        statements. Cheaper than reading back what an INSERT ... SELECT wrote (RETURNING: half its time)."""
        q = self.db.param
        registered = self.registered_devices({uid for to, sender, _ in groups for uid in (to, sender)})
        by_seq: dict[int, tuple] = {}
        params: list = []
        for (to, sender, sender_device), seqs in groups.items():
            # The receiver's devices (its default device "" if it has none), then the sender's other ones.
            targets = [(to, d) for d in registered.get(to, ("",))]
            if sender != to:
                targets += [(sender, d) for d in registered.get(sender, ()) if d != sender_device]
            devices = tuple(targets)
            for seq in seqs:
                by_seq[seq] = devices
                for uid, device in devices:
                    params += (seq, uid, device)
        row = f"({q}, {q}, {q})"
        for i in range(0, len(params), 3 * ENTRY_ROWS):
            part = params[i:i + 3 * ENTRY_ROWS]
            self.db.execute_sql("INSERT INTO entry (seq, uid, device) VALUES " + ", ".join([row] * (len(part) // 3)),
                                part)
        return by_seq

    def _accept(self, chunk: list[list], out: list[core.Outcome]) -> list[list]:
        """Insert the (sender, msg_id) pairs of a chunk of deferred messages in one statement; a message whose
        pair was there already (a resend, perhaps of a message earlier in the chunk, or one another worker stored
        meanwhile) leaves the store again and is answered `duplicate` in its place. Returns the rest of the chunk."""
        q = self.db.param
        text = (self._sql["accept_many"] + ", ".join([f"({q}, {q}, {q}, {q}, {q})"] * len(chunk))
                + " ON CONFLICT DO NOTHING RETURNING seq")
        params = [x for _, op, seq in chunk for x in (op.sender, op.msg_id, op.to, seq, op.sent_at)]
        accepted = {s for (s,) in self.db.execute_sql(text, params).fetchall()}
        if len(accepted) == len(chunk):
            return chunk
        for index, op, seq in chunk:
            if seq not in accepted:
                self.db.execute_sql(self._sql["unstore"], (seq,))
                out[index] = self._duplicate(op, self._first(op.sender, op.msg_id))
        return [d for d in chunk if d[2] in accepted]

    def _run(self, op: core.Operation) -> core.Outcome:
        if isinstance(op, core.StoreMessage):
            return self.store_message(op) if op.group is None else self.store_group_message(op)
        if isinstance(op, core.DeleteAcked):
            return core.Deleted(op, self.delete(op.receiver, op.seqs, op.device))
        if isinstance(op, core.CountBacklog):
            return self.count(op)
        if isinstance(op, core.PullPage):
            return self.pull_user(op) if op.scope == "user" else self.pull(op)
        if isinstance(op, core.ListDevices):
            return core.Listed(op, tuple(self.devices(op.receiver)))
        if isinstance(op, core.RemoveDevice):
            released = self.remove_device(op.receiver, op.target)
            if released is None:
                return core.Refused(op, "unknown_device", f"'{op.receiver}' has no device {op.target!r}; "
                                    "list them with {\"op\": \"devices\"}")
            return core.DeviceRemoved(op, released)
        if isinstance(op, core.CONVERSATION_OPS):
            return self.run_conversation(op)  # read markers, settings: conversations.py
        if isinstance(op, core.GroupOp):
            return self.group_request(op)
        if isinstance(op, core.RelayTyping):
            return self.typing_members(op)
        if isinstance(op, core.ReadHistory):
            return self.history(op)
        if isinstance(op, core.ListConversations):
            return self.conversations(op)
        return self.set_push_endpoint(op)

    # -- operations -----------------------------------------------------------
    # The hot path (every message stores once and is deleted once) runs prepared SQL text: building
    # it with peewee for each message cost more CPU than the database itself (bench profile: 39%).
    @staticmethod
    def _prepare(db: pw.Database) -> dict[str, str]:
        q = db.param
        pg = isinstance(db, pw.PostgresqlDatabase)
        mysql = isinstance(db, pw.MySQLDatabase)
        ignore = "INSERT IGNORE INTO" if mysql else "INSERT INTO"
        tail = "" if mysql else " ON CONFLICT DO NOTHING"
        # The message's entries, in one statement: one per device of the receiver registered now (or its
        # default device "" if it has none yet), and one per other device of the sender (sync copies).
        targets = (f"SELECT {q}, uid, device FROM device WHERE uid = {q} "
                   f"UNION ALL SELECT {q}, {q}, ''{' FROM DUAL' if mysql else ''} "
                   f"WHERE NOT EXISTS (SELECT 1 FROM device WHERE uid = {q}) "
                   f"UNION ALL SELECT {q}, uid, device FROM device WHERE uid = {q} AND device <> {q} AND uid <> {q}")
        # The same devices without the seq (_entries_returning joins them with several messages' seqs).
        targets_of = (f"SELECT uid, device FROM device WHERE uid = {q} "
                      f"UNION ALL SELECT {q}, ''{' FROM DUAL' if mysql else ''} "
                      f"WHERE NOT EXISTS (SELECT 1 FROM device WHERE uid = {q}) "
                      f"UNION ALL SELECT uid, device FROM device WHERE uid = {q} AND device <> {q} AND uid <> {q}")
        return {
            "first": f"SELECT seq, receiver_uid FROM accepted WHERE sender_uid = {q} AND msg_id = {q}",
            "insert": "INSERT INTO message (receiver_uid, sender_uid, msg_id, msg_type, msg_content, send_time, "
                      f"client_ts, key_id, batch_receipts, sender_device) VALUES ({', '.join([q] * 10)})"
                      + (" RETURNING seq" if pg else ""),
            "accept": f"{ignore} accepted (sender_uid, msg_id, receiver_uid, seq, accepted_at) "
                      f"VALUES ({q}, {q}, {q}, {q}, {q}){tail}",
            # Several pairs (_accept; not MySQL/MariaDB, whose messages are never deferred): VALUES rows follow.
            "accept_many": "INSERT INTO accepted (sender_uid, msg_id, receiver_uid, seq, accepted_at) VALUES ",
            "targets": targets,
            "entries": f"INSERT INTO entry (seq, uid, device) {targets}" + ("" if mysql else " RETURNING uid, device"),
            "targets_of": targets_of,
            "entry": f"INSERT INTO entry (seq, uid, device) VALUES ({q}, {q}, {q})",
            "unstore": f"DELETE FROM message WHERE seq = {q}",
            "waiting": f"SELECT 1 FROM message WHERE seq = {q}",
            # With history a delivered message is kept (history.py): it waits while it has an entry.
            "waiting_entry": f"SELECT 1 FROM entry WHERE seq = {q} LIMIT 1",
            # Pages: page_query's text, its parameters (receiver, device, [from,] limit) given per pull.
            **{f"page_{order}{'_from' if from_uid else ''}": page_query("", 1, "" if from_uid else None, order).sql()[0]
               for order in p.PULL_ORDERS for from_uid in (False, True)},
        }

    def _first(self, sender: str, msg_id: str) -> tuple[int, str] | None:
        return self.db.execute_sql(self._sql["first"], (sender, msg_id)).fetchone()

    def _duplicate(self, op: core.StoreMessage, first: tuple[int, str]) -> core.Stored:
        """A `duplicate` outcome, saying whether the first message still waits (the core then makes
        sure its receiver, if online, hears of it)."""
        seq = first[0]
        if not self.history_ms:
            waiting = self.db.execute_sql(self._sql["waiting"], (seq,)).fetchone() is not None
        else:  # (a message earlier in this transaction has its entries written at its end)
            waiting = any(d[2] == seq for d in self._deferred or ()) or \
                self.db.execute_sql(self._sql["waiting_entry"], (seq,)).fetchone() is not None
        return core.Stored(op, first[0], duplicate=True, to=first[1], waiting=waiting)

    def _known(self, uid: str) -> bool:
        """Is ``uid`` an account? Positive answers are cached briefly (accounts are rarely removed)."""
        now = time.monotonic()
        cache = self._known_cache
        if cache.get(uid, 0) > now:
            return True
        if not User.select().where(User.uid == uid).exists():
            return False
        if len(cache) > KNOWN_CACHE_MAX:
            cache.clear()
        cache[uid] = now + KNOWN_CACHE_S
        return True

    def store_message(self, op: core.StoreMessage) -> core.Outcome | None:
        """Store one message (``accepted`` decides duplicates: its (sender, msg_id) key). Inside apply() its
        entries wait for _write_entries, and None holds its outcome's place in apply()'s list till then."""
        if self._look_first:
            first = self._first(op.sender, op.msg_id)
            if first is not None:
                return self._duplicate(op, first)
        if self.known_accounts and not self._known(op.to):
            return core.Refused(op, "unknown_receiver", f"no user '{op.to}'")
        if self.quota is not None:
            waiting = Message.select(Message.seq).where(Message.receiver_uid == op.to).limit(self.quota).count()
            if waiting >= self.quota:
                return core.Refused(op, "quota_exceeded", f"'{op.to}' has {self.quota} messages waiting, the most "
                                                          "this server keeps; send again once they read some")
        content, key_id = op.content, None
        if self.keyring is not None:
            key_id, content = self.keyring.seal(op.content, _aad(op.sender, op.to, op.msg_id))
        sql = self._sql
        cur = self.db.execute_sql(sql["insert"], (op.to, op.sender, op.msg_id, op.type, content, op.sent_at, op.ts,
                                                  key_id, int(op.batch_receipts), op.sender_device))
        seq = cur.fetchone()[0] if isinstance(self.db, pw.PostgresqlDatabase) else cur.lastrowid
        if self._deferred is not None and not self._look_first:
            self._deferred.append([None, op, seq])  # apply() notes its index; _accept and _write_entries finish it
            return None
        inserted = self.db.execute_sql(sql["accept"], (op.sender, op.msg_id, op.to, seq, op.sent_at)).rowcount
        if inserted != 1:
            # Stored before (a resend), or by another worker after our look-up: the first one wins.
            self.db.execute_sql(sql["unstore"], (seq,))
            return self._duplicate(op, self._first(op.sender, op.msg_id))
        if self._deferred is not None:
            self._deferred.append([None, op, seq])  # apply() notes its index and writes its entries
            return None
        params = (seq, op.to, seq, op.to, op.to, seq, op.sender, op.sender_device, op.to)
        if self._mysql:
            devices = [(u, d) for _, u, d in self.db.execute_sql(sql["targets"], params).fetchall()]
            for u, d in devices:
                self.db.execute_sql(sql["entry"], (seq, u, d))
        else:
            devices = [tuple(r) for r in self.db.execute_sql(sql["entries"], params).fetchall()]
        # The receiver's devices first (pushed first), then the sync copies.
        devices.sort(key=lambda k: k[0] != op.to)
        return core.Stored(op, seq, devices=tuple(devices))

    def delete(self, receiver: str, seqs: Iterable[int], device: str = "") -> tuple[core.DeletedRow, ...]:
        """A device acks: its entries for ``seqs`` go; a message with no entry left leaves the store. The
        first of the receiver's devices to ack a message owes its sender `delivered` (once: the flag is set
        under the message's row lock); a sync copy's ack owes nothing."""
        return self.delete_many([(receiver, device, seqs)])[0]

    def delete_many(self, acks: list[tuple[str, str, Iterable[int]]]) -> list[tuple[core.DeletedRow, ...]]:
        """Several devices' acks (receiver, device, seqs) at once, each as :meth:`delete` would do it in turn,
        in a few statements for all of them: one lock of every message named (seq order), one DELETE of entries
        per device, then one each to remove the messages left with no entry, note the group members' first acks
        and update the `delivered` marks. Every member of a group acking one message lands in one transaction's
        batch: one statement set each cost 80-100 us an ack (the groups bench); together, a few us."""
        acks = [(r, d, sorted(set(seqs))) for r, d, seqs in acks]
        all_seqs = sorted({s for _, _, seqs in acks for s in seqs})
        if not all_seqs:
            return [() for _ in acks]
        q = self.db.param
        columns = "seq, sender_uid, msg_id, batch_receipts, sender_device, receiver_uid, delivered, gseq, members"
        sqlite = isinstance(self.db, pw.SqliteDatabase)
        rows: dict[int, tuple] = {}
        if not sqlite:
            # Lock the messages first (seq order: no deadlock between workers), so the last two entries of one
            # message released at once by two workers always see each other's delete (see _release). SQLite
            # has one writer at a time: no lock, and one statement fewer on its hot path.
            for chunk in _chunks(all_seqs):
                rows.update((r[0], r) for r in self.db.execute_sql(
                    f"SELECT {columns} FROM message WHERE seq IN ({', '.join([q] * len(chunk))}) ORDER BY seq "
                    "FOR UPDATE", chunk).fetchall())
        found_by_ack: list[list[int]] = []
        for receiver, device, seqs in acks:
            found: list[int] = []
            for chunk in _chunks(seqs):
                where = f"uid = {q} AND device = {q} AND seq IN ({', '.join([q] * len(chunk))})"
                params = (receiver, device, *chunk)
                if self._returning:  # one statement instead of two
                    found += [s for (s,) in self.db.execute_sql(f"DELETE FROM entry WHERE {where} RETURNING seq",
                                                                params)]
                else:
                    got = [s for (s,) in self.db.execute_sql(f"SELECT seq FROM entry WHERE {where}", params).fetchall()]
                    if got:
                        self.db.execute_sql(f"DELETE FROM entry WHERE {where}", params)
                    found += got
            found.sort()
            found_by_ack.append(found)
        found_all = sorted({s for found in found_by_ack for s in found})
        if not found_all:
            return [() for _ in acks]
        gone: set[int] = set()
        for chunk in _chunks(found_all):
            marks = ", ".join([q] * len(chunk))
            gone_sql = (f"DELETE FROM message WHERE seq IN ({marks}) AND NOT EXISTS "
                        "(SELECT 1 FROM entry WHERE entry.seq = message.seq)")
            if self.history_ms:  # kept for history (history.py): read, never deleted here
                if sqlite:
                    rows.update((r[0], r) for r in self.db.execute_sql(
                        f"SELECT {columns} FROM message WHERE seq IN ({marks})", chunk).fetchall())
            elif sqlite and self._returning:
                got = {r[0]: r for r in self.db.execute_sql(f"{gone_sql} RETURNING {columns}", chunk).fetchall()}
                rows.update(got)
                gone.update(got)
                rest = [s for s in chunk if s not in got]
                if rest:
                    rows.update((r[0], r) for r in self.db.execute_sql(
                        f"SELECT {columns} FROM message WHERE seq IN ({', '.join([q] * len(rest))})", rest).fetchall())
            elif self._returning:  # PostgreSQL (the rows were read with their locks)
                gone.update(s for (s,) in self.db.execute_sql(f"{gone_sql} RETURNING seq", chunk).fetchall())
            else:  # MariaDB/MySQL, and SQLite before 3.35 (which reads the rows first)
                if sqlite:
                    rows.update((r[0], r) for r in self.db.execute_sql(
                        f"SELECT {columns} FROM message WHERE seq IN ({marks})", chunk).fetchall())
                self.db.execute_sql(gone_sql, chunk)
                still = {s for (s,) in self.db.execute_sql(
                    f"SELECT seq FROM message WHERE seq IN ({marks})", chunk).fetchall()}
                gone.update(s for s in chunk if s not in still)
        # Group members' first acks, all at once: (seq, uid) pairs newly noted.
        candidates = sorted({(seq, receiver) for (receiver, _, _), found in zip(acks, found_by_ack) for seq in found
                             if (row := rows.get(seq)) is not None and row[7] is not None and row[8]
                             and receiver != row[1]})
        newly = self.members_acked(candidates) if candidates else set()
        out: list[tuple[core.DeletedRow, ...]] = []
        first: list[int] = []  # 1:1 messages whose `delivered` went out now
        bumps: dict[int, int] = {}  # group message -> members newly counted
        for (receiver, device, _), found in zip(acks, found_by_ack):
            rows_out = []
            for seq in found:
                row = rows.get(seq)
                if row is None:
                    continue  # an entry without its message (cannot happen; nothing to report)
                _, sender, msg_id, batch, sender_device, to, delivered, gseq, members = row
                if gseq is not None:
                    # A group message: `delivered` counts the members that acked it, each on its first device;
                    # never for a sync copy or a membership change (members 0).
                    receipt = (seq, receiver) in newly
                    if receipt:
                        newly.discard((seq, receiver))
                        bumps[seq] = bumps.get(seq, 0) + 1
                    rows_out.append(core.DeletedRow(receiver, seq, sender, msg_id, bool(batch), sender_device or "",
                                                    device, receipt, to[len(GROUP_PREFIX):], gseq,
                                                    delivered + bumps.get(seq, 0), members))
                    continue
                receipt = to == receiver and not delivered and seq not in first
                if receipt:
                    first.append(seq)
                rows_out.append(core.DeletedRow(receiver, seq, sender, msg_id, bool(batch), sender_device or "",
                                                device, receipt))
            out.append(tuple(rows_out))
        left = [s for s in first if s not in gone]
        if left:  # messages other devices still owe: remember that `delivered` went out
            self.db.execute_sql(f"UPDATE message SET delivered = 1 WHERE seq IN ({', '.join([q] * len(left))})", left)
        by_n: dict[int, list[int]] = {}
        for seq, n in bumps.items():
            if seq not in gone:
                by_n.setdefault(n, []).append(seq)
        for n, seqs in by_n.items():
            self.db.execute_sql(f"UPDATE message SET delivered = delivered + {q} WHERE seq IN "
                                f"({', '.join([q] * len(seqs))})", (n, *seqs))
        group_gone = [s for s in found_all if s in gone and rows.get(s) is not None and rows[s][7] is not None]
        if group_gone:  # the members' receipts of the group messages that left the store go with them
            self.db.execute_sql(f"DELETE FROM member_receipt WHERE seq IN ({', '.join([q] * len(group_gone))})",
                                group_gone)
        return out

    def count(self, op: core.CountBacklog) -> core.Counted:
        """Totals by sender, each sender's newest message as a preview, and the expired tally (then reset)."""
        by_sender: dict[str, int] = {}
        by_group: dict[str, int] = {}
        newest: dict[str, int] = {}
        for sender, to, n, top in count_query(op.receiver, op.device):
            by_sender[sender] = by_sender.get(sender, 0) + n
            newest[sender] = max(newest.get(sender, 0), top)
            if to.startswith(GROUP_PREFIX):
                gid = to[len(GROUP_PREFIX):]
                by_group[gid] = by_group.get(gid, 0) + n
        newest = list(newest.values())
        previews = {}
        if newest and self.keyring is None:
            for sender, seq, msg_type, text, sent_at in (
                    Message.select(Message.sender_uid, Message.seq, Message.msg_type,
                                   pw.fn.SUBSTR(Message.msg_content, 1, p.PREVIEW_CHARS), Message.send_time)
                    .where(Message.seq.in_(newest)).tuples()):
                previews[sender] = {"seq": seq, "type": msg_type, "content": text, "sent_at": sent_at}
        elif newest:  # sealed content: open it here, then cut
            for row in Message.select(*PAGE_FIELDS).where(Message.seq.in_(newest)).tuples():
                m = self._push_dict(row)
                previews[m["from"]] = {"seq": m["seq"], "type": m["type"], "sent_at": m["sent_at"],
                                       "content": m["content"][:p.PREVIEW_CHARS]}
        expired = self._take_expired(op.receiver, op.device)
        unread = read_by = unread_groups = None  # answers only, not announcements (conversations.py)
        if op.req_id is not None:
            unread, read_by = self.unread(op.receiver), self.read_by(op.receiver)
            unread_groups = self.unread_groups(op.receiver)
        return core.Counted(op, sum(by_sender.values()), by_sender, previews, expired, by_group=by_group,
                            unread=unread, read_by=read_by, unread_groups=unread_groups)

    def _take_expired(self, uid: str, device: str) -> int:
        """The device's expired tally, plus the user's tally from before it had devices; both reset. Each is
        taken exactly as read: if another worker took it first, the guard fails and it counts 0."""
        expired = 0
        row = Device.get_or_none((Device.uid == uid) & (Device.device == device))
        if row is not None and row.expired > 0:
            if Device.update(expired=Device.expired - row.expired).where(
                    (Device.uid == uid) & (Device.device == device) & (Device.expired >= row.expired)).execute():
                expired += row.expired
        row = Expired.get_or_none(Expired.receiver_uid == uid)
        if row is not None and row.count > 0:
            taken = Expired.update(count=Expired.count - row.count).where(
                (Expired.receiver_uid == uid) & (Expired.count >= row.count)).execute()
            expired += row.count if taken else 0
        return expired

    def pull(self, op: core.PullPage) -> core.Outcome:
        deleted: tuple[core.DeletedRow, ...] = ()
        if op.ack is not None:
            page = Page.get_or_none((Page.cursor == op.ack) & (Page.receiver_uid == op.receiver) &
                                    (Page.device == op.device))
            if page is None:
                return core.Refused(op, "unknown_cursor", "'ack' is not a cursor this server issued to you, "
                                                          "or it expired; pull again without it")
            if not page.acked:  # a repeated ack (lost answer) deletes nothing more
                deleted = self.delete(op.receiver, (int(s) for s in page.seqs.split(",")), op.device)
                Page.update(acked=True).where(Page.cursor == page.cursor).execute()
        name = f"page_{op.order}{'_from' if op.from_uid is not None else ''}"
        params = (op.receiver, op.device, op.from_uid, op.limit + 1) if op.from_uid is not None else \
            (op.receiver, op.device, op.limit + 1)
        rows = self.db.execute_sql(self._sql[name], params).fetchall()
        more = len(rows) > op.limit
        entries = [self._push_dict(r, op.receiver) for r in rows[:op.limit]]
        # Cut by bytes too: the page must stay deliverable (REPLY_PAYLOAD_MAX, under every broker's limit).
        fit = p.page_fit(entries)
        if fit < len(entries):
            entries, more = entries[:fit], True
        rows = rows[:len(entries)]
        cursor = None
        if rows:
            cursor = secrets.token_hex(16)
            Page.insert(cursor=cursor, receiver_uid=op.receiver, seqs=",".join(str(r[0]) for r in rows),
                        created_at=now_ms(), acked=False, device=op.device).execute()
        return core.Paged(op, tuple(entries), cursor, more, deleted)

    def _push_dict(self, row: tuple, reader: str | None = None) -> dict:
        """A page entry (or push) from a row of PAGE_FIELDS, its content opened if it was sealed. Read by
        ``reader``: a message it sent to someone else is a sync copy."""
        seq, msg_id, sender, receiver, msg_type, content, send_time, client_ts, key_id, sender_device, gseq = row
        unreadable = False
        if key_id is not None:
            if self.keyring is None:
                raise KeyError_("an encrypted message and no key ring")
            try:
                content = self.keyring.open(key_id, content, _aad(sender, receiver, msg_id))
            except InvalidTag:
                # Tampered with, or moved from another row: never show it, never block the pages behind it.
                log.error("message seq %s does not decrypt with key %r: delivered as unreadable", seq, key_id)
                content, unreadable = "", True
        if gseq is not None:  # a group message: a copy only for its sender's other devices
            copy = sender_device or "" if reader is not None and reader == sender else None
            receiver = receiver[len(GROUP_PREFIX):]
        else:
            copy = sender_device or "" if reader is not None and reader != receiver else None
        out = core.push_payload(seq, msg_id, sender, receiver, msg_type, content, send_time, client_ts, copy, gseq)
        if unreadable:
            out["unreadable"] = True
        return out

    def backlog(self) -> int:
        """Messages waiting for at least one device (not those kept for history)."""
        if self.history_ms:
            return Entry.select(pw.fn.COUNT(pw.fn.DISTINCT(Entry.seq))).scalar() or 0
        return Message.select().count()

    def alive(self, keys: Iterable) -> set:
        """Which of these pushes still wait: (receiver, device, seq) keys whose entry is still stored (not
        yet acked, here or through another worker); bare seqs: whose message is still stored."""
        keys = list(keys)
        seqs = [k if isinstance(k, int) else k[2] for k in keys]
        if not seqs:
            return set()
        if all(isinstance(k, int) for k in keys):
            return {s for (s,) in Message.select(Message.seq).where(Message.seq.in_(seqs)).tuples()}
        return {(u, d, s) for u, d, s in Entry.select(Entry.uid, Entry.device, Entry.seq)
                .where(Entry.seq.in_(seqs)).tuples()}
