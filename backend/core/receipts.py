"""Receipts to senders (`stored`, `duplicate`, `delivered`), at once or batched per sender device and
flushed after a short delay as one `receipts` payload. A mixin of :class:`backend.core.Delivery`."""

from __future__ import annotations

from typing import Any

from .. import protocol as p
from .events import DeletedRow, Key, Publish

# A sender's batched receipts wait at most this long for more of its receipts, from later transactions,
# before they go out in one payload. The worker commits as soon as anything waits, so on a slow broker
# (amqtt hands it one or two sends per transaction) one payload per transaction is nearly one per
# message. 10 ms is nothing beside a sender's 3 s resend timer.
RECEIPT_DELAY_MS = 10
# One `receipts` payload holds at most this many: a receipt is at most ~560 bytes (a 70-byte msg_id escaped
# at worst), so 1,000 stay under REPLY_PAYLOAD_MAX (1 MiB) even when a busy sender's receipts of several
# transactions are gathered; a page's ack (500 deletions) still fits in one.
RECEIPTS_PER_PAYLOAD_MAX = 1000


def _due_payloads(table: dict[Key, tuple[int, Any]], now_ms: int | None, items_of) -> list[Publish]:
    """Pop the senders of ``table`` (sender device -> (due ms, what it holds)) that are due, and make their
    ``receipts`` payloads (``items_of`` gives the receipts a sender holds), RECEIPTS_PER_PAYLOAD_MAX each."""
    out = []
    for key in [k for k, (at, _) in table.items() if now_ms is None or at <= now_ms]:
        items, n = items_of(table.pop(key)[1]), RECEIPTS_PER_PAYLOAD_MAX
        out += [Publish(p.reply_topic(*key), p.receipts(items[i:i + n])) for i in range(0, len(items), n)]
    return out


class ReceiptsMixin:
    """The receipt half of Delivery (``self._held``, ``self.receipt_delay_ms``...)."""

    def flush_receipts(self, now_ms: int | None = None) -> list[Publish]:
        """The held batched receipts that are due (all of them with ``now_ms`` None), one payload per sender;
        then the coalesced group receipts that are due (``self._progress``, core/groups.py)."""
        out = _due_payloads(self._held, now_ms, list) if self._held else []
        if self._progress:
            out += _due_payloads(self._progress, now_ms, lambda by_slot: list(by_slot.values()))
        return out

    @staticmethod
    def _receipt(out: list[Publish], batched: dict[Key, list[dict[str, Any]]], sender: Key, batch: bool,
                 receipt: dict[str, Any]) -> None:
        if batch:
            batched.setdefault(sender, []).append(receipt)
        else:
            out.append(Publish(p.reply_topic(*sender), receipt))

    def _delivered(self, out: list[Publish], batched: dict[Key, list[dict[str, Any]]],
                   rows: tuple[DeletedRow, ...], now_ms: int = 0) -> None:
        for r in rows:
            self._pending.pop((r.receiver, r.device, r.seq), None)
            if r.group:
                if r.receipt:
                    self._group_delivered(r, now_ms)  # coalesced: "delivered to k of n"
            elif r.receipt:  # the first of the receiver's devices to ack; never a sync copy
                self._receipt(out, batched, (r.sender, r.sender_device), r.batch_receipts,
                              p.receipt(r.msg_id, r.receiver, r.seq, "delivered"))
