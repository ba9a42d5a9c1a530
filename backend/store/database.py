"""Opening a database: URL checks and one-line errors for a URL that is malformed or a database that
cannot be reached, connection pools for server databases, SQLite's pragmas, and creating or migrating
the schema (under a lock, so several workers may start at once)."""

from __future__ import annotations

import os
import sqlite3

import peewee as pw
from playhouse.db_url import connect as db_url_connect
from playhouse.migrate import SchemaMigrator, migrate

from .models import MODELS, Entry, Message, database_proxy

# SQLite: how long a writer waits for another (e.g. `user add` while `serve` runs) before failing.
SQLITE_BUSY_TIMEOUT_MS = 5000
# Pooled server databases: a worker uses one thread for the store, plus the embedded broker's
# login checks; 8 leaves room. Connections idle for 5 minutes are recycled (PgBouncer's
# server_idle_timeout is 600 s; MySQL's wait_timeout 8 h would otherwise cut them silently).
POOL_MAX_CONNECTIONS = 8
POOL_STALE_TIMEOUT_S = 300
# Several workers starting at once must not race creating the schema: they take this lock first.
SCHEMA_LOCK_NAME = "im_backend_schema"
SCHEMA_LOCK_ID = 0x494D5343  # PostgreSQL advisory locks take an integer ("IMSC")


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
