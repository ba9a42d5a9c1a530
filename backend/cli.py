"""Command line: ``python -m backend serve | worker | user | keygen`` (installed: ``im-backend ...``)."""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import os
import secrets
import shlex
import signal
import socket
import sys
import threading

DEFAULT_DATABASE_URL = "sqlite:///data/im.db"
DEFAULT_PORT = 1883  # MQTT's IANA port
# How long Ctrl-C waits for the embedded broker to close client connections (systemd's stop timeout is 90 s;
# an interactive user expects seconds).
SHUTDOWN_TIMEOUT_S = 3
# How often the `worker` command's main thread checks for Ctrl-C/SIGTERM: a stop within half a second feels at once.
SIGNAL_POLL_S = 0.5


COMMANDS = ("serve", "worker", "web", "user", "device", "group", "doctor", "keygen")
DEFAULT_SHARE_GROUP = "im-workers"  # as backend.transport.worker.DEFAULT_SHARE_GROUP (not imported: startup time)
USER_COMMANDS = ("add", "remove", "list")


def program_name() -> str:
    """How the user ran us: ``im-backend`` (the installed command) or ``python -m backend``."""
    return "im-backend" if os.path.basename(sys.argv[0] or "") == "im-backend" else "python -m backend"


def self_command() -> str:
    """A command line that runs this backend again from any shell: this very interpreter (a venv's
    python has the dependencies; a bare ``python`` on PATH may not)."""
    return f"{shlex.quote(sys.executable)} -m backend"


def _db_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--database-url", default=os.environ.get("IM_DATABASE_URL", DEFAULT_DATABASE_URL),
                   help="sqlite:///PATH (relative to the current directory; four slashes for an absolute path), "
                        "postgresql://USER@HOST/DB or mysql://USER@HOST/DB "
                        f"(default: $IM_DATABASE_URL or {DEFAULT_DATABASE_URL})")


def _log_args(p: argparse.ArgumentParser, defaults: bool) -> None:
    """--log-level/--log-format: before the command (with the defaults) or after it (overriding them)."""
    level = os.environ.get("IM_LOG_LEVEL", "INFO") if defaults else argparse.SUPPRESS
    fmt = os.environ.get("IM_LOG_FORMAT", "text") if defaults else argparse.SUPPRESS
    p.add_argument("--log-level", default=level, type=str.upper,
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="log level (default: $IM_LOG_LEVEL or INFO)")
    p.add_argument("--log-format", default=fmt, choices=["text", "json"],
                   help="text lines, or one JSON object per line for log collectors (default: $IM_LOG_FORMAT or text)")


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


def _store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--expire-after", type=float, default=14 * 24 * 3600,
                   help="seconds an unread message waits before it expires; the receiver's next count says how "
                        "many did (default: 1209600, 14 days, as Signal's server)")
    p.add_argument("--encryption-key-file", default=None,
                   help="encrypt message content at rest (AES-256-GCM) with the keys in this file, one ID:BASE64 "
                        "per line, the first for new messages (default: $IM_ENCRYPTION_KEY, else off); "
                        "make one with `python -m backend keygen`")
    p.add_argument("--send-rate", type=float, default=20.0,
                   help="messages a second one user may send, sustained; excess gets rate_limited; 0 = no limit "
                        "(default: 20; per worker)")
    p.add_argument("--send-burst", type=int, default=100, help="burst allowance of --send-rate (default: 100)")
    p.add_argument("--announce-repeat", type=float, default=30.0,
                   help="seconds before an online receiver whose messages wait, and who has not pulled since, is "
                        "told again (a broker may have dropped the announcement); doubles up to 10 minutes "
                        "(default: 30)")
    p.add_argument("--quota", type=_non_negative, default=0,
                   help="most messages waiting for one receiver; past it senders get quota_exceeded "
                        "(default: 0, no limit)")
    p.add_argument("--max-devices", type=_non_negative, default=10,
                   help="most devices one user may register; one more is refused with too_many_devices, never "
                        "by evicting another (default: 10; 0 = no limit)")
    p.add_argument("--history-days", type=_non_negative_float, default=0,
                   help="keep delivered messages this many days, so a device can page back through a conversation "
                        "(op history); at most --expire-after (default: 0, a message leaves at its last ack)")
    p.add_argument("--max-group-members", type=_group_cap, default=1000,
                   help="most members one group may have; past it group_create/group_add are refused with "
                        "too_many_members (default: 1000, as OpenIM; at most 30000)")


def _store(args: argparse.Namespace, db, **kw):
    """The store with its limits and, if a key ring is given, encryption at rest (checked against the database)."""
    from .crypto import load_key_ring
    from .store import Store, check_keys
    keyring = load_key_ring(args.encryption_key_file, os.environ.get("IM_ENCRYPTION_KEY"))
    check_keys(keyring)
    return Store(db, quota=args.quota or None, expire_after_ms=int(args.expire_after * 1000), keyring=keyring,
                 max_devices=args.max_devices or None, max_group_members=args.max_group_members,
                 history_days=args.history_days, **kw)


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


def _group_cap(text: str) -> int:
    from .store import MAX_GROUP_MEMBERS_LIMIT
    value = _non_negative(text)
    if not 2 <= value <= MAX_GROUP_MEMBERS_LIMIT:
        raise argparse.ArgumentTypeError(f"must be from 2 to {MAX_GROUP_MEMBERS_LIMIT}")
    return value


