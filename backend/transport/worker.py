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
from urllib.parse import unquote, urlparse

import paho.mqtt.client as mqtt
import peewee as pw
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from .. import core, protocol
from ..metrics import Metrics
from ..push import Notification, PushNotifier
from ..store import Store, now_ms

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
# Bytes asked of the socket per recv(): 64 KiB holds hundreds of chat packets (a push is ~250 bytes)
# and is the size of Linux's default TCP receive window; a larger packet is read across several chunks.
RECV_CHUNK = 64 * 1024
# How often the backlog gauge is sampled (a COUNT over the message table): Prometheus scrapes every 15-60 s.
BACKLOG_SAMPLE_S = 30
# While no device has a push endpoint, the worker skips its push look-ups and asks the store again this often
# (or at once when it registers one itself): an endpoint registered through another worker is noticed at most
# this late, and only when it is the first of them all.
PUSH_ANY_RECHECK_S = 5.0
# Workers share send/ack/req through this MQTT shared-subscription group by default ($share/<group>/...):
# with one worker it changes nothing; with several, the broker spreads the load between them.
DEFAULT_SHARE_GROUP = "im-workers"


def worker_subscriptions(share_group: str | None) -> list[str]:
    """send/ack/req through the shared group (if any); statuses and the workers' "gone" signal always plain:
    every worker sees all presence and every other worker's end."""
    prefix = f"$share/{share_group}/" if share_group else ""
    return [prefix + t for t in protocol.WORKER_SUBSCRIPTIONS if "/status/" not in t] + \
        [t for t in protocol.WORKER_SUBSCRIPTIONS if "/status/" in t] + [protocol.WORKER_TOPIC_FILTER]


# Fault injection, for the tests that kill the worker inside one delivery window: when set, the
# process SIGKILLs itself the first time it reaches the named point (after_store, before_push,
# after_push, after_page). Unset in production; checking it costs one comparison.
CRASH_AT = os.environ.get("IM_CRASH_AT") or None


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ca_file: str | None = None  # CA bundle to verify the broker with (default: the system's)
    verify: bool = True  # False only for the in-process worker of `serve --tls-only` (same process as the broker)


def parse_broker_url(url: str, password: str | None = None, ca_file: str | None = None) -> BrokerAddress:
    """mqtt://[user[:pass]@]host[:port]; the password may instead come from the caller (env or file)."""
    u = urlparse(url)
    if u.scheme not in ("mqtt", "tcp", "mqtts", "ssl"):
        raise ValueError(f"broker URL must start with mqtt:// (or mqtts:// for TLS), got {url!r}")
    tls = u.scheme in ("mqtts", "ssl")
    return BrokerAddress(host=u.hostname or "127.0.0.1", port=u.port or (8883 if tls else 1883),
                         username=unquote(u.username) if u.username else None,
                         password=unquote(u.password) if u.password else password, tls=tls, ca_file=ca_file)


def describe_op(op: core.Operation) -> str:
    """A store operation for a log line: kind, ids and sizes, never the content (users' private data)."""
    if isinstance(op, core.StoreMessage):
        return (f"message msg_id={op.msg_id!r} from {op.sender} to {op.to} "
                f"(type {op.type!r}, {len(op.content)} characters of content)")
    if isinstance(op, core.DeleteAcked):
        return f"ack of {len(op.seqs)} seqs by {op.receiver}"
    if isinstance(op, core.CountBacklog):
        return f"count for {op.receiver}"
    if isinstance(op, core.PullPage):
        return f"pull of up to {op.limit} for {op.receiver}"
    return type(op).__name__


def log_bug(message: str, *args) -> None:
    """Log the exception being handled as ERROR with its type and stack but not its text: an exception raised
    on a payload may quote it (a decode error, a driver's "Incorrect string value"), and content never goes to
    a log line."""
    import sys
    import traceback
    exc_type, _, tb = sys.exc_info()
    stack = "".join(traceback.format_tb(tb)).rstrip()
    log.error(message + " (%s; its message is not logged, it may quote the payload)\n%s", *args,
              getattr(exc_type, "__name__", "?"), stack)


