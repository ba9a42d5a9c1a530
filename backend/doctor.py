"""Checks an MQTT broker for what the IM worker relies on: ``python -m backend doctor`` and the worker's start-up check.

Each check is a short probe with real MQTT clients (paho, MQTT 3.1.1) and gives one verdict: ``ok``, ``WARN``
or ``FAIL`` with what to do. Everything a probe publishes goes to topics no user reads: the inbox of the
account the checks log in with (``im/u/<account>/inbox``: broker_config/acl lets that account read and write
it) or of a random uid ``im-doctor-<hex>`` that no client uses; payloads hold a random nonce, never data.
The queue probe's persistent session is removed again, and its retained probe is cleared.

What a client can see from outside:

* rights: can an anonymous client connect; can a client that is not uid X (anonymous, or the given account)
  read X's inbox, or publish on X's topics (checked on X's status topic, whose unknown words workers ignore);
* ``$share``: is a probe delivered through a shared subscription (NATS and RabbitMQ grant it and deliver
  nothing);
* size: does a payload of ``REPLY_BYTES`` (a full page) get through (``message_size_limit``, ``max_packet_size``);
* queue: how many QoS 1 messages the broker keeps for a disconnected session (``max_queued_messages``);
* keepalive: does the broker close a silent client after 1.5 x its keepalive and publish its will;
* retained messages on wildcard subscriptions (the worker rebuilds presence from ``im/status/+``);
* latency: QoS 1 round trips much slower than a TCP connect point at Nagle's algorithm on the broker's side.
  TCP_NODELAY itself cannot be seen from a client.

Every wait is bounded (``PROBE_WAIT_S`` and the constants below): the whole run takes a few seconds.
"""

from __future__ import annotations

import logging
import secrets
import socket
import statistics
import threading
import time
from dataclasses import dataclass
from typing import Callable

import paho.mqtt.client as mqtt

from . import protocol
from .transport.connection import BrokerAddress, configure_tls, refusal_message, set_nodelay

log = logging.getLogger("backend.doctor")

# How long a probe waits for something that should arrive at once on a healthy broker (a delivery on
# loopback takes well under a millisecond; a WAN round trip tens of ms): also the time a "nothing arrived"
# verdict costs.
PROBE_WAIT_S = 1.0
# Connecting (TCP, TLS, CONNACK): a broker slower than this to answer is as good as unreachable to a user.
CONNECT_WAIT_S = 5.0
# The largest server->client payload (protocol.REPLY_PAYLOAD_MAX once defined: a page is cut to 1 MiB); a
# broker must forward it, so the probe sends that much plus room for the topic and JSON around it.
REPLY_BYTES = getattr(protocol, "REPLY_PAYLOAD_MAX", 1024 * 1024) + 1024
# QoS 1 messages published to a disconnected session: more than Mosquitto's default max_queued_messages (1,000)
# plus its in-flight window (20), so a default broker shows its limit, while staying a fraction of a second.
QUEUE_PROBE = 1100
# Keepalive of the silent client: 1 s, so the broker must drop it after 1.5 s (MQTT-3.1.2-24). Mosquitto 2.0
# looks at keepalives only every 5 s (measured here: dropped 5.7-6.0 s after the last packet), hence the wait;
# the probe runs beside the other checks, so it adds little to the run.
KEEPALIVE_PROBE_S = 1
KEEPALIVE_WAIT_S = 8.0
# Closed-loop QoS 1 round trips timed for the latency check: Nagle stalls each by a delayed ACK (~40 ms), so
# 20 show it within a second; without it they take well under a millisecond each on a LAN.
ROUND_TRIPS = 20
# A median round trip slower than this many TCP connects (plus NAGLE_MARGIN_S) looks like Nagle, not distance.
NAGLE_FACTOR, NAGLE_MARGIN_S = 4, 0.015


@dataclass(frozen=True)
class Verdict:
    check: str
    level: str  # "ok", "WARN" or "FAIL"; "--" for what cannot be checked from a client
    text: str

    def line(self) -> str:
        return f"{self.level:<4} {self.check}: {self.text}"


