"""Fixtures that run the real thing: `python -m backend serve` as a subprocess on a free port."""

from __future__ import annotations

import inspect
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Sequence

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from backend.client import IMClient  # noqa: E402

PASSWORDS = {uid: f"{uid}-pw" for uid in ("alice", "bob", "carol", "dave", "erin")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def eventually(predicate, timeout: float = 10, interval: float = 0.05) -> bool:
    """Poll server-side state (a count) until it holds; for client-side events, wait on the event instead."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            return False
        time.sleep(interval)
    return True


def backend_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "backend", *args]


def run_cli(*args: str, timeout: float = 30, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(backend_cmd(*args), cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


class BackendProcess:
    """`python -m backend ...` in a subprocess, its output collected line by line for wait_log()."""

    ready = "backend.worker: connected"

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.lines: list[str] = []
        self._cond = threading.Condition()

    def args(self) -> list[str]:
        raise NotImplementedError

    def start(self, wait: bool = True, timeout: float = 20, env: dict | None = None,
              extra: list[str] | None = None):
        """Start; with ``wait``, return once its worker is connected to the broker."""
        self.lines = []
        self.proc = subprocess.Popen(backend_cmd(*self.args(), *(extra or [])), cwd=REPO, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env={**os.environ, **self.env(), **(env or {})})
        threading.Thread(target=self._read, args=(self.proc,), daemon=True).start()
        if wait and not self.wait_log(self.ready, timeout):
            self.kill()
            raise RuntimeError(f"{type(self).__name__} did not start:\n" + "".join(self.lines))
        return self

    def env(self) -> dict:
        return {}

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()

    def wait_log(self, text: str, timeout: float = 10) -> bool:
        """Wait until a line containing ``text`` appears (False on timeout or if the process died)."""
        found = lambda: any(text in line for line in self.lines)  # noqa: E731
        with self._cond:
            self._cond.wait_for(lambda: found() or (self.proc is not None and self.proc.poll() is not None), timeout)
            return found()

    def kill(self) -> None:
        """SIGKILL: no clean shutdown, no last wills sent politely."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> int:
        """SIGINT, as Ctrl-C; returns the exit code."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            return self.proc.wait(15)
        return self.proc.returncode if self.proc else 0


class Server(BackendProcess):
    """`python -m backend serve` (embedded broker + worker) on a free port; ``extra``: more serve flags."""

    def __init__(self, db_url: str, port: int | None = None, extra: Sequence[str] = ()):
        super().__init__()
        self.db_url = db_url
        self.port = port or free_port()
        self.extra = list(extra)

    def args(self) -> list[str]:
        return ["serve", "--host", "127.0.0.1", "--port", str(self.port), "--database-url", self.db_url, *self.extra]


class WebServer(Server):
    """`serve` with its WebSocket listener and the web client's page on free ports (tests/test_web_*.py)."""

    ready = "backend: serving MQTT"

    def __init__(self, db_url: str, extra: Sequence[str] = ()):
        self.ws_port, self.web_port = free_port(), free_port()
        super().__init__(db_url, extra=["--ws-port", str(self.ws_port), "--web-port", str(self.web_port), *extra])

    @property
    def url(self) -> str:
        """The web client's page."""
        return f"http://127.0.0.1:{self.web_port}/"


def raw_client(port: int, username: str | None, password: str | None, client_id: str, will=None):
    """A plain paho client (no protocol help): (client, CONNACK reason code or None, received messages)."""
    import paho.mqtt.client as mqtt
    got: list = []
    done = threading.Event()
    box: list = []
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True)
    if username is not None:
        c.username_pw_set(username, password)
    if will:
        c.will_set(*will, qos=1, retain=True)
    c.on_connect = lambda cl, u, f, rc, pr: (box.append(rc), done.set())
    c.on_disconnect = lambda *a: done.set()
    c.on_message = lambda cl, u, m: got.append(m)
    c.connect("127.0.0.1", port)
    c.loop_start()
    done.wait(10)
    return c, (box[0] if box else None), got


