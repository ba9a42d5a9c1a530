"""Benchmarks: ``python -m bench [--quick | --tiny]``.

Every scenario measures its baseline in the same run, on the same kind of broker with the
same configuration, so each headline figure is a ratio (docs/BENCHMARKS.md):

* ``online``  - sender -> worker (store, receipt, push) -> receiver (batched acks -> delete,
  delivered receipt), against a pure relay (bench/relay.py: a paho client in its own process
  that republishes each message, no database); throughput, then latency at fixed offered rates;
* ``offline`` - a receiver drains a backlog with count + pages, against Mosquitto's own
  offline queue replaying the same backlog to a clean-session-off subscriber;
* ``growth``  - count and page latency with 10k, 100k and 1M stored rows;
* ``scaleout`` - online throughput with 2 workers against 1 (Mosquitto + PostgreSQL, shared
  subscription, several senders; beside NATS and RabbitMQ, which have no ``$share``, 2 workers
  with uid partitions against 1);
* ``groups``  - a group of 1,000 members, every member its own connection, through the worker,
  against Mosquitto's own fan-out of one publish to as many subscribers (bench/groupload.py).

The online scenario runs beside amqtt, Mosquitto, NATS and RabbitMQ (each where installed),
every broker against its own relay.

Load generators are lean paho processes (bench/loadgen.py) speaking docs/PROTOCOL.md;
bench/scenarios.py runs the scenarios and bench/harness.py starts every broker, worker and
relay as its own process; bench/report.py writes the Markdown and plots, bench/profile.py the
py-spy profiles; bench/hotpath.py times the worker's core and store in-process (no broker), to compare
commits. Results: bench/results/, summarised in docs/BENCHMARKS.md.
"""
