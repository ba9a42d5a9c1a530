"""Storage: peewee models that read like the schema, and the queries the core's plans need.

The store runs a :class:`~backend.core.Plan`'s operations in one transaction
and reports :mod:`backend.core` outcomes.  It knows SQL, not MQTT.  Any
``playhouse.db_url`` URL works; SQLite (the default) gets WAL and full fsync.
"""

from __future__ import annotations

import logging
import os
import secrets
import sqlite3
import time
from typing import Iterable, Iterator

import peewee as pw
from playhouse.db_url import connect as db_url_connect
from playhouse.migrate import SchemaMigrator, migrate

from . import core
from . import protocol as p
from .crypto import InvalidTag, KeyError_, KeyRing

log = logging.getLogger("backend.store")

# A page's cursor stays valid this long; a page is normally acked within seconds, and a client
# holding an expired cursor just pulls again without it and drops the repeats by seq.
PAGE_TTL_MS = 24 * 3600 * 1000
# Unread messages expire after this age; 14 days is how long Signal's server keeps an offline queue.
EXPIRE_AFTER_MS = 14 * 24 * 3600 * 1000
# (sender, msg_id) pairs are remembered at least this long after their message left the store,
# so a late retransmit is still answered "duplicate"; a longer --expire-after lengthens it to match.
ACCEPTED_RETENTION_MS = EXPIRE_AFTER_MS
# SQLite: how long a writer waits for another (e.g. `user add` while `serve` runs) before failing.
SQLITE_BUSY_TIMEOUT_MS = 5000
# Housekeeping (purge) works in transactions of at most this many rows: one statement over 200,000
# delivered messages held the store for 385 ms (every send waiting behind it); a chunk of 500 takes
# about 2 ms here, and the worker runs its batches between chunks.
PURGE_CHUNK = 500
# Known accounts are cached this long (embedded broker): a removed user may still receive for a few
# seconds, as a message sent just before the removal would have been.
KNOWN_CACHE_S = 10.0
KNOWN_CACHE_MAX = 100_000
# Pooled server databases: a worker uses one thread for the store, plus the embedded broker's
# login checks; 8 leaves room. Connections idle for 5 minutes are recycled (PgBouncer's
# server_idle_timeout is 600 s; MySQL's wait_timeout 8 h would otherwise cut them silently).
POOL_MAX_CONNECTIONS = 8
POOL_STALE_TIMEOUT_S = 300
# Several workers starting at once must not race creating the schema: they take this lock first.
SCHEMA_LOCK_NAME = "im_backend_schema"
SCHEMA_LOCK_ID = 0x494D5343  # PostgreSQL advisory locks take an integer ("IMSC")

database_proxy = pw.DatabaseProxy()


def now_ms() -> int:
    return int(time.time() * 1000)


class BaseModel(pw.Model):
    class Meta:
        database = database_proxy
        legacy_table_names = False


class SeqField(pw.BigAutoField):
    """The message seq: never reused, even after the newest row is deleted.

    SQLite reuses the largest rowid once that row is gone unless the column says
    AUTOINCREMENT; a reused seq would be dropped as a duplicate by receivers.
    PostgreSQL sequences and MariaDB's (persistent, 10.2.4+) auto-increment never reuse.
    """

    def ddl(self, ctx):
        node = super().ddl(ctx)
        db = self.model._meta.database
        if isinstance(getattr(db, "obj", db), pw.SqliteDatabase):
            return pw.NodeList((node, pw.SQL("AUTOINCREMENT")))
        return node


class ContentField(pw.TextField):
    """Message content: up to 64 KiB of UTF-8; MySQL's TEXT holds only 65,535 bytes, so MEDIUMTEXT there."""

    def ddl_datatype(self, ctx):
        db = self.model._meta.database
        if isinstance(getattr(db, "obj", db), pw.MySQLDatabase):
            return pw.SQL("MEDIUMTEXT")
        return super().ddl_datatype(ctx)


class User(BaseModel):
    """Accounts for the embedded broker. Only a salted slow hash of the password is kept."""

    uid = pw.CharField(max_length=50, primary_key=True)
    password_hash = pw.CharField(max_length=255)
    created_at = pw.BigIntegerField()


