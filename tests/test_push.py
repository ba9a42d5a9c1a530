"""Push notifications (backend/push.py) against a real HTTP server on a free loopback port playing the gateway."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from backend.metrics import Metrics
from backend.push import Notification, PushNotifier, parse_retry_after, valid_endpoint
from conftest import eventually, free_port

TOKEN = "tok-SECRET-123"  # stands for the device token a push URL carries: never in a log line
ALLOWED_FIELDS = {"kind", "v", "uid", "device", "waiting", "newest_seq", "collapse_key"}


class Gateway:
    """A push gateway: records every POST (path, headers, JSON body, monotonic time) and answers from a
    script of statuses (an int, or (status, headers)), then 200. ``hold()`` makes answers wait for
    ``release()``; ``hang=True`` never answers (until close)."""

    def __init__(self, script=(), hang: bool = False) -> None:
        self.script = list(script)
        self.hang = hang
        self.requests: list[dict] = []
        self.cond = threading.Condition()
        self.gate = threading.Event()
        self.gate.set()
        self.closing = threading.Event()
        gateway = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with gateway.cond:
                    gateway.requests.append({"path": self.path, "headers": dict(self.headers),
                                             "body": json.loads(body), "at": time.monotonic()})
                    item = gateway.script.pop(0) if gateway.script else 200
                    gateway.cond.notify_all()
                if gateway.hang:
                    gateway.closing.wait(30)
                    return
                gateway.gate.wait(30)
                status, headers = item if isinstance(item, tuple) else (item, {})
                answer = b'{"rejected":[]}'
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def endpoint(self, name: str = "dev") -> str:
        return f"{self.url}/push/{name}/{TOKEN}?key={TOKEN}"

    def wait_requests(self, n: int, timeout: float = 10) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: len(self.requests) >= n, timeout)

    def hold(self) -> None:
        self.gate.clear()

    def release(self) -> None:
        self.gate.set()

    def close(self) -> None:
        self.closing.set()
        self.gate.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def gateways():
    made: list[Gateway] = []

    def make(script=(), hang: bool = False) -> Gateway:
        made.append(Gateway(script, hang))
        return made[-1]

    yield make
    for g in made:
        g.close()


@pytest.fixture
def notifiers():
    made: list[PushNotifier] = []

    def make(start: bool = True, **kw) -> PushNotifier:
        kw.setdefault("metrics", Metrics())
        kw.setdefault("initial_backoff", 0.01)
        kw.setdefault("request_timeout", 5)
        n = PushNotifier(**kw)
        made.append(n)
        return n.start() if start else n

    yield make
    for n in made:
        assert n.stop(5), "the notifier's thread did not end"


def count(notifier: PushNotifier, name: str) -> float:
    return notifier.metrics.registry.get_sample_value(f"im_push_{name}_total") or 0.0


def idle(notifier: PushNotifier) -> bool:
    return eventually(lambda: notifier.pending() == 0, timeout=15, interval=0.01)


def note(gw: Gateway, uid="bob", device="phone", waiting=1, seq=1, name=None) -> Notification:
    return Notification(uid, device, gw.endpoint(name or device), waiting, seq)


def test_body_has_exactly_the_allowed_fields_and_no_content_or_sender(gateways, notifiers):
    gw = gateways()
    n = notifiers()
    n.notify(Notification("bob", "phone", gw.endpoint("phone"), waiting=3, newest_seq=42))
    assert gw.wait_requests(1)
    assert idle(n)
    req = gw.requests[0]
    assert req["path"] == f"/push/phone/{TOKEN}?key={TOKEN}"  # the endpoint is POSTed to as given
    assert req["headers"]["Content-Type"] == "application/json"
    assert set(req["body"]) == ALLOWED_FIELDS
    assert req["body"] == {"kind": "im.push", "v": 1, "uid": "bob", "device": "phone", "waiting": 3,
                           "newest_seq": 42, "collapse_key": "im:bob:phone"}
    for private in ("content", "from", "sender", "preview", "body", "endpoint"):
        assert private not in req["body"]
    assert count(n, "sent") == 1 and count(n, "failed") == 0 and count(n, "retries") == 0


def test_500_twice_then_200_arrives_on_the_third_try(gateways, notifiers):
    gw = gateways(script=[500, 502])
    n = notifiers(initial_backoff=0.02, max_attempts=5)
    n.notify(note(gw, waiting=2, seq=7))
    assert gw.wait_requests(3)
    assert idle(n)
    assert len(gw.requests) == 3
    assert all(r["body"]["waiting"] == 2 and r["body"]["newest_seq"] == 7 for r in gw.requests)
    assert gw.requests[2]["at"] - gw.requests[1]["at"] >= 0.02 * 2 * 0.8  # the backoff doubled (jitter <= 20%)
    assert count(n, "sent") == 1 and count(n, "retries") == 2 and count(n, "failed") == 0


@pytest.mark.parametrize("status", [404, 410])
def test_gone_endpoint_is_dropped_and_reported_once(gateways, notifiers, status, caplog):
    caplog.set_level(logging.INFO, logger="backend.push")
    gw = gateways(script=[status])
    calls, threads, called = [], [], threading.Event()

    def on_gone(uid, device, endpoint):
        calls.append((uid, device, endpoint))
        threads.append(threading.current_thread().name)
        called.set()

    n = notifiers(on_gone=on_gone)
    n.notify(note(gw, waiting=5, seq=9))
    assert called.wait(10)
    assert idle(n)  # nothing queued or in flight: no further attempt can come
    assert len(gw.requests) == 1
    assert calls == [("bob", "phone", gw.endpoint("phone"))]
    assert threads == ["im-push"]  # the callback runs on the notifier's thread
    assert count(n, "dropped") == 1 and count(n, "retries") == 0 and count(n, "sent") == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "backend.push"]
    assert any(f"HTTP {status}" in line and "bob/phone" in line and gw.url in line for line in lines), lines
    assert not any(TOKEN in line or "/push/" in line for line in lines), lines


def test_400_fails_without_retry_and_logs_only_the_origin(gateways, notifiers, caplog):
    caplog.set_level(logging.INFO, logger="backend.push")
    gw = gateways(script=[400])
    n = notifiers()
    n.notify(note(gw))
    assert gw.wait_requests(1)
    assert idle(n)
    assert len(gw.requests) == 1
    assert count(n, "failed") == 1 and count(n, "retries") == 0 and count(n, "dropped") == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "backend.push"]
    assert len(lines) == 1, lines
    assert "HTTP 400" in lines[0] and "bob/phone" in lines[0] and gw.url in lines[0]
    assert TOKEN not in lines[0] and "/push/" not in lines[0]


def test_hung_gateway_never_blocks_notify_and_times_out_by_itself(gateways, notifiers, caplog):
    caplog.set_level(logging.INFO, logger="backend.push")
    gw = gateways(hang=True)
    n = notifiers(request_timeout=0.5, max_attempts=1, max_in_flight=4)
    started = time.monotonic()
    n.notify(note(gw, uid="first"))
    assert gw.wait_requests(1)  # the gateway has the POST and will never answer
    t0 = time.perf_counter()
    for i in range(1000):
        n.notify(Notification("h", f"d{i}", gw.endpoint(f"d{i}"), waiting=i, newest_seq=i))
    elapsed = time.perf_counter() - t0
    # A notify() that waited on the hung POST would take its 0.5 s timeout each: 1,000 of them, 500 s. 1 s for all
    # 1,000 is far from that and clear of a busy CI machine (142 ms measured there; 7-11 ms on an idle one).
    assert elapsed < 1.0, f"1,000 notify() calls took {elapsed * 1000:.1f} ms while the gateway hung"
    cancelled = n.cancel("h")
    assert cancelled >= 1000 - 3  # at most 3 more slots could have started meanwhile
    assert eventually(lambda: count(n, "failed") >= 1, timeout=10, interval=0.01)
    assert time.monotonic() - started < 5  # the hung POST ended by itself (request_timeout 0.5 s)
    assert idle(n)
    # The (up to 3) others that had started were cancelled in flight: not retried, not counted as failures.
    assert count(n, "failed") == 1 and count(n, "sent") == 0 and count(n, "retries") == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "backend.push"]
    assert any("first/phone" in line and "timeout" in line and "gave up after 1 attempts" in line
               for line in lines), lines
    # stop() does not wait for a hung POST either.
    n.notify(note(gw, uid="last"))
    assert gw.wait_requests(2 + (1000 - cancelled))
    t0 = time.monotonic()
    assert n.stop(5)
    assert time.monotonic() - t0 < 2


def test_coalescing_while_the_gateway_is_slow(gateways, notifiers):
    gw = gateways()
    gw.hold()
    n = notifiers()
    n.notify(note(gw, waiting=1, seq=101))
    assert gw.wait_requests(1)  # the first is in flight, its answer held
    for i in range(2, 21):
        n.notify(note(gw, waiting=i, seq=100 + i))
    assert n.pending() == 2  # one in flight, one queued for the device, whatever the number of notify()
    gw.release()
    assert idle(n)
    assert len(gw.requests) == 2
    assert gw.requests[1]["body"]["waiting"] == 20 and gw.requests[1]["body"]["newest_seq"] == 120
    assert count(n, "sent") == 2


def test_a_retry_carries_the_newest_counts(gateways, notifiers):
    gw = gateways(script=[503])
    n = notifiers(initial_backoff=0.3)
    n.notify(note(gw, waiting=1, seq=1))
    assert gw.wait_requests(1)
    n.notify(note(gw, waiting=2, seq=2))  # during the first POST or its backoff: replaces what the retry sends
    assert gw.wait_requests(2)
    assert idle(n)
    assert len(gw.requests) == 2
    assert gw.requests[1]["body"]["waiting"] == 2 and gw.requests[1]["body"]["newest_seq"] == 2
    assert count(n, "retries") == 1 and count(n, "sent") == 1


def test_cancel_drops_the_queued_notifications_of_a_user(gateways, notifiers):
    gw = gateways()
    gw.hold()
    n = notifiers(max_in_flight=1)
    n.notify(note(gw, uid="carol", device="phone"))
    assert gw.wait_requests(1)  # the only slot is taken: the rest stay queued
    n.notify(note(gw, uid="alice", device="phone"))
    n.notify(note(gw, uid="alice", device="tablet"))
    n.notify(note(gw, uid="bob", device="phone"))
    n.notify(note(gw, uid="bob", device="laptop"))
    assert n.cancel("alice") == 2
    assert n.cancel("bob", "laptop") == 1
    assert n.cancel("nobody") == 0
    gw.release()
    assert idle(n)
    assert [(r["body"]["uid"], r["body"]["device"]) for r in gw.requests] == [("carol", "phone"), ("bob", "phone")]


def test_a_cancelled_notification_in_flight_is_not_retried(gateways, notifiers):
    gw = gateways(script=[500])
    gw.hold()
    n = notifiers()
    n.notify(note(gw))
    assert gw.wait_requests(1)
    assert n.cancel("bob") == 0  # in flight: not recalled, but not retried either
    gw.release()
    assert idle(n)
    assert len(gw.requests) == 1
    assert count(n, "retries") == 0 and count(n, "failed") == 0


def test_retry_after_is_honoured_and_bounded(gateways, notifiers):
    honoured = gateways(script=[(429, {"Retry-After": "1"})])
    bounded = gateways(script=[(503, {"Retry-After": "3600"})])
    n = notifiers(initial_backoff=0.01, max_backoff=1.5)
    n.notify(note(honoured, uid="a"))
    n.notify(note(bounded, uid="b"))
    assert honoured.wait_requests(2) and bounded.wait_requests(2)
    assert idle(n)
    assert honoured.requests[1]["at"] - honoured.requests[0]["at"] >= 0.95  # waited the gateway's second
    assert bounded.requests[1]["at"] - bounded.requests[0]["at"] <= 3  # an hour was cut to max_backoff
    assert count(n, "sent") == 2 and count(n, "retries") == 2


def test_unreachable_gateway_gives_up_after_max_attempts(notifiers, caplog):
    caplog.set_level(logging.INFO, logger="backend.push")
    port = free_port()  # nothing listens there: connection refused
    n = notifiers(max_attempts=3)
    n.notify(Notification("bob", "phone", f"http://127.0.0.1:{port}/push/{TOKEN}", 1, 1))
    assert idle(n)
    assert count(n, "failed") == 1 and count(n, "retries") == 2
    lines = [r.getMessage() for r in caplog.records if r.name == "backend.push"]
    assert any("bob/phone" in line and "gave up after 3 attempts" in line for line in lines), lines
    assert not any(TOKEN in line for line in lines)


def test_endpoint_outside_the_allow_list_is_never_posted_to(gateways, notifiers):
    gw = gateways()
    n = notifiers(allowed_hosts={"push.example.com"})
    n.notify(note(gw))
    assert idle(n)
    assert gw.requests == [] and count(n, "failed") == 1


def test_full_queue_drops_the_oldest(gateways, notifiers):
    gw = gateways()
    n = notifiers(start=False, max_queued=3)
    for i in range(5):
        n.notify(note(gw, device=f"d{i}"))
    assert n.pending() == 3 and count(n, "overflow") == 2
    n.start()
    assert gw.wait_requests(3)
    assert idle(n)
    assert sorted(r["body"]["device"] for r in gw.requests) == ["d2", "d3", "d4"]


def test_notify_after_stop_is_ignored(gateways, notifiers):
    gw = gateways()
    n = notifiers()
    assert n.stop(5)
    n.notify(note(gw))  # the worker shutting down may still call it: no error, nothing sent
    assert n.pending() == 0


@pytest.mark.parametrize("url", [
    "https://push.example.com/_matrix/push/v1/notify",
    "https://push.example.com:8443/p?token=abc",
    "http://127.0.0.1:8080/push",
    "http://127.5.6.7/push",
    "http://localhost:9000/",
    "http://[::1]:9000/push",
    "https://10.1.2.3/push",  # a private gateway is allowed without an allow-list (see valid_endpoint)
    "http://2130706433:8080/push",  # 127.0.0.1 in a legacy form is still loopback
    "https://123.example.com/push",  # a name starting with digits is a name
])
def test_valid_endpoints(url):
    assert valid_endpoint(url) is None


@pytest.mark.parametrize("url, why", [
    (None, "string"),
    ("", "1-512"),
    ("https://push.example.com/" + "a" * 500, "1-512"),
    ("http://push.example.com/push", "https://"),
    ("http://192.168.1.1/push", "https://"),
    ("ftp://push.example.com/x", "https://"),
    ("push.example.com/x", "https://"),
    ("https://user:pw@push.example.com/x", "user:password"),
    ("http://evil@127.0.0.1/x", "user:password"),
    ("https:///path-only", "host"),
    ("https://push.example.com:99999/", "valid URL"),
    ("https://push.example.com/a b", "whitespace"),
    ("https://push.example.com/\n", "whitespace"),
    ("https://169.254.169.254/latest/meta-data", "link-local"),
    ("https://[fe80::1]/x", "link-local"),
    ("https://0.0.0.0/x", "link-local"),
    ("https://224.0.0.1/x", "multicast"),
    ("https://2852039166/latest/meta-data", "link-local"),  # 169.254.169.254 in the resolver's legacy forms
    ("https://0xa9.0xfe.0xa9.0xfe/x", "link-local"),
    ("https://[::ffff:169.254.169.254]/x", "link-local"),
])
def test_invalid_endpoints(url, why):
    error = valid_endpoint(url)
    assert error is not None and why in error


def test_allow_list():
    allowed = {"push.example.com"}
    assert valid_endpoint("https://push.example.com/x", allowed) is None
    assert valid_endpoint("https://PUSH.example.com/x", allowed) is None  # host names are case-insensitive
    assert "not an allowed" in valid_endpoint("https://other.example.com/x", allowed)
    assert "not an allowed" in valid_endpoint("http://127.0.0.1/x", allowed)


def test_parse_retry_after():
    assert parse_retry_after("120") == 120
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412480 - 30) == 30
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412480 + 30) == 0


def test_notification_defaults():
    n = Notification("bob", "phone", "https://push.example.com/x", 2, 5)
    assert n.collapse_key == "im:bob:phone"
    assert Notification("bob", "phone", "https://x", 2, 5, "custom").collapse_key == "custom"
    with pytest.raises(Exception):
        n.waiting = 3  # frozen



def test_no_log_line_of_any_logger_holds_the_endpoint_path(gateways, notifiers, caplog):
    """httpx logs every request's full URL at INFO ("HTTP Request: POST http://.../TOKEN"): the path of a push
    URL often is the device's token, so no logger (ours, httpx's, httpcore's) may print it at any level."""
    caplog.set_level(logging.DEBUG)
    gw = gateways(script=[500, 404])
    n = notifiers()
    n.notify(note(gw))
    assert gw.wait_requests(2)
    assert idle(n)
    assert caplog.records  # ours at least: the retry and the drop
    leaks = [f"{r.name}: {r.getMessage()}" for r in caplog.records if TOKEN in r.getMessage()]
    assert leaks == []


