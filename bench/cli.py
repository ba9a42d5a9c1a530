"""``python -m bench``: run the scenarios, write JSON + Markdown + PNG plots, print ratios vs targets."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import harness as h
from bench import report, scenarios

RESULTS = Path(__file__).resolve().parent / "results"
SCENARIOS = ("online", "offline", "growth", "devices", "scaleout", "groups", "profile")
DEFAULT_SCENARIOS = ("online", "offline", "growth", "devices", "scaleout", "groups")
# Sizes whose default run leaves a scenario out (none today: the tiny scale-out takes about 3 s).
SIZE_DEFAULTS: dict[str, tuple[str, ...]] = {}


def default_scenarios(size: str) -> tuple[str, ...]:
    return SIZE_DEFAULTS.get(size, DEFAULT_SCENARIOS)


def machine() -> dict:
    cpu = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        cpu = platform.processor()
    mosq = None
    try:
        from scripts.mosquitto import find_mosquitto
        binary = find_mosquitto()
        if binary:
            mosq = subprocess.run([binary, "-h"], capture_output=True, text=True, timeout=10).stdout.splitlines()[0]
    except Exception:  # noqa: BLE001 - informational only
        pass
    nats = rabbit = None
    try:
        from scripts.nats import find_nats
        binary = find_nats()
        if binary:
            nats = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout.strip()
        rabbit = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "rabbitmq-server"], capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
    except Exception:  # noqa: BLE001 - informational only
        pass
    versions = {}
    for mod in ("paho.mqtt", "amqtt", "peewee"):
        try:
            from importlib.metadata import version
            versions[mod] = version({"paho.mqtt": "paho-mqtt"}.get(mod, mod))
        except Exception:  # noqa: BLE001
            versions[mod] = None
    load = None
    if hasattr(os, "getloadavg"):
        load = [round(x, 2) for x in os.getloadavg()]
    try:
        import sqlite3
        versions["sqlite"] = sqlite3.sqlite_version
    except Exception:  # noqa: BLE001
        pass
    return {"nproc": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "platform": platform.platform(), "mosquitto": mosq, "nats": nats, "rabbitmq": rabbit, "versions": versions, "loadavg_at_start": load}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_const", const="quick", dest="size",
                      help="smaller sizes, about 3 minutes (offline backlog 20k, growth up to 100k rows)")
    size.add_argument("--tiny", action="store_const", const="tiny", dest="size",
                      help="a few seconds per scenario: checks that everything runs (tests/test_bench.py)")
    ap.set_defaults(size="full")
    ap.add_argument("--only", nargs="+", choices=SCENARIOS, default=None,
                    help="run only these scenarios (default: online offline growth devices scaleout groups)")
    ap.add_argument("--profile", action="store_true",
                    help="also profile the worker with py-spy under the online and drain loads (separate runs)")
    ap.add_argument("--brokers", nargs="+", choices=["amqtt", "mosquitto", "nats", "rabbitmq"], default=None,
                    help="online and scale-out scenarios on these brokers only (scale-out: not amqtt) "
                         "(default: every one installed; --tiny leaves RabbitMQ out: its node takes ~20 s to start)")
    ap.add_argument("--out", type=Path, default=RESULTS, help=f"where results go (default: {RESULTS})")
    ap.add_argument("--no-plots", action="store_true", help="skip the PNG plots (matplotlib)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory (logs, databases)")
    ap.add_argument("--report", type=Path, metavar="JSON",
                    help="run nothing: write the Markdown and plots again from this results file")
    ap.add_argument("--merge", type=Path, nargs="+", metavar="JSON", default=[],
                    help="with --report: first copy the scenarios of these results files (e.g. a later "
                         "`--only scaleout` run) into it, each marked with the run it came from")
    a = ap.parse_args(argv)
    if a.merge and not a.report:
        ap.error("--merge needs --report JSON")
    if a.report:
        return rerender(a.report, no_plots=a.no_plots, merge=a.merge)
    if a.only is None:
        a.only = list(default_scenarios(a.size))

    sizes = scenarios.SIZES[a.size]
    if a.brokers:
        sizes.brokers = a.brokers
    a.out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="im-bench-"))
    t_start = time.monotonic()

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - t_start:6.1f}s] {msg}", flush=True)

    if a.profile and "profile" not in a.only:
        a.only.append("profile")
    stem = f"bench-{a.size}"
    measured = [n for n in a.only if n != "profile"]
    if sorted(measured) != sorted(default_scenarios(a.size)):
        stem += "-" + "-".join(a.only)  # a partial run never overwrites a whole one
    run = scenarios.Run(sizes, workdir, log, out=a.out, stem=stem)
    res: dict = {"mode": a.size, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine(),
                 "sizes": {k: v for k, v in vars(sizes).items()}, "scenarios": {}}
    for kind in sizes.brokers:
        if not h.broker_available(kind):
            log(f"{kind} is not installed: its parts are skipped")
    try:
        for name in a.only:
            t = time.monotonic()
            try:
                res["scenarios"][name] = getattr(scenarios, name)(run)
            except Exception as e:  # noqa: BLE001 - report what ran, say what failed
                log(f"{name} FAILED: {e}")
                res["scenarios"][name] = {"error": f"{type(e).__name__}: {e}"}
            res["scenarios"][name]["seconds"] = round(time.monotonic() - t, 1)
    finally:
        run.close()
        if a.keep:
            log(f"scratch kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    res["seconds"] = round(time.monotonic() - t_start, 1)
    if hasattr(os, "getloadavg"):
        res["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    res["targets"] = report.check_targets(res)

    (a.out / f"{stem}.json").write_text(json.dumps(res, indent=1) + "\n", encoding="utf-8")
    md = report.markdown(res)
    if not a.no_plots:
        try:
            res["plots"] = report.plots(res, a.out, stem)
        except ImportError:
            log("matplotlib is not installed: no plots (pip install matplotlib)")
        md = report.markdown(res)
        (a.out / f"{stem}.json").write_text(json.dumps(res, indent=1) + "\n", encoding="utf-8")
    (a.out / f"{stem}.md").write_text(md, encoding="utf-8")
    print()
    print(report.targets_text(res))
    print(f"\n{res['seconds']:.0f} s; results in {a.out / stem}.json, .md" + (" and PNG plots" if res.get("plots") else ""))
    failed = [n for n, v in res["scenarios"].items() if "error" in v] + report.broker_errors(res)
    return 1 if failed else 0


def rerender(path: Path, no_plots: bool = False, merge: list[Path] = ()) -> int:
    res = json.loads(path.read_text(encoding="utf-8"))
    for other_path in merge:
        other = json.loads(other_path.read_text(encoding="utf-8"))
        m = other.get("machine", {})
        for name, sc in other.get("scenarios", {}).items():
            res["scenarios"][name] = {**sc, "measured_in": {
                "file": other_path.name, "mode": other.get("mode"), "started": other.get("started"),
                "loadavg_at_start": m.get("loadavg_at_start"), "loadavg_at_end": m.get("loadavg_at_end")}}
    res["targets"] = report.check_targets(res)
    stem = path.stem
    if not no_plots:
        res["plots"] = report.plots(res, path.parent, stem)
    path.write_text(json.dumps(res, indent=1) + "\n", encoding="utf-8")
    (path.parent / f"{stem}.md").write_text(report.markdown(res), encoding="utf-8")
    print(report.targets_text(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
