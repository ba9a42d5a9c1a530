"""The embedded MQTT broker (amqtt 0.12) with the project's authentication and topic plugins.

amqtt is used as shipped except where it would break our promises; each
override below names the amqtt 0.12.1 behaviour it corrects:

* authentication runs *before* the session table is touched (amqtt deletes a
  clean session's namesake and takes over a connected client before it looks
  at the password);
* retained messages go to a client only for filters that client itself
  subscribed and is allowed to receive (amqtt sends every retained message
  matching *any* client's subscription on every CONNECT);
* only a user's own status topic may be retained;
* sessions are scoped by user: a user's client id ``X`` is kept as ``uid:X``
  (:func:`backend.acl.session_key`), so any client id is accepted (random ones
  included, as mosquitto_sub and paho make up) and no user can reach another's
  session (amqtt keys sessions by the bare client id);
* keepalive is enforced (MQTT 3.1.1 section 3.1.2.10: silent for 1.5 x its keepalive,
  the connection is closed and its will published; amqtt's read-timeout handler does
  nothing), and a connection must send its CONNECT within ``CONNECT_TIMEOUT_S``;
* a CONNECT with a client id already connected closes the existing connection first
  (MQTT-3.1.4-2; amqtt keeps both), publishing the old connection's will before the new
  connection's CONNACK, so the will can never land after the new connection's ``online``;
* a packet whose fixed header announces more than ``MAX_PACKET_BYTES`` closes its
  connection before its body is read (amqtt reads any size whole, in the event loop
  that serves every client);
* a malformed packet, or a PUBLISH amqtt will not serve (a wildcard or ``$`` topic),
  closes its connection with its will (amqtt read on from the middle of the packet, or
  left the connection open and unserved);
* a broadcast walks a snapshot of the subscription table (amqtt iterates the live dict
  across awaits, so a client subscribing or leaving meanwhile raised "dictionary changed
  size during iteration" and the message was dropped for every subscriber), and a
  delivery that fails (a PUBACK that never comes from a black-holed client) is one INFO
  line, not an ERROR traceback per message.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections import deque
from dataclasses import dataclass
from typing import Any

from amqtt.adapters import ReaderAdapter, StreamReaderAdapter, StreamWriterAdapter, WebSocketsReader, WebSocketsWriter
from amqtt.broker import Broker
from amqtt.contexts import Action
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.events import MQTTEvents
from amqtt.mqtt import packet_class
from amqtt.mqtt.connack import NOT_AUTHORIZED, ConnackPacket
from amqtt.mqtt.packet import (CONNACK, CONNECT, DISCONNECT, PINGREQ, PINGRESP, PUBACK, PUBCOMP, PUBLISH, PUBREC,
                               PUBREL, SUBACK, SUBSCRIBE, UNSUBACK, UNSUBSCRIBE, MQTTFixedHeader)
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session
from amqtt.utils import gen_client_id

from .. import accounts, acl, protocol

log = logging.getLogger("backend.broker")

_ACTIONS = {Action.PUBLISH: acl.PUBLISH, Action.SUBSCRIBE: acl.SUBSCRIBE, Action.RECEIVE: acl.RECEIVE}

# Largest MQTT packet (fixed header included) a client may send; a bigger one closes its
# connection. A client's largest legitimate packet is a send of about 400 KB (64 KiB of
# content, JSON-escaped at worst), and the worker's own pages are at most 1 MiB; 2 MiB leaves
# room for both and bounds what one connection makes the broker hold (Mosquitto: max_packet_size).
MAX_PACKET_BYTES = 2 * 1024 * 1024
# A connection that has not sent its whole CONNECT by then is closed. MQTT 3.1.1 section 3.1.4
# lets a server close one that sends none "within a reasonable amount of time"; a real client
# sends it at once (TLS is already set up by then), EMQX waits 15 s (its idle_timeout).
CONNECT_TIMEOUT_S = 10.0
# MQTT 3.1.1 section 3.1.2.10: a client silent for 1.5 times its keepalive is gone.
KEEPALIVE_GRACE = 1.5
# Bodies are read in chunks of this size, so a large packet arriving slowly counts as a live
# client (each chunk is progress) rather than as one read that outlasts the keepalive.
_READ_CHUNK = 64 * 1024
# How long a new CONNECT waits for the connection it takes over to finish closing (its will
# published, its session marked disconnected). After an abort that takes milliseconds; an old
# connection still setting up may first wait out amqtt's 5 s PUBACK timeout.
_TAKEOVER_WAIT_S = 10.0


class _GuardedReader(ReaderAdapter):
    """amqtt's reader for one connection, watched for silence.

    After :meth:`watch` (the keepalive grace, seconds), a read that waits longer than that
    for bytes aborts the connection: the pending read ends as at end of stream, and amqtt's normal path for a dropped connection (publish the will, stop
    the handler) runs. Only time spent *waiting* for the client counts, so a busy broker
    never mistakes its own slowness for a silent client.
    """

    def __init__(self, inner: ReaderAdapter, abort: Any) -> None:
        self._inner, self._abort = inner, abort
        self._loop = asyncio.get_running_loop()
        self._limit: float | None = None
        self._waiting = False
        self._last = self._loop.time()
        self._timer: asyncio.TimerHandle | None = None
        self.who = "?"  # for the log line: "user bob, client id bob:phone"

    async def read(self, n: int = -1) -> bytes:
        if n <= _READ_CHUNK:
            return await self._read(n)
        parts = []
        while n > 0:
            part = await self._read(min(n, _READ_CHUNK))
            if not part:
                break
            parts.append(part)
            n -= len(part)
        return b"".join(parts)

    async def _read(self, n: int) -> bytes:
        self._waiting, self._last = True, self._loop.time()
        try:
            return await self._inner.read(n)
        finally:
            self._waiting, self._last = False, self._loop.time()

    def feed_eof(self) -> None:
        self._inner.feed_eof()

    def watch(self, limit: float) -> None:
        self._limit = limit
        self._last = self._loop.time()
        self._timer = self._loop.call_later(limit, self._check)

    def unwatch(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        assert self._limit is not None
        idle = self._loop.time() - self._last
        if self._waiting and idle >= self._limit:
            self._timer = None
            log.info("closed the connection of %s: nothing received for %.1f s (1.5 x its keepalive)",
                     self.who, idle)
            self.abort()
            return
        self._timer = self._loop.call_later(self._limit - idle if self._waiting else self._limit, self._check)

    def abort(self) -> None:
        """Drop the connection at once: unsent data is discarded (a dead peer would never read it,
        and a graceful close would wait on it for minutes)."""
        self.unwatch()
        self._abort()


_DISPATCH = {CONNACK: "handle_connack", SUBSCRIBE: "handle_subscribe", UNSUBSCRIBE: "handle_unsubscribe",
             SUBACK: "handle_suback", UNSUBACK: "handle_unsuback", PUBACK: "handle_puback", PUBREC: "handle_pubrec",
             PUBREL: "handle_pubrel", PUBCOMP: "handle_pubcomp", PINGREQ: "handle_pingreq",
             PINGRESP: "handle_pingresp", PUBLISH: "handle_publish", DISCONNECT: "handle_disconnect"}


class _IMHandler(BrokerProtocolHandler):
    """amqtt's broker-side protocol handler with its reader loop replaced.

    The loop is amqtt 0.12.1's, except: it checks each packet's size from its fixed header
    before reading the body, it has no read timeout of its own (the _GuardedReader does the
    keepalive), and it closes the connection on a malformed packet or one of a reserved type
    (amqtt went on reading, from the middle of the packet it gave up on).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.closed = asyncio.Event()  # set once the broker is done with this connection
        self._connection_lost = False

    async def start(self) -> None:
        await super().start()
        # amqtt makes its disconnect waiter at the end of start(): a connection lost during start()
        # (aborted while its retried deliveries waited) would leave the broker waiting on it forever.
        if self._connection_lost and self._disconnect_waiter is not None and not self._disconnect_waiter.done():
            self._disconnect_waiter.set_result(None)

    async def handle_connection_closed(self) -> None:
        self._connection_lost = True
        await super().handle_connection_closed()

    async def _reader_loop(self) -> None:
        assert self.session is not None and self._reader_ready is not None and self.reader is not None
        reader = self.reader
        running: deque[asyncio.Task[Any]] = deque()
        while True:
            try:
                self._reader_ready.set()
                while running and running[0].done():
                    running.popleft()
                try:
                    header = await MQTTFixedHeader.from_stream(reader)
                except MQTTError:  # a remaining length over 4 bytes: nothing after it can be framed
                    self._drop("malformed packet header")
                    break
                if header is None:
                    break  # end of stream (or aborted: silent, taken over)
                size = header.bytes_length + header.remaining_length
                if size > MAX_PACKET_BYTES:
                    self._drop(f"it sent a packet of {size} bytes, over the limit of {MAX_PACKET_BYTES} "
                               "(MAX_PACKET_BYTES)")
                    break
                if header.packet_type not in _DISPATCH and header.packet_type != CONNECT:
                    self._drop(f"packet of reserved type {header.packet_type}")
                    break
                try:
                    packet = await packet_class(header).from_stream(reader, fixed_header=header)
                except MQTTError as e:
                    # amqtt raises some of these halfway through a body (a PUBLISH topic with a wildcard),
                    # leaving the rest unread: nothing after it could be framed. MQTT 3.1.1, 4.8: close.
                    self._drop(f"malformed packet ({e})")
                    break
                await self.plugins_manager.fire_event(MQTTEvents.PACKET_RECEIVED, packet=packet, session=self.session)
                if header.packet_type == CONNECT:
                    await self.handle_connect(packet)  # type: ignore[arg-type]  # a second CONNECT: amqtt closes
                else:
                    running.append(asyncio.create_task(getattr(self, _DISPATCH[header.packet_type])(packet)))
            except NoDataError:
                self.logger.debug("No data available")
            except asyncio.CancelledError:
                break
            except Exception as e:  # noqa: BLE001 - as amqtt: the connection ends, the broker goes on
                # Only the type: an exception's text may quote what the client sent.
                self._drop(f"unreadable packet ({type(e).__name__})")
                break
        while running:
            running.popleft().cancel()
        await self.handle_connection_closed()
        self._reader_stopped.set()
        await self.stop()

    def _drop(self, why: str) -> None:
        """Log one line and abort the connection (a client that broke the protocol gets no graceful close:
        it may not be reading, and what it sent after the bad packet is not ours to read)."""
        log.warning("closed the connection of %s: %s", getattr(self.reader, "who", "?"), why)
        if isinstance(self.reader, _GuardedReader):
            self.reader.abort()

    async def stop(self) -> None:
        if isinstance(self.reader, _GuardedReader):
            self.reader.unwatch()
        await super().stop()