class Message(BaseModel):
    """The offline store: one row per (receiver, message) until the receiver acks it.

    The columns are the articles' offline table (receiver_uid, msg_id, send_time,
    sender_uid, msg_type, msg_content) plus seq.  One row per receiver keeps the
    shape open to groups and several devices (fan-out rows, each with its own seq).
    """

    seq = SeqField()
    receiver_uid = pw.CharField(max_length=50)
    sender_uid = pw.CharField(max_length=50)
    msg_id = pw.CharField(max_length=70)
    msg_type = pw.CharField(max_length=32)
    msg_content = ContentField()
    send_time = pw.BigIntegerField(index=True)  # server time, ms since the epoch (indexed for expiry)
    client_ts = pw.BigIntegerField(null=True)  # the sender's own clock, as it sent it
    key_id = pw.CharField(max_length=16, null=True)  # set when msg_content is sealed (backend/crypto.py)
    # 1: the sender asked for batched receipts, its `delivered` too (docs/PROTOCOL.md 4.4). A database
    # default, so a writer that does not know the column (an older worker, a bulk load) gets v1's 0.
    batch_receipts = pw.SmallIntegerField(default=0, constraints=[pw.SQL("DEFAULT 0")])

    class Meta:
        indexes = (
            (("receiver_uid", "seq"), False),
            (("receiver_uid", "sender_uid", "seq"), False),
        )


class Accepted(BaseModel):
    """Every (sender, msg_id) ever stored, kept after delivery so resends are recognised."""

    sender_uid = pw.CharField(max_length=50)
    msg_id = pw.CharField(max_length=70)
    receiver_uid = pw.CharField(max_length=50)
    seq = pw.BigIntegerField()
    accepted_at = pw.BigIntegerField()
    # When the housekeeping first saw the message gone (acked); retention counts from here.
    released_at = pw.BigIntegerField(null=True)

    class Meta:
        primary_key = pw.CompositeKey("sender_uid", "msg_id")
        # The housekeeping walks this index in chunks: unreleased pairs by seq, released ones by age.
        indexes = ((("released_at", "seq"), False),)


class Page(BaseModel):
    """A page handed to a receiver: its cursor names exactly these seqs, nothing else."""

    cursor = pw.CharField(max_length=32, primary_key=True)
    receiver_uid = pw.CharField(max_length=50)
    seqs = pw.TextField()  # comma-separated
    created_at = pw.BigIntegerField(index=True)
    acked = pw.BooleanField(default=False)


class Expired(BaseModel):
    """How many of a receiver's messages expired unread since its last count (reported, then reset)."""

    receiver_uid = pw.CharField(max_length=50, primary_key=True)
    count = pw.BigIntegerField(default=0)


class KeyCheck(BaseModel):
    """A known constant sealed with each encryption key ever used: a wrong key is refused on start."""

    key_id = pw.CharField(max_length=16, primary_key=True)
    probe = pw.TextField()


class LastStatus(BaseModel):
    """The last status word (online/offline) the workers heard on each status topic (im/status/{uid}, and a
    device's im/status/{uid}/{dev}), so a restarted worker knows whom to ask the broker about: RabbitMQ never
    sends retained statuses to the wildcards im/status/+ (docs/PROTOCOL.md, section 10.1)."""

    # The whole topic: 10 for im/status/, a 50-character uid, and room for a device level.
    topic = pw.CharField(max_length=128, primary_key=True)
    status = pw.CharField(max_length=16)
    changed_at = pw.BigIntegerField()


MODELS = (User, Message, Accepted, Page, Expired, KeyCheck, LastStatus)


def _pooled(url: str) -> str:
    """postgresql:// and mysql:// (or mariadb://) get peewee's connection pool."""
    for plain, pooled in (("postgresql://", "postgresql+pool://"), ("postgres://", "postgres+pool://"),
                          ("mysql://", "mysql+pool://"), ("mariadb://", "mysql+pool://")):
        if url.startswith(plain):
            sep = "&" if "?" in url else "?"
            return (pooled + url[len(plain):] + f"{sep}max_connections={POOL_MAX_CONNECTIONS}"
                    f"&stale_timeout={POOL_STALE_TIMEOUT_S}")
    return url


