"""What the worker says about its connection to the broker, by the text of each line (subprocesses, as a user runs
them): a refused login, an unreachable broker, two workers with one client id, Ctrl-C/SIGTERM. And that message
content never reaches its output, even at DEBUG."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import paho.mqtt.client as mqtt

from backend import protocol as p
from backend.client import IMClient
from conftest import REPO, backend_cmd, free_port
from services import WORKER_PASSWORD, WORKER_USER, PrivateSchema, WorkerProcess, mosquitto

PASSWORDS = {"alice": "alice-pw", "bob": "bob-pw"}


def _run_worker(port: int, db_url: str, user: str | None, password: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("IM_BROKER_PASSWORD", "IM_BROKER_URL")}
    if password is not None:
        env["IM_BROKER_PASSWORD"] = password
    who = f"{user}@" if user else ""
    return subprocess.run(backend_cmd("worker", "--broker", f"mqtt://{who}127.0.0.1:{port}", "--database-url", db_url),
                          cwd=REPO, capture_output=True, text=True, timeout=30, env=env)


def test_a_refused_first_login_ends_the_worker_with_one_line(db_url):
    broker = mosquitto({})
    try:
        cases = {
            "no password": (WORKER_USER, None, "refused the login as 'im-worker' (Not authorized): no password was "
                                               "given; set $IM_BROKER_PASSWORD or --password-file"),
            "wrong password": (WORKER_USER, "wrong", "refused the login as 'im-worker' (Not authorized): check the "
                                                     "account in --broker and its password"),
            "no username": (None, None, "refused a login without a username (Not authorized): give the worker's "
                                        "account in --broker"),
        }
        for case, (user, password, text) in cases.items():
            start = time.monotonic()
            r = _run_worker(broker.port, db_url, user, password)
            errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
            assert r.returncode == 2, (case, r.returncode, r.stderr)
            assert len(errors) == 1 and text in errors[0], (case, r.stderr)
            assert f"127.0.0.1:{broker.port}" in errors[0]
            assert "Traceback" not in r.stderr and "retrying" not in r.stderr, (case, r.stderr)
            assert time.monotonic() - start < 15  # no retry loop
    finally:
        broker.close()


def test_unreachable_broker_says_where_and_what_to_do_and_keeps_trying(db_url):
    port = free_port()  # nothing listens here
    worker = WorkerProcess(port, db_url).start(wait=False)
    try:
        assert worker.wait_log(f"cannot reach the broker at 127.0.0.1:{port}", 15), "".join(worker.lines)
        line = next(ln for ln in worker.lines if "cannot reach" in ln)
        assert "is it running there" in line and "--broker" in line and "retrying in" in line
        assert worker.proc.poll() is None  # it keeps trying
        # The broker comes up on that port: the worker connects by itself.
        from scripts.mosquitto import start_mosquitto
        broker = start_mosquitto({WORKER_USER: WORKER_PASSWORD}, port=port)
        try:
            assert worker.wait_log("backend.worker: connected", 30), "".join(worker.lines)
        finally:
            broker.close()
    finally:
        code = worker.stop()
    out = "".join(worker.lines)
    assert code == 0 and "backend: stopping" in out and "backend: stopped" in out and "Traceback" not in out


def test_sigterm_stops_the_worker_with_stopping_and_stopped(db_url):
    broker = mosquitto({})
    worker = WorkerProcess(broker.port, db_url).start()
    try:
        worker.proc.send_signal(signal.SIGTERM)
        assert worker.proc.wait(15) == 0
        assert worker.wait_log("backend: stopped", 5)
        out = "".join(worker.lines)
        assert out.index("backend: stopping") < out.index("backend: stopped") and "Traceback" not in out
    finally:
        worker.kill()
        broker.close()


def test_two_workers_with_one_id_are_told_what_to_do(db_url, tmp_path):
    broker = mosquitto({})
    db2 = f"sqlite:///{tmp_path}/other.db"
    workers = [WorkerProcess(broker.port, url, client_id="im-worker-same") for url in (db_url, db2)]
    try:
        for w in workers:
            w.start(wait=False)
        text = "another client is probably connected with this worker's client id 'im-worker-same'"
        end = time.monotonic() + 40
        while not any(any(text in ln for ln in w.lines) for w in workers) and time.monotonic() < end:
            workers[0].wait_log(text, 0.5)
        told = [ln for w in workers for ln in w.lines if text in ln]
        assert told, "".join(workers[0].lines + workers[1].lines)
        assert "give each worker its own --id" in told[0] and "retrying in" in told[0]
        # It backs off: a handful of connections, not one a second.
        connects = sum("backend.worker: connected" in ln for w in workers for ln in w.lines)
        assert connects <= 10, connects
    finally:
        for w in workers:
            w.kill()
        broker.close()


def test_a_refusal_after_a_connection_is_retried_with_backoff(db_url):
    broker = mosquitto({})
    worker = WorkerProcess(broker.port, db_url, client_id="im-worker-r").start()
    try:
        broker.add_user(WORKER_USER, "changed")  # SIGHUP: the broker now refuses the worker's password
        # Take the worker's client id once, so it must log in again.
        thief = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="im-worker-r", clean_session=True)
        thief.username_pw_set(WORKER_USER, "changed")
        up = threading.Event()
        thief.on_connect = lambda *a: up.set()
        thief.connect("127.0.0.1", broker.port)
        thief.loop_start()
        assert up.wait(10)
        thief.disconnect()
        thief.loop_stop()
        assert worker.wait_log("refused the login as 'im-worker'", 15), "".join(worker.lines)
        line = next(ln for ln in worker.lines if "refused the login" in ln)
        assert "retrying in" in line and "check the account" in line
        assert worker.proc.poll() is None  # still running
        broker.add_user(WORKER_USER, WORKER_PASSWORD)
        assert worker.wait_log("connected to 127.0.0.1", 1) and eventually_connects(worker, 2, 40), \
            "".join(worker.lines)
    finally:
        worker.kill()
        broker.close()


def eventually_connects(worker: WorkerProcess, n: int, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if sum("backend.worker: connected" in ln for ln in worker.lines) >= n:
            return True
        worker.wait_log("\0never\0", 0.5)
    return False


def test_content_never_reaches_the_logs_even_at_debug():
    """PostgreSQL refuses a NUL in text: the sender gets an error, its neighbours are delivered, and no
    content (each message carries a unique marker) appears in the worker's output at DEBUG."""
    schema = PrivateSchema()
    broker = mosquitto(PASSWORDS)
    worker = WorkerProcess(broker.port, schema.url, extra=["--send-rate", "0"])
    worker.start(extra=None, env={"IM_LOG_LEVEL": "DEBUG"})
    clients = []
    try:
        bob = IMClient("bob", PASSWORDS["bob"], port=broker.port).connect()
        alice = IMClient("alice", PASSWORDS["alice"], port=broker.port).connect()
        clients += [alice, bob]
        marker = f"SECRET{os.urandom(6).hex()}"
        before = [alice.send("bob", f"{marker}-before-{i}") for i in range(5)]
        # The poisonous one, raw (the reference client would resend it): a NUL inside the content.
        replies = []
        got = threading.Event()
        raw = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="alice:raw", clean_session=True)
        raw.username_pw_set("alice", PASSWORDS["alice"])
        raw.on_message = lambda c, u, m: (replies.append(p.decode_object(m.payload)), got.set())
        subscribed = threading.Event()
        raw.on_subscribe = lambda *a: subscribed.set()
        raw.connect("127.0.0.1", broker.port)
        raw.loop_start()
        raw.subscribe(p.reply_topic("alice"), qos=1)
        assert subscribed.wait(10)
        raw.publish(p.send_topic("alice"), p.encode({"msg_id": "nul-1", "to": "bob",
                                                      "content": f"{marker}-nul-\x00-inside"}), qos=1)
        after = [alice.send("bob", f"{marker}-after-{i}") for i in range(5)]
        assert all(o.delivered.wait(15) for o in before + after), "".join(worker.lines)
        assert bob.wait_for(lambda: len(bob.messages) >= 10, 10)
        end = time.monotonic() + 10
        while not any(r.get("msg_id") == "nul-1" for r in replies) and time.monotonic() < end:
            got.wait(0.5)
            got.clear()
        answer = next((r for r in replies if r.get("msg_id") == "nul-1"), None)
        assert answer is not None and answer["kind"] == "error", replies
        raw.disconnect()
        raw.loop_stop()
        assert all(m["content"] != f"{marker}-nul-\x00-inside" for m in bob.messages)
    finally:
        for c in clients:
            c.kill()
        worker.stop()
        broker.close()
        schema.close()
    out = "".join(worker.lines)
    refused = [ln for ln in worker.lines if "store refused" in ln]
    assert refused and "msg_id='nul-1' from alice to bob" in refused[0] and "characters of content" in refused[0]
    assert marker not in out, [ln for ln in worker.lines if marker in ln]
    # DEBUG still shows the traffic, by topic, size and ids: a send coming in, its push and receipts going out.
    assert "DEBUG backend.worker: in  im/u/alice/send (" in out and "DEBUG backend.worker: out im/u/bob/inbox msg seq=" in out


def test_store_operations_are_described_by_ids_and_sizes():
    from backend import core
    from backend.transport.worker import describe_db_error, describe_op
    op = core.StoreMessage(sender="alice", msg_id="a-1", to="bob", type="text", content="very private words",
                           ts=None, sent_at=1)
    text = describe_op(op)
    assert "private" not in text and "a-1" in text and "alice" in text and "bob" in text and "18 characters" in text
    for other in (core.DeleteAcked("bob", (1, 2)), core.CountBacklog("bob", None),
                  core.PullPage("bob", "r1", 10, None, None)):
        assert "bob" in describe_op(other)
    import peewee as pw
    err = pw.DataError("Incorrect string value: 'very private words' for column content")
    assert "private" not in describe_db_error(err) and "DataError" in describe_db_error(err)
    assert "private" not in describe_db_error(ValueError("very private words"))
