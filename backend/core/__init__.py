"""The delivery logic, sans I/O: events in, operations and actions out.

No sockets, no database handles, no clock: the transport hands the core what
arrived (a topic and payload) and the time, and the core answers with

* a :class:`Plan` - the store operations to run in ONE transaction, and the
  replies that need no store (validation errors); and then, once that
  transaction committed, with
* :class:`Publish` actions computed from the store's :class:`Outcome`.

So "store first, ack after commit" is a property of the call order: nothing is
published and no inbound packet is acknowledged before ``after_commit``.  A
crash between any two steps is a unit test (tests/test_core.py).

The core also owns the in-memory state that is allowed to be lost: who is
online (rebuilt from retained status topics), which pushes await an ack
(retransmitted with backoff, then left for pull), and which online receivers
are owed a count announcement (``CountBacklog(uid, None)``) because something
of theirs waits that they may not know of. Its liveness rule: no receiver that
stays online is left unaware of a stored message (docs/PROTOCOL.md, section 1):

* every ``online`` a device publishes is answered by an announcement, not only
  a change of state;
* a push that runs out of retries, or is never tracked (table full), while its
  receiver is online queues an announcement; so does a ``duplicate`` for a
  message still stored for an online receiver that this worker is not pushing
  (another worker stored it, and may have died before pushing);
* partitioned workers: a live ``online`` is announced by the user's owner, and also by
  a worker that stored an entry for that device, unpushed, while it counted the device
  offline (a cluster may hand it the ``online`` after the owner's count; presence.py);
* an announcement can itself be dropped (a broker drops QoS 1 messages past its
  queue limit): while a receiver stays online with a non-empty backlog and does
  not pull, it is announced again, ANNOUNCE_REPEAT_MS doubling up to
  ANNOUNCE_REPEAT_MAX_MS; an empty count or an empty page ends it.

Queued announcements come out of the next :meth:`Delivery.plan` (the transport
plans one with no inbound packets when :meth:`Delivery.announcements_due` says
so) and :meth:`Delivery.next_deadline` says when the next is due.

The package, by concern (the layout of h11: events, then the state machine):

* ``events.py``: operations, outcomes, publishes and the payloads built from them;
* ``delivery.py``: :class:`Delivery`, planning a batch and dispatching the outcomes, composed of
* ``presence.py``, ``announcements.py``, ``pushes.py`` (and retransmission), ``receipts.py``, ``groups.py``,
  ``signals.py`` (typing notices, never stored) and ``reads.py`` (read markers, read receipts, settings).

Every name is importable from ``backend.core``; a module-level limit is read (and so is patched in
tests) in the module that defines it.
"""

from .announcements import (ANNOUNCE_MIN_GAP_MS, ANNOUNCE_REPEAT_MAX_MS, ANNOUNCE_REPEAT_MS, ANNOUNCE_WATCH_MAX,
                            WORKER_GONE_SPREAD_MS, _Watch)
from .delivery import BUCKETS_MAX, SEND_BURST, SEND_RATE_PER_S, WORKER_TOPIC_PREFIX, Delivery
from .events import (GROUP_EVENT_TYPE, ConversationList, CountBacklog, Counted, DeleteAcked, Deleted, DeletedRow, DeviceRemoved,
                     DeviceReset, GroupAnswered, GroupEvent, GroupOp, HistoryPage, Key, Listed, ListDevices, Operation,
                     Outcome, Paged, Plan, Publish, PullPage, PushEndpointSet, ReadHistory, Refused, RelayTyping, RemoveDevice,
                     SetPushEndpoint, TypingMembers, Stored, StoreMessage, ListConversations, device_removed_payload,
                     push_payload)
from .groups import GROUP_RECEIPT_DELAY_MS, group_receipt
from .presence import UNPUSHED_ANNOUNCE_DELAY_MS, UNPUSHED_MAX, UNPUSHED_WINDOW_MS
from .pushes import PENDING_PUSH_MAX, PUSH_ACK_TIMEOUT_MS, PUSH_BACKOFF, PUSH_MAX_RETRIES, _Pending
from .reads import (CONVERSATION_OPS, CONVERSATION_OUTCOMES, READ_RECEIPTS_MAX, Marked, MarkRead, SetSettings,
                    SettingsSet)
from .receipts import RECEIPT_DELAY_MS, RECEIPTS_PER_PAYLOAD_MAX
from .signals import TYPING_BURST, TYPING_EXPIRES_MS, TYPING_RATE_PER_S

__all__ = [
    "ANNOUNCE_MIN_GAP_MS", "ANNOUNCE_REPEAT_MAX_MS", "ANNOUNCE_REPEAT_MS", "ANNOUNCE_WATCH_MAX", "BUCKETS_MAX",
    "PENDING_PUSH_MAX", "PUSH_ACK_TIMEOUT_MS", "PUSH_BACKOFF", "PUSH_MAX_RETRIES", "RECEIPT_DELAY_MS",
    "RECEIPTS_PER_PAYLOAD_MAX", "GROUP_EVENT_TYPE", "GROUP_RECEIPT_DELAY_MS", "SEND_BURST", "SEND_RATE_PER_S", "WORKER_GONE_SPREAD_MS", "WORKER_TOPIC_PREFIX",
    "CountBacklog", "Counted", "DeleteAcked", "Deleted", "DeletedRow", "Delivery", "DeviceRemoved", "DeviceReset",
    "ConversationList", "GroupAnswered", "GroupEvent", "GroupOp", "HistoryPage", "ListConversations", "ReadHistory", "RelayTyping", "TypingMembers", "Key", "Listed", "ListDevices", "Operation", "Outcome", "Paged", "Plan", "Publish", "PullPage",
    "PushEndpointSet", "Refused", "RemoveDevice", "SetPushEndpoint", "Stored", "StoreMessage",
    "device_removed_payload", "group_receipt", "push_payload", "_Pending", "_Watch",
    "CONVERSATION_OPS", "CONVERSATION_OUTCOMES", "READ_RECEIPTS_MAX", "MarkRead", "Marked", "SetSettings", "SettingsSet",
    "TYPING_BURST", "TYPING_EXPIRES_MS", "TYPING_RATE_PER_S", "UNPUSHED_ANNOUNCE_DELAY_MS", "UNPUSHED_MAX", "UNPUSHED_WINDOW_MS",
]
