"""Devices in the store (SQLite, PostgreSQL, MariaDB): one body, one entry per device; each device acks for
itself; `delivered` once; sync copies; the cap; removal; adoption; the read-only user scope; expiry per
device; and a database written by the version before devices upgrading in place."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from backend import core
from backend.store import Device, Entry, Message, Store, create_schema, drop_schema
from services import MYSQL_URL, POSTGRES_URL, fresh_database

ROOT = Path(__file__).resolve().parent.parent
# The last version before devices (the merge of the liveness work): its store module writes the old schema.
BEFORE_DEVICES = "759c521"


@pytest.fixture(params=["sqlite", "postgresql", "mariadb"])
def url(request, tmp_path):
    return {"sqlite": f"sqlite:///{tmp_path}/s.db", "postgresql": POSTGRES_URL, "mariadb": MYSQL_URL}[request.param]


@pytest.fixture
def store(url):
    db = fresh_database(url)
    yield Store(db, max_devices=3)
    db.close()


def msg(sender, to, msg_id, dev="", t=1000):
    return core.StoreMessage(sender=sender, msg_id=msg_id, to=to, type="text", content=f"{msg_id}!", ts=None,
                             sent_at=t, sender_device=dev)


def hello(uid, dev):
    """A device's first contact: the count its `online` triggers."""
    return core.CountBacklog(uid, None, dev)


def pull(uid, dev="", ack=None, limit=100):
    return core.PullPage(uid, "r", limit, None, ack, device=dev)


def test_each_device_acks_for_itself_and_delivered_goes_once(store):
    store.apply([hello("bob", "phone"), hello("bob", "laptop"), hello("alice", "a"), msg("alice", "bob", "1", "a")])
    (stored,) = store.apply([msg("alice", "bob", "2", "a")])
    assert sorted(stored.devices) == [("bob", "laptop"), ("bob", "phone")], "an entry per registered device"
    (d1,) = store.apply([core.DeleteAcked("bob", (stored.seq,), "phone")])
    assert [(r.device, r.receipt, r.sender_device) for r in d1.rows] == [("phone", True, "a")]
    assert Message.select().where(Message.seq == stored.seq).exists(), "the laptop still owes its ack"
    (again,) = store.apply([core.DeleteAcked("bob", (stored.seq,), "phone")])
    assert again.rows == (), "a repeated ack deletes nothing more"
    (page,) = store.apply([pull("bob", "laptop")])
    assert [m["msg_id"] for m in page.messages] == ["1", "2"], "read on the phone, still there for the laptop"
    (done,) = store.apply([pull("bob", "laptop", ack=page.cursor)])
    # "1" was never acked by the phone: the laptop's ack is its first, so its `delivered` goes now; "2" not again.
    assert [(r.msg_id, r.receipt) for r in done.deleted] == [("1", True), ("2", False)]
    assert not Message.select().where(Message.seq == stored.seq).exists() and Entry.select().where(
        Entry.uid == "bob").count() == 1  # "1" still waits for the phone


def test_sync_copies_reach_the_senders_other_devices(store):
    store.apply([hello("alice", "phone"), hello("alice", "laptop"), hello("bob", "")])
    (s,) = store.apply([msg("alice", "bob", "m", "phone")])
    assert s.devices == (("bob", ""), ("alice", "laptop")), "the receiver first, then the copies; not the sender"
    (page,) = store.apply([pull("alice", "laptop")])
    (m,) = page.messages
    assert m["copy"] is True and m["device"] == "phone" and m["from"] == "alice" and m["to"] == "bob"
    (d,) = store.apply([pull("alice", "laptop", ack=page.cursor)])
    assert [r.receipt for r in d.deleted] == [False], "a sync copy's ack owes no receipt"
    (bp,) = store.apply([pull("bob")])
    assert "copy" not in bp.messages[0]
    (bd,) = store.apply([pull("bob", ack=bp.cursor)])
    assert [r.receipt for r in bd.deleted] == [True] and Message.select().count() == 0
    # A v1 sender (default device) of a user with device-aware devices: they get copies too.
    store.apply([hello("carol", "x")])
    (v1,) = store.apply([core.CountBacklog("carol", "c", ""), msg("carol", "bob", "v1")])[-1:]
    assert ("carol", "x") in v1.devices


def test_the_device_cap_refuses_and_never_evicts(store):
    out = store.apply([hello("bob", d) for d in ("a", "b", "c", "d")])
    assert [type(o).__name__ for o in out] == ["Counted", "Counted", "Counted", "Refused"]
    assert out[-1].code == "too_many_devices"
    assert sorted(d for (d,) in Device.select(Device.device).where(Device.uid == "bob").tuples()) == ["a", "b", "c"]
    (s,) = store.apply([msg("alice", "bob", "1")])
    assert len(s.devices) == 3


def test_removal_releases_entries_and_the_device_is_told_when_it_returns(store):
    store.apply([hello("bob", "phone"), hello("bob", "laptop")])
    (s,) = store.apply([msg("alice", "bob", "1")])
    store.apply([core.DeleteAcked("bob", (s.seq,), "laptop")])
    (r,) = store.apply([core.RemoveDevice("bob", "q", "laptop", "phone")])
    assert isinstance(r, core.DeviceRemoved) and r.released == 1
    assert Message.select().count() == 0, "waiting only for the removed device: it left the store"
    (unknown,) = store.apply([core.RemoveDevice("bob", "q", "laptop", "phone")])
    assert isinstance(unknown, core.Refused) and unknown.code == "unknown_device"
    store._seen.clear()
    back = store.apply([core.CountBacklog("bob", "c", "phone")])
    assert [type(o).__name__ for o in back] == ["DeviceReset", "Counted"], "told first, then answered"
    assert type(store.apply([core.CountBacklog("bob", "c2", "phone")])[0]).__name__ == "Counted", "told once"


