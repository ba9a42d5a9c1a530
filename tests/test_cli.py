"""The CLI as a user runs it."""

from __future__ import annotations

import os
import pty
import select
import socket
import subprocess
import sys
import time

import pytest

from conftest import REPO, Server, add_users, backend_cmd, free_port, run_cli


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
    # The hint runs this very interpreter (a bare `python` outside the venv lacks the dependencies).
    assert len(lines) == 1 and "already in use" in lines[0] and f"{sys.executable} -m backend worker --broker" in lines[0]


@pytest.mark.parametrize("flag", ["--ws-port", "--web-port"])
def test_a_taken_web_or_websocket_port_names_its_flag(db_url, flag):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        ports = {"--port": free_port(), "--ws-port": free_port(), "--web-port": free_port(), flag: taken}
        r = run_cli("serve", "--host", "127.0.0.1", *[x for kv in ports.items() for x in (kv[0], str(kv[1]))],
                    "--database-url", db_url)
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: port {taken} ({flag}) is already in use; pick a free one with {flag}"


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


@pytest.mark.parametrize("args, text", [
    ([], "error: choose a command: serve, worker, web, user, device, group, doctor, keygen"),
    (["group"], "error: choose a group command: list, show, create, add, remove"),
    (["user"], "error: choose a user command: add, remove, list"),
    (["device"], "error: choose a device command: list, remove"),
])
def test_a_missing_command_is_named_in_words(args, text):
    r = run_cli(*args)
    assert r.returncode == 2 and text in r.stderr
    assert "required" not in r.stderr and "user_command" not in r.stderr


@pytest.mark.parametrize("args", [["serve", "--log-level", "DEBUG"], ["--log-level", "DEBUG", "serve"],
                                  ["serve", "--log-level", "debug", "--log-format", "json"]])
def test_log_options_go_before_or_after_the_command(args, db_url):
    # On a taken port serve stops after parsing, so each form shows whether its options were accepted.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = run_cli(*args, "--host", "127.0.0.1", "--port", str(port), "--database-url", db_url)
    assert "unrecognized arguments" not in r.stderr and "already in use" in r.stderr


def test_log_level_after_the_command_takes_effect():
    r = run_cli("keygen", "--log-level", "DEBUG")
    # (peewee's own DEBUG lines stay off: they carry SQL parameters, i.e. message content)
    assert r.returncode == 0 and "DEBUG backend: logging at DEBUG" in r.stderr, r.stderr


@pytest.mark.parametrize("url, text", [
    ("data/x.db", "database URL 'data/x.db' has no scheme (for a SQLite file, sqlite:///data/x.db)"),
    ("sqlite://data/x.db", "a SQLite URL is sqlite:/// then a path"),
    ("mongodb://127.0.0.1/im", "unknown database URL scheme 'mongodb'"),
    ("postgresql://postgres:hunter2@127.0.0.1:5432/", "names no database"),
])
def test_a_malformed_database_url_says_what_form_is_expected(url, text):
    for args in (["user", "list"], ["serve", "--port", "0"], ["worker"]):
        r = run_cli(*args, "--database-url", url)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and text in lines[0], (args, r.stderr)
        assert "sqlite:///" in lines[0] and "hunter2" not in lines[0]


def _postgres_or_skip():
    from services import POSTGRES_URL, reachable, require
    why = reachable(POSTGRES_URL)
    require(why is None, why or "")
    return POSTGRES_URL


def test_a_missing_postgresql_database_is_one_line_saying_createdb():
    base = _postgres_or_skip().rsplit("/", 1)[0]
    r = run_cli("user", "list", "--database-url", f"{base}/im_no_such_db")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "has no database 'im_no_such_db'" in lines[0] and "createdb" in lines[0]


def test_an_unknown_postgresql_user_is_one_line():
    from urllib.parse import urlsplit
    parts = urlsplit(_postgres_or_skip())
    url = f"postgresql://im_no_such_user:secret-pw@{parts.hostname}:{parts.port or 5432}{parts.path}"
    r = run_cli("user", "list", "--database-url", url)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    # Either "no user" (trust authentication) or "refused the login" (password authentication).
    assert "im_no_such_user" in lines[0] and ("has no user" in lines[0] or "refused the login" in lines[0])
    assert "secret-pw" not in lines[0]


@pytest.mark.parametrize("url", ["postgresql://postgres@127.0.0.1:{port}/test", "mysql://root@127.0.0.1:{port}/test"])
def test_a_database_nobody_listens_on_is_one_line(url):
    r = run_cli("user", "list", "--database-url", url.format(port=free_port()), timeout=30)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith("error: cannot reach ") and "is it running there?" in lines[0]


