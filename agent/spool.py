"""Durable local spool: one SQLite file in WAL mode.

Every record is a row with a unique id and a state: pending -> leased -> delivered | dead
(or back to pending with a ``not_before`` time when a send must be retried). A tick's
records and the sampler state that produced them commit in one transaction. A lease has
an expiry, so records leased by a process that died are sent again.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import structlog

from agent.convert import UsageRecord, format_decimal, format_timestamp
from agent.errors import SpoolDiskLowError, SpoolError, SpoolFullError
from agent.telemetry import SPOOL_FULL, SPOOL_WRITE_ERRORS

log = structlog.get_logger("agent.spool")

SCHEMA_VERSION = 1
STATES = ("pending", "leased", "delivered", "dead")
MIN_FREE_BYTES = 64 * 2**20  # below this much free disk, new ticks are refused: outcomes keep the room
RESERVE_BYTES = 8 * 2**20  # the ballast beside the spool that only delivery outcomes may use
FULL_BELOW = 2**20  # free bytes under which an I/O error at open is taken for a full volume

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    measurement TEXT NOT NULL,
    tick TEXT NOT NULL,
    body TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending'
        CHECK (state IN ('pending', 'leased', 'delivered', 'dead')),
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    not_before REAL NOT NULL DEFAULT 0,
    lease_until REAL,
    last_status INTEGER,
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS records_by_state ON records (state, seq);
CREATE TABLE IF NOT EXISTS sampler_state (
    measurement TEXT PRIMARY KEY,
    last_tick TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT '{}'
);
"""


def parse_body(record_id: str, body: bytes | str) -> UsageRecord:
    """A spooled body back into a record that can be sent; ValueError if it is not (or no longer) one.

    The value must render too: a row whose value parses but cannot be written as a plain decimal
    (``1e99999999950``) would otherwise fail every send of every batch it is leased in.
    """
    try:
        text = body.decode("utf-8") if isinstance(body, bytes) else body
        record = UsageRecord.from_json(json.loads(text))
    except (UnicodeDecodeError, KeyError, TypeError, ValueError, ArithmeticError) as exc:
        raise ValueError(f"{type(exc).__name__}: {exc}") from None
    if not record.value.is_finite():
        raise ValueError(f"value {record.value} is not a finite number")
    try:
        format_decimal(record.value)
    except ArithmeticError as exc:
        raise ValueError(f"value {str(record.value)[:40]} cannot be rendered as a plain decimal "
                         f"({type(exc).__name__})") from None
    if record.record_id != record_id:
        raise ValueError(f"body holds id {record.record_id!r}, row is {record_id!r}")
    return record


@dataclass(frozen=True)
class Leased:
    record: UsageRecord
    attempts: int  # sends already tried before this lease


@dataclass(frozen=True)
class TickCommit:
    inserted: int  # new ids; ids already spooled (a re-run tick) are ignored
    previous_tick: str | None  # the measurement's last committed tick before this one


@dataclass(frozen=True)
class Retry:
    record_id: str
    not_before: float
    status: int | None
    error: str


@dataclass(frozen=True)
class Dead:
    record_id: str
    status: int | None
    error: str


def acquire_lock(path: Path) -> Any:
    """The single-writer lock beside a spool (``<path>.lock``, flock); released when the process dies."""
    lock_path = path.with_name(path.name + ".lock")
    try:
        handle = open(lock_path, "a+")
    except OSError as exc:
        raise SpoolError(f"spool {path}: cannot create its lock file {lock_path}: {access_problem(path)} "
                         f"({exc.strerror or exc}). {_FIX_ACCESS}") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise SpoolError(f"spool {path} is in use by another usage-agent process ({lock_path} is locked)") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


@contextmanager
def spool_lock(path: Path) -> Iterator[None]:
    handle = acquire_lock(path)
    try:
        yield
    finally:
        handle.close()


_FIX_ACCESS = ("The agent reads and writes the spool file and creates <file>-wal, <file>-shm and <file>.lock beside "
               "it: fix the permissions or mount a writable volume there. The spool is not damaged; salvage cannot help.")


