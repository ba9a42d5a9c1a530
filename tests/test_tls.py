"""TLS with certificates made at test time: the embedded broker (MQTT and WebSocket) and Mosquitto."""

from __future__ import annotations

import socket
import threading

import paho.mqtt.client as mqtt
import pytest

from backend import protocol as p
from backend.client import IMClient
from certs import make_certs
from conftest import PASSWORDS, Server, add_users, free_port


@pytest.fixture
def certs(tmp_path):
    return make_certs(tmp_path)


@pytest.fixture
def tls_server(db_url, certs):
    add_users(db_url, *PASSWORDS)
    srv = Server(db_url)
    srv.tls_port, srv.ws_port = free_port(), free_port()
    srv.start(extra=["--tls-cert", certs["cert"], "--tls-key", certs["key"], "--tls-only",
                     "--tls-port", str(srv.tls_port), "--ws-port", str(srv.ws_port)])
    yield srv
    srv.kill()


def test_chat_over_tls_only(tls_server, certs):
    bob = IMClient("bob", PASSWORDS["bob"], port=tls_server.tls_port, ca_file=certs["ca"]).connect()
    alice = IMClient("alice", PASSWORDS["alice"], port=tls_server.tls_port, ca_file=certs["ca"]).connect()
    try:
        out = alice.send("bob", "over TLS")
        assert out.wait(10)["status"] == "stored"
        assert bob.wait_for_messages(1) and out.delivered.wait(10)
    finally:
        alice.kill()
        bob.kill()


def test_wrong_ca_is_refused(tls_server, certs):
    c = IMClient("alice", PASSWORDS["alice"], port=tls_server.tls_port, ca_file=certs["wrong_ca"])
    with pytest.raises(ConnectionError):
        c.connect(timeout=3)
    c.kill()


def test_plaintext_is_refused_when_tls_only(tls_server):
    # No plaintext listener at all on --port ...
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", tls_server.port), timeout=2).close()
    # ... and a plaintext MQTT client on the TLS port never gets a CONNACK.
    c = IMClient("alice", PASSWORDS["alice"], port=tls_server.tls_port)
    with pytest.raises(ConnectionError):
        c.connect(timeout=3)
    c.kill()


def test_websocket_over_tls_for_browsers(tls_server, certs):
    got, subscribed = [], threading.Event()
    ws = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bob:browser", transport="websockets")
    ws.username_pw_set("bob", PASSWORDS["bob"])
    ws.tls_set(ca_certs=certs["ca"])
    ws.on_connect = lambda c, u, f, rc, pr: c.subscribe(p.inbox_topic("bob"), 1)
    ws.on_subscribe = lambda *a: subscribed.set()
    ws.on_message = lambda c, u, m: got.append(p.decode_object(m.payload))
    ws.connect("127.0.0.1", tls_server.ws_port)
    ws.loop_start()
    alice = None
    try:
        assert subscribed.wait(10)
        ws.publish(p.status_topic("bob"), "online", qos=1, retain=True).wait_for_publish(5)
        alice = IMClient("alice", PASSWORDS["alice"], port=tls_server.tls_port, ca_file=certs["ca"]).connect()
        alice.send("bob", "to the browser").wait(10)
        assert alice.wait_for(lambda: bool(got), 10)
        assert got[0]["content"] == "to the browser"
    finally:
        ws.disconnect()
        ws.loop_stop()
        if alice:
            alice.kill()


def test_serve_refuses_half_a_tls_configuration(db_url, certs):
    from conftest import run_cli
    r = run_cli("serve", "--port", str(free_port()), "--tls-cert", certs["cert"], "--database-url", db_url)
    assert r.returncode == 2 and "go together" in r.stderr
    r = run_cli("serve", "--port", str(free_port()), "--tls-only", "--database-url", db_url)
    assert r.returncode == 2 and "needs --tls-cert" in r.stderr


def test_mosquitto_with_tls_worker_and_clients_verify_the_ca(db_url, tmp_path_factory):
    """broker_config/mosquitto.conf with its listener on TLS; the worker connects with mqtts:// and --ca-file."""
    import shutil
    import tempfile
    from pathlib import Path

    from conftest import REPO
    from services import WorkerProcess
    public = Path(tempfile.mkdtemp(prefix="im-tls-"))  # the mosquitto user must be able to read the certificate
    public.chmod(0o755)
    try:
        paths = make_certs(public)
        base = (REPO / "broker_config" / "mosquitto.conf").read_text()
        conf = public / "mosquitto-tls.conf"
        conf.write_text(base + f"\ncertfile {paths['cert']}\nkeyfile {paths['key']}\n")
        import scripts.mosquitto as sm
        users = {"alice": PASSWORDS["alice"], "bob": PASSWORDS["bob"]}
        from services import WORKER_PASSWORD, WORKER_USER, require
        require(sm.find_mosquitto() is not None, "mosquitto binary not installed")
        broker = sm.start_mosquitto({**users, WORKER_USER: WORKER_PASSWORD}, config=conf)
        worker = None
        clients = []
        try:
            worker = WorkerProcess(broker.port, db_url, scheme="mqtts", extra=["--ca-file", paths["ca"]]).start()
            bob = IMClient("bob", PASSWORDS["bob"], port=broker.port, ca_file=paths["ca"]).connect()
            alice = IMClient("alice", PASSWORDS["alice"], port=broker.port, ca_file=paths["ca"]).connect()
            clients += [bob, alice]
            out = alice.send("bob", "TLS beside Mosquitto")
            assert out.wait(10)["status"] == "stored" and bob.wait_for_messages(1) and out.delivered.wait(10)
            for bad in (IMClient("alice", PASSWORDS["alice"], port=broker.port, ca_file=paths["wrong_ca"]),
                        IMClient("alice", PASSWORDS["alice"], port=broker.port)):
                with pytest.raises(ConnectionError):
                    bad.connect(timeout=3)
                bad.kill()
        finally:
            for c in clients:
                c.kill()
            if worker:
                worker.kill()
            broker.close()
    finally:
        shutil.rmtree(public, ignore_errors=True)
