"""The embedded broker alone (backend.transport.embedded: amqtt with the project's plugins).

``python -m backend serve`` runs the broker and the worker in one process, with a worker
password that never leaves it. For the online scenario the relay baseline and the worker
each need their own process beside the *same* broker, so the benchmark hosts the broker
here with a known worker password ($BENCH_WORKER_PASSWORD); the worker and the relay then
log in as ``worker:internal`` with a client id starting with ``!``, as inside ``serve``.

    BENCH_WORKER_PASSWORD=pw python -m bench.amqtt_host --port P --database-url sqlite:////abs/im.db
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from backend.store import open_database
from backend.transport import embedded


async def _start(host: str, port: int, password: str):
    """backend.transport.embedded.start_broker, as `serve` calls it (plain TCP listener only)."""
    if hasattr(embedded, "Listeners"):
        return await embedded.start_broker(embedded.Listeners(host=host, port=port), password)
    return await embedded.start_broker(host, port, password)  # the earlier signature


async def _run(a: argparse.Namespace) -> None:
    broker = await _start(a.host, a.port, os.environ["BENCH_WORKER_PASSWORD"])
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print("amqtt ready", flush=True)
    await stop.wait()
    loop.set_exception_handler(lambda *_: None)
    try:
        await asyncio.wait_for(broker.shutdown(), 3)
    except Exception:  # noqa: BLE001 - exiting anyway
        pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.amqtt_host")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--database-url", required=True, help="where the accounts are (backend.accounts)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    open_database(a.database_url)
    asyncio.run(_run(a))
    return 0


if __name__ == "__main__":
    sys.exit(main())
