"""Prometheus metrics and a health check for the worker (``--metrics-port``).

Counters move as messages flow; ``/metrics`` is the Prometheus text exposition
and ``/healthz`` answers 200 while the worker is connected to its broker and its
last database transaction succeeded, 503 otherwise. Its body says ``ok`` or ``unhealthy``, then one
``warning: ...`` line per configuration problem found at start-up (a broker that does not enforce the per-user
rights): those keep the status 200, since restarting the worker cannot fix them and an orchestrator would only
restart it in a loop.
"""

from __future__ import annotations

import threading
from typing import Callable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.stored = Counter("im_messages_stored", "Messages durably stored (stored receipts)", registry=r)
        self.duplicates = Counter("im_messages_duplicate", "Resent (sender, msg_id) answered duplicate", registry=r)
        self.pushed = Counter("im_messages_pushed", "Pushes published to inboxes (first attempts)", registry=r)
        self.retransmitted = Counter("im_messages_retransmitted", "Pushes published again after no ack", registry=r)
        self.acked = Counter("im_messages_acked", "Messages deleted by their receiver's ack", registry=r)
        self.expired = Counter("im_messages_expired", "Messages purged unread after the expiry age", registry=r)
        self.errors = Counter("im_errors", "Error replies sent, by code", ["code"], registry=r)
        self.inbound = Counter("im_inbound_packets", "Packets taken from the broker, by topic kind", ["kind"],
                               registry=r)
        self.partition_skipped = Counter("im_partition_skipped", "send/ack/req packets of uids another partition "
                                         "owns, acknowledged and skipped (worker --partitions)", registry=r)
        # Typing notices (backend/core/signals.py): never stored; no labels (a label would name a user).
        self.typing_relayed = Counter("im_typing_relayed", "Typing notices published to receivers' devices (QoS 0)",
                                      registry=r)
        self.typing_dropped = Counter("im_typing_dropped", "Typing notices dropped by the per-user rate limit",
                                      registry=r)
        self.backlog = Gauge("im_backlog_messages", "Messages waiting in the store (sampled)", registry=r)
        self.connected = Gauge("im_broker_connected", "1 while connected to the broker", registry=r)
        self.rights_enforced = Gauge("im_broker_rights_enforced", "1 if the broker refused the start-up probes of "
                                     "the per-user rights, 0 if it let a client read or write another user's "
                                     "topics, -1 until checked (or not checkable)", registry=r)
        self.rights_enforced.set(-1)
        # Configuration warnings found at start-up, one line each, shown in /healthz's body.
        self.notes: list[str] = []
        # Push notifications (backend/push.py); no labels: a label would name a user or an endpoint.
        self.push_sent = Counter("im_push_sent", "Push notifications accepted (2xx) by a push gateway", registry=r)
        self.push_failed = Counter("im_push_failed", "Push notifications given up after retries or refused "
                                   "(a 4xx other than 404/410)", registry=r)
        self.push_dropped = Counter("im_push_dropped", "Push endpoints dropped: the gateway answered 404 or 410",
                                    registry=r)
        self.push_retries = Counter("im_push_retries", "Push POSTs retried (connection error, timeout, 408, 429, "
                                    "5xx)", registry=r)
        self.push_overflow = Counter("im_push_overflow", "Queued push notifications dropped because the queue "
                                     "was full", registry=r)
        self.store_seconds = Histogram("im_store_batch_seconds", "Time of one batch's store transaction",
                                       buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5),
                                       registry=r)


class _Quiet(WSGIRequestHandler):
    def log_message(self, *args) -> None:  # scrapes every few seconds would flood the log
        pass


def serve_http(metrics: Metrics, healthy: Callable[[], bool], host: str, port: int) -> WSGIServer:
    """Serve /metrics and /healthz on host:port in a daemon thread; returns the server (shutdown() stops it)."""
    prom = make_wsgi_app(metrics.registry)

    def app(environ, start_response):
        if environ.get("PATH_INFO") == "/healthz":
            ok = healthy()
            start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")])
            body = "ok\n" if ok else "unhealthy\n"
            return [(body + "".join(n + "\n" for n in metrics.notes)).encode()]
        return prom(environ, start_response)

    server = make_server(host, port, app, handler_class=_Quiet)
    threading.Thread(target=server.serve_forever, name="im-metrics", daemon=True).start()
    return server
