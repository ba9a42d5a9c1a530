"""The web client's static server: the files of ``backend/web/app/`` (plain HTML, CSS and ES modules, no build
step) and ``/config.json``, which tells the page where the broker's MQTT-over-WebSocket listener is.

Why Python's own ``http.server`` in a thread: the pages are a handful of small static files fetched once per tab,
so a threaded stdlib server is enough, adds no dependency, and stays out of the embedded broker's asyncio loop
(amqtt's), whose latency the chat depends on. ``SimpleHTTPRequestHandler`` maps a URL path to a file inside its
``directory`` only (it drops ``..`` and absolute components); on top of that this handler refuses any path that
resolves outside the folder (a symlink), hidden files, and directory listings.

    server = WebServer(host, port, ws={"port": 9001, "path": "/mqtt", "tls": False})
    server.start(); ... server.url ...; server.stop()
"""

from __future__ import annotations

import json
import logging
import os
import ssl
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

log = logging.getLogger("backend.web")

APP_DIR = Path(__file__).resolve().parent / "app"
# The page may talk to the WebSocket listener on any host the config names (ws:/wss:), load nothing from elsewhere.
CSP = ("default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; style-src 'self'; "
       "script-src 'self'; worker-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
# A request that has not sent its headers within this long is dropped (a slow client cannot hold a thread).
REQUEST_TIMEOUT_S = 10.0


class _Handler(SimpleHTTPRequestHandler):
    config: bytes = b"{}"
    server_version = "im-web"
    sys_version = ""
    timeout = REQUEST_TIMEOUT_S
    extensions_map = {**SimpleHTTPRequestHandler.extensions_map, ".js": "text/javascript", ".mjs": "text/javascript",
                      ".css": "text/css", ".html": "text/html; charset=utf-8", ".json": "application/json",
                      ".png": "image/png", ".svg": "image/svg+xml"}

    def end_headers(self) -> None:
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Cache-Control", "no-cache")  # a new version of the app is picked up at the next load
        super().end_headers()

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.path.split("?", 1)[0] == "/config.json":
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(self.config)))
            self.end_headers()
            self.wfile.write(self.config)
            return
        if not self._allowed():
            self.send_error(404, "not found")
            return
        super().do_GET()

    def do_HEAD(self) -> None:  # noqa: N802
        if not self._allowed():
            self.send_error(404, "not found")
            return
        super().do_HEAD()

    def _allowed(self) -> bool:
        """Only regular, visible files inside the app folder (or / for index.html)."""
        path = self.translate_path(self.path)
        try:
            real = Path(os.path.realpath(path))
        except (OSError, ValueError):
            return False
        root = Path(os.path.realpath(self.directory))
        if real == root:
            return (root / "index.html").is_file()
        if root not in real.parents or not real.is_file():
            return False
        return not any(part.startswith(".") for part in real.relative_to(root).parts)

    def list_directory(self, path):  # never a listing
        self.send_error(404, "not found")
        return None

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        log.debug("%s %s", self.address_string(), format % args)


class WebServer:
    """Serves the web app on host:port (HTTPS when ``certfile`` is given) in a daemon thread.

    ``ws``: where the page finds the broker's WebSocket listener, given to it as /config.json:
    {"url": "ws://host:port/path"} for a fixed address, or {"port": N, "path": "/mqtt", "tls": bool} for the page's
    own host name on that port (what ``serve`` gives: the browser reaches the broker where it reached the page)."""

    def __init__(self, host: str, port: int, ws: dict[str, Any], certfile: str | None = None,
                 keyfile: str | None = None, app_dir: Path = APP_DIR):
        handler = type("Handler", (_Handler,), {"config": json.dumps({"ws": ws}).encode()})
        self.httpd = ThreadingHTTPServer((host, port), partial(handler, directory=str(app_dir)))
        self.httpd.daemon_threads = True
        self.tls = bool(certfile)
        if certfile:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(certfile, keyfile)
            # The handshake happens in the request's thread (first read), not in accept(): a silent client holds no one up.
            self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True, do_handshake_on_connect=False)
        self.host, self.port = host, self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="im-web", daemon=True)

    @property
    def url(self) -> str:
        host = "localhost" if self.host in ("0.0.0.0", "", "127.0.0.1") else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}/"

    def start(self) -> "WebServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
