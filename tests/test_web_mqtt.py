"""The web client's MQTT 3.1.1-over-WebSocket module (backend/web/app/mqtt.js), run in headless Chromium against
Mosquitto's WebSocket listener (broker_config/, via scripts/mosquitto.py), with paho on the other side: CONNECT
with a will, SUBSCRIBE, PUBLISH QoS 0 and 1 both ways, PUBACK, PINGREQ, DISCONNECT, refused logins, a payload
whose length takes 3 bytes. The page is the app's own server; the tests import the module into it.
"""

from __future__ import annotations

import threading

import paho.mqtt.client as mqtt
import pytest

from browser import Tab, start_browser
from services import mosquitto

# Mosquitto sends at most this many QoS 1 messages to a client before PUBACKs come back (broker_config).
INFLIGHT = 20


@pytest.fixture(scope="module")
def broker():
    b = mosquitto({"alice": "alicepw", "bob": "bobpw"}, ws_port=0)  # max_inflight_messages 20: broker_config
    yield b
    b.close()


@pytest.fixture(scope="module")
def page(broker):
    from backend.web import WebServer
    server = WebServer("127.0.0.1", 0, {"port": broker.ws_port, "path": "/mqtt", "tls": False}).start()
    d = start_browser()
    tab = Tab(d, server.url, new=False)
    tab.js("window.ws = arguments[0]; window.M = null; import('./mqtt.js').then(m => { window.M = m; });",
           f"ws://127.0.0.1:{broker.ws_port}/mqtt")
    tab.wait("window.M")
    yield tab
    d.quit()
    server.stop()


def run(page, body: str):
    """Run an async JS body (``M`` is the module, ``ws`` the broker's URL) and return what it returns."""
    return page.on().driver.execute_async_script(
        f"const done = arguments[arguments.length - 1];"
        f"(async () => {{ {body} }})().then(done, e => done({{error: String(e.message || e), code: e.code}}));")


class Watcher:
    """paho as bob: what arrives on some topics."""

    def __init__(self, broker, topics):
        self.got: list[tuple[str, bytes, bool]] = []
        self.cond = threading.Condition()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"watch-{id(self)}")
        self.c.username_pw_set("bob", "bobpw")
        ready = threading.Event()
        self.c.on_subscribe = lambda *a: ready.set()
        self.c.on_message = self._on
        self.c.connect("127.0.0.1", broker.port)
        self.c.subscribe([(t, 1) for t in topics])
        self.c.loop_start()
        assert ready.wait(5)

    def _on(self, cl, u, m):
        with self.cond:
            self.got.append((m.topic, m.payload, m.retain))
            self.cond.notify_all()

    def wait(self, n: int, timeout: float = 10) -> list:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.got) >= n, timeout), self.got
            return list(self.got)

    def close(self):
        self.c.loop_stop()
        self.c.disconnect()


def test_connect_refused_with_a_wrong_password(page):
    r = run(page, "await new M.MqttConnection(ws, {clientId: 'alice:x', username: 'alice', password: 'nope'}).connect();"
                  "return 'connected';")
    assert r["code"] == 5 and "not authorized" in r["error"], r  # Mosquitto answers 5 for a bad password