def stop_raw(c) -> None:
    c.disconnect()
    c.loop_stop()


def add_users(db_url: str, *uids: str) -> None:
    from backend import accounts
    from backend.store import open_database
    db = open_database(db_url)
    for uid in uids:
        accounts.add_user(uid, PASSWORDS.get(uid, f"{uid}-pw"))
    db.close()


@pytest.fixture
def db_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path}/im.db"


@pytest.fixture
def server(db_url):
    add_users(db_url, *PASSWORDS)
    srv = Server(db_url).start()
    yield srv
    srv.kill()


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory):
    """One server for a module of independent tests (bad input)."""
    url = f"sqlite:///{tmp_path_factory.mktemp('srv')}/im.db"
    add_users(url, *PASSWORDS)
    srv = Server(url).start()
    yield srv
    srv.kill()


@pytest.fixture
def clients(request):
    """clients(server, uid, **kw) -> a connected IMClient, closed at teardown."""
    made: list[IMClient] = []

    def make(srv: Server, uid: str, **kw) -> IMClient:
        kw.setdefault("password", PASSWORDS.get(uid, f"{uid}-pw"))
        c = IMClient(uid, host="127.0.0.1", port=srv.port, **kw)
        c.connect()
        made.append(c)
        return c

    yield make
    for c in made:
        try:
            c.kill()
        except Exception:  # noqa: BLE001
            pass


@pytest.fixture
def alice_bob_cluster():
    """services.nats_cluster("alice", "bob"): (3 NATS nodes, {"alice": uid, "bob": uid}), nodes[0] (the node the
    test kills) a follower of JetStream's meta group; opt-in, IM_CLUSTER_TESTS=1."""
    from services import nats_cluster
    with nats_cluster("alice", "bob") as got:
        yield got


@pytest.fixture
def made():
    """A list to put what a test starts in (IMClients, raw paho clients, push gateways): each is ended at teardown
    (kill(), else stop_raw() for a paho client, else close()), whatever the test's outcome."""
    import paho.mqtt.client as mqtt
    out: list = []
    yield out
    for c in out:
        try:
            if hasattr(c, "kill"):
                c.kill()
            elif isinstance(c, mqtt.Client):
                stop_raw(c)
            else:
                c.close()
        except Exception:  # noqa: BLE001
            pass


# `pytest -n 2 --dist loadgroup` (pytest-xdist) runs the suite in 2 processes, handed out by group: the tests of one
# group run one after another in one process. "shared-db": the tests that use the machine's shared test databases
# ($IM_TEST_POSTGRES_URL, $IM_TEST_MYSQL_URL) as they are, dropping and creating the project's tables there, must
# never run at the same time as each other. "rabbitmq": one RabbitMQ node (~15 s and a core to start) serves them all.
# "module:NAME": a module-scoped fixture (a server) is set up once, in one process, not once in each.
# "chaos": the tests that run several workers, a broker and a dozen clients at once (and time windows on them)
# run one after another, never two together on the 2 cores (a CI run timed one out at 60 s that way).
_CHAOS_MODULES = {"test_devices_chaos", "test_push_chaos", "test_lossy_links", "test_faults", "test_mosquitto_faults",
                  "test_cluster"}
_SHARED_DB = re.compile(r"\b(POSTGRES_URL|MYSQL_URL|fresh_database)\b")


def xdist_group_of(item) -> str | None:
    """The xdist group a test belongs in (see above), or None: any process may run it."""
    params = set(map(str, getattr(getattr(item, "callspec", None), "params", {}).values()))
    try:
        source = inspect.getsource(item.function)
    except (OSError, TypeError):
        source = ""
    if params & {"postgresql", "mariadb"} or _SHARED_DB.search(source):
        return "shared-db"
    if "rabbitmq" in params:
        return "rabbitmq"
    if item.module.__name__ in _CHAOS_MODULES:
        return "chaos"
    defs = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
    if any(d.scope == "module" for fds in defs.values() for d in fds):  # one set-up of it, in one process
        return f"module:{item.module.__name__}"
    return None