class _Probe:
    """One paho client on its own network thread, recording what it receives."""

    def __init__(self, address: BrokerAddress, username: str | None, password: str | None, *,
                 client_id: str | None = None, clean: bool = True, keepalive: int = 60,
                 will: tuple[str, bytes] | None = None):
        self.address = address
        self.client_id = client_id or f"im-doctor-{secrets.token_hex(4)}"
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id, clean_session=clean,
                             protocol=mqtt.MQTTv311)
        if username:
            self.c.username_pw_set(username, password)
        configure_tls(self.c, address)
        if will:
            self.c.will_set(will[0], will[1], qos=1)
        self.keepalive = keepalive
        self.received: list[mqtt.MQTTMessage] = []
        self.reason = None  # the CONNACK's reason code
        self.dropped = threading.Event()
        self._connack = threading.Event()
        self._suback = threading.Event()
        self._cond = threading.Condition()
        self.c.on_connect = self._on_connect
        self.c.on_disconnect = lambda *a: (self.dropped.set(), self._connack.set())
        self.c.on_message = self._on_message
        self.c.on_subscribe = lambda *a: self._suback.set()

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        self.reason = reason_code
        if not reason_code.is_failure:
            set_nodelay(client)
        self._connack.set()

    def _on_message(self, client, userdata, msg):
        with self._cond:
            self.received.append(msg)
            self._cond.notify_all()

    def connect(self) -> bool:
        """True once the broker accepted the login; raises OSError when it cannot be reached."""
        self.c.connect(self.address.host, self.address.port, keepalive=self.keepalive)
        self.c.loop_start()
        self._connack.wait(CONNECT_WAIT_S)
        return self.reason is not None and not self.reason.is_failure

    def subscribe(self, *topics: str) -> bool:
        self._suback.clear()
        self.c.subscribe([(t, 1) for t in topics])
        return self._suback.wait(CONNECT_WAIT_S)

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> mqtt.MQTTMessageInfo:
        return self.c.publish(topic, payload, qos=1, retain=retain)

    def got(self, payload: bytes, timeout: float = PROBE_WAIT_S, topic: str | None = None) -> bool:
        test = lambda: any(m.payload == payload and (topic is None or m.topic == topic)  # noqa: E731
                           for m in self.received)
        with self._cond:
            return self._cond.wait_for(test, timeout)

    def count(self, prefix: bytes) -> int:
        with self._cond:
            return sum(m.payload.startswith(prefix) for m in self.received)

    def close(self) -> None:
        try:
            self.c.disconnect()
        finally:
            self.c.loop_stop()

    def go_silent(self) -> None:
        """Stop servicing the socket (no PINGREQ, no DISCONNECT), as a phone that lost its radio."""
        self.c.loop_stop()


def _nonce(tag: str) -> bytes:
    return f"im-doctor-{tag}-{secrets.token_hex(8)}".encode()


def _quiet(fn: Callable[[], object]) -> None:
    try:
        fn()
    except Exception:  # noqa: BLE001 - clean-up of a probe; the verdict is already known
        pass


def _connect(address: BrokerAddress, username: str | None, password: str | None, **kw) -> _Probe | None:
    """A connected probe, or None if the broker refused the login (OSError: unreachable)."""
    probe = _Probe(address, username, password, **kw)
    try:
        if probe.connect():
            return probe
    except OSError:
        _quiet(probe.close)
        raise
    _quiet(probe.close)
    return None