def test_housekeeping_removes_silent_devices_but_not_online_ones(store):
    store.expire_after_ms = 1000
    store.apply([hello("bob", "phone"), hello("bob", "laptop"), hello("bob", "tab")])
    (s,) = store.apply([msg("alice", "bob", "1", t=10**13)])
    far = 10**13 + 10_000
    Device.update(last_seen=1).execute()
    assert store.expire_devices(far, online={("bob", "tab")}) == 2, "bob's phone and laptop"
    assert sorted(Device.select(Device.uid, Device.device).tuples()) == [("alice", ""), ("bob", "tab")], \
        "never the default device (v1: its messages leave by their age)"
    assert [(e.uid, e.device) for e in Entry.select()] == [("bob", "tab")]


def test_first_device_adopts_what_waited_for_nobody(store):
    (s,) = store.apply([msg("alice", "bob", "before any device")])
    assert s.devices == (("bob", ""),)
    store.apply([hello("bob", "laptop")])
    (page,) = store.apply([pull("bob", "laptop")])
    assert [m["msg_id"] for m in page.messages] == ["before any device"]
    store.apply([hello("bob", "phone")])
    (empty,) = store.apply([pull("bob", "phone")])
    assert empty.messages == (), "a later device gets what is stored after its registration"


def test_user_scope_is_read_only_and_sees_what_waits_for_others(store):
    store.apply([hello("bob", "phone")])
    seqs = [o.seq for o in store.apply([msg("alice", "bob", str(i)) for i in range(5)])]
    store.apply([hello("bob", "laptop")])
    op = core.PullPage("bob", "u", 3, None, None, device="laptop", scope="user", after=0)
    (p1,) = store.apply([op])
    assert [m["seq"] for m in p1.messages] == seqs[:3] and p1.more and p1.cursor is None
    (p2,) = store.apply([core.PullPage("bob", "u", 3, None, None, device="laptop", scope="user", after=seqs[2])])
    assert [m["seq"] for m in p2.messages] == seqs[3:] and not p2.more
    assert Entry.select().count() == 5 and Message.select().count() == 5, "nothing acked"


def test_expiry_is_tallied_per_device(store):
    store.expire_after_ms = 1000
    store.apply([hello("bob", "phone"), hello("bob", "laptop")])
    store.apply([msg("alice", "bob", "old", t=1)])
    (s,) = store.apply([msg("alice", "bob", "old2", t=1)])
    store.apply([core.DeleteAcked("bob", (s.seq,), "phone")])
    assert store.expire(now=10_000) == 2
    phone, laptop = store.apply([core.CountBacklog("bob", "c", "phone"), core.CountBacklog("bob", "c", "laptop")])
    assert (phone.expired, laptop.expired) == (1, 2)
    assert Entry.select().count() == 0 and Message.select().count() == 0


def _old_store_module(tmp_path):
    """The store module of the version before devices, importable beside today's (it imports backend.core)."""
    src = subprocess.run(["git", "show", f"{BEFORE_DEVICES}:backend/store.py"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    path = tmp_path / "store_before_devices.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("backend._store_before_devices", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("reader", ["v1", "device"])
def test_a_database_written_before_devices_upgrades_in_place(url, tmp_path, reader):
    db = fresh_database(url)
    drop_schema(db)
    old = _old_store_module(tmp_path)
    try:
        old.database_proxy.initialize(db)
        old.create_schema(db)
        assert "entry" not in db.get_tables()
        old_store = old.Store(db)
        old_store.apply([msg("alice", "bob", "1"), msg("carol", "bob", "2"), msg("alice", "dave", "3")])
    finally:
        sys.modules.pop("backend._store_before_devices", None)
    create_schema(db)  # today's code opens it (open_database runs this under the schema lock)
    create_schema(db)  # twice: the entries are made once
    assert Entry.select().count() == 3
    store = Store(db)
    dev = "" if reader == "v1" else "laptop"
    store.apply([core.CountBacklog("bob", "c", dev)])  # its first contact
    (page,) = store.apply([pull("bob", dev)])
    assert [m["msg_id"] for m in page.messages] == ["1", "2"]
    (done,) = store.apply([pull("bob", dev, ack=page.cursor)])
    assert [r.receipt for r in done.deleted] == [True, True]
    assert [m.msg_id for m in Message.select()] == ["3"]
    db.close()


def test_a_batch_of_many_devices_entries_spans_several_statements(url):
    # 120 messages to 4 devices with 2 sync copies each: 720 entries, past one entry chunk (ENTRY_CHUNK) and past
    # one plain INSERT's rows on SQLite (ENTRY_ROWS): every message gets all 6, the receiver's devices first.
    db = fresh_database(url)
    try:
        store = Store(db, max_devices=4)
        store.apply([hello("bob", d) for d in ("p", "q", "r", "s")] + [hello("alice", d) for d in ("a", "b", "c")])
        out = store.apply([msg("alice", "bob", str(i), "a") for i in range(120)])
        for o in out:
            assert not o.duplicate and len(o.devices) == 6
            assert sorted(o.devices[:4]) == [("bob", d) for d in "pqrs"]
            assert sorted(o.devices[4:]) == [("alice", "b"), ("alice", "c")]
        assert Entry.select().count() == 720 and Message.select().count() == 120
        (d,) = store.apply([core.DeleteAcked("alice", tuple(o.seq for o in out), "b")])
        assert len(d.rows) == 120 and not any(r.receipt for r in d.rows), "a sync copy's ack owes no receipt"
    finally:
        db.close()
