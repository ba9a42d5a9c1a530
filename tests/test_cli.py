"""The CLI as a user runs it."""

from __future__ import annotations

import socket

import pytest

from conftest import Server, add_users, free_port, run_cli


@pytest.mark.parametrize("args", [[], ["serve"], ["worker"], ["user"], ["user", "add"], ["user", "remove"],
                                  ["user", "list"]])
def test_help_says_what_and_defaults(args):
    r = run_cli(*args, "--help")
    assert r.returncode == 0 and "usage: python -m backend" in r.stdout
    if args == ["serve"]:
        assert "default: 1883" in r.stdout and "sqlite:///data/im.db" in r.stdout
    if args == ["worker"]:
        assert "mqtt://127.0.0.1:1883" in r.stdout and "im-worker-NAME" in r.stdout and "default: im-workers" in r.stdout


def test_user_add_list_remove(db_url):
    assert run_cli("user", "add", "zoe", "--password", "pw1", "--database-url", db_url).returncode == 0
    assert run_cli("user", "add", "yan", "--password", "pw2", "--database-url", db_url).returncode == 0
    assert run_cli("user", "list", "--database-url", db_url).stdout.split() == ["yan", "zoe"]
    assert run_cli("user", "remove", "zoe", "--database-url", db_url).returncode == 0
    assert run_cli("user", "list", "--database-url", db_url).stdout.split() == ["yan"]
    bad = run_cli("user", "add", "no spaces", "--password", "x", "--database-url", db_url)
    assert bad.returncode == 2 and "uid" in bad.stderr
    assert run_cli("user", "remove", "ghost", "--database-url", db_url).returncode == 1


def test_password_is_stored_only_as_a_hash(db_url, tmp_path):
    run_cli("user", "add", "zoe", "--password", "very-secret-pw", "--database-url", db_url)
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("im.db*"))
    assert b"very-secret-pw" not in raw and b"scrypt$" in raw


def test_serve_on_a_taken_port_says_so_in_one_line(db_url):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = run_cli("serve", "--host", "127.0.0.1", "--port", str(port), "--database-url", db_url)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "already in use" in lines[0] and "python -m backend worker --broker" in lines[0]


def test_serve_stops_cleanly_on_ctrl_c(db_url, clients):
    add_users(db_url, "alice")
    srv = Server(db_url).start()
    try:
        alice = clients(srv, "alice")
        assert alice.send("alice", "note to self").wait(10)["status"] == "stored"
    finally:
        code = srv.stop()
    assert code == 0
    assert "Traceback" not in "".join(srv.lines)
    # The port is free again: the broker is gone (TIME_WAIT is allowed, as for any restart).
    from backend.cli import port_in_use
    assert not port_in_use("127.0.0.1", srv.port)


def test_default_database_is_a_sqlite_file_under_data(tmp_path):
    import os
    import subprocess
    import sys
    from conftest import REPO
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("IM_DATABASE_URL", None)
    r = subprocess.run([sys.executable, "-m", "backend", "user", "add", "u1", "--password", "p"], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "data" / "im.db").exists()


def test_free_port_helper_is_free():
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