def open_database(url: str, *, create: bool = True) -> pw.Database:
    """Connect to ``url`` (any playhouse.db_url URL), bind the models, create or migrate the schema."""
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///"):]
        if path and path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        db = db_url_connect(url, pragmas={
            "journal_mode": "wal",
            # FULL: a receipt promises the message survives power loss, not only a process crash.
            "synchronous": "full",
            "busy_timeout": SQLITE_BUSY_TIMEOUT_MS,
        })
    else:
        mysql = url.startswith(("mysql", "mariadb"))
        db = db_url_connect(_pooled(url), **({"charset": "utf8mb4"} if mysql else {}))
        if mysql:
            db._initialize_connection = _mysql_session  # each new pooled connection
    database_proxy.initialize(db)
    if create:
        with _schema_lock(db):
            create_schema(db)
    return db


def _mysql_session(conn) -> None:
    """READ COMMITTED, as PostgreSQL's default: InnoDB's REPEATABLE READ takes gap locks on the
    deletes of acks, which deadlock with other workers' inserts. A lock wait gives up after 5 s
    (InnoDB's default is 50 s) and the worker retries the batch, still unacked. Standard statements,
    so MySQL 8 and MariaDB both take them."""
    with conn.cursor() as cur:
        cur.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
        cur.execute("SET SESSION innodb_lock_wait_timeout = 5")


class _schema_lock:
    """Serialise schema changes between workers that start together (advisory lock / GET_LOCK)."""

    def __init__(self, db: pw.Database):
        self.db = db

    def __enter__(self):
        if isinstance(self.db, pw.PostgresqlDatabase):
            self.db.execute_sql("SELECT pg_advisory_lock(%s)", (SCHEMA_LOCK_ID,))
        elif isinstance(self.db, pw.MySQLDatabase):
            (got,) = self.db.execute_sql("SELECT GET_LOCK(%s, 60)", (SCHEMA_LOCK_NAME,)).fetchone()
            if got != 1:
                raise pw.OperationalError("another worker held the schema lock for 60 s; start again")

    def __exit__(self, *exc):
        if isinstance(self.db, pw.PostgresqlDatabase):
            self.db.execute_sql("SELECT pg_advisory_unlock(%s)", (SCHEMA_LOCK_ID,))
        elif isinstance(self.db, pw.MySQLDatabase):
            self.db.execute_sql("SELECT RELEASE_LOCK(%s)", (SCHEMA_LOCK_NAME,))


def create_schema(db: pw.Database) -> None:
    """Create missing tables and indexes, and add columns that newer versions added (never drops)."""
    # MySQL/MariaDB: binary collation, so uids and msg_ids compare byte for byte ("Alice" is not "alice").
    settings = ["DEFAULT CHARSET=utf8mb4 COLLATE utf8mb4_bin"] if isinstance(db, pw.MySQLDatabase) else []
    for model in MODELS:
        model._meta.table_settings = settings
    # Columns first (an index on a new column needs the column), then missing tables and indexes.
    migrator = SchemaMigrator.from_database(db)
    tables = set(db.get_tables())
    for model in MODELS:
        if model._meta.table_name not in tables:
            continue
        have = {c.name for c in db.get_columns(model._meta.table_name)}
        missing = [f for f in model._meta.sorted_fields if f.column_name not in have]
        if missing:
            migrate(*(migrator.add_column(model._meta.table_name, f.column_name, f) for f in missing))
    db.create_tables(MODELS, safe=True)
    # MySQL/MariaDB: peewee's safe create skips an existing table's indexes (no CREATE INDEX IF NOT
    # EXISTS there), so an index that a newer version added is created here.
    if not db.safe_create_index:
        for model in MODELS:
            have = {i.name for i in db.get_indexes(model._meta.table_name)}
            for index in model._meta.fields_to_index():
                if isinstance(index, pw.Index) and index._name not in have:
                    db.execute(model._schema._create_index(index, safe=False))


def drop_schema(db: pw.Database) -> None:
    """Remove every table of ours (tests)."""
    db.drop_tables(MODELS, safe=True)


def _aad(sender: str, receiver: str, msg_id: str) -> bytes:
    """Binds sealed content to its row: moved to another row, it no longer decrypts."""
    return f"{sender}\x00{receiver}\x00{msg_id}".encode("utf-8")


