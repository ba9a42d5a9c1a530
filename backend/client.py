"""The reference client (paho): what an app does to never lose or repeat a message.

* connects with a retained ``offline`` last will, then publishes a retained
  ``online`` once its inbox and reply subscriptions are in place;
* sends with retransmission of the same msg_id until a receipt, with backoff
  and a bound, and reports a message failed only when the bound runs out;
* receives pushes, drops duplicates by seq, acks in small batches;
* counts, and drains pages with the next request as the ack of the previous;
* given several broker addresses (the nodes of one cluster), moves to the next one when its
  connection is lost or a connect fails (round robin, with the reconnect backoff), and there does
  what it does after any reconnect: subscribes, publishes ``online``, syncs, resends;
* checks SUBACK codes and subscribes again with backoff while the broker refuses (NATS does while
  JetStream recovers from a node's death), publishing ``online`` only once subscribed;
* syncs (drains) on every announcement that says something waits, and after every
  reconnect; a sync that gets no answer is tried again with backoff for as long
  as the client stays connected, until the backlog is drained;
* conversations (docs/PROTOCOL.md, section 15): sends typing notices (QoS 0) and shows the peers' until
  they lapse, moves read markers (``mark_read``) and follows those its other devices move, collects
  ``read`` receipts, and turns its own read receipts off or on (``set_read_receipts``);
* with ``device="laptop"`` it is one of the user's devices (docs/PROTOCOL.md, "Devices"): its own
  topics, status and last will; it gets every message once for itself, and sync copies of what the
  user sent from its other devices (``"copy": true``); without it, it is v1 (the default device).

All waiting happens in the caller's thread or the client's two helper threads
(resends and acks; syncs), never in paho's callbacks.
"""

from __future__ import annotations

import itertools
import logging
import os
import ssl
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import paho.mqtt.client as mqtt

from . import protocol as p
from .transport.connection import BrokerAddress, parse_broker_urls, set_nodelay

log = logging.getLogger("backend.client")

# MobileIMSDK resends an unanswered message after 2-3 s; we start at 3 s and double.
RESEND_TIMEOUT_S = 3.0
# ...up to this many resends (sent 3, 9, 21, 45 and 75 s after the first; reported failed at 105 s).
MAX_RESENDS = 5
RESEND_WAIT_MAX_S = 30.0
# MQTT keepalive: a dead link (no FIN, no RST) is noticed within 1-2x this; 30 s suits a phone's radio.
KEEPALIVE_S = 30
# Acks of pushes are gathered this long (or until ACK_BATCH seqs) and sent as one.
ACK_DELAY_S = 0.05
ACK_BATCH = 100
# How long a request (count, pull) waits for its answer before giving up.
REQUEST_TIMEOUT_S = 10.0
# A sync (drain) that failed (no answer: the worker down or restarting, the database away) is tried
# again after 1 s, doubling up to 30 s (the resends' own cap, RESEND_WAIT_MAX_S): a worker restart takes
# seconds, and one retry every 30 s from a connected client costs the server nothing.
SYNC_RETRY_MIN_S, SYNC_RETRY_MAX_S = 1.0, 30.0
# Largest payload accepted from the server: it cuts its payloads at 1 MiB (protocol.REPLY_PAYLOAD_MAX);
# 4 MiB leaves room for a server that raises that, and still bounds what a broken broker can hand us.
REPLY_ACCEPT_MAX = 4 * 1024 * 1024
# A send with no receipt after its first resend window logs a warning (a broker without a worker looks
# connected but never answers); at most once a minute, so an outage is not a flood of lines.
NO_RECEIPT_WARN_INTERVAL_S = 60.0
# A SUBSCRIBE the broker refuses (SUBACK 0x80) is tried again after 1 s, doubling up to 16 s, as the worker does
# (RESUBSCRIBE_MIN_S/MAX_S in backend/transport/subscriptions.py): NATS refuses while JetStream recovers after a node dies.
RESUBSCRIBE_MIN_S, RESUBSCRIBE_MAX_S = 1.0, 16.0
# Beside a cluster (several broker addresses), a device-aware client says `online` again this many seconds after
# each connection's first `online`: while a node's death settles, the cluster can hand a worker a device's
# statuses late, out of order or not at all (a NATS chaos run: a worker's resumed session replayed a phone's old
# `online` and its earlier connection's will, and never its new `online`, so the phone was counted offline while
# connected). The newest word then wins; 10 s and 30 s cover the 3-6 s re-deliveries and the 20-40 s JetStream
# stalls measured here, at one publish and one count each per connection.
CLUSTER_ONLINE_RESTATE_S = (10.0, 30.0)
# paho's reconnect backoff: 1 s after a loss, doubling up to 16 s while attempts fail; with several addresses
# each attempt goes to the next one, so a dead node costs one attempt.
RECONNECT_MIN_S, RECONNECT_MAX_S = 1, 16


