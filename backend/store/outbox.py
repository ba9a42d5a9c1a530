"""The outbox: users whose devices must be told of a change made by a process with no broker connection (the
CLI's `group create/add/remove`). The change and its outbox rows commit in one transaction; every worker polls
the rows past the last one it read (OUTBOX_POLL_S in backend/transport/worker.py) and announces those users'
online devices, whose sync then fetches the change (a group's membership event). A mixin of
:class:`backend.store.Store`."""

from __future__ import annotations

from collections.abc import Iterable

from .models import Outbox, now_ms
from .queries import _chunks

# Outbox rows are kept this long, then deleted by housekeeping: every worker polls every few seconds, so an hour
# covers a worker that was down or cut off from the database meanwhile (one restarting later announces every
# online device anyway, from the retained statuses it reads at its connection).
OUTBOX_KEEP_MS = 3_600_000
# At most this many rows are read per poll (the next poll goes on from there): a CLI change to a 1,000-member
# group writes 1,000 rows, read in one go.
OUTBOX_READ_MAX = 5_000


class OutboxStore:
    """The outbox half of the Store (a mixin: ``self.db``)."""

    def note_outbox(self, uids: Iterable[str], now: int | None = None) -> None:
        """Add one row per distinct uid; call it inside the transaction of the change it announces."""
        now = now or now_ms()
        rows = [{"uid": u, "created_at": now} for u in dict.fromkeys(uids)]
        for chunk in _chunks(rows, 400):  # 2 parameters a row: under old SQLite's 999 per statement
            if chunk:
                Outbox.insert_many(chunk).execute()

    def outbox_head(self) -> int:
        """The newest row's id (0 when empty): a starting worker reads only what comes after it."""
        return Outbox.select(Outbox.id).order_by(Outbox.id.desc()).limit(1).scalar() or 0

    def outbox_since(self, after: int, limit: int = OUTBOX_READ_MAX) -> list[tuple[int, str]]:
        """The rows (id, uid) past ``after``, oldest first, at most ``limit``."""
        return list(Outbox.select(Outbox.id, Outbox.uid).where(Outbox.id > after).order_by(Outbox.id)
                    .limit(limit).tuples())

    def purge_outbox(self, now: int | None = None) -> int:
        """Delete the rows older than OUTBOX_KEEP_MS; how many went."""
        return Outbox.delete().where(Outbox.created_at < (now or now_ms()) - OUTBOX_KEEP_MS).execute()
