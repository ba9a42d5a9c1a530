"""Push notifications for sleeping phones: the sender the worker hands notifications to.

When a message is stored for a user none of whose devices is online, the worker calls
``PushNotifier.notify(Notification(...))`` for each of the user's devices that registered a push
endpoint (the HTTPS URL of its app's push gateway, which talks to FCM or APNs). The notifier
POSTs a small JSON body there (:meth:`Notification.body`): who, which device, how many messages
wait, the newest seq, a collapse key, and never the content or the sender.

Why its own thread running an asyncio loop with one ``httpx.AsyncClient`` (rather than a pool of
threads with ``httpx.Client``):

- delivery never waits for a gateway: ``notify()`` takes a lock, updates a dict and a heap, and at
  most writes one byte to the loop's self-pipe; it never does I/O and never waits for the sender
  (about 10 µs a call, O(log n) in the devices queued);
- a hung gateway costs one coroutine and one socket per request in flight, not one blocked thread
  each, so ``max_in_flight`` can be generous on a 2-core machine;
- ``asyncio.timeout`` bounds a whole request (httpx's timeouts bound each read, so a gateway that
  trickles a byte a second would outlive them), and ``stop()`` cancels requests in flight at once,
  where a thread stuck in a socket read can only be abandoned;
- one client means one connection pool: keep-alive to the (usually single) gateway is shared.

Per (uid, device) at most one notification is queued: a newer one replaces the queued one's counts
(the gateway collapses by ``collapse_key`` anyway). A notification whose device has one in flight
waits behind it and goes once that request ends (with the newest counts). Outcomes:

- 2xx: sent (``im_push_sent_total``);
- connection error, timeout, 408, 429 or 5xx: retried with exponential backoff (honouring a
  ``Retry-After``, bounded by ``max_backoff``) up to ``max_attempts`` tries or ``max_age`` seconds,
  then given up (``im_push_failed_total``); each retry counts ``im_push_retries_total``;
- 404 or 410: the endpoint is gone (the app was uninstalled, the token expired): no further tries,
  ``on_gone(uid, device, endpoint)`` is called so the worker can clear it (``im_push_dropped_total``);
- any other status (other 4xx, 3xx since redirects are not followed): failed, not retried.

Threads: ``notify``, ``cancel``, ``pending`` and ``stop`` may be called from any thread (the worker's
paho network thread included). ``on_gone`` runs on the notifier's own thread (``im-push``), between
requests: it must only hand the endpoint over (put it on a queue the worker drains) and never block.

Log lines name the uid, the device, the HTTP status (or the error's class) and the endpoint's
``scheme://host[:port]`` only: the path and query of a push URL often carry the device's token.
"""

from __future__ import annotations

import asyncio
import heapq
import ipaddress
import itertools
import json
import logging
import random
import socket
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Callable, Optional
from urllib.parse import urlsplit

import httpx

log = logging.getLogger("backend.push")

PUSH_KIND = "im.push"
PUSH_VERSION = 1  # the body's "v": fields may be added, never renamed or removed (as for wire protocol v1)

# Defaults; each is a constructor parameter.
ENDPOINT_MAX = 512  # FCM/APNs gateway URLs with a token are ~200 characters; Web Push endpoints stay under 500
REQUEST_TIMEOUT_S = 5.0  # a gateway answers in well under a second; 5 s is Sygnal's and most SDKs' order of magnitude
INITIAL_BACKOFF_S = 1.0  # first retry soon: most failures are one dropped connection
MAX_BACKOFF_S = 60.0  # doubling stops here (and a Retry-After is cut to it): a minute late is still useful
MAX_ATTEMPTS = 6  # 1+2+4+8+16 s of waits: rides out a gateway restart without hammering a dead one
MAX_AGE_S = 300.0  # a notification older than 5 minutes is stale; the next stored message makes a fresh one
MAX_QUEUED = 10_000  # distinct devices waiting; ~300 bytes each, so ~3 MB at most before the oldest is dropped
MAX_IN_FLIGHT = 32  # concurrent POSTs (and sockets): plenty for one gateway, bounded against a hung one
JITTER = 0.2  # each backoff is shortened by up to 20% so devices failed together do not retry in lockstep
BODY_READ_MAX = 65_536  # a gateway's answer is read (to keep the connection alive) up to this, then dropped
RETRYABLE = frozenset({408, 429})  # plus every 5xx