def check_rights(address: BrokerAddress) -> list[Verdict]:
    """anonymous / inbox privacy / foreign publish. Raises OSError if the broker cannot be reached."""
    out: list[Verdict] = []
    account = _connect(address, address.username, address.password) if address.username else None
    anonymous = _connect(address, None, None)
    if anonymous is not None:
        out.append(Verdict("anonymous", "FAIL", "a client without username and password was let in: set "
                           "allow_anonymous false and a password_file (broker_config/mosquitto.conf)"))
    else:
        out.append(Verdict("anonymous", "ok", "a client without a password is refused"))
    readers = [(name, p) for name, p in (("an anonymous client", anonymous),
                                         (f"the account {address.username!r}", account)) if p is not None]
    writer = account or anonymous
    try:
        if not readers or writer is None:
            out.append(Verdict("rights", "WARN", "not checked: no login was accepted"))
            return out
        victim = f"im-doctor-{secrets.token_hex(4)}"  # a uid no client uses
        # The foreign-publish probe goes on the victim's send topic: a topic only uid victim may write, which the
        # worker's account may read (a status topic will not do: the worker's account writes users' derived
        # statuses there). A non-JSON payload, so a worker that gets it answers an error nobody reads.
        inbox, send = protocol.inbox_topic(victim), protocol.send_topic(victim)
        for _, reader in readers:
            reader.subscribe(inbox, send)
        read_probe = _nonce("inbox")
        writer.publish(inbox, read_probe)  # as the worker pushes
        write_probes = {name: _nonce("send") for name, _ in readers}
        for name, reader in readers:  # each client, not uid victim, publishes on victim's send topic
            reader.publish(send, write_probes[name])
        read = [name for name, r in readers if r.got(read_probe)]
        wrote = []
        for name, _ in readers:  # by now whatever the broker let through has arrived: later looks are short
            wait = 0.2 if (read or wrote or name != readers[0][0]) else PROBE_WAIT_S
            if any(r.got(write_probes[name], timeout=wait if i == 0 else 0.05) for i, (_, r) in enumerate(readers)):
                wrote.append(name)
        if read:
            out.append(Verdict("inbox privacy", "FAIL", f"{' and '.join(read)} read the inbox of another uid: "
                               "the broker does not enforce the per-user rights, so anyone reads every inbox; "
                               "use acl_file with broker_config/acl"))
        else:
            out.append(Verdict("inbox privacy", "ok", f"{' and '.join(n for n, _ in readers)} could not read "
                               "another uid's inbox"))
        if wrote:
            out.append(Verdict("publish rights", "FAIL", f"{' and '.join(wrote)} published on another uid's "
                               "send topic: anyone can send as anyone; use acl_file with broker_config/acl"))
        else:
            out.append(Verdict("publish rights", "ok", "publishing on another uid's topics is refused"))
        return out
    finally:
        for p in (account, anonymous):
            if p is not None:
                _quiet(p.close)


def rights_enforced(verdicts: list[Verdict]) -> bool | None:
    """True/False from check_rights' verdicts; None when they could not tell."""
    levels = {v.check: v.level for v in verdicts}
    if "inbox privacy" not in levels:
        return None
    return all(levels.get(k) == "ok" for k in ("inbox privacy", "publish rights"))


def _own_topic(address: BrokerAddress) -> str:
    """A topic the checking account may read and write and no user reads: its own inbox (broker_config/acl's
    ``pattern read im/u/%u/inbox`` and the worker's ``topic write im/u/+/inbox``)."""
    name = address.username if address.username and protocol.valid_uid(address.username) else \
        f"im-doctor-{secrets.token_hex(4)}"
    return protocol.inbox_topic(name)


def check_delivery(address: BrokerAddress) -> list[Verdict]:
    """$share, size, queue, keepalive, retained-on-wildcard and latency checks with the given account."""
    out: list[Verdict] = []
    topic = _own_topic(address)
    user, password = address.username, address.password
    main = _connect(address, user, password)
    if main is None:
        return [Verdict("delivery", "WARN", "not checked: the login was refused")]
    try:
        main.subscribe(topic)
        control = _nonce("plain")
        main.publish(topic, control)
        if not main.got(control):
            return [Verdict("delivery", "WARN", f"not checked: the account cannot read and write {topic} (its "
                            "own inbox topic), which broker_config/acl grants it")]
        out.append(_check_share(main, topic, address))
        out.append(_check_retained(main, topic))
        out.append(_check_latency(main, topic, address))
    finally:
        _quiet(main.close)
    out.append(_check_queue(address, topic))
    out.append(_check_size(address, topic))  # last: a max_packet_size broker closes the connection for it
    out.append(Verdict("tcp_nodelay", "--", "cannot be seen from a client; Mosquitto needs set_tcp_nodelay true "
                       "(broker_config/mosquitto.conf), or QoS 1 round trips stall on delayed ACKs"))
    return out


