"""The web client's static server (backend/web) and its commands, without a browser: only the app's own files
are served (no path traversal, no hidden files, no listings), /config.json says where the WebSocket listener
is, HTTPS with a certificate (the page then connects with wss://), the package ships the files, and the
command line refuses what cannot work in one line."""

from __future__ import annotations

import http.client
import json
import os
import socket
import ssl

import pytest

from certs import make_certs
from conftest import REPO, BackendProcess, add_users, free_port, run_cli

APP = REPO / "backend" / "web" / "app"


@pytest.fixture(scope="module")
def web():
    from backend.web import WebServer
    s = WebServer("127.0.0.1", 0, {"port": 9001, "path": "/mqtt", "tls": False}).start()
    yield s
    s.stop()


def raw_get(port: int, path: str) -> tuple[int, bytes]:
    """A GET with the path sent exactly as given (no client-side normalisation of ../ or %2e)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def test_serves_the_app_and_its_config(web):
    status, body = raw_get(web.port, "/")
    assert status == 200 and b'<script type="module" src="app.js">' in body
    for name in ("app.js", "im.js", "mqtt.js", "store.js", "tick.js", "style.css"):
        status, body = raw_get(web.port, f"/{name}")
        assert status == 200 and body == (APP / name).read_bytes(), name
    c = http.client.HTTPConnection("127.0.0.1", web.port, timeout=5)
    c.request("GET", "/mqtt.js")
    r = c.getresponse()
    assert r.getheader("Content-Type") == "text/javascript"  # a module is refused under any other type
    assert "default-src 'self'" in r.getheader("Content-Security-Policy")
    r.read()
    c.request("GET", "/config.json")
    assert json.loads(c.getresponse().read()) == {"ws": {"port": 9001, "path": "/mqtt", "tls": False}}


@pytest.mark.parametrize("path", ["/../__init__.py", "/..%2f__init__.py", "/%2e%2e/__init__.py", "/app/../../cli.py",
                                  "//etc/passwd", "/../../../../etc/passwd", "/..\\__init__.py", "/%00", "/.hidden",
                                  "/nothing.js", "/?../__init__.py"])
def test_nothing_outside_the_folder(web, path):
    status, body = raw_get(web.port, path)
    if path.startswith("/?"):  # a query string: still the index page, never the file it names
        assert status == 200 and b"<!doctype html>" in body
        return
    assert status == 404, (path, body[:200])
    assert b"import" not in body and b"root:" not in body


def test_no_symlink_out_and_no_listing(tmp_path):
    from backend.web import WebServer
    app = tmp_path / "app"
    (app / "sub").mkdir(parents=True)
    (app / "index.html").write_text("<!doctype html>hi")
    secret = tmp_path / "secret.txt"
    secret.write_text("secret")
    os.symlink(secret, app / "link.txt")
    s = WebServer("127.0.0.1", 0, {"url": "ws://x:1/mqtt"}, app_dir=app).start()
    try:
        assert raw_get(s.port, "/link.txt")[0] == 404
        assert raw_get(s.port, "/sub/")[0] == 404  # no directory listing
        assert raw_get(s.port, "/sub")[0] in (301, 404)
        assert raw_get(s.port, "/")[0] == 200
    finally:
        s.stop()


def test_https_and_wss_with_a_certificate(tmp_path):
    from backend.web import WebServer
    certs = make_certs(tmp_path)
    s = WebServer("127.0.0.1", 0, {"port": 9001, "path": "/mqtt", "tls": True}, certs["cert"], certs["key"]).start()
    try:
        ctx = ssl.create_default_context(cafile=certs["ca"])
        c = http.client.HTTPSConnection("127.0.0.1", s.port, context=ctx, timeout=5)
        c.request("GET", "/config.json")
        assert json.loads(c.getresponse().read())["ws"]["tls"] is True
        assert s.url.startswith("https://")
    finally:
        s.stop()


def test_the_package_ships_the_app():
    """pyproject.toml's package data names every file of the app (pip install . must serve the same page)."""
    text = (REPO / "pyproject.toml").read_text()
    assert '"backend.web" = ["app/*"]' in text
    assert not [p for p in APP.rglob("*") if p.parent != APP], "app/* ships one level only"