def _delivery(args: argparse.Namespace):
    from .core import ANNOUNCE_REPEAT_MAX_MS, Delivery
    repeat_ms = max(1, int(args.announce_repeat * 1000))
    return Delivery(send_rate=args.send_rate, send_burst=args.send_burst, announce_repeat_ms=repeat_ms,
                    announce_repeat_max_ms=max(repeat_ms, ANNOUNCE_REPEAT_MAX_MS))


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError("must be more than 0")
    return value


def _push_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--push-allow-hosts", default=None, metavar="HOST[,HOST]",
                   help="push gateways the worker may POST notifications to (host names, comma-separated); "
                        "another host's endpoint is refused at each notification (default: any https:// host, "
                        "but a DNS name may resolve inside your network (SSRF): set this in production)")
    p.add_argument("--push-timeout", type=_positive, default=5.0,
                   help="seconds one notification POST may take before it is retried with backoff (default: 5, "
                        "as Sygnal's and most push SDKs' order of magnitude)")
    p.add_argument("--presence-settle", type=_positive, default=10.0, metavar="SECONDS",
                   help="after each connection to the broker, wait this long for devices to restate their presence, "
                        "then notify the devices that wait for something no notification told them of (a broker "
                        "that died sent no last wills); default: 10, past the reference client's reconnect backoff")
    p.add_argument("--no-push", dest="push", action="store_false",
                   help="send no push notifications, for deployments without outbound HTTPS (default: send them "
                        "to the endpoints devices register)")


def _push_options(args: argparse.Namespace) -> dict:
    hosts = {h.strip().lower() for h in (args.push_allow_hosts or "").split(",") if h.strip()}
    return {"allowed_hosts": hosts or None, "request_timeout": args.push_timeout}


def _metrics_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--metrics-port", type=_port, default=None,
                   help="serve Prometheus metrics on /metrics and a health check on /healthz here (default: off)")
    p.add_argument("--metrics-host", default="127.0.0.1", help="address for --metrics-port (default: 127.0.0.1)")


def _broker_args(p: argparse.ArgumentParser) -> None:
    """The broker and the worker's account on it (`worker` and `doctor`)."""
    p.add_argument("--broker", default=os.environ.get("IM_BROKER_URL", "mqtt://127.0.0.1:1883"),
                   help="mqtt://[user[:pass]@]host:port, the worker's account (default: $IM_BROKER_URL or "
                        "mqtt://127.0.0.1:1883); the nodes of a cluster comma-separated "
                        "(mqtt://im-worker@n1:1883,n2:1883): the worker moves to the next when its node fails "
                        "(doctor checks the first); prefer $IM_BROKER_PASSWORD or --password-file to a password in "
                        "the URL")
    p.add_argument("--password-file", help="file holding the worker's broker password")
    p.add_argument("--ca-file", help="CA bundle to verify an mqtts:// broker with (default: the system's CAs)")