def _check_share(main: _Probe, topic: str, address: BrokerAddress) -> Verdict:
    member = _connect(address, address.username, address.password)
    if member is None:
        return Verdict("$share", "WARN", "not checked: the login was refused")
    try:
        member.subscribe(f"$share/im-doctor-{secrets.token_hex(3)}/{topic}")
        probe = _nonce("share")
        main.publish(topic, probe)
        ok = member.got(probe)
    finally:
        _quiet(member.close)
    if ok:
        return Verdict("$share", "ok", "shared subscriptions deliver (several workers can split the load)")
    return Verdict("$share", "WARN", "a $share subscription was accepted but delivered nothing (NATS and "
                   "RabbitMQ do this): the worker notices it at start and subscribes plainly; run one worker, "
                   "or several as partitions (worker --partitions N --partition I)")


def _check_retained(main: _Probe, topic: str) -> Verdict:
    probe = _nonce("retained")
    main.publish(topic, probe, retain=True).wait_for_publish(CONNECT_WAIT_S)
    levels = topic.split("/")
    wildcard = "/".join([levels[0], "+", *levels[2:]])  # im/+/<name>/inbox: matches the probe topic only
    try:
        main.subscribe(wildcard)
        with main._cond:
            ok = main._cond.wait_for(lambda: any(m.payload == probe and m.retain for m in main.received),
                                     PROBE_WAIT_S)
    finally:
        _quiet(lambda: main.c.unsubscribe(wildcard))
        _quiet(lambda: main.publish(topic, b"", retain=True).wait_for_publish(CONNECT_WAIT_S))  # clear it
    if ok:
        return Verdict("retained", "ok", "retained messages reach wildcard subscriptions (presence is rebuilt "
                       "from im/status/+)")
    return Verdict("retained", "WARN", "a retained message did not reach a wildcard subscription (RabbitMQ "
                   "does this): the worker rebuilds who is online after a reconnect by asking for each status "
                   "topic it last heard online (docs/PROTOCOL.md, section 10.1)")


def _check_latency(main: _Probe, topic: str, address: BrokerAddress) -> Verdict:
    connects = []
    for _ in range(3):
        start = time.perf_counter()
        try:
            socket.create_connection((address.host, address.port), timeout=CONNECT_WAIT_S).close()
        except OSError:
            continue
        connects.append(time.perf_counter() - start)
    trips = []
    end = time.monotonic() + 2 * PROBE_WAIT_S
    for i in range(ROUND_TRIPS):
        probe = _nonce(f"rtt{i}")
        start = time.perf_counter()
        main.publish(topic, probe)
        if not main.got(probe, timeout=max(0.0, end - time.monotonic())):
            break
        trips.append(time.perf_counter() - start)
    if not trips or not connects:
        return Verdict("latency", "WARN", "QoS 1 round trips did not complete in time")
    median, base = statistics.median(trips), min(connects)
    if len(trips) < ROUND_TRIPS or median > NAGLE_FACTOR * base + NAGLE_MARGIN_S:
        return Verdict("latency", "WARN", f"a QoS 1 round trip takes {median * 1000:.1f} ms against "
                       f"{base * 1000:.1f} ms for a TCP connect: Nagle's algorithm on the broker's sockets? "
                       "(Mosquitto: set_tcp_nodelay true)")
    return Verdict("latency", "ok", f"QoS 1 round trip {median * 1000:.1f} ms (TCP connect {base * 1000:.1f} ms)")


