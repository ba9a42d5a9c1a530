"""The schema: peewee models that read like the tables (accounts, messages and their per-device entries,
accepted (sender, msg_id) pairs, page cursors, devices, key checks, last statuses, read markers and user
settings), bound to the database through ``database_proxy`` by :func:`backend.store.open_database`."""

from __future__ import annotations

import time

import peewee as pw

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
    # A group message: how many members have acked it (on any of their devices), for "delivered to k of n".
    delivered = pw.IntegerField(default=0, constraints=[pw.SQL("DEFAULT 0")])
    # A group message (receiver_uid is GROUP_PREFIX + the group id): its place in the group's own order, and how
    # many members other than the sender it was for (the n of "delivered to k of n"). NULL and 0 otherwise.
    gseq = pw.BigIntegerField(null=True)
    members = pw.IntegerField(default=0, constraints=[pw.SQL("DEFAULT 0")])

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
        # Read markers (conversations.py): a conversation's messages by seq, and unread counts per sender.
        indexes = ((("released_at", "seq"), False), (("receiver_uid", "sender_uid", "seq"), False))


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


class ReadMarker(BaseModel):
    """How far a user has read a conversation (docs/PROTOCOL.md, section 15): only ever moves forward."""

    uid = pw.CharField(max_length=50)  # the reader
    kind = pw.CharField(max_length=1)  # "u": a 1:1 conversation, `conversation` the other uid; "g": a group
    conversation = pw.CharField(max_length=50)
    upto = pw.BigIntegerField()  # read up to this seq ("u") or gseq ("g"), inclusive
    # The marker as the other side was told it (moved while read receipts were on): a count's `read_by`.
    receipted = pw.BigIntegerField(default=0, constraints=[pw.SQL("DEFAULT 0")])
    updated_at = pw.BigIntegerField()

    class Meta:
        primary_key = pw.CompositeKey("uid", "kind", "conversation")
        indexes = ((("kind", "conversation"), False),)  # who read a user's messages (read_by)


class UserSettings(BaseModel):
    """A user's settings; a user without a row has the defaults (read receipts on)."""

    uid = pw.CharField(max_length=50, primary_key=True)
    read_receipts = pw.SmallIntegerField(default=1, constraints=[pw.SQL("DEFAULT 1")])  # 0: none sent for its reads
    updated_at = pw.BigIntegerField()


# A group message's receiver_uid: this prefix and the group id. '#' is never in a uid (an MQTT wildcard), so a
# group's messages never mix with a user's, and the existing (receiver_uid, seq) index is the group's history.
GROUP_PREFIX = "#"


class Group(BaseModel):
    """A group conversation (docs/PROTOCOL.md section 14). Its row lock orders the group: a send or a
    membership change takes the next ``gseq`` under it, so every member sees one order."""

    gid = pw.CharField(max_length=32, primary_key=True)
    name = pw.CharField(max_length=100)
    owner = pw.CharField(max_length=50)
    history = pw.SmallIntegerField(default=0)  # 1: a new member may read what was said before it joined
    gseq = pw.BigIntegerField(default=0)  # the newest gseq given (a message or a membership change)
    members = pw.IntegerField(default=0)  # how many members now (the cap is checked against it)
    created_at = pw.BigIntegerField()

    class Meta:
        table_name = "chat_group"  # GROUP is a reserved word in SQL


class Member(BaseModel):
    """A member of a group, from the gseq of its join (its window opens there) until it leaves or is removed
    (the row goes: its window closes)."""

    gid = pw.CharField(max_length=32)
    uid = pw.CharField(max_length=50)
    role = pw.CharField(max_length=8)  # owner, admin or member
    joined_gseq = pw.BigIntegerField()
    joined_at = pw.BigIntegerField()

    class Meta:
        table_name = "group_member"
        primary_key = pw.CompositeKey("gid", "uid")
        indexes = ((("uid",), False),)  # "my groups"


class MemberReceipt(BaseModel):
    """A member acked a group message (on its first device): counted once in ``message.delivered``, and listed
    by a group_receipts request. Goes with its message."""

    seq = pw.BigIntegerField()
    uid = pw.CharField(max_length=50)
    at = pw.BigIntegerField()

    class Meta:
        table_name = "member_receipt"
        primary_key = pw.CompositeKey("seq", "uid")


class Outbox(BaseModel):
    """A user whose online devices must be told of something a process without a broker connection stored for
    them (the CLI's group changes), written in that change's transaction. Every worker reads the rows past the
    last one it read and announces the user's online devices (store/outbox.py); housekeeping deletes old rows."""

    id = pw.BigAutoField()
    uid = pw.CharField(max_length=50)
    created_at = pw.BigIntegerField()


MODELS = (User, Message, Accepted, Page, Expired, KeyCheck, Device, Entry, RemovedDevice, LastStatus, Group, Member,
          MemberReceipt, ReadMarker, UserSettings, Outbox)
