"""Turn a results dict into the target check, a Markdown report and PNG plots."""

from __future__ import annotations

from pathlib import Path

TARGETS = {
    "online_throughput": "online end-to-end throughput >= 0.5 x the pure relay on the same broker (0.7 x on NATS "
                         "and RabbitMQ)",
    "online_p99": "p99 latency at 50% of the relay's throughput <= 25 ms on Mosquitto",
    "offline_drain": "offline drain >= 1.5 x Mosquitto's own offline-queue replay, nothing lost at 100k",
    "growth_page": "page latency at 1M rows <= 1.5 x at 10k rows",
    "devices_throughput": "online throughput with 2 devices per receiver >= 0.7 x with 1 (users served per second)",
    "groups_fanout": "group fan-out: deliveries per second to a group's members >= 0.5 x Mosquitto's own fan-out "
                     "of one publish to as many subscribers",
}


def _f(x, nd=0, unit=""):
    if x is None:
        return "n/a"
    return f"{x:,.{nd}f}{unit}"


def _lat(s: dict | None, key: str = "p99") -> str:
    if not s or s.get(key) is None:
        return "n/a"
    return (">" if s.get(key + "_lower_bound") else "") + f"{s[key]:,.1f}"


# Online throughput against the relay on the same broker: 0.5 by default; 0.7 beside NATS and RabbitMQ
# (issue 15), where both the worker and the relay subscribe plainly.
ONLINE_TARGET = {"nats": 0.7, "rabbitmq": 0.7}


def check_targets(res: dict) -> list[dict]:
    sc = res.get("scenarios", {})
    out: list[dict] = []
    on = sc.get("online", {})
    for bk, r in on.get("brokers", {}).items():
        w = r.get("worker_throughput")
        if not w:
            continue
        rt = w.get("ratio_to_relay")
        goal = ONLINE_TARGET.get(bk, 0.5)
        t = {"id": "online_throughput", "broker": bk, "target": f">= {goal}", "measured": rt,
             "what": f"worker {w['rate']:,.0f} msg/s vs relay {r['relay_throughput']['rate']:,.0f} msg/s on {bk}"
                     + (f" (senders with v1 receipts: {r['worker_v1_receipts_throughput']['rate']:,.0f} msg/s, "
                        f"{r['worker_v1_receipts_throughput']['ratio_to_relay']:.2f}x)"
                        if r.get("worker_v1_receipts_throughput") else ""),
             "passed": rt is not None and rt >= goal}
        if rt is not None and not t["passed"]:
            t["missed_by"] = f"{rt:.2f}x instead of {goal}x: {goal / rt:.1f} times short"
        out.append(t)
    mq = on.get("brokers", {}).get("mosquitto")
    if mq:
        step = next((s for s in mq.get("latency", []) if abs(s.get("fraction_of_relay", -1) - 0.5) < 1e-9), None)
        if step:
            lat = step["worker"]["push_latency"]
            p99 = lat.get("p99")
            t = {"id": "online_p99", "broker": "mosquitto", "target": "<= 25 ms", "measured": p99,
                 "lower_bound": lat.get("p99_lower_bound"),
                 "what": f"p99 sender->receiver at {step['offered_rate']:,.0f} msg/s: worker {_lat(lat)} ms, "
                         f"relay {_lat(step['relay']['push_latency'])} ms",
                 "passed": p99 is not None and p99 <= 25 and not lat.get("p99_lower_bound")}
            if not t["passed"] and p99:
                t["missed_by"] = (f"{'more than ' if lat.get('p99_lower_bound') else ''}{p99:,.0f} ms instead of "
                                  f"25 ms: {p99 / 25:.1f} times over; the worker received "
                                  f"{step['worker']['received']:,} of {step['worker']['n']:,} sends in time "
                                  f"(it sustains about {mq['worker_throughput']['rate']:,.0f} msg/s)")
            out.append(t)
    off = sc.get("offline", {})
    if "ratio_to_mosquitto_queue" in off:
        rt = off["ratio_to_mosquitto_queue"]
        t = {"id": "offline_drain", "broker": "mosquitto", "target": ">= 1.5, lost 0", "measured": rt,
             "lost": off["lost"], "backlog": off["backlog"],
             "what": f"drain {off['drain']['rate']:,.0f} msg/s vs Mosquitto queue {off['mosquitto_queue']['rate']:,.0f} "
                     f"msg/s, backlog {off['backlog']:,}, lost {off['lost']} (senders with batched receipts)"
                     + (f"; with v1 receipts {off['drain_v1_receipts']['rate']:,.0f} msg/s "
                        f"({off['ratio_v1_receipts_to_mosquitto_queue']:.2f}x), lost {off['lost_v1_receipts']}"
                        if off.get("drain_v1_receipts") else ""),
             "passed": rt is not None and rt >= 1.5 and off["lost"] == 0 and off.get("lost_v1_receipts", 0) == 0}
        if off["backlog"] < 100_000:
            t["note"] = f"backlog {off['backlog']:,}, not 100k (run the full mode)"
        if not t["passed"] and rt:
            t["missed_by"] = f"{rt:.2f}x instead of 1.5x: {1.5 / rt:.1f} times short" + (
                f"; {off['lost']} lost" if off["lost"] else "")
        out.append(t)
    gr = sc.get("growth", {})
    if "page_ack_ratio_big" in gr:
        rt = gr["page_ack_ratio_big"]
        a, b = gr["rows_compared"]
        t = {"id": "growth_page", "broker": gr["broker"], "target": "<= 1.5", "measured": rt,
             "what": f"p50 of a pull (limit 100, acking the page before) at {b:,} rows / at {a:,} rows",
             "passed": rt is not None and rt <= 1.5}
        if b < 1_000_000:
            t["note"] = f"compared {a:,} with {b:,} rows, not 1M (run the full mode)"
        if not t["passed"] and rt:
            t["missed_by"] = f"{rt:.2f}x instead of at most 1.5x"
        out.append(t)
    dv = sc.get("devices", {})
    if "ratio" in dv:
        rt = dv["ratio"]
        t = {"id": "devices_throughput", "broker": dv["broker"], "target": ">= 0.7", "measured": rt,
             "what": f"2 devices per receiver {dv['rate_2']:,.0f} msg/s ({dv['device_rate_2']:,.0f} device "
                     f"deliveries/s) vs 1 device {dv['rate_1']:,.0f} msg/s, mean of {dv['reps']} alternating run(s)",
             "passed": rt is not None and rt >= 0.7}
        if not t["passed"] and rt:
            t["missed_by"] = f"{rt:.2f}x instead of 0.7x"
        mem = dv.get("memory")
        if mem:
            t["note"] = (f"worker memory {mem['bytes_per_device']:,.0f} bytes per online device (RSS with "
                         f"{mem['devices']:,} devices online, {mem['per_user']} per user)")
        out.append(t)
    t = groups_target(sc.get("groups", {}))
    if t:
        out.append(t)
    return out


