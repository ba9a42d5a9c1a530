"""What the store's halves share: the at-rest key check and the authenticated data of sealed content,
the columns of a page entry, the per-database SQL variants, and the count and page queries (also
timed on their own by the benchmarks)."""

from __future__ import annotations

import sqlite3

import peewee as pw

from ..crypto import KeyError_, KeyRing
from .models import Entry, KeyCheck, Message


# Values per IN list: below SQLite's old limit of 999 bound parameters with room for the others.
IN_CHUNK = 500


def _chunks(values: list, n: int = IN_CHUNK) -> list[list]:
    """``values`` in lists of at most ``n`` (one IN list each)."""
    return [values[i:i + n] for i in range(0, len(values), n)] if len(values) > n else [values]


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
               Message.msg_content, Message.send_time, Message.client_ts, Message.key_id, Message.sender_device,
               Message.gseq)


def _returning_delete(db: pw.Database) -> bool:
    """DELETE ... RETURNING: PostgreSQL, and SQLite from 3.35. (MariaDB has it, MySQL 8 not: both select first.)"""
    if isinstance(db, pw.PostgresqlDatabase):
        return True
    return isinstance(db, pw.SqliteDatabase) and sqlite3.sqlite_version_info >= (3, 35)


def _for_update(db: pw.Database) -> str:
    """Row locks where the database has them (SQLite has one writer at a time anyway)."""
    return "" if isinstance(db, pw.SqliteDatabase) else " FOR UPDATE"


def count_query(receiver: str, device: str = "") -> pw.ModelSelect:
    """(sender, receiver, count, newest seq) per sender and conversation of what waits for one device (the
    receiver is the device's own uid, another user for a sync copy, or a group): a range scan of the entry key
    (uid, device, seq), each entry joined to its message by primary key; other devices' rows are never read."""
    return (Entry.select(Message.sender_uid, Message.receiver_uid, pw.fn.COUNT(Entry.seq), pw.fn.MAX(Entry.seq))
            .join(Message, on=(Message.seq == Entry.seq))
            .where((Entry.uid == receiver) & (Entry.device == device))
            .group_by(Message.sender_uid, Message.receiver_uid).tuples())


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

