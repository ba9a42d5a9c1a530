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
# Devices per user (--max-devices): Signal links up to 5 devices beside the phone; 10 covers a phone, a
# tablet, two computers and several browser tabs, and bounds the entries one message costs (one per device).
MAX_DEVICES = 10
# A device's last_seen is written at most once a minute per worker (not on every message): enough for a
# 14-day silence rule. The same period bounds how long a worker may still take a device removed by another
# worker as registered (it is then registered afresh, and told, at its next contact after that).
DEVICE_SEEN_S = 60.0
DEVICE_SEEN_MAX = 100_000
# A removed device's id is remembered this long, so that it is told it was removed when it comes back.
# A year: an app left unopened for longer starts afresh anyway.
REMOVED_DEVICE_RETENTION_MS = 365 * 24 * 3600 * 1000
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
    # The device it was sent from ("" the v1 topics): its receipts go there; sync copies name it.
    sender_device = pw.CharField(max_length=32, default="", constraints=[pw.SQL("DEFAULT ''")])
    # 1 once the first of the receiver's devices acked it: its `delivered` receipt went out (only once).
    delivered = pw.SmallIntegerField(default=0, constraints=[pw.SQL("DEFAULT 0")])

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
    device = pw.CharField(max_length=32, default="", constraints=[pw.SQL("DEFAULT ''")])  # whose page it is


class Expired(BaseModel):
    """How many of a receiver's messages expired unread since its last count (reported, then reset)."""

    receiver_uid = pw.CharField(max_length=50, primary_key=True)
    count = pw.BigIntegerField(default=0)


class Device(BaseModel):
    """A user's registered device ("" the default device: the v1 topics). Registered at its first contact;
    messages stored for the user afterwards get an entry for it."""

    uid = pw.CharField(max_length=50)
    device = pw.CharField(max_length=32)
    registered_at = pw.BigIntegerField()
    last_seen = pw.BigIntegerField(index=True)  # indexed: housekeeping finds the silent ones
    push_endpoint = pw.TextField(null=True)  # the HTTPS URL of its app's push gateway (backend/push.py)
    expired = pw.BigIntegerField(default=0, constraints=[pw.SQL("DEFAULT 0")])  # since its last count
    # The newest seq a push notification told it of (a gateway accepted it): sweeps notify only what is newer.
    notified_seq = pw.BigIntegerField(default=0, constraints=[pw.SQL("DEFAULT 0")])

    class Meta:
        primary_key = pw.CompositeKey("uid", "device")


class Entry(BaseModel):
    """One per (message, device that still owes its ack): the body is stored once, in `message`.
    A sync copy is an entry of the sender's other device (uid is then the sender, not the receiver)."""

    uid = pw.CharField(max_length=50)
    device = pw.CharField(max_length=32)
    seq = pw.BigIntegerField()

    class Meta:
        # Pages and counts: a range scan of (uid, device, seq); the last entry of a message: by seq.
        primary_key = pw.CompositeKey("uid", "device", "seq")
        indexes = ((("seq",), False),)


class RemovedDevice(BaseModel):
    """A device removed (silent past the expiry age, or by a request): told so if it comes back."""

    uid = pw.CharField(max_length=50)
    device = pw.CharField(max_length=32)
    removed_at = pw.BigIntegerField(index=True)

    class Meta:
        primary_key = pw.CompositeKey("uid", "device")


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


MODELS = (User, Message, Accepted, Page, Expired, KeyCheck, Device, Entry, RemovedDevice, LastStatus)


def _pooled(url: str) -> str:
    """postgresql:// and mysql:// (or mariadb://) get peewee's connection pool."""
    for plain, pooled in (("postgresql://", "postgresql+pool://"), ("postgres://", "postgres+pool://"),
                          ("mysql://", "mysql+pool://"), ("mariadb://", "mysql+pool://")):
        if url.startswith(plain):
            sep = "&" if "?" in url else "?"
            return (pooled + url[len(plain):] + f"{sep}max_connections={POOL_MAX_CONNECTIONS}"
                    f"&stale_timeout={POOL_STALE_TIMEOUT_S}")
    return url


class DatabaseOpenError(Exception):
    """A database URL that is malformed, or a database that cannot be reached, logged into or opened.
    The message is one line saying what happened and what to do (never the URL's password)."""


# What a database URL looks like, for the error that a malformed one gets.
DATABASE_URL_FORMS = ("sqlite:///PATH (a file: three slashes, then a path relative to the current directory, "
                      "or four for an absolute one), postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE or "
                      "mysql://USER[:PASSWORD]@HOST[:PORT]/DATABASE")