def groups_target(gr: dict) -> dict | None:
    if gr.get("ratio") is None and "worker" not in gr:
        return None
    rt = gr.get("ratio")
    w, b = gr["worker"]["throughput"], gr["baseline"]["throughput"]
    t = {"id": "groups_fanout", "broker": gr["broker"], "target": ">= 0.5", "measured": rt,
         "what": f"a group of {gr['members']:,} members: worker {w['delivery_rate']:,.0f} deliveries/s "
                 f"({w['msg_rate']:,.1f} group msg/s, send to last member p50 {_lat(w['latency_last'], 'p50')} / p99 "
                 f"{_lat(w['latency_last'])} ms) vs Mosquitto's fan-out to {gr['receivers']:,} subscribers "
                 f"{b['delivery_rate']:,.0f} deliveries/s (p50 {_lat(b['latency_last'], 'p50')} / p99 "
                 f"{_lat(b['latency_last'])} ms)",
         "passed": rt is not None and rt >= 0.5 and gr["worker"].get("left_waiting_rows", 0) == 0}
    cost = gr["worker"].get("cost")
    if cost:
        t["note"] = (f"store: {cost['rows_per_member']:.2f} rows per member per group message"
                     + (f", {cost['payload_bytes_per_member']:,.0f} payload bytes per member"
                        if "payload_bytes_per_member" in cost else "")
                     + f"; left waiting in the store at the end: {gr['worker'].get('left_waiting_rows')}")
    if gr["members"] < 1000:
        t["note"] = f"{gr['members']} members, not 1,000 (run --quick or the full mode)" + (
            f"; {t['note']}" if t.get("note") else "")
    if not t["passed"] and rt:
        t["missed_by"] = f"{rt:.2f}x instead of 0.5x" + (
            "" if gr["worker"].get("left_waiting_rows", 0) == 0 else "; the store did not drain")
    return t


def targets_text(res: dict) -> str:
    lines = [f"Targets ({res['mode']} run, every figure against its baseline from this run):"]
    for t in res.get("targets", []):
        m = t["measured"]
        ms = "n/a" if m is None else (f"{m:.2f}x" if t["id"] != "online_p99" else
                                      ("> " if t.get("lower_bound") else "") + f"{m:,.1f} ms")
        verdict = "MET" if t["passed"] else "MISSED"
        lines.append(f"  [{verdict:6}] {t['id']:17} {t['broker']:9} {ms:>12}  (target {t['target']}) - {t['what']}")
        if t.get("missed_by"):
            lines.append(f"           missed by: {t['missed_by']}")
        if t.get("note"):
            lines.append(f"           note: {t['note']}")
    for so in scaleouts(res.get("scenarios", {}).get("scaleout", {})):
        rates = ", ".join(f"{k} worker(s) {v:,.0f} msg/s" for k, v in so["rate"].items())
        rt = f"{so['ratio']:.2f}x" if so.get("ratio") is not None else "n/a"
        lines.append(f"  [INFO  ] scaleout {so['broker']:9} {rt:>12}  ({so['ratio_of'][0]} / {so['ratio_of'][1]} "
                     f"workers, {so.get('sharing', '$share')}; no target) - {rates}"
                     + (f"; {so['partitions_missing']}" if so.get("partitions_missing") else ""))
    for name, broker, error in broker_errors(res):
        lines.append(f"  [ERROR ] {name} {broker}: {error}")
    for name, sc in res.get("scenarios", {}).items():
        if "error" in sc:
            lines.append(f"  [ERROR ] {name}: {sc['error']}")
        elif "skipped" in sc:
            lines.append(f"  [SKIP  ] {name}: {sc['skipped']}")
    return "\n".join(lines)


