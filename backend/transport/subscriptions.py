"""The worker's subscriptions: what it subscribes to (send/ack/req through a $share group or plainly, statuses,
the workers' "gone"), the start-up probe that checks a $share subscription really delivers (NATS and RabbitMQ grant
one and deliver nothing), SUBSCRIBEs the broker refused tried again with backoff, and presence restored from the
store's last statuses beside brokers that send no retained messages to wildcards (RabbitMQ). A mixin of
:class:`backend.transport.worker.Worker`, on its network thread."""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass

import paho.mqtt.client as mqtt

from .. import protocol
from .logtext import describe_outage

log = logging.getLogger("backend.worker")

# How long the start-up probe through a $share subscription may take to come back: a QoS 1 round trip through
# a local broker takes milliseconds (Mosquitto: ~1 ms here); NATS and RabbitMQ grant $share and never deliver.
SHARE_PROBE_WAIT_S = 3.0
# A SUBSCRIBE the broker refuses (SUBACK 0x80) is tried again after 1 s, doubling up to 16 s: NATS refuses
# while JetStream is unavailable (a few seconds after a cluster node dies, BROKERS.md); the reconnect bounds.
RESUBSCRIBE_MIN_S, RESUBSCRIBE_MAX_S = 1.0, 16.0
# Presence after a (re)connection, beside brokers that never send retained messages to wildcard subscriptions
# (RabbitMQ): the worker subscribes to the exact status topic of each uid last heard online (the store's
# last_status table), takes the retained words, and unsubscribes this long after the SUBACK: retained messages
# follow the SUBACK at once; 5 s leaves room on a loaded broker.
PRESENCE_RESTORE_S = 5.0
# Exact status filters per SUBSCRIBE packet: 200 filters of ~60 bytes keep a packet near 12 KB.
PRESENCE_FILTERS_PER_PACKET = 200
# The most uids asked about at a (re)connection: the most recently active first; beyond it, users are seen
# online again when they next publish their status (the reference client does at every connect).
PRESENCE_RESTORE_MAX = 100_000


def probe_topic(client_id: str) -> str:
    """im/worker/probe/<client id>: where a worker checks that its $share subscriptions deliver (its own
    topic, so no other worker's shared subscription is in that group; '.' replaced: NATS refuses it in a level)."""
    return f"{protocol.PREFIX}/worker/probe/" + re.sub(r"[/+#. ]", "_", client_id or "-")


def mangled_uid(topic: str) -> str | None:
    """The uid a broker split into levels, if ``topic`` looks like one: RabbitMQ turns '.' into '/', so
    bob.x's im/u/bob.x/send arrives as im/u/bob/x/send. None for anything else."""
    parts = topic.split("/")
    if len(parts) == 6 and parts[3] == "d":
        return None  # a device topic (im/u/{uid}/d/{dev}/send), not a split uid
    if len(parts) > 4 and parts[:2] == [protocol.PREFIX, "u"] and parts[-1] in protocol.CLIENT_TOPICS:
        return ".".join(parts[2:-1])
    return None


# Five-level send/ack/req topics are never protocol topics: beside RabbitMQ (which turns '.' into '/') they are
# a uid with one '.' split in two (bob.x's im/u/bob.x/send arrives as im/u/bob/x/send, and reaches no
# im/u/+/send subscription). The worker subscribes to them only to say so (mangled_uid), never to store.
SPLIT_UID_FILTERS = tuple(f"{protocol.PREFIX}/u/+/+/{kind}" for kind in protocol.CLIENT_TOPICS)


def worker_subscriptions(share_group: str | None) -> list[str]:
    """send/ack/req through the shared group (if any); statuses and the workers' "gone" signal always plain:
    every worker sees all presence and every other worker's end."""
    prefix = f"$share/{share_group}/" if share_group else ""
    return [prefix + t for t in protocol.WORKER_SUBSCRIPTIONS if "/status/" not in t] + \
        [t for t in protocol.WORKER_SUBSCRIPTIONS if "/status/" in t] + [protocol.WORKER_TOPIC_FILTER]


@dataclass
class _StoredStatus:
    """A status topic's last word from the store, taken in like a retained replay (qos 0: nothing to PUBACK)."""
    topic: str
    payload: bytes = b"online"
    qos: int = 0
    retain: bool = True
    mid: int = 0