def check_keys(keyring: KeyRing | None) -> None:
    """Refuse to start with a key ring that cannot read this database (or none when one is needed)."""
    used = {k for (k,) in Message.select(Message.key_id).distinct().where(Message.key_id.is_null(False)).tuples()}
    known = {c.key_id: c.probe for c in KeyCheck.select()}
    if keyring is None:
        if used:
            raise KeyError_(f"the database holds encrypted messages (key ids {sorted(used)}); "
                            "give their keys with --encryption-key-file or $IM_ENCRYPTION_KEY")
        return
    for key_id in keyring.keys:
        if key_id in known and not keyring.check(key_id, known[key_id]):
            raise KeyError_(f"wrong encryption key for key id {key_id!r}: it is not the key this database "
                            "was written with")
    missing = used - set(keyring.keys)
    if missing:
        raise KeyError_(f"the database holds messages sealed with key ids {sorted(missing)}, "
                        "which are not in the key ring")
    for key_id in keyring.keys:
        if key_id not in known:
            KeyCheck.insert(key_id=key_id, probe=keyring.probe(key_id)).on_conflict_ignore().execute()


# A page entry's columns, in the order _push_dict takes them.
PAGE_FIELDS = (Message.seq, Message.msg_id, Message.sender_uid, Message.receiver_uid, Message.msg_type,
               Message.msg_content, Message.send_time, Message.client_ts, Message.key_id)


def _returning_delete(db: pw.Database) -> bool:
    """DELETE ... RETURNING: PostgreSQL, and SQLite from 3.35. (MariaDB has it, MySQL 8 not: both select first.)"""
    if isinstance(db, pw.PostgresqlDatabase):
        return True
    return isinstance(db, pw.SqliteDatabase) and sqlite3.sqlite_version_info >= (3, 35)


def count_query(receiver: str) -> pw.ModelSelect:
    """(sender, count, newest seq) per sender: served by the (receiver_uid, sender_uid, seq) index alone."""
    return (Message.select(Message.sender_uid, pw.fn.COUNT(Message.seq), pw.fn.MAX(Message.seq))
            .where(Message.receiver_uid == receiver).group_by(Message.sender_uid).tuples())


def page_query(receiver: str, limit: int, from_uid: str | None = None, order: str = "oldest") -> pw.ModelSelect:
    """One page of a receiver's messages, by seq: a range scan of (receiver_uid, seq), or of
    (receiver_uid, sender_uid, seq) with ``from``; other receivers' rows are never read. Rows are
    tuples of PAGE_FIELDS: building 500 model objects per page was most of a drain's store time."""
    q = Message.select(*PAGE_FIELDS).where(Message.receiver_uid == receiver)
    if from_uid is not None:
        q = q.where(Message.sender_uid == from_uid)
    return q.order_by(Message.seq.desc() if order == "newest" else Message.seq).limit(limit).tuples()