def test_mariadb_a_missing_database_and_a_refused_login_are_one_line_each():
    from urllib.parse import urlsplit
    from services import MYSQL_URL, reachable, require
    why = reachable(MYSQL_URL)
    require(why is None, why or "")
    parts = urlsplit(MYSQL_URL)
    where = f"{parts.hostname}:{parts.port or 3306}"
    r = run_cli("user", "list", "--database-url", f"{MYSQL_URL.rsplit('/', 1)[0]}/im_no_such_db")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "has no database 'im_no_such_db'" in lines[0] and "CREATE DATABASE im_no_such_db" in lines[0]
    r = run_cli("user", "list", "--database-url", f"mysql://im_no_such_user:secret-pw@{where}{parts.path}")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "refused the login of user 'im_no_such_user'" in lines[0] and "secret-pw" not in lines[0]


def test_a_wrong_postgresql_password_is_one_line():
    """With password authentication (a server that uses it: $IM_TEST_POSTGRES_PASSWORD_URL), else the
    message is checked against the driver's own words, as a server with password authentication says them."""
    from backend.store import _open_failure
    import peewee as pw
    e = pw.OperationalError('connection to server at "db", port 5432 failed: FATAL:  password authentication '
                            'failed for user "im"\n')
    line = _open_failure("postgresql://im:pw@db:5432/im", e)
    assert line == ("PostgreSQL at db:5432 refused the login of user 'im' (wrong user name or password): "
                    "check them in the database URL")


def _run_in_pty(args: list[str], keys: list[bytes], timeout: float = 20) -> tuple[int, str]:
    """Run the CLI on a pseudo-terminal (getpass reads /dev/tty), typing ``keys`` as each prompt appears."""
    from conftest import REPO
    pid, fd = pty.fork()
    if pid == 0:  # child: the pty is its controlling terminal
        os.chdir(REPO)
        os.execv(sys.executable, [sys.executable, "-m", "backend", *args])
    out = b""
    keys = list(keys)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
            if keys and out.endswith(b": "):  # a prompt waits for a line (not yet answered: it ends the output)
                os.write(fd, keys.pop(0))
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    return os.waitstatus_to_exitcode(status), out.decode(errors="replace")


@pytest.mark.parametrize("key", [b"\x03", b"\x04"], ids=["ctrl-c", "ctrl-d"])
def test_giving_up_at_the_password_prompt_is_one_line(db_url, key):
    code, out = _run_in_pty(["user", "add", "zoe", "--database-url", db_url], [key])
    assert code != 0 and "Traceback" not in out
    assert "user add cancelled: zoe not changed" in out
    assert run_cli("user", "list", "--database-url", db_url).stdout.split() == []


def test_the_password_is_asked_twice_and_must_match(db_url):
    code, out = _run_in_pty(["user", "add", "zoe", "--database-url", db_url], [b"pw-one\n", b"pw-two\n"])
    assert code == 1 and "the two passwords differ; nothing changed" in out and "Traceback" not in out
    assert run_cli("user", "list", "--database-url", db_url).stdout.split() == []
    code, out = _run_in_pty(["user", "add", "zoe", "--database-url", db_url], [b"pw-one\n", b"pw-one\n"])
    assert code == 0 and "password for zoe again:" in out and "user zoe saved" in out
    assert run_cli("user", "list", "--database-url", db_url).stdout.split() == ["zoe"]


@pytest.mark.parametrize("piped", ["piped-pw\n", "piped-pw", ""], ids=["line", "no-newline", "nothing"])
def test_a_piped_password_is_the_first_line_of_standard_input(db_url, piped):
    """`echo pw | user add zoe`, with no terminal (a new session: getpass would warn that it cannot hide the
    echo, or read the terminal instead of the pipe)."""
    r = subprocess.run(backend_cmd("user", "add", "zoe", "--database-url", db_url), cwd=REPO, input=piped,
                       capture_output=True, text=True, timeout=30, start_new_session=True)
    assert "Warning" not in r.stderr and "Traceback" not in r.stderr, r.stderr
    if not piped:
        assert r.returncode != 0 and "user add cancelled: zoe not changed" in r.stderr
        assert run_cli("user", "list", "--database-url", db_url).stdout.split() == []
        return
    assert r.returncode == 0, r.stderr
    from backend.accounts import authenticate
    from backend.store import open_database
    db = open_database(db_url, create=False)
    try:
        assert authenticate("zoe", "piped-pw") and not authenticate("zoe", "piped-pw\n")
    finally:
        db.close()


