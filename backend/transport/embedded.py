"""The embedded MQTT broker (amqtt 0.12) with the project's authentication and topic plugins.

amqtt is used as shipped except where it would break our promises; each
override below names the amqtt 0.12.1 behaviour it corrects:

* authentication runs *before* the session table is touched (amqtt deletes a
  clean session's namesake and takes over a connected client before it looks
  at the password);
* retained messages go to a client only for filters that client itself
  subscribed and is allowed to receive (amqtt sends every retained message
  matching *any* client's subscription on every CONNECT);
* only a user's own status topic may be retained.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from dataclasses import dataclass
from typing import Any

from amqtt.broker import Broker
from amqtt.contexts import Action
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.mqtt.connack import NOT_AUTHORIZED, ConnackPacket
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session
from amqtt.utils import gen_client_id

from .. import accounts, acl, protocol

log = logging.getLogger("backend.broker")

_ACTIONS = {Action.PUBLISH: acl.PUBLISH, Action.SUBSCRIBE: acl.SUBSCRIBE, Action.RECEIVE: acl.RECEIVE}


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
        username, client_id = session.username or "", session.client_id or ""
        if username == accounts.WORKER_USERNAME:
            ok = bool(self.config.worker_password) and hmac.compare_digest(
                _password(session).encode(), self.config.worker_password.encode())
            return ok and client_id.startswith("!")
        if not protocol.valid_uid(username):
            return False
        if not acl.owns_client_id(username, client_id):
            return False  # no user may take over another's session by its client id
        if session.will_flag and session.will_topic != protocol.status_topic(username):
            return False  # a last will is a publish too: only on one's own status
        return await asyncio.to_thread(accounts.authenticate, username, _password(session))


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
    """amqtt's Broker with the three corrections named in the module docstring."""

    async def _initialize_client_session(self, reader: Any, writer: Any, remote_address: str, remote_port: int):
        # amqtt's own version, with the authentication moved in front of the session look-up.
        try:
            handler, session = await BrokerProtocolHandler.init_from_connect(reader, writer, self.plugins_manager)
        except (AMQTTError, NoDataError) as exc:
            raise AMQTTError(exc) from exc
        except MQTTError as exc:
            await writer.close()
            raise MQTTError(exc) from exc

        if not await Broker._authenticate(self, session, None):  # type: ignore[arg-type]
            await ConnackPacket.build(0, NOT_AUTHORIZED).to_stream(writer)
            await writer.close()
            raise MQTTError(f"CONNECT refused: user {session.username!r}, client id {session.client_id!r}")
        session._im_authenticated = True  # type: ignore[attr-defined]

        if session.clean_session:
            if session.client_id:
                await self._delete_session(session.client_id)
            else:
                session.client_id = gen_client_id()
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
        delay = self.config.get("timeout-disconnect-delay", 0)
        if session.keep_alive > 0 and isinstance(delay, int):
            session.keep_alive += delay
        return handler, session

    async def _authenticate(self, session: Session, listener: Any) -> bool:
        # Already checked before the session table was touched (see _initialize_client_session).
        return bool(getattr(session, "_im_authenticated", False))

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
        if owner is None or topic_name != protocol.status_topic(owner):
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