def access_problem(path: Path) -> str:
    """What keeps this process from writing the spool at ``path``, as far as the filesystem says."""
    parent = path.parent
    try:
        if os.statvfs(parent).f_flag & os.ST_RDONLY:
            return f"{parent} is on a read-only filesystem"
    except OSError as exc:
        return f"{parent} cannot be examined ({exc.strerror or exc})"
    for item in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        if item.exists() and not os.access(item, os.R_OK | os.W_OK):
            return f"{item} is not readable and writable by this process (uid {os.geteuid()})"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"its directory {parent} is not writable by this process (uid {os.geteuid()})"
    return "the file or its directory cannot be written"


def free_bytes(directory: Path) -> int:
    return shutil.disk_usage(directory).free


def open_failure(path: Path, exc: sqlite3.Error, free_space: Callable[[], int] | None = None) -> str:
    """Why a spool cannot be opened, and what to do about it: salvage only for a damaged file."""
    code = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF
    cause = str(exc)
    if code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
        return damaged_message(path, cause)
    try:
        free: int | None = (free_space or (lambda: free_bytes(path.parent)))()
    except OSError:
        free = None
    # SQLite reports a volume too full for its -wal or -shm as an I/O error
    if code == sqlite3.SQLITE_FULL or (code == sqlite3.SQLITE_IOERR and free is not None and free < FULL_BELOW):
        room = f"{path.parent} cannot be examined" if free is None else f"{free} bytes free on {path.parent}"
        return (f"spool {path} cannot be written: the disk is full ({room}; {cause}). Free space on that volume or "
                f"grow it, then start again. The spool is not damaged; salvage cannot help.")
    if code in (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PERM, sqlite3.SQLITE_AUTH):
        return f"spool {path} cannot be opened for writing: {access_problem(path)} ({cause}). {_FIX_ACCESS}"
    if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        return (f"spool {path} is locked by another process ({cause}): stop whatever else has it open "
                f"(another agent, an sqlite3 shell) and start again.")
    if code == sqlite3.SQLITE_IOERR:
        return (f"spool {path}: the disk returned an I/O error ({cause}). Check the device and the volume "
                f"(kernel log); if they are sound and the error stays, stop the agent and run "
                f"`usage-agent spool salvage -c CONFIG`.")
    return f"spool {path} cannot be opened: {cause}"


def damaged_message(path: Path, cause: str) -> str:
    return (f"spool {path} is damaged or not a spool ({cause}). It is left as it is. To recover, stop the agent "
            f"and run `usage-agent spool salvage -c CONFIG`: it copies every readable record into a fresh spool "
            f"and keeps the damaged file beside it.")


