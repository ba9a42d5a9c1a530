"""Throughput beside each broker: one worker (default share group, --send-rate 0, SQLite), 3,000 messages
end to end (bench.loadgen online --mode worker: closed loop, 1,000 in flight, 100-byte content, 200 warm-up),
beside a private Mosquitto, NATS and RabbitMQ node (the README's support table).

    python -m scripts.broker_bench mosquitto nats rabbitmq
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO)]
from services import ProbedWorker, shared_broker  # noqa: E402  (tests/services.py: the test fixtures' launchers)

secrets = {"alice": "alice-pw", "bob": "bob-pw"}
for kind in sys.argv[1:] or ["mosquitto", "nats", "rabbitmq"]:
    node = shared_broker(kind)
    node.add_users(secrets)
    d = tempfile.mkdtemp()
    w = ProbedWorker(node.port, f"sqlite:///{d}/im.db", extra=["--send-rate", "0"]).start(timeout=30)
    r = subprocess.run([sys.executable, "-m", "bench.loadgen", "online", "--mode", "worker", "--sender", "alice",
                        "--receiver", "bob", "--count", "3000", "--port", str(node.port)],
                       env={**os.environ, "BENCH_SECRETS": json.dumps(secrets)}, capture_output=True, text=True, timeout=300, cwd=REPO)
    w.kill()
    shutil.rmtree(d, ignore_errors=True)
    out = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr[-2000:]
    try:
        res = json.loads(out.split("RESULT", 1)[1])
        print(f"{kind}: {res['completed']} messages in {res['elapsed_s']} s = {res['rate']:.0f} msg/s end to end; "
              f"push p50 {res['push_latency']['p50']:.0f} ms, delivered p50 {res['delivered_latency']['p50']:.0f} ms",
              flush=True)
    except (IndexError, KeyError, ValueError):
        print(kind, out[:600], flush=True)
