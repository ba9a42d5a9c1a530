"""The worker: a paho MQTT client that feeds the core and runs its plans against the store.

Two threads, with one hand-off per batch:

* the **network thread** (``Worker._run``) drives paho's socket itself (``loop_read`` /
  ``loop_write`` / ``loop_misc``; paho's own network thread is not used). paho's callbacks run
  inside ``loop_read`` on it and only append to the inbox. It plans the next batch with the core,
  hands its store operations to the store thread, and when they are committed publishes the
  core's actions and only then PUBACKs the batch's inbound packets (``manual_ack``: store first,
  ack after commit);
* the **store thread** runs each batch's operations in ONE transaction (group commit), the only
  thread that touches the database.

While a batch commits (SQL and the fsync), the network thread reads the next one and writes the
last one's publishes, and the next batch is larger for it: the bench measured 25% more
throughput than one thread doing both, and far less latency than paho's network thread plus a
worker thread exchanging every packet through a queue. Outgoing packets are queued by paho
and written with one send() per pass (``_Client._packet_write``).
The session is clean by default: a worker that dies or is retired leaves the shared-subscription group
at once, so no payload waits for it at the broker. What was in flight to it is recovered by the senders'
retransmissions (the reference client resends until answered) and by count announcements.
``clean_session=False`` (``worker --persistent-session``) keeps a persistent session instead, for one
worker whose raw publishers never resend; see broker_config/README.md for its trade-off.
A partitioned worker (``partition``, ``worker --partitions N --partition I``: backend/partition.py) subscribes
plainly, skips (PUBACKs at once, counts, never plans) the send/ack/req packets of uids another partition owns,
and keeps a persistent session under a fixed client id: while it is down the broker queues its share.
What it subscribes to, the start-up $share probe, refused SUBSCRIBEs and the presence restore are in
``subscriptions.py`` (a mixin of Worker); paho's client with its lighter paths is in ``connection.py``.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
import select
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import paho.mqtt.client as mqtt
import peewee as pw

from .. import core, protocol
from ..metrics import Metrics
from ..partition import Partition
from ..push import Notification, PushNotifier
from ..store import Store, now_ms
from .connection import BrokerAddress, _Client, configure_tls, refusal_message, set_nodelay
from .logtext import describe_db_error, describe_op, describe_outage, describe_payload, log_bug
from .subscriptions import (PRESENCE_RESTORE_MAX, RESUBSCRIBE_MIN_S, SHARE_PROBE_WAIT_S, SPLIT_UID_FILTERS,
                            SubscriptionsMixin, mangled_uid, probe_topic, worker_subscriptions)

log = logging.getLogger("backend.worker")

# Most packets one transaction takes: big enough to amortise the commit's fsync,
# small enough that one batch's latency stays in the low milliseconds.
BATCH_MAX = 256
# MQTT keepalive: 60 s is paho's and Mosquitto's client default.
KEEPALIVE_S = 60
# Longest wait on the socket when nothing is due: stop() and housekeeping are noticed at least this
# often, and paho's keepalive (loop_misc) needs a call well within KEEPALIVE_S.
NETWORK_WAIT_S = 1.0
# Reconnect backoff bounds, as paho's defaults (1 s doubling to 120 s), capped lower: a chat worker
# that waits 2 minutes after a broker restart leaves every user waiting too.
RECONNECT_MIN_S, RECONNECT_MAX_S = 1, 16
# A connection the broker closes this soon after its CONNACK (with no error on our side) is a quick drop.
# Mosquitto closes the older of two connections with one client id at once (a session takeover); 10 s is far
# shorter than any keepalive, so a lost network link rarely looks like one.
QUICK_DROP_S = 10.0
# After this many quick drops in a row the worker says that another client is taking its client id: one or
# two could be a broker restart; three within seconds of each connect is two workers fighting over one id.
TAKEOVER_DROPS = 3
# When the database is unavailable, retry the batch (unacked) no faster than this, up to the max.
DB_RETRY_MIN_S, DB_RETRY_MAX_S = 0.2, 5.0
# Housekeeping (expiry, old cursors, remembered msg_ids) runs this often: a message expires at most
# this late, and an hour is nothing beside a 14-day age. Shorter expiry ages get a tenth of their age.
PURGE_INTERVAL_S = 3600
# Outgoing QoS 1 messages paho keeps in flight: 0 is unlimited. paho's default, 20, throttles pushes,
# and any limit makes paho walk every in-flight message on each PUBACK (7-12% of the worker's CPU in
# the bench profile); the broker bounds what it queues for a client anyway (max_queued_messages).
MAX_INFLIGHT = 0
# How often the backlog gauge is sampled (a COUNT over the message table): Prometheus scrapes every 15-60 s.
BACKLOG_SAMPLE_S = 30
# The store's outbox (changes made by the CLI, store/outbox.py) is read this often: a group change made from the
# command line reaches its members' online devices within 2 s plus a sync, and one indexed read of the newest
# rows every 2 s costs the database nothing beside the traffic.
OUTBOX_POLL_S = 2.0
# While no device has a push endpoint, the worker skips its push look-ups and asks the store again this often
# (or at once when it registers one itself): an endpoint registered through another worker is noticed at most
# this late, and only when it is the first of them all.
PUSH_ANY_RECHECK_S = 5.0
# After each CONNACK the worker waits this long for presence to settle (retained statuses, devices reconnecting
# after a broker restart: the reference client retries after 1, 2, 4 s...) before its push sweep notifies the
# devices no notification covers yet (a dead broker publishes no last wills; a killed worker's queue is gone).
PRESENCE_SETTLE_S = 10.0
# Workers share send/ack/req through this MQTT shared-subscription group by default ($share/<group>/...):
# with one worker it changes nothing; with several, the broker spreads the load between them.
DEFAULT_SHARE_GROUP = "im-workers"

# Fault injection, for the tests that kill the worker inside one delivery window: when set, the
# process SIGKILLs itself the first time it reaches the named point (after_store, before_push,
# after_push, after_page). Unset in production; checking it costs one comparison.
CRASH_AT = os.environ.get("IM_CRASH_AT") or None


_CONNECTED = object()  # inbox marker: a (re)connection, after which retained statuses rebuild presence
# Inbox marker: a reconnection of this process that found its persistent session (CONNACK session present).
# Presence is kept: the session queued every status change (QoS 1) while the worker was away. Rebuilding it from
# retained statuses instead would lose users on a RabbitMQ cluster, whose retained store is per node: a worker
# that moved to another node would count everyone whose `online` sits on another node offline, and tell them
# nothing of what waits (found by tests/test_cluster.py).
_RESUMED = object()


@dataclass
class _Batch:
    """Inbound packets on their way: planned, in the store thread's hands (future), then finished."""

    msgs: list
    kinds: dict[str, int]
    plan: core.Plan
    statuses: dict = field(default_factory=dict)  # status topic -> word heard in this batch (Store.save_statuses)
    gen: int = 0  # the connection its packets came on (Worker._inbox_gen); PUBACKed only on that one
    future: Future | None = None  # None: waiting to be (re)submitted at retry_at
    started: float = 0.0
    retry_at: float = 0.0
    wait: float = field(default=DB_RETRY_MIN_S)
    went_offline: set = field(default_factory=set)  # uids with an `offline` word in it (push notifications)