@pytest.hookimpl(wrapper=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        group = xdist_group_of(item)
        if group and not item.get_closest_marker("xdist_group"):
            item.add_marker(pytest.mark.xdist_group(group))
        if group == "shared-db":
            _SHARED_DB_TESTS.add(item.nodeid)
    result = yield
    # xdist 3.8.0's own hook tags each grouped test's node id with "@group" through `item._nodeid`, which pytest 9
    # no longer reads (node ids are `item._id`): its groups are silently ignored. Tag them as it means to.
    if getattr(config.option, "loadgroup", False):
        from _pytest.nodeid import NodeId
        for item in items:
            names = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                            for m in item.iter_markers("xdist_group")})
            if names and "@" not in item.nodeid:
                item._id = NodeId.parse(f"{item.nodeid}@{'_'.join(names)}")
    return result


# The node ids of this process's "shared-db" tests (xdist_group_of), and whether one of them ran in this session
# (seen in the controller's reports: under xdist with --dist loadgroup their ids end in "@shared-db").
_SHARED_DB_TESTS: set[str] = set()
_SHARED_DB_USED: list[bool] = []


def pytest_runtest_logreport(report):
    tagged = "@" in report.nodeid and "shared-db" in report.nodeid.rsplit("@", 1)[1]
    if tagged or report.nodeid in _SHARED_DB_TESTS:  # its set-up may have made tables, whatever came after
        _SHARED_DB_USED[:] = [True]


def pytest_sessionfinish(session, exitstatus):
    """Tests leave nothing behind on the machine's shared databases: the project's tables that the tests made in
    the test databases ($IM_TEST_POSTGRES_URL, $IM_TEST_MYSQL_URL) are dropped when the run ends (under xdist:
    once, in the controlling process, after every worker process ended). Only by a run that used them: a run of
    other tests beside it (a developer's, during a CI run) must not drop the tables under its feet."""
    if hasattr(session.config, "workerinput"):  # an xdist worker: the controller drops them when all are done
        return
    if not _SHARED_DB_USED:
        return
    from services import MYSQL_URL, POSTGRES_URL, reachable
    from backend.store import drop_schema, open_database
    for url in (POSTGRES_URL, MYSQL_URL):
        if reachable(url) is not None:
            continue
        try:
            db = open_database(url, create=False)
            drop_schema(db)
            db.close()
        except Exception as e:  # noqa: BLE001 - a clean-up; the run's verdict is already made
            print(f"\ncould not drop the test tables at {url}: {type(e).__name__}")


# --- the web client's browser tests (tests/test_web_chat.py, tests/test_web_features.py): each module starts its
# own `web` server (a module fixture of that name); these drive it.
@pytest.fixture(scope="module")
def driver(web):
    """A headless Chromium (tests/browser.py) for the module, quit at its end."""
    from browser import start_browser
    d = start_browser()
    yield d
    d.quit()


@pytest.fixture
def tabs(driver):
    """tabs(url) -> a new browser.Tab; closed at the end of the test (its device goes offline by its will)."""
    from browser import Tab
    made: list = []
    anchor = driver.window_handles[0]

    def make(url: str):
        t = Tab(driver, url)
        made.append(t)
        return t

    yield make
    for t in made:
        if t.handle in driver.window_handles:
            driver.switch_to.window(t.handle)
            driver.close()
    driver.switch_to.window(anchor)


@pytest.fixture
def paho(web):
    """paho(uid, **kw) -> an IMClient of uid (password '<uid>-pw') connected to the module's `web` server."""
    made: list[IMClient] = []

    def make(uid: str, **kw) -> IMClient:
        c = IMClient(uid, f"{uid}-pw", port=web.port, **kw).connect()
        made.append(c)
        return c

    yield make
    for c in made:
        c.kill()
