"""The last status word heard on each status topic, so that a restarted worker knows whom to ask the
broker about (RabbitMQ sends no retained statuses to wildcards). A mixin of
:class:`backend.store.Store`."""

from __future__ import annotations

import peewee as pw

from .models import LastStatus, now_ms


class StatusStore:
    """The last-status half of the Store (a mixin: ``self.db``)."""

    def save_statuses(self, statuses: dict[str, str], now: int | None = None) -> None:
        """Remember each status topic's last word (``{"im/status/bob": "online"}``); one upsert per topic."""
        if not statuses:
            return
        now = now or now_ms()
        rows = [{"topic": topic, "status": word, "changed_at": now} for topic, word in statuses.items()]
        update = {LastStatus.status: pw.EXCLUDED.status, LastStatus.changed_at: pw.EXCLUDED.changed_at}
        with self.db.atomic():
            for row in rows:
                q = LastStatus.insert(**row)
                if isinstance(self.db, pw.MySQLDatabase):
                    q = q.on_conflict(update={LastStatus.status: row["status"], LastStatus.changed_at: now})
                else:
                    q = q.on_conflict(conflict_target=[LastStatus.topic], update=update)
                q.execute()

    def last_online(self, limit: int = 100_000) -> list[str]:
        """The status topics whose last word heard was ``online``, most recent first (at most ``limit``)."""
        q = (LastStatus.select(LastStatus.topic).where(LastStatus.status == "online")
             .order_by(LastStatus.changed_at.desc()).limit(limit))
        return [r.topic for r in q]