class Worker(SubscriptionsMixin):
    def __init__(self, broker: BrokerAddress | list[BrokerAddress], store: Store, *, client_id: str = "im-worker",
                 delivery: core.Delivery | None = None, skip_retained: bool = True,
                 share_group: str | None = None, metrics: Metrics | None = None,
                 clean_session: bool = True, on_fatal: Callable[[str], None] | None = None,
                 restore_presence: bool = True, split_uid_filters: bool = True,
                 push: bool = True, push_options: dict | None = None, partition: Partition | None = None,
                 presence_settle: float = PRESENCE_SETTLE_S):
        """``skip_retained``: beside a broker that lets users retain on send/ack/req topics, the
        broker replays that retained payload on every (re)subscribe, flagged retain=1 (a live
        delivery never is, MQTT-3.3.1-9): drop those replays. The embedded broker refuses such
        retained publishes itself, and amqtt flags its replay of queued messages retain=1, so
        `serve` passes False.

        ``clean_session``: True (the default) leaves the broker nothing of this worker once it is gone;
        False keeps a persistent session under ``client_id`` (see the module docstring).
        ``restore_presence``: after each (re)connection, ask the broker for the retained word of each status topic the
        store last heard online (exact subscriptions), for brokers that send none to ``im/status/+``; the
        embedded broker does send them (``serve`` passes False).
        ``split_uid_filters``: also subscribe to SPLIT_UID_FILTERS, to name a uid the broker split (one line each);
        a refusal of these is logged once and not retried (the embedded broker never splits: ``serve`` passes False).
        ``on_fatal(message)``: if given, a login the broker refuses before the worker ever connected stops
        the worker and is handed to it (one line saying what to do) instead of being retried.

        ``push``: own a :class:`backend.push.PushNotifier` (started and stopped with the worker) that notifies
        devices with a push endpoint when something waits for their user and none of its devices is online;
        ``push_options``: its keyword arguments (allowed_hosts, request_timeout...). See _plan_push.

        ``partition``: serve only the uids this partition owns (backend/partition.py): needs no ``share_group``
        (ValueError otherwise: the two are alternatives); sets the core's ``owns``. Pass ``clean_session=False``
        with it, so the broker queues this partition's share while the worker is down."""
        if partition is not None and share_group:
            raise ValueError("a partitioned worker subscribes plainly: give no share group with a partition")
        self.partition = partition
        # Several addresses are the nodes of one cluster: when the connection to one fails or ends, the worker
        # tries the next at once, and backs off only after a whole round failed. Same account and TLS on all.
        self.brokers = list(broker) if isinstance(broker, (list, tuple)) else [broker]
        self.broker = self.brokers[0]
        self._failed_in_round = 0  # connection attempts that failed since the last accepted CONNACK
        self.store = store
        self.core = delivery or core.Delivery()
        if partition is not None:
            self.core.owns = partition.owns
        self.client_id = client_id
        self.skip_retained = skip_retained
        self.share_group = share_group
        self.subscriptions = worker_subscriptions(share_group)
        # Whether the broker delivers through $share: None until the start-up probe tells (only with a share
        # group); False makes the worker subscribe plainly (each worker then gets every payload).
        self.share_delivers: bool | None = None if share_group else False
        self.probe_topic = probe_topic(client_id)
        self._probe_nonce = b""
        self._probe_deadline: float | None = None  # monotonic; while a probe is out
        self._probe_drops = 0  # connections that ended while the probe was out
        self._probe_refused = ""  # the SUBACK code when the broker refused the probe's $share subscription
        self._pending_subs: dict[int, list[str]] = {}  # SUBSCRIBE mid -> its filters, until the SUBACK
        self._refused_subs: list[str] = []  # filters the broker refused, tried again at _resubscribe_at
        self._resubscribe_at = 0.0
        self._resubscribe_wait = RESUBSCRIBE_MIN_S
        self.restore_presence = restore_presence
        self.split_uid_filters = split_uid_filters
        self._presence_future: Future | None = None  # the store's last_online(), after a _CONNECTED marker
        self._presence_from_store = False  # this process's first connection found its persistent session
        self._restore_mids: dict[int, int] = {}  # SUBSCRIBE mid -> how many exact status filters it holds
        self._restore_filters: list[str] = []  # exact status filters to drop at _restore_until
        self._restore_until = 0.0
        self._mangled_seen: set[str] = set()  # split uids already logged (one line each)
        self.metrics = metrics or Metrics()
        self.db_ok = True
        self._inbox: list = []  # what paho's callbacks handed over, oldest first (this thread only)
        # The database runs on its own thread, one batch at a time, so this thread reads the next batch
        # from the network (and writes the last one's publishes) while a transaction commits; the
        # store thread wakes it through this socket pair when a batch is done.
        self._store_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="im-store")
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._batch: _Batch | None = None
        self._purging = None  # Store.purge_chunks() in progress, stepped on the store thread
        self._reconnect_wait = float(RECONNECT_MIN_S)
        self._next_connect = 0.0  # monotonic time of the next connection attempt
        self.on_fatal = on_fatal
        self.fatal: str | None = None  # why the worker gave up (a refused first login), else None
        self._ever_connected = False
        self._session_up = False  # a CONNACK accepted and no disconnect since (network thread only)
        self._connected_at = 0.0
        self._quick_drops = 0  # connections the broker closed within QUICK_DROP_S, in a row
        self._unreachable_logged = False
        self._connack_seen = False  # a CONNACK (accepted or not) arrived on the current connection attempt
        self._no_connack_logged = False
        # Connection generations: _conn_gen counts accepted CONNACKs; _inbox_gen counts the _CONNECTED (and
        # _RESUMED) markers taken from the inbox, so it is the generation of the packets now being planned. A
        # packet id is only meaningful on the connection it came on: with a clean session the broker forgets
        # what was in flight when the connection drops, and the same id may then name a new packet. A batch
        # whose connection is gone is stored and answered but not PUBACKed.
        self._conn_gen = 0
        self._inbox_gen = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.connected = threading.Event()
        self._last_info: mqtt.MQTTMessageInfo | None = None
        self.clean_session = clean_session
        self.client = _Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean_session,
                                  protocol=mqtt.MQTTv311, manual_ack=True)
        if self.broker.username:
            self.client.username_pw_set(self.broker.username, self.broker.password)
        configure_tls(self.client, self.broker)
        # Our end (a crash, a lost link, a stop) tells the other workers to re-announce (protocol.WORKER_GONE).
        self.client.will_set(protocol.worker_topic(client_id), protocol.WORKER_GONE, qos=1)
        self.client.max_inflight_messages_set(MAX_INFLIGHT)
        # paho's hook for an external event loop: with it set, publish() and ack() only queue their
        # packet and _network writes the queue in one go (_Client._packet_write). Nothing to register.
        self.client.on_socket_register_write = lambda client, userdata, sock: None
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        # Push notifications: lookups (endpoints and per-device waiting counts) run on the store thread after a
        # batch, and their results are handed to the notifier from this thread (which knows who is online).
        self.push = PushNotifier(metrics=self.metrics, on_gone=self._push_gone, on_sent=self._push_sent,
                                 **(push_options or {})) if push else None
        self.presence_settle = presence_settle
        self._sweep_at: float | None = None  # monotonic time of the next push sweep (set at each CONNACK)
        self._outbox_id: int | None = None  # the last outbox row read (None: not read yet; store/outbox.py)
        self._outbox_at = 0.0  # monotonic time of the next outbox read
        self._sent: list[tuple[str, str, int]] = []  # (uid, device, newest_seq) gateways accepted, from im-push
        # Look-ups in flight, in order: (future, the connection a sweep was made for; None for a batch's look-up).
        self._push_lookups: list[tuple[Future, int | None]] = []
        self._gone: list[tuple[str, str, str]] = []  # endpoints a gateway called gone, from the im-push thread
        self._push_any = False  # some device has an endpoint (as of _push_any_until - PUSH_ANY_RECHECK_S)
        self._push_any_until = 0.0  # monotonic time of the next check; 0: check at the next look-up

    # -- paho callbacks (inside loop_read, on the network thread: hand over only) ---
    def _on_connect(self, client, userdata, flags, reason_code, properties):
        self._connack_seen = True
        resumed = self._ever_connected and not self.clean_session and flags.session_present
        # A new process that finds its persistent session: presence is the store's last statuses (true when this
        # worker's previous process died, or newer: other workers write them too) followed by the changes its
        # session queued since; RabbitMQ's retained statuses would only tell what its own node holds.
        self._presence_from_store = (self.restore_presence and not self._ever_connected and not self.clean_session
                                     and flags.session_present and not reason_code.is_failure)
        if reason_code.is_failure:
            message = refusal_message(self.broker, self.client_id, reason_code)
            if not self._ever_connected and self.on_fatal is not None:
                self.fatal = message
                self._stop.set()  # _run ends; the caller reports the one line and exits
                self.on_fatal(message)
                return
            log.error("%s; retrying in %.0fs", message, max(0.0, self._next_connect - time.monotonic()))
            return
        set_nodelay(client)
        self._failed_in_round = 0
        self._no_connack_logged = False
        self._ever_connected = self._session_up = True
        self._unreachable_logged = False
        self._connected_at = time.monotonic()
        self._conn_gen += 1
        if self.push is not None:
            self._sweep_at = self._connected_at + self.presence_settle
        # The marker goes first so presence is reset before the retained statuses arrive.
        self._inbox.append(_RESUMED if resumed else _CONNECTED)
        self._pending_subs.clear()
        self._refused_subs = []
        self._resubscribe_wait = RESUBSCRIBE_MIN_S
        if self.split_uid_filters:
            self._subscribe(list(SPLIT_UID_FILTERS))
        if self.share_delivers is None:
            # Not known yet: first the statuses and a probe through a $share subscription of our own; the
            # send/ack/req subscriptions follow once the probe says shared or plain (_settle_probe).
            self._subscribe([t for t in self.subscriptions if not t.startswith("$share/")]
                            + [f"$share/{self.share_group}/{self.probe_topic}"])
            self._probe_nonce = os.urandom(8).hex().encode()
            self._probe_refused = ""
            self._probe_deadline = time.monotonic() + SHARE_PROBE_WAIT_S
            client.publish(self.probe_topic, self._probe_nonce, qos=1)
        else:
            self._subscribe(self.subscriptions)
        self.connected.set()
        self.metrics.connected.set(1)
        log.info("connected to %s:%s as %s%s", self.broker.host, self.broker.port, self.client_id,
                 "; resumed its persistent session (presence kept: the session queued every status change)"
                 if resumed else "")

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        self.connected.clear()
        self.metrics.connected.set(0)
        if not self._connection_ended():
            if not self._connack_seen and not self._no_connack_logged:
                # Closed before any CONNACK: NATS does this to a CONNECT it cannot take (e.g. a will topic
                # with '.'); without this line the worker would retry in silence.
                self._no_connack_logged = True
                log.warning("the broker at %s:%s closed the connection before answering the CONNECT (%s): "
                            "its log says why; retrying with backoff", self.broker.host, self.broker.port,
                            reason_code)
            return  # a refused CONNECT: _on_connect said why
        if self._stop.is_set():
            return
        wait = max(0.0, self._next_connect - time.monotonic())
        if self._quick_drops >= TAKEOVER_DROPS:
            # The backoff keeps growing meanwhile (_connection_ended resets it only after a stable connection).
            log.error("the broker closed the connection %d times in a row within %.0fs of connecting (%s): "
                      "another client is probably connected with this worker's client id %r (two workers with "
                      "one --id?); give each worker its own --id; retrying in %.0fs", self._quick_drops,
                      QUICK_DROP_S, reason_code, self.client_id, wait)
        else:
            log.warning("disconnected from the broker (%s); reconnecting", reason_code)

    def _connection_ended(self) -> bool:
        """Bookkeeping when an accepted connection ends (False if none was up): a connection that lived
        QUICK_DROP_S resets the backoff; a shorter one counts as a quick drop and leaves it growing."""
        if not self._session_up:
            return False
        self._session_up = False
        if self._probe_deadline is not None:
            # RabbitMQ closes the connection of a client whose SUBSCRIBE it refuses: twice in a row while the
            # $share probe is out, and the worker stops asking for $share (the next connection subscribes plainly).
            self._probe_drops += 1
            self._probe_deadline = None
            if self._probe_drops >= 2:
                self._probe_refused = "the broker closed the connection on it, twice"
                self.share_delivers = False
                self._log_share_verdict(False)
                self.subscriptions = worker_subscriptions(None)
        if time.monotonic() - self._connected_at >= QUICK_DROP_S:
            self._quick_drops = 0
            self._reconnect_wait = float(RECONNECT_MIN_S)
            self._next_connect = 0.0
        else:
            self._quick_drops += 1
            # Back off from now, not from the last attempt: the connection may have lived longer than the wait.
            self._next_connect = max(self._next_connect, time.monotonic() + self._reconnect_wait / 2)
        return True

    def _on_message(self, client, userdata, msg):
        if self.partition is not None and not self.partition.owns_topic(msg.topic):
            # Another partition's user: acknowledged at once (manual_ack), never planned; counted, not logged.
            if msg.qos > 0:
                client.ack(msg.mid, msg.qos)
            self.metrics.partition_skipped.inc()
            return
        if msg.topic == self.probe_topic:
            if msg.qos > 0:
                client.ack(msg.mid, msg.qos)  # manual_ack: our own probe, nothing to store
            if self._probe_deadline is not None and msg.payload == self._probe_nonce:
                self._settle_probe(True)
            return
        self._inbox.append(msg)

    # -- lifecycle ---------------------------------------------------------------
    def start(self) -> None:
        if self.push is not None:
            self.push.start()
        self.client.connect_async(self.broker.host, self.broker.port, keepalive=KEEPALIVE_S)
        self._thread = threading.Thread(target=self._run, name="im-worker", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Finish the batch in hand (committed and acked), then DISCONNECT cleanly."""
        self._stop.set()
        self._wake(None)  # out of its wait on the network at once
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            self._store_thread.submit(self._close_db)  # the store thread's own connection
        except RuntimeError:  # stopped before
            pass
        self._store_thread.shutdown(wait=True)
        if self.client.socket() is not None:
            # A clean DISCONNECT discards the will: say "gone" ourselves (the others re-announce what our
            # unfinished pushes leave waiting).
            self.client.publish(protocol.worker_topic(self.client_id), protocol.WORKER_GONE, qos=0)
            self.client.disconnect()
            self.client.loop_write()  # what is still queued, then the DISCONNECT
        if self.push is not None:
            self.push.stop()  # queued notifications are dropped: the next stored message makes fresh ones

    # -- the network, driven from the worker thread --------------------------------
    def _network(self, timeout: float) -> None:
        """Wait up to ``timeout`` for the socket, then read what arrived (paho's callbacks append it
        to the inbox), write what is queued, and let paho keep the connection alive; reconnect
        (with backoff) when there is no connection."""
        c = self.client
        sock = c.socket()
        if sock is None:
            self._reconnect(timeout)
            return
        try:
            readable = self._readable(sock, timeout, c.want_write())
            rc = mqtt.MQTT_ERR_SUCCESS
            if readable:
                rc = c.loop_read()
                # loop_read stops at a quota of packets: take the rest that is already here, up to a batch.
                while rc == mqtt.MQTT_ERR_SUCCESS and len(self._inbox) < BATCH_MAX and c.socket() is not None \
                        and self._readable(c.socket(), 0.0, False):
                    rc = c.loop_read()
            if rc == mqtt.MQTT_ERR_SUCCESS and c.want_write():
                rc = c.loop_write()
            if rc == mqtt.MQTT_ERR_SUCCESS:
                c.loop_misc()
        except (OSError, ValueError) as e:  # the socket failed under us: paho reconnects from scratch
            log.warning("connection error (%s); reconnecting", e)
            self._drop_connection()

    def _readable(self, sock, timeout: float, want_write: bool) -> bool:
        """Is the broker's socket readable within ``timeout``? A wake-up (the store thread done, stop())
        ends the wait too. With no socket (reconnect backoff), only a wake-up does."""
        if sock is not None:
            if self.client.buffered():
                return True  # bytes already read into the client's chunk, invisible to select()
            if getattr(sock, "pending", None) is not None and sock.pending() > 0:
                return True  # TLS: bytes already decrypted inside the SSL object, invisible to select()
        socks = [self._wake_r] if sock is None else [sock, self._wake_r]
        r, _, _ = select.select(socks, [sock] if want_write and sock is not None else [], [], timeout)
        if self._wake_r in r:
            try:
                self._wake_r.recv(4096)
            except BlockingIOError:
                pass
        return sock in r

    def _reconnect(self, timeout: float) -> None:
        now = time.monotonic()
        if now < self._next_connect:
            self._readable(None, max(0.0, min(timeout if timeout > 0 else 0.05, self._next_connect - now)), False)
            return
        # Attempts are spaced by the backoff whether the TCP connect fails or the broker then refuses or
        # drops us; a successful CONNACK (_on_connect) resets it.
        self._next_connect = now + self._reconnect_wait
        self._reconnect_wait = min(self._reconnect_wait * 2, float(RECONNECT_MAX_S))
        self._connack_seen = False
        if len(self.brokers) > 1 and (self._failed_in_round or self._ever_connected):
            self._next_address(now)
        self._failed_in_round += 1  # until a CONNACK accepts this attempt (_on_connect resets it)
        try:
            self.client.reconnect()  # TCP (and TLS) connect and CONNECT; the CONNACK is read by _network
            set_nodelay(self.client)
        except Exception as e:  # noqa: BLE001 - refused, unreachable, TLS failure: all retried
            if not self._unreachable_logged:
                self._unreachable_logged = True  # one line with what to do; then shorter ones per attempt
                log.warning("cannot reach the broker at %s:%s (%s): is it running there, and are --broker "
                            "(or $IM_BROKER_URL) and its port right? retrying in %.0fs, then with backoff up "
                            "to %ds", self.broker.host, self.broker.port, e, self._next_connect - now,
                            RECONNECT_MAX_S)
            else:
                log.warning("still cannot reach the broker at %s:%s (%s); retrying in %.0fs", self.broker.host,
                            self.broker.port, e, self._next_connect - now)

    def _next_address(self, now: float) -> None:
        """Several addresses: move to the next one; within a round (not every address tried yet since the last
        accepted CONNACK, or since the connection ended) without waiting: a dead node costs nothing."""
        i = (self.brokers.index(self.broker) + 1) % len(self.brokers)
        if (self._failed_in_round + 1) % len(self.brokers) != 0:
            self._next_connect = now + RECONNECT_MIN_S / 10  # at once, bar a tenth of the minimum
            self._reconnect_wait = max(float(RECONNECT_MIN_S), self._reconnect_wait / 2)  # not doubled
        self.broker = self.brokers[i]
        tls = self.client._ssl_context is not None  # connect_async keeps TLS settings; only the target changes
        self.client.connect_async(self.broker.host, self.broker.port, keepalive=KEEPALIVE_S)
        log.info("trying the broker at %s:%s (address %d of %d)%s", self.broker.host, self.broker.port, i + 1,
                 len(self.brokers), " over TLS" if tls else "")

    def _drop_connection(self) -> None:
        self.client._reset_sockets()  # paho's own clean-up (closes the socket); the next _network reconnects
        self.connected.clear()
        self.metrics.connected.set(0)
        self._connection_ended()

    def _idle(self, seconds: float) -> None:
        """Wait, keeping the connection serviced (what arrives meanwhile waits in the inbox, unacked)."""
        end = time.monotonic() + seconds
        while not self._stop.is_set():
            left = end - time.monotonic()
            if left <= 0:
                return
            self._network(min(left, NETWORK_WAIT_S))

    # -- the worker thread -------------------------------------------------------
    def _purge_interval(self) -> float:
        age = self.store.expire_after_ms
        return PURGE_INTERVAL_S if not age else max(0.1, min(PURGE_INTERVAL_S, age / 10_000))

    def healthy(self) -> bool:
        return self.connected.is_set() and self.db_ok

    def _run(self) -> None:
        next_purge = time.monotonic() + min(5.0, self._purge_interval())
        next_sample = time.monotonic()
        while not self._stop.is_set():
            batch = self._batch
            # Announcements the core owes online receivers need a transaction (a count) even when
            # nothing arrives; next_deadline() below wakes this loop when one falls due.
            if batch is None and (self._inbox or self.core.announcements_due(now_ms())):
                self._start_next()
            elif batch is not None and batch.future is None and time.monotonic() >= batch.retry_at:
                self._submit(batch)  # the database failed this batch: try it again, still unacked
            # While the store thread holds a batch, retransmissions and announcements wait for it (below), so
            # only held receipts may shorten the wait: a push deadline already past would spin this loop at 100%
            # CPU until the commit (measured beside partitioned workers: 2-2.5x the CPU of the other worker).
            in_flight = self._batch is not None and self._batch.future is not None
            deadline = self.core.next_deadline(receipts_only=in_flight)
            timeout = NETWORK_WAIT_S if deadline is None else \
                max(0.0, min(NETWORK_WAIT_S, (deadline - now_ms()) / 1000))
            if self._batch is None and self._inbox:
                timeout = 0.0
            elif self._batch is not None and self._batch.future is None:
                timeout = max(0.0, min(timeout, self._batch.retry_at - time.monotonic()))
            if self._probe_deadline is not None:
                timeout = max(0.0, min(timeout, self._probe_deadline - time.monotonic()))
            # While the store thread commits a batch, this thread reads what arrives (and writes).
            self._network(timeout)
            self._subscription_upkeep()
            if self._batch is not None and self._batch.future is not None and self._batch.future.done():
                done, self._batch = self._batch, None
                self._complete_safely(done)
            self._publish(self.core.flush_receipts(now_ms()))  # batched receipts held long enough
            if self._push_lookups or self._gone or self._sent:
                self._push_results()
            if self._batch is not None:
                continue  # housekeeping uses the store thread: after the batch
            if self._sweep_at is not None and time.monotonic() >= self._sweep_at and self.connected.is_set():
                self._sweep_at = None
                future = self._store_thread.submit(self._push_lookup, None)
                future.add_done_callback(self._wake)
                self._push_lookups.append((future, self._conn_gen))
            try:
                self._retransmit()
                if time.monotonic() >= self._outbox_at:
                    self._outbox_at = time.monotonic() + OUTBOX_POLL_S
                    self._read_outbox()
                if self._purging is None and time.monotonic() >= next_purge:
                    next_purge = time.monotonic() + self._purge_interval()
                    self.metrics.expired.inc(self._db_call(self.store.expire))
                    self._db_call(self.store.expire_history)  # delivered messages past --history-days
                    self._db_call(self.store.purge_outbox)  # announced long ago
                    # Devices silent past the expiry age are removed (told so if they come back).
                    self._db_call(self.store.expire_devices, None, self.core.online_devices())
                    self._purging = self.store.purge_chunks()
                if self._purging is not None:
                    # One short transaction of the purge per pass, between batches: never a long stall.
                    if self._db_call(next, self._purging, None) is None:
                        self._purging = None
                if time.monotonic() >= next_sample:
                    next_sample = time.monotonic() + BACKLOG_SAMPLE_S
                    self.metrics.backlog.set(self._db_call(self.store.backlog))
            except Exception:  # noqa: BLE001 - housekeeping fails with the database; it runs again later
                log.exception("housekeeping failed")
                self._purging = None  # a failed generator is finished; the next purge starts afresh
                self._idle(DB_RETRY_MIN_S)
        # Stopping: finish the batch the store thread holds, so what it committed is answered and acked.
        batch = self._batch
        if batch is not None and batch.future is not None:
            try:
                self._wait_for(batch.future)
                self._complete(batch)
            except Exception:  # noqa: BLE001 - not committed, or not answerable: the broker redelivers it
                log.warning("stopping with a batch of %d unacknowledged; the broker redelivers it", len(batch.msgs))
        self._publish(self.core.flush_receipts())  # stop() writes them before its DISCONNECT

    # -- batches: planned here, stored on the store thread, finished here -----------
    def _start_next(self) -> None:
        """Take the inbox's next batch (up to a reconnection marker) and send it to the store thread."""
        inbox = self._inbox
        while inbox and (inbox[0] is _CONNECTED or inbox[0] is _RESUMED):
            self._inbox_gen += 1
            if inbox.pop(0) is _RESUMED:
                continue
            self.core.reset_presence()
            if self.restore_presence:
                self._restore_mids.clear()
                self._presence_future = self._store_thread.submit(self.store.last_online, PRESENCE_RESTORE_MAX)
                self._presence_future.add_done_callback(self._wake)
        if self._presence_from_store and self._presence_future is not None:
            return  # the store's last statuses go first (_subscription_upkeep puts them at the inbox's head)
        n = 0
        while n < len(inbox) and n < BATCH_MAX and inbox[n] is not _CONNECTED and inbox[n] is not _RESUMED:
            n += 1
        msgs = inbox[:n]
        del inbox[:n]
        if not msgs and not self.core.announcements_due(now_ms()):
            return
        try:
            batch = self._plan(msgs)
        except Exception:  # noqa: BLE001 - a bug in planning: isolate the poisonous packet
            log_bug("planning a batch of %d failed; taking its packets one by one", len(msgs))
            self._one_by_one(msgs)
            return
        self._submit(batch)
        self._batch = batch

    def _plan(self, msgs: list) -> "_Batch":
        now = now_ms()
        inbound = []
        statuses: dict[str, str] = {}  # status topic -> its last word in this batch, remembered in the store
        kinds: dict[str, int] = {}  # packets per topic kind, for the metrics
        went_offline: set[str] = set()
        came_online: set[str] = set()
        for m in msgs:
            topic = m.topic  # paho decodes it at each read
            parsed = protocol.parse_topic(topic)
            kind = parsed.kind if parsed else "invalid"
            kinds[kind] = kinds.get(kind, 0) + 1
            split = mangled_uid(m.topic) if parsed is None else None
            if split is not None:
                # Never stored under another uid: the broker rewrote the topic (RabbitMQ: '.' -> '/').
                if split not in self._mangled_seen:
                    self._mangled_seen.add(split)
                    log.error("dropped a payload on %r: the broker split a uid into topic levels (uid %r? "
                              "RabbitMQ turns '.' in a topic level into '/'); a uid with '.' cannot work beside "
                              "this broker: give that user a uid without '.' (docs/PROTOCOL.md, section 2)",
                              m.topic, split)
                continue
            if parsed is None and not m.topic.startswith(core.WORKER_TOPIC_PREFIX):  # a worker's `gone`: core's
                log.warning("dropped a payload on %r: not a protocol topic with a valid uid", m.topic)
            elif m.retain and self.skip_retained and parsed.kind != "status":
                log.warning("dropped a retained replay on %s (retained sends are not messages)", m.topic)
                continue
            if parsed is not None and parsed.kind == "status" and m.payload in (b"online", b"offline"):
                statuses[m.topic] = m.payload.decode()
            if parsed is not None and parsed.kind == "status" and self.push is not None:
                word = protocol.parse_status(m.payload)
                if word == protocol.ONLINE:
                    self.push.cancel(parsed.uid)  # no notification while a device of the user is online
                    came_online.add(parsed.uid)
                elif word == protocol.OFFLINE and not m.retain:
                    # Maybe a departure; not a retained replay (after this worker's (re)connect): that would
                    # wake every sleeping phone again at each worker restart.
                    went_offline.add(parsed.uid)
            inbound.append((topic, m.payload, m.retain, parsed))
        if log.isEnabledFor(logging.DEBUG):  # topics and sizes only: payloads hold message content
            for topic, payload, *_ in inbound:
                log.debug("in  %s (%d bytes)", topic, len(payload))
        # A departure is a user online before this batch (or during it) whose last device left. An `offline` for
        # a user already offline is none: the worker's own derived status coming back, a repeated will.
        # Partitions: the owner alone notifies (every worker sees every status).
        went_offline = {u for u in went_offline
                        if (u in came_online or self.core.user_online(u)) and self.core.mine(u)}
        plan = self.core.plan(inbound, now)
        relayed, dropped = self.core.take_signal_counts()
        if relayed or dropped:
            self.metrics.typing_relayed.inc(relayed)
            self.metrics.typing_dropped.inc(dropped)
        return _Batch(msgs, kinds, plan, gen=self._inbox_gen, statuses=statuses, went_offline=went_offline)

    def _submit(self, batch: "_Batch") -> None:
        batch.started = time.perf_counter()
        batch.future = self._store_thread.submit(self._store_batch, batch.plan.ops, batch.statuses)
        batch.future.add_done_callback(self._wake)

    def _store_batch(self, ops: list[core.Operation], statuses: dict | None = None) -> list[core.Outcome]:
        """On the store thread: one transaction for the batch; on a data error, one per operation so one
        bad op can't sink the rest. A database that fails (OperationalError...) raises to the caller.
        Then the batch's status words, remembered for the next restart (best effort: a status lost here only
        means that user is seen online when it next says so)."""
        try:
            outcomes = self.store.apply(ops)
        except (pw.IntegrityError, pw.DataError, pw.ProgrammingError, ValueError):
            outcomes = [o for op in ops for o in self._apply_one(op)]
        if statuses:
            try:
                self.store.save_statuses(statuses)
            except Exception as e:  # noqa: BLE001 - never fails the batch whose messages are committed
                log.warning("presence: could not remember %d status words (%s)", len(statuses), describe_outage(e))
        return outcomes

    def _complete_safely(self, batch: "_Batch") -> None:
        try:
            self._complete(batch)
        except (pw.OperationalError, pw.InterfaceError) as e:
            batch.future, batch.retry_at = None, time.monotonic() + self._db_failed(batch, e)
            self._batch = batch  # resubmitted by _run at retry_at; the network stays served meanwhile
        except Exception:  # noqa: BLE001 - a bug (not the database): isolate the poisonous packet
            log_bug("batch of %d failed; retrying its packets one by one", len(batch.msgs))
            self._one_by_one(batch.msgs)

    def _complete(self, batch: "_Batch") -> None:
        """The batch committed: publish what the core says, then PUBACK its packets (store first, ack after)."""
        outcomes = batch.future.result()
        self.db_ok = True
        self.metrics.store_seconds.observe(time.perf_counter() - batch.started)
        self._count(batch.kinds, outcomes)
        if any(isinstance(op, core.StoreMessage) for op in batch.plan.ops):
            self._crash("after_store")
        self._publish(batch.plan.replies)
        actions = self.core.after_commit(outcomes, now_ms())
        self.metrics.pushed.inc(sum(1 for a in actions if isinstance(a.payload, dict) and a.payload.get("kind") == "msg"))
        self._publish(actions)
        if self.push is not None:
            self._plan_push(batch, outcomes)
        if self._may_ack(batch.gen):
            for m in batch.msgs:
                if m.qos > 0:
                    self.client.ack(m.mid, m.qos)

    # -- push notifications ----------------------------------------------------------
    def _plan_push(self, batch: "_Batch", outcomes: list[core.Outcome]) -> None:
        """After a committed batch: the users who need a notification are those a message was just stored for
        while none of their devices is online, and those whose last device just went offline (something may
        wait: pushes it never acked). Their devices' endpoints and waiting counts are looked up on the store
        thread in one query for the whole batch (never a query per message); _push_results notifies."""
        if not self._push_any and any(isinstance(o, core.PushEndpointSet) for o in outcomes):
            self._push_any_until = 0.0  # registered here: the next look-up asks the store at once
        uids = {uid for uid, _seq in self.core.offline_receivers(outcomes)}
        uids |= {uid for uid in batch.went_offline if not self.core.user_online(uid)}
        if not uids:
            return
        future = self._store_thread.submit(self._push_lookup, sorted(uids))
        future.add_done_callback(self._wake)
        self._push_lookups.append((future, None))

    def _push_lookup(self, uids: list[str] | None) -> list[tuple[str, str, str, int, int]]:
        """On the store thread: the devices to notify (``uids`` None: the sweep, every device with something
        newer than its last notification); no query at all while no device has an endpoint."""
        now = time.monotonic()
        if now >= self._push_any_until or uids is None:
            self._push_any = self.store.has_push_endpoints()
            self._push_any_until = now + PUSH_ANY_RECHECK_S
        if not self._push_any:
            return []
        if uids is not None:
            return self.store.push_targets(uids)
        # Partitions: each worker sweeps its own users' devices (core.mine is pure: safe on this thread).
        # Only entries stored a settle time ago or more: a fresher one may be a push in flight to a device that is
        # online but not yet seen online by this worker (a worker lagging behind the status topics).
        cutoff = now_ms() - int(self.presence_settle * 1000)
        swept = [t for t in self.store.push_sweep(stored_before_ms=cutoff) if self.core.mine(t[0])]
        if swept:
            log.info("push sweep (presence settled): %d device(s) wait for what no notification covered yet; "
                     "notifying those whose user has no device online", len(swept))
        return swept

    def _push_results(self) -> None:
        """Hand finished lookups to the notifier (skipping users who came online meanwhile), and clear the
        endpoints gateways called gone, on the store thread."""
        while self._push_lookups and self._push_lookups[0][0].done():
            future, swept_for = self._push_lookups.pop(0)
            if swept_for is not None and (swept_for != self._conn_gen or not self.connected.is_set()):
                # A sweep whose connection ended while it ran: presence was reset (and is being rebuilt), so
                # "no device online" means nothing yet. The new connection sweeps again once presence settled.
                continue
            try:
                targets = future.result()
            except Exception as e:  # noqa: BLE001 - the database failed: notifications are best effort
                log.warning("push notification look-up failed (%s); no notification for that batch",
                            describe_db_error(e))
                continue
            for uid, device, endpoint, waiting, newest in targets:
                if not self.core.user_online(uid):
                    log.debug("push notification for %s/%s: %d waiting, newest seq %d", uid, device, waiting, newest)
                    self.push.notify(Notification(uid=uid, device=device, endpoint=endpoint, waiting=waiting,
                                                  newest_seq=newest))
        if self._sent:
            sent = [self._sent.pop(0) for _ in range(len(self._sent))]  # im-push may append meanwhile
            future = self._store_thread.submit(self.store.mark_notified, sent)
            future.add_done_callback(self._marked)
        while self._gone:
            uid, device, endpoint = self._gone.pop(0)
            future = self._store_thread.submit(self.store.drop_push_endpoint, uid, device, endpoint)
            future.add_done_callback(self._gone_dropped)

    def _push_gone(self, uid: str, device: str, endpoint: str) -> None:
        """The notifier's on_gone (on the im-push thread): hand over only; the store thread clears it."""
        self._gone.append((uid, device, endpoint))  # list.append is atomic; drained by the network thread
        self._wake(None)

    def _push_sent(self, n: Notification) -> None:
        """The notifier's on_sent (on the im-push thread): hand over only; the store thread records it."""
        self._sent.append((n.uid, n.device, n.newest_seq))
        self._wake(None)

    @staticmethod
    def _marked(future) -> None:
        if future.exception() is not None:  # at worst the next sweep notifies that seq once more
            log.warning("could not record sent push notifications (%s)", describe_db_error(future.exception()))

    @staticmethod
    def _gone_dropped(future) -> None:
        if future.exception() is not None:  # the next notification to it is refused again and retried then
            log.warning("could not clear a gone push endpoint (%s)", describe_db_error(future.exception()))

    def _may_ack(self, gen: int) -> bool:
        """PUBACK only on the connection the packets came on (see _conn_gen); after a reconnect a clean
        session's broker has forgotten them, and a persistent one's resends them (answered duplicate)."""
        return self._session_up and gen == self._conn_gen

    def _db_failed(self, batch: "_Batch", error: Exception) -> float:
        """The database failed this batch's transaction: how long to wait before trying it again."""
        self.db_ok = False
        # A deadlock or lock timeout between workers is as transient as a lost connection: roll back,
        # keep the batch unacked, reconnect, try again after a pause that doubles up to the max.
        log.warning("transaction failed (%s); retrying in %.1fs", describe_outage(error), batch.wait)
        self._db_call_quietly(self._close_db)
        wait, batch.wait = batch.wait, min(batch.wait * 2, DB_RETRY_MAX_S)
        return wait

    def _one_by_one(self, msgs: list) -> None:
        """Each packet alone, synchronously: one poisonous packet is answered and dropped alone instead of
        taking its neighbours down or sitting unacked in the broker's in-flight window."""
        for item in msgs:
            try:
                batch = self._plan([item])
                while not self._stop.is_set():
                    self._submit(batch)
                    self._wait_for(batch.future)
                    try:
                        self._complete(batch)
                        break
                    except (pw.OperationalError, pw.InterfaceError) as e:
                        self._idle(self._db_failed(batch, e))
            except Exception:  # noqa: BLE001
                log_bug("dropped a packet on %s that the worker cannot process", getattr(item, "topic", "?"))
                parsed = protocol.parse_topic(getattr(item, "topic", ""))
                if parsed is not None and parsed.kind in protocol.CLIENT_TOPICS:
                    self._publish([core.Publish(protocol.reply_topic(parsed.uid, parsed.device), protocol.error_payload(
                        "internal_error", "the server could not process this payload; it was not stored"))])
                if getattr(item, "qos", 0) > 0 and self._may_ack(self._inbox_gen):
                    self.client.ack(item.mid, item.qos)

    # -- the store thread ----------------------------------------------------------
    def _wake(self, _future) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:  # full (the worker has wake-ups pending anyway) or closed at stop
            pass

    def _wait_for(self, future) -> None:
        while not future.done():
            self._network(NETWORK_WAIT_S)

    def _db_call(self, fn, *args):
        """Run ``fn`` on the store thread (the only thread that touches the database) and wait for it,
        serving the network meanwhile."""
        future = self._store_thread.submit(fn, *args)
        future.add_done_callback(self._wake)
        self._wait_for(future)
        return future.result()

    def _db_call_quietly(self, fn, *args) -> None:
        try:
            self._db_call(fn, *args)
        except Exception:  # noqa: BLE001
            pass

    def _read_outbox(self) -> None:
        """Announce the users another process changed something for (store/outbox.py) since the last read.
        The database away: the next poll tries again (the outage itself is reported by the batches)."""
        try:
            if self._outbox_id is None:  # the first read: only what comes after this worker's start
                self._outbox_id = self._db_call(self.store.outbox_head)
                return
            rows = self._db_call(self.store.outbox_since, self._outbox_id)
        except (pw.OperationalError, pw.InterfaceError):
            return
        if rows:
            self._outbox_id = rows[-1][0]
            self.core.changed_elsewhere(dict.fromkeys(uid for _, uid in rows), now_ms())

    def _retransmit(self) -> None:
        due = self.core.due(now_ms())
        if not due:
            return
        try:
            alive = self._db_call(self.store.alive, due)
        except (pw.OperationalError, pw.InterfaceError):
            alive = None  # cannot tell: resend all; receivers drop repeats by seq
        again = self.core.resend(due, alive, now_ms())
        self.metrics.retransmitted.inc(len(again))
        self._publish(again)

    def _count(self, kinds: dict[str, int], outcomes: list[core.Outcome]) -> None:
        m = self.metrics
        for kind, n in kinds.items():
            m.inbound.labels(kind).inc(n)
        for o in outcomes:
            if isinstance(o, core.Stored):
                (m.duplicates if o.duplicate else m.stored).inc()
            elif isinstance(o, core.Deleted):
                m.acked.inc(len(o.rows))
            elif isinstance(o, core.Paged):
                m.acked.inc(len(o.deleted))

    def _apply_one(self, op: core.Operation) -> list[core.Outcome]:
        try:
            return self.store.apply([op])
        except (pw.IntegrityError, pw.DataError, pw.ProgrammingError, ValueError) as e:
            # Ids and sizes only: the op holds the message itself, and content never goes to a log line.
            log.error("store refused %s: %s", describe_op(op), describe_db_error(e))
            return [core.Refused(op, "bad_request", "the store could not accept this payload")]

    def _close_db(self) -> None:
        try:
            self.store.db.close()
        except Exception:  # noqa: BLE001 - closing a broken connection may itself fail
            pass

    def _publish(self, actions: list[core.Publish]) -> None:
        if log.isEnabledFor(logging.DEBUG):  # what went where, by ids: never content
            for a in actions:
                log.debug("out %s %s", a.topic, describe_payload(a.payload))
        # One message's pushes to a user's devices share one payload dict, one after another: encode it once.
        last: tuple[object, bytes] | None = None
        for a in actions:
            if isinstance(a.payload, str):  # a status word (the derived user status), sent as is
                self._last_info = self.client.publish(a.topic, a.payload.encode(), qos=a.qos, retain=a.retain)
                continue
            kind = a.payload.get("kind")
            if kind == "error":
                self.metrics.errors.labels(a.payload.get("code", "unknown")).inc()
            if kind == "msg":
                self._crash("before_push")
            if last is None or last[0] is not a.payload:
                last = (a.payload, protocol.encode(a.payload))
            self._last_info = self.client.publish(a.topic, last[1], qos=a.qos, retain=a.retain)
            if kind == "msg":
                self._crash("after_push")
            elif kind == "page":
                self._crash("after_page")

    def _crash(self, point: str) -> None:
        if CRASH_AT != point:
            return
        log.warning("IM_CRASH_AT=%s: killing this process now", point)
        if self._last_info is not None:  # let what was published so far reach the broker, so the crash falls here
            end = time.monotonic() + 5
            while not self._last_info.is_published() and time.monotonic() < end:
                self._network(0.05)
        os.kill(os.getpid(), signal.SIGKILL)