def test_command_line(tmp_path):
    r = run_cli("serve", "--web-port", str(free_port()), "--database-url", f"sqlite:///{tmp_path}/im.db")
    assert r.returncode == 2 and "--web-port needs --ws-port" in r.stderr
    r = run_cli("web", "--ws-url", "http://x:1/")
    assert r.returncode == 2 and "ws:// or wss://" in r.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        r = run_cli("web", "--host", "127.0.0.1", "--port", str(taken.getsockname()[1]))
        assert r.returncode == 2 and "cannot listen" in r.stderr, r.stderr


class Web(BackendProcess):
    ready = "web client on"

    def __init__(self, *args: str, ready: str = "web client on"):
        super().__init__()
        self._args, self.ready = list(args), ready

    def args(self) -> list[str]:
        return self._args


def test_the_web_command_and_serve_web_port(tmp_path):
    port = free_port()
    w = Web("web", "--host", "127.0.0.1", "--port", str(port), "--ws-url", "wss://chat.example:8081/mqtt").start()
    try:
        assert json.loads(raw_get(port, "/config.json")[1]) == {"ws": {"url": "wss://chat.example:8081/mqtt"}}
        assert w.stop() == 0
    finally:
        w.kill()
    db = f"sqlite:///{tmp_path}/im.db"
    add_users(db, "alice")
    web_port, ws_port = free_port(), free_port()
    s = Web("serve", "--host", "127.0.0.1", "--port", str(free_port()), "--ws-port", str(ws_port),
            "--web-port", str(web_port), "--database-url", db, ready="backend: serving MQTT").start()
    try:
        assert json.loads(raw_get(web_port, "/config.json")[1]) == {"ws": {"port": ws_port, "path": "/mqtt", "tls": False}}
        assert s.stop() == 0
    finally:
        s.kill()


def test_serve_with_tls_serves_https_and_wss(tmp_path):
    """serve --tls-cert: the page over HTTPS, config.json says tls (the page then uses wss://), and an MQTT
    CONNECT over wss:// with the tests' CA is accepted. (Chromium cancels a wss:// connection to a certificate
    of a CA it does not trust whatever its flags say, so this part runs without a browser.)"""
    import asyncio
    import ssl as ssl_
    from websockets.asyncio.client import connect
    certs = make_certs(tmp_path)
    db = f"sqlite:///{tmp_path}/im.db"
    add_users(db, "alice")
    web_port, ws_port = free_port(), free_port()
    s = Web("serve", "--host", "127.0.0.1", "--port", str(free_port()), "--ws-port", str(ws_port), "--web-port",
            str(web_port), "--tls-cert", certs["cert"], "--tls-key", certs["key"], "--tls-port", str(free_port()),
            "--database-url", db, ready="backend: serving MQTT").start()
    try:
        ctx = ssl_.create_default_context(cafile=certs["ca"])
        c = http.client.HTTPSConnection("127.0.0.1", web_port, context=ctx, timeout=5)
        c.request("GET", "/config.json")
        assert json.loads(c.getresponse().read()) == {"ws": {"port": ws_port, "path": "/mqtt", "tls": True}}
        user, password = b"alice", b"alice-pw"
        body = (b"\x00\x04MQTT\x04\xc2\x00\x1e" + len(b"alice:web").to_bytes(2, "big") + b"alice:web"
                + len(user).to_bytes(2, "big") + user + len(password).to_bytes(2, "big") + password)

        # websockets' asyncio client, one thread: its sync client reads on a thread of its own while the caller
        # writes, and the two on one TLS connection failed its close once in CI ("[SSL] internal error").
        async def connack() -> bytes:
            async with connect(f"wss://127.0.0.1:{ws_port}/mqtt", ssl=ctx, subprotocols=["mqtt"]) as ws:
                await ws.send(bytes([0x10, len(body)]) + body)
                return await asyncio.wait_for(ws.recv(), 5)

        assert asyncio.run(connack()) == b"\x20\x02\x00\x00"  # CONNACK, accepted
    finally:
        s.kill()