def broker_errors(res: dict) -> list[tuple[str, str, str]]:
    """(scenario, broker, error) of each broker whose part of a scenario failed while the others ran."""
    sc = res.get("scenarios", {})
    return [(name, bk, r["error"]) for name in ("online", "scaleout")
            for bk, r in sc.get(name, {}).get("brokers", {}).items() if "error" in r]


def scaleouts(so: dict) -> list[dict]:
    """The scale-out measurements of a run: Mosquitto's (the scenario's top level), then each other broker's."""
    out = [so] if so.get("runs") else []
    return out + [v for v in so.get("brokers", {}).values() if v.get("runs")]


def _cpu(r: dict, *names: str) -> str:
    u = r.get("cpu_util", {})
    return " / ".join(f"{u[n]:.2f}" if n in u else "-" for n in names)


def _us(r: dict, *names: str) -> str:
    c, n = r.get("cpu_s", {}), r.get("n") or 0
    return " / ".join(f"{c[k] / n * 1e6:,.0f}" if k in c and n else "-" for k in names)


def markdown(res: dict) -> str:
    m = res["machine"]
    sc = res["scenarios"]
    L = [f"# Benchmark results ({res['mode']} run, {res['started']})", "",
         f"Machine: {m['nproc']} cores, {m['cpu']}, Python {m['python']}, {m['platform']}; "
         f"{m.get('mosquitto') or 'no Mosquitto'}; load average (1/5/15 min) at start {m.get('loadavg_at_start')}, "
         f"at end {m.get('loadavg_at_end')}.",
         f"Total time {res['seconds']:.0f} s.", "", "## Targets", "",
         "| target | broker | measured | target | verdict | detail |", "|---|---|---|---|---|---|"]
    for t in res.get("targets", []):
        mv = t["measured"]
        ms = "n/a" if mv is None else (f"{mv:.2f}x" if t["id"] != "online_p99" else
                                       ("> " if t.get("lower_bound") else "") + f"{mv:,.1f} ms")
        detail = t["what"] + (f"; missed by: {t['missed_by']}" if t.get("missed_by") else "") + (
            f"; {t['note']}" if t.get("note") else "")
        L.append(f"| {TARGETS[t['id']]} | {t['broker']} | {ms} | {t['target']} | "
                 f"{'met' if t['passed'] else '**missed**'} | {detail} |")
    on = sc.get("online", {})
    if on.get("brokers"):
        L += ["", "## 1. Online end to end", "",
              f"QoS 1, {on['content_bytes']}-byte content, one sender and one receiver in one load-generator process, "
              f"closed loop with at most {on['window']} messages incomplete. A message is complete when the sender "
              "holds its `delivered` receipt (worker: store, stored receipt, push, batched ack, delete, delivered "
              "receipt) or when the receiver got it (relay). CPU: share of one core used by broker / "
              "worker or relay / load generator while measured.", "",
              "| broker | system | msg/s | ratio to relay | push latency p50 / p99 (ms) | CPU broker / system / loadgen "
              "(cores) | CPU µs per message: broker / system / loadgen |",
              "|---|---|---|---|---|---|---|"]
        for bk, r in on["brokers"].items():
            if "relay_throughput" not in r:
                continue  # failed: said under the targets
            rel = r["relay_throughput"]
            L.append(f"| {bk} | relay (baseline) | {_f(rel['rate'])} | 1 | {_lat(rel['push_latency'], 'p50')} / "
                     f"{_lat(rel['push_latency'])} | {_cpu(rel, 'broker', 'relay', 'loadgen')} | "
                     f"{_us(rel, 'broker', 'relay', 'loadgen')} |")
            for system, label in (("worker", "worker"), ("worker_v1_receipts", "worker, senders with v1 receipts"),
                                  ("serve", "`serve` (worker inside amqtt's process)")):
                w = r.get(f"{system}_throughput")
                if w:
                    proc = "serve" if system == "serve" else "worker"
                    L.append(f"| {bk} | {label} | {_f(w['rate'])} | {_f(w['ratio_to_relay'], 2)} | "
                             f"{_lat(w['push_latency'], 'p50')} / {_lat(w['push_latency'])} | "
                             f"{_cpu(w, 'broker', proc, 'loadgen')} | {_us(w, 'broker', proc, 'loadgen')} |")
        L += ["", f"Latency at fixed offered rates ({on['latency_s']:g} s each, open loop, measured from each "
                  "message's scheduled send time to its arrival at the receiver; `>` marks a lower bound: "
                  "messages still missing when the step ended count as the time waited).", "",
              "| broker | offered msg/s | system | received / sent | push p50 (ms) | push p99 (ms) | "
              "delivered-receipt p99 (ms) | CPU broker / system |", "|---|---|---|---|---|---|---|---|"]
        for bk, r in on["brokers"].items():
            for step in r.get("latency", []):
                for system in ("relay", "worker", "serve"):
                    x = step.get(system)
                    if not x:
                        continue
                    dl = _lat(x.get("delivered_latency")) if "delivered_latency" in x else "-"
                    basis = step.get("basis", "relay")
                    L.append(f"| {bk} | {_f(step['offered_rate'])} ({step['fraction_of_' + basis]:.0%} of {basis}) | {system} | "
                             f"{x['received']:,} / {x['n']:,} | {_lat(x['push_latency'], 'p50')} | "
                             f"{_lat(x['push_latency'])} | {dl} | {_cpu(x, 'broker', system)} |")
    off = sc.get("offline", {})
    if "drain" in off:
        dr, mq = off["drain"], off["mosquitto_queue"]
        L += ["", "## 2. Offline drain", "",
              f"A backlog of {off['backlog']:,} messages for one receiver (bulk-inserted into the store; for "
              f"Mosquitto, published to its offline persistent session with max_queued_messages "
              f"{off['queue_limit']:,}). Drain: connect, `online`, count, then pulls of {off['limit']} each acking "
              "the page before, until the empty page. Baseline: the clean-session-off subscriber reconnects and "
              "Mosquitto replays its queue. Both from CONNECT to the last message.", "",
              "| what | msg/s | seconds | received | lost | detail | CPU broker / worker / loadgen |",
              "|---|---|---|---|---|---|---|",
              f"| drain (count + pages of {off['limit']}) | {_f(dr['rate'])} | {dr['elapsed_s']:.2f} | "
              f"{dr['distinct']:,} | {off['lost']} | {dr['pages']} pages, page p50 {_lat(dr['page_latency'], 'p50')} ms, "
              f"p99 {_lat(dr['page_latency'])} ms; count {dr['count_ms']:.0f} ms; left in store: "
              f"{dr['left_in_store']} | {_cpu(dr, 'broker', 'worker', 'loadgen')} |",
              f"| Mosquitto offline queue (baseline) | {_f(mq['rate'])} | {mq['elapsed_s']:.2f} | {mq['received']:,} | "
              f"{off['baseline_lost']} | filled in {mq['fill_s']:.1f} s | {_cpu(mq, 'broker', 'x', 'loadgen')} |"]
        v1 = off.get("drain_v1_receipts")
        if v1:
            L.append(f"| drain, senders with v1 receipts (one `delivered` payload per message) | {_f(v1['rate'])} | "
                     f"{v1['elapsed_s']:.2f} | {v1['distinct']:,} | {off['lost_v1_receipts']} | {v1['pages']} pages, "
                     f"page p50 {_lat(v1['page_latency'], 'p50')} ms, p99 {_lat(v1['page_latency'])} ms; left in store: "
                     f"{v1['left_in_store']} | {_cpu(v1, 'broker', 'worker', 'loadgen')} |")
        L += ["", f"Ratio: **{_f(off['ratio_to_mosquitto_queue'], 2)}x** Mosquitto's own replay (backlog sent with "
              "`\"receipts\": \"batch\"`, as backend.client sends)"
              + (f"; **{_f(off['ratio_v1_receipts_to_mosquitto_queue'], 2)}x** with v1 receipts." if v1 else ".")]
    gr = sc.get("growth", {})
    if gr.get("sizes"):
        L += ["", "## 3. Growth", "",
              f"Round trips through the worker on {gr['broker']} (one request at a time, {gr['reps']} each, p50 / p99 "
              "in ms). `fix` holds exactly 1,000 rows spread over the table; `big` holds about half of all rows. "
              "*page*: a pull of 100 without ack; *page+ack*: a pull of 100 acking the previous page (the drain "
              "step: deletes 100 rows); *store*: the same count and page straight on backend.store, no MQTT.", "",
              "| rows | DB MB | count fix | page fix | count big | page big | page+ack big | store: count big | "
              "store: page big |", "|---|---|---|---|---|---|---|---|---|"]
        for s in gr["sizes"]:
            f, b, st = s["fix"], s["big"], s["store"]["big"]

            def pp(x):
                return f"{_lat(x, 'p50')} / {_lat(x)}"
            L.append(f"| {s['rows']:,} | {s['db_mb']} | {pp(f['count'])} | {pp(f['page'])} | {pp(b['count'])} | "
                     f"{pp(b['page'])} | {pp(b['page_ack'])} | {pp(st['count'])} | {pp(st['page'])} |")
        L += ["", f"Ratios {gr['rows_compared'][1]:,} / {gr['rows_compared'][0]:,} rows (p50): page+ack big "
                  f"{_f(gr['page_ack_ratio_big'], 2)}x, page big {_f(gr['page_ratio_big'], 2)}x, page fix "
                  f"{_f(gr['page_ratio_fix'], 2)}x, count big {_f(gr['count_ratio_big'], 2)}x, count fix "
                  f"{_f(gr['count_ratio_fix'], 2)}x."]
    so = sc.get("scaleout", {})
    parts = scaleouts(so)
    if parts:
        L += ["", "## 4. Scale-out"]
        for part in parts:
            L += ["", f"### {part.get('broker', 'mosquitto')}", ""] + scaleout_markdown(part)
    dv = sc.get("devices", {})
    if dv.get("runs"):
        L += ["", "## 5. Devices", ""] + devices_markdown(dv)
    gp = sc.get("groups", {})
    if "worker" in gp and "baseline" in gp:
        L += ["", "## 6. Groups", ""] + groups_markdown(gp)
    prof = sc.get("profile", {})
    for key, label in (("online", "online throughput"), ("drain", "offline drain")):
        x = prof.get(key, {})
        p = x.get("profile")
        if not p:
            continue
        rate = x.get("rate")
        L += ["", f"## Profile of the worker: {label} on {prof.get('broker')} (py-spy, {p['samples']} samples)", "",
              f"A separate run under py-spy ({_f(rate)} msg/s while sampled); shares of the samples in which a "
              f"thread was working ({p.get('waiting_samples', 0)} more samples caught a thread waiting in select() "
              "or on its queue, left out). Flame graph: "
              f"[{p['svg']}]({p['svg']}). Threads: " + ", ".join(f"{t['thread']} {t['pct']}%" for t in p["threads"]) + ".",
              "", "| self % | function (innermost frame) |", "|---|---|"]
        L += [f"| {r['pct']} | `{r['frame']}` |" for r in p["self"][:12]]
        L += ["", "| inclusive % | function |", "|---|---|"]
        L += [f"| {r['pct']} | `{r['frame']}` |" for r in p["inclusive"][:20]]
    for name, bk, error in broker_errors(res):
        L += ["", f"**{name} on {bk} failed:** {error}"]
    for name, v in sc.items():
        if "error" in v:
            L += ["", f"**{name} failed:** {v['error']}"]
        elif "skipped" in v:
            L += ["", f"**{name} skipped:** {v['skipped']}"]
    if res.get("plots"):
        L += ["", "## Plots", ""] + [f"![{p}]({p})" for p in res["plots"]]
    return "\n".join(L) + "\n"


