"""The scenarios: each measures the system and its baseline in the same run, same broker kind and config.

A fresh broker (and worker or relay) is started for every measurement, so no backlog or session
left by one step (a saturated latency step leaves thousands of messages queued) slows the next.
"""

from __future__ import annotations

import os
import shutil
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from bench import harness as h
from bench.stats import ratio

USERS = ["alice", "bob"]
# Scale-out runs the workers on PostgreSQL, the test suite's database by default (tests/services.py);
# the scenario drops and recreates our tables in it before every measurement.
POSTGRES_URL = os.environ.get("IM_BENCH_POSTGRES_URL",
                              os.environ.get("IM_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"))


@dataclass
class Sizes:
    name: str
    relay_n: int  # closed-loop messages measured through the relay
    worker_n: int  # ... and through the worker
    window: int  # most messages not yet complete (sent, no delivered receipt / not yet relayed)
    warmup: int
    latency_fracs: list[float]  # offered rates, as fractions of the relay's measured throughput
    own_fracs: list[float]  # ... and as fractions of the system's own throughput (where it is not saturated)
    latency_s: float  # how long each fixed rate is offered
    grace_s: float  # how long after the last send a step waits for the stragglers
    drain_backlog: int
    drain_limit: int
    growth_rows: list[int]
    growth_reps: int
    serve_variant: bool  # also measure `python -m backend serve` (worker inside the amqtt process)
    # Online on these brokers, each where installed (nats and rabbitmq: also their scale-out, 1 vs 2 workers).
    brokers: list[str] = field(default_factory=lambda: ["amqtt", "mosquitto", "nats", "rabbitmq"])
    # On NATS and RabbitMQ (h.PLAIN_BROKERS) the online scenario measures the relay and the worker's throughput;
    # with plain_latency also latency at own_fracs of the worker's throughput (worker and relay at that rate),
    # with plain_v1 the worker for senders with v1 receipts.
    plain_latency: bool = True
    plain_v1: bool = False
    # Scale-out beside NATS and RabbitMQ keeps at most this many messages incomplete (or `window` if smaller):
    # one worker with a durable session there runs at a few hundred msg/s on 2 loaded cores, where 1,000 in
    # flight queue for 3-10 s, past the worker's 3 s push-ack timeout (core.PUSH_ACK_TIMEOUT_MS), and the pushes
    # it then repeats are load the measurement itself adds (seen in the first runs: up to 1,571 a run).
    plain_scaleout_window: int = 300
    scaleout_n: int = 2000  # closed-loop messages per scale-out measurement
    scaleout_senders: int = 4  # sender users (one receiver): topics for the shared subscription to spread
    scaleout_workers: list[int] = field(default_factory=lambda: [1, 2])
    scaleout_reps: int = 1  # each worker count measured this many times, alternating
    devices_n: int = 1500  # closed-loop messages per devices measurement (1 and 2 devices per receiver)
    devices_reps: int = 2  # each device count measured this many times, alternating
    devices_online: int = 10_000  # devices online for the worker's memory figure (10 per user)
    # Groups: a group of this many members (the sender one of them: the default cap, --max-group-members, is
    # 1,000), against the broker fanning one publish out to as many subscribers as the group has receivers.
    groups_members: int = 1000
    groups_n: int = 200  # closed-loop group messages measured (each to groups_members - 1 receivers)
    groups_window: int = 5  # most group messages not yet complete (every receiver has it)
    groups_warmup: int = 10
    groups_latency_n: int = 30  # then this many, one at a time: the fan-out's latency with no queue behind it
    groups_cost_n: int = 5  # sent while the members hold their acks: the store's rows per group message