def _password(session: Session) -> str:
    pw = session.password
    if isinstance(pw, (bytes, bytearray)):
        return bytes(pw).decode("utf-8", "replace")
    return pw or ""


class AccountAuthPlugin(BaseAuthPlugin):
    """Admits the project's users (scrypt hashes in the user table) and the internal worker credential."""

    @dataclass
    class Config:
        worker_password: str = ""

    async def authenticate(self, *, session: Session) -> bool:
        """True to admit; when False, ``session._im_refusal`` says which rule failed (for the log)."""
        username, client_id = session.username or "", session.client_id or ""
        refusal = None
        if username == accounts.WORKER_USERNAME:
            ok = bool(self.config.worker_password) and hmac.compare_digest(
                _password(session).encode(), self.config.worker_password.encode())
            if not (ok and client_id.startswith("!")):
                refusal = "not the worker's internal credential"
        elif not username:
            refusal = "no username (every client logs in with its uid and password)"
        elif not protocol.valid_uid(username):
            refusal = "the username is not a valid uid"
        elif session.will_flag and not _own_status(username, session.will_topic):
            refusal = (f"its last will is on {session.will_topic!r}; a will may only be on the user's own status "
                       "topic (im/status/{uid}, or a device's im/status/{uid}/{dev})")
        elif not await asyncio.to_thread(accounts.authenticate, username, _password(session)):
            refusal = "unknown user or wrong password"
        session._im_refusal = refusal  # type: ignore[attr-defined]
        return refusal is None


