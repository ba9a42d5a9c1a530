"""Start a real Mosquitto with the project's config, for tests and manual use.

    from scripts.mosquitto import start_mosquitto
    broker = start_mosquitto({"alice": "pw", "im-worker": "secret"})
    ... broker.host, broker.port ...
    broker.kill(); broker.restart()   # same port, same persistence directory
    broker.close()                    # stop and remove the temporary directory

or from a shell (Ctrl-C stops it):

    python scripts/mosquitto.py --port 18830 --user alice:pw --user bob:pw --user im-worker:secret

broker_config/mosquitto.conf is the base: its first active ``listener`` line becomes
``listener <port> <host>`` and persistence_location, password_file and acl_file point
into a fresh temporary directory (a copy of broker_config/acl goes there, and a password
file made with ``mosquitto_passwd -U``); every other line is used as written, except those that
``extra_config`` (``--set``) replaces: ``start_mosquitto(users, extra_config=["max_queued_messages 1000"])``
puts Mosquitto's own default back in place of the base's 100,000, for instance. Started as
root, Mosquitto drops its privileges to the user named by the config's ``user`` option
(default ``mosquitto``), so the directory and its files are handed to that user.

This module needs nothing but the standard library and the mosquitto binaries.
"""

from __future__ import annotations

import argparse
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterable, Mapping

try:
    from scripts._foreground import run_until_stopped
    from scripts._launcher import BrokerProcess, parse_user
except ImportError:  # run as a file: python scripts/X.py
    from _foreground import run_until_stopped  # type: ignore[no-redef]
    from _launcher import BrokerProcess, parse_user  # type: ignore[no-redef]

REPO_ROOT = Path(__file__).resolve().parents[1]
BASE_CONFIG = REPO_ROOT / "broker_config" / "mosquitto.conf"
BASE_ACL = REPO_ROOT / "broker_config" / "acl"
# Debian and Ubuntu install the broker in /usr/sbin, which a non-root PATH often lacks.
_EXTRA_PATH = ("/usr/sbin", "/usr/local/sbin", "/opt/homebrew/sbin", "/usr/local/opt/mosquitto/sbin")
# How long start() waits for the port to accept connections; Mosquitto needs milliseconds.
START_TIMEOUT_S = 10.0
# How long stop() waits after SIGTERM (Mosquitto then writes its persistence file) before SIGKILL.
STOP_TIMEOUT_S = 10.0


def _which(name: str) -> str | None:
    path = os.pathsep.join([os.environ.get("PATH", ""), *_EXTRA_PATH])
    return shutil.which(name, path=path)


def find_mosquitto() -> str | None:
    """Path of the mosquitto broker binary, or None."""
    return _which("mosquitto")


def find_mosquitto_passwd() -> str | None:
    return _which("mosquitto_passwd")


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel says is free now (another process may still take it before we bind)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _directives(text: str) -> list[tuple[str, str]]:
    """(keyword, line) for each line; keyword is '' for comments and blank lines."""
    out = []
    for line in text.splitlines():
        stripped = line.strip()
        keyword = "" if not stripped or stripped.startswith("#") else stripped.split()[0]
        out.append((keyword, line))
    return out


def render_config(base: str, *, host: str, port: int, workdir: Path, open_: bool = False,
                  extra: Iterable[str] = (), ws_port: int | None = None) -> str:
    """The base config with its listener, persistence and auth paths moved to host:port and workdir.

    ``open_``: as a Mosquitto left at its defaults for who may do what (anonymous clients allowed, no password
    file, no ACL), to show what the worker and ``doctor`` say beside such a broker.
    ``extra``: config lines (e.g. ``"max_queued_messages 1000"``) that replace the base's line with the
    same keyword where it has one (in place), and are appended otherwise.
    ``ws_port``: also a listener for MQTT over WebSocket there (browsers: the web client), with the same
    accounts and ACL (``per_listener_settings`` is off: they are global)."""
    overrides: dict[str, str] = {}
    for line in extra:
        keyword = line.strip().split()[0] if line.strip() else ""
        if not keyword or keyword.startswith("#") or "\n" in line:
            raise ValueError(f"extra config line {line!r}: one 'keyword value' line expected")
        if keyword in ("listener", "persistence_location", "password_file", "acl_file"):
            raise ValueError(f"extra config line {line!r}: {keyword} is set by scripts/mosquitto.py")
        overrides[keyword] = line.strip()
    replace = {
        "persistence_location": f"persistence_location {workdir / 'data'}/",
        "password_file": f"password_file {workdir / 'passwd'}",
        "acl_file": f"acl_file {workdir / 'acl'}",
    }
    if open_:
        replace.update({"password_file": "# password_file dropped: open broker",
                        "acl_file": "# acl_file dropped: open broker", "allow_anonymous": "allow_anonymous true"})
    lines, seen, listeners = [], set(), 0
    for keyword, line in _directives(base):
        if keyword == "listener":
            listeners += 1
            if listeners > 1:
                raise ValueError("the base config has more than one active listener; comment out the others")
            line = f"listener {port} {host}"
        elif keyword in replace:
            line = replace[keyword]
        elif keyword == "pid_file":
            line = "# pid_file dropped: scripts/mosquitto.py tracks the process itself"
        elif keyword == "log_dest":
            # Whatever the base says, log to stderr, which start() sends to workdir/mosquitto.log.
            line = "log_dest stderr" if "log_dest" not in seen else "# second log_dest dropped"
        elif keyword in overrides:
            line = overrides.pop(keyword)
        seen.add(keyword)
        lines.append(line)
    lines.extend(overrides.values())
    if listeners == 0:
        lines.append(f"listener {port} {host}")
    for keyword, line in replace.items():
        if keyword not in seen and not line.startswith("#"):
            lines.append(line)
    if "persistence" not in seen:
        lines.append("persistence true")
    if ws_port is not None:  # after every global option: a listener's own options follow its line
        lines += [f"listener {ws_port} {host}", "protocol websockets"]
    return "\n".join(lines) + "\n"