SIZES = {
    # tiny: no RabbitMQ (a node takes about 20 s to start: more than the whole tiny run); NATS starts in 1 s.
    "tiny": Sizes("tiny", relay_n=600, worker_n=200, window=200, warmup=20, latency_fracs=[0.5], own_fracs=[], latency_s=0.5,
                  grace_s=1.0, drain_backlog=1000, drain_limit=500, growth_rows=[2000, 6000], growth_reps=3,
                  serve_variant=False, scaleout_n=300, devices_n=200, devices_reps=1, devices_online=200,
                  brokers=["amqtt", "mosquitto", "nats"], plain_latency=False, groups_members=50, groups_n=60,
                  groups_window=10, groups_warmup=5, groups_latency_n=10, groups_cost_n=3),
    "quick": Sizes("quick", relay_n=8000, worker_n=1500, window=1000, warmup=200, latency_fracs=[0.5],
                   own_fracs=[0.5], latency_s=2.0, grace_s=2.0, drain_backlog=20_000, drain_limit=500,
                   growth_rows=[10_000, 100_000], growth_reps=15, serve_variant=False, scaleout_n=3000,
                   devices_n=1500, devices_reps=2, plain_latency=False, groups_n=100),
    "full": Sizes("full", relay_n=20000, worker_n=4000, window=1000, warmup=300, latency_fracs=[0.25, 0.5, 0.75],
                  own_fracs=[0.5], latency_s=4.0, grace_s=4.0, drain_backlog=100_000, drain_limit=500,
                  growth_rows=[10_000, 100_000, 1_000_000], growth_reps=40, serve_variant=True, scaleout_n=8000,
                  scaleout_reps=2, devices_n=4000, devices_reps=3, plain_v1=True, groups_n=300, groups_latency_n=50),
}


class Run:
    """Holds the run's scratch directory and a log of what was started."""

    def __init__(self, sizes: Sizes, workdir: Path, log=print, out: Path | None = None, stem: str = "bench"):
        self.sizes, self.workdir, self.log = sizes, workdir, log
        self.out, self.stem = out or workdir, stem
        self._n = 0
        self.shared = h.SharedNodes()  # RabbitMQ: one node for the whole run (20 s to start)

    def close(self) -> None:
        self.shared.close()

    def scratch(self, name: str) -> Path:
        self._n += 1
        d = self.workdir / f"{self._n:03d}-{name}"
        d.mkdir(parents=True)
        return d

    def brokers(self) -> list[str]:
        """The requested brokers that are installed here."""
        return [b for b in self.sizes.brokers if h.broker_available(b)]


# --- 1. online ----------------------------------------------------------------------------------
def _online_step(run: Run, broker_kind: str, system: str, loadgen_args: list[str], timeout: float,
                 profile: str | None = None) -> dict:
    """One measurement on a fresh broker: system is "relay", "worker" or "serve" (amqtt only).
    With `profile` (a name), the worker runs under py-spy and its profile is written to the results."""
    d = run.scratch(f"online-{broker_kind}-{system}")
    db = f"sqlite:///{d}/im.db"
    mode = "relay" if system == "relay" else "worker"
    if system == "serve":
        proc, port, secrets = h.start_serve(db, USERS, d)
        stops, watch = [proc.stop], {"serve": proc.pid}  # broker and worker in one process
    else:
        b = h.start_broker(broker_kind, d, db, USERS, shared=run.shared)
        stops, port, secrets = [b.stop], b.port, b.secrets
        try:
            sut = h.start_relay(b, d) if system == "relay" else h.start_worker(b, db, d)
        except Exception:
            b.stop()
            raise
        stops.insert(0, sut.stop)
        watch = {"broker": b.pid, system: sut.pid}
    rec = _recorder(watch.get("worker") or watch.get("serve"), d) if profile else None
    try:
        res = h.run_loadgen(["online", "--mode", mode, "--port", str(port), *loadgen_args], secrets, watch,
                            timeout, d / "loadgen.log")
        if rec is not None:
            res["profile"] = _save_profile(run, rec, profile)
        return res
    finally:
        for stop in stops:
            stop()


def online(run: Run) -> dict:
    s = run.sizes
    out: dict = {"content_bytes": 100, "qos": 1, "window": s.window, "latency_fracs": s.latency_fracs,
                 "own_fracs": s.own_fracs, "latency_s": s.latency_s, "brokers": {}}
    brokers = run.brokers()
    for bk in brokers:
        r: dict = {}
        out["brokers"][bk] = r
        try:
            _online_broker(run, bk, r)
        except Exception as e:  # noqa: BLE001 - one broker's failure (say, a RabbitMQ node that never
            if len(brokers) == 1:  # starts) is said, and the other brokers' figures are kept
                raise
            run.log(f"online/{bk} FAILED: {e}")
            r["error"] = f"{type(e).__name__}: {e}"
    return out