_LOOPBACK_NAMES = frozenset({"localhost", "localhost.", "ip6-localhost"})


@dataclass(frozen=True)
class Notification:
    """One device's "something waits for you". ``waiting``: messages waiting for that device;
    ``newest_seq``: the newest of them; ``collapse_key`` defaults to ``im:{uid}:{device}``."""

    uid: str
    device: str
    endpoint: str
    waiting: int
    newest_seq: int
    collapse_key: str = ""

    def __post_init__(self) -> None:
        if not self.collapse_key:
            object.__setattr__(self, "collapse_key", f"im:{self.uid}:{self.device}")

    def body(self) -> dict:
        """The POSTed JSON object. Deliberately no content and no sender, ever: a push travels through
        Google's or Apple's servers, so like Signal (an empty "wake up and fetch") and Matrix's
        ``event_id_only`` format it carries only what tells the app to sync. The endpoint is not repeated."""
        return {"kind": PUSH_KIND, "v": PUSH_VERSION, "uid": self.uid, "device": self.device,
                "waiting": self.waiting, "newest_seq": self.newest_seq, "collapse_key": self.collapse_key}


def _literal_ip(host: str):
    """The address a numeric host stands for, or None for a DNS name. Besides the canonical forms this takes
    the legacy ones the C resolver also accepts (``2852039166``, ``0xa9.0xfe.0xa9.0xfe``, ``169.254.43518``):
    otherwise ``https://2852039166/`` would reach 169.254.169.254 past the checks below. An IPv4-mapped IPv6
    address is judged as its IPv4 address."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        try:
            ip = ipaddress.IPv4Address(socket.inet_aton(host))
        except (OSError, ValueError):
            return None
    mapped = getattr(ip, "ipv4_mapped", None)
    return mapped if mapped is not None else ip


def _is_loopback(host: str) -> bool:
    if host in _LOOPBACK_NAMES:
        return True
    ip = _literal_ip(host)
    return ip is not None and ip.is_loopback


def valid_endpoint(url: object, allowed_hosts: Optional[set[str]] = None) -> Optional[str]:
    """None if ``url`` may be used as a push endpoint, else one line saying why not.

    Rules: a string of at most 512 characters; ``https://`` (``http://`` only to a loopback host,
    127.0.0.0/8, ::1 or localhost, for tests and a gateway on the same machine); a host; no
    ``user:password@``; no whitespace. If ``allowed_hosts`` is given (lower-case host names), the host
    must be one of them.

    SSRF: the server POSTs to a URL a client chose, from inside the operator's network. Without an
    allow-list, link-local (169.254.0.0/16: cloud metadata services, fe80::/10), multicast, unspecified and
    reserved IP literals are refused, and redirects are never followed; but a DNS name may still resolve to
    an internal address, so production deployments should pass ``allowed_hosts`` (e.g. the app's own
    gateway, ``{"push.example.com"}``), which is the real defence.
    """
    if not isinstance(url, str):
        return "push endpoint must be a string"
    if not url or len(url) > ENDPOINT_MAX:
        return f"push endpoint must be 1-{ENDPOINT_MAX} characters"
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
        return "push endpoint must not contain whitespace or control characters"
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError on a bad port
    except ValueError:
        return "push endpoint is not a valid URL"
    scheme = parts.scheme.lower()
    if scheme not in ("https", "http"):
        return "push endpoint must be an https:// URL"
    if "@" in parts.netloc:
        return "push endpoint must not contain user:password@"
    host = (parts.hostname or "").lower()
    if not host:
        return "push endpoint must name a host"
    if port == 0:
        return "push endpoint has a bad port"
    if scheme == "http" and not _is_loopback(host):
        return "push endpoint must be an https:// URL (http:// only to localhost)"
    ip = _literal_ip(host)
    if ip is not None and (ip.is_link_local or ip.is_multicast or ip.is_unspecified
                           or (ip.is_reserved and not ip.is_loopback)):
        return "push endpoint must not be a link-local, multicast or reserved address"
    if allowed_hosts is not None and host not in allowed_hosts:
        return f"push endpoint's host {host} is not an allowed push gateway"
    return None


def origin(url: str) -> str:
    """``scheme://host[:port]`` of a URL, for log lines (its path and query may hold the device's token)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or "?"
        if ":" in host:
            host = f"[{host}]"
        return f"{parts.scheme}://{host}" + (f":{parts.port}" if parts.port else "")
    except ValueError:
        return "(unparsable URL)"