def describe_db_error(error: BaseException) -> str:
    """A database error's class and code, not its text: drivers quote the offending value in it (MariaDB's
    "Incorrect string value: '\\xF0...' for column content"), which may be message content."""
    code = getattr(error, "pgcode", None) or getattr(getattr(error, "orig", None), "pgcode", None)
    if code is None and getattr(error, "args", None) and isinstance(error.args[0], int):
        code = error.args[0]  # PyMySQL: (errno, text)
    if code is None and error.__cause__ is not None:
        return f"{type(error).__name__} ({type(error.__cause__).__name__})"
    return type(error).__name__ + (f" (code {code})" if code is not None else "")


def describe_outage(error: BaseException) -> str:
    """A failed transaction's error for a log line: its first line (the lost connection, the lock timeout), unless
    it quotes a value (MariaDB reports some bad values as OperationalError), then only its class and code."""
    text = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
    if not text or "value" in text.lower() or "content" in text.lower():
        return describe_db_error(error)
    return text


def refusal_message(broker: BrokerAddress, client_id: str, reason) -> str:
    """One line for a CONNACK refusal: what the broker said and what to do about it."""
    where = f"the broker at {broker.host}:{broker.port}"
    code = getattr(reason, "value", None)
    if code == 133:  # 3.1.1 return code 2: identifier rejected
        return f"{where} refused the client id {client_id!r} ({reason}): pick another with --id or --client-id"
    if code in (134, 135, 140):  # bad user name or password / not authorized / bad authentication method
        if not broker.username:
            return (f"{where} refused a login without a username ({reason}): give the worker's account in "
                    f"--broker (mqtt://im-worker@{broker.host}:{broker.port}) and its password in "
                    f"$IM_BROKER_PASSWORD or --password-file")
        if broker.password is None:
            return (f"{where} refused the login as {broker.username!r} ({reason}): no password was given; "
                    f"set $IM_BROKER_PASSWORD or --password-file")
        return (f"{where} refused the login as {broker.username!r} ({reason}): check the account in --broker and "
                f"its password ($IM_BROKER_PASSWORD or --password-file) against the broker's password file")
    return f"{where} refused the connection ({reason})"


def configure_tls(client: mqtt.Client, address: BrokerAddress) -> None:
    """TLS with certificate and host name verification against ``ca_file`` (or the system's CAs)."""
    if not address.tls:
        return
    if address.verify:
        client.tls_set(ca_certs=address.ca_file)
    else:
        import ssl
        client.tls_set(cert_reqs=ssl.CERT_NONE)
        client.tls_insecure_set(True)


def set_nodelay(client: mqtt.Client) -> None:
    """paho leaves Nagle on: QoS 1 round trips then stall on delayed ACKs (~33 msg/s measured)."""
    sock = client.socket()
    if sock is not None and hasattr(sock, "setsockopt"):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


