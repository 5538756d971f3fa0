"""The spool's inspection and repair (``usage-agent spool stats|list|replay|purge``, readiness facts):
queries over the records' states and bodies that the queue itself does not need."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from agent.spool_files import STATES, UNTIMED, has_untimed_ids
from agent.spool_rows import readable_body


class SpoolInspection:
    """Mixed into ``Spool``, whose connection, lock, clock and write transaction these use."""

    path: Path
    _db: sqlite3.Connection
    _lock: threading.RLock
    _time: Callable[[], float]
    _write: Callable[..., AbstractContextManager[sqlite3.Connection]]

    # -- inspection --------------------------------------------------------------------

    def unsent(self) -> int:
        """Pending plus leased records (index range counts, not a table scan)."""
        with self._lock:
            return sum(self._db.execute("SELECT COUNT(*) FROM record_states WHERE state = ?", (state,)).fetchone()[0]
                       for state in ("pending", "leased"))

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM record_states GROUP BY state").fetchall()
        return {state: 0 for state in STATES} | dict(rows)

    def stats(self) -> dict[str, Any]:
        age = self.oldest_unsent_age()
        size = sum(p.stat().st_size for p in (self.path, Path(f"{self.path}-wal")) if p.exists())
        return {
            "path": str(self.path),
            "counts": self.counts(),
            "oldest_unsent_age_seconds": round(age, 3) if age is not None else None,
            "file_bytes": size,
        }

    def oldest_unsent_age(self) -> float | None:
        """Seconds since the oldest pending or leased record was spooled (index lookups only)."""
        with self._lock:
            created = [row[0] for state in ("pending", "leased") for row in self._db.execute(
                "SELECT b.created_at FROM record_states s JOIN record_bodies b ON b.seq = s.seq "
                "WHERE s.state = ? ORDER BY s.seq LIMIT 1", (state,))]
        return self._time() - min(created) if created else None

    # -- repair ------------------------------------------------------------------------

    def replay(self, ids: Sequence[str] = (), status: int | None = None) -> int:
        """Dead-lettered records back to pending (all, or those with the given ids / last status)."""
        query = "UPDATE record_states SET state = 'pending', not_before = 0, updated_at = ? WHERE state = 'dead'"
        params: list[Any] = [self._time()]
        if ids:  # the dead rows' ids, not the whole table's
            query += (" AND seq IN (SELECT s.seq FROM record_states s JOIN record_bodies b ON b.seq = s.seq "
                      f"WHERE s.state = 'dead' AND b.id IN ({','.join('?' * len(ids))}))")
            params += list(ids)
        if status is not None:
            query += " AND last_status = ?"
            params.append(status)
        with self._write() as db:
            return db.execute(query, params).rowcount

    def purge_delivered(self, before: float) -> int:
        """Delete delivered records whose delivery was recorded before ``before`` (epoch seconds)."""
        with self._write() as db:
            db.execute("DELETE FROM record_bodies WHERE seq IN "
                       "(SELECT seq FROM record_states WHERE state = 'delivered' AND updated_at < ?)", (before,))
            purged = db.execute("DELETE FROM record_states WHERE state = 'delivered' AND updated_at < ?",
                                (before,)).rowcount
            # an untimed id whose row is gone may be spooled again, as any purged id may
            if has_untimed_ids(db):
                db.execute(f"DELETE FROM untimed_ids WHERE id NOT IN (SELECT id FROM record_bodies WHERE at = '{UNTIMED}')")
            return purged

    def rows(self, state: str, limit: int = 100) -> list[dict[str, Any]]:
        with self._lock:
            cursor = self._db.execute(
                "SELECT b.id, b.measurement, b.tick, s.attempts, s.last_status, s.last_error, CAST(b.body AS BLOB) "
                "AS body FROM record_states s JOIN record_bodies b ON b.seq = s.seq WHERE s.state = ? "
                "ORDER BY s.seq LIMIT ?",
                (state, limit),
            )
            names = [c[0] for c in cursor.description]
            found = cursor.fetchall()
        return [dict(zip(names, row)) | {"body": readable_body(row[-1])} for row in found]