def devices_markdown(dv: dict) -> list[str]:
    L = [f"Online end to end as in section 1 on Mosquitto (QoS 1, closed loop, at most {dv['window']} messages "
         f"incomplete, {dv['n']:,} messages per run), the receiver with 1 or 2 device-aware devices "
         "(docs/PROTOCOL.md 12: each its own connection, topics, status and acks, batched as backend.client); "
         "a message is complete when every device has it and its sender holds the `delivered` receipt. "
         "msg/s counts messages delivered to the user; device deliveries/s counts each device's copy. "
         f"1 and 2 devices alternating, {dv['reps']} run(s) each.", "",
         "| devices | run | msg/s | device deliveries/s | push p50 / p99 (ms) | CPU cores: broker / worker / loadgen "
         "| CPU µs per message: broker / worker / loadgen |", "|---|---|---|---|---|---|---|"]
    for r in dv["runs"]:
        L.append(f"| {r['devices']} | {r['rep']} | {_f(r['rate'])} | {_f(r['device_rate'])} | "
                 f"{_lat(r['push_latency'], 'p50')} / {_lat(r['push_latency'])} | "
                 f"{_cpu(r, 'broker', 'worker', 'loadgen')} | {_us(r, 'broker', 'worker', 'loadgen')} |")
    L += ["", f"Mean: 1 device {_f(dv['rate_1'])} msg/s, 2 devices {_f(dv['rate_2'])} msg/s "
              f"({_f(dv['device_rate_2'])} device deliveries/s); **2 / 1 devices: {_f(dv['ratio'], 2)}x**. "
              f"Worker CPU per message (both threads, all runs): {_f(dv.get('worker_cpu_us_1'))} µs with 1 device, "
              f"{_f(dv.get('worker_cpu_us_2'))} µs with 2."]
    mem = dv.get("memory")
    if mem:
        L += ["", f"Worker memory: RSS {mem['rss_before'] / 2**20:,.1f} MiB with {mem['warmup_devices']} devices online "
                  f"(a warm-up), {mem['rss_after'] / 2**20:,.1f} MiB after {mem['devices']:,} more ({mem['users']:,} "
                  f"users with {mem['per_user']} devices each; each device's retained `online` published once, "
                  f"then the connection closed, so the worker holds them online): "
                  f"**{_f(mem['bytes_per_device'])} bytes per online device**."]
    return L


