"""Encryption at rest: with a key the database file holds no message text; a wrong key is refused."""

from __future__ import annotations

import pytest

from backend import core
from backend.crypto import KeyError_, new_key_line, parse_key_ring
from backend.store import Message, Store, check_keys
from conftest import PASSWORDS, Server, add_users, run_cli
from services import MYSQL_URL, POSTGRES_URL, fresh_database

SECRET = "the launch code is 0000 and nobody must read it"


def test_raw_database_file_holds_no_plaintext_end_to_end(tmp_path, clients):
    db_url = f"sqlite:///{tmp_path}/enc.db"
    add_users(db_url, *PASSWORDS)
    key_file = tmp_path / "keys"
    key_file.write_text(run_cli("keygen", "--id", "k1").stdout)
    server = Server(db_url)
    server.start(extra=["--encryption-key-file", str(key_file)])
    try:
        alice = clients(server, "alice")
        for i in range(20):
            alice.send("bob", f"{SECRET} #{i}").wait(10)
        carol = clients(server, "carol")
        out = alice.send("carol", SECRET + " (online)")
        assert carol.wait_for_messages(1) and carol.messages[0]["content"] == SECRET + " (online)"
        assert out.delivered.wait(10)
        bob = clients(server, "bob", auto_sync=False)
        assert bob.count()["previews"]["alice"]["content"] == f"{SECRET} #19"[:100]
        server.kill()  # SIGKILL: whatever is in the WAL is on disk too
        raw = b"".join(p.read_bytes() for p in tmp_path.glob("enc.db*"))
        assert b"launch code" not in raw and SECRET.encode() not in raw
        assert raw.count(b"k1") >= 20, "each row names its key"

        # A wrong key: refused with a clear error, before anything listens.
        wrong = tmp_path / "wrong"
        wrong.write_text(new_key_line("k1") + "\n")
        r = run_cli("serve", "--host", "127.0.0.1", "--port", str(server.port), "--database-url", db_url,
                    "--encryption-key-file", str(wrong))
        assert r.returncode == 2 and "wrong encryption key for key id 'k1'" in r.stderr
        r = run_cli("serve", "--host", "127.0.0.1", "--port", str(server.port), "--database-url", db_url)
        assert r.returncode == 2 and "encrypted messages" in r.stderr

        # The right key reads everything back.
        server.start(extra=["--encryption-key-file", str(key_file)])
        bob = clients(server, "bob", auto_sync=False)
        assert [m["content"] for m in bob.drain()] == [f"{SECRET} #{i}" for i in range(20)]
    finally:
        server.kill()


@pytest.mark.parametrize("engine", ["sqlite", "postgresql", "mariadb"])
def test_rotation_and_binding(engine, tmp_path):
    url = {"sqlite": f"sqlite:///{tmp_path}/r.db", "postgresql": POSTGRES_URL, "mariadb": MYSQL_URL}[engine]
    db = fresh_database(url)
    try:
        old_line, new_line = new_key_line("old"), new_key_line("new")
        old = parse_key_ring(old_line)
        check_keys(old)
        (a,) = Store(db, keyring=old).apply([core.StoreMessage("alice", "m1", "bob", "text", "sealed old", None, 1)])
        # Rotation: the new key first, the old one kept to read older rows.
        rotated = parse_key_ring(new_line + "\n" + old_line)
        check_keys(rotated)
        s2 = Store(db, keyring=rotated)
        (b,) = s2.apply([core.StoreMessage("carol", "m2", "bob", "text", "sealed new", None, 2)])
        assert Message.get_by_id(a.seq).key_id == "old" and Message.get_by_id(b.seq).key_id == "new"
        (page,) = s2.apply([core.PullPage("bob", "r", 10, None, None)])
        assert [m["content"] for m in page.messages] == ["sealed old", "sealed new"]
        assert "sealed" not in Message.get_by_id(a.seq).msg_content
        with pytest.raises(KeyError_, match="not in the key ring"):
            check_keys(parse_key_ring(new_line))  # the old key dropped while rows still use it
        # Binding: a's sealed content copied into b's row does not open there.
        row = Message.get_by_id(a.seq)
        Message.update(msg_content=row.msg_content, key_id=row.key_id).where(Message.seq == b.seq).execute()
        (page,) = s2.apply([core.PullPage("bob", "r", 10, None, None)])
        damaged = [m for m in page.messages if m["seq"] == b.seq][0]
        assert damaged["content"] == "" and damaged["unreadable"] is True
        assert [m["content"] for m in page.messages if m["seq"] == a.seq] == ["sealed old"]
    finally:
        db.close()


def test_key_ring_parsing_errors():
    with pytest.raises(KeyError_, match="32 bytes"):
        parse_key_ring("k1:" + "QUJD")
    with pytest.raises(KeyError_, match="empty"):
        parse_key_ring("# nothing\n")
    with pytest.raises(KeyError_, match="twice"):
        line = new_key_line("a")
        parse_key_ring(line + "\n" + line)