class _Client(mqtt.Client):
    """paho's client, with a lighter PUBACK path for MQTT 3.1.1 and coalesced writes.

    Every reply and push the worker publishes at QoS 1 comes back as a PUBACK, and paho 2.2 builds a
    ReasonCode and a Properties object for each, even on 3.1.1 where a PUBACK holds nothing but the
    packet id: about a tenth of the worker's CPU in the bench profile. On 3.1.1 we read the id and
    pass shared empty objects; MQTT 5 keeps paho's own code. (paho is pinned: see requirements.txt.)
    """

    _PUBACK_REASON = mqtt.ReasonCode(PacketTypes.PUBACK)
    _PUBACK_PROPERTIES = Properties(PacketTypes.PUBACK)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._rbuf, self._rpos = b"", 0  # bytes read from the socket, not yet handed to paho

    # paho reads each packet with two or more recv() calls (the command byte, the length bytes one
    # by one, then the rest): 14% of the worker's network thread in the bench profile. This reads
    # the socket in large chunks and hands paho its bytes from them. Bytes left in the chunk are
    # invisible to select(): Worker._readable asks buffered() first, as it asks TLS's pending().
    def _sock_recv(self, bufsize):  # type: ignore[override]
        buf, pos = self._rbuf, self._rpos
        if pos >= len(buf):
            data = super()._sock_recv(RECV_CHUNK)
            if len(data) <= bufsize:
                return data  # all of it (b"": the connection closed)
            self._rbuf, buf, pos = data, data, 0
        end = pos + bufsize
        self._rpos = min(end, len(buf))
        return buf[pos:end]

    def buffered(self) -> bool:
        return self._rpos < len(self._rbuf)

    def reconnect(self):  # type: ignore[override]
        self._rbuf, self._rpos = b"", 0  # nothing of the old connection is read on the new one
        return super().reconnect()

    def _handle_pubackcomp(self, cmd):  # type: ignore[override]
        packet = self._in_packet["packet"]
        if cmd != "PUBACK" or self._protocol != mqtt.MQTTv311 or len(packet) != 2:
            return super()._handle_pubackcomp(cmd)
        mid = (packet[0] << 8) | packet[1]
        with self._out_message_mutex:
            if mid in self._out_messages:
                return self._do_on_publish(mid, self._PUBACK_REASON, self._PUBACK_PROPERTIES)
        return mqtt.MQTT_ERR_SUCCESS

    # paho sends each queued packet with its own send(): a batch's pushes, receipts and PUBACKs
    # were one system call each (11% of the worker's time in the bench profile). The worker queues
    # them all (see Worker.__init__: paho's external-loop hook keeps publish() from writing at once),
    # then this writes the whole queue with one send(). Packets paho must see finish one by one (a
    # QoS 0 PUBLISH, whose on_publish fires when written; a DISCONNECT) take paho's own path.
    def _packet_write(self):  # type: ignore[override]
        out = self._out_packet
        if len(out) < 2 or any((p["command"] & 0xF0) == mqtt.DISCONNECT
                               or ((p["command"] & 0xF0) == mqtt.PUBLISH and p["qos"] == 0) for p in out):
            return super()._packet_write()
        data = b"".join(p["packet"][p["pos"]:] if p["pos"] else p["packet"] for p in out)
        try:
            sent = self._sock_send(data)
        except (AttributeError, ValueError):
            return mqtt.MQTT_ERR_SUCCESS
        except BlockingIOError:
            return mqtt.MQTT_ERR_AGAIN
        except OSError:
            return mqtt.MQTT_ERR_CONN_LOST
        while out and sent > 0:
            p = out[0]
            take = min(sent, p["to_process"])
            p["pos"] += take
            p["to_process"] -= take
            sent -= take
            if p["to_process"] == 0:
                out.popleft()
        with self._msgtime_mutex:
            self._last_msg_out = mqtt.time_func()  # paho's own clock for its keepalive
        return mqtt.MQTT_ERR_AGAIN if out else mqtt.MQTT_ERR_SUCCESS


def _describe(payload) -> str:
    """A published payload by its kind and ids, for DEBUG lines (content and previews left out)."""
    if isinstance(payload, str):
        return payload  # a status word
    kind = payload.get("kind")
    ids = " ".join(f"{k}={payload[k]}" for k in ("seq", "msg_id", "status", "code", "req_id", "total", "cursor")
                   if k in payload)
    if kind == "page":
        ids += f" messages={len(payload.get('messages', ()))} more={payload.get('more')}"
    elif kind == "receipts":
        ids += f" receipts={len(payload.get('receipts', ()))}"
    return f"{kind} {ids}".strip()


_CONNECTED = object()  # inbox marker: a (re)connection, after which retained statuses rebuild presence


@dataclass
class _Batch:
    """Inbound packets on their way: planned, in the store thread's hands (future), then finished."""

    msgs: list
    kinds: dict[str, int]
    plan: core.Plan
    gen: int = 0  # the connection its packets came on (Worker._inbox_gen); PUBACKed only on that one
    future: Future | None = None  # None: waiting to be (re)submitted at retry_at
    started: float = 0.0
    retry_at: float = 0.0
    wait: float = field(default=DB_RETRY_MIN_S)
    went_offline: set = field(default_factory=set)  # uids with an `offline` word in it (push notifications)