def groups_markdown(gp: dict) -> list[str]:
    w, b = gp["worker"], gp["baseline"]
    L = [f"On Mosquitto (broker_config/), each side on a fresh broker. *Worker*: a group of {gp['members']:,} members "
         f"(one of them the sender, so {gp['receivers']:,} receivers), each member its own MQTT connection on its "
         "v1 topics (online, acking its pushes in batches of 100 or 50 ms as backend.client, pulling on an "
         "announcement), all of them and the sender in one load-generator process (one epoll loop, paho, QoS 1, "
         "TCP_NODELAY); the worker on SQLite. *Baseline*: the same load generator with "
         f"{gp['receivers']:,} subscribers of one topic, and one publisher whose each publish Mosquitto fans out to "
         f"all of them (QoS 1, a push-shaped payload with {gp['content_bytes']}-byte content). A message is complete "
         f"when the last receiver has it. Closed loop: {gp['n']:,} messages with at most {gp['window']} incomplete; "
         f"then {gp['latency_n']} one at a time (the fan-out's own latency, nothing queued behind it). "
         "*Deliveries/s*: receivers x complete messages per second. CPU: share of one core over the closed loop.",
         "", "| system | group msg/s | deliveries/s | send to last receiver p50 / p99 (ms), closed loop | "
             "one at a time p50 / p99 (ms) | CPU cores: broker / worker / loadgen | CPU µs per delivery: broker / "
             "worker / loadgen |", "|---|---|---|---|---|---|---|"]
    for label, r, proc in (("Mosquitto fan-out (baseline)", b, "x"), ("worker", w, "worker")):
        th, one = r["throughput"], r.get("one_at_a_time")
        c, n = r.get("cpu_s", {}), th.get("deliveries") or 0

        def us(k):
            return f"{c[k] / n * 1e6:,.1f}" if k in c and n else "-"
        L.append(f"| {label} | {_f(th['msg_rate'], 1)} | {_f(th['delivery_rate'])} | "
                 f"{_lat(th['latency_last'], 'p50')} / {_lat(th['latency_last'])} | "
                 + (f"{_lat(one['latency_last'], 'p50')} / {_lat(one['latency_last'])}" if one else "-")
                 + f" | {_cpu(r, 'broker', proc, 'loadgen')} | {us('broker')} / {us(proc)} / {us('loadgen')} |")
    L += ["", f"**Worker / Mosquitto fan-out: {_f(gp.get('ratio'), 2)}x** (deliveries per second)."]
    cost = w.get("cost")
    if cost:
        rows = ", ".join(f"`{k}` {v:+,}" for k, v in sorted(cost["rows_added"].items()))
        L += ["", f"Store writes per group message ({cost['messages']} messages stored while the "
                  f"{cost['receivers']:,} receivers held their acks, SQLite): rows added {rows}: "
                  f"**{cost['rows_per_message']:,.1f} rows per group message, {cost['rows_per_member']:.3f} per "
                  "receiver**"
                  + (f"; b-tree payload **{cost['payload_bytes_per_message']:,.0f} bytes per group message "
                     f"({cost['payload_bytes_per_member']:,.1f} per receiver)**, {cost['page_bytes_per_message']:,.0f} "
                     "bytes of pages (SQLite's dbstat: tables and indexes)" if "payload_bytes_per_message" in cost
                     else "") + "."]
    L += ["", f"Worker side: {_f(w.get('repeats'))} repeated pushes dropped, {_f(w.get('twice'))} messages received "
              f"twice under different seqs, {_f(w.get('pulls'))} pulls, {_f(w.get('ack_packets'))} ack packets, "
              f"{_f(w.get('stored_receipts'))} stored and {_f(w.get('delivered_receipts'))} delivered receipts; "
              f"members missing a message: {_f(w.get('members_missing'))}; left waiting in the store at the end: "
              f"{_f(w.get('left_waiting_rows'))}; set-up (connect {gp['members']:,} members, online, create the "
              f"group, every member has its created event): {w.get('setup_s')} s."]
    return L