def default_worker_id() -> str:
    """Unique per process (host name, then a random suffix): two workers started without --id on one host must
    never share a client id (the broker would keep disconnecting one for the other). With clean sessions (the
    default) nothing needs the id to be stable across restarts."""
    return f"{socket.gethostname() or 'worker'}-{secrets.token_hex(3)}"


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line: the command, what was wrong, the closest choice, where the usage
    is. (argparse's own put a usage block of up to 22 lines above the error, where a trial found it buried.)
    Subcommands' parsers are of this class too (add_subparsers makes them of their parent's class)."""

    def error(self, message: str):  # type: ignore[override]
        import difflib
        import re
        wrong = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if wrong:
            close = difflib.get_close_matches(wrong.group(1), re.findall(r"'([^']*)'", wrong.group(2)), n=1)
            if close:
                message += f" (did you mean {close[0]}?)"
        self.exit(2, f"{self.prog}: error: {message}; {self.prog} --help shows the usage\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=program_name(),
                                     description="MQTT instant-messaging backend: no message lost, none shown twice.")
    _log_args(parser, defaults=True)
    # Each command also takes --log-level/--log-format after its name (`serve --log-level DEBUG`).
    logs = _Parser(add_help=False)
    _log_args(logs, defaults=False)
    # Not required=True: argparse would then say "required: command", naming our internal dest (main() says it).
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")

    s = sub.add_parser("serve", parents=[logs], help="run the embedded MQTT broker (amqtt) and the worker in one process",
                       description="Run the embedded MQTT broker (amqtt, MQTT 3.1.1) with the worker beside it. "
                                   "Only accounts made with `user add` may connect. Ctrl-C stops both.")
    s.add_argument("--host", default="0.0.0.0", help="address to listen on (default: 0.0.0.0)")
    s.add_argument("--port", type=_port, default=DEFAULT_PORT, help=f"plaintext MQTT port (default: {DEFAULT_PORT})")
    s.add_argument("--tls-cert", help="certificate (chain) in PEM: enables MQTT over TLS on --tls-port")
    s.add_argument("--tls-key", help="private key of --tls-cert, in PEM")
    s.add_argument("--tls-port", type=_port, default=8883, help="MQTT over TLS port (default: 8883, its IANA port)")
    s.add_argument("--tls-only", action="store_true", help="no plaintext listener: TLS (and WSS) only")
    s.add_argument("--presence", choices=["all", "self"], default="all",
                   help="who may see a user's online/offline status: every user (a buddy list), or only the user "
                        "itself (default: all)")
    s.add_argument("--ws-port", type=_port, default=None,
                   help="also listen for MQTT over WebSocket (TLS when --tls-cert is given), for browser clients "
                        "(default: off)")
    s.add_argument("--web-port", type=_port, default=None,
                   help="also serve the web client (a chat in the browser) on this port, over HTTPS when "
                        "--tls-cert is given; needs --ws-port, where the page connects (default: off)")
    _db_arg(s)
    _store_args(s)
    _push_args(s)
    _metrics_args(s)

    w = sub.add_parser("worker", parents=[logs], help="run the worker alone, beside any MQTT 3.1.1/5 broker",
                       description="Run the worker beside an existing broker (Mosquitto, EMQX, ...). "
                                   "The broker must enforce the per-user topic ACL (see broker_config/).")
    _broker_args(w)
    w.add_argument("--id", default=None,
                   help="this worker's name; its MQTT client id is im-worker-NAME, which must differ between "
                        "workers on one broker (default: the host name and a random suffix, unique per process)")
    w.add_argument("--client-id", default=None,
                   help="exact MQTT client id instead of im-worker-NAME (default: derived from --id)")
    w.add_argument("--persistent-session", action="store_true",
                   help="keep a persistent MQTT session (needs --id or --client-id), so the broker queues what "
                        "arrives while this worker is down; for ONE worker whose clients never resend. With "
                        "several workers, a stopped worker's session keeps taking its share of the traffic "
                        "(default: off, a clean session; see broker_config/README.md)")
    # Default None, so a --share-group given beside --partitions is noticed (they are alternatives).
    w.add_argument("--share-group", default=None,
                   help="MQTT shared-subscription group for send/ack/req ($share/GROUP/...), so several workers "
                        "split the load; '' subscribes plainly, for brokers without $share; not with --partitions "
                        f"(default: {DEFAULT_SHARE_GROUP})")
    w.add_argument("--partitions", type=int, default=None, metavar="N",
                   help="share the work between N workers without $share (NATS, RabbitMQ): each subscribes plainly "
                        "and keeps the users of its --partition (crc32(uid) %% N); implies a persistent session "
                        "under a fixed client id (im-worker-pIofN unless --id/--client-id), so while a worker is "
                        "down its users' sends wait at the broker until it returns: run each under a supervisor. "
                        "Every worker must get the same N (default: 1, no partitions)")
    w.add_argument("--partition", type=int, default=None, metavar="I",
                   help="with --partitions N: the partition this worker serves, 0 to N-1 (start one worker for each)")
    _db_arg(w)
    _store_args(w)
    _push_args(w)
    _metrics_args(w)

    d = sub.add_parser("doctor", parents=[logs], help="check a broker for what the worker needs (rights, $share, limits)",
                       description="Probe an MQTT broker with short-lived clients and print one verdict per line "
                                   "(ok / WARN / FAIL and what to do): per-user rights, $share delivery, payload "
                                   "size, queue length, keepalive, retained messages on wildcards, latency. Exits "
                                   "1 on any FAIL. Takes a few seconds; leaves no session or retained message.")
    _broker_args(d)

    wb = sub.add_parser("web", parents=[logs], help="serve the web client beside a broker's WebSocket listener",
                        description="Serve the web client (static files: a chat in the browser) on --port. The page "
                                    "logs in to the broker over MQTT-over-WebSocket with the user's own account; run "
                                    "a worker beside that broker. Ctrl-C stops.")
    wb.add_argument("--host", default="0.0.0.0", help="address to listen on (default: 0.0.0.0)")
    wb.add_argument("--port", type=_port, default=8080, help="HTTP port (default: 8080)")
    wb.add_argument("--ws-url", default=None,
                    help="the broker's WebSocket listener as the browser reaches it, e.g. wss://chat.example:8081/mqtt "
                         "(default: the page's own host on --ws-port)")
    wb.add_argument("--ws-port", type=_port, default=9001,
                    help="without --ws-url: the WebSocket port on the page's own host (default: 9001)")
    wb.add_argument("--ws-tls", action="store_true", help="without --ws-url: wss:// (default: ws://, wss:// when "
                                                          "the page itself is served over HTTPS)")
    wb.add_argument("--tls-cert", help="certificate (chain) in PEM: serve the page over HTTPS")
    wb.add_argument("--tls-key", help="private key of --tls-cert, in PEM")

    k = sub.add_parser("keygen", parents=[logs], help="print a new encryption key line (ID:BASE64) for --encryption-key-file")
    k.add_argument("--id", default="k1", help="the key id stored with each row it seals (default: k1)")

    u = sub.add_parser("user", parents=[logs], help="manage accounts of the embedded broker")
    usub = u.add_subparsers(dest="user_command", metavar="{" + ",".join(USER_COMMANDS) + "}")
    ua = usub.add_parser("add", parents=[logs], help="add a user, or set its password (kept as a salted scrypt hash)")
    ua.add_argument("uid")
    ua.add_argument("--password", help="the password (default: $IM_USER_PASSWORD, else asked twice on the terminal)")
    _db_arg(ua)
    ur = usub.add_parser("remove", parents=[logs], help="remove a user")
    ur.add_argument("uid")
    _db_arg(ur)
    ul = usub.add_parser("list", parents=[logs], help="list users")
    _db_arg(ul)

    dv = sub.add_parser("device", parents=[logs], help="list or remove a user's devices (docs/PROTOCOL.md, Devices)")
    dsub = dv.add_subparsers(dest="device_command", metavar="{list,remove}")
    dl = dsub.add_parser("list", parents=[logs], help="list a user's devices (\"\" is the default device: the v1 topics)")
    dl.add_argument("uid")
    _db_arg(dl)
    dr = dsub.add_parser("remove", parents=[logs], help="remove a device: what waits only for it leaves the store")
    dr.add_argument("uid")
    dr.add_argument("device", help="the device id (\"\" for the default device)")
    _db_arg(dr)
    gr = sub.add_parser("group", parents=[logs], help="list, show, create and change groups (docs/PROTOCOL.md, Groups)")
    gsub = gr.add_subparsers(dest="group_command", metavar="{list,show,create,add,remove}")
    gl = gsub.add_parser("list", parents=[logs], help="list every group, or a user's groups")
    gl.add_argument("uid", nargs="?", default=None)
    _db_arg(gl)
    gs = gsub.add_parser("show", parents=[logs], help="a group's name, owner and members")
    gs.add_argument("group")
    _db_arg(gs)
    gc = gsub.add_parser("create", parents=[logs], help="create a group owned by OWNER, with MEMBERS")
    gc.add_argument("group", help="the group id: 1-32 characters of A-Z a-z 0-9 _ -")
    gc.add_argument("owner")
    gc.add_argument("members", nargs="*")
    gc.add_argument("--name", default=None, help="the group's name (default: its id)")
    _db_arg(gc)
    for name, what in (("add", "add members (as the group's owner)"), ("remove", "remove members (as the owner): "
                                                                       "what waits for them in the group is released")):
        ga = gsub.add_parser(name, parents=[logs], help=what)
        ga.add_argument("group")
        ga.add_argument("members", nargs="+")
        _db_arg(ga)
    parser.user_parser = u  # main() reports a missing user command with its usage
    return parser


def _innermost(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the (sub)command ``args`` chose: `serve`'s for `serve --prot`, `user add`'s for `user add`."""
    while True:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        chosen = getattr(args, subs[0].dest, None) if subs else None
        if chosen is None or chosen not in subs[0].choices:
            return parser
        parser = subs[0].choices[chosen]


