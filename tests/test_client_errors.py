"""The reference client's words when something is wrong: a refused login, an unreachable broker,
a broker with no worker answering. Each names the likely cause in one message."""

from __future__ import annotations

import logging
import time

import pytest

from backend.client import IMClient, LoginRefused
from conftest import PASSWORDS, free_port
from services import mosquitto


def test_a_wrong_password_says_the_broker_refused_the_login(server):
    start = time.monotonic()
    with pytest.raises(LoginRefused) as e:
        IMClient("alice", "not-her-password", port=server.port).connect(timeout=10)
    assert "refused the login" in str(e.value) and "wrong user name or password" in str(e.value)
    assert "not connected within" not in str(e.value)
    assert time.monotonic() - start < 5  # at once, not after the timeout
    assert isinstance(e.value, ConnectionError)  # v1 code catching ConnectionError still does


def test_an_unreachable_broker_says_so():
    port = free_port()  # nothing listens there
    with pytest.raises(ConnectionError) as e:
        IMClient("alice", "pw", port=port).connect(timeout=1.5)
    assert f"cannot reach a broker at 127.0.0.1:{port} (Connection refused)" in str(e.value)
    assert not isinstance(e.value, LoginRefused)


def test_an_unknown_host_says_so():
    with pytest.raises(ConnectionError) as e:
        IMClient("alice", "pw", host="no-such-host.invalid").connect(timeout=5)  # a slow resolver
    assert "cannot reach a broker at no-such-host.invalid:1883" in str(e.value)


def test_a_broker_without_a_worker_gets_a_no_receipt_hint(caplog):
    """A broker that lets the client in but has no worker (the machine's own Mosquitto, say): the send is
    never answered. wait() still returns None (v1), and the client says why, once the first resend is due."""
    broker = mosquitto({"alice": PASSWORDS["alice"]})
    try:
        alice = IMClient("alice", PASSWORDS["alice"], port=broker.port, resend_timeout=0.3).connect()
        try:
            with caplog.at_level(logging.WARNING, logger="backend.client"):
                out = alice.send("bob", "anyone there?")
                assert out.wait(1.5) is None
        finally:
            alice.close()
    finally:
        broker.close()
    assert out.problem is not None and "no receipt after" in out.problem
    assert f"is a worker running beside the broker at 127.0.0.1:{broker.port}?" in out.problem
    warnings = [r.getMessage() for r in caplog.records if r.name == "backend.client" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "is a worker running" in warnings[0] and "anyone there" not in warnings[0]