def scaleout_markdown(so: dict) -> list[str]:
    if so.get("sharing") == "partitions":
        return _scaleout_table(so, plain_scaleout_text(so))
    return _scaleout_table(so, None)


def plain_scaleout_text(so: dict) -> str:
    hi = max(so["worker_counts"])
    parts = so.get("partition_of", {})
    return (f"Online end to end as in section 1 (QoS 1, closed loop, at most {so['window']} messages incomplete, "
            f"a message complete when its sender holds the `delivered` receipt), with {so['senders']} senders "
            f"({', '.join(so.get('sender_uids', []))}; message i from sender i mod {so['senders']}) and one "
            f"receiver (bob) in one load-generator process, {so['n']:,} messages measured after {so['warmup']} "
            f"of warm-up. Workers beside one {so['broker']} node, which has no `$share`, on one PostgreSQL "
            f"({so['database']}, a schema of its own per measurement), `--send-rate 0`: 1 worker with a "
            f"persistent session (`--persistent-session`, plain subscriptions) against {hi} workers with uid "
            f"partitions (`--partitions {hi} --partition I`: each subscribes plainly to every send/ack/req, keeps "
            "the uids it owns, skips the others; each a persistent session). Partition of each uid (crc32 mod "
            f"{hi}): " + ", ".join(f"{u} {p}" for u, p in parts.items()) + f"; each worker count measured "
            f"{so['reps']} time(s), alternating.")