def parse_retry_after(value: Optional[str], now: Optional[float] = None) -> Optional[float]:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP-date), None if absent or invalid."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None or when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class _Entry:
    """A queued or in-flight notification with its retry state."""

    __slots__ = ("n", "attempts", "first_at", "due", "token", "cancelled")

    def __init__(self, n: Notification, now: float) -> None:
        self.n = n
        self.attempts = 0  # POSTs made so far
        self.first_at = now  # for max_age
        self.due = now  # monotonic time before which it is not sent
        self.token = -1  # its live heap item; older heap items for the key are stale
        self.cancelled = False


Key = tuple[str, str]


class PushNotifier:
    """Sends :class:`Notification` s on its own thread; see the module docstring.

    Parameters (all keyword; times in seconds):
      metrics: a ``backend.metrics.Metrics`` whose push counters move, or None.
      on_gone: ``on_gone(uid, device, endpoint)`` after a 404/410; runs on the notifier's thread, must not block.
      on_sent: ``on_sent(notification)`` after a gateway accepted it (2xx); same thread, same rule. The worker
        records the notified seq, so a restart or a presence sweep never notifies the same seq twice.
      allowed_hosts: if a set, endpoints must be on one of these hosts (lower-case); see :func:`valid_endpoint`.
      request_timeout: bound on one whole POST (connect, send, answer).
      initial_backoff, max_backoff, max_attempts, max_age, jitter: the retry schedule.
      max_queued: distinct devices queued; one more drops the oldest queued (counted in im_push_overflow_total;
        retries put back after a failed POST may exceed it by up to max_in_flight).
      max_in_flight: concurrent POSTs.

    Use: ``n = PushNotifier(...).start()``; ``n.notify(...)``; ``n.cancel(uid)``; ``n.stop()``.
    """

    def __init__(self, *, metrics=None, on_gone: Optional[Callable[[str, str, str], None]] = None,
                 on_sent: Optional[Callable[[Notification], None]] = None,
                 allowed_hosts: Optional[set[str]] = None, request_timeout: float = REQUEST_TIMEOUT_S,
                 initial_backoff: float = INITIAL_BACKOFF_S, max_backoff: float = MAX_BACKOFF_S,
                 max_attempts: int = MAX_ATTEMPTS, max_age: float = MAX_AGE_S, max_queued: int = MAX_QUEUED,
                 max_in_flight: int = MAX_IN_FLIGHT, jitter: float = JITTER) -> None:
        if max_attempts < 1 or max_queued < 1 or max_in_flight < 1:
            raise ValueError("max_attempts, max_queued and max_in_flight must be at least 1")
        # httpx logs each request's full URL at INFO, and httpcore its connection details at DEBUG: the path
        # of a push URL is often the device's token. Quiet them unless the operator chose their levels.
        for name in ("httpx", "httpcore"):
            if logging.getLogger(name).level == logging.NOTSET:
                logging.getLogger(name).setLevel(logging.WARNING)
        self.metrics = metrics
        self.on_gone = on_gone
        self.on_sent = on_sent
        self.allowed_hosts = None if allowed_hosts is None else {h.lower() for h in allowed_hosts}
        self.request_timeout = request_timeout
        self.initial_backoff = initial_backoff
        self.max_backoff = max_backoff
        self.max_attempts = max_attempts
        self.max_age = max_age
        self.max_queued = max_queued
        self.max_in_flight = max_in_flight
        self.jitter = jitter
        self._lock = threading.Lock()
        self._queued: OrderedDict[Key, _Entry] = OrderedDict()  # oldest first, for overflow
        self._by_uid: dict[str, set[str]] = {}  # uid -> devices in _queued, for cancel(uid)
        self._inflight: dict[Key, _Entry] = {}  # touched only on the loop thread, read under the lock
        self._heap: list[tuple[float, int, Key]] = []  # (due, token, key) of queued entries not blocked
        self._tokens = itertools.count()
        self._wake_pending = False
        self._stopping = False
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._wake: Optional[asyncio.Event] = None
        self._thread: Optional[threading.Thread] = None
        self._started = threading.Event()
        self._overflow_logged_at = -1e9

    # -- any thread ---------------------------------------------------------------------------------------

    def start(self) -> "PushNotifier":
        """Start the ``im-push`` thread; returns self. Notifications queued before are sent then."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._thread_main, name="im-push", daemon=True)
            self._thread.start()
            self._started.wait(10)
        return self

    def notify(self, n: Notification) -> None:
        """Queue ``n`` for sending, replacing a queued one for the same (uid, device). Never blocks on I/O."""
        key = (n.uid, n.device)
        now = time.monotonic()
        wake = False
        dropped: Optional[_Entry] = None
        with self._lock:
            if self._stopping:
                return
            entry = self._queued.get(key)
            if entry is not None:
                entry.n = n  # newest counts; its place, due time and attempts stay
                return
            entry = _Entry(n, now)
            self._queued[key] = entry
            self._by_uid.setdefault(n.uid, set()).add(n.device)
            if key not in self._inflight:  # else it is pushed when the request in flight ends
                self._push_heap(key, entry)
            if len(self._queued) > self.max_queued:
                old_key, dropped = self._queued.popitem(last=False)
                self._forget_uid(old_key)
            if not self._wake_pending and self._loop is not None:
                self._wake_pending = wake = True
        if dropped is not None:
            self._overflowed(dropped)
        if wake:
            self._call_soon(self._wake_up)

    def cancel(self, uid: str, device: Optional[str] = None) -> int:
        """Drop the queued (not yet sent) notifications of ``uid`` (of one ``device`` if given); returns how
        many. A POST already in flight is not recalled, but it is not retried. Call it when any device of
        the user comes online."""
        with self._lock:
            devices = self._by_uid.get(uid)
            dropped = 0
            if devices:
                for d in ([device] if device is not None else list(devices)):
                    if self._queued.pop((uid, d), None) is not None:
                        dropped += 1
                        devices.discard(d)
                if not devices:
                    del self._by_uid[uid]
            for (u, d), entry in self._inflight.items():
                if u == uid and (device is None or d == device):
                    entry.cancelled = True
            return dropped

    def pending(self) -> int:
        """Notifications queued or in flight. 0 means idle: every POST made so far has been counted, logged
        and (for a gone endpoint) reported to on_gone."""
        with self._lock:
            return len(self._queued) + len(self._inflight)

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop the thread: queued notifications are discarded, requests in flight cancelled. Returns True if
        the thread ended within ``timeout`` seconds."""
        with self._lock:
            self._stopping = True
            self._queued.clear()
            self._by_uid.clear()
            self._heap.clear()
        if self._thread is None:
            return True
        self._call_soon(self._wake_up)
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # -- internals (under the lock) ----------------------------------------------------------------------

    def _push_heap(self, key: Key, entry: _Entry) -> None:
        entry.token = next(self._tokens)
        heapq.heappush(self._heap, (entry.due, entry.token, key))

    def _forget_uid(self, key: Key) -> None:
        devices = self._by_uid.get(key[0])
        if devices is not None:
            devices.discard(key[1])
            if not devices:
                del self._by_uid[key[0]]

    def _take_due(self, now: float, slots: int) -> tuple[list[tuple[Key, _Entry]], Optional[float]]:
        """Entries due by ``now`` (at most ``slots``), moved to in flight; and the delay to the next one."""
        taken = []
        heap = self._heap
        if len(heap) > 2 * len(self._queued) + 64:  # cancelled and overflowed entries left stale items
            heap[:] = [(e.due, e.token, k) for k, e in self._queued.items() if k not in self._inflight]
            heapq.heapify(heap)
        while heap:
            due, token, key = heap[0]
            entry = self._queued.get(key)
            if entry is None or entry.token != token or key in self._inflight:
                heapq.heappop(heap)  # stale, or behind a request in flight (pushed again when it ends)
                continue
            if due > now:
                return taken, due - now
            if len(taken) >= slots:
                return taken, None
            heapq.heappop(heap)
            del self._queued[key]
            self._forget_uid(key)
            self._inflight[key] = entry
            taken.append((key, entry))
        return taken, None

    def _requeue(self, key: Key, entry: _Entry) -> None:
        self._queued[key] = entry
        self._by_uid.setdefault(key[0], set()).add(key[1])
        self._push_heap(key, entry)

    # -- the notifier's thread ---------------------------------------------------------------------------

    def _call_soon(self, fn) -> None:
        loop = self._loop
        if loop is not None:
            try:
                loop.call_soon_threadsafe(fn)
            except RuntimeError:  # the loop has closed: stop() raced with us, nothing left to wake
                pass

    def _wake_up(self) -> None:
        with self._lock:
            self._wake_pending = False
        if self._wake is not None:
            self._wake.set()

    def _thread_main(self) -> None:
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._run(loop))
        except Exception as e:  # noqa: BLE001 - a bug here must not take the worker down; push is best effort
            log.error("push notifier stopped by a bug (%s); notifications are no longer sent", type(e).__name__)
        finally:
            with self._lock:
                self._loop = None
            loop.close()
            self._started.set()

    async def _run(self, loop: asyncio.AbstractEventLoop) -> None:
        self._wake = asyncio.Event()
        limits = httpx.Limits(max_connections=self.max_in_flight, max_keepalive_connections=self.max_in_flight)
        # follow_redirects=False: a redirect could point the POST at an internal address (SSRF).
        client = httpx.AsyncClient(timeout=self.request_timeout, limits=limits, follow_redirects=False,
                                   headers={"User-Agent": f"im-push/{PUSH_VERSION}"})
        tasks: set[asyncio.Task] = set()
        with self._lock:
            self._loop = loop
            has_work = bool(self._queued)
        self._started.set()
        if has_work:
            self._wake.set()
        try:
            while True:
                self._wake.clear()
                with self._lock:
                    if self._stopping:
                        break
                    # Slots from _inflight, not from `tasks`: a task leaves `tasks` only in a done-callback that
                    # runs after this loop has been woken by its _finish.
                    taken, delay = self._take_due(time.monotonic(), self.max_in_flight - len(self._inflight))
                for key, entry in taken:
                    task = loop.create_task(self._send(client, key, entry))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                try:
                    async with asyncio.timeout(delay):
                        await self._wake.wait()
                except TimeoutError:
                    pass
        finally:
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            await client.aclose()

    async def _send(self, client: httpx.AsyncClient, key: Key, entry: _Entry) -> None:
        n = entry.n
        entry.attempts += 1
        status: Optional[int] = None
        retry_after: Optional[float] = None
        reason = ""
        error = valid_endpoint(n.endpoint, self.allowed_hosts)
        if error is None:
            try:
                body = json.dumps(n.body(), separators=(",", ":")).encode()
                async with asyncio.timeout(self.request_timeout):
                    async with client.stream("POST", n.endpoint, content=body,
                                             headers={"Content-Type": "application/json"}) as response:
                        status = response.status_code
                        retry_after = parse_retry_after(response.headers.get("retry-after"))
                        read = 0  # read a short answer so the connection can be reused; never look at it
                        async for chunk in response.aiter_raw():
                            read += len(chunk)
                            if read > BODY_READ_MAX:
                                break
            except asyncio.CancelledError:
                raise
            except (httpx.TransportError, TimeoutError) as e:
                # Only the class: an error's text may quote the URL, whose path can hold the device's token.
                reason = "timeout" if isinstance(e, (TimeoutError, httpx.TimeoutException)) else type(e).__name__
            except Exception as e:  # noqa: BLE001 - anything else from httpx: fail this one, keep the thread
                status, reason = None, f"error {type(e).__name__}"
                self._finish(key, entry, "failed", None, reason)
                return
        else:
            self._finish(key, entry, "failed", None, error)
            return
        if status is not None and 200 <= status < 300:
            self._finish(key, entry, "sent", status)
        elif status in (404, 410):
            self._finish(key, entry, "gone", status)
        elif status is None or status in RETRYABLE or status >= 500:
            self._finish(key, entry, "retry", status, reason or f"HTTP {status}", retry_after)
        else:
            self._finish(key, entry, "failed", status, f"HTTP {status}")

    def _finish(self, key: Key, entry: _Entry, outcome: str, status: Optional[int], reason: str = "",
                retry_after: Optional[float] = None) -> None:
        """Account for one POST's outcome (on the loop thread); requeue a retry or the newer notification."""
        n = entry.n
        now = time.monotonic()
        if outcome == "retry" and entry.cancelled:
            outcome = "cancelled"  # a device came online meanwhile: nothing to retry
        if outcome == "retry":
            delay = min(self.initial_backoff * 2 ** (entry.attempts - 1), self.max_backoff)
            delay *= 1 - self.jitter * random.random()
            if retry_after is not None:
                delay = max(delay, min(retry_after, self.max_backoff))
            if entry.attempts >= self.max_attempts or now + delay - entry.first_at > self.max_age:
                outcome = "failed"
                reason = f"{reason}; gave up after {entry.attempts} attempts"
        # Count, log and report first: once the entry leaves _inflight, pending() may read 0, and by then
        # every effect of the POST must be visible.
        m = self.metrics
        if outcome == "sent":
            if m is not None:
                m.push_sent.inc()
        elif outcome == "retry":
            if m is not None:
                m.push_retries.inc()
            log.debug("push to %s for %s/%s: %s; retrying", origin(n.endpoint), n.uid, n.device, reason)
        elif outcome == "cancelled":
            log.debug("push to %s for %s/%s: %s; not retried, a device came online", origin(n.endpoint), n.uid,
                      n.device, reason)
        elif outcome == "gone":
            if m is not None:
                m.push_dropped.inc()
            log.info("push endpoint %s of %s/%s answered HTTP %s: endpoint dropped", origin(n.endpoint), n.uid,
                     n.device, status)
        else:
            if m is not None:
                m.push_failed.inc()
            log.warning("push to %s for %s/%s failed: %s", origin(n.endpoint), n.uid, n.device, reason)
        callback = self.on_gone if outcome == "gone" else self.on_sent if outcome == "sent" else None
        if callback is not None:
            try:
                callback(n.uid, n.device, n.endpoint) if outcome == "gone" else callback(n)
            except Exception as e:  # noqa: BLE001 - the callback's bug must not stop the notifier
                log.error("push on_%s callback raised %s (its message is not logged)", outcome, type(e).__name__)
        with self._lock:
            del self._inflight[key]
            newer = self._queued.get(key)
            if outcome == "retry":
                if newer is not None:  # the retry carries the newest counts, keeping the schedule
                    newer.attempts, newer.first_at = entry.attempts, entry.first_at
                    newer.due = now + delay
                    self._push_heap(key, newer)
                else:
                    entry.due = now + delay
                    self._requeue(key, entry)
            elif newer is not None:
                if outcome == "gone" and newer.n.endpoint == n.endpoint:
                    del self._queued[key]  # same dead endpoint: nothing to send it to
                    self._forget_uid(key)
                else:
                    self._push_heap(key, newer)
        if self._wake is not None:
            self._wake.set()  # a slot is free, and maybe a retry or a newer notification is queued

    def _overflowed(self, entry: _Entry) -> None:
        if self.metrics is not None:
            self.metrics.push_overflow.inc()
        now = time.monotonic()
        if now - self._overflow_logged_at > 60:  # one line a minute, not one per dropped notification
            self._overflow_logged_at = now
            log.warning("push queue full (%d devices): dropping the oldest queued notifications, %s/%s first; "
                        "is the push gateway slow or down?", self.max_queued, entry.n.uid, entry.n.device)