class Worker:
    def __init__(self, broker: BrokerAddress, store: Store, *, client_id: str = "im-worker",
                 delivery: core.Delivery | None = None, skip_retained: bool = True,
                 share_group: str | None = None, metrics: Metrics | None = None,
                 clean_session: bool = True, on_fatal: Callable[[str], None] | None = None,
                 push: bool = True, push_options: dict | None = None):
        """``skip_retained``: beside a broker that lets users retain on send/ack/req topics, the
        broker replays that retained payload on every (re)subscribe, flagged retain=1 (a live
        delivery never is, MQTT-3.3.1-9): drop those replays. The embedded broker refuses such
        retained publishes itself, and amqtt flags its replay of queued messages retain=1, so
        `serve` passes False.

        ``clean_session``: True (the default) leaves the broker nothing of this worker once it is gone;
        False keeps a persistent session under ``client_id`` (see the module docstring).
        ``on_fatal(message)``: if given, a login the broker refuses before the worker ever connected stops
        the worker and is handed to it (one line saying what to do) instead of being retried.

        ``push``: own a :class:`backend.push.PushNotifier` (started and stopped with the worker) that notifies
        devices with a push endpoint when something waits for their user and none of its devices is online;
        ``push_options``: its keyword arguments (allowed_hosts, request_timeout...). See _plan_push."""
        self.broker = broker
        self.store = store
        self.core = delivery or core.Delivery()
        self.client_id = client_id
        self.skip_retained = skip_retained
        self.subscriptions = worker_subscriptions(share_group)
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
        # Connection generations: _conn_gen counts accepted CONNACKs; _inbox_gen counts the _CONNECTED markers
        # taken from the inbox, so it is the generation of the packets now being planned. A packet id is only
        # meaningful on the connection it came on: with a clean session the broker forgets what was in flight
        # when the connection drops, and the same id may then name a new packet. A batch whose connection is
        # gone is stored and answered but not PUBACKed.
        self._conn_gen = 0
        self._inbox_gen = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.connected = threading.Event()
        self._last_info: mqtt.MQTTMessageInfo | None = None
        self.clean_session = clean_session
        self.client = _Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean_session,
                                  protocol=mqtt.MQTTv311, manual_ack=True)
        if broker.username:
            self.client.username_pw_set(broker.username, broker.password)
        configure_tls(self.client, broker)
        # Our end (a crash, a lost link, a stop) tells the other workers to re-announce (protocol.WORKER_GONE).
        self.client.will_set(protocol.worker_topic(client_id), protocol.WORKER_GONE, qos=1)
        self.client.max_inflight_messages_set(MAX_INFLIGHT)
        # paho's hook for an external event loop: with it set, publish() and ack() only queue their
        # packet and _network writes the queue in one go (_Client._packet_write). Nothing to register.
        self.client.on_socket_register_write = lambda client, userdata, sock: None
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        # Push notifications: lookups (endpoints and per-device waiting counts) run on the store thread after a
        # batch, and their results are handed to the notifier from this thread (which knows who is online).
        self.push = PushNotifier(metrics=self.metrics, on_gone=self._push_gone, **(push_options or {})) \
            if push else None
        self._push_lookups: list[Future] = []
        self._gone: list[tuple[str, str, str]] = []  # endpoints a gateway called gone, from the im-push thread
        self._push_any = False  # some device has an endpoint (as of _push_any_until - PUSH_ANY_RECHECK_S)
        self._push_any_until = 0.0  # monotonic time of the next check; 0: check at the next look-up

    # -- paho callbacks (inside loop_read, on the network thread: hand over only) ---
    def _on_connect(self, client, userdata, flags, reason_code, properties):
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
        self._ever_connected = self._session_up = True
        self._unreachable_logged = False
        self._connected_at = time.monotonic()
        self._conn_gen += 1
        # The marker goes first so presence is reset before the retained statuses arrive.
        self._inbox.append(_CONNECTED)
        client.subscribe([(t, 1) for t in self.subscriptions])
        self.connected.set()
        self.metrics.connected.set(1)
        log.info("connected to %s:%s as %s", self.broker.host, self.broker.port, self.client_id)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        self.connected.clear()
        self.metrics.connected.set(0)
        if not self._connection_ended():
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
            deadline = self.core.next_deadline()
            timeout = NETWORK_WAIT_S if deadline is None else \
                max(0.0, min(NETWORK_WAIT_S, (deadline - now_ms()) / 1000))
            if self._batch is None and self._inbox:
                timeout = 0.0
            elif self._batch is not None and self._batch.future is None:
                timeout = max(0.0, min(timeout, self._batch.retry_at - time.monotonic()))
            # While the store thread commits a batch, this thread reads what arrives (and writes).
            self._network(timeout)
            if self._batch is not None and self._batch.future is not None and self._batch.future.done():
                done, self._batch = self._batch, None
                self._complete_safely(done)
            self._publish(self.core.flush_receipts(now_ms()))  # batched receipts held long enough
            if self._push_lookups or self._gone:
                self._push_results()
            if self._batch is not None:
                continue  # housekeeping uses the store thread: after the batch
            try:
                self._retransmit()
                if self._purging is None and time.monotonic() >= next_purge:
                    next_purge = time.monotonic() + self._purge_interval()
                    self.metrics.expired.inc(self._db_call(self.store.expire))
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
        while inbox and inbox[0] is _CONNECTED:
            inbox.pop(0)
            self._inbox_gen += 1
            self.core.reset_presence()
        n = 0
        while n < len(inbox) and n < BATCH_MAX and inbox[n] is not _CONNECTED:
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
        kinds: dict[str, int] = {}  # packets per topic kind, for the metrics
        went_offline: set[str] = set()
        came_online: set[str] = set()
        for m in msgs:
            parsed = protocol.parse_topic(m.topic)
            kind = parsed.kind if parsed else "invalid"
            kinds[kind] = kinds.get(kind, 0) + 1
            if parsed is None:
                log.warning("dropped a payload on %r: not a protocol topic with a valid uid", m.topic)
            elif m.retain and self.skip_retained and parsed.kind != "status":
                log.warning("dropped a retained replay on %s (retained sends are not messages)", m.topic)
                continue
            elif parsed.kind == "status" and self.push is not None:
                word = protocol.parse_status(m.payload)
                if word == protocol.ONLINE:
                    self.push.cancel(parsed.uid)  # no notification while a device of the user is online
                    came_online.add(parsed.uid)
                elif word == protocol.OFFLINE and not m.retain:
                    # Maybe a departure; not a retained replay (after this worker's (re)connect): that would
                    # wake every sleeping phone again at each worker restart.
                    went_offline.add(parsed.uid)
            inbound.append((m.topic, m.payload, m.retain))
        if log.isEnabledFor(logging.DEBUG):  # topics and sizes only: payloads hold message content
            for topic, payload, _ in inbound:
                log.debug("in  %s (%d bytes)", topic, len(payload))
        # A departure is a user online before this batch (or during it) whose last device left. An `offline` for
        # a user already offline is none: the worker's own derived status coming back, a repeated will.
        went_offline = {u for u in went_offline if u in came_online or self.core.user_online(u)}
        return _Batch(msgs, kinds, self.core.plan(inbound, now), gen=self._inbox_gen, went_offline=went_offline)

    def _submit(self, batch: "_Batch") -> None:
        batch.started = time.perf_counter()
        batch.future = self._store_thread.submit(self._store_batch, batch.plan.ops)
        batch.future.add_done_callback(self._wake)

    def _store_batch(self, ops: list[core.Operation]) -> list[core.Outcome]:
        """On the store thread: one transaction for the batch; on a data error, one per operation so one
        bad op can't sink the rest. A database that fails (OperationalError...) raises to the caller."""
        try:
            return self.store.apply(ops)
        except (pw.IntegrityError, pw.DataError, pw.ProgrammingError, ValueError):
            return [o for op in ops for o in self._apply_one(op)]

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
        self._push_lookups.append(future)

    def _push_lookup(self, uids: list[str]) -> list[tuple[str, str, str, int, int]]:
        """On the store thread: the devices to notify; no query at all while no device has an endpoint."""
        now = time.monotonic()
        if now >= self._push_any_until:
            self._push_any = self.store.has_push_endpoints()
            self._push_any_until = now + PUSH_ANY_RECHECK_S
        return self.store.push_targets(uids) if self._push_any else []

    def _push_results(self) -> None:
        """Hand finished lookups to the notifier (skipping users who came online meanwhile), and clear the
        endpoints gateways called gone, on the store thread."""
        while self._push_lookups and self._push_lookups[0].done():
            future = self._push_lookups.pop(0)
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
        while self._gone:
            uid, device, endpoint = self._gone.pop(0)
            future = self._store_thread.submit(self.store.drop_push_endpoint, uid, device, endpoint)
            future.add_done_callback(self._gone_dropped)

    def _push_gone(self, uid: str, device: str, endpoint: str) -> None:
        """The notifier's on_gone (on the im-push thread): hand over only; the store thread clears it."""
        self._gone.append((uid, device, endpoint))  # list.append is atomic; drained by the network thread
        self._wake(None)

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
                log.debug("out %s %s", a.topic, _describe(a.payload))
        for a in actions:
            if isinstance(a.payload, str):  # a status word (the derived user status), sent as is
                self._last_info = self.client.publish(a.topic, a.payload.encode(), qos=a.qos, retain=a.retain)
                continue
            kind = a.payload.get("kind")
            if kind == "error":
                self.metrics.errors.labels(a.payload.get("code", "unknown")).inc()
            if kind == "msg":
                self._crash("before_push")
            self._last_info = self.client.publish(a.topic, protocol.encode(a.payload), qos=a.qos, retain=a.retain)
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