def _scaleout_table(so: dict, text: str | None) -> list[str]:
    hi, lo = so["ratio_of"]
    mi = so.get("measured_in")
    L = [text] if text else [
         f"Online end to end as in section 1 (QoS 1, closed loop, at most {so['window']} messages incomplete, "
         f"a message complete when its sender holds the `delivered` receipt), with {so['senders']} senders "
         f"(message i from sender i mod {so['senders']}) and one receiver in one load-generator process, "
         f"{so['n']:,} messages measured after {so['warmup']} of warm-up. Workers beside one Mosquitto "
         f"(broker_config/) on one PostgreSQL ({so['database']}, "
         + ("a schema of its own created for each measurement" if so.get("private_schema") else
            "tables dropped and created before each measurement") + "), each with its own `--id`/`--client-id`, sharing send/ack/req through the default "
         "shared-subscription group, `--send-rate 0`; each worker count measured "
         f"{so['reps']} time(s), alternating."]
    L[-1] += (" CPU: share of one core over the measured phase; *postgres* is all of PostgreSQL's processes, "
              "*machine* every process on the machine (out of its cores).")
    if mi:
        L[-1] += (f" Measured in a separate run ({mi['file']}, {mi['mode']} sizes, started {mi['started']}, "
                  f"load average {mi.get('loadavg_at_start')} at its start) and merged into this report.")
    L += ["", "| workers | run | msg/s | push p50 / p99 (ms) | pushes repeated | CPU cores: broker / each worker / "
              "postgres / loadgen / machine | CPU µs per message: workers / postgres / broker / loadgen |",
          "|---|---|---|---|---|---|---|"]
    for r in so["runs"]:
        u, c, n = r.get("cpu_util", {}), r.get("cpu_s", {}), r.get("n") or 0
        each = " + ".join(f"{u[k]:.2f}" for k in sorted(u) if k.startswith("worker") and k != "workers")

        def us(k):
            return f"{c[k] / n * 1e6:,.0f}" if k in c and n else "-"
        L.append(f"| {r['workers']} | {r['rep']} | {_f(r['rate'])} | {_lat(r['push_latency'], 'p50')} / "
                 f"{_lat(r['push_latency'])} | {_f(r.get('duplicates'))} | {u.get('broker', 0):.2f} / {each} / {u.get('postgres', 0):.2f} / "
                 f"{u.get('loadgen', 0):.2f} / {u.get('machine', 0):.2f} | {us('workers')} / {us('postgres')} / "
                 f"{us('broker')} / {us('loadgen')} |")
    rates = ", ".join(f"{k} worker{'s' if k != '1' else ''} {_f(v)} msg/s" for k, v in so["rate"].items())
    L += ["", f"Mean: {rates}" + (f"; **{hi} / {lo} workers: {_f(so['ratio'], 2)}x**." if hi != lo else "."),
          "", "*Pushes repeated*: pushes the receiver got again (same seq): the worker pushes again what is not "
              "acked within 3 s (core.PUSH_ACK_TIMEOUT_MS), so they appear when a push's latency passes 3 s."]
    if so.get("partitions_missing"):
        L += ["", f"**2 workers not measured:** {so['partitions_missing']}."]
    return L


