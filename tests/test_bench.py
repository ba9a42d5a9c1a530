"""The benchmark runs (``python -m bench --tiny``) and writes the results it promises.

These are benchmarks, not timed tests: nothing here checks a figure against a target, only
that every scenario ran on a tiny size against its baseline and the JSON and Markdown hold
the expected keys. The figures themselves are in docs/BENCHMARKS.md (``python -m bench``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from scripts.mosquitto import find_mosquitto, find_mosquitto_passwd  # noqa: E402
from scripts.nats import find_nats  # noqa: E402

HAVE_MOSQUITTO = find_mosquitto() is not None and find_mosquitto_passwd() is not None
# NATS starts in about 1 s, so the tiny run measures it (relay and worker) too; RabbitMQ, 20 s to start, is
# left out of the tiny sizes (python -m bench --quick runs it).
HAVE_NATS = find_nats() is not None
# The tiny run takes about 30 s on 2 idle cores; the rest is headroom for a busy machine.
RUN_TIMEOUT_S = 55


def _bench(out, *args: str) -> subprocess.CompletedProcess:
    """Run the tiny bench in a session of its own: on a timeout its brokers and workers go with it (a bare
    subprocess.run timeout killed only the bench and left a nats-server running)."""
    cmd = [sys.executable, "-m", "bench", "--tiny", "--no-plots", "--out", str(out), *args]
    with subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True) as p:
        try:
            stdout, stderr = p.communicate(timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
            raise
    proc = subprocess.CompletedProcess(cmd, p.returncode, stdout, stderr)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_bench_tiny_beside_nats_relay_and_two_partitioned_workers(tmp_path):
    if not HAVE_NATS:
        if os.environ.get("IM_REQUIRE_SERVICES") == "1":
            raise AssertionError("nats-server not installed (IM_REQUIRE_SERVICES=1: required here)")
        pytest.skip("nats-server not installed")
    _bench(tmp_path, "--only", "online", "scaleout", "--brokers", "nats")
    (path,) = tmp_path.glob("bench-tiny*.json")
    sc = json.loads(path.read_text(encoding="utf-8"))["scenarios"]
    r = sc["online"]["brokers"]["nats"]
    relay, worker = r["relay_throughput"], r["worker_throughput"]
    assert relay["rate"] > 0 and worker["rate"] > 0 and worker["complete"] and worker["errors"] == 0
    assert worker["ratio_to_relay"] == worker["rate"] / relay["rate"]
    assert r["latency"] == []  # the tiny sizes measure NATS' throughput only
    nats = sc["scaleout"]["brokers"]["nats"]
    assert nats["sharing"] == "partitions"
    # the senders split evenly over the 2 partitions
    owners = [nats["partition_of"][u] for u in nats["sender_uids"]]
    assert sorted(owners) == sorted([0, 1] * (len(owners) // 2)), nats
    for run in nats["runs"]:  # (repeated pushes are the protocol's resend after 3 s: not checked)
        assert run["complete"] and run["errors"] == 0, run
    assert {run["workers"] for run in nats["runs"]} == {1, 2}


def _require_mosquitto() -> None:
    if os.environ.get("IM_REQUIRE_SERVICES") == "1":
        assert HAVE_MOSQUITTO, "mosquitto not installed (IM_REQUIRE_SERVICES=1: required here)"


def _result(out: Path) -> tuple[dict, str]:
    """The one JSON and Markdown pair a partial run wrote (named after its scenarios)."""
    (path,) = out.glob("bench-tiny*.json")
    res = json.loads(path.read_text(encoding="utf-8"))
    assert {"mode", "machine", "sizes", "scenarios", "targets", "seconds"} <= set(res)
    assert {"nproc", "cpu", "python"} <= set(res["machine"])
    return res, path.with_suffix(".md").read_text(encoding="utf-8")


# The tiny run is split in two tests of about 10 s each on 2 idle cores: as one run (about 21 s idle) it passed
# RUN_TIMEOUT_S in CI beside the other xdist process's chaos tests (3x slower there).
def test_bench_tiny_online_on_each_broker_against_the_relay(tmp_path):
    _require_mosquitto()
    brokers = ["amqtt"] + (["mosquitto"] if HAVE_MOSQUITTO else [])
    proc = _bench(tmp_path, "--only", "online", "--brokers", *brokers)
    assert "Targets (tiny run" in proc.stdout
    res, md = _result(tmp_path)
    brokers = res["scenarios"]["online"]["brokers"]
    assert set(brokers) == {"amqtt"} | ({"mosquitto"} if HAVE_MOSQUITTO else set())
    for bk, r in brokers.items():
        relay, worker = r["relay_throughput"], r["worker_throughput"]
        assert relay["rate"] > 0 and worker["rate"] > 0
        assert relay["complete"] and worker["complete"] and worker["errors"] == 0
        assert worker["ratio_to_relay"] == worker["rate"] / relay["rate"]
        assert {"broker", "worker", "loadgen"} <= set(worker["cpu_s"])
        (step,) = r["latency"]
        assert step["fraction_of_relay"] == 0.5
        for system in ("relay", "worker"):
            assert {"p50", "p99", "censored"} <= set(step[system]["push_latency"])
        assert "delivered_latency" in step["worker"]
    ids = {t["id"] for t in res["targets"]}
    assert "online_throughput" in ids
    if HAVE_MOSQUITTO:
        assert "online_p99" in ids
    assert "## Targets" in md and "## 1. Online end to end" in md


def test_bench_tiny_offline_growth_and_devices_with_their_baselines(tmp_path):
    _require_mosquitto()
    proc = _bench(tmp_path, "--only", "offline", "growth", "devices", "--brokers", "mosquitto")
    assert "Targets (tiny run" in proc.stdout
    res, md = _result(tmp_path)
    sc = res["scenarios"]

    if HAVE_MOSQUITTO:
        off = sc["offline"]
        assert off["lost"] == 0 and off["baseline_lost"] == 0, off
        assert off["drain"]["left_in_store"] == 0
        assert off["drain"]["count_total"] == off["backlog"]
        assert off["ratio_to_mosquitto_queue"] > 0
    else:
        assert "skipped" in sc["offline"]

    gr = sc["growth"]
    assert [s["rows"] for s in gr["sizes"]] == res["sizes"]["growth_rows"]
    for size in gr["sizes"]:
        for uid in ("fix", "big"):
            assert {"count", "page", "page_ack"} <= set(size[uid])
        assert size["fix"]["count_total"] == 1000
        assert {"count", "page"} <= set(size["store"]["big"])
    assert gr["page_ack_ratio_big"] > 0

    if HAVE_MOSQUITTO:
        dv = sc["devices"]
        assert sorted(r["devices"] for r in dv["runs"]) == [1, 2] * res["sizes"]["devices_reps"]
        for r in dv["runs"]:
            assert r["complete"] and r["errors"] == 0 and r["duplicates"] == 0, r
            # every message reached every device of the receiver, once
            assert r["device_pushes"] >= r["devices"] * r["n"], r
            assert r["device_rate"] == round(r["rate"] * r["devices"], 1)
        assert dv["ratio"] == dv["rate_2"] / dv["rate_1"]
        mem = dv["memory"]
        assert mem["devices"] == res["sizes"]["devices_online"] and mem["rss_after"] > 0
    else:
        assert "skipped" in sc["devices"]

    ids = {t["id"] for t in res["targets"]}
    assert "growth_page" in ids
    if HAVE_MOSQUITTO:
        assert {"offline_drain", "devices_throughput"} <= ids
    assert "## Targets" in md and "## 3. Growth" in md
    if HAVE_MOSQUITTO:
        assert "## 5. Devices" in md