class SubscriptionsMixin:
    """The subscription half of Worker (``self.client``, ``self._pending_subs``, ``self._probe_deadline``...)."""

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        if mid in self._restore_mids:
            n = self._restore_mids.pop(mid)
            refused = sum(1 for rc in reason_codes if rc.is_failure)
            if not self._restore_mids:
                self._restore_until = time.monotonic() + PRESENCE_RESTORE_S
            log.info("presence: asked the broker for the retained word of %d status topics last heard online%s",
                     n, f" ({refused} refused: check the worker's read right on im/status/+)" if refused else "")
            return
        filters = self._pending_subs.pop(mid, [])
        refused = [(f, rc) for f, rc in zip(filters, reason_codes) if rc.is_failure]
        traffic = [f for f in filters if f.endswith("/send") and f not in SPLIT_UID_FILTERS]
        if traffic and not any(f.endswith("/send") for f, _ in refused):
            # The line tests and operators wait for: from here on, sends reach this worker.
            log.info("subscribed to send/ack/req %s", "through the shared group " + repr(self.share_group)
                     if traffic[0].startswith("$share/") else "plainly" if self.partition is None else
                     f"plainly, keeping {self.partition} (the uids u with crc32(u) % {self.partition.count} == "
                     f"{self.partition.index}; the others' packets are skipped)")
        for f, rc in refused:
            if f in SPLIT_UID_FILTERS:
                if not self._mangled_seen:  # once per process: this only loses the naming of split uids
                    self._mangled_seen.add("")
                    log.info("the broker refused %s (%s): a uid it splits into topic levels would not be named in "
                             "the log", f, rc)
            elif f.startswith("$share/") and self._probe_deadline is not None:
                self._probe_refused = str(rc)
                self._settle_probe(False)
            elif not f.startswith("$share/") or self.share_delivers:
                self._refused_subs.append(f)
        if refused and self._refused_subs and not self._resubscribe_at:
            self._resubscribe_at = time.monotonic() + self._resubscribe_wait
            log.warning("the broker refused the subscription to %s (%s); retrying in %.0fs (NATS refuses while "
                        "JetStream is unavailable; otherwise check the worker account's rights, broker_config/)",
                        ", ".join(self._refused_subs), refused[0][1], self._resubscribe_wait)
        elif not refused and filters and not set(filters) & set(SPLIT_UID_FILTERS) and self._resubscribe_wait > RESUBSCRIBE_MIN_S and not self._refused_subs:
            log.info("subscribed to %s after the broker's earlier refusal", ", ".join(filters))
            self._resubscribe_wait = RESUBSCRIBE_MIN_S

    def _restore(self, topics: list[str]) -> None:
        filters = [t for t in topics if (getattr(protocol.parse_topic(t), "kind", None) == "status")]
        self._restore_filters, self._restore_until = filters, 0.0
        for i in range(0, len(filters), PRESENCE_FILTERS_PER_PACKET):
            chunk = filters[i:i + PRESENCE_FILTERS_PER_PACKET]
            rc, mid = self.client.subscribe([(t, 1) for t in chunk])
            if rc == mqtt.MQTT_ERR_SUCCESS:
                self._restore_mids[mid] = len(chunk)

    def _subscribe(self, filters: list[str]) -> None:
        if not filters:
            return
        rc, mid = self.client.subscribe([(t, 1) for t in filters])
        if rc == mqtt.MQTT_ERR_SUCCESS:
            self._pending_subs[mid] = list(filters)

    def _settle_probe(self, delivered: bool) -> None:
        """The $share probe came back (or not): say what that means in one line, then subscribe to
        send/ack/req through the group, or plainly."""
        self._probe_deadline = None
        self.share_delivers = delivered
        self.client.unsubscribe(f"$share/{self.share_group}/{self.probe_topic}")
        self._log_share_verdict(delivered)
        if not delivered:
            self.subscriptions = worker_subscriptions(None)
        self._subscribe([t for t in self.subscriptions if "/status/" not in t and t != protocol.WORKER_TOPIC_FILTER])

    def _log_share_verdict(self, delivered: bool) -> None:
        where = f"{self.broker.host}:{self.broker.port}"
        if delivered:
            log.info("the broker at %s delivers through shared subscriptions: workers in the group %r split "
                     "send/ack/req between them", where, self.share_group)
        else:
            how = (f"refused it ({self._probe_refused})" if self._probe_refused else
                   f"granted it, but a probe sent through it did not arrive within {SHARE_PROBE_WAIT_S:.0f}s")
            log.warning("the broker at %s has no shared subscriptions ($share/%s/...: it %s; NATS and RabbitMQ "
                        "do this): subscribing to send/ack/req plainly instead. One worker is fine; several "
                        "workers beside this broker would each get every payload (the store keeps each message "
                        "once, but all of them do all the work): run one worker here, or split the users between "
                        "workers with --partitions N --partition I", where, self.share_group, how)
            self.metrics.notes.append(f"note: no shared subscriptions at {where}; plain subscriptions in use")

    def _subscription_upkeep(self) -> None:
        """On the network thread, each pass: a probe past its deadline, refused subscriptions due again, the
        presence restore (its store query done: subscribe; its time up: unsubscribe)."""
        now = time.monotonic()
        future = self._presence_future
        if future is not None and future.done():
            self._presence_future = None
            try:
                uids = future.result()
            except Exception as e:  # noqa: BLE001 - presence is rebuilt from live statuses anyway
                log.warning("presence: could not read the last statuses from the store (%s); users are seen "
                            "online again when they next publish their status", describe_outage(e))
                uids = []
            if self._presence_from_store:
                self._presence_from_store = False
                self._inbox[0:0] = [_StoredStatus(t) for t in uids]  # before what the session queued
                log.info("presence: resumed a persistent session: %d status topics last stored online taken as "
                         "online, then the status changes the session queued", len(uids))
            elif self._session_up and uids:
                self._restore(uids)
        if self._restore_filters and self._restore_until and now >= self._restore_until:
            filters, self._restore_filters, self._restore_until = self._restore_filters, [], 0.0
            if self._session_up:
                for i in range(0, len(filters), PRESENCE_FILTERS_PER_PACKET):
                    self.client.unsubscribe(filters[i:i + PRESENCE_FILTERS_PER_PACKET])
        if self._probe_deadline is not None and now >= self._probe_deadline and self._session_up:
            self._settle_probe(False)
        if self._refused_subs and self._resubscribe_at and now >= self._resubscribe_at and self._session_up:
            again, self._refused_subs = self._refused_subs, []
            self._resubscribe_at = 0.0
            self._resubscribe_wait = min(self._resubscribe_wait * 2, RESUBSCRIBE_MAX_S)
            self._subscribe(again)