def check_database_url(url: str) -> None:
    """Raise :class:`DatabaseOpenError` unless ``url`` has a form :func:`open_database` can open (no I/O)."""
    from playhouse.db_url import schemes
    from urllib.parse import urlsplit
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if not scheme:
        hint = f" (for a SQLite file, sqlite:///{url})" if url and ":" not in url else ""
        raise DatabaseOpenError(f"database URL {url!r} has no scheme{hint}; the forms are {DATABASE_URL_FORMS}")
    if scheme not in schemes and scheme != "mariadb":
        raise DatabaseOpenError(f"unknown database URL scheme {scheme!r} in {redact_url(url)!r}; "
                                f"the forms are {DATABASE_URL_FORMS}")
    if scheme.startswith("sqlite"):
        if not url.startswith(f"{scheme}:///") or url == f"{scheme}:///":
            raise DatabaseOpenError(f"a SQLite URL is {scheme}:/// then a path, e.g. sqlite:///data/im.db "
                                    f"(got {url!r})")
    elif not urlsplit(url).path.strip("/"):
        raise DatabaseOpenError(f"database URL {redact_url(url)!r} names no database; the forms are "
                                f"{DATABASE_URL_FORMS}")


def redact_url(url: str) -> str:
    """The URL without its password (error messages and logs)."""
    from urllib.parse import urlsplit, urlunsplit
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname or ''}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _open_failure(url: str, e: BaseException) -> str:
    """One line: why opening ``url`` failed, and what to do."""
    from urllib.parse import unquote, urlsplit
    parts = urlsplit(url)
    text = " ".join(str(e).split())  # drivers' messages span lines
    low = text.lower()
    if url.startswith("sqlite"):
        path = url.split(":///", 1)[1]
        return (f"cannot open the SQLite file {path!r} ({getattr(e, 'strerror', None) or text}): check the path "
                f"in the database URL (--database-url) and that its directory is writable")
    user, name = unquote(parts.username or ""), parts.path.strip("/")
    where = f"{parts.hostname or 'localhost'}:{parts.port or ''}".rstrip(":")
    mysql = url.startswith(("mysql", "mariadb"))
    kind = "MariaDB/MySQL" if mysql else "PostgreSQL"
    code = e.args[0] if e.args and isinstance(e.args[0], int) else None  # PyMySQL: (errno, message)
    if code is not None and len(e.args) > 1:
        text = " ".join(str(e.args[1]).split())
    if code == 1049 or ("database" in low and "does not exist" in low):
        make = f'mysql -h {parts.hostname} -u {user} -p -e "CREATE DATABASE {name}"' if mysql else \
            f"createdb -h {parts.hostname} -U {user or 'postgres'} {name}"
        return f"{kind} at {where} has no database {name!r}: create it ({make}) or fix the database URL"
    if code in (1045, 1698) or "password authentication failed" in low or "no password supplied" in low:
        return (f"{kind} at {where} refused the login of user {user!r} (wrong user name or password): "
                f"check them in the database URL")
    if "role" in low and "does not exist" in low:
        return f"{kind} at {where} has no user {user!r}: create it (createuser) or fix the user name in the database URL"
    if code in (2003, 2005) or "connection refused" in low or "could not translate host name" in low \
            or "timeout" in low or "timed out" in low:
        return f"cannot reach {kind} at {where} ({text}): is it running there? Check the host and port in the database URL"
    if isinstance(e, (pw.ImproperlyConfigured, ImportError)):
        return f"cannot use {kind}: {text} (pip install -r requirements.txt installs its driver)"
    return f"cannot open the {kind} database {name!r} at {where}: {text}"


def open_database(url: str, *, create: bool = True) -> pw.Database:
    """Connect to ``url`` (any playhouse.db_url URL), bind the models, create or migrate the schema.

    Raises :class:`DatabaseOpenError` (one line: what happened, what to do) for a malformed URL, or a
    database that cannot be reached, logged into or opened; with ``create=False`` nothing connects yet."""
    check_database_url(url)
    try:
        return _open_database(url, create)
    except (pw.OperationalError, pw.InterfaceError, pw.ImproperlyConfigured, ImportError, sqlite3.Error,
            OSError) as e:
        raise DatabaseOpenError(_open_failure(url, e)) from e


def _open_database(url: str, create: bool) -> pw.Database:
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
    # A database written before devices existed: every waiting message gets an entry for its receiver's
    # default device "" (once: the entry table is created in the same call, under the schema lock).
    backfill = Message._meta.table_name in tables and Entry._meta.table_name not in tables
    for model in MODELS:
        if model._meta.table_name not in tables:
            continue
        have = {c.name for c in db.get_columns(model._meta.table_name)}
        missing = [f for f in model._meta.sorted_fields if f.column_name not in have]
        if missing:
            migrate(*(migrator.add_column(model._meta.table_name, f.column_name, f) for f in missing))
    db.create_tables(MODELS, safe=True)
    if backfill:
        with db.atomic():
            db.execute_sql("INSERT INTO entry (uid, device, seq) SELECT receiver_uid, '', seq FROM message")
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
               Message.msg_content, Message.send_time, Message.client_ts, Message.key_id, Message.sender_device)


