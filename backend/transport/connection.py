"""The worker's MQTT connection pieces: broker addresses (one node or a cluster's), the refusal
line, TLS, TCP_NODELAY, and ``_Client``, paho's client with a lighter PUBACK path, chunked reads and
coalesced writes (the worker drives its socket itself: backend/transport/worker.py)."""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass
from urllib.parse import quote, unquote, urlparse

import paho.mqtt.client as mqtt
from paho.mqtt._packet import decode_publish
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

# Bytes asked of the socket per recv(): 64 KiB holds hundreds of chat packets (a push is ~250 bytes)
# and is the size of Linux's default TCP receive window; a larger packet is read across several chunks.
RECV_CHUNK = 64 * 1024

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
    try:
        port = u.port
    except ValueError:  # urllib's own words ("Port could not be cast to integer value as 'abc'") name no URL
        raise ValueError(f"the port in broker URL {url!r} is not a port number (1-65535)") from None
    return BrokerAddress(host=u.hostname or "127.0.0.1", port=port or (8883 if tls else 1883),
                         username=unquote(u.username) if u.username else None,
                         password=unquote(u.password) if u.password else password, tls=tls, ca_file=ca_file)


def parse_broker_urls(text: str, password: str | None = None, ca_file: str | None = None) -> list[BrokerAddress]:
    """One broker address or several, comma-separated (the nodes of one cluster):
    ``mqtt://im-worker@n1:1883,n2:1883,mqtt://n3:1884``. An entry without a scheme takes the first entry's
    scheme and username. Raises ValueError for an empty list or a bad entry."""
    entries = [e.strip() for e in text.split(",") if e.strip()]
    if not entries:
        raise ValueError("no broker address given")
    first = parse_broker_url(entries[0], password, ca_file)
    out = [first]
    for e in entries[1:]:
        if "://" not in e:
            scheme = "mqtts" if first.tls else "mqtt"
            user = f"{quote(first.username, safe='')}@" if first.username and "@" not in e else ""
            e = f"{scheme}://{user}{e}"
        out.append(parse_broker_url(e, password, ca_file))
    return out


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


class _Info(mqtt.MQTTMessageInfo):
    """paho's MQTTMessageInfo, whose ``threading.Condition`` is made only when someone waits on it.

    paho builds a Condition (and its RLock) for every message in and out; nothing in the worker ever
    waits on one, and they were 7-12% of the worker's network thread in the group fan-out profile
    (docs/BENCHMARKS.md, Groups). Same interface: ``is_published``, ``wait_for_publish`` (from any
    thread: the waiter makes the Condition, then checks ``_published`` under it; the writer sets
    ``_published`` first, then notifies the Condition if there is one).
    """

    __slots__ = ()
    _make_lock = threading.Lock()  # one Condition per info even when two threads start waiting at once

    def __init__(self, mid: int):  # noqa: D107 - no super().__init__: that is the Condition we skip
        self.mid = mid
        self._published = False
        self._condition = None
        self.rc = mqtt.MQTT_ERR_SUCCESS
        self._iterpos = 0

    def _cond(self) -> threading.Condition:
        with self._make_lock:
            if self._condition is None:
                self._condition = threading.Condition()
            return self._condition

    def _set_as_published(self) -> None:
        self._published = True
        cond = self._condition
        if cond is not None:
            with cond:
                cond.notify_all()

    def wait_for_publish(self, timeout: float | None = None) -> None:
        self._cond()
        super().wait_for_publish(timeout)

    def is_published(self) -> bool:
        if self.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
            raise ValueError("Message is not queued due to ERR_QUEUE_SIZE")
        if self.rc > 0 and self.rc != mqtt.MQTT_ERR_AGAIN:
            raise RuntimeError(f"Message publish failed: {mqtt.error_string(self.rc)}")
        return self._published


def _message(mid: int, topic: bytes, payload: bytes, qos: int, retain: bool, dup: bool) -> mqtt.MQTTMessage:
    """An inbound MQTTMessage as paho's own, with an :class:`_Info` (no Condition)."""
    m = mqtt.MQTTMessage.__new__(mqtt.MQTTMessage)
    m.timestamp = 0.0
    m.state = mqtt.mqtt_ms_invalid
    m.dup, m.mid, m._topic, m.payload, m.qos, m.retain = dup, mid, topic, payload, qos, retain
    m.info = _Info(mid)
    m.properties = None
    return m


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

    # A QoS 0 publish on 3.1.1 (a group's pushes: core/groups.py) is queued here as paho's own packet,
    # without paho's per-message objects; any other publish takes paho's path.
    def publish(self, topic, payload=None, qos=0, retain=False, properties=None):  # type: ignore[override]
        if qos != 0 or properties is not None or self._protocol != mqtt.MQTTv311 or self._sock is None \
                or not isinstance(payload, bytes) or not isinstance(topic, str) or not topic:
            return super().publish(topic, payload, qos, retain, properties)
        t = topic.encode()
        if b"+" in t or b"#" in t or len(t) > 65535 or len(payload) > 268435455:
            return super().publish(topic, payload, qos, retain, properties)  # paho's own errors
        packet = bytearray((mqtt.PUBLISH | bool(retain),))
        self._pack_remaining_length(packet, 2 + len(t) + len(payload))
        packet += len(t).to_bytes(2, "big")
        packet += t
        packet += payload
        info = _Info(self._mid_generate())  # paho numbers QoS 0 publishes too (on_publish names them)
        info.rc = self._packet_queue(mqtt.PUBLISH, packet, info.mid, 0, info)
        return info

    # An inbound PUBLISH at QoS 0 or 1 on 3.1.1, without logging on: paho's message, with an _Info.
    def _handle_publish(self):  # type: ignore[override]
        command = self._in_packet["command"]
        qos = (command & 0x06) >> 1
        if qos == 2 or self._protocol != mqtt.MQTTv311 or self._logger is not None or self.on_log is not None:
            return super()._handle_publish()
        r = decode_publish(command, self._in_packet["packet"], self._protocol)
        message = _message(r.mid, r.topic, r.payload, r.qos, r.retain, r.dup)
        message.timestamp = mqtt.time_func()
        self._handle_on_message(message)
        if qos == 1 and not self._manual_ack:
            return self._send_puback(message.mid)
        return mqtt.MQTT_ERR_SUCCESS

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
    # then this writes the whole queue with one send(). A QoS 0 PUBLISH is published once written (its
    # info says so, as paho's path does); with an on_publish callback set, or a DISCONNECT queued, paho's
    # own path writes them one by one.
    def _packet_write(self):  # type: ignore[override]
        out = self._out_packet
        if len(out) < 2 or self.on_publish is not None \
                or any((p["command"] & 0xF0) == mqtt.DISCONNECT for p in out):
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
                if p["qos"] == 0 and p["info"] is not None and (p["command"] & 0xF0) == mqtt.PUBLISH:
                    p["info"]._set_as_published()
        with self._msgtime_mutex:
            self._last_msg_out = mqtt.time_func()  # paho's own clock for its keepalive
        return mqtt.MQTT_ERR_AGAIN if out else mqtt.MQTT_ERR_SUCCESS
