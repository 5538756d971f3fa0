"""Recover a damaged spool: copy every readable record into a fresh file, keep the old one.

How the damaged file is read, and what ``lost_at_most`` promises, is in ``agent.salvage_read``.
A spool that passes ``PRAGMA integrity_check`` is not rebuilt or quarantined: its invalid
rows are dead-lettered in place. Otherwise the damaged file (with its ``-wal`` and ``-shm``)
is renamed to ``<name>.corrupt-<UTC time>``, never deleted; the time comes from the clock
the command is given.
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from pathlib import Path

from agent.clock import Clock, SystemClock
from agent.errors import SpoolError
from agent.salvage_read import SalvageReport, read_damaged
from agent.spool import Spool, parse_body, spool_lock
from agent.spool_files import layout

__all__ = ["SalvageReport", "salvage"]


# -- the command ---------------------------------------------------------------------------


def _unused_stamp(path: Path, clock: Clock) -> str:
    """A UTC time stamp no earlier salvage of this spool has used: nothing is ever overwritten."""
    base = clock.now().strftime("%Y%m%dT%H%M%S%fZ")
    for n in range(1000):
        stamp = base if n == 0 else f"{base}-{n}"
        if not any(path.parent.glob(f"{path.name}.*-{stamp}*")):
            return stamp
    raise SpoolError(f"too many salvage files beside {path}")


def _working_copy(path: Path, work: Path) -> Path:
    """Copy the damaged file (and its WAL) to read from, repaired just enough for SQLite to open:
    a truncated tail is padded to a whole page and the header's page count made to match."""
    data = path.read_bytes()
    page_size = int.from_bytes(data[16:18], "big") if len(data) >= 18 else 4096
    page_size = 65536 if page_size == 1 else page_size
    if page_size < 512 or page_size & (page_size - 1):
        page_size = 4096  # the header is damaged too; SQLite's default is the best guess
    if len(data) % page_size:
        data += bytes(page_size - len(data) % page_size)
    pages = len(data) // page_size
    if len(data) >= 32 and int.from_bytes(data[28:32], "big") > pages:
        # the header still counts the pages that were cut off; SQLite then refuses every read
        data = data[:28] + pages.to_bytes(4, "big") + data[32:]
    work.write_bytes(data)
    wal = Path(f"{path}-wal")
    if wal.exists():
        Path(f"{work}-wal").write_bytes(wal.read_bytes())
    return work


def _sound(db: sqlite3.Connection) -> bool:
    try:
        return [row[0] for row in db.execute("PRAGMA integrity_check(1)")] == ["ok"]
    except sqlite3.DatabaseError:
        return False


def salvage(path: Path, clock: Clock | None = None) -> SalvageReport:
    """Rebuild the spool at ``path`` from what is readable; the agent must not be running."""
    path = Path(path)
    if not path.exists():
        raise SpoolError(f"no spool at {path}: the file does not exist (check spool.path in the config)")
    with spool_lock(path):
        return _salvage(path, clock or SystemClock())


def _salvage(path: Path, clock: Clock) -> SalvageReport:
    stamp = _unused_stamp(path, clock)
    work = _working_copy(path, path.with_name(f"{path.name}.reading-{stamp}"))
    source = sqlite3.connect(work)
    try:
        if _sound(source):
            if layout(source) is None:
                raise SpoolError(f"{path} is a sound SQLite file but not a spool (it has no records table); "
                                 f"salvage leaves it as it is: check spool.path in the config")
            return _dead_letter_in_place(path, source)
        quarantine = path.with_name(f"{path.name}.corrupt-{stamp}")
        report = SalvageReport(path=str(path), quarantined=str(quarantine))
        fresh_path = path.with_name(f"{path.name}.salvage-{stamp}")
        fresh = Spool(fresh_path)
        try:
            with fresh._write() as db:
                read_damaged(source, db, report)
                try:
                    states = source.execute("SELECT measurement, last_tick, state FROM sampler_state").fetchall()
                except sqlite3.DatabaseError:
                    states = []
                db.executemany("INSERT OR IGNORE INTO sampler_state (measurement, last_tick, state) VALUES (?, ?, ?)",
                               states)
                report.sampler_states = len(states)
        finally:
            fresh.close()
    finally:
        source.close()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{work}{suffix}").unlink(missing_ok=True)

    for suffix in ("", "-wal", "-shm"):
        damaged = Path(f"{path}{suffix}")
        if damaged.exists():
            damaged.rename(f"{quarantine}{suffix}")
    for suffix in ("-wal", "-shm"):
        Path(f"{fresh_path}{suffix}").unlink(missing_ok=True)  # the fresh spool was closed cleanly
    fresh_path.rename(path)
    return report


def _dead_letter_in_place(path: Path, source: sqlite3.Connection) -> SalvageReport:
    """A sound file is kept: only its unsent rows that are not (or no longer) records are dead-lettered
    (found in the working copy ``source``; the spool itself is written only if there are any)."""
    report = SalvageReport(path=str(path), quarantined=None)
    damaged: list[tuple[str, int]] = []
    for seq, rid, body in source.execute("SELECT seq, CAST(id AS BLOB), CAST(body AS BLOB) FROM records "
                                         "WHERE state IN ('pending', 'leased')"):
        try:
            parse_body(rid.decode("utf-8", "replace"), body)
        except ValueError as exc:
            damaged.append((f"damaged in spool: {exc}", seq))
    report.recovered.update(dict(source.execute("SELECT state, COUNT(*) FROM records GROUP BY state").fetchall()))
    report.sampler_states = source.execute("SELECT COUNT(*) FROM sampler_state").fetchone()[0]
    if damaged:
        spool = Spool(path, lock_held=True)  # salvage holds the lock
        try:
            with spool._write() as db:
                db.executemany("UPDATE record_states SET state = 'dead', lease_until = NULL, last_status = NULL, "
                               "last_error = ? WHERE seq = ? AND state IN ('pending', 'leased')", damaged)
                report.recovered = Counter(dict(db.execute("SELECT state, COUNT(*) FROM record_states GROUP BY state")))
        finally:
            spool.close()
        report.damaged_dead_lettered = len(damaged)
    return report