def _online_broker(run: Run, bk: str, r: dict) -> None:
    """The online steps on one broker (relay, worker, latency), their results into ``r``."""
    s = run.sizes
    systems = ["worker"] + (["serve"] if bk == "amqtt" and s.serve_variant else [])
    thr_args = ["--window", str(s.window), "--warmup", str(s.warmup)]
    run.log(f"online/{bk}: relay throughput ({s.relay_n} messages)")
    r["relay_throughput"] = _online_step(run, bk, "relay", ["--count", str(s.relay_n), *thr_args], 300)
    relay_rate = r["relay_throughput"]["rate"]
    for system in systems:
        run.log(f"online/{bk}: {system} throughput ({s.worker_n} messages)")
        res = _online_step(run, bk, system, ["--count", str(s.worker_n), *thr_args], 300)
        res["ratio_to_relay"] = ratio(res["rate"], relay_rate)
        r[f"{system}_throughput"] = res
    plain = bk in h.PLAIN_BROKERS
    if plain and bk in run.shared.start_s:
        r["node_start_s"] = run.shared.start_s[bk]
    # The same worker for senders that do not ask for batched receipts (v1's one receipt payload each).
    if not plain or s.plain_v1:
        run.log(f"online/{bk}: worker throughput, senders with v1 receipts ({s.worker_n} messages)")
        res = _online_step(run, bk, "worker", ["--count", str(s.worker_n), "--receipts", "each", *thr_args], 300)
        res["ratio_to_relay"] = ratio(res["rate"], relay_rate)
        r["worker_v1_receipts_throughput"] = res
    r["latency"] = []
    if plain and not s.plain_latency:
        return
    # Beside NATS and RabbitMQ only at fractions of the worker's own throughput (the relay's fractions serve
    # Mosquitto's p99 target): each step costs two more measurements.
    plan = [("relay", frac, relay_rate) for frac in ([] if plain else s.latency_fracs)] + \
           [("worker", frac, r["worker_throughput"]["rate"]) for frac in s.own_fracs]
    for basis, frac, basis_rate in plan:
        rate = round(basis_rate * frac, 1)
        lat_args = ["--rate", str(rate), "--duration", str(s.latency_s), "--grace", str(s.grace_s),
                    "--warmup", str(min(s.warmup, 100)), "--window", "100"]
        step = {f"fraction_of_{basis}": frac, "basis": basis, "offered_rate": rate}
        for system in ["relay"] + systems:
            run.log(f"online/{bk}: {system} latency at {rate:.0f} msg/s ({frac:.0%} of the {basis}'s throughput)")
            step[system] = _online_step(run, bk, system, lat_args, 120 + s.latency_s + s.grace_s)
        r["latency"].append(step)


def _recorder(pid: int | None, d: Path):
    from bench.profile import Recorder
    return Recorder(pid, d / "profile.raw")


def _save_profile(run: Run, rec, name: str) -> dict:
    from bench.profile import flamegraph_svg, summarize, working
    stacks = rec.stop()
    svg = run.out / f"{run.stem}-profile-{name}.svg"
    svg.write_text(flamegraph_svg(working(stacks), f"worker, {name}, working threads only"), encoding="utf-8")
    return {"svg": svg.name, **summarize(stacks)}