class ProtocolTopicPlugin(BaseTopicPlugin):
    """Enforces the protocol's "who may use it" column (backend.acl.may)."""

    @dataclass
    class Config:
        presence: str = "all"  # "self": users see only their own status

    async def topic_filtering(self, *, session: Session | None = None, topic: str | None = None,
                              action: Action | None = None) -> bool:
        if session is None or topic is None or action not in _ACTIONS:
            return False
        return acl.may(session.username, accounts.WORKER_USERNAME, _ACTIONS[action], topic, self.config.presence)


class IMBroker(Broker):
    """amqtt's Broker with the corrections named in the module docstring."""

    async def stream_connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                               listener_name: str) -> None:
        await self._client_connected(listener_name, _GuardedReader(StreamReaderAdapter(reader), writer.transport.abort),
                                     StreamWriterAdapter(writer))

    async def ws_connected(self, websocket: Any, listener_name: str) -> None:
        await self._client_connected(listener_name, _GuardedReader(WebSocketsReader(websocket),
                                                                   websocket.transport.abort),
                                     WebSocketsWriter(websocket))

    async def _initialize_client_session(self, reader: Any, writer: Any, remote_address: str, remote_port: int):
        # amqtt's own version, with the authentication moved in front of the session look-up,
        # sessions scoped by user, the takeover of a connected client id, and the keepalive.
        try:
            handler, session = await asyncio.wait_for(
                _IMHandler.init_from_connect(reader, writer, self.plugins_manager), CONNECT_TIMEOUT_S)
        except (asyncio.TimeoutError, AMQTTError, NoDataError) as exc:
            if isinstance(reader, _GuardedReader):
                reader.abort()
            if isinstance(exc, asyncio.TimeoutError):
                log.info("closed the connection from %s:%s: no CONNECT within %.0f s",
                         remote_address, remote_port, CONNECT_TIMEOUT_S)
            raise AMQTTError(exc) from exc
        except MQTTError as exc:
            await writer.close()
            raise MQTTError(exc) from exc

        if not await Broker._authenticate(self, session, None):  # type: ignore[arg-type]
            await ConnackPacket.build(0, NOT_AUTHORIZED).to_stream(writer)
            await writer.close()
            raise MQTTError(f"CONNECT refused: user {session.username!r}: "
                            f"{getattr(session, '_im_refusal', None) or 'not authorised'}")
        session._im_authenticated = True  # type: ignore[attr-defined]

        if not session.client_id:
            session.client_id = gen_client_id()  # an empty id with a clean session (amqtt refuses one without)
        if isinstance(reader, _GuardedReader):
            reader.who = f"user {session.username}, client id {session.client_id}"  # as the client knows it
        if session.username != accounts.WORKER_USERNAME:
            session.client_id = acl.session_key(session.username, session.client_id)

        # MQTT-3.1.4-2: the same client id (of the same user) connected already: close that connection
        # first. Looped, because another CONNECT for this id may have registered while we waited; from
        # the last check to the registration in amqtt's _handle_client_session nothing yields.
        while (entry := self._sessions.get(session.client_id)) is not None and entry[0].transitions.is_connected():
            await self._take_over(*entry)

        if session.clean_session:
            await self._delete_session(session.client_id)
            session.parent = 0
        elif session.client_id in self._sessions:
            existing, _ = self._sessions[session.client_id]
            for attr in ("will_flag", "will_message", "will_topic", "will_qos", "will_retain", "keep_alive",
                         "username", "password"):
                setattr(existing, attr, getattr(session, attr))
            existing._im_authenticated = True  # type: ignore[attr-defined]
            session = existing
            session.parent = 1
        else:
            session.parent = 0
        if session.keep_alive > 0 and isinstance(reader, _GuardedReader):
            reader.watch(session.keep_alive * KEEPALIVE_GRACE)
        return handler, session

    async def _take_over(self, old: Session, old_handler: Any) -> None:
        """Close a connected session's connection for a new CONNECT with its client id.

        Its will (if any) is published now, before the new connection gets its CONNACK: MQTT
        3.1.1 publishes a will whenever the server closes a connection for any reason but a
        DISCONNECT, and only a will published before the CONNACK is sure to land before the new
        connection's ``online`` (published later, by the old connection's teardown, it marked a
        live client offline). Mosquitto 2.0.11 does the same for a clean-session takeover, and
        drops the will when the new connection resumes a persistent session; publishing it in
        both cases costs one extra offline/online pair and keeps one rule."""
        log.info("%s connected again: closing its previous connection (MQTT-3.1.4-2)",
                 getattr(getattr(old_handler, "reader", None), "who", old.client_id))
        if old.will_flag:
            old.will_flag = False  # published here, so the teardown below does not publish it again
            await self._broadcast_message(old, old.will_topic, old.will_message, old.will_qos)
            if old.will_retain:
                await self.retain_message(old, old.will_topic, old.will_message, old.will_qos)
        reader = getattr(old_handler, "reader", None)
        if isinstance(reader, _GuardedReader):
            reader.abort()
        else:
            await old_handler.handle_connection_closed()
        closed = getattr(old_handler, "closed", None)
        if closed is not None:
            try:
                await asyncio.wait_for(closed.wait(), _TAKEOVER_WAIT_S)
                return
            except asyncio.TimeoutError:
                pass
        # Not closed in time: stop it by hand, and drop its session, whose object that connection's
        # teardown may still touch (the new connection then starts a fresh one: CONNACK says so).
        log.warning("%s: its previous connection did not close within %.0f s; its session is discarded",
                    getattr(reader, "who", old.client_id), _TAKEOVER_WAIT_S)
        await self._stop_handler(old_handler)
        if old.transitions.is_connected():
            old.transitions.disconnect()
        await self._delete_session(old.client_id)

    async def _handle_client_session(self, reader: Any, writer: Any, client_session: Session, handler: Any,
                                     server: Any, listener_name: str) -> None:
        try:
            await super()._handle_client_session(reader, writer, client_session, handler, server, listener_name)
        finally:
            if (client_session.transitions.is_connected()
                    and self._sessions.get(client_session.client_id, (None, None))[1] is handler):
                # amqtt left its message loop without a disconnect (a PUBLISH on an invalid topic, e.g.
                # `im/#`): the connection would stay open but unserved. Close it as MQTT says, will included.
                if isinstance(reader, _GuardedReader):
                    reader.abort()
                done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
                done.set_result(None)
                try:
                    await self._handle_disconnect(client_session, handler, done)
                except Exception as e:  # noqa: BLE001
                    log.warning("closing %s: %r", client_session.client_id, e)
            if isinstance(reader, _GuardedReader):
                reader.abort()  # nothing outlives its handling (after a clean close, a no-op)
            if isinstance(handler, _IMHandler):
                handler.closed.set()

    async def _authenticate(self, session: Session, listener: Any) -> bool:
        # Already checked before the session table was touched (see _initialize_client_session).
        return bool(getattr(session, "_im_authenticated", False))

    async def _run_broadcast(self, running_tasks: deque) -> None:
        # amqtt 0.12.1's own loop body, over a snapshot of the subscriptions (see the module docstring).
        broadcast = await self._broadcast_queue.get()
        topic = broadcast["topic"]
        for k_filter, subscriptions in list(self._subscriptions.items()):
            if not self._matches(topic, k_filter):
                continue
            for target_session, sub_qos in list(subscriptions):
                qos = broadcast.get("qos", sub_qos)
                if not await self._topic_filtering(target_session, topic=topic, action=Action.RECEIVE):
                    continue
                state = target_session.transitions.state
                if state != "connected":
                    # Kept for an offline persistent session at QoS 1/2 (MQTT 3.1.2.4), as amqtt does.
                    if not target_session.clean_session and qos in (1, 2) and not target_session.is_anonymous:
                        await self._retain_broadcast_message(broadcast, qos, target_session)
                    continue
                handler = self._get_handler(target_session)
                if handler:
                    running_tasks.append(asyncio.ensure_future(
                        self._deliver(handler, target_session, topic, broadcast["data"], qos)))

    @staticmethod
    async def _deliver(handler: Any, session: Session, topic: str, data: bytes, qos: int) -> None:
        try:
            await handler.mqtt_publish(topic, data, qos, retain=False)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - the client's connection is failing; its own handler closes it
            log.info("delivery on %s to client %s failed: %s", topic, session.client_id, type(e).__name__)

    async def _publish_retained_messages_for_subscription(self, subscription: tuple[str, int], session: Session) -> None:
        topic_filter, qos = subscription
        if not any(s.client_id == session.client_id for s, _ in self._subscriptions.get(topic_filter, [])):
            return  # not this client's subscription
        handler = self._get_handler(session)
        if handler is None:
            return
        tasks = []
        for topic, retained in list(self._retained_messages.items()):
            if self._matches(topic, topic_filter) and await self._topic_filtering(session, topic, Action.RECEIVE):
                tasks.append(asyncio.ensure_future(handler.mqtt_publish(
                    retained.topic, retained.data, min(qos, retained.qos or qos), retain=True)))
        if tasks:
            await asyncio.wait(tasks)

    async def retain_message(self, source_session: Session | None, topic_name: str | None,
                             data: bytes | bytearray | None, qos: int | None = None) -> None:
        owner = source_session.username if source_session is not None else None
        # A user retains only its own statuses (its devices' too); the worker only the user status it
        # derives from a user's devices, on im/status/{uid} (docs/PROTOCOL.md, "Devices").
        parsed = protocol.parse_topic(topic_name or "")
        worker = owner == accounts.WORKER_USERNAME and parsed is not None and parsed.kind == "status" \
            and not parsed.device
        if owner is None or not (worker or _own_status(owner, topic_name)):
            log.info("refused a retained publish on %s from %s", topic_name, owner)
            return
        await super().retain_message(source_session, topic_name, data, qos)