def test_a_hung_gateway_does_not_delay_another_devices_notification(gateways, notifiers):
    hung, healthy = gateways(hang=True), gateways()
    n = notifiers(request_timeout=5)
    n.notify(note(hung, uid="alice"))
    assert hung.wait_requests(1)
    t0 = time.monotonic()
    n.notify(note(healthy, uid="bob"))
    assert healthy.wait_requests(1)
    assert time.monotonic() - t0 < 2  # not after alice's 5 s timeout
    assert eventually(lambda: count(n, "sent") == 1, timeout=5, interval=0.01)


def test_a_trickling_gateway_is_cut_off_by_the_whole_request_timeout(notifiers):
    """httpx's timeouts bound each read; a gateway sending a byte every 0.1 s would never trip a 0.5 s one.
    The notifier bounds the whole POST."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    stop = threading.Event()

    def trickle() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(65536)
            for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX-Slow: " + b"a" * 200:
                if stop.wait(0.1):
                    return
                try:
                    conn.sendall(bytes([byte]))
                except OSError:
                    return

    t = threading.Thread(target=trickle, daemon=True)
    t.start()
    try:
        n = notifiers(request_timeout=0.5, max_attempts=1)
        t0 = time.monotonic()
        n.notify(Notification("bob", "phone", f"http://127.0.0.1:{port}/push", 1, 1))
        assert idle(n)
        assert time.monotonic() - t0 < 3
        assert count(n, "failed") == 1 and count(n, "sent") == 0
    finally:
        stop.set()
        server.close()
        t.join(5)


def test_redirects_are_not_followed(gateways, notifiers):
    elsewhere = gateways()
    gw = gateways(script=[(307, {"Location": elsewhere.endpoint()})])
    n = notifiers()
    n.notify(note(gw))
    assert gw.wait_requests(1)
    assert idle(n)
    assert elsewhere.requests == [] and count(n, "failed") == 1 and count(n, "retries") == 0


def test_a_failing_on_gone_callback_does_not_stop_the_notifier(gateways, notifiers, caplog):
    gw = gateways(script=[410])

    def on_gone(uid, device, endpoint):
        raise RuntimeError(f"store down while clearing {endpoint}")

    n = notifiers(on_gone=on_gone)
    n.notify(note(gw, device="old"))
    assert idle(n)
    n.notify(note(gw, device="new"))
    assert gw.wait_requests(2)
    assert idle(n)
    assert count(n, "dropped") == 1 and count(n, "sent") == 1
    lines = [r.getMessage() for r in caplog.records if r.name == "backend.push"]
    assert any("on_gone callback raised RuntimeError" in line for line in lines), lines
    assert not any(TOKEN in line for line in lines)