def _returning_delete(db: pw.Database) -> bool:
    """DELETE ... RETURNING: PostgreSQL, and SQLite from 3.35. (MariaDB has it, MySQL 8 not: both select first.)"""
    if isinstance(db, pw.PostgresqlDatabase):
        return True
    return isinstance(db, pw.SqliteDatabase) and sqlite3.sqlite_version_info >= (3, 35)


def _for_update(db: pw.Database) -> str:
    """Row locks where the database has them (SQLite has one writer at a time anyway)."""
    return "" if isinstance(db, pw.SqliteDatabase) else " FOR UPDATE"


def count_query(receiver: str, device: str = "") -> pw.ModelSelect:
    """(sender, count, newest seq) per sender of what waits for one device: a range scan of the entry key
    (uid, device, seq), each entry joined to its message by primary key; other devices' rows are never read."""
    return (Entry.select(Message.sender_uid, pw.fn.COUNT(Entry.seq), pw.fn.MAX(Entry.seq))
            .join(Message, on=(Message.seq == Entry.seq))
            .where((Entry.uid == receiver) & (Entry.device == device)).group_by(Message.sender_uid).tuples())


def page_query(receiver: str, limit: int, from_uid: str | None = None, order: str = "oldest",
               device: str = "") -> pw.ModelSelect:
    """One page of a device's messages, by seq: a range scan of the entry key (uid, device, seq) in seq
    order, each joined to its message by primary key. Rows are tuples of PAGE_FIELDS: building 500 model
    objects per page was most of a drain's store time."""
    q = (Entry.select(*PAGE_FIELDS).join(Message, on=(Message.seq == Entry.seq))
         .where((Entry.uid == receiver) & (Entry.device == device)))
    if from_uid is not None:
        q = q.where(Message.sender_uid == from_uid)
    return q.order_by(Entry.seq.desc() if order == "newest" else Entry.seq).limit(limit).tuples()


# The device half of the store needs the models above, so it is imported here, once they exist.
from .store_devices import DeviceStore  # noqa: E402