# --- 2. offline drain ---------------------------------------------------------------------------
def offline(run: Run, profile: str | None = None) -> dict:
    s = run.sizes
    n = s.drain_backlog
    if not h.mosquitto_available():
        return {"skipped": "mosquitto is not installed: the baseline is Mosquitto's own offline queue"}
    d = run.scratch("offline")
    db = f"sqlite:///{d}/im.db"
    run.log(f"offline: filling a backlog of {n} messages for bob")
    fill_s = h.fill_messages(db, n, lambda i: "bob")
    # One Mosquitto for both: its queue limit raised so its own offline queue drops nothing.
    b = h.start_mosquitto_broker(d, USERS, queue_limit=max(2 * n, 200_000))
    out: dict = {"backlog": n, "limit": s.drain_limit, "fill_s": round(fill_s, 2), "broker": "mosquitto",
                 "queue_limit": max(2 * n, 200_000)}
    try:
        w = h.start_worker(b, db, d)
        rec = _recorder(w.pid, d) if profile else None
        try:
            run.log(f"offline: drain with count + pages of {s.drain_limit}" + (" (under py-spy)" if profile else ""))
            out["drain"] = h.run_loadgen(["drain", "--port", str(b.port), "--limit", str(s.drain_limit),
                                          "--expect", str(n), "--timeout", "60"], b.secrets,
                                         {"broker": b.pid, "worker": w.pid}, 600, d / "loadgen.log")
            if rec is not None:
                out["drain"]["profile"] = _save_profile(run, rec, profile)
        finally:
            w.stop()
        if profile:
            return out["drain"]
        out["drain"]["left_in_store"] = h.count_messages(db)
        # The same backlog as if every sender had used v1's single receipts (no "receipts": "batch"):
        # one `delivered` receipt payload per drained message (docs/PROTOCOL.md 4.4).
        run.log("offline: the same drain with v1 receipts (one per message)")
        h.fill_messages(db, n, lambda i: "bob", batch_receipts=False)
        w = h.start_worker(b, db, d, tag="worker-v1")
        try:
            out["drain_v1_receipts"] = h.run_loadgen(
                ["drain", "--port", str(b.port), "--limit", str(s.drain_limit), "--expect", str(n), "--timeout", "60"],
                b.secrets, {"broker": b.pid, "worker": w.pid}, 600, d / "loadgen.log")
        finally:
            w.stop()
        out["drain_v1_receipts"]["left_in_store"] = h.count_messages(db)
        run.log(f"offline: Mosquitto's own offline queue replaying {n} messages")
        out["mosquitto_queue"] = h.run_loadgen(["mqueue", "--port", str(b.port), "--n", str(n), "--pub-user",
                                                b.worker_user, "--timeout", "300"], b.secrets,
                                               {"broker": b.pid}, 900, d / "loadgen.log")
    finally:
        b.stop()
    dr, mq = out["drain"], out["mosquitto_queue"]
    out["lost"] = n - dr["distinct"]
    out["baseline_lost"] = n - mq["received"]
    out["ratio_to_mosquitto_queue"] = ratio(dr["rate"], mq["rate"])
    if "drain_v1_receipts" in out:
        v1 = out["drain_v1_receipts"]
        out["lost_v1_receipts"] = n - v1["distinct"]
        out["ratio_v1_receipts_to_mosquitto_queue"] = ratio(v1["rate"], mq["rate"])
    shutil.rmtree(d, ignore_errors=True)
    return out


