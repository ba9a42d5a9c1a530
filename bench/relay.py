"""The baseline for the online scenario: a pure relay, in its own process like the worker.

A paho client subscribed to ``im/u/+/send`` (QoS 1) that republishes each payload, as it came,
on the receiver's ``im/u/{to}/inbox`` (QoS 1): no database, no receipt, no ack tracking. It
connects with the worker's account, since only that account may read sends and write inboxes.

    BENCH_SECRETS='{"im-worker": "pw"}' python -m bench.relay --port P --username im-worker --client-id relay
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

import paho.mqtt.client as mqtt

from backend.transport.connection import set_nodelay

MAX_INFLIGHT = 0  # unlimited: paho then skips its O(in-flight) scan on every PUBACK (_update_inflight)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.relay")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--username", required=True)
    ap.add_argument("--client-id", default="bench-relay")
    a = ap.parse_args(argv)
    password = json.loads(os.environ.get("BENCH_SECRETS", "{}")).get(a.username)
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=a.client_id, clean_session=True,
                    protocol=mqtt.MQTTv311)
    c.username_pw_set(a.username, password)
    c.max_inflight_messages_set(MAX_INFLIGHT)

    def on_connect(client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            print(f"relay refused: {reason_code}", file=sys.stderr, flush=True)
            os._exit(2)
        set_nodelay(client)
        client.subscribe("im/u/+/send", qos=1)

    def on_subscribe(client, userdata, mid, reason_codes, properties):
        print("relay ready", flush=True)

    def on_message(client, userdata, msg):
        to = json.loads(msg.payload)["to"]
        client.publish(f"im/u/{to}/inbox", msg.payload, qos=1)

    c.on_connect, c.on_subscribe, c.on_message = on_connect, on_subscribe, on_message
    signal.signal(signal.SIGTERM, lambda *_: c.disconnect())
    c.connect(a.host, a.port, keepalive=60)
    try:
        c.loop_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