def _run_as(base: str) -> tuple[int, int] | None:
    """The uid and gid Mosquitto will drop to when started as root (None when it will not switch)."""
    if os.geteuid() != 0:
        return None
    name = "mosquitto"
    for keyword, line in _directives(base):
        if keyword == "user":
            parts = line.split()
            name = parts[1] if len(parts) > 1 else name
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        if name != "mosquitto":
            raise RuntimeError(f"the config asks Mosquitto to run as {name!r}, which does not exist") from None
        entry = pwd.getpwnam("nobody")  # what Mosquitto itself falls back to
    return entry.pw_uid, entry.pw_gid


def write_password_file(path: Path, users: Mapping[str, str], passwd_binary: str | None = None) -> None:
    """Hashed password file: plain user:password lines, then ``mosquitto_passwd -U`` (no secret on argv)."""
    binary = passwd_binary or find_mosquitto_passwd()
    if binary is None:
        raise FileNotFoundError("mosquitto_passwd not found (Debian: apt-get install mosquitto)")
    for user, password in users.items():
        if not user or any(c in user for c in ":\n\r") or any(c in password for c in "\n\r"):
            raise ValueError(f"user {user!r}: no ':' or newline in a username, no newline in a password")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.writelines(f"{user}:{password}\n" for user, password in users.items())
    subprocess.run([binary, "-U", str(path)], check=True, capture_output=True, timeout=30)


