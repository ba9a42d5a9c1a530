"""Storage: peewee models that read like the schema, and the queries the core's plans need.

The store runs a :class:`~backend.core.Plan`'s operations in one transaction
and reports :mod:`backend.core` outcomes.  It knows SQL, not MQTT.  Any
``playhouse.db_url`` URL works; SQLite (the default) gets WAL and full fsync.

The package, by concern:

* ``models.py``: the schema (peewee models);
* ``database.py``: opening a database, its URL errors, creating and migrating the schema;
* ``queries.py``: the at-rest key check and the SQL shared by the halves below (count, page);
* ``messages.py``: :class:`Store` and its message operations (store, delete, count, pull), composed of
* ``devices.py`` (registration, removal, push endpoints, user-scope pages), ``groups.py`` (groups,
  members, group messages and membership changes), ``statuses.py`` (last
  status per topic), ``maintenance.py`` (expiry, purge), ``conversations.py`` (read markers, unread
  counts, the read-receipt setting) and ``outbox.py`` (users to announce after another process's change).

Every name is importable from ``backend.store``; a module-level limit is read (and so is patched in
tests) in the module that defines it.
"""

from .database import (DATABASE_URL_FORMS, POOL_MAX_CONNECTIONS, POOL_STALE_TIMEOUT_S, SCHEMA_LOCK_ID, SCHEMA_LOCK_NAME,
                       SQLITE_BUSY_TIMEOUT_MS, DatabaseOpenError, _mysql_session, _open_database, _open_failure,
                       _pooled, _schema_lock, check_database_url, create_schema, drop_schema, open_database,
                       redact_url)
from .conversations import UNREAD_CONVERSATIONS_MAX, ConversationStore
from .groups import GROUP_RECEIPTS_LIST_MAX, MAX_GROUP_MEMBERS, MAX_GROUP_MEMBERS_LIMIT, GroupStore, group_receiver
from .devices import DEVICE_SEEN_MAX, DEVICE_SEEN_S, MAX_DEVICES, PUSH_LOOKUP_CHUNK, DeviceStore
from .maintenance import (ACCEPTED_RETENTION_MS, EXPIRE_AFTER_MS, PAGE_TTL_MS, PURGE_CHUNK, REMOVED_DEVICE_RETENTION_MS,
                          MaintenanceStore)
from .messages import KNOWN_CACHE_MAX, KNOWN_CACHE_S, Store, log
from .models import (GROUP_PREFIX, MODELS, Accepted, Group, Member, MemberReceipt, BaseModel, ContentField, Device, Entry, Expired, KeyCheck, LastStatus, Message,
                     Outbox, Page, ReadMarker, RemovedDevice, SeqField, User, UserSettings, database_proxy, now_ms)
from .queries import PAGE_FIELDS, _aad, _for_update, _returning_delete, check_keys, count_query, page_query
from .outbox import OUTBOX_KEEP_MS, OUTBOX_READ_MAX, OutboxStore
from .statuses import StatusStore

__all__ = [
    "GROUP_PREFIX", "GROUP_RECEIPTS_LIST_MAX", "Group", "GroupStore", "MAX_GROUP_MEMBERS", "MAX_GROUP_MEMBERS_LIMIT",
    "Member", "MemberReceipt", "group_receiver",
    "ACCEPTED_RETENTION_MS", "Accepted", "BaseModel", "ContentField", "DATABASE_URL_FORMS", "DEVICE_SEEN_MAX",
    "DEVICE_SEEN_S", "DatabaseOpenError", "Device", "DeviceStore", "EXPIRE_AFTER_MS", "Entry", "Expired",
    "MaintenanceStore", "KNOWN_CACHE_MAX", "KNOWN_CACHE_S", "KeyCheck", "LastStatus", "MAX_DEVICES", "MODELS",
    "Message", "PAGE_FIELDS", "PAGE_TTL_MS", "POOL_MAX_CONNECTIONS", "POOL_STALE_TIMEOUT_S", "PURGE_CHUNK",
    "PUSH_LOOKUP_CHUNK", "Page", "REMOVED_DEVICE_RETENTION_MS", "RemovedDevice", "SCHEMA_LOCK_ID",
    "SCHEMA_LOCK_NAME", "SQLITE_BUSY_TIMEOUT_MS", "SeqField", "StatusStore", "Store", "User", "_aad", "_for_update",
    "_mysql_session", "_open_database", "_open_failure", "_pooled", "_returning_delete", "_schema_lock",
    "check_database_url", "check_keys", "count_query", "create_schema", "database_proxy", "drop_schema", "log",
    "now_ms", "open_database", "page_query", "redact_url",
    "ConversationStore", "ReadMarker", "UNREAD_CONVERSATIONS_MAX", "UserSettings",
    "OUTBOX_KEEP_MS", "OUTBOX_READ_MAX", "Outbox", "OutboxStore",
]