def plots(res: dict, out: Path, stem: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    made: list[str] = []
    sc = res["scenarios"]
    title = f"{res['machine']['nproc']} cores, {res['machine']['cpu']}, Python {res['machine']['python']}"

    def save(fig, name):
        path = out / f"{stem}-{name}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path.name)

    on = sc.get("online", {}).get("brokers", {})
    if on:
        fig, ax = plt.subplots(figsize=(7, 4))
        labels, vals, colors = [], [], []
        for bk, r in on.items():
            for key, lab, col in (("relay_throughput", "relay", "#999999"), ("worker_throughput", "worker", "#1f77b4"),
                                  ("worker_v1_receipts_throughput", "worker,\nv1 receipts", "#aec7e8"),
                                  ("serve_throughput", "serve", "#2ca02c")):
                if key in r:
                    labels.append(f"{bk}\n{lab}")
                    vals.append(r[key]["rate"])
                    colors.append(col)
        bars = ax.bar(range(len(vals)), vals, color=colors)
        for b_, v in zip(bars, vals):
            ax.text(b_.get_x() + b_.get_width() / 2, v, f"{v:,.0f}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(vals)), labels, fontsize=8)
        ax.set_ylabel("messages / s (complete)")
        ax.set_title(f"Online throughput vs pure relay\n{title}", fontsize=9)
        save(fig, "online-throughput")

        lat_b = {bk: r for bk, r in on.items() if r.get("latency")}
        if lat_b:
            fig, axes = plt.subplots(1, len(lat_b), figsize=(6 * len(lat_b), 4), squeeze=False)
            for ax, (bk, r) in zip(axes[0], lat_b.items()):
                for system, col in (("relay", "#999999"), ("worker", "#1f77b4"), ("serve", "#2ca02c")):
                    xs, p50, p99 = [], [], []
                    for st in r["latency"]:
                        if system in st and st.get("basis", "relay") == "relay":
                            lat = st[system]["push_latency"]
                            xs.append(st["offered_rate"])
                            p50.append(lat["p50"])
                            p99.append(lat["p99"])
                            for key in ("p50", "p99"):
                                if lat.get(key + "_lower_bound") and lat[key]:
                                    ax.annotate("> (lower bound)", (st["offered_rate"], lat[key]), fontsize=6,
                                                xytext=(-75, 4), textcoords="offset points", color=col)
                    if xs:
                        ax.plot(xs, p50, "o--", color=col, label=f"{system} p50")
                        ax.plot(xs, p99, "s-", color=col, label=f"{system} p99")
                for st in r["latency"]:
                    if st.get("basis") == "worker" and "worker" in st:
                        lat = st["worker"]["push_latency"]
                        ax.plot([st["offered_rate"]], [lat["p99"]], "*", color="#d62728", ms=10,
                                label=f"worker p99 at {st['fraction_of_worker']:.0%} of its own throughput")
                if bk == "mosquitto":
                    ax.axhline(25, color="red", lw=0.8, ls=":", label="target p99 25 ms")
                ax.set_yscale("log")
                ax.set_xlabel("offered messages / s (fractions of the relay's throughput)")
                ax.set_ylabel("sender -> receiver latency (ms)")
                ax.set_title(f"{bk}", fontsize=9)
                ax.legend(fontsize=7)
            fig.suptitle(f"Latency at fixed offered rates ({title})", fontsize=9)
            save(fig, "online-latency")

    off = sc.get("offline", {})
    if "drain" in off:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        vals = [off["mosquitto_queue"]["rate"], off["drain"]["rate"]]
        labels = ["Mosquitto offline\nqueue replay", f"worker drain\n(pages of {off['limit']},\nbatched receipts)"]
        colors = ["#999999", "#1f77b4"]
        if off.get("drain_v1_receipts"):
            vals.append(off["drain_v1_receipts"]["rate"])
            labels.append("worker drain\n(v1 receipts,\none per message)")
            colors.append("#aec7e8")
        bars = ax.bar(labels, vals, color=colors)
        for b_, v in zip(bars, vals):
            ax.text(b_.get_x() + b_.get_width() / 2, v, f"{v:,.0f}", ha="center", va="bottom", fontsize=8)
        ax.axhline(1.5 * vals[0], color="red", lw=0.8, ls=":", label="target 1.5x Mosquitto")
        ax.set_ylabel("messages / s")
        ax.legend(fontsize=7)
        ax.set_title(f"Offline drain of {off['backlog']:,} messages\n{title}", fontsize=9)
        save(fig, "offline")

    gr = sc.get("growth", {})
    if gr.get("sizes"):
        fig, ax = plt.subplots(figsize=(7, 4))
        xs = [s["rows"] for s in gr["sizes"]]
        for uid, key, style in (("big", "page_ack", "o-"), ("big", "page", "s-"), ("big", "count", "^-"),
                                ("fix", "page", "s--"), ("fix", "count", "^--")):
            ax.plot(xs, [s[uid][key]["p50"] for s in gr["sizes"]], style, label=f"{key} {uid} p50")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("rows in the message table")
        ax.set_ylabel("round trip (ms)")
        ax.legend(fontsize=7)
        ax.set_title(f"Count and page latency as the store grows ({gr['broker']})\n{title}", fontsize=9)
        save(fig, "growth")

    so = sc.get("scaleout", {})
    if so.get("runs"):
        fig, ax = plt.subplots(figsize=(5.5, 4))
        labels = [f"{r['workers']} worker{'s' if r['workers'] != 1 else ''}\nrun {r['rep']}" for r in so["runs"]]
        vals = [r["rate"] for r in so["runs"]]
        cols = ["#999999" if r["workers"] == min(so["worker_counts"]) else "#1f77b4" for r in so["runs"]]
        bars = ax.bar(range(len(vals)), vals, color=cols)
        for b_, v in zip(bars, vals):
            ax.text(b_.get_x() + b_.get_width() / 2, v, f"{v:,.0f}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(vals)), labels, fontsize=8)
        ax.set_ylabel("messages / s (complete)")
        ax.set_title(f"Scale-out on Mosquitto + PostgreSQL: {so['ratio_of'][0]} / {so['ratio_of'][1]} workers "
                     f"{so['ratio']:.2f}x\n{title}", fontsize=9)
        save(fig, "scaleout")
    return made
