"""Work sharing without ``$share``: fixed partitions of the uids (``worker --partitions N --partition I``).

Beside a broker without shared subscriptions (NATS, RabbitMQ: they grant ``$share`` and deliver nothing),
N workers each subscribe plainly to every send/ack/req topic and keep only the packets of the uids they own:
worker I owns uid u when ``zlib.crc32(u.encode("utf-8")) % N == I`` (stable across processes and hosts,
unlike ``hash()``, which Python salts per process). Pure functions: no I/O (docs/PROTOCOL.md, section 10.2).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

from . import protocol

_USER_TOPIC = protocol.PREFIX + "/u/"  # im/u/{uid}/...: the send/ack/req topics (and their device variants)


def partition_of(uid: str, partitions: int) -> int:
    """The partition (0 to ``partitions`` - 1) that owns ``uid``. Raises ValueError if ``partitions`` < 1."""
    if partitions < 1:
        raise ValueError("partitions must be 1 or more")
    return zlib.crc32(uid.encode("utf-8")) % partitions


def partition_error(partitions: int, partition: int | None) -> str | None:
    """None if ``--partitions``/``--partition`` make sense together, else one line saying what to do."""
    if partitions < 1:
        return f"--partitions {partitions}: give 1 or more (the number of workers sharing the uids; 1: no partitions)"
    if partition is None:
        if partitions > 1:
            return (f"--partitions {partitions} needs --partition I (0 to {partitions - 1}): the share of the "
                    f"uids this worker serves; start one worker for each")
        return None
    if not 0 <= partition < partitions:
        return (f"--partition {partition} is out of range for --partitions {partitions}: "
                f"give 0 to {partitions - 1}")
    return None


@dataclass(frozen=True)
class Partition:
    """Partition ``index`` of ``count``: what one worker serves. Raises ValueError on a bad pair."""

    count: int
    index: int

    def __post_init__(self) -> None:
        error = partition_error(self.count, self.index)
        if error is not None:
            raise ValueError(error)

    def owns(self, uid: str) -> bool:
        return zlib.crc32(uid.encode("utf-8")) % self.count == self.index

    def owns_topic(self, topic: str) -> bool:
        """Is a packet on ``topic`` this worker's to take? A user topic ``im/u/{uid}/...`` (send, ack, req,
        device variants) is, when ``uid`` is owned; any other topic (statuses, the workers' ``gone``) is
        every worker's. One split and one CRC: cheap enough to run on every inbound packet."""
        if not topic.startswith(_USER_TOPIC):
            return True
        end = topic.find("/", len(_USER_TOPIC))
        return self.owns(topic[len(_USER_TOPIC):end if end >= 0 else None])

    @property
    def client_id(self) -> str:
        """The default MQTT client id of this partition's worker: fixed, so its persistent session resumes."""
        return f"im-worker-p{self.index}of{self.count}"

    def __str__(self) -> str:
        return f"partition {self.index} of {self.count}"