def _check_queue(address: BrokerAddress, topic: str) -> Verdict:
    cid = f"im-doctor-queue-{secrets.token_hex(4)}"
    paused = _connect(address, address.username, address.password, client_id=cid, clean=False)
    publisher = None
    if paused is None:
        return Verdict("queue", "WARN", "not checked: the login was refused")
    try:
        paused.subscribe(topic)
        paused.close()  # a clean DISCONNECT: the session stays and queues
        publisher = _connect(address, address.username, address.password)
        prefix = _nonce("queue") + b"-"
        infos = [publisher.publish(topic, prefix + str(i).encode()) for i in range(QUEUE_PROBE)]
        end = time.monotonic() + 2 * CONNECT_WAIT_S
        for info in infos:
            info.wait_for_publish(max(0.01, end - time.monotonic()))
        resumed = _Probe(address, address.username, address.password, client_id=cid, clean=False)
        resumed.connect()
        # The queue arrives in one burst; wait until it stops growing.
        last, end = -1, time.monotonic() + 2 * CONNECT_WAIT_S
        while time.monotonic() < end:
            n = resumed.count(prefix)
            if n >= QUEUE_PROBE or n == last:
                break
            last = n
            time.sleep(0.2)  # the interval over which "no longer growing" is judged
        n = resumed.count(prefix)
        _quiet(resumed.close)
    finally:
        if publisher is not None:
            _quiet(publisher.close)
        _quiet(lambda: _clear_session(address, cid))
    if n >= QUEUE_PROBE:
        return Verdict("queue", "ok", f"all {QUEUE_PROBE} QoS 1 messages kept for a disconnected session")
    return Verdict("queue", "WARN", f"only {n} of {QUEUE_PROBE} QoS 1 messages kept for a disconnected session "
                   "(Mosquitto's max_queued_messages, default 1000): past it the broker drops pushes to a slow "
                   "receiver and payloads for a busy worker (recovered later by resends and pulls); "
                   "broker_config/mosquitto.conf sets 100000")


def _clear_session(address: BrokerAddress, client_id: str) -> None:
    """Remove a persistent session: one connection with its client id and a clean session."""
    probe = _connect(address, address.username, address.password, client_id=client_id)
    if probe is not None:
        probe.close()


def _check_keepalive(address: BrokerAddress, topic: str) -> Verdict:
    watcher = _connect(address, address.username, address.password)
    if watcher is None:
        return Verdict("keepalive", "WARN", "not checked: the login was refused")
    will = _nonce("will")
    silent = None
    try:
        watcher.subscribe(topic)
        silent = _connect(address, address.username, address.password, keepalive=KEEPALIVE_PROBE_S,
                          will=(topic, will))
        if silent is None:  # the watcher's login was taken: it is the will the broker refused
            return Verdict("keepalive", "WARN", f"not checked: the broker refused a connection with a last will on "
                                                f"{topic} (`serve` takes a user's will on its own status topic only: "
                                                f"check with the worker's account)")
        silent.go_silent()
        ok = watcher.got(will, KEEPALIVE_WAIT_S)
    finally:
        if silent is not None:
            _quiet(lambda: silent.c.socket() and silent.c.socket().close())
        _quiet(watcher.close)
    if ok:
        return Verdict("keepalive", "ok", "a silent client is dropped after 1.5 x its keepalive and its will "
                       "published (a phone that lost its radio goes offline)")
    return Verdict("keepalive", "FAIL", f"a client silent for {KEEPALIVE_WAIT_S}s with keepalive "
                   f"{KEEPALIVE_PROBE_S}s was not dropped, or its will not published: devices that lose their "
                   "network stay 'online' and are pushed to in vain")


def _check_size(address: BrokerAddress, topic: str) -> Verdict:
    probe = _connect(address, address.username, address.password)
    if probe is None:
        return Verdict("size", "WARN", "not checked: the login was refused")
    try:
        probe.subscribe(topic)
        payload = _nonce("size") + b"x" * REPLY_BYTES
        probe.publish(topic, payload)
        with probe._cond:
            ok = probe._cond.wait_for(lambda: probe.dropped.is_set() or any(m.payload == payload
                                                                            for m in probe.received),
                                      3 * PROBE_WAIT_S)
            ok = ok and not probe.dropped.is_set()
    finally:
        _quiet(probe.close)
    if ok:
        return Verdict("size", "ok", f"a payload of {REPLY_BYTES} bytes got through (a full page)")
    return Verdict("size", "FAIL", f"a payload of {REPLY_BYTES} bytes did not get through: replies and pages up "
                   "to 1 MiB must, so set message_size_limit and max_packet_size to at least 2 MiB (or leave "
                   "them unset)")