def test_publish_both_ways_qos0_and_qos1_with_pubacks(page, broker):
    w = Watcher(broker, ["im/status/alice/+"])
    try:
        # to the browser: 3 x INFLIGHT QoS 1 messages; Mosquitto holds all but INFLIGHT until PUBACKs come, so all
        # of them arriving shows the browser PUBACKs; and one QoS 0
        r = run(page, """
            const c = new M.MqttConnection(ws, {clientId: 'alice:t1', username: 'alice', password: 'alicepw',
                                                 keepalive: 10});
            window.got = [];
            c.onmessage = (t, p, f) => { window.got.push([t, new TextDecoder().decode(p), f.qos]); };
            await c.connect();
            window.c1 = c;
            return await c.subscribe([['im/status/bob/+', 1], ['im/status/+', 0]]);""")
        assert r == [1, 0], r
        pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bob-pub")
        pub.username_pw_set("bob", "bobpw")
        pub.connect("127.0.0.1", broker.port)
        pub.loop_start()
        n = 3 * INFLIGHT
        infos = [pub.publish("im/status/bob/d1", f"m{i}", qos=1) for i in range(n)]
        infos.append(pub.publish("im/status/bob", "zero", qos=0))
        for i in infos:
            i.wait_for_publish(5)
        got = page.wait(f"window.got.length >= {n + 1} && window.got", what="all messages")
        assert [g[1] for g in got if g[2] == 1] == [f"m{i}" for i in range(n)]
        assert ["im/status/bob", "zero", 0] in got
        pub.loop_stop()
        pub.disconnect()
        # from the browser: QoS 1 resolves on PUBACK, QoS 0 once written; both arrive
        r = run(page, "await window.c1.publish('im/status/alice/t1', 'q1', {qos: 1});"
                      "await window.c1.publish('im/status/alice/t1', 'q0'); return 'ok';")
        assert r == "ok"
        assert [(t, p) for t, p, _ in w.wait(2)] == [("im/status/alice/t1", b"q1"), ("im/status/alice/t1", b"q0")]
        # a payload of 300 KB: its remaining length takes 3 bytes
        r = run(page, "await window.c1.publish('im/status/alice/t1', 'x'.repeat(300000), {qos: 1}); return 'ok';")
        assert r == "ok" and len(w.wait(3)[2][1]) == 300000
        run(page, "window.c1.disconnect(); return 1;")
    finally:
        w.close()


def test_will_on_a_lost_connection_none_after_disconnect_and_pings_keep_it(page, broker):
    w = Watcher(broker, ["im/status/alice/+"])
    try:
        # keepalive 2 s (Mosquitto drops after 3 s of silence), idle for 5 s with a tick each second: still up
        r = run(page, """
            const will = {topic: 'im/status/alice/w', payload: 'offline', qos: 1, retain: false};
            const c = new M.MqttConnection(ws, {clientId: 'alice:t2', username: 'alice', password: 'alicepw',
                                                keepalive: 2, will});
            await c.connect();
            for (let i = 0; i < 5; i++) { await new Promise(r => setTimeout(r, 1000)); c.tick(); }
            const pings = c.pings, up = c.connected;
            await c.publish('im/status/alice/w', 'still here', {qos: 1});
            c.abort();  // no DISCONNECT: the broker publishes the will
            const d = new M.MqttConnection(ws, {clientId: 'alice:t3', username: 'alice', password: 'alicepw', will});
            await d.connect();
            d.disconnect();  // DISCONNECT: no will
            return {pings, up};""")
        assert r["up"] and r["pings"] >= 2, r
        got = w.wait(2)
        assert [(t, p) for t, p, _ in got[:2]] == [("im/status/alice/w", b"still here"), ("im/status/alice/w", b"offline")]
        # the clean disconnect sent no will: publish a marker and check it comes next, nothing before it
        m = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="alice-marker")
        m.username_pw_set("alice", "alicepw")
        m.connect("127.0.0.1", broker.port)
        m.loop_start()
        m.publish("im/status/alice/w", "marker", qos=1).wait_for_publish(5)
        m.loop_stop()
        m.disconnect()
        assert [p for _, p, _ in w.wait(3)[2:]] == [b"marker"]
    finally:
        w.close()


def test_packets_split_and_joined_across_frames(page):
    """The stream parser: a packet cut anywhere, several packets in one chunk, a length of 4 bytes refused."""
    r = run(page, """
        const p1 = M.packet(3, 2, [Uint8Array.of(0, 1, 65, 0, 7), new Uint8Array(200)]);
        const p2 = M.packet(13, 0, []);
        const all = new Uint8Array(p1.length + p2.length); all.set(p1); all.set(p2, p1.length);
        const out = [];
        for (let cut = 0; cut <= all.length; cut++) {
          let [a, rest] = M.parsePackets(all.subarray(0, cut));
          const joined = new Uint8Array(rest.length + all.length - cut); joined.set(rest); joined.set(all.subarray(cut), rest.length);
          const [b] = M.parsePackets(joined);
          out.push(a.length + b.length === 2 && [...a, ...b].map(p => p.type).join());
        }
        let refused = '';
        try { M.parsePackets(Uint8Array.of(48, 255, 255, 255, 255, 1)); } catch (e) { refused = e.message; }
        return {ok: out.every(x => x === '3,13'), refused};""")
    assert r["ok"] and "malformed" in r["refused"], r
