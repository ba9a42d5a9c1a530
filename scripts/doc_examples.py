"""Run the examples of README.md and docs/PROTOCOL.md in order, as printed, and check what they print.

    python scripts/doc_examples.py README.md docs/PROTOCOL.md     # from the repository root

The documents mark their runnable code blocks with HTML comments (invisible when rendered):

    <!-- doc-test: run -->          the next block's shell commands run in order
    <!-- doc-test: file NAME -->    the next block is saved as NAME (a Python script a later command runs)
    <!-- doc-test: expect NAME -->  the next block's lines are printed by NAME next, in any order (MQTT
                                    orders nothing across topics): NAME is the user (-u) of a running
                                    mosquitto_sub, or `output` for the last command run in the foreground
    <!-- doc-test: stop NAME -->    Ctrl-C on NAME's mosquitto_sub (its lines must all have been expected)

How commands run: everything in one fresh temporary directory (so `data/` is a fresh database); `python`,
`.venv/bin/python` and `im-backend` become this interpreter, with the repository on PYTHONPATH; the
set-up and test parts of an `&&` chain (`python3 -m venv`, `pip install`, `-m pytest`) are taken as done
(this runs inside a set-up venv); each documented port (1883, 1884, ...) becomes a free port; `serve`
runs in the background on 127.0.0.1 until its worker is connected; `mosquitto_sub` (or a command ending
in `&`) runs in the background until it is subscribed; `sleep` sleeps. In expected lines, `...` stands
for anything, and `sent_at` values, ISO timestamps (`-F %I`) and cursors may differ: a cursor the
document printed is replaced, in later commands, by the one the server really issued.

Every line a background subscriber prints must be expected somewhere (checked when it is stopped and at
the end), so a repeated push or a stray reply fails the run. Needs mosquitto_pub and mosquitto_sub.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"^<!--\s*doc-test:\s*(\w+)\s*(.*?)\s*-->\s*$")
# How long an expected line may take to appear: a push is retransmitted after 3 s and again 6 s later
# (docs/PROTOCOL.md 11.1), so 15 s covers the slowest documented output with room on a loaded machine.
EXPECT_TIMEOUT_S = 15.0
# How long a background process may take to be ready (serve's worker connected, a subscriber's SUBACK).
READY_TIMEOUT_S = 20.0
# After the last step, lines arriving this soon are still checked (a late duplicate push, a stray reply).
SETTLE_S = 1.0
# Ports the documents use; each is replaced by a free one.
DOC_PORTS = ("1883", "1884", "1885", "1886", "1887", "8080", "9001")
# mosquitto_sub runs with -d so that its SUBACK can be awaited; these are its debug lines, not output.
DEBUG_LINE = re.compile(r"^(Client \S+ (sending|received) |Subscribed \(mid: )")


class DocError(AssertionError):
    """An example did not do what its document says; the message names the document and line."""


@dataclass
class Step:
    action: str  # run, file, expect, stop
    arg: str
    text: str  # the code block's content ('' for stop)
    where: str  # document:line of the marker


def parse(path: Path) -> list[Step]:
    """The marked steps of one Markdown document, in order."""
    steps: list[Step] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        m = MARKER.match(lines[i].strip())
        i += 1
        if not m:
            continue
        action, arg, where = m.group(1), m.group(2), f"{path.name}:{i}"
        if action not in ("run", "file", "expect", "stop"):
            raise DocError(f"{where}: unknown doc-test action {action!r}")
        if action == "stop":
            steps.append(Step(action, arg, "", where))
            continue
        while i < len(lines) and not lines[i].startswith("```"):
            i += 1
        body: list[str] = []
        i += 1
        while i < len(lines) and not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        i += 1
        steps.append(Step(action, arg, "\n".join(body), where))
    return steps


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Process:
    """A background process whose output lines are collected for expect steps."""

    def __init__(self, name: str, argv: list[str], cwd: Path, env: dict, where: str, subscriber: bool = False):
        self.name, self.where, self.subscriber = name, where, subscriber
        self.lines: list[str] = []  # output not yet matched by an expect step
        self.log: list[str] = []  # everything, for error messages
        self.publishes = 0  # a subscriber's PUBLISHes received and not yet printed
        self.cond = threading.Condition()
        self.proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, bufsize=1)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            with self.cond:
                self.log.append(line)
                if DEBUG_LINE.match(line):
                    self.publishes += " received PUBLISH " in line
                elif not self.subscriber:
                    self.lines.append(line)
                elif self.publishes > 0:
                    # One printed line per PUBLISH received. (Under stdbuf, mosquitto_sub stopped by SIGINT
                    # sometimes prints its last line a second time, with no PUBLISH behind it: not output.)
                    self.publishes -= 1
                    self.lines.append(line)
                self.cond.notify_all()

    def wait_log(self, text: str, timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: any(text in line for line in self.log) or self.proc.poll() is not None,
                                      timeout) and any(text in line for line in self.log)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # Ctrl-C
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


class Runner:
    def __init__(self, workdir: Path, ready: str = "backend.worker: connected", verbose: bool = False):
        self.workdir, self.ready, self.verbose = workdir, ready, verbose
        self.env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        self.env.pop("IM_DATABASE_URL", None)  # the documents' defaults, as a new user has them
        self.env.pop("IM_PORT", None)  # the examples' port: 1883 unless exported (README), made free here
        self.ports = {doc: str(free_port()) for doc in DOC_PORTS}
        self.cursors: dict[str, str] = {}  # cursor printed in a document -> the one this run got
        self.subs: dict[str, Process] = {}
        self.servers: list[Process] = []
        self.output: list[str] = []  # the last foreground command's output
        self.output_is_expected_next = False  # then a failing command is an example, not an error

    # -- steps ------------------------------------------------------------------------
    def do_file(self, step: Step) -> None:
        (self.workdir / step.arg).write_text(self._ports_in(step.text) + "\n", encoding="utf-8")

    def do_stop(self, step: Step) -> None:
        proc = self.subs.pop(step.arg, None)
        if proc is None:
            raise DocError(f"{step.where}: stop {step.arg}: nothing of that name runs")
        proc.stop()
        self._check_all_expected(proc, step.where)

    def do_run(self, step: Step) -> None:
        for command in self._commands(step.text):
            self._run_command(command, step.where)

    def do_expect(self, step: Step) -> None:
        expected = [line for line in step.text.splitlines() if line.strip()]
        if step.arg == "output":
            self._match(expected, None, step.where)
            return
        proc = self.subs.get(step.arg)
        if proc is None:
            raise DocError(f"{step.where}: expect {step.arg}: no subscriber of that name runs")
        self._match(expected, proc, step.where)

    def finish(self, where: str) -> None:
        """At the end: every subscriber's lines were expected; stop everything."""
        time.sleep(SETTLE_S)  # lets a late stray line arrive: that is what is checked for
        try:
            for proc in self.subs.values():
                self._check_all_expected(proc, where)
        finally:
            self.close()

    def close(self) -> None:
        for proc in [*self.subs.values(), *self.servers]:
            proc.stop()
        self.subs.clear()
        self.servers.clear()

    # -- commands ---------------------------------------------------------------------
    @staticmethod
    def _commands(text: str) -> list[str]:
        """Shell lines with backslash continuations joined; comments and blank lines dropped."""
        out, cur = [], ""
        for line in text.splitlines():
            if line.rstrip().endswith("\\"):
                cur += line.rstrip()[:-1] + " "
                continue
            cur += line
            if cur.strip() and not cur.strip().startswith("#"):
                out.append(cur.strip())
            cur = ""
        return out

    def _ports_in(self, text: str) -> str:
        return re.sub(r"\b(" + "|".join(DOC_PORTS) + r")\b", lambda m: self.ports[m.group(1)], text)

    def _run_command(self, command: str, where: str) -> None:
        for part in command.split(" && "):
            argv = shlex.split(part, comments=True)
            if not argv:
                continue
            background = argv[-1] == "&"
            if background:
                argv = argv[:-1]
            if argv[:3] == ["python3", "-m", "venv"] or "pip" in Path(argv[0]).name or "pytest" in argv:
                continue  # set-up and tests: done, this runs inside them
            # ${IM_PORT:-1883} (README: the examples follow an exported IM_PORT) is its default here, the
            # documented port made free by _ports_in: there is no shell to expand it.
            argv = [re.sub(r"\$\{IM_PORT:-([0-9]+)\}", r"\1", self._ports_in(a)) for a in argv]
            argv = [self._cursors_in(a) for a in argv]
            if Path(argv[0]).name in ("python", "python3"):
                argv = [sys.executable, *argv[1:]]
            elif Path(argv[0]).name == "im-backend":
                argv = [sys.executable, "-m", "backend", *argv[1:]]
            if argv[0] == "sleep":
                time.sleep(float(argv[1]))
            elif argv[1:4] == ["-m", "backend", "serve"]:
                self._serve(argv, where)
            elif argv[0] == "mosquitto_sub" or background:
                self._subscribe(argv, where)
            else:
                r = subprocess.run(argv, cwd=self.workdir, env=self.env, capture_output=True, text=True, timeout=60)
                self.output = (r.stdout + r.stderr).splitlines()
                if r.returncode != 0 and not self.output_is_expected_next:
                    raise DocError(f"{where}: `{part}` exited with {r.returncode}:\n{r.stdout}{r.stderr}")

    def run_document(self, path: Path) -> None:
        steps = parse(path)
        for i, step in enumerate(steps):
            nxt = steps[i + 1] if i + 1 < len(steps) else None
            self.output_is_expected_next = nxt is not None and nxt.action == "expect" and nxt.arg == "output"
            if self.verbose:
                print(f"{step.where}: {step.action} {step.arg}", file=sys.stderr)
            getattr(self, f"do_{step.action}")(step)

    def _serve(self, argv: list[str], where: str) -> None:
        if "--port" not in argv:
            argv = [*argv, "--port", self.ports["1883"]]
        argv = [*argv, "--host", "127.0.0.1"]
        proc = Process("serve", argv, self.workdir, self.env, where)
        self.servers.append(proc)
        if not proc.wait_log(self.ready, READY_TIMEOUT_S):
            raise DocError(f"{where}: serve did not start:\n" + "\n".join(proc.log))

    def _subscribe(self, argv: list[str], where: str) -> None:
        if "-u" not in argv:
            raise DocError(f"{where}: a background command needs -u USER (its name in expect steps)")
        name = argv[argv.index("-u") + 1]
        if name in self.subs:  # the same terminal, started again: the old one was stopped (Ctrl-C)
            old = self.subs.pop(name)
            old.stop()
            self._check_all_expected(old, where)
        # stdbuf: mosquitto_sub's debug lines go through stdio, block-buffered into a pipe.
        stdbuf = ["stdbuf", "-oL"] if shutil.which("stdbuf") else []
        proc = Process(name, [*stdbuf, argv[0], "-d", *argv[1:]], self.workdir, self.env, where, subscriber=True)
        self.subs[name] = proc
        if not proc.wait_log("received SUBACK", READY_TIMEOUT_S):
            raise DocError(f"{where}: {name}'s mosquitto_sub did not subscribe:\n" + "\n".join(proc.log))

    def _cursors_in(self, text: str) -> str:
        for doc, real in self.cursors.items():
            text = text.replace(doc, real)
        return text

    # -- output -------------------------------------------------------------------------
    @staticmethod
    def _pattern(expected: str) -> tuple[re.Pattern, list[str]]:
        """A regex for one expected line, and the document's cursors in it (captured in order)."""
        volatile = r'(\.\.\.|"sent_at":\d+|"cursor":"[0-9a-f]{32}"|\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4})'
        regex, cursors = "", []
        for i, part in enumerate(re.split(volatile, expected.strip())):
            if i % 2 == 0:
                regex += re.escape(part)
            elif part == "...":
                regex += ".*?"
            elif part.startswith('"sent_at"'):
                regex += r'"sent_at":\d+'
            elif part.startswith('"cursor"'):
                regex += r'"cursor":"([0-9a-f]{32})"'
                cursors.append(part[len('"cursor":"'):-1])
            else:
                regex += r"\S+"
        return re.compile(regex), cursors

    def _match(self, expected: list[str], proc: Process | None, where: str) -> None:
        patterns = [self._pattern(line) for line in expected]

        def attempt() -> list[int] | None:
            lines = proc.lines if proc else self.output
            used: list[int] = []
            for pattern, _ in patterns:
                found = next((i for i, line in enumerate(lines) if i not in used and pattern.fullmatch(line.strip())),
                             None)
                if found is None:
                    return None
                used.append(found)
            return used

        with proc.cond if proc else contextlib.nullcontext():
            if proc is not None:
                proc.cond.wait_for(lambda: attempt() is not None, EXPECT_TIMEOUT_S)
            self._consume(expected, patterns, attempt(), proc, where)

    def _consume(self, expected, patterns, used: list[int] | None, proc: Process | None, where: str) -> None:
        lines = proc.lines if proc else self.output
        name = proc.name if proc else "the last command"
        if used is None:
            missing = [e for e, (p, _) in zip(expected, patterns) if not any(p.fullmatch(x.strip()) for x in lines)]
            raise DocError(f"{where}: {name} did not print (within {EXPECT_TIMEOUT_S:.0f}s):\n  "
                           + "\n  ".join(missing) + "\nit printed:\n  " + ("\n  ".join(lines) or "(nothing)"))
        stray = [line for i, line in enumerate(lines) if i not in used and i < max(used)]
        if stray:
            raise DocError(f"{where}: {name} printed lines the document does not show:\n  " + "\n  ".join(stray))
        for (pattern, doc_cursors), i in zip(patterns, used):
            got = pattern.fullmatch(lines[i].strip()).groups()
            self.cursors.update(zip(doc_cursors, got))
        kept = [line for i, line in enumerate(lines) if i > max(used)]
        if proc is not None:
            proc.lines[:] = kept
        else:
            self.output = kept

    def _check_all_expected(self, proc: Process, where: str) -> None:
        with proc.cond:
            if proc.lines:
                raise DocError(f"{where}: {proc.name}'s subscriber printed lines the documents do not show:\n  "
                               + "\n  ".join(proc.lines) + "\nits last exchanges with the broker:\n  "
                               + "\n  ".join(proc.log[-24:]))


def run(documents: list[Path], ready: str = "backend.worker: connected", verbose: bool = False) -> None:
    """Run the documents' examples in order on one fresh directory; raise DocError at the first mismatch
    (with the servers' last log lines, to tell a document's error from the server's)."""
    with tempfile.TemporaryDirectory(prefix="im-doc-examples-") as tmp:
        runner = Runner(Path(tmp), ready=ready, verbose=verbose)
        try:
            for doc in documents:
                runner.run_document(doc)
            runner.finish(str(documents[-1].name))
        except DocError as e:
            logs = "".join(f"\nserve {' '.join(p.proc.args[-6:])} logged:\n  " + "\n  ".join(p.log[-30:])
                           for p in runner.servers)
            raise DocError(f"{e}{logs}") from None
        finally:
            runner.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("documents", nargs="+", type=Path)
    ap.add_argument("-v", "--verbose", action="store_true", help="print each step as it runs")
    args = ap.parse_args(argv)
    try:
        run(args.documents, verbose=args.verbose)
    except DocError as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1
    print(f"ok: the examples of {', '.join(map(str, args.documents))} ran as printed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