def run_checks(address: BrokerAddress) -> list[Verdict]:
    """Every check, in order. The first verdict says whether the broker could be reached and logged in to."""
    where = f"{address.host}:{address.port}"
    try:
        probe = _Probe(address, address.username, address.password)
        accepted = probe.connect()
        reason = probe.reason
        _quiet(probe.close)
    except OSError as e:
        return [Verdict("connect", "FAIL", f"cannot reach {where} ({e}): is the broker running there, and is "
                        "--broker right?")]
    if reason is None:
        return [Verdict("connect", "FAIL", f"{where} accepted the TCP connection but sent no CONNACK within "
                        f"{CONNECT_WAIT_S:.0f}s: is it an MQTT port?")]
    who = f"as {address.username!r}" if address.username else "without a username"
    out = [Verdict("connect", "ok", f"logged in to {where} {who}") if accepted else
           Verdict("connect", "FAIL", refusal_message(address, "im-doctor", reason))]
    keepalive: list[Verdict] = []
    waiter = None
    if accepted:  # the slowest probe (the broker's keepalive timer) runs beside the others
        waiter = threading.Thread(target=lambda: keepalive.append(_check_keepalive(address, _own_topic(address))),
                                  name="im-doctor-keepalive", daemon=True)
        waiter.start()
    try:
        out += check_rights(address)
        if accepted:
            out += check_delivery(address)
    except OSError as e:
        out.append(Verdict("connect", "FAIL", f"lost {where} during the checks ({e})"))
    if waiter is not None:
        waiter.join(KEEPALIVE_WAIT_S + 2 * CONNECT_WAIT_S)
        out += keepalive or [Verdict("keepalive", "WARN", "not checked: the probe did not finish")]
    return out


# The line the worker logs when the broker lets users read or write what is not theirs.
RIGHTS_WARNING = ("the broker at {where} does NOT enforce the per-user rights ({details}): any client can read "
                  "every inbox or send as anyone; configure it as broker_config/ says (allow_anonymous false, "
                  "password_file, acl_file with broker_config/acl), then check with python -m backend doctor")


def check_at_start(address: BrokerAddress, metrics, connected: threading.Event, stop: threading.Event) -> None:
    """The worker's start-up check (on its own thread): once connected, probe the rights, set the
    ``im_broker_rights_enforced`` gauge and, if they are not enforced, log one WARNING and note it for /healthz."""
    while not connected.wait(0.5):  # wake up now and then to notice a stop before the first connection
        if stop.is_set():
            return
    where = f"{address.host}:{address.port}"
    try:
        verdicts = check_rights(address)
    except Exception as e:  # noqa: BLE001 - a check must never take the worker down
        log.warning("could not check the broker's per-user rights (%s)", e)
        return
    enforced = rights_enforced(verdicts)
    if enforced is None:
        return
    metrics.rights_enforced.set(1 if enforced else 0)
    if not enforced:
        details = "; ".join(v.text.split(":")[0] for v in verdicts if v.level == "FAIL")
        message = RIGHTS_WARNING.format(where=where, details=details)
        metrics.notes.append("warning: " + message)
        log.warning("%s", message)
    else:
        log.info("the broker at %s enforces the per-user rights (checked with probes)", where)


def main(address: BrokerAddress, out=None) -> int:
    """Print one verdict per line; 1 if any FAIL, else 0."""
    import sys
    out = out or sys.stdout
    failed = False
    for v in run_checks(address):
        print(v.line(), file=out, flush=True)
        failed |= v.level == "FAIL"
    print("verdict: " + ("FAIL: fix the lines above (broker_config/README.md)" if failed else "ok"), file=out)
    return 1 if failed else 0