def test_serve_on_an_address_not_of_this_machine_says_so_in_one_line(db_url):
    r = run_cli("serve", "--host", "192.0.2.1", "--port", str(free_port()), "--database-url", db_url)  # TEST-NET-1
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith("error: the embedded broker cannot listen:") and "check --host" in lines[0]


@pytest.mark.parametrize("args", [["user", "list"], ["user", "remove", "bob"], ["device", "list", "bob"],
                                  ["device", "remove", "bob", "phone"]])
def test_a_read_only_command_never_creates_a_database_at_a_mistyped_path(tmp_path, args):
    path = tmp_path / "typo" / "im.db"
    r = run_cli(*args, "--database-url", f"sqlite:///{path}")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and f"no database at '{path}'" in lines[0], r.stderr
    assert not path.parent.exists()  # nothing created


def _one_line_error(r, usage: bool = False) -> str:
    """The error line; ``usage``: argparse's own (its usage block first, then one `error:` line)."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert usage or len(lines) == 1, r.stderr
    return lines[-1]


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_a_taken_metrics_port_is_one_line_naming_the_flag(db_url, command):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        extra = ["--port", str(free_port())] if command == "serve" else ["--broker", "mqtt://127.0.0.1:1"]
        r = run_cli(command, *extra, "--metrics-port", str(port), "--database-url", db_url,
                    env={**os.environ, "IM_BROKER_PASSWORD": "x"})
    assert f"--metrics-port {port} is already in use" in _one_line_error(r)


@pytest.mark.parametrize("args, text", [
    (["serve", "--port", "99999"], "99999 is not a port"),
    (["worker", "--partition", "0", "--broker", "mqtt://127.0.0.1:1"], "--partition 0 needs --partitions N"),
    (["worker", "--broker", "mqtt://127.0.0.1:abc"], "the port in broker URL 'mqtt://127.0.0.1:abc' is not"),
    (["worker", "--presence-settle", "abc", "--broker", "mqtt://127.0.0.1:1"], "'abc' is not a number of seconds"),
])
def test_a_mistyped_port_partition_or_number_is_one_line(db_url, args, text):
    r = run_cli(*args, "--database-url", db_url, env={**os.environ, "IM_BROKER_PASSWORD": "x"})
    assert text in _one_line_error(r, usage="-port" in args[1] or "-settle" in args[1])


def test_group_create_show_add_remove_list(db_url):
    r = run_cli("group", "create", "team", "alice", "bob", "--name", "Team", "--database-url", db_url)
    assert r.returncode == 0 and "team\tTeam\towner alice\tgseq 1" in r.stdout, r.stderr
    r = run_cli("group", "add", "team", "carol", "--database-url", db_url)
    assert r.returncode == 0 and "  carol\tmember" in r.stdout and "gseq 2" in r.stdout
    r = run_cli("group", "remove", "team", "bob", "--database-url", db_url)
    assert r.returncode == 0 and "bob" not in r.stdout
    r = run_cli("group", "list", "carol", "--database-url", db_url)
    assert r.stdout.splitlines() == ["team\tTeam\t2 members\trole member"]
    r = run_cli("group", "show", "nothere", "--database-url", db_url)
    assert r.returncode == 1 and r.stderr.strip() == "error: no group 'nothere'; see `group list`"
    r = run_cli("group", "create", "team", "zed", "--database-url", db_url)
    assert r.returncode == 1 and r.stderr.strip() == "error: group 'team' exists (owner alice); see `group show team`"
    r = run_cli("group", "remove", "team", "zed", "--database-url", db_url)
    assert r.returncode == 0 and r.stderr.strip() == "note: zed is not a member of team"
    r = run_cli("group", "create", "bad.id", "alice", "--database-url", db_url)
    assert r.returncode == 2 and "1-32 characters" in r.stderr and "Traceback" not in r.stderr


def test_group_members_need_an_account_when_the_database_has_accounts(db_url):
    """serve's accounts live in its database: a member without one is a typo, refused with nothing changed. With
    no accounts there (a worker beside an external broker, whose accounts are the broker's) any uid goes."""
    assert run_cli("group", "create", "free", "alice", "ghost", "--database-url", db_url).returncode == 0
    for uid in ("alice", "bob"):
        assert run_cli("user", "add", uid, "--password", "pw", "--database-url", db_url).returncode == 0
    r = run_cli("group", "create", "team", "alice", "bob", "ghost", "--database-url", db_url)
    assert r.returncode == 1 and r.stderr.strip() == ("error: no account 'ghost' in this database (`user list` shows "
                                                      "them; `user add` makes one); nothing changed"), r.stderr
    r = run_cli("group", "create", "team", "nobodyhere", "bob", "--database-url", db_url)
    assert r.returncode == 1 and "no account 'nobodyhere'" in r.stderr
    assert run_cli("group", "list", "--database-url", db_url).stdout.splitlines() == ["free\tfree\t2 members\towner alice"]
    assert run_cli("group", "create", "team", "alice", "bob", "--database-url", db_url).returncode == 0
    r = run_cli("group", "add", "team", "bobb", "--database-url", db_url)
    assert r.returncode == 1 and "no account 'bobb'" in r.stderr
    assert "bobb" not in run_cli("group", "show", "team", "--database-url", db_url).stdout


def test_user_add_says_when_it_changed_an_existing_password(db_url):
    r = run_cli("user", "add", "zoe", "--password", "pw1", "--database-url", db_url)
    assert r.returncode == 0 and r.stdout.strip() == f"user zoe saved in {db_url} (a new database: {db_url[10:]})"
    r = run_cli("user", "add", "zoe", "--password", "pw2", "--database-url", db_url)
    assert r.returncode == 0 and r.stdout.strip() == f"user zoe saved in {db_url} (zoe existed: its password is changed)"


def test_a_missing_database_at_an_absolute_path_is_not_called_relative(tmp_path):
    path = tmp_path / "nowhere" / "im.db"
    r = run_cli("user", "list", "--database-url", f"sqlite:///{path}")
    assert r.returncode == 2 and f"no database at '{path}':" in r.stderr and "relative to" not in r.stderr, r.stderr


@pytest.mark.parametrize("args, text", [
    (["serve", "--prot", "1884"], "python -m backend serve: error: unrecognized arguments: --prot 1884 (did you mean "
                                  "--port?); python -m backend serve --help shows the usage"),
    (["worker", "--brokr=mqtt://x"], "worker: error: unrecognized arguments: --brokr=mqtt://x (did you mean --broker?)"),
    (["user", "add", "bob", "--pasword", "x"], "user add: error: unrecognized arguments: --pasword x (did you mean "
                                                "--password?)"),
    (["serve", "--zzz"], "serve: error: unrecognized arguments: --zzz; python -m backend serve --help shows the usage"),
    (["serv"], "python -m backend: error: argument {serve,worker,web,user,device,group,doctor,keygen}: invalid choice: "
               "'serv' (choose from"),
    (["serve", "--port", "99999"], "python -m backend serve: error: argument --port: 99999 is not a port"),
    (["user", "ad", "bob"], "(did you mean add?); python -m backend user --help shows the usage"),
])
def test_a_mistyped_flag_is_one_line_naming_the_command_and_the_closest_flag(args, text):
    r = run_cli(*args)
    assert text in _one_line_error(r), r.stderr


def test_user_add_says_when_it_made_a_new_database(tmp_path):
    """A `user add` run from another directory than `serve`'s makes a second, empty database: a trial took it
    for the server's, and its login was then refused. The line says a new file was made, where, and for whom."""
    env = {**{k: v for k, v in os.environ.items() if k != "IM_DATABASE_URL"}, "PYTHONPATH": str(REPO)}
    r = subprocess.run(backend_cmd("user", "add", "zoe", "--password", "pw1"), cwd=tmp_path, capture_output=True,
                       text=True, timeout=30, env=env)
    new = tmp_path / "data" / "im.db"
    assert r.returncode == 0 and r.stdout.strip() == (f"user zoe saved in sqlite:///data/im.db (a new database: "
                                                      f"{new}; `serve` run from {tmp_path} uses it)"), r.stderr
    r = subprocess.run(backend_cmd("user", "add", "amy", "--password", "pw1"), cwd=tmp_path, capture_output=True,
                       text=True, timeout=30, env=env)
    assert r.stdout.strip() == "user amy saved in sqlite:///data/im.db"


@pytest.mark.parametrize("command", ["serve", "web"])
def test_a_missing_tls_file_is_one_line_naming_the_flag(command, tmp_path):
    cert = tmp_path / "cert.pem"
    cert.write_text("not checked before the key")
    db = ["--database-url", f"sqlite:///{tmp_path}/im.db"] if command == "serve" else []
    r = run_cli(command, "--port", str(free_port()), "--tls-cert", str(cert), "--tls-key", str(tmp_path / "no.key"), *db)
    assert f"error: --tls-key {tmp_path / 'no.key'}: no such file" in _one_line_error(r)
    assert not (tmp_path / "im.db").exists()
