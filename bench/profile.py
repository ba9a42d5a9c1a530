"""py-spy profiles of the worker under load: collapsed stacks -> top tables and an SVG flame graph.

py-spy (``pip install py-spy``) samples the running worker from outside; it needs ptrace rights
(root, or kernel.yama.ptrace_scope=0). Samples are aggregated by function (``--function``), idle
threads left out, so the shares are of CPU time the worker's threads spent in Python frames.
"""

from __future__ import annotations

import collections
import html
import os
import shutil
import signal
import subprocess
import sys
import zlib
from pathlib import Path

RATE_HZ = 100


def py_spy() -> str | None:
    here = Path(sys.executable).parent
    return shutil.which("py-spy", path=os.pathsep.join([str(here), os.environ.get("PATH", "")]))


class Recorder:
    """``py-spy record --format raw`` on a pid until stop()."""

    def __init__(self, pid: int, out: Path):
        binary = py_spy()
        if binary is None:
            raise FileNotFoundError("py-spy is not installed (pip install py-spy)")
        self.out = out
        self.proc = subprocess.Popen([binary, "record", "--pid", str(pid), "--format", "raw", "--function",
                                      "--rate", str(RATE_HZ), "-o", str(out)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def stop(self) -> dict[tuple[str, ...], int]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        return load(self.out)


def load(path: Path) -> dict[tuple[str, ...], int]:
    stacks: dict[tuple[str, ...], int] = collections.Counter()
    if not path.exists():
        return stacks
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if stack and n.isdigit():
            stacks[tuple(_short(f) for f in stack.split(";"))] += int(n)
    return stacks


def _short(frame: str) -> str:
    """'Client._loop (paho/mqtt/client.py:1650)' stays; site-packages prefixes are already stripped."""
    return frame.strip()


def _thread_of(stack: tuple[str, ...]) -> str:
    for f in stack:
        if f.startswith("Worker._run"):
            return "network thread (paho's socket, core, publishes)"
        if f.startswith(("Worker._store_batch", "_worker (concurrent/futures/thread.py")):
            return "store thread (transactions)"
        if "loop_forever" in f or "_thread_main" in f:
            return "paho network thread"
        if "asyncio" in f or "base_events" in f:
            return "asyncio (broker)"
    return "other"


# Innermost frames that are a thread waiting, not working: the network thread's select() (in
# Worker._readable, or paho's Client._loop), the store thread waiting for its next batch (the executor's
# queue get in concurrent.futures' _worker), Condition/Event waits. py-spy cannot always tell such short
# waits from work. A commit's fsync (Database.commit) is not among them: the store thread is busy then.
WAITING = ("Client._loop (", "Condition.wait (", "Event.wait (", "select (", "sleep (", "Worker._readable (",
           "_worker (concurrent/futures/thread.py")


def working(stacks: dict[tuple[str, ...], int]) -> dict[tuple[str, ...], int]:
    return {st: n for st, n in stacks.items() if not st[-1].startswith(WAITING)}


def summarize(stacks: dict[tuple[str, ...], int], top: int = 15) -> dict:
    """Shares of the samples in which a thread was working (waiting frames left out, reported apart)."""
    waiting = sum(n for st, n in stacks.items() if st[-1].startswith(WAITING))
    stacks = {st: n for st, n in stacks.items() if not st[-1].startswith(WAITING)}
    total = sum(stacks.values()) or 1
    self_c: collections.Counter = collections.Counter()
    incl: collections.Counter = collections.Counter()
    threads: collections.Counter = collections.Counter()
    for stack, n in stacks.items():
        self_c[stack[-1]] += n
        for f in set(stack):
            incl[f] += n
        threads[_thread_of(stack)] += n
    pct = lambda n: round(100 * n / total, 1)  # noqa: E731
    ours = [(f, n) for f, n in incl.most_common() if "backend/" in f or "peewee" in f or "paho" in f or "json" in f]
    return {"samples": total, "waiting_samples": waiting, "rate_hz": RATE_HZ,
            "threads": [{"thread": t, "pct": pct(n)} for t, n in threads.most_common()],
            "self": [{"frame": f, "pct": pct(n)} for f, n in self_c.most_common(top)],
            "inclusive": [{"frame": f, "pct": pct(n)} for f, n in ours
                          if not f.startswith(("Thread.", "_run_", "<module>"))][:top * 2]}


def _color(name: str) -> str:
    h = zlib.crc32(name.split(" (")[-1].encode()) & 0xFFFF
    if "backend/" in name:
        return f"hsl({20 + h % 30}, 85%, {55 + h % 15}%)"
    if "peewee" in name or "sqlite" in name:
        return f"hsl({200 + h % 30}, 60%, {60 + h % 15}%)"
    if "paho" in name:
        return f"hsl({100 + h % 30}, 50%, {55 + h % 15}%)"
    return f"hsl({40 + h % 20}, 20%, {65 + h % 15}%)"


def flamegraph_svg(stacks: dict[tuple[str, ...], int], title: str, width: int = 1400, row: int = 16) -> str:
    """An icicle graph (callers on top, callees below; width = share of samples)."""
    root: dict = {"n": 0, "kids": {}}
    for stack, n in stacks.items():
        node = root
        node["n"] += n
        for f in stack:
            node = node["kids"].setdefault(f, {"n": 0, "kids": {}})
            node["n"] += n
    total = root["n"] or 1
    rects: list[str] = []
    depth_max = [0]

    def walk(node: dict, x: float, depth: int) -> None:
        for name, kid in sorted(node["kids"].items(), key=lambda kv: -kv[1]["n"]):
            w = kid["n"] / total * width
            if w >= 0.3:
                y = 30 + depth * row
                depth_max[0] = max(depth_max[0], depth)
                label = html.escape(name)
                tip = f"{label} ({kid['n']} samples, {100 * kid['n'] / total:.1f}%)"
                chars = int(w / 6.5)
                text = html.escape(name[:chars - 2] + ".." if len(name) > chars else name) if chars >= 4 else ""
                rects.append(f'<g><title>{tip}</title><rect x="{x:.2f}" y="{y}" width="{w:.2f}" height="{row - 1}" '
                             f'fill="{_color(name)}" rx="1"/>' + (
                                 f'<text x="{x + 3:.2f}" y="{y + row - 4}">{text}</text>' if text else "") + "</g>")
                walk(kid, x, depth + 1)
            x += w

    walk(root, 0.0, 0)
    height = 30 + (depth_max[0] + 1) * row + 10
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'font-family="monospace" font-size="11">'
            f'<rect width="100%" height="100%" fill="white"/>'
            f'<text x="4" y="18" font-size="13">{html.escape(title)} ({total} samples at {RATE_HZ} Hz; '
            f'hover for names)</text>' + "".join(rects) + "</svg>\n")