def broker_list(brokers: str | Sequence[tuple[str, int] | BrokerAddress], uid: str) -> tuple[list[tuple[str, int]], bool]:
    """The client's broker addresses as [(host, port)], and whether they use TLS.

    ``brokers``: a list of (host, port) pairs or BrokerAddress, or the worker's ``--broker`` syntax, a string
    of comma-separated URLs (``mqtt://n1:1883,n2:1883,n3``: an entry without a scheme takes the first one's;
    ``mqtts://`` for TLS; the port defaults to 1883, 8883 with TLS). Raises ValueError for an empty list, a bad
    entry, a user name in a URL other than ``uid`` (the client logs in as its uid), or TLS on some entries only."""
    if isinstance(brokers, str):
        parsed = parse_broker_urls(brokers)
        for a in parsed:
            if a.username is not None and a.username != uid:
                raise ValueError(f"broker address {a.host}:{a.port} names the user {a.username!r}: the client logs in "
                                 f"as its uid {uid!r}; drop the user name from the address")
        if len({a.tls for a in parsed}) > 1:
            raise ValueError("broker addresses mix mqtt:// and mqtts://: use one scheme for every node")
        return [(a.host, a.port) for a in parsed], parsed[0].tls
    out: list[tuple[str, int]] = []
    for b in brokers:
        host, port = (b.host, b.port) if isinstance(b, BrokerAddress) else b
        if not isinstance(host, str) or not host or not isinstance(port, int) or not 0 < port < 65536:
            raise ValueError(f"bad broker address {b!r}: give (host, port) with a port from 1 to 65535")
        out.append((host, port))
    if not out:
        raise ValueError("no broker address given")
    return out, False


class LoginRefused(ConnectionError):
    """The broker refused the login: wrong user name or password (or an account it does not allow)."""


@dataclass
class Outgoing:
    msg_id: str
    to: str
    payload: bytes
    attempts: int = 1
    deadline: float = 0.0
    done: threading.Event = field(default_factory=threading.Event)
    receipt: dict[str, Any] | None = None  # stored / duplicate receipt, or the error
    failed: bool = False
    delivered: threading.Event = field(default_factory=threading.Event)
    read: threading.Event = field(default_factory=threading.Event)  # a `read` receipt came (or a later one's)
    # Set once the first resend window passed without a receipt: why wait() may return None.
    problem: str | None = None
    created: float = field(default_factory=time.monotonic)
    # A group message: (members that acked it, members it was for), from its latest `delivered` receipt.
    progress: tuple[int, int] | None = None

    def wait(self, timeout: float | None = None) -> dict[str, Any] | None:
        """The receipt (or error) once it came; None if none came within ``timeout`` seconds, and then
        ``problem`` says what is known (e.g. no receipt after the first resend: no worker answering?)."""
        self.done.wait(timeout)
        return self.receipt