def _refuse_unknown(parser: argparse.ArgumentParser, args: argparse.Namespace, extra: list[str]) -> None:
    """One line from the command's own parser (a flag typo is not a wrong command), naming the closest option:
    `python -m backend serve: error: unrecognized arguments: --prot 1884 (did you mean --port?); python -m
    backend serve --help shows the usage`. Exits 2, as argparse does."""
    import difflib
    own = _innermost(parser, args)
    options = [o for a in own._actions for o in a.option_strings if o.startswith("--")]
    hint = ""
    for word in extra:
        if word.startswith("--"):
            close = difflib.get_close_matches(word.split("=", 1)[0], options, n=1, cutoff=0.75)
            if close:
                hint = f" (did you mean {close[0]}?)"
            break
    own.error(f"unrecognized arguments: {' '.join(extra)}{hint}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        _refuse_unknown(parser, args, extra)
    if args.command is None:
        parser.error(f"choose a command: {', '.join(COMMANDS)}")
    if args.command == "device" and args.device_command is None:
        _innermost(parser, args).error("choose a device command: list, remove")
    if args.command == "group" and args.group_command is None:
        _innermost(parser, args).error("choose a group command: list, show, create, add, remove")
    if args.command == "user" and args.user_command is None:
        parser.user_parser.error(f"choose a user command: {', '.join(USER_COMMANDS)}")
    if args.log_format == "json":
        handler = logging.StreamHandler()
        handler.setFormatter(JsonFormatter())
        logging.basicConfig(level=args.log_level, handlers=[handler])
    else:
        logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # amqtt and transitions are noise below WARNING. Even at DEBUG, amqtt stays at INFO and peewee above DEBUG:
    # their DEBUG lines hold whole packets and every SQL statement's parameters, i.e. message content,
    # which never goes to a log line.
    for noisy in ("amqtt", "transitions"):
        logging.getLogger(noisy).setLevel(logging.WARNING if args.log_level != "DEBUG" else logging.INFO)
    logging.getLogger("peewee").setLevel(logging.INFO)
    logging.getLogger("backend").debug("logging at %s as %s", args.log_level, args.log_format)
    if args.command == "keygen":
        from .crypto import new_key_line
        print(new_key_line(args.id))
        return 0
    if args.command == "web":
        return _web(args)
    if args.command == "doctor":
        from .doctor import main as doctor
        from .transport.connection import parse_broker_urls
        try:
            return doctor(parse_broker_urls(args.broker, _broker_password(args), args.ca_file)[0])
        except (ValueError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    from .crypto import KeyError_
    from .store import DatabaseOpenError, check_database_url
    try:
        check_database_url(args.database_url)  # before anything listens or asks for a password
        if args.command == "user":
            return _user(args)
        if args.command == "device":
            return _device(args)
        if args.command == "group":
            return _group(args)
        if args.command == "worker":
            return _worker(args)
        return _serve(args)
    except (KeyError_, OSError, DatabaseOpenError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        import json
        out = {"ts": round(record.created, 3), "level": record.levelname, "logger": record.name,
               "message": record.getMessage()}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def _metrics_port_taken(args: argparse.Namespace) -> bool:
    """Say in one line (and return True) when --metrics-port cannot be had, before anything starts."""
    if args.metrics_port is not None and port_in_use(args.metrics_host, args.metrics_port):
        print(f"error: --metrics-port {args.metrics_port} is already in use on {args.metrics_host}; pick a free "
              f"port, or leave --metrics-port out", file=sys.stderr)
        return True
    return False


def _port(text: str) -> int:
    """A TCP port: 0-65535."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port: give 1-65535")
    return value


def _start_metrics(args: argparse.Namespace, worker) -> None:
    if args.metrics_port is not None:
        from .metrics import serve_http
        serve_http(worker.metrics, worker.healthy, args.metrics_host, args.metrics_port)
        logging.getLogger("backend").info("metrics on http://%s:%s/metrics", args.metrics_host, args.metrics_port)


def _ask_password(uid: str) -> str | None:
    """The password from the terminal, typed twice when interactive, or the first line of standard input when
    it is piped (`echo pw | im-backend user add bob`: getpass would read the terminal instead, or warn that it
    cannot hide the echo); None (after one line) if the user gave up (Ctrl-C, Ctrl-D) or the two differ."""
    import getpass
    try:
        if not sys.stdin.isatty():
            line = sys.stdin.readline()
            if not line:
                raise EOFError
            return line.rstrip("\r\n")
        password = getpass.getpass(f"password for {uid}: ")
        if sys.stdin.isatty() and password:
            if getpass.getpass(f"password for {uid} again: ") != password:
                print("error: the two passwords differ; nothing changed, run the command again", file=sys.stderr)
                return None
    except (KeyboardInterrupt, EOFError):
        print(f"\nuser add cancelled: {uid} not changed", file=sys.stderr)
        return None
    return password


def _require_existing(url: str) -> None:
    """Commands that only read or change existing data (user list/remove, device list/remove) never create a
    SQLite file: a mistyped path, or another current directory, would show an empty, new database."""
    from .store import DatabaseOpenError
    if url.startswith("sqlite") and ":///" in url:
        path = url.split(":///", 1)[1].split("?", 1)[0]
        if path and path != ":memory:" and not os.path.exists(path):
            where = "" if os.path.isabs(path) else f" (relative to {os.getcwd()})"
            raise DatabaseOpenError(f"no database at {path!r}{where}: `serve` and `user add` create it; check "
                                    f"--database-url and the directory you run this from")


def _new_sqlite_file(url: str) -> str | None:
    """The absolute path of the SQLite file ``url`` names if it does not exist yet (the command creates it),
    else None: a `user add` run from another directory makes a second, empty database, which a trial took for
    the server's (its login then refused)."""
    if url.startswith("sqlite") and ":///" in url:
        path = url.split(":///", 1)[1].split("?", 1)[0]
        if path and path != ":memory:" and not os.path.exists(path):
            return os.path.abspath(path)
    return None


def _user(args: argparse.Namespace) -> int:
    from . import accounts, protocol
    from .store import open_database, redact_url
    password = None  # (main() checked the database URL's form already: it fails before the password is asked)
    if args.user_command == "add":
        if not protocol.valid_uid(args.uid):
            print("error: a uid is 1-50 characters of A-Z a-z 0-9 _ . -", file=sys.stderr)
            return 2
        password = args.password or os.environ.get("IM_USER_PASSWORD")
        if not password:
            password = _ask_password(args.uid)
            if password is None:
                return 1
    else:
        _require_existing(args.database_url)
    fresh = _new_sqlite_file(args.database_url)
    fresh_rel = args.database_url.split(":///", 1)[-1]
    open_database(args.database_url)
    if args.user_command == "add":
        try:
            new = accounts.add_user(args.uid, password)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        # Which database: serve must use it too. An existing user's password is replaced: say so (a typo'd uid
        # that matched someone else's account would otherwise pass unnoticed).
        print(f"user {args.uid} saved in {redact_url(args.database_url)}"
              + ("" if new else f" ({args.uid} existed: its password is changed)")
              + (f" (a new database: {fresh}" + ("" if os.path.isabs(fresh_rel) else
                                                    f"; `serve` run from {os.getcwd()} uses it") + ")"
                 if fresh else ""))
    elif args.user_command == "remove":
        if not accounts.remove_user(args.uid):
            print(f"error: no user {args.uid}", file=sys.stderr)
            return 1
        print(f"user {args.uid} removed")
    else:
        users = accounts.list_users()
        for uid in users:
            print(uid)
        if not users:  # say where we looked: an empty list from another directory's data/ is a common slip
            print(f"no users in {redact_url(args.database_url)}", file=sys.stderr)
    return 0


def _device(args: argparse.Namespace) -> int:
    import time
    from .store import Store, open_database
    _require_existing(args.database_url)
    db = open_database(args.database_url)
    store = Store(db)
    if args.device_command == "list":
        rows = store.devices(args.uid)  # online or not: see im/status/UID/DEV
        if not rows:
            print(f"{args.uid} has no devices")
        for d in rows:
            seen = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(d["last_seen"] / 1000))
            name = d["device"] or '"" (default)'
            print(f"{name}\tlast seen {seen} UTC\tpush {'yes' if d['push'] else 'no'}")
        return 0
    with db.atomic():
        released = store.remove_device(args.uid, args.device)
    if released is None:
        print(f"error: {args.uid} has no device {args.device!r}; see `device list {args.uid}`", file=sys.stderr)
        return 1
    print(f"device {args.device!r} of {args.uid} removed ({released} waiting entries released)")
    return 0


def _group(args: argparse.Namespace) -> int:
    """Groups from the command line, on the database directly (as the group's owner). A change is stored as
    the group's next membership event like any other, and its users are written to the store's outbox in the
    same transaction: the running workers read it within OUTBOX_POLL_S (2 s) and announce those users' online
    devices, whose sync fetches the event (this command has no broker connection to push it)."""
    from . import core, protocol
    from .store import Group, Store, open_database
    if args.group_command != "create":
        _require_existing(args.database_url)
    db = open_database(args.database_url)
    store = Store(db)
    if args.group_command == "list":
        if args.uid is not None:
            rows = [(g["group"], g["name"], g["members"], g["role"]) for g in store.groups_of(args.uid)]
        else:
            rows = [(g, n, m, o) for g, n, m, o in Group.select(Group.gid, Group.name, Group.members, Group.owner)
                    .order_by(Group.gid).tuples()]
        for gid, name, members, extra in rows:
            print(f"{gid}\t{name}\t{members} members\t{'role' if args.uid else 'owner'} {extra}")
        if not rows:
            print("no groups" + (f" for {args.uid}" if args.uid else ""), file=sys.stderr)
        return 0
    if not protocol.valid_group(args.group):
        print("error: a group id is 1-32 characters of A-Z a-z 0-9 _ -", file=sys.stderr)
        return 2
    group = Group.get_or_none(Group.gid == args.group)
    if args.group_command != "create" and group is None:
        print(f"error: no group {args.group!r}; see `group list`", file=sys.stderr)
        return 1
    bad = [u for u in getattr(args, "members", []) + ([args.owner] if args.group_command == "create" else [])
           if not protocol.valid_uid(u)]
    if bad:
        print(f"error: {bad[0]!r} is not a uid (1-50 characters of A-Z a-z 0-9 _ . -)", file=sys.stderr)
        return 2
    if args.group_command == "create" and group is not None:
        print(f"error: group {args.group!r} exists (owner {group.owner}); see `group show {args.group}`", file=sys.stderr)
        return 1
    if args.group_command in ("create", "add"):
        # With serve's accounts in this database, a uid without one is a typo (beside an external broker the
        # accounts are the broker's and this table is empty: nothing to check against).
        from .store import User
        named = list(dict.fromkeys(args.members + ([args.owner] if args.group_command == "create" else [])))
        if User.select().exists():
            known = {u for (u,) in User.select(User.uid).where(User.uid.in_(named)).tuples()}
            missing = [u for u in named if u not in known]
            if missing:
                print(f"error: no account {missing[0]!r} in this database (`user list` shows them; `user add` "
                      f"makes one); nothing changed", file=sys.stderr)
                return 1
    actor = args.owner if args.group_command == "create" else group.owner
    if args.group_command == "show":
        op = "group_members"
        fields: dict = {}
    elif args.group_command == "create":
        op, fields = "group_create", {"members": tuple(args.members), "name": args.name or args.group}
    else:
        op, fields = f"group_{args.group_command}", {"members": tuple(dict.fromkeys(args.members))}
    if group is not None and args.group_command in ("add", "remove"):
        from .store import Member
        have = {u for (u,) in Member.select(Member.uid).where(Member.gid == args.group).tuples()}
        for uid in args.members:
            if (uid in have) == (args.group_command == "add"):
                print(f"note: {uid} {'is already' if uid in have else 'is not'} a member of {args.group}",
                      file=sys.stderr)
    request = protocol.GroupRequest(req_id="cli", op=op, group=args.group, **fields)
    with db.atomic():
        (out,) = store.apply([core.GroupOp(actor, "cli", "", request)])
        if isinstance(out, core.GroupAnswered) and out.events:
            # The workers announce these users' online devices (their sync fetches the event): the outbox.
            store.note_outbox(uid for ev in out.events for uid, _ in ev.devices)
    if isinstance(out, core.Refused):
        print(f"error: {out.message}", file=sys.stderr)
        return 1
    state = out.payload
    print(f"{state['group']}\t{state['name']}\towner {state['owner']}\tgseq {state['gseq']}")
    for m in state["members"]:
        print(f"  {m['uid']}\t{m['role']}")
    return 0


def _wait_for_signal() -> threading.Event:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def _broker_password(args: argparse.Namespace) -> str | None:
    if args.password_file:
        with open(args.password_file, encoding="utf-8") as f:
            return f.read().strip()
    return os.environ.get("IM_BROKER_PASSWORD")


def _worker(args: argparse.Namespace) -> int:
    from .store import open_database
    from .transport.connection import parse_broker_urls
    from .transport.worker import Worker
    if _metrics_port_taken(args):
        return 2
    password = _broker_password(args)
    try:
        addresses = parse_broker_urls(args.broker, password, args.ca_file)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from .partition import Partition, partition_error
    if args.partition is not None and args.partitions is None:
        print(f"error: --partition {args.partition} needs --partitions N (how many workers share the uids; each "
              f"gets the same N and its own --partition, 0 to N-1)", file=sys.stderr)
        return 2
    args.partitions = 1 if args.partitions is None else args.partitions
    error = partition_error(args.partitions, args.partition)
    if error is None and args.partitions > 1 and args.share_group:
        error = (f"--partitions and --share-group {args.share_group!r} exclude each other: partitioned workers "
                 "subscribe plainly (for brokers without $share); beside a broker with $share, use --share-group "
                 "alone")
    if error is not None:
        print(f"error: {error}", file=sys.stderr)
        return 2
    partition = Partition(args.partitions, args.partition) if args.partitions > 1 else None
    share_group = None if partition else (DEFAULT_SHARE_GROUP if args.share_group is None else args.share_group or None)
    persistent = args.persistent_session or partition is not None
    if args.persistent_session and not (args.id or args.client_id) and partition is None:
        print("error: --persistent-session needs a stable --id (or --client-id): a session under the default, "
              "random client id would never be resumed", file=sys.stderr)
        return 2
    log = logging.getLogger("backend")
    db = open_database(args.database_url)
    # With partitions, a given --id still gets the partition in its client id: workers started with one --id and
    # two partitions would otherwise take each other's session over, again and again.
    client_id = args.client_id or (f"im-worker-{args.id}" + (f"-p{partition.index}of{partition.count}" if partition
                                                              else "") if args.id else
                                   partition.client_id if partition else f"im-worker-{default_worker_id()}")
    stop = _wait_for_signal()
    worker = Worker(addresses, _store(args, db), client_id=client_id, share_group=share_group,
                    delivery=_delivery(args), clean_session=not persistent, partition=partition,
                    on_fatal=lambda _message: stop.set(), push=args.push, push_options=_push_options(args),
                    presence_settle=args.presence_settle)
    if partition is not None:
        log.info("serving %s (the uids u with crc32(u) %% %d == %d) under the persistent session %s: while this "
                 "worker is down, its users' sends and requests wait at the broker until it returns",
                 partition, partition.count, partition.index, client_id)
    if args.persistent_session and share_group:
        log.warning("persistent session %s in the shared group %s: while this worker is stopped, the broker "
                    "keeps handing its session a share of the traffic, which waits there until it returns; "
                    "to retire it, clear its session (broker_config/README.md)", client_id, share_group)
    _start_metrics(args, worker)
    worker.start()
    # "connecting", not "running": the broker may still refuse its login (then one error line, and exit 2).
    log.info("worker connecting to %s; Ctrl-C stops", ", ".join(f"{a.host}:{a.port}" for a in addresses))
    from .doctor import check_at_start

    def check() -> None:  # on the node the worker got connected to (the first address may be down)
        while not worker.connected.wait(0.5) and not stop.is_set():
            pass
        check_at_start(worker.broker, worker.metrics, worker.connected, stop)

    threading.Thread(target=check, name="im-broker-check", daemon=True).start()
    # Wake up now and then: Python runs signal handlers on the main thread only, and a Ctrl-C the kernel hands
    # to another thread (the push or network thread) would leave a wait without timeout asleep for ever.
    while not stop.wait(SIGNAL_POLL_S):
        pass
    if worker.fatal:
        worker.stop()
        print(f"error: {worker.fatal}", file=sys.stderr)
        return 2
    log.info("stopping")
    worker.stop()
    log.info("stopped")
    return 0


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            return e.errno == errno.EADDRINUSE
    return False


def _listeners(args: argparse.Namespace):
    from .transport.embedded import Listeners
    tls = bool(args.tls_cert)
    return Listeners(host=args.host, port=None if args.tls_only else args.port,
                     tls_port=args.tls_port if tls else None, ws_port=args.ws_port,
                     certfile=args.tls_cert, keyfile=args.tls_key, presence=args.presence)


def _start_web(host: str, port: int, ws: dict, certfile: str | None, keyfile: str | None):
    """The web client's server (backend/web), started; None after saying why it cannot listen."""
    from .web import WebServer
    try:
        server = WebServer(host, port, ws, certfile, keyfile).start()
    except OSError as e:
        print(f"error: the web client cannot listen on {host}:{port}: {e.strerror or e}", file=sys.stderr)
        return None
    logging.getLogger("backend").info("web client on %s (open it in a browser)", server.url)
    return server


def _tls_files_error(args: argparse.Namespace) -> str | None:
    """What is wrong with --tls-cert/--tls-key, in one line naming the flag, or None (the TLS library's own
    message for a missing file names its parameter: "'certfile' does not exist : /x.pem", a trial found)."""
    if bool(args.tls_cert) != bool(args.tls_key):
        return "--tls-cert and --tls-key go together"
    for flag, path in (("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key)):
        if path and not os.path.isfile(path):
            return f"{flag} {path}: no such file (give the PEM file's path)"
    return None


def _web(args: argparse.Namespace) -> int:
    if (why := _tls_files_error(args)) is not None:
        print(f"error: {why}", file=sys.stderr)
        return 2
    if args.ws_url is not None and not args.ws_url.startswith(("ws://", "wss://")):
        print(f"error: --ws-url {args.ws_url!r}: give a ws:// or wss:// URL", file=sys.stderr)
        return 2
    ws = {"url": args.ws_url} if args.ws_url else {"port": args.ws_port, "path": "/mqtt",
                                                    "tls": bool(args.ws_tls or args.tls_cert)}
    server = _start_web(args.host, args.port, ws, args.tls_cert, args.tls_key)
    if server is None:
        return 2
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(SIGNAL_POLL_S):
        pass
    server.stop()
    return 0


def _serve(args: argparse.Namespace) -> int:
    if (why := _tls_files_error(args)) is not None:
        print(f"error: {why}", file=sys.stderr)
        return 2
    if args.web_port is not None and args.ws_port is None:
        print("error: --web-port needs --ws-port (the page connects to the broker there), e.g. --ws-port 9001",
              file=sys.stderr)
        return 2
    if args.tls_only and not args.tls_cert:
        print("error: --tls-only needs --tls-cert and --tls-key", file=sys.stderr)
        return 2
    if _metrics_port_taken(args):
        return 2
    # The web page's and the WebSocket's ports say which flag to change; the MQTT ports, that a broker may be there.
    other = {p: f for p, f in ((args.ws_port, "--ws-port"), (args.web_port, "--web-port"), (args.tls_port, "--tls-port"))
             if p is not None}
    for port in _listeners(args).ports() + ([args.web_port] if args.web_port is not None else []):
        if port_in_use(args.host, port):
            if port in other and port != args.port:
                print(f"error: port {port} ({other[port]}) is already in use; pick a free one with {other[port]}",
                      file=sys.stderr)
                return 2
            # If it is an MQTT broker, the worker can run beside it, with an account of its own there (the
            # accounts of `user add` are serve's: README, "Beside an existing broker").
            print(f"error: port {port} is already in use (another MQTT broker?). Pick a free one with "
                  f"--port, or, if it is an MQTT broker, run the worker beside it with an account of its own there: "
                  f"{self_command()} worker --broker mqtt://im-worker@127.0.0.1:{port} "
                  f"--database-url {args.database_url}", file=sys.stderr)
            return 2
    return asyncio.run(_serve_async(args))


async def _serve_async(args: argparse.Namespace) -> int:
    from .accounts import WORKER_USERNAME
    from .store import open_database, redact_url
    from .transport.embedded import start_broker
    from .transport.worker import BrokerAddress, Worker
    log = logging.getLogger("backend")
    db = open_database(args.database_url)
    store = _store(args, db, known_accounts=True)  # refuses a wrong encryption key before anything listens
    worker_password = secrets.token_urlsafe(24)  # lives only in this process
    listeners = _listeners(args)
    from amqtt.errors import BrokerError
    amqtt_log = logging.getLogger("amqtt.broker")
    level = amqtt_log.level
    if args.log_level != "DEBUG":
        amqtt_log.setLevel(logging.CRITICAL)  # it logs a failed start as a traceback; we say it in one line
    try:
        broker = await start_broker(listeners, worker_password)
    except BrokerError as e:  # e.g. --host not an address of this machine; a port taken since the check
        cause = e.__cause__.strerror if isinstance(e.__cause__, OSError) and e.__cause__.strerror else e
        print(f"error: the embedded broker cannot listen: {cause}; check --host and the ports", file=sys.stderr)
        return 2
    finally:
        amqtt_log.setLevel(level)
    connect_host = "127.0.0.1" if args.host in ("0.0.0.0", "") else args.host
    # The in-process worker: plaintext on loopback, or with --tls-only over TLS without verification
    # (the broker is this very process; there is no one in between to verify).
    address = BrokerAddress(connect_host, args.port, WORKER_USERNAME, worker_password) if listeners.port else \
        BrokerAddress(connect_host, listeners.tls_port, WORKER_USERNAME, worker_password, tls=True, verify=False)
    worker = Worker(address,
                    store, client_id="!im-worker", skip_retained=False, delivery=_delivery(args),
                    restore_presence=False, split_uid_filters=False,  # amqtt sends retained statuses to
                    push=args.push, push_options=_push_options(args),  # im/status/+ itself, never rewrites a topic
                    presence_settle=args.presence_settle)
    worker.metrics.rights_enforced.set(1)  # the embedded broker enforces the per-user rights itself
    web = None
    if args.web_port is not None:  # the page reaches the broker on its own host name, at --ws-port
        web = _start_web(args.host, args.web_port, {"port": args.ws_port, "path": "/mqtt", "tls": bool(args.tls_cert)},
                         args.tls_cert, args.tls_key)
        if web is None:
            await broker.shutdown()
            return 2
    _start_metrics(args, worker)
    worker.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    log.info("serving MQTT on %s ports %s with database %s; Ctrl-C stops", args.host,
             ", ".join(f"{name} {port}" for name, port in (("mqtt", listeners.port), ("mqtts", listeners.tls_port),
                                                           ("ws", listeners.ws_port)) if port),
             redact_url(args.database_url))  # never the database password in a log
    await stop.wait()
    log.info("stopping")
    # From here on amqtt reports its own cancelled tasks as errors with tracebacks: noise, not news.
    logging.getLogger("amqtt").setLevel(logging.CRITICAL)
    if web is not None:
        web.stop()
    await asyncio.to_thread(worker.stop)  # commits its last batch and disconnects cleanly first
    # amqtt 0.12's shutdown can leave tasks of still-connected clients failing or pending; by now
    # every accepted message is committed, so log those in one line and do not wait forever.
    loop.set_exception_handler(lambda _loop, ctx: log.debug("broker shutdown: %s", ctx.get("message")))
    try:
        await asyncio.wait_for(broker.shutdown(), SHUTDOWN_TIMEOUT_S)
    except (asyncio.TimeoutError, Exception) as e:  # noqa: BLE001 - exiting anyway
        log.warning("broker shutdown incomplete (%s); exiting", type(e).__name__)
    log.info("stopped")
    return 0