class Mosquitto(BrokerProcess):
    """A Mosquitto process on host:port with its config, passwords, ACL and persistence in workdir.
    ``stop()``: SIGTERM, Mosquitto saves its persistence file on the way out; ``kill()``: SIGKILL, whatever
    arrived since the last autosave is lost; ``restart()``: same port, same persistence directory."""

    START_TIMEOUT_S, STOP_TIMEOUT_S = START_TIMEOUT_S, STOP_TIMEOUT_S

    def __init__(self, host: str, port: int, workdir: Path, binary: str, owner: tuple[int, int] | None,
                 ws_port: int | None = None):
        self.host, self.port, self.workdir, self.ws_port = host, port, workdir, ws_port
        self.binary, self._owner = binary, owner
        self.config_path = workdir / "mosquitto.conf"
        self.log_path = workdir / "mosquitto.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = START_TIMEOUT_S) -> "Mosquitto":
        """Run the broker and return once its port accepts TCP connections."""
        self.launch_process([self.binary, "-c", str(self.config_path)])
        end = time.monotonic() + timeout
        while True:
            code = self.proc.poll()
            if code is not None:
                raise RuntimeError(f"mosquitto exited with {code} on start:\n{self.log_tail()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    pass
            except OSError:
                if time.monotonic() > end:
                    self.kill()
                    raise TimeoutError(f"mosquitto not accepting on {self.host}:{self.port} "
                                       f"after {timeout}s:\n{self.log_tail()}") from None
                time.sleep(0.02)  # poll interval, not a guess at the start-up time
                continue
            if self.proc.poll() is None:  # the port is ours, not another process's
                return self

    def save(self) -> None:
        """SIGUSR1: write the persistence file now (so a following kill() loses nothing before it)."""
        if self.running:
            self.proc.send_signal(signal.SIGUSR1)

    def add_user(self, user: str, password: str) -> None:
        """Add or change a user, then SIGHUP so the running broker reloads the password file."""
        binary = find_mosquitto_passwd()
        if binary is None:
            raise FileNotFoundError("mosquitto_passwd not found")
        subprocess.run([binary, "-b", str(self.workdir / "passwd"), user, password], check=True,
                       capture_output=True, timeout=30)
        self._chown(self.workdir / "passwd")
        if self.running:
            self.proc.send_signal(signal.SIGHUP)

    def _chown(self, path: Path) -> None:
        if self._owner is not None:
            os.chown(path, *self._owner)


def start_mosquitto(users: Mapping[str, str] | Iterable[tuple[str, str]], *, port: int | None = None,
                    host: str = "127.0.0.1", config: Path | str = BASE_CONFIG, acl: Path | str = BASE_ACL,
                    timeout: float = START_TIMEOUT_S, open_: bool = False,
                    extra_config: Iterable[str] = (), ws_port: int | None = None) -> Mosquitto:
    """Lay out a temporary directory, start Mosquitto on host:port (a free port if None) and return it.

    ``users`` maps usernames to passwords; include the worker's account (im-worker). ``open_``: anonymous
    clients allowed, no password file and no ACL (see render_config); ``users`` are then ignored.
    ``extra_config``: lines that replace the base config's line with the same keyword, or are added.
    ``ws_port``: also listen for MQTT over WebSocket on host:ws_port (0: a free port; ``broker.ws_port`` says which).
    """
    extra_config = list(extra_config)
    binary = find_mosquitto()
    if binary is None:
        raise FileNotFoundError("mosquitto not found (Debian: apt-get install mosquitto)")
    users = dict(users)
    base = Path(config).read_text(encoding="utf-8")
    owner = _run_as(base)
    # Under /tmp, not pytest's tmp_path: that sits in a 0700 directory the mosquitto user cannot enter.
    workdir = Path(tempfile.mkdtemp(prefix="im-mosquitto-"))
    try:
        (workdir / "data").mkdir()
        shutil.copyfile(acl, workdir / "acl")
        if not open_:
            write_password_file(workdir / "passwd", users)
        attempts = 1 if port is not None else 3  # a port picked by free_port() may be taken before we bind
        for attempt in range(attempts):
            chosen = port if port is not None else free_port(host)
            ws = (ws_port or free_port(host)) if ws_port is not None else None
            (workdir / "mosquitto.conf").write_text(render_config(base, host=host, port=chosen, workdir=workdir,
                                                                  open_=open_, extra=extra_config, ws_port=ws),
                                                    encoding="utf-8")
            for path in (workdir, workdir / "data", workdir / "acl", workdir / "passwd", workdir / "mosquitto.conf"):
                if not path.exists():
                    continue  # no password file for an open broker
                os.chmod(path, 0o700 if path.is_dir() else 0o600)
                if owner is not None:
                    os.chown(path, *owner)
            broker = Mosquitto(host, chosen, workdir, binary, owner, ws_port=ws)
            try:
                return broker.start(timeout)
            except RuntimeError:
                if attempt + 1 == attempts or "in use" not in broker.log_tail():
                    raise
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    raise AssertionError("unreachable")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run Mosquitto with broker_config/ on a given or free port "
                                                 "until Ctrl-C; the temporary directory is removed on exit.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port (default: a free one)")
    parser.add_argument("--user", action="append", type=parse_user, default=[], metavar="USER:PASSWORD",
                        help="an account; repeat for each, e.g. --user alice:pw --user im-worker:secret")
    parser.add_argument("--config", default=str(BASE_CONFIG), help=f"base config (default: {BASE_CONFIG})")
    parser.add_argument("--acl", default=str(BASE_ACL), help=f"ACL file (default: {BASE_ACL})")
    parser.add_argument("--open", action="store_true",
                        help="anonymous clients allowed, no password file, no ACL: an INSECURE broker, as Mosquitto's "
                             "defaults leave it (to try `python -m backend doctor` or the worker's warning)")
    parser.add_argument("--ws-port", type=int, default=None,
                        help="also listen for MQTT over WebSocket on this port (0: a free one), for the web client")
    parser.add_argument("--set", action="append", default=[], metavar="'KEYWORD VALUE'", dest="extra",
                        help="a config line replacing the base's line with that keyword (or added), e.g. "
                             "--set 'max_queued_messages 1000'; repeat for more")
    args = parser.parse_args(argv)
    if not args.user and not args.open:
        parser.error("give at least one --user USER:PASSWORD (anonymous clients are refused)")
    try:
        broker = start_mosquitto(args.user, port=args.port, host=args.host, config=args.config, acl=args.acl,
                                 open_=args.open, extra_config=args.extra, ws_port=args.ws_port)
    except (FileNotFoundError, RuntimeError, TimeoutError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    ws = f", WebSocket on {broker.ws_port}" if broker.ws_port else ""
    return run_until_stopped(broker, f"mosquitto listening on {broker.host}:{broker.port}{ws} (pid {broker.proc.pid}); "
                                     f"files and log in {broker.workdir}", "mosquitto")


if __name__ == "__main__":
    raise SystemExit(main())