class IMClient:
    def __init__(self, uid: str, password: str | None = None, host: str = "127.0.0.1", port: int = 1883, *,
                 client_id: str | None = None, clean_session: bool = True, auto_sync: bool = True,
                 resend_timeout: float = RESEND_TIMEOUT_S, max_resends: int = MAX_RESENDS,
                 resend_wait_max: float = RESEND_WAIT_MAX_S, request_timeout: float = REQUEST_TIMEOUT_S, seen: set[int] | None = None,
                 messages: list[dict[str, Any]] | None = None, receiver: bool = True,
                 ack_delay: float = ACK_DELAY_S, tls: bool = False, ca_file: str | None = None,
                 transport: str = "tcp", batch_receipts: bool = True,
                 on_message: Callable[[dict[str, Any]], None] | None = None, keepalive: int = KEEPALIVE_S,
                 device: str = "", brokers: str | Sequence[tuple[str, int] | BrokerAddress] | None = None,
                 on_signal: Callable[[dict[str, Any]], None] | None = None):
        """``seen``: the seqs already shown to the user; pass the same set to the next IMClient of this
        user (an app keeps it on disk) so that dedup holds across reconnects and restarts; ``messages``
        likewise. ``receiver=False`` makes a send-only client (a sensor, or a second connection used only
        to send): no inbox subscription, no presence, no last will. ``device``: this connection is that device
        of the user (1-32 characters of A-Z a-z 0-9 _ -), with its own topics; its client id defaults to
        ``uid:device``. Keep ``seen`` per device.

        ``brokers``: several addresses of the same service (the nodes of one cluster), instead of ``host`` and
        ``port``: a list of (host, port) pairs, or comma-separated URLs as the worker's ``--broker`` takes them
        (``"mqtt://n1:1883,n2:1883,n3:1883"``; ``mqtts://`` turns TLS on). The client starts with the first; when
        its connection is lost or a connect fails it moves to the next (round robin, with the reconnect backoff:
        1 s, doubling up to 16 s) and there subscribes, publishes ``online``, syncs and keeps resending as after any
        reconnect. ``host`` and ``port`` then name the address in use. ValueError for a bad list
        (:func:`broker_list`).

        ``on_signal``: called (on paho's thread) with each `typing`, `read` or `settings` payload on the inbox."""
        if not p.valid_uid(uid):
            raise ValueError(f"invalid uid {uid!r}")
        if device and not p.valid_device(device):
            raise ValueError(f"invalid device id {device!r}: 1-32 characters of A-Z a-z 0-9 _ -")
        self.brokers, url_tls = broker_list(brokers, uid) if brokers is not None else ([(host, port)], False)
        tls = tls or url_tls
        self._broker_index = 0
        self.uid, (self.host, self.port) = uid, self.brokers[0]
        self.failovers = 0  # moves to the next broker address (after a lost connection or a failed connect)
        self.device = device
        # The server told us this device had been removed (what waited for it is gone): set, never cleared.
        self.removed = False
        self.auto_sync = auto_sync
        self.resend_timeout, self.max_resends = resend_timeout, max_resends
        self.request_timeout, self.resend_wait_max = request_timeout, resend_wait_max
        self.ack_delay = ack_delay
        self.keepalive = keepalive
        # Ask for batched receipts: one `receipts` payload per 10 ms of server work, not one per receipt.
        self.batch_receipts = batch_receipts
        self.on_message = on_message
        self.receiver = receiver
        # every message received, once, in arrival order
        self.messages: list[dict[str, Any]] = messages if messages is not None else []
        self.duplicates_dropped = 0
        self.rate_limited = 0  # sends the server asked us to slow down (they are resent, not failed)
        self.errors: list[dict[str, Any]] = []
        self.announcements: list[dict[str, Any]] = []
        # Conversations: the peers' typing notices (uid -> (state, lapses at, monotonic s)), our read markers as
        # the server last said (peer -> seq, and peer -> unread), how far each peer read our messages (from its
        # `read` receipts), and our read-receipt setting (None until the server said).
        self.typing_from: dict[str, tuple[str, float]] = {}
        self.read_markers: dict[str, int] = {}
        self.group_read_markers: dict[str, int] = {}  # group -> our marker there (seq), as our devices moved it
        self.unread: dict[str, int] = {}
        self.peer_read: dict[str, int] = {}
        self.read_receipts: bool | None = None
        self.on_signal = on_signal
        self._seen: set[int] = seen if seen is not None else set()
        self._lock = threading.Condition()
        self._outgoing: dict[str, Outgoing] = {}
        self._by_msg_id: dict[str, Outgoing] = {}
        self._requests: dict[str, list] = {}
        self._pending_acks: list[int] = []
        self._ack_due: float | None = None
        self._sync_wanted = False
        self._drain_lock = threading.Lock()  # one drain at a time: auto-sync's and the caller's
        self.syncs = 0  # syncs (drains) completed by the sync thread
        self.sync_failures = 0  # syncs that got no answer and were tried again
        self._ids = itertools.count(1)
        self._prefix = os.urandom(4).hex()
        self._ready = threading.Event()
        self._refused = threading.Event()
        self._online_info: mqtt.MQTTMessageInfo | None = None
        self._closing = threading.Event()
        self._no_receipt_warned = -NO_RECEIPT_WARN_INTERVAL_S  # monotonic time of the last such warning
        self._resubscribe_at: float | None = None  # when to subscribe again after a refused SUBACK
        self._resubscribe_wait = RESUBSCRIBE_MIN_S
        self.subscribe_refusals = 0  # SUBACKs that refused a subscription (each retried)
        self.status_restated = 0  # `online` said again: after a late will, or beside a cluster (CLUSTER_ONLINE_RESTATE_S)
        self._restate_at: list[float] = []  # when to say `online` again on this connection (monotonic)
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or (f"{uid}:{device}" if device else uid),
                                  clean_session=clean_session, protocol=mqtt.MQTTv311, transport=transport)
        if tls or ca_file:  # verifies the broker's certificate and host name (ca_file, else the system's CAs)
            self.client.tls_set(ca_certs=ca_file)
        if password is not None:
            self.client.username_pw_set(uid, password)
        if receiver:
            self.client.will_set(p.status_topic(uid, device), p.OFFLINE, qos=1, retain=True)
        self.client.max_inflight_messages_set(100)
        self.client.reconnect_delay_set(RECONNECT_MIN_S, RECONNECT_MAX_S)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_msg
        self.client.on_disconnect = self._on_disconnect
        self.client.on_connect_fail = self._on_connect_fail
        self.connect_result: Any = None
        self.connect_error: BaseException | None = None  # the last failed TCP/TLS connect, for connect()'s message
        self._helper = threading.Thread(target=self._helper_loop, name=f"im-client-{uid}", daemon=True)
        # Syncs run on their own thread: a drain waits on the network for seconds, and resends and
        # batched acks (the helper's work) must not wait behind it.
        self._syncer = threading.Thread(target=self._sync_loop, name=f"im-client-{uid}-sync", daemon=True)

    # -- connection ------------------------------------------------------------
    def connect(self, timeout: float = 10.0) -> "IMClient":
        """Connect and wait until subscribed and announced online.

        Raises :class:`LoginRefused` (a ConnectionError) at once if the broker refuses the user name or
        password, and ConnectionError after ``timeout`` seconds if the broker cannot be reached (the
        message says why: refused, unknown host, TLS, no MQTT answer)."""
        self.client.connect_async(self.host, self.port, keepalive=self.keepalive)
        self.client.loop_start()
        if not self._helper.is_alive():
            self._helper.start()
        end = time.monotonic() + timeout
        while not self._ready.is_set() and not self._refused.is_set() and time.monotonic() < end:
            self._ready.wait(0.05)  # either event ends the wait; a refused login fails at once
        if not self._ready.is_set():
            self.client.loop_stop()
            raise self._connect_failure(timeout)
        # Return once the broker has our `online`: the worker sees it before anything sent to us later.
        if self._online_info is not None:
            self._online_info.wait_for_publish(timeout)
        return self

    def _connect_failure(self, timeout: float) -> ConnectionError:
        """One line on why connect() failed, naming the likely cause."""
        where = f"{self.host}:{self.port}"
        rc = self.connect_result
        if rc is None and len(self.brokers) > 1:  # nothing answered: every address was tried
            where = "any of " + ", ".join(f"{h}:{p}" for h, p in self.brokers)
        if rc is not None and rc.is_failure:
            if rc.value in (4, 5, 134, 135):  # MQTT 3.1.1: bad user name or password, not authorised; 5.0 likewise
                return LoginRefused(f"{self.uid}: the broker at {where} refused the login ({rc}): wrong user name "
                                    f"or password, or no such account (serve: `user add` makes them)")
            return ConnectionError(f"{self.uid}: the broker at {where} refused the connection ({rc})")
        if rc is not None:
            return ConnectionError(f"{self.uid}: logged in at {where}, but the broker did not confirm the "
                                   f"subscriptions within {timeout}s")
        err = self.connect_error
        if err is not None:
            if isinstance(err, ssl.SSLError):
                return ConnectionError(f"{self.uid}: TLS with the broker at {where} failed ({err}): check ca_file "
                                       f"and that the host name matches its certificate")
            why = err.strerror if isinstance(err, OSError) and err.strerror else str(err) or type(err).__name__
            return ConnectionError(f"{self.uid}: cannot reach a broker at {where} ({why}): is it running, and are "
                                   f"the host and port right?")
        return ConnectionError(f"{self.uid}: no MQTT answer from {where} within {timeout}s: is an MQTT broker "
                               f"listening on that port (not TLS or WebSocket only)?")

    def close(self) -> None:
        """Leave politely: retained offline status, then DISCONNECT."""
        self._closing.set()
        try:
            self.flush_acks()
            if self.client.is_connected() and self.receiver:
                self.client.publish(p.status_topic(self.uid, self.device), p.OFFLINE, qos=1, retain=True).wait_for_publish(5)
        except (RuntimeError, ValueError):
            pass
        self.client.disconnect()
        self.client.loop_stop()

    def kill(self) -> None:
        """Vanish without DISCONNECT, as a phone losing its network: the broker fires the last will."""
        self._closing.set()
        with self._lock:
            self._lock.notify_all()
        # paho's loop_stop waits out the network thread's 1 s select(); wake it through paho's own
        # wake-up socket (as publish() does) so a vanishing client takes milliseconds, not a second.
        self.client._thread_terminate = True
        wake = getattr(self.client, "_sockpairW", None)
        if wake is not None:
            try:
                wake.send(b"0")
            except OSError:
                pass
        self.client.loop_stop()
        sock = self.client.socket()
        if sock is not None:
            sock.close()

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        self.connect_result = reason_code
        if reason_code.is_failure:
            # A first connect's refusal is connect()'s exception (LoginRefused): a log line too would say it twice.
            # A reconnect's (the password changed meanwhile) has no caller to tell: logged.
            (log.warning if self._ready.is_set() else log.debug)("%s: connect refused: %s", self.uid, reason_code)
            self._refused.set()
            if not self._ready.is_set():
                client.disconnect()  # stop paho's retries; connect() reports the failure
            return
        set_nodelay(client)
        with self._lock:
            self._resubscribe_at = None  # a retry planned on an earlier connection: this one subscribes afresh
            self._resubscribe_wait = RESUBSCRIBE_MIN_S
        self._subscribe()

    def _subscribe(self) -> None:
        topics = [(p.inbox_topic(self.uid, self.device), 1), (p.reply_topic(self.uid, self.device), 1)] if self.receiver else \
            [(p.reply_topic(self.uid, self.device), 1)]
        if self.receiver and self.device:
            # Our own status at QoS 0 (no JetStream consumer on NATS; a lost delivery means a lost connection,
            # and the reconnection says `online` anyway): a stale will there is answered (_on_own_status).
            topics.append((p.status_topic(self.uid, self.device), 0))
        self.client.subscribe(topics)

    def _on_own_status(self, msg) -> None:
        """A live `offline` on our own device status while connected is the last will of an earlier connection,
        delivered after this connection's `online`: a broker cluster does that when a node dies (NATS: 1.5 s
        later, seen in tests/test_cluster.py). The worker then counts the device offline and only stores what
        comes for it, while we wait for pushes: we say `online` again, and its announcement tells us what waits
        (docs/PROTOCOL.md, section 3). The retained word a subscription brings (``msg.retain``) is our past, not
        news; our own `offline` on close() is not answered (``_closing``)."""
        if msg.payload.strip() != p.OFFLINE.encode() or msg.retain or self._closing.is_set():
            return
        log.info("%s: a late `offline` (an earlier connection's will) on %s while connected: `online` again",
                 self.uid, msg.topic)
        self._restate_online()

    def _restate_online(self) -> None:
        """Say `online` again on our device status (a late will, or beside a cluster: CLUSTER_ONLINE_RESTATE_S)."""
        with self._lock:
            self.status_restated += 1
        self.client.publish(p.status_topic(self.uid, self.device), p.ONLINE, qos=1, retain=True)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        essential = reason_codes[:2 if self.receiver else 1]  # inbox and reply; our own status is a help only
        if any(rc.is_failure for rc in essential):
            # Not subscribed: no `online` yet (the worker would push to an inbox we do not hear). The helper
            # thread subscribes again after the backoff (NATS refuses while JetStream recovers).
            with self._lock:
                wait = self._resubscribe_wait
                self._resubscribe_at = time.monotonic() + wait
                self._resubscribe_wait = min(wait * 2, RESUBSCRIBE_MAX_S)
                self.subscribe_refusals += 1
                self._lock.notify_all()
            log.warning("%s: the broker at %s:%s refused the subscription (%s); retrying in %.0f s (NATS refuses "
                        "while JetStream is unavailable; otherwise check the account's rights)", self.uid, self.host,
                        self.port, ", ".join(str(rc) for rc in reason_codes), wait)
            return
        if self.receiver:
            self._online_info = client.publish(p.status_topic(self.uid, self.device), p.ONLINE, qos=1, retain=True)
            if self.device and len(self.brokers) > 1:
                with self._lock:
                    now = time.monotonic()
                    self._restate_at = [now + s for s in CLUSTER_ONLINE_RESTATE_S]
                    self._lock.notify_all()
            if not self.device:
                # The default device's `online` on im/status/{uid} does not register it when the user has
                # device-aware devices (it may be the worker's own derived word: docs/PROTOCOL.md 12.4); a request
                # does. Without it a client that only receives would get nothing stored for the user meanwhile.
                client.publish(p.req_topic(self.uid), p.encode({"op": "count", "req_id": f"{self._prefix}-hello"}),
                               qos=1)
            if self._ready.is_set() and self.auto_sync:
                # paho reconnected by itself: whatever waited meanwhile (pushes to a dead connection
                # included) is pulled now, without waiting for the announcement our `online` triggers.
                self.want_sync()
        self._ready.set()

    def _on_connect_fail(self, client, userdata):
        # paho calls this inside its `except OSError:` around the TCP/TLS connect: keep the error for connect().
        self.connect_error = sys.exc_info()[1]
        self._next_broker()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        with self._lock:
            self._resubscribe_at = None
            self._restate_at = []  # the next connection plans its own
        if not self._closing.is_set() and not (self._refused.is_set() and not self._ready.is_set()):
            # (a login refused by the first connect ends connect() with that address's refusal: no move)
            log.info("%s: disconnected from %s:%s (%s)", self.uid, self.host, self.port, reason_code)
            self._next_broker()

    def _next_broker(self) -> None:
        """Several addresses: paho's next (re)connect attempt, after its backoff, goes to the next one. Runs on
        paho's network thread, between an attempt and the next."""
        if len(self.brokers) < 2 or self._closing.is_set():
            return
        self._broker_index = (self._broker_index + 1) % len(self.brokers)
        self.host, self.port = self.brokers[self._broker_index]
        # paho's host/port setters refuse while it reconnects; its loop reads these for the next attempt.
        self.client._host, self.client._port = self.host, self.port
        self.failovers += 1
        log.info("%s: trying the broker at %s:%s next (address %d of %d)", self.uid, self.host, self.port,
                 self._broker_index + 1, len(self.brokers))

    # -- inbound ------------------------------------------------------------------
    def _on_msg(self, client, userdata, msg):
        if self.device and msg.topic == p.status_topic(self.uid, self.device):
            self._on_own_status(msg)
            return
        try:
            obj = p.decode_object(msg.payload, REPLY_ACCEPT_MAX)
        except p.ProtocolError:
            log.warning("%s: unreadable payload on %s", self.uid, msg.topic)
            return
        if msg.topic == p.inbox_topic(self.uid, self.device):
            if obj.get("kind") == "msg" and isinstance(obj.get("seq"), int):
                with self._lock:
                    self._accept(obj)
                    self._pending_acks.append(obj["seq"])  # a repeat is acked again: our ack may have been lost
                    if self._ack_due is None:
                        self._ack_due = time.monotonic() + self.ack_delay
                    self._lock.notify_all()
            elif obj.get("kind") in ("typing", "read", "settings"):
                self._on_signal(obj)
            return
        self._on_reply(obj)

    def _on_signal(self, obj: dict[str, Any]) -> None:
        """A typing notice, or a read marker / setting another of our devices moved (inbox, no req_id)."""
        kind = obj.get("kind")
        with self._lock:
            if kind == "typing" and isinstance(obj.get("from"), str) and isinstance(obj.get("expires_in"), int):
                lapse = time.monotonic() + min(obj["expires_in"], 30_000) / 1000  # never trust more than 30 s
                self.typing_from[obj["from"]] = (obj.get("state", "typing"), lapse)
            elif kind in ("read", "settings"):
                self._note_conversation(obj)
            self._lock.notify_all()
        if self.on_signal is not None:
            try:
                self.on_signal(obj)
            except Exception:  # noqa: BLE001 - a user callback must not break delivery
                log.exception("on_signal callback failed")

    def _note_conversation(self, obj: dict[str, Any]) -> None:
        """A `read` or `settings` payload (an answer or another device's move). Lock held."""
        if obj.get("kind") == "settings" and isinstance(obj.get("read_receipts"), bool):
            self.read_receipts = obj["read_receipts"]
        elif obj.get("kind") == "read" and isinstance(obj.get("group"), str) and isinstance(obj.get("seq"), int):
            gid = obj["group"]  # a group's marker (docs/PROTOCOL.md 14.6)
            if obj["seq"] >= self.group_read_markers.get(gid, 0):
                self.group_read_markers[gid] = obj["seq"]
        elif obj.get("kind") == "read" and isinstance(obj.get("with"), str) and isinstance(obj.get("seq"), int):
            peer = obj["with"]
            if obj["seq"] >= self.read_markers.get(peer, 0):  # markers only move forward
                self.read_markers[peer] = obj["seq"]
                if isinstance(obj.get("unread"), int):
                    self.unread[peer] = obj["unread"]

    def _accept(self, m: dict[str, Any]) -> bool:
        """Record a message unless its seq was seen (push and pull of the same seq, a resend). Lock held."""
        if m["seq"] in self._seen:
            self.duplicates_dropped += 1
            return False
        self._seen.add(m["seq"])
        self.messages.append(m)
        self._lock.notify_all()
        if self.on_message is not None:
            try:
                self.on_message(m)
            except Exception:  # noqa: BLE001 - a user callback must not break delivery
                log.exception("on_message callback failed")
        return True

    def _on_reply(self, obj: dict[str, Any]) -> None:
        kind = obj.get("kind")
        if kind == "receipts" and isinstance(obj.get("receipts"), list):
            for item in obj["receipts"]:
                if isinstance(item, dict):
                    self._on_reply(item)
            return
        with self._lock:
            if kind == "receipt":
                out = self._by_msg_id.get(obj.get("msg_id"))
                if obj.get("status") == "read":
                    self._peer_read(obj)
                elif out is not None:
                    if obj.get("status") == "delivered":
                        if "members" in obj:  # a group message: delivered to k of n members
                            out.progress = (obj.get("delivered"), obj.get("members"))
                        out.delivered.set()
                    elif out.receipt is None or out.receipt.get("kind") != "receipt":
                        out.receipt, out.problem = obj, None  # answered: what was feared while waiting is over
                        out.done.set()
                        self._outgoing.pop(out.msg_id, None)
            elif obj.get("req_id") in self._requests:
                slot = self._requests[obj["req_id"]]
                slot.append(obj)
                if kind in ("read", "settings"):
                    self._note_conversation(obj)
                elif kind == "count" and isinstance(obj.get("read_by"), dict):
                    for peer, seq in obj["read_by"].items():  # what `read` receipts said while we were away
                        self._peer_read({"to": peer, "seq": seq}, catch_up=True)
                    for peer, n in (obj.get("unread") or {}).items():
                        if isinstance(n, int):
                            self.unread[peer] = n
            elif kind == "error":
                self.errors.append(obj)
                if obj.get("code") == "device_removed":
                    # We were removed and registered afresh: what waited for us is gone. Never believe we
                    # are complete: the app refetches the conversation (fetch_user) and syncs again.
                    self.removed = True
                    if self.auto_sync:
                        self._sync_wanted = True
                out = self._by_msg_id.get(obj.get("msg_id"))
                if obj.get("code") == "rate_limited" and out is not None and out.msg_id in self._outgoing:
                    # Not a failure: the resend timer sends it again later, with its backoff.
                    self.rate_limited += 1
                elif out is not None and not out.done.is_set():
                    out.receipt, out.failed = obj, True
                    out.done.set()
                    self._outgoing.pop(out.msg_id, None)
            elif kind == "count" and "req_id" not in obj:  # (a late answer to a finished request is not one)
                self.announcements.append(obj)
                total = obj.get("total", 0)
                if self.auto_sync and isinstance(total, int) and total > 0:
                    # One more drain after the one in progress, if any: several announcements during a
                    # drain coalesce into it, and it picks up whatever arrived after the drain's pages.
                    self._sync_wanted = True
            self._lock.notify_all()

    def _peer_read(self, obj: dict[str, Any], catch_up: bool = False) -> None:
        """A `read` receipt: the peer read this message, and (the marker only moves forward) every earlier one we
        sent it. ``catch_up`` (a count's ``read_by``): mark the outgoing messages even if the marker did not move
        (an app's outbox restored after the receipts came in). Lock held."""
        peer, seq = obj.get("to"), obj.get("seq")
        if not isinstance(peer, str) or not isinstance(seq, int):
            return
        if seq <= self.peer_read.get(peer, 0):
            if not catch_up:
                return
            seq = self.peer_read[peer]
        self.peer_read[peer] = seq
        for out in self._by_msg_id.values():
            r = out.receipt
            if out.to == peer and r is not None and isinstance(r.get("seq"), int) and r["seq"] <= seq:
                out.read.set()

    # -- sending -----------------------------------------------------------------
    def send(self, to: str, content: str, *, type: str = "text", msg_id: str | None = None,
             extra: dict[str, Any] | None = None, group: bool = False) -> Outgoing:
        """Publish a message and keep resending the same msg_id until a receipt (or the bound). ``group``: ``to``
        is a group id (docs/PROTOCOL.md section 14); its `delivered` receipts then say how many members of how
        many acked it (``Outgoing.progress``)."""
        msg_id = msg_id or f"{self._prefix}-{next(self._ids)}"
        body = {"msg_id": msg_id, "group" if group else "to": to, "type": type, "content": content,
                "ts": int(time.time() * 1000)}
        if self.batch_receipts:
            body["receipts"] = "batch"
        body.update(extra or {})
        out = Outgoing(msg_id, to, p.encode(body))
        with self._lock:
            if msg_id in self._by_msg_id:  # a deliberate resend: one delivered event for both
                out.delivered = self._by_msg_id[msg_id].delivered
            out.deadline = time.monotonic() + self.resend_timeout
            self._outgoing[msg_id] = out
            self._by_msg_id[msg_id] = out
            self._lock.notify_all()
        self.client.publish(p.send_topic(self.uid, self.device), out.payload, qos=1)
        return out

    def send_raw(self, topic_kind: str, payload: bytes) -> None:
        """Publish bytes as they are on one of our client topics (tests of bad input)."""
        topic = {"send": p.send_topic, "ack": p.ack_topic, "req": p.req_topic}[topic_kind](self.uid, self.device)
        self.client.publish(topic, payload, qos=1)

    # -- requests ------------------------------------------------------------------
    def request(self, body: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        """Publish a request and wait for its answer, resending it (same req_id) while none comes.

        Resending is safe: count and pull are reads, and a pull's ``ack`` deletes its page once only.
        """
        timeout = self.request_timeout if timeout is None else timeout
        req_id = body.setdefault("req_id", f"{self._prefix}-r{next(self._ids)}")
        payload = p.encode(body)
        with self._lock:
            self._requests[req_id] = slot = []
        try:
            end = time.monotonic() + timeout
            wait = self.resend_timeout
            while True:
                self.client.publish(p.req_topic(self.uid, self.device), payload, qos=1)
                resend_at = time.monotonic() + wait
                wait = min(wait * 2, self.resend_wait_max)
                with self._lock:
                    while not slot:
                        left = min(end, resend_at) - time.monotonic()
                        if left <= 0:
                            break
                        self._lock.wait(left)
                    if slot:
                        return slot[0]
                if time.monotonic() >= end:
                    raise TimeoutError(f"{self.uid}: no answer to {body.get('op')} {req_id} within {timeout}s: is a "
                                       f"worker running beside the broker at {self.host}:{self.port}?")
        finally:
            with self._lock:
                self._requests.pop(req_id, None)

    def count(self, timeout: float | None = None) -> dict[str, Any]:
        return self.request({"op": "count"}, timeout)

    def pull(self, limit: int | None = None, from_uid: str | None = None, ack: str | None = None,
             timeout: float | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"op": "pull"}
        if limit is not None:
            body["limit"] = limit
        if from_uid is not None:
            body["from"] = from_uid
        if ack is not None:
            body["ack"] = ack
        return self.request(body, timeout)

    def fetch_user(self, after: int = 0, limit: int | None = None, timeout: float | None = None) -> dict[str, Any]:
        """Read-only page of what waits for ANY of the user's devices (and its sync copies), by seq after
        ``after`` (the page's ``after`` is the next call's): a new device starts with the conversation in
        progress. Nothing is acked; messages come as in a pull."""
        body: dict[str, Any] = {"op": "pull", "scope": "user", "after": after}
        if limit is not None:
            body["limit"] = limit
        return self.request(body, timeout)

    def devices(self, timeout: float | None = None) -> dict[str, Any]:
        """{"kind": "devices", "devices": [{"device", "online", "last_seen", "registered_at", "push"}]}"""
        return self.request({"op": "devices"}, timeout)

    def remove_device(self, device: str, timeout: float | None = None) -> dict[str, Any]:
        """Remove one of the user's devices ("" the default device); answers {"kind": "removed", ...} or an error."""
        return self.request({"op": "remove_device", "device": device}, timeout)

    def push_register(self, endpoint: str | None, timeout: float | None = None) -> dict[str, Any]:
        """Register this device's push endpoint (an https:// URL), or drop it with None."""
        body = {"op": "push_register", "endpoint": endpoint} if endpoint is not None else {"op": "push_unregister"}
        return self.request(body, timeout)

    # -- conversations (docs/PROTOCOL.md, section 15) --------------------------------------------
    def typing(self, to: str, state: str = "typing", group: bool = False) -> None:
        """Tell ``to``'s online devices that we type (``state="stopped"``: we stopped). QoS 0, no answer, never
        stored: call it again every few seconds while typing (a notice lapses by itself after ``expires_in``).
        ``group``: ``to`` is a group id (its online members' devices)."""
        body = {"op": "typing", "group" if group else "to": to}
        if state != "typing":
            body["state"] = state
        self.client.publish(p.req_topic(self.uid, self.device), p.encode(body), qos=0)

    def is_typing(self, uid: str) -> bool:
        """Does ``uid`` type to us now (a `typing` notice that has not lapsed and was not followed by `stopped`)?"""
        with self._lock:
            state, lapse = self.typing_from.get(uid, ("stopped", 0.0))
        return state == "typing" and time.monotonic() < lapse

    def mark_read(self, peer: str, seq: int, timeout: float | None = None, group: bool = False) -> dict[str, Any]:
        """Our messages from ``peer`` up to ``seq`` are read. Answers {"kind": "read", "with", "seq", "unread"}:
        ``seq`` is the marker as stored (never lower than before, never past the newest message); ``seq=0``
        asks where the marker is without moving it. ``group``: ``peer`` is a group id (the group's messages up to
        that seq; the answer has "group" instead of "with")."""
        return self.request({"op": "read", "group" if group else "with": peer, "seq": seq}, timeout)

    def set_read_receipts(self, on: bool, timeout: float | None = None) -> dict[str, Any]:
        """Send `read` receipts for our read markers (the default) or not. Answers {"kind": "settings", ...}."""
        return self.request({"op": "settings", "read_receipts": bool(on)}, timeout)

    def settings(self, timeout: float | None = None) -> dict[str, Any]:
        """Our settings, unchanged: {"kind": "settings", "read_receipts": bool}."""
        return self.request({"op": "settings"}, timeout)

    # -- groups (docs/PROTOCOL.md section 14) ---------------------------------------
    def send_group(self, group: str, content: str, **kw: Any) -> Outgoing:
        """Send to a group's members (see send)."""
        return self.send(group, content, group=True, **kw)

    def group_request(self, op: str, group: str | None = None, timeout: float | None = None,
                      **fields: Any) -> dict[str, Any]:
        """Any group request (op group_create, group_add, ...); answers {"kind": "group", ...} or an error."""
        body: dict[str, Any] = {"op": op, **fields}
        if group is not None:
            body["group"] = group
        return self.request(body, timeout)

    def create_group(self, group: str, members: Sequence[str] = (), name: str | None = None,
                     history: bool = False) -> dict[str, Any]:
        body: dict[str, Any] = {"members": list(members), "history": history}
        if name is not None:
            body["name"] = name
        return self.group_request("group_create", group, **body)

    def group_add(self, group: str, members: Sequence[str]) -> dict[str, Any]:
        return self.group_request("group_add", group, members=list(members))

    def group_remove(self, group: str, members: Sequence[str]) -> dict[str, Any]:
        return self.group_request("group_remove", group, members=list(members))

    def group_leave(self, group: str) -> dict[str, Any]:
        return self.group_request("group_leave", group)

    def groups(self) -> dict[str, Any]:
        """{"kind": "groups", "groups": [{"group", "name", "role", "members", "gseq"}]}"""
        return self.group_request("groups")

    def group_members(self, group: str) -> dict[str, Any]:
        return self.group_request("group_members", group)

    def history(self, with_uid: str | None = None, group: str | None = None, before: int = 0,
                limit: int | None = None) -> dict[str, Any]:
        """A page of a conversation's history, newest first (servers run with --history-days): the answer's
        ``before`` is the next call's. {"kind": "history", "messages": [...], "before": seq, "more": bool}"""
        body: dict[str, Any] = {"op": "history", "before": before}
        body.update({"with": with_uid} if with_uid is not None else {"group": group})
        if limit is not None:
            body["limit"] = limit
        return self.request(body)

    def conversations(self, before: int = 0, limit: int | None = None) -> dict[str, Any]:
        """The conversations with kept messages, the most recent first (servers run with --history-days): the
        answer's ``before`` is the next call's. {"kind": "conversations", "conversations": [{"with": uid, or
        "group": gid and "name", "last_gseq"; "last_seq", "last_sent_at", "last_from"}], "before": seq, "more": bool}"""
        body: dict[str, Any] = {"op": "conversations", "before": before}
        if limit is not None:
            body["limit"] = limit
        return self.request(body)

    def drain(self, limit: int = 100, from_uid: str | None = None) -> list[dict[str, Any]]:
        """Pull pages until the empty one; each request acks the page before. Returns the new messages.
        Raises TimeoutError when a page gets no answer, RuntimeError on an error answer. One drain runs
        at a time (a second caller waits for the first)."""
        with self._drain_lock:
            return self._drain(limit, from_uid)

    def _drain(self, limit: int, from_uid: str | None) -> list[dict[str, Any]]:
        new: list[dict[str, Any]] = []
        cursor = None
        while True:
            page = self.pull(limit=limit, from_uid=from_uid, ack=cursor)
            if page.get("kind") == "error":
                raise RuntimeError(f"{self.uid}: pull failed: {page}")
            with self._lock:
                for m in page["messages"]:
                    if self._accept(m):
                        new.append(m)
            cursor = page["cursor"]
            if cursor is None:
                return new

    # -- waiting helpers -------------------------------------------------------------
    def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
        end = time.monotonic() + timeout
        with self._lock:
            while not predicate():
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(left)
            return True

    def wait_for_messages(self, n: int, timeout: float = 10.0) -> bool:
        return self.wait_for(lambda: len(self.messages) >= n, timeout)

    def flush_acks(self) -> None:
        with self._lock:
            seqs, self._pending_acks, self._ack_due = self._pending_acks, [], None
        for i in range(0, len(seqs), ACK_BATCH):
            self.client.publish(p.ack_topic(self.uid, self.device), p.encode({"seqs": seqs[i:i + ACK_BATCH]}), qos=1)

    # -- helper threads: syncs on announcements and reconnects; resends and batched acks ----
    def want_sync(self) -> None:
        """Ask the sync thread for a drain (after the one in progress, if any)."""
        with self._lock:
            self._sync_wanted = True
            self._lock.notify_all()

    def _sync_loop(self) -> None:
        """Drain whenever asked (announcement, reconnect); retry a failed drain with backoff while connected."""
        wait = SYNC_RETRY_MIN_S
        while not self._closing.is_set():
            with self._lock:
                self._lock.wait_for(lambda: self._sync_wanted or self._closing.is_set(), 0.5)
                if not self._sync_wanted or self._closing.is_set():
                    continue
                self._sync_wanted = False
            if not self.client.is_connected():
                continue  # the reconnect asks for a sync itself (_on_subscribe)
            try:
                self.drain()
                with self._lock:
                    self.syncs += 1
                    self._lock.notify_all()  # for wait_for() callers
                wait = SYNC_RETRY_MIN_S
                continue
            except Exception as e:  # noqa: BLE001 - no answer, an error answer, a malformed page: never give up
                if self._closing.is_set():
                    return
                self.sync_failures += 1
                log.warning("%s: sync failed (%s); trying again in %.0f s", self.uid, e, wait)
            with self._lock:  # an announcement meanwhile ends the wait early
                self._lock.wait_for(lambda: self._sync_wanted or self._closing.is_set(), wait)
                self._sync_wanted = True
            wait = min(wait * 2, SYNC_RETRY_MAX_S)

    def _helper_loop(self) -> None:
        if self.receiver and not self._syncer.is_alive():
            self._syncer.start()
        while not self._closing.is_set():
            resend: list[Outgoing] = []
            flush = False
            with self._lock:
                now = time.monotonic()
                waits = [o.deadline for o in self._outgoing.values()]
                if self._ack_due is not None:
                    waits.append(self._ack_due)
                if self._resubscribe_at is not None:
                    waits.append(self._resubscribe_at)
                waits += self._restate_at[:1]
                self._lock.wait(max(0.0, min(waits, default=now + 0.5) - now))
                now = time.monotonic()
                restate = bool(self._restate_at) and self._restate_at[0] <= now
                if restate:
                    self._restate_at.pop(0)
                resubscribe = self._resubscribe_at is not None and self._resubscribe_at <= now
                if resubscribe:
                    self._resubscribe_at = None
                for o in list(self._outgoing.values()):
                    if o.deadline <= now:
                        waited = now - o.created
                        o.problem = (f"no receipt after {waited:.1f}s and {o.attempts} sends: is a worker running "
                                     f"beside the broker at {self.host}:{self.port}?")
                        if o.attempts == 1 and now - self._no_receipt_warned >= NO_RECEIPT_WARN_INTERVAL_S:
                            self._no_receipt_warned = now
                            log.warning("%s: %s (still resending)", self.uid, o.problem)
                        if o.attempts > self.max_resends:
                            o.problem += " Reported failed."
                            o.failed = True
                            o.done.set()
                            del self._outgoing[o.msg_id]
                            continue
                        o.attempts += 1
                        o.deadline = now + min(self.resend_timeout * 2 ** (o.attempts - 1), self.resend_wait_max)
                        resend.append(o)
                flush = self._ack_due is not None and (self._ack_due <= now or len(self._pending_acks) >= ACK_BATCH)
            if resubscribe and self.client.is_connected():
                self._subscribe()  # its SUBACK plans the next retry if refused again
            if restate and self.client.is_connected() and not self._closing.is_set():
                self._restate_online()
            for o in resend:
                self.client.publish(p.send_topic(self.uid, self.device), o.payload, qos=1)
            if flush:
                self.flush_acks()