# --- 3. growth ----------------------------------------------------------------------------------
def _growth_receiver(n: int):
    """Who receives row i: "fix" holds exactly 1,000 rows spread over the whole table, "big" about
    half of all rows, and 997 others share the rest."""
    step = max(1, n // 1000)

    def receiver_of(i: int) -> str:
        if i % step == 0 and i // step < 1000:
            return "fix"
        return "big" if i % 2 else f"u{i % 997}"
    return receiver_of


# Every receiver has two registered devices, the default one (the v1 topics the probe uses) and "d2",
# so every stored row has two entries (docs/PROTOCOL.md 12.3): 1M rows are 2M entries.
GROWTH_DEVICES = ("", "d2")


def growth(run: Run) -> dict:
    s = run.sizes
    kind = "mosquitto" if "mosquitto" in run.brokers() else "amqtt"
    out: dict = {"broker": kind, "limit": 100, "reps": s.growth_reps, "devices": list(GROWTH_DEVICES), "sizes": []}
    for n in s.growth_rows:
        d = run.scratch(f"growth-{n}")
        db = f"sqlite:///{d}/im.db"
        run.log(f"growth: filling {n:,} rows")
        fill_s = h.fill_messages(db, n, _growth_receiver(n), devices=GROWTH_DEVICES)
        size = {"rows": n, "fill_s": round(fill_s, 2), "db_mb": round((d / "im.db").stat().st_size / 2**20, 1)}
        b = h.start_broker(kind, d, db, ["big", "fix"])
        try:
            w = h.start_worker(b, db, d)
            try:
                for uid in ("fix", "big"):
                    run.log(f"growth: {n:,} rows, count and pages for {uid}")
                    size[uid] = h.run_loadgen(["probe", "--port", str(b.port), "--uid", uid, "--reps",
                                               str(s.growth_reps)], b.secrets, {"broker": b.pid, "worker": w.pid},
                                              600, d / "loadgen.log")
            finally:
                w.stop()
        finally:
            b.stop()
        size["store"] = _store_timings(db, s.growth_reps)
        out["sizes"].append(size)
        shutil.rmtree(d, ignore_errors=True)
    first, last = out["sizes"][0], out["sizes"][-1]
    for key in ("page_ack", "page", "count"):
        out[f"{key}_ratio_big"] = ratio(last["big"][key]["p50"], first["big"][key]["p50"])
        out[f"{key}_ratio_fix"] = ratio(last["fix"][key]["p50"], first["fix"][key]["p50"])
    out["rows_compared"] = [first["rows"], last["rows"]]
    return out


def _store_timings(db_url: str, reps: int) -> dict:
    """The same operations straight on backend.store (no MQTT, no worker): where the time goes."""
    from backend import core
    from backend.store import Store, open_database
    from bench.stats import summary_ms
    db = open_database(db_url)
    try:
        store = Store(db)
        out: dict = {}
        for uid in ("fix", "big"):
            t_count, t_page = [], []
            for k in range(reps):
                t = time.monotonic()
                store.apply([core.CountBacklog(receiver=uid, req_id="c")])
                t_count.append(time.monotonic() - t)
                t = time.monotonic()
                store.apply([core.PullPage(receiver=uid, req_id="p", limit=100, from_uid=None, ack=None)])
                t_page.append(time.monotonic() - t)
            out[uid] = {"count": summary_ms(t_count), "page": summary_ms(t_page)}
        return out
    finally:
        db.close()


# --- 5. devices -------------------------------------------------------------------------------
def devices(run: Run) -> dict:
    """Online throughput with 2 device-aware devices per receiver against 1, alternating, on Mosquitto
    (the online scenario's closed loop: a message is complete when every device has it and its sender
    holds the delivered receipt); then the worker's memory per online device."""
    s = run.sizes
    if not h.mosquitto_available():
        return {"skipped": "mosquitto is not installed: the devices scenario runs on Mosquitto"}
    out: dict = {"broker": "mosquitto", "n": s.devices_n, "window": s.window, "reps": s.devices_reps, "runs": []}
    thr_args = ["--count", str(s.devices_n), "--window", str(s.window), "--warmup", str(s.warmup)]
    for rep in range(s.devices_reps):
        for nd in (1, 2):
            run.log(f"devices: worker throughput, {nd} device(s) per receiver ({s.devices_n} messages, "
                    f"run {rep + 1} of {s.devices_reps})")
            res = _online_step(run, "mosquitto", "worker", ["--devices", str(nd), *thr_args], 300)
            res["devices"], res["rep"] = nd, rep + 1
            out["runs"].append(res)
    for nd in (1, 2):
        got = [r for r in out["runs"] if r["devices"] == nd]
        out[f"rate_{nd}"] = round(sum(r["rate"] for r in got) / len(got), 1)
        out[f"device_rate_{nd}"] = round(sum(r["device_rate"] for r in got) / len(got), 1)
        # What each message costs the worker's CPU (both its threads), over all runs: the ratio the
        # throughput would approach if the worker alone were saturated.
        cpu, n = sum(r.get("cpu_s", {}).get("worker", 0) for r in got), sum(r["n"] for r in got)
        out[f"worker_cpu_us_{nd}"] = round(cpu / n * 1e6, 1) if n else None
    out["ratio"] = ratio(out["rate_2"], out["rate_1"])
    out["memory"] = _device_memory(run, s.devices_online)
    return out


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmRSS:"))


def _registered_devices(db_url: str) -> int:
    import sqlite3
    from backend.store import Device
    con = sqlite3.connect(db_url[len("sqlite:///"):], timeout=10)
    try:
        return con.execute(f'SELECT COUNT(*) FROM "{Device._meta.table_name}"').fetchone()[0]
    finally:
        con.close()


def _device_memory(run: Run, n_devices: int) -> dict:
    """RSS of the worker process before and after n_devices devices (10 per user) say `online`, retained,
    on their own status topics: what each online device costs the worker (its presence and device state,
    plus what SQLite and the allocator keep)."""
    per_user = 10  # the default cap (--max-devices)
    users = max(1, n_devices // per_user)
    warm_users = min(10, max(1, users // 10))  # 100 devices (20 in the tiny run)
    d = run.scratch("devices-memory")
    db = f"sqlite:///{d}/im.db"
    names = [f"w{k}" for k in range(warm_users)] + [f"u{k}" for k in range(users)]
    b = h.start_mosquitto_broker(d, names)
    try:
        w = h.start_worker(b, db, d)
        try:
            def settle(expect: int, timeout: float = 120) -> None:
                end = time.monotonic() + timeout
                while _registered_devices(db) < expect:
                    if time.monotonic() > end:
                        raise TimeoutError(f"the worker registered {_registered_devices(db)} of {expect} devices")
                    time.sleep(0.2)
                time.sleep(0.5)  # the announcements that follow each `online` (count, publish)
            # A warm-up first, so code paths, caches and pools are in place before "before".
            run.log(f"devices: worker memory, {warm_users * per_user} devices online (warm-up)")
            h.run_loadgen(["statuses", "--port", str(b.port), "--prefix", "w", "--users", str(warm_users),
                           "--per-user", str(per_user)], b.secrets, {"worker": w.pid}, 300, d / "loadgen.log")
            settle(warm_users * per_user)
            before = _rss_bytes(w.pid)
            run.log(f"devices: worker memory, {users * per_user:,} more devices online")
            res = h.run_loadgen(["statuses", "--port", str(b.port), "--prefix", "u", "--users", str(users),
                                 "--per-user", str(per_user)], b.secrets, {"worker": w.pid}, 600, d / "loadgen.log")
            settle((warm_users + users) * per_user)
            after = _rss_bytes(w.pid)
        finally:
            w.stop()
    finally:
        b.stop()
    shutil.rmtree(d, ignore_errors=True)
    n = users * per_user
    return {"devices": n, "users": users, "per_user": per_user, "warmup_devices": warm_users * per_user,
            "rss_before": before, "rss_after": after, "bytes_per_device": round((after - before) / n, 1),
            "statuses_s": res.get("elapsed_s"), "worker_cpu_s": res.get("cpu_s", {}).get("worker")}


# --- 4. scale-out -----------------------------------------------------------------------------
def scaleout(run: Run) -> dict:
    """1 against 2 workers on one PostgreSQL (a schema of its own per measurement): online end-to-end
    throughput, measured as the online scenario's closed loop, with several senders (one receiver), beside
    each of the run's brokers but amqtt.

    Beside Mosquitto the workers share send/ack/req through the default shared-subscription group (distinct
    --id). Beside NATS and RabbitMQ (no $share), for each of them among the run's brokers: one worker with a
    persistent session against 2 workers with uid partitions (``--partitions 2 --partition I``, each a
    persistent session, each subscribed plainly and keeping the senders it owns); the senders are chosen so
    each partition owns as many of them."""
    s = run.sizes
    why = h.database_reachable(POSTGRES_URL)
    plain = [k for k in run.brokers() if k in h.PLAIN_BROKERS]
    if why:
        return {"skipped": why}
    mosquitto = "mosquitto" in run.brokers()
    if not mosquitto and not plain:
        return {"skipped": "none of Mosquitto (its $share subscriptions), NATS or RabbitMQ is installed and chosen"}
    out: dict = {}
    if mosquitto:
        out = _scaleout_broker(run, "mosquitto", [f"s{i}" for i in range(s.scaleout_senders)])
    else:
        out["mosquitto_skipped"] = "mosquitto is not installed or not among --brokers"
    if plain:
        out["brokers"] = {}
        senders = partition_senders(s.scaleout_senders, max(s.scaleout_workers))
        for kind in plain:
            try:
                out["brokers"][kind] = _scaleout_broker(run, kind, senders)
            except Exception as e:  # noqa: BLE001 - said; the other brokers' figures are kept
                run.log(f"scaleout/{kind} FAILED: {e}")
                out["brokers"][kind] = {"error": f"{type(e).__name__}: {e}"}
    return out


def owner(uid: str, partitions: int) -> int:
    """The partition owning ``uid`` (the worker's contract: zlib.crc32 of its UTF-8 bytes, modulo N)."""
    return zlib.crc32(uid.encode("utf-8")) % partitions


def partition_senders(k: int, partitions: int) -> list[str]:
    """k sender uids s0, s1, ... spread evenly over the partitions (k / partitions each, k a multiple)."""
    per = max(1, k // partitions)
    chosen: list[str] = []
    count = [0] * partitions
    i = 0
    while len(chosen) < per * partitions:
        uid = f"s{i}"
        p = owner(uid, partitions)
        if count[p] < per:
            chosen.append(uid)
            count[p] += 1
        i += 1
    return chosen


def _scaleout_broker(run: Run, kind: str, senders: list[str]) -> dict:
    s = run.sizes
    plain = kind in h.PLAIN_BROKERS
    window = min(s.window, s.plain_scaleout_window) if plain else s.window
    out: dict = {"broker": kind, "database": POSTGRES_URL.split("@")[-1], "private_schema": True, "n": s.scaleout_n,
                 "senders": len(senders), "sender_uids": senders, "receivers": 1, "window": window,
                 "warmup": s.warmup, "reps": s.scaleout_reps, "worker_counts": s.scaleout_workers, "runs": []}
    counts = list(s.scaleout_workers)
    if plain:
        out["sharing"] = "partitions"
        out["partition_of"] = {u: owner(u, max(counts)) for u in senders + ["bob"]}
        if not h.partitions_supported():
            counts = [n for n in counts if n == 1]
            out["partitions_missing"] = ("this checkout's worker has no --partitions (work sharing without $share): "
                                         "only 1 worker measured")
            run.log(f"scaleout/{kind}: {out['partitions_missing']}")
    else:
        out["sharing"] = "$share"
    for rep in range(s.scaleout_reps):
        for nw in counts:
            run.log(f"scaleout/{kind}: {nw} worker(s) on PostgreSQL, {len(senders)} senders, {s.scaleout_n} "
                    f"messages (run {rep + 1} of {s.scaleout_reps})")
            res = _scaleout_step(run, kind, nw, senders, window)
            res["workers"], res["rep"] = nw, rep + 1
            out["runs"].append(res)
    rates: dict[str, float] = {}
    for nw in counts:
        got = [r["rate"] for r in out["runs"] if r["workers"] == nw]
        rates[str(nw)] = round(sum(got) / len(got), 1)
    out["rate"] = rates
    lo, hi = str(min(counts)), str(max(counts))
    out["ratio"] = ratio(rates[hi], rates[lo]) if hi != lo else None
    out["ratio_of"] = [int(hi), int(lo)]
    return out


def _scaleout_step(run: Run, kind: str, n_workers: int, senders: list[str], window: int) -> dict:
    s = run.sizes
    d = run.scratch(f"scaleout-{kind}-{n_workers}")
    plain = kind in h.PLAIN_BROKERS
    tag = os.urandom(2).hex()  # client ids of this step only: a shared RabbitMQ node outlives the step
    with h.private_schema(POSTGRES_URL) as db_url:
        b = h.start_broker(kind, d, db_url, senders + ["bob"], shared=run.shared)
        workers: list[h.Proc] = []
        ids: list[str] = []
        try:
            for i in range(n_workers):  # all at once, as an operator would start them
                if not plain:
                    wid, kw = f"bench-w{i}", {}
                elif n_workers == 1:  # the same kind of session as a partitioned worker's
                    wid, kw = f"bench-{tag}-w0", {"persistent": True}
                else:
                    wid, kw = f"bench-{tag}-p{i}of{n_workers}", {"partition": (i, n_workers)}
                ids.append(f"im-worker-{wid}")
                workers.append(h.start_worker(b, db_url, d, tag=f"worker{i}", worker_id=wid, wait=False, **kw))
            for w in workers:
                w.wait_for("backend.worker: connected", 30)
            watch = {"broker": b.pid, **{f"worker{i}": w.pid for i, w in enumerate(workers)},
                     "postgres": lambda: h.cpu_seconds_named("postgres"), "machine": h.machine_cpu_seconds}
            res = h.run_loadgen(["online", "--mode", "worker", "--port", str(b.port), "--sender", ",".join(senders),
                                 "--receiver", "bob", "--count", str(s.scaleout_n), "--window", str(window),
                                 "--warmup", str(s.warmup)], b.secrets, watch, 300, d / "loadgen.log")
        finally:
            for w in workers:
                w.stop()
            if plain:
                h.discard_sessions(b, b.worker_user, ids)
            b.stop()
    cpu = res.get("cpu_s", {})
    res["cpu_s"]["workers"] = round(sum(v for k, v in cpu.items() if k.startswith("worker")), 3)
    res["cpu_util"]["workers"] = round(res["cpu_s"]["workers"] / max(1e-9, res["wall_s"]), 3)
    shutil.rmtree(d, ignore_errors=True)
    return res


# --- profiles (py-spy), apart from the measured runs -----------------------------------------------
def profile(run: Run) -> dict:
    """The worker under the online throughput load and under the offline drain, sampled by py-spy.
    Separate runs: sampling slows the worker a little, so these are not the figures above."""
    s = run.sizes
    kind = "mosquitto" if "mosquitto" in run.brokers() else "amqtt"
    out: dict = {"broker": kind}
    n = 5 * s.worker_n  # a few seconds of samples at 100 Hz, not one
    run.log(f"profile: worker throughput on {kind} under py-spy ({n} messages)")
    out["online"] = _online_step(run, kind, "worker", ["--count", str(n), "--window", str(s.window),
                                                       "--warmup", str(s.warmup)], 300, profile=f"online-{kind}")
    if kind == "mosquitto":
        out["drain"] = offline(run, profile="drain")
    return out


# --- 6. groups ------------------------------------------------------------------------------------
def groups(run: Run) -> dict:
    """Group fan-out on Mosquitto (docs/PROTOCOL.md 14). Baseline: the broker's own fan-out, one publish to a
    topic that R subscribers hold (R = the group's receivers), from a fresh Mosquitto. Worker: a group of
    ``groups_members`` members (the sender one of them), every member online on its own connection, acking its
    pushes; a message is complete when the last receiver has it. Deliveries per second (receivers x complete
    messages / s) and send-to-last-receiver latency, in a closed loop (``groups_window`` messages incomplete at
    most) and one message at a time; then the store's rows per group message (members hold their acks while
    ``groups_cost_n`` messages are stored), and the store checked drained at the end."""
    s = run.sizes
    if not h.mosquitto_available():
        return {"skipped": "mosquitto is not installed: the groups scenario runs on Mosquitto"}
    n_members = s.groups_members
    receivers = n_members - 1
    uids = [f"gm{k}" for k in range(receivers)]
    common = ["--count", str(s.groups_n), "--window", str(s.groups_window), "--warmup", str(s.groups_warmup),
              "--latency-count", str(s.groups_latency_n), "--prefix", "gm"]
    out: dict = {"broker": "mosquitto", "members": n_members, "receivers": receivers, "n": s.groups_n,
                 "window": s.groups_window, "latency_n": s.groups_latency_n, "content_bytes": 100}
    d = run.scratch("groups-fanout")
    b = h.start_mosquitto_broker(d, uids)
    try:
        run.log(f"groups: Mosquitto's own fan-out to {receivers} subscribers ({s.groups_n} messages)")
        out["baseline"] = h.run_groupload(["fanout", "--port", str(b.port), "--members", str(receivers),
                                           "--pub-user", b.worker_user, *common], b.secrets, {"broker": b.pid},
                                          300, d / "groupload.log")
    finally:
        b.stop()
    shutil.rmtree(d, ignore_errors=True)
    d = run.scratch("groups-worker")
    db_path = d / "im.db"
    b = h.start_mosquitto_broker(d, uids + ["gs"])
    try:
        w = h.start_worker(b, f"sqlite:///{db_path}", d)
        try:
            run.log(f"groups: the worker, a group of {n_members} members ({s.groups_n} messages)")
            out["worker"] = h.run_groupload(["group", "--port", str(b.port), "--members", str(n_members),
                                             "--sender", "gs", "--db", str(db_path), "--cost-count",
                                             str(s.groups_cost_n), *common], b.secrets,
                                            {"broker": b.pid, "worker": w.pid}, 300, d / "groupload.log")
        finally:
            w.stop()
    finally:
        b.stop()
    shutil.rmtree(d, ignore_errors=True)
    wr, br = out["worker"]["throughput"], out["baseline"]["throughput"]
    out["ratio"] = ratio(wr["delivery_rate"], br["delivery_rate"])
    return out
