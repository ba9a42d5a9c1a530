"""`python -m backend doctor` and the worker's start-up rights check, against a private Mosquitto started open
(anonymous allowed, no password file, no ACL: what Mosquitto's defaults give) and one started with broker_config/."""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request

import paho.mqtt.client as mqtt

from conftest import free_port, run_cli
from services import WORKER_PASSWORD, WORKER_USER, WorkerProcess, mosquitto, require, session_present

# The whole doctor run is bounded: its slowest probe waits for Mosquitto's keepalive timer (about 6 s).
DOCTOR_MAX_S = 20


def _open_mosquitto():
    from scripts.mosquitto import find_mosquitto, start_mosquitto
    require(find_mosquitto() is not None, "mosquitto binary not installed")
    return start_mosquitto({}, open_=True)


def _verdicts(stdout: str) -> dict[str, str]:
    out = {}
    for line in stdout.splitlines():
        level, _, rest = line.partition(" ")
        check = rest.strip().split(":")[0]
        if level in ("ok", "WARN", "FAIL", "--"):
            out[check] = level
    return out


def _nothing_left(port: int) -> list[str]:
    """Retained messages anywhere on the broker (an open one lets an anonymous client look at '#')."""
    got: list[str] = []
    subscribed = threading.Event()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="look", clean_session=True)
    c.on_message = lambda cl, u, m: got.append(m.topic) if m.retain else None
    c.on_subscribe = lambda *a: subscribed.set()
    c.on_connect = lambda cl, *a: cl.subscribe("#", qos=1)
    c.connect("127.0.0.1", port)
    c.loop_start()
    assert subscribed.wait(10)
    time.sleep(0.5)  # retained messages are sent right after the SUBACK; this is the window to see one arrive
    c.disconnect()
    c.loop_stop()
    return got


def test_doctor_fails_an_open_broker_and_leaves_nothing():
    broker = _open_mosquitto()
    try:
        start = time.monotonic()
        r = run_cli("doctor", "--broker", f"mqtt://127.0.0.1:{broker.port}", timeout=60)
        took = time.monotonic() - start
        v = _verdicts(r.stdout)
        assert r.returncode == 1, r.stdout + r.stderr
        assert v["anonymous"] == "FAIL" and v["inbox privacy"] == "FAIL" and v["publish rights"] == "FAIL", r.stdout
        assert "broker_config" in r.stdout and "verdict: FAIL" in r.stdout
        assert v["$share"] == "ok" and v["size"] == "ok" and v["keepalive"] == "ok", r.stdout
        assert took < DOCTOR_MAX_S, took
        assert _nothing_left(broker.port) == []
        # The queue probe's persistent session was removed: its client id gets no session back.
        import re
        queue_ids = set(re.findall(r"as (im-doctor-queue-\w+) \(p2, c0", broker.log_tail(400)))
        assert len(queue_ids) == 1, broker.log_tail(400)
        assert not session_present(broker.port, queue_ids.pop())
        assert "Traceback" not in r.stderr
    finally:
        broker.close()


def test_doctor_passes_a_broker_configured_as_broker_config():
    broker = mosquitto({"alice": "alice-pw"})
    try:
        r = run_cli("doctor", "--broker", f"mqtt://{WORKER_USER}@127.0.0.1:{broker.port}", timeout=60,
                    env={"IM_BROKER_PASSWORD": WORKER_PASSWORD})
        v = _verdicts(r.stdout)
        assert r.returncode == 0, r.stdout + r.stderr
        for check in ("connect", "anonymous", "inbox privacy", "publish rights", "$share", "retained", "queue",
                      "size", "keepalive"):
            assert v.get(check) == "ok", (check, r.stdout)
        assert "FAIL" not in r.stdout and r.stdout.rstrip().endswith("verdict: ok")
        # A wrong password: one FAIL line that says so, exit 1.
        bad = run_cli("doctor", "--broker", f"mqtt://{WORKER_USER}@127.0.0.1:{broker.port}", timeout=60,
                      env={"IM_BROKER_PASSWORD": "wrong"})
        assert bad.returncode == 1 and "FAIL connect: " in bad.stdout and "Not authorized" in bad.stdout
    finally:
        broker.close()


def test_doctor_on_nothing_says_where():
    port = free_port()
    r = run_cli("doctor", "--broker", f"mqtt://127.0.0.1:{port}")
    assert r.returncode == 1 and f"FAIL connect: cannot reach 127.0.0.1:{port}" in r.stdout, r.stdout


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _gauge(text: str) -> float | None:
    for line in text.splitlines():
        if line.startswith("im_broker_rights_enforced "):
            return float(line.split()[1])
    return None


def test_worker_warns_beside_an_open_broker(db_url):
    broker = _open_mosquitto()
    port = free_port()
    worker = WorkerProcess(broker.port, db_url, username=None, extra=["--metrics-port", str(port)]).start()
    try:
        assert worker.wait_log("does NOT enforce the per-user rights", 15), "".join(worker.lines)
        line = next(ln for ln in worker.lines if "does NOT enforce" in ln)
        assert " WARNING " in line and "broker_config/" in line and "read every inbox" in line
        status, body = _get(f"http://127.0.0.1:{port}/healthz")
        assert status == 200 and "does NOT enforce the per-user rights" in body, body
        assert _gauge(_get(f"http://127.0.0.1:{port}/metrics")[1]) == 0
    finally:
        worker.stop()
        broker.close()


def test_worker_is_quiet_beside_a_secure_broker(db_url):
    broker = mosquitto({})
    port = free_port()
    worker = WorkerProcess(broker.port, db_url, extra=["--metrics-port", str(port)]).start()
    try:
        assert worker.wait_log("enforces the per-user rights", 15), "".join(worker.lines)
        assert not any("does NOT enforce" in ln for ln in worker.lines)
        status, body = _get(f"http://127.0.0.1:{port}/healthz")
        assert status == 200 and body == "ok\n", body
        assert _gauge(_get(f"http://127.0.0.1:{port}/metrics")[1]) == 1
    finally:
        worker.stop()
        broker.close()


def test_doctor_help_says_what_it_checks():
    r = run_cli("doctor", "--help")
    assert r.returncode == 0 and "usage: python -m backend doctor" in r.stdout
    assert "$share" in r.stdout and "keepalive" in r.stdout and "$IM_BROKER_PASSWORD" in r.stdout
