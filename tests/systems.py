"""The system the devices and push end-to-end tests run against: the embedded broker (`serve`) or a private
Mosquitto with the worker beside it, with the users of USERS (password ``<uid>-pw``), and ``system_fixture``,
the module-scoped fixture parametrised over both."""

from __future__ import annotations

import os

import pytest

from backend.client import IMClient
from conftest import Server, add_users, raw_client
from services import WorkerProcess, mosquitto

USERS = ("alice", "bob", "carol", "dave", "erin", "frank", "gina", "hank", "ivan")
PW = {u: f"{u}-pw" for u in USERS}


class System:
    def __init__(self, kind: str, db_url: str, extra: list[str] | None = None):
        self.kind, self.db_url = kind, db_url
        add_users(db_url, *USERS)
        if kind == "embedded":
            self.server = Server(db_url).start(extra=extra)
            self.port, self.broker = self.server.port, None
        else:
            self.broker = mosquitto(PW)
            self.port = self.broker.port
            self.server = WorkerProcess(self.port, db_url, extra=extra).start()

    def client(self, uid: str, device: str = "", **kw) -> IMClient:
        return IMClient(uid, PW[uid], port=self.port, device=device, **kw).connect()

    def raw(self, uid: str, *topics: str):
        c, rc, got = raw_client(self.port, uid, PW[uid], f"{uid}:raw-{os.urandom(3).hex()}")
        assert rc is not None and not rc.is_failure
        for t in topics:
            c.subscribe(t, 1)
        return c, got

    def close(self):
        self.server.kill()
        if self.broker is not None:
            self.broker.close()


def system_fixture(tag: str):
    """``system = system_fixture("devices")`` in a test module: its ``system`` fixture, one System per broker kind
    (embedded, mosquitto) for the whole module, on a database of its own (a temporary folder named ``tag``)."""
    @pytest.fixture(params=["embedded", "mosquitto"], scope="module", name="system")
    def system(request, tmp_path_factory):
        s = System(request.param, f"sqlite:///{tmp_path_factory.mktemp(tag)}/im.db")
        yield s
        s.close()
    return system