class Store(DeviceStore):
    """Runs plans against the database. One instance per worker thread. Device registration, removal, push
    endpoints and the user-scope pages are DeviceStore's (backend/store_devices.py)."""

    def __init__(self, db: pw.Database, *, known_accounts: bool = False, quota: int | None = None,
                 expire_after_ms: int | None = EXPIRE_AFTER_MS, keyring: KeyRing | None = None,
                 max_devices: int | None = MAX_DEVICES):
        self.db = db
        self.keyring = keyring  # None: content stored as sent (it may still be end-to-end encrypted)
        # With the embedded broker the worker knows every account: a message to nobody is an error.
        self.known_accounts = known_accounts
        # Per-receiver backlog limit (None: none). Checked before each insert; several workers storing
        # for one receiver at the same instant may pass it by a few messages, never by a batch.
        self.quota = quota or None
        self.expire_after_ms = expire_after_ms
        self.max_devices = max_devices or None
        self._sql = self._prepare(db)  # the hot path's SQL text, built once
        self._returning = _returning_delete(db)
        self._mysql = isinstance(db, pw.MySQLDatabase)
        self._known_cache: dict[str, float] = {}  # uid -> known until (monotonic s)
        self._seen: dict[tuple[str, str], float] = {}  # (uid, device) -> registered, last_seen fresh until

    def apply(self, ops: Iterable[core.Operation]) -> list[core.Outcome]:
        """Run the operations in one transaction; the caller publishes only after this returns. Outcomes
        are in operation order, one each, except that a device registered afresh after its removal gets a
        DeviceReset just before its operation's outcome."""
        with self.db.atomic():
            out: list[core.Outcome] = []
            for op in ops:
                refused = self._register(op, out)
                out.append(refused if refused is not None else self._run(op))
            return out

    def _run(self, op: core.Operation) -> core.Outcome:
        if isinstance(op, core.StoreMessage):
            return self.store_message(op)
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
        return {
            "first": f"SELECT seq, receiver_uid FROM accepted WHERE sender_uid = {q} AND msg_id = {q}",
            "insert": "INSERT INTO message (receiver_uid, sender_uid, msg_id, msg_type, msg_content, send_time, "
                      f"client_ts, key_id, batch_receipts, sender_device) VALUES ({', '.join([q] * 10)})"
                      + (" RETURNING seq" if pg else ""),
            "accept": f"{ignore} accepted (sender_uid, msg_id, receiver_uid, seq, accepted_at) "
                      f"VALUES ({q}, {q}, {q}, {q}, {q}){tail}",
            "targets": targets,
            "entries": f"INSERT INTO entry (seq, uid, device) {targets}" + ("" if mysql else " RETURNING uid, device"),
            "entry": f"INSERT INTO entry (seq, uid, device) VALUES ({q}, {q}, {q})",
            "unstore": f"DELETE FROM message WHERE seq = {q}",
            "waiting": f"SELECT 1 FROM message WHERE seq = {q}",
            # Pages: page_query's text, its parameters (receiver, device, [from,] limit) given per pull.
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
                                                  key_id, int(op.batch_receipts), op.sender_device))
        seq = cur.fetchone()[0] if isinstance(self.db, pw.PostgresqlDatabase) else cur.lastrowid
        inserted = self.db.execute_sql(sql["accept"], (op.sender, op.msg_id, op.to, seq, op.sent_at)).rowcount
        if inserted != 1:
            # Another worker stored the same (sender, msg_id) after our look-up: theirs wins.
            self.db.execute_sql(sql["unstore"], (seq,))
            return self._duplicate(op, self._first(op.sender, op.msg_id))
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
        seqs = sorted(set(seqs))
        if not seqs:
            return ()
        q = self.db.param
        marks = ", ".join([q] * len(seqs))
        columns = "seq, sender_uid, msg_id, batch_receipts, sender_device, receiver_uid, delivered"
        sqlite = isinstance(self.db, pw.SqliteDatabase)
        rows: dict[int, tuple] = {}
        if not sqlite:
            # Lock the messages first (seq order: no deadlock between workers), so the last two entries of one
            # message released at once by two workers always see each other's delete (see _release). SQLite
            # has one writer at a time: no lock, and one statement fewer on its hot path.
            rows = {r[0]: r for r in self.db.execute_sql(
                f"SELECT {columns} FROM message WHERE seq IN ({marks}) ORDER BY seq FOR UPDATE", seqs).fetchall()}
        where = f"uid = {q} AND device = {q} AND seq IN ({marks})"
        params = (receiver, device, *seqs)
        if self._returning:  # one statement instead of two
            found = [s for (s,) in self.db.execute_sql(f"DELETE FROM entry WHERE {where} RETURNING seq", params)]
        else:
            found = [s for (s,) in self.db.execute_sql(f"SELECT seq FROM entry WHERE {where}", params).fetchall()]
            if found:
                self.db.execute_sql(f"DELETE FROM entry WHERE {where}", params)
        if not found:
            return ()
        found.sort()
        fmarks = ", ".join([q] * len(found))
        gone_sql = (f"DELETE FROM message WHERE seq IN ({fmarks}) AND NOT EXISTS "
                    "(SELECT 1 FROM entry WHERE entry.seq = message.seq)")
        if sqlite and self._returning:
            gone = {r[0]: r for r in self.db.execute_sql(f"{gone_sql} RETURNING {columns}", found).fetchall()}
            rows.update(gone)
            rest = [s for s in found if s not in gone]
            if rest:
                rows.update((r[0], r) for r in self.db.execute_sql(
                    f"SELECT {columns} FROM message WHERE seq IN ({', '.join([q] * len(rest))})", rest).fetchall())
            left = len(rest)
        else:
            if sqlite:  # SQLite before 3.35: read them first
                rows = {r[0]: r for r in self.db.execute_sql(
                    f"SELECT {columns} FROM message WHERE seq IN ({fmarks})", found).fetchall()}
            left = len(found) - self.db.execute_sql(gone_sql, found).rowcount
        out = []
        first = []
        for seq in found:
            row = rows.get(seq)
            if row is None:
                continue  # an entry without its message (cannot happen; nothing to report)
            _, sender, msg_id, batch, sender_device, to, delivered = row
            receipt = to == receiver and not delivered
            if receipt:
                first.append(seq)
            out.append(core.DeletedRow(receiver, seq, sender, msg_id, bool(batch), sender_device or "", device,
                                       receipt))
        if left and first:  # messages other devices still owe: remember that `delivered` went out
            self.db.execute_sql(f"UPDATE message SET delivered = 1 WHERE seq IN ({', '.join([q] * len(first))})",
                                first)
        return tuple(out)

    def count(self, op: core.CountBacklog) -> core.Counted:
        """Totals by sender, each sender's newest message as a preview, and the expired tally (then reset)."""
        by_sender, newest = {}, []
        for sender, n, top in count_query(op.receiver, op.device):
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
        expired = self._take_expired(op.receiver, op.device)
        return core.Counted(op, sum(by_sender.values()), by_sender, previews, expired)

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
        seq, msg_id, sender, receiver, msg_type, content, send_time, client_ts, key_id, sender_device = row
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
        copy = sender_device or "" if reader is not None and reader != receiver else None
        out = core.push_payload(seq, msg_id, sender, receiver, msg_type, content, send_time, client_ts, copy)
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
