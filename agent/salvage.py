"""Recover a damaged spool: copy every readable record into a fresh file, keep the old one.

Rows are read by ``seq`` range; a range that cannot be read is split in halves down to
single rows, so one damaged page costs only the rows on it. The damaged file (with its
``-wal`` and ``-shm``) is renamed to ``<name>.corrupt-<UTC time>``, never deleted.
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from agent.errors import SpoolError
from agent.spool import Spool, parse_body, spool_lock

_COLUMNS = (
    "seq, id, measurement, tick, body, state, attempts, created_at, updated_at, not_before, last_status, last_error"
)
_CHUNK = 1024


@dataclass
class SalvageReport:
    path: str
    quarantined: str
    recovered: Counter[str] = field(default_factory=Counter)  # per state in the new spool
    unreadable_rows: int = 0  # row slots that could not be read (at most this many records lost)
    unreadable_ranges: list[tuple[int, int]] = field(default_factory=list)
    sampler_states: int = 0
    unreadable_after_seq: int | None = None  # the table's end is gone: records past this seq, count unknown

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "quarantined": self.quarantined,
            "recovered": dict(self.recovered),
            "recovered_total": sum(self.recovered.values()),
            "lost_at_most": self.unreadable_rows,
            "unreadable_seq_ranges": self.unreadable_ranges,
            "unreadable_after_seq": self.unreadable_after_seq,
            "sampler_states": self.sampler_states,
        }


def _read_range(db: sqlite3.Connection, low: int, high: int, report: SalvageReport, out: list[tuple[Any, ...]]) -> None:
    try:
        rows = db.execute(f"SELECT {_COLUMNS} FROM records WHERE seq BETWEEN ? AND ? ORDER BY seq", (low, high)).fetchall()
    except sqlite3.DatabaseError:
        if low == high:
            report.unreadable_rows += 1
            if report.unreadable_ranges and report.unreadable_ranges[-1][1] == low - 1:
                report.unreadable_ranges[-1] = (report.unreadable_ranges[-1][0], low)
            else:
                report.unreadable_ranges.append((low, low))
            return
        middle = (low + high) // 2
        _read_range(db, low, middle, report, out)
        _read_range(db, middle + 1, high, report, out)
        return
    for row in rows:
        try:
            parse_body(row[1], row[4])  # a body that is no longer its record cannot be sent: lost
        except ValueError:
            report.unreadable_rows += 1
            report.unreadable_ranges.append((row[0], row[0]))
            continue
        out.append(row)


def _unused_stamp(path: Path) -> str:
    """A UTC time stamp no earlier salvage of this spool has used: nothing is ever overwritten."""
    base = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
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


def _highest_seq(db: sqlite3.Connection) -> int | None:
    try:
        return db.execute("SELECT max(seq) FROM records").fetchone()[0] or 0
    except sqlite3.DatabaseError:
        return None  # the rightmost page is gone (a truncated file)


def salvage(path: Path) -> SalvageReport:
    """Rebuild the spool at ``path`` from what is readable; the agent must not be running."""
    path = Path(path)
    if not path.exists():
        raise SpoolError(f"no spool at {path}")
    with spool_lock(path):
        return _salvage(path)


def _salvage(path: Path) -> SalvageReport:
    stamp = _unused_stamp(path)
    quarantine = path.with_name(f"{path.name}.corrupt-{stamp}")
    report = SalvageReport(path=str(path), quarantined=str(quarantine))
    fresh_path = path.with_name(f"{path.name}.salvage-{stamp}")

    rows: list[tuple[Any, ...]] = []
    states: list[tuple[Any, ...]] = []
    work = _working_copy(path, path.with_name(f"{path.name}.reading-{stamp}"))
    source = sqlite3.connect(work)
    try:
        try:
            high = _highest_seq(source)
            # without a known end, scan as far as the file could hold rows (none is under 64 bytes)
            scan_to = high if high is not None else work.stat().st_size // 64 + _CHUNK
            for low in range(1, scan_to + 1, _CHUNK):
                _read_range(source, low, min(low + _CHUNK - 1, scan_to), report, rows)
            if high is None:
                last = rows[-1][0] if rows else 0
                # slots past the last readable row are not known to have held records
                report.unreadable_rows -= sum(b - max(a, last + 1) + 1 for a, b in report.unreadable_ranges if b > last)
                report.unreadable_ranges = [(a, min(b, last)) for a, b in report.unreadable_ranges if a <= last]
                report.unreadable_after_seq = last
        except sqlite3.DatabaseError:
            report.unreadable_ranges.append((1, -1))  # nothing is readable: not even the table
        try:
            states = source.execute("SELECT measurement, last_tick, state FROM sampler_state").fetchall()
        except sqlite3.DatabaseError:
            states = []
    finally:
        source.close()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{work}{suffix}").unlink(missing_ok=True)

    fresh = Spool(fresh_path)
    try:
        with fresh._write() as db:
            for seq, rid, measurement, tick, body, state, attempts, created, updated, not_before, status, error in rows:
                state = "pending" if state == "leased" else state  # whoever leased it is gone
                if state not in ("pending", "delivered", "dead"):
                    report.unreadable_rows += 1
                    continue
                db.execute(
                    "INSERT OR IGNORE INTO records (seq, id, measurement, tick, body, state, attempts, created_at, "
                    "updated_at, not_before, last_status, last_error) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (seq, rid, measurement, tick, body, state, attempts, created, updated, not_before, status, error),
                )
                report.recovered[state] += 1
            db.executemany("INSERT OR IGNORE INTO sampler_state (measurement, last_tick, state) VALUES (?, ?, ?)", states)
            report.sampler_states = len(states)
    finally:
        fresh.close()

    for suffix in ("", "-wal", "-shm"):
        damaged = Path(f"{path}{suffix}")
        if damaged.exists():
            damaged.rename(f"{quarantine}{suffix}")
    for suffix in ("-wal", "-shm"):
        Path(f"{fresh_path}{suffix}").unlink(missing_ok=True)  # the fresh spool was closed cleanly
    fresh_path.rename(path)
    return report