class Reserve:
    """A ballast file beside the spool (``<path>.reserve``): disk space only delivery outcomes may use.

    Released when an outcome cannot be written (a full disk), so a record the backend accepted is
    recorded as delivered rather than sent again; put back before the next tick once there is room.
    """

    def __init__(self, path: Path, size: int = RESERVE_BYTES):
        self.path = path
        self.size = size

    @property
    def held(self) -> bool:
        try:
            return self.path.stat().st_size >= self.size
        except OSError:
            return False

    def restore(self) -> bool:
        """Allocate the ballast (real blocks, not a sparse file); False when the disk has no room for it."""
        if self.held:
            return True
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                os.posix_fallocate(fd, 0, self.size)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            self.path.unlink(missing_ok=True)
            return False
        return True

    def release(self) -> bool:
        """Give the space back to the disk; False if there was none held."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            return False
        return True


class Spool:
    def __init__(self, path: str | Path, max_records: int = 1_000_000, clock: Callable[[], float] = time.time,
                 create: bool = True, min_free_bytes: int = MIN_FREE_BYTES, reserve: Reserve | None = None,
                 free_space: Callable[[], int] | None = None):
        self.path = Path(path)
        self.max_records = max_records
        self._clock = clock
        self._lock = threading.RLock()
        self._lock_file: Any = None
        self.full = False  # a tick was refused for max_records; cleared once the unsent fall below it
        self.write_error: str | None = None  # the last write that changed something failed with this
        self.min_free_bytes = min_free_bytes
        self.reserve = reserve or Reserve(self.path.with_name(self.path.name + ".reserve"))
        self._free_space = free_space or (lambda: free_bytes(self.path.parent))
        self._disk_low = False  # the last tick was refused for disk space
        self.lease_dead = 0  # rows the last lease_batch dead-lettered as damaged instead of leasing
        # outcomes a write could not record: record id -> None (delivered) | Retry | Dead
        self._held: dict[str, Retry | Dead | None] = {}
        if self.path.is_dir():
            raise SpoolError(f"spool {self.path} is a directory, not a spool file: spool.path must name the file "
                             f"(for example {self.path / 'spool.db'})")
        if not create and not self.path.exists():
            raise SpoolError(f"no spool at {self.path}: the file does not exist. Check spool.path in the config "
                             f"(`usage-agent run` and `once` create the spool; inspecting it does not)")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SpoolError(f"spool {self.path}: cannot create its directory {self.path.parent}: "
                             f"{exc.strerror or exc}. {_FIX_ACCESS}") from exc
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA busy_timeout=30000")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                self._close_db()
                raise SpoolError(
                    f"spool {self.path} has schema version {version}; this agent understands up to {SCHEMA_VERSION}"
                )
            problems = [row[0] for row in self._db.execute("PRAGMA quick_check(5)")]
            if problems != ["ok"]:
                self._close_db()
                raise SpoolError(damaged_message(self.path, "; ".join(problems)))
            if not create and self._db.execute(
                    "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'records'").fetchone() is None:
                self._close_db()
                raise SpoolError(f"{self.path} is not a usage-agent spool (it holds no records table): "
                                 f"check spool.path in the config")
            self._db.executescript(_SCHEMA)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.Error as exc:
            self._close_db()
            raise SpoolError(open_failure(self.path, exc, self._free_space)) from exc

    @classmethod
    def open_existing(cls, path: str | Path, max_records: int = 1_000_000,
                      clock: Callable[[], float] = time.time) -> Spool:
        """A spool that must exist already (inspection, repair): a mistyped path is an error naming it,
        never a new empty spool."""
        return cls(path, max_records, clock, create=False)

    def _close_db(self) -> None:
        db = getattr(self, "_db", None)  # absent when connect() itself failed
        if db is not None:
            db.close()

    # -- ownership ---------------------------------------------------------------------

    def claim(self) -> None:
        """Take the single-writer lock and release leases left by a previous process."""
        if self._lock_file is not None:
            return
        self._lock_file = acquire_lock(self.path)
        with self._write() as db:
            db.execute("UPDATE records SET state = 'pending', lease_until = NULL WHERE state = 'leased'")
        if not self.reserve.restore():
            log.warning("no room for the disk reserve kept for delivery outcomes; new ticks wait until there is",
                        reserve=str(self.reserve.path), reserve_bytes=self.reserve.size)

    def close(self) -> None:
        """Write the delivery outcomes still held (with the disk reserve, if need be), then close."""
        with self._lock:
            if self._held:
                held = len(self._held)
                try:
                    self._write_held()
                except SpoolError as exc:
                    log.error("delivery outcomes could not be written at exit; those records will be sent again",
                              outcomes=held, error=str(exc))
                else:
                    log.warning("held delivery outcomes written at exit", outcomes=held)
            self._db.close()
            if self._lock_file is not None:
                self._lock_file.close()
                self._lock_file = None

    @contextmanager
    def _write(self, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """One write transaction; SQLite failures (disk full, I/O errors) become SpoolError.

        ``durable=False`` commits without waiting for the disk (synchronous=NORMAL): for writes
        that a crash may undo because the next start undoes them anyway (leases). A later
        durable commit makes them durable too: the -wal is written in order.
        """
        with self._lock:
            try:
                if not durable:
                    self._db.execute("PRAGMA synchronous=NORMAL")
                self._db.execute("BEGIN IMMEDIATE")
                before = self._db.total_changes
                try:
                    yield self._db
                except BaseException:
                    if self._db.in_transaction:  # SQLite may have rolled back already (e.g. disk full)
                        self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
                if self._db.total_changes != before:  # an empty commit proves nothing about the disk
                    self.write_error = None
            except sqlite3.Error as exc:
                SPOOL_WRITE_ERRORS.inc()
                self.write_error = str(exc)
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise SpoolError(f"spool {self.path}: write failed: {exc}") from exc
            finally:
                if not durable:
                    self._db.execute("PRAGMA synchronous=FULL")

    # -- sampling side -----------------------------------------------------------------

    def commit_tick(
        self, measurement: str, tick: datetime, records: Sequence[UsageRecord], state: dict[str, Any] | None = None
    ) -> TickCommit:
        """Spool a tick's records and advance the measurement's sampler state, atomically."""
        now = self._clock()
        tick_text = format_timestamp(tick)
        low = self._disk_room()
        if low is not None:
            self.full = self._disk_low = True
            SPOOL_FULL.set(1)
            raise SpoolDiskLowError(f"spool {self.path}: {low}. Tick {tick_text} of {measurement} is refused; "
                                    f"delivery outcomes keep the room")
        with self._write() as db:
            most_unsent = self._unsent_at_most(db)
            row = db.execute("SELECT last_tick FROM sampler_state WHERE measurement = ?", (measurement,)).fetchone()
            previous = row[0] if row else None
            before = db.total_changes
            db.executemany(
                "INSERT OR IGNORE INTO records (id, measurement, tick, body, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (r.record_id, measurement, tick_text, json.dumps(r.to_json(), separators=(",", ":")), now, now)
                    for r in records
                ],
            )
            inserted = db.total_changes - before
            # ids already spooled (a re-run tick) do not count; the exact count is only needed near the cap
            unsent = self.unsent() - inserted if most_unsent + inserted > self.max_records else most_unsent
            if unsent + inserted > self.max_records:
                self.full = True
                SPOOL_FULL.set(1)
                raise SpoolFullError(
                    f"spool {self.path} holds {unsent} unsent records; adding {inserted} would pass "
                    f"spool.max_records={self.max_records}. Tick {tick_text} of {measurement} is refused."
                )
            db.execute(
                "INSERT INTO sampler_state (measurement, last_tick, state) VALUES (?, ?, ?) "
                "ON CONFLICT (measurement) DO UPDATE SET "
                "state = CASE WHEN excluded.last_tick >= last_tick THEN excluded.state ELSE state END, "
                "last_tick = max(last_tick, excluded.last_tick)",
                (measurement, tick_text, json.dumps(state or {})),
            )
        self.full = self._disk_low = False
        SPOOL_FULL.set(0)
        self.checkpoint()  # a lost -wal must not lose what was sampled
        return TickCommit(inserted=inserted, previous_tick=previous)

    def _disk_room(self) -> str | None:
        """Why a new tick may not take disk space now, or None: outcomes come first."""
        try:
            free = self._free_space()
        except OSError as exc:
            return f"the free space of {self.path.parent} cannot be read ({exc.strerror or exc})"
        if free < self.min_free_bytes:
            return f"{free} bytes free on its disk, below the {self.min_free_bytes} kept for delivery outcomes"
        if self._lock_file is not None and not self.reserve.restore():
            return (f"the {self.reserve.size}-byte disk reserve for delivery outcomes ({self.reserve.path}) "
                    f"was used and there is no room to put it back")
        return None

    @staticmethod
    def _unsent_at_most(db: sqlite3.Connection) -> int:
        """An upper bound of the unsent records from three index lookups: every one of them lies
        between the oldest unsent row and the newest row. Counting them walks the whole backlog."""
        oldest = [db.execute("SELECT min(seq) FROM records WHERE state = ?", (state,)).fetchone()[0]
                  for state in ("pending", "leased")]
        oldest = [seq for seq in oldest if seq is not None]
        if not oldest:
            return 0
        return db.execute("SELECT max(seq) FROM records").fetchone()[0] - min(oldest) + 1

    def checkpoint(self) -> None:
        """Copy committed transactions from the -wal into the main file (without waiting on readers)."""
        with self._lock:
            try:
                self._db.execute("PRAGMA wal_checkpoint(PASSIVE)")
            except sqlite3.Error as exc:  # the data is safe in the -wal; the next checkpoint retries
                log.warning("spool checkpoint failed", error=str(exc))

    def last_tick(self, measurement: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT last_tick FROM sampler_state WHERE measurement = ?", (measurement,)).fetchone()
        return row[0] if row else None

    # -- forwarding side ---------------------------------------------------------------

    def lease_batch(self, limit: int, lease_seconds: float) -> list[Leased]:
        """Lease up to ``limit`` records that are due, oldest first.

        Not durable: a lease a crash loses leaves the records pending, as the next start's
        ``claim`` would have; a damaged row it loses is dead-lettered again at the next lease.
        """
        now = self._clock()
        with self._write(durable=False) as db:
            db.execute(
                "UPDATE records SET state = 'pending', lease_until = NULL WHERE state = 'leased' AND lease_until <= ?",
                (now,),
            )
            rows = db.execute(
                "SELECT seq, CAST(id AS BLOB), CAST(body AS BLOB), attempts FROM records "
                "WHERE state = 'pending' AND not_before <= ? ORDER BY seq LIMIT ?",
                (now, limit),
            ).fetchall()
            leased: list[Leased] = []
            leased_seqs: list[int] = []
            damaged: list[tuple[str, float, int]] = []
            for seq, rid, body, attempts in rows:
                try:
                    record = parse_body(rid.decode("utf-8", "replace"), body)
                except ValueError as exc:
                    damaged.append((f"damaged in spool: {exc}", now, seq))
                    continue
                leased.append(Leased(record, attempts))
                leased_seqs.append(seq)
            # a row the disk garbled cannot be sent: dead-letter it with the reason instead of
            # failing every lease after it
            db.executemany(
                "UPDATE records SET state = 'dead', last_status = NULL, last_error = ?, updated_at = ? WHERE seq = ?",
                damaged,
            )
            if leased_seqs:  # the rows selected above, in one statement: the damaged ones are dead now
                db.execute(
                    "UPDATE records SET state = 'leased', lease_until = ?, updated_at = ? "
                    "WHERE state = 'pending' AND not_before <= ? AND seq <= ?",
                    (now + lease_seconds, now, now, leased_seqs[-1]),
                )
        self.lease_dead = len(damaged)
        for error, _, seq in damaged:
            log.error("spooled record is damaged; dead-lettered", seq=seq, error=error)
        return leased

    def settle(self, delivered: Iterable[str] = (), retries: Iterable[Retry] = (), dead: Iterable[Dead] = ()) -> None:
        """Record the outcome of sends for leased records, in one transaction.

        Outcomes come first for disk space: when the write fails, the disk reserve is released and
        the write tried again. Outcomes that still cannot be written are held, and written before
        any later ones (or by ``close``), so a record the backend accepted is not sent again.
        """
        for rid, outcome in [*((rid, None) for rid in delivered), *((r.record_id, r) for r in retries),
                             *((d.record_id, d) for d in dead)]:
            self._held.setdefault(rid, outcome)  # an id in several lists: the first one wins
        with self._lock:
            self._write_held()
        if self.full and not self._disk_low and self.unsent() < self.max_records:  # room again: take the next tick
            self.full = False
            SPOOL_FULL.set(0)

    @property
    def held_outcomes(self) -> int:
        """Delivery outcomes a failed write left in memory (written by the next settle or by close)."""
        return len(self._held)

    def _write_held(self) -> None:
        try:
            self._write_outcomes()
        except SpoolError:
            if self._lock_file is None or not self.reserve.release():
                raise
            log.error("spool write failed; the disk reserve is released so delivery outcomes can be written",
                      reserve=str(self.reserve.path), reserve_bytes=self.reserve.size, outcomes=len(self._held))
            self._write_outcomes()

    def _write_outcomes(self) -> None:
        now = self._clock()
        outcomes = list(self._held.items())
        with self._write() as db:
            db.executemany(
                "UPDATE records SET state = 'delivered', updated_at = ?, lease_until = NULL, "
                "attempts = attempts + 1, last_status = NULL, last_error = NULL WHERE id = ? AND state = 'leased'",
                [(now, rid) for rid, o in outcomes if o is None],
            )
            db.executemany(
                "UPDATE records SET state = 'pending', updated_at = ?, lease_until = NULL, attempts = attempts + 1, "
                "not_before = ?, last_status = ?, last_error = ? WHERE id = ? AND state = 'leased'",
                [(now, r.not_before, r.status, r.error, rid) for rid, r in outcomes if isinstance(r, Retry)],
            )
            db.executemany(
                "UPDATE records SET state = 'dead', updated_at = ?, lease_until = NULL, attempts = attempts + 1, "
                "last_status = ?, last_error = ? WHERE id = ? AND state = 'leased'",
                [(now, d.status, d.error, rid) for rid, d in outcomes if isinstance(d, Dead)],
            )
        self._held.clear()

    def next_due(self) -> float | None:
        """When the earliest unsent record may be sent (a leased one: when its lease ends); None if none is unsent."""
        with self._lock:
            row = self._db.execute(
                "SELECT min(CASE state WHEN 'pending' THEN not_before ELSE lease_until END) "
                "FROM records WHERE state IN ('pending', 'leased')"
            ).fetchone()
        return row[0]

    # -- inspection --------------------------------------------------------------------

    def unsent(self) -> int:
        """Pending plus leased records (index range counts, not a table scan)."""
        with self._lock:
            return sum(
                self._db.execute("SELECT COUNT(*) FROM records WHERE state = ?", (state,)).fetchone()[0]
                for state in ("pending", "leased")
            )

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM records GROUP BY state").fetchall()
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
            created = [
                row[0]
                for state in ("pending", "leased")
                for row in self._db.execute(
                    "SELECT created_at FROM records WHERE state = ? ORDER BY seq LIMIT 1", (state,)
                )
            ]
        return self._clock() - min(created) if created else None

    # -- repair ------------------------------------------------------------------------

    def replay(self, ids: Sequence[str] = (), status: int | None = None) -> int:
        """Dead-lettered records back to pending (all, or those with the given ids / last status)."""
        query = "UPDATE records SET state = 'pending', not_before = 0, updated_at = ? WHERE state = 'dead'"
        params: list[Any] = [self._clock()]
        if ids:
            query += f" AND id IN ({','.join('?' * len(ids))})"
            params += list(ids)
        if status is not None:
            query += " AND last_status = ?"
            params.append(status)
        with self._write() as db:
            return db.execute(query, params).rowcount

    def purge_delivered(self, before: float) -> int:
        """Delete delivered records whose delivery was recorded before ``before`` (epoch seconds)."""
        with self._write() as db:
            return db.execute("DELETE FROM records WHERE state = 'delivered' AND updated_at < ?", (before,)).rowcount

    def rows(self, state: str, limit: int = 100) -> list[dict[str, Any]]:
        with self._lock:
            cursor = self._db.execute(
                "SELECT id, measurement, tick, attempts, last_status, last_error, CAST(body AS BLOB) AS body "
                "FROM records WHERE state = ? ORDER BY seq LIMIT ?",
                (state, limit),
            )
            names = [c[0] for c in cursor.description]
            found = cursor.fetchall()
        return [dict(zip(names, row)) | {"body": _readable_body(row[-1])} for row in found]


def _readable_body(raw: bytes) -> Any:
    """The stored body for people to read: JSON when it parses, else the text as far as it decodes."""
    text = raw.decode("utf-8", "replace")
    try:
        return json.loads(text)
    except ValueError:
        return text