class Store:
    """Runs plans against the database. One instance per worker thread."""

    def __init__(self, db: pw.Database, *, known_accounts: bool = False, quota: int | None = None,
                 expire_after_ms: int | None = EXPIRE_AFTER_MS, keyring: KeyRing | None = None):
        self.db = db
        self.keyring = keyring  # None: content stored as sent (it may still be end-to-end encrypted)
        # With the embedded broker the worker knows every account: a message to nobody is an error.
        self.known_accounts = known_accounts
        # Per-receiver backlog limit (None: none). Checked before each insert; several workers storing
        # for one receiver at the same instant may pass it by a few messages, never by a batch.
        self.quota = quota or None
        self.expire_after_ms = expire_after_ms
        self._sql = self._prepare(db)  # the hot path's SQL text, built once
        self._returning = _returning_delete(db)
        self._known_cache: dict[str, float] = {}  # uid -> known until (monotonic s)

    def apply(self, ops: Iterable[core.Operation]) -> list[core.Outcome]:
        """Run the operations in one transaction; the caller publishes only after this returns."""
        with self.db.atomic():
            return [self._run(op) for op in ops]

    def _run(self, op: core.Operation) -> core.Outcome:
        if isinstance(op, core.StoreMessage):
            return self.store_message(op)
        if isinstance(op, core.DeleteAcked):
            return core.Deleted(op, self.delete(op.receiver, op.seqs))
        if isinstance(op, core.CountBacklog):
            return self.count(op)
        return self.pull(op)

    # -- operations -----------------------------------------------------------
    # The hot path (every message stores once and is deleted once) runs prepared SQL text: building
    # it with peewee for each message cost more CPU than the database itself (bench profile: 39%).
    @staticmethod
    def _prepare(db: pw.Database) -> dict[str, str]:
        q = db.param
        pg = isinstance(db, pw.PostgresqlDatabase)
        ignore = "INSERT IGNORE INTO" if isinstance(db, pw.MySQLDatabase) else "INSERT INTO"
        tail = "" if isinstance(db, pw.MySQLDatabase) else " ON CONFLICT DO NOTHING"
        return {
            "first": f"SELECT seq, receiver_uid FROM accepted WHERE sender_uid = {q} AND msg_id = {q}",
            "insert": "INSERT INTO message (receiver_uid, sender_uid, msg_id, msg_type, msg_content, send_time, "
                      f"client_ts, key_id, batch_receipts) VALUES ({', '.join([q] * 9)})" + (" RETURNING seq" if pg else ""),
            "accept": f"{ignore} accepted (sender_uid, msg_id, receiver_uid, seq, accepted_at) "
                      f"VALUES ({q}, {q}, {q}, {q}, {q}){tail}",
            "unstore": f"DELETE FROM message WHERE seq = {q}",
            "waiting": f"SELECT 1 FROM message WHERE seq = {q}",
            # Pages: page_query's text, its parameters (receiver, [from,] limit) given per pull.
            **{f"page_{order}{'_from' if from_uid else ''}": page_query("", 1, "" if from_uid else None, order).sql()[0]
               for order in p.PULL_ORDERS for from_uid in (False, True)},
        }

    def _first(self, sender: str, msg_id: str) -> tuple[int, str] | None:
        return self.db.execute_sql(self._sql["first"], (sender, msg_id)).fetchone()

    def _duplicate(self, op: core.StoreMessage, first: tuple[int, str]) -> core.Stored:
        """A `duplicate` outcome, saying whether the first message still waits (the core then makes
        sure its receiver, if online, hears of it)."""
        waiting = self.db.execute_sql(self._sql["waiting"], (first[0],)).fetchone() is not None
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

    def store_message(self, op: core.StoreMessage) -> core.Outcome:
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
                                                  key_id, int(op.batch_receipts)))
        seq = cur.fetchone()[0] if isinstance(self.db, pw.PostgresqlDatabase) else cur.lastrowid
        inserted = self.db.execute_sql(sql["accept"], (op.sender, op.msg_id, op.to, seq, op.sent_at)).rowcount
        if inserted != 1:
            # Another worker stored the same (sender, msg_id) after our look-up: theirs wins.
            self.db.execute_sql(sql["unstore"], (seq,))
            return self._duplicate(op, self._first(op.sender, op.msg_id))
        return core.Stored(op, seq)

    def delete(self, receiver: str, seqs: Iterable[int]) -> tuple[core.DeletedRow, ...]:
        seqs = list(seqs)
        if not seqs:
            return ()
        q = self.db.param
        where = f"receiver_uid = {q} AND seq IN ({', '.join([q] * len(seqs))})"
        params = (receiver, *seqs)
        columns = "seq, sender_uid, msg_id, batch_receipts"
        if self._returning:  # one statement instead of two
            found = self.db.execute_sql(f"DELETE FROM message WHERE {where} RETURNING {columns}", params).fetchall()
        else:
            found = self.db.execute_sql(f"SELECT {columns} FROM message WHERE {where}", params).fetchall()
            if found:
                self.db.execute_sql(f"DELETE FROM message WHERE {where}", params)
        # By seq: receipts go out in the order the messages were stored.
        return tuple(core.DeletedRow(receiver, seq, sender, msg_id, bool(batch))
                     for seq, sender, msg_id, batch in sorted(found))

    def count(self, op: core.CountBacklog) -> core.Counted:
        """Totals by sender, each sender's newest message as a preview, and the expired tally (then reset)."""
        by_sender, newest = {}, []
        for sender, n, top in count_query(op.receiver):
            by_sender[sender] = n
            newest.append(top)
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
        expired = 0
        row = Expired.get_or_none(Expired.receiver_uid == op.receiver)
        if row is not None and row.count > 0:
            # Take exactly what we read; if another worker took it first, the guard fails and we report 0.
            taken = Expired.update(count=Expired.count - row.count).where(
                (Expired.receiver_uid == op.receiver) & (Expired.count >= row.count)).execute()
            expired = row.count if taken else 0
        return core.Counted(op, sum(by_sender.values()), by_sender, previews, expired)

    def pull(self, op: core.PullPage) -> core.Outcome:
        deleted: tuple[core.DeletedRow, ...] = ()
        if op.ack is not None:
            page = Page.get_or_none((Page.cursor == op.ack) & (Page.receiver_uid == op.receiver))
            if page is None:
                return core.Refused(op, "unknown_cursor", "'ack' is not a cursor this server issued to you, "
                                                          "or it expired; pull again without it")
            if not page.acked:  # a repeated ack (lost answer) deletes nothing more
                deleted = self.delete(op.receiver, (int(s) for s in page.seqs.split(",")))
                Page.update(acked=True).where(Page.cursor == page.cursor).execute()
        name = f"page_{op.order}{'_from' if op.from_uid is not None else ''}"
        params = (op.receiver, op.from_uid, op.limit + 1) if op.from_uid is not None else (op.receiver, op.limit + 1)
        rows = self.db.execute_sql(self._sql[name], params).fetchall()
        more = len(rows) > op.limit
        entries = [self._push_dict(r) for r in rows[:op.limit]]
        # Cut by bytes too: the page must stay deliverable (REPLY_PAYLOAD_MAX, under every broker's limit).
        fit = p.page_fit(entries)
        if fit < len(entries):
            entries, more = entries[:fit], True
        rows = rows[:len(entries)]
        cursor = None
        if rows:
            cursor = secrets.token_hex(16)
            Page.insert(cursor=cursor, receiver_uid=op.receiver, seqs=",".join(str(r[0]) for r in rows),
                        created_at=now_ms(), acked=False).execute()
        return core.Paged(op, tuple(entries), cursor, more, deleted)

    def _push_dict(self, row: tuple) -> dict:
        """A page entry (or push) from a row of PAGE_FIELDS, its content opened if it was sealed."""
        seq, msg_id, sender, receiver, msg_type, content, send_time, client_ts, key_id = row
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
        out = core.push_payload(seq, msg_id, sender, receiver, msg_type, content, send_time, client_ts)
        if unreadable:
            out["unreadable"] = True
        return out

    def save_statuses(self, statuses: dict[str, str], now: int | None = None) -> None:
        """Remember each status topic's last word (``{"im/status/bob": "online"}``); one upsert per topic."""
        if not statuses:
            return
        now = now or now_ms()
        rows = [{"topic": topic, "status": word, "changed_at": now} for topic, word in statuses.items()]
        update = {LastStatus.status: pw.EXCLUDED.status, LastStatus.changed_at: pw.EXCLUDED.changed_at}
        with self.db.atomic():
            for row in rows:
                q = LastStatus.insert(**row)
                if isinstance(self.db, pw.MySQLDatabase):
                    q = q.on_conflict(update={LastStatus.status: row["status"], LastStatus.changed_at: now})
                else:
                    q = q.on_conflict(conflict_target=[LastStatus.topic], update=update)
                q.execute()

    def last_online(self, limit: int = 100_000) -> list[str]:
        """The status topics whose last word heard was ``online``, most recent first (at most ``limit``)."""
        q = (LastStatus.select(LastStatus.topic).where(LastStatus.status == "online")
             .order_by(LastStatus.changed_at.desc()).limit(limit))
        return [r.topic for r in q]

    def backlog(self) -> int:
        return Message.select().count()

    def alive(self, seqs: Iterable[int]) -> set[int]:
        """Which of these seqs are still stored (not yet acked, here or through another worker)."""
        seqs = list(seqs)
        if not seqs:
            return set()
        return {s for (s,) in Message.select(Message.seq).where(Message.seq.in_(seqs)).tuples()}

    # -- maintenance ----------------------------------------------------------
    def expire(self, now: int | None = None) -> int:
        """Delete messages older than the expiry age, tallying them per receiver for its next count.
        Each receiver's rows go in one DELETE whose row count is the tally, so two workers expiring
        at once never count a message twice. Returns how many expired."""
        if not self.expire_after_ms:
            return 0
        cutoff = (now_ms() if now is None else now) - self.expire_after_ms
        # The common case, nothing old, answered by the send_time index alone (a DISTINCT over all
        # receivers would walk the whole receiver index: 1.5 s at a million rows).
        if not Message.select(Message.seq).where(Message.send_time < cutoff).limit(1).exists():
            return 0
        receivers = [r for (r,) in Message.select(Message.receiver_uid).distinct()
                     .where(Message.send_time < cutoff).tuples()]
        total = 0
        for receiver in receivers:
            with self.db.atomic():
                n = Message.delete().where((Message.receiver_uid == receiver) & (Message.send_time < cutoff)).execute()
                if n:
                    self._add_expired(receiver, n)
            total += n
        return total

    def _add_expired(self, receiver: str, n: int) -> None:
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
