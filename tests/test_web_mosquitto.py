"""The web client beside Mosquitto: the page (served as `python -m backend web` serves it) logs in on Mosquitto's
WebSocket listener (broker_config/, scripts/mosquitto.py), the worker runs beside it. Two browsers chat; a
reloaded tab drops a push it had already shown (the worker's retransmission, published here with the worker's
account) and acks it again; Mosquitto killed and restarted: every message arrives once, none is lost.
"""

from __future__ import annotations

import json
import time

import paho.mqtt.client as mqtt
import pytest

from browser import Tab, start_browser
from conftest import IMClient
from services import WORKER_PASSWORD, WORKER_USER, WorkerProcess, mosquitto

USERS = {u: f"{u}-pw" for u in ("alice", "bob", "carol")}


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    from backend.web import WebServer
    broker = mosquitto(USERS, ws_port=0)
    worker = WorkerProcess(broker.port, f"sqlite:///{tmp_path_factory.mktemp('web')}/im.db").start()
    web = WebServer("127.0.0.1", 0, {"port": broker.ws_port, "path": "/mqtt", "tls": False}).start()
    d = start_browser()
    yield broker, worker, web, d
    d.quit()
    web.stop()
    worker.kill()
    broker.close()


def has_text(text: str) -> str:
    return f"[...document.querySelectorAll('#messages li')].some(li => li.textContent.includes({json.dumps(text)}))"


def test_chat_reload_and_a_repeated_push(system):
    broker, worker, web, d = system
    a = Tab(d, web.url, new=False).login("alice", USERS["alice"])
    b = Tab(d, web.url).login("bob", USERS["bob"])
    a.open_chat("bob")
    a.send("hello over mosquitto")
    a.wait("document.querySelector('#messages li.mine').dataset.state === 'delivered'", what="delivered")
    b.open("u:alice")
    b.wait(has_text("hello over mosquitto"))
    shown = b.shown()
    seq, dev = shown[0]["seq"], b.js("return im.device")
    d.refresh()  # bob's tab reloads: it logs in again as the same device, with its seen seqs
    b.wait("window.im && im.state === 'online'", what="bob back")
    b.wait(has_text("hello over mosquitto"))
    # the worker pushes the same seq again (a retransmission whose ack was lost): the tab drops it, acks it again
    w = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="fake-retransmission")
    w.username_pw_set(WORKER_USER, WORKER_PASSWORD)
    w.connect("127.0.0.1", broker.port)
    w.loop_start()
    repeat = {"kind": "msg", "seq": seq, "msg_id": "x", "from": "alice", "to": "bob", "type": "text",
              "content": "hello over mosquitto", "sent_at": 1}
    w.publish(f"im/u/bob/d/{dev}/inbox", json.dumps(repeat), qos=1).wait_for_publish(5)
    w.loop_stop()
    w.disconnect()
    b.wait("im.duplicatesDropped === 1", what="the repeat dropped")
    assert b.shown() == shown  # nothing shown twice


def test_mosquitto_restarted_nothing_lost(system):
    broker, worker, web, d = system
    carol = IMClient("carol", USERS["carol"], port=broker.port, device="phone").connect()
    try:
        a = Tab(d, web.url).login("alice", USERS["alice"])  # a second tab of alice's: another device
        a.open_chat("carol")
        broker.kill()  # SIGKILL: no clean shutdown
        a.wait("im.state !== 'online'", what="alice offline")
        a.send("while the broker was down")
        broker.start()
        a.wait("im.state === 'online'", timeout=25, what="alice back")
        for i in range(3):
            carol.send("alice", f"after restart {i}").wait(10)
        a.wait(" && ".join(has_text(f"after restart {i}") for i in range(3)), what="carol's messages")
        assert carol.wait_for(lambda: [m["content"] for m in carol.messages] == ["while the broker was down"], 20), \
            carol.messages
        time.sleep(0.5)  # nothing to wait for: a repeat would show now
        texts = [m["text"] for m in a.shown()]
        # once each (alice's resend may be stored before or after carol's: the worker reconnects on its own backoff)
        assert sorted(texts) == sorted(["while the broker was down", *(f"after restart {i}" for i in range(3))]), texts
    finally:
        carol.kill()