@dataclass(frozen=True)
class Listeners:
    """Where the embedded broker listens. TLS needs a certificate (chain) and its key."""

    host: str = "0.0.0.0"
    port: int | None = 1883  # plaintext MQTT; None with --tls-only
    tls_port: int | None = None  # MQTT over TLS (8883 is its IANA port)
    ws_port: int | None = None  # MQTT over WebSocket, over TLS when a certificate is given
    presence: str = "all"  # who may see a user's online/offline status: "all" or "self"
    certfile: str | None = None
    keyfile: str | None = None

    def ports(self) -> list[int]:
        return [p for p in (self.port, self.tls_port, self.ws_port) if p is not None]


def broker_config(listeners: Listeners, worker_password: str) -> dict[str, Any]:
    tls = {"ssl": True, "certfile": listeners.certfile, "keyfile": listeners.keyfile} if listeners.certfile else {}
    conf: dict[str, Any] = {}
    # amqtt insists on a listener named "default" (the others inherit its unset fields).
    if listeners.port is not None:
        conf["default"] = {"type": "tcp", "bind": f"{listeners.host}:{listeners.port}"}
    if listeners.tls_port is not None:
        conf["default" if listeners.port is None else "tls"] = {
            "type": "tcp", "bind": f"{listeners.host}:{listeners.tls_port}", **tls}
    if listeners.ws_port is not None:
        conf["ws"] = {"type": "ws", "bind": f"{listeners.host}:{listeners.ws_port}", **tls}
    return {
        "listeners": conf,
        "plugins": {
            f"{__name__}.AccountAuthPlugin": {"worker_password": worker_password},
            f"{__name__}.ProtocolTopicPlugin": {"presence": listeners.presence},
        },
    }


async def start_broker(listeners: Listeners, worker_password: str) -> IMBroker:
    """Start the embedded broker; must be awaited inside the running event loop."""
    broker = IMBroker(broker_config(listeners, worker_password))
    await broker.start()
    return broker


def _own_status(uid: str, topic: str | None) -> bool:
    """Is ``topic`` the user's own status topic, or one of its devices' (where a will may go)?"""
    parsed = protocol.parse_topic(topic or "")
    return parsed is not None and parsed.kind == "status" and parsed.uid == uid
