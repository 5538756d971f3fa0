"""Durable local spool: one SQLite file in WAL mode.

Every record is a body, written once, with a unique id, and a state: pending -> leased ->
delivered | dead (or back to pending with a ``not_before`` time when a send must be retried). A tick's
records and the sampler state that produced them commit in one transaction. A lease has
an expiry, so records leased by a process that died are sent again. The spool counts into
the ``Metrics`` it is given and reports facts (``facts()``); readiness is decided elsewhere.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import structlog

from agent.clock import Clock, SystemClock
from agent.records import UsageRecord, format_timestamp
from agent.errors import SpoolDiskLowError, SpoolError, SpoolFullError
from agent.metrics import Metrics
from agent.spool_files import (MIN_FREE_BYTES, STATES, Reserve, acquire_lock, free_bytes, has_untimed_ids,
                               open_database, open_failure, spool_lock)
from agent.spool_inspect import SpoolInspection
from agent.spool_rows import Dead, Lease, Leased, Retry, SpoolFacts, TickCommit, dump_json, parse_body

__all__ = ["STATES", "Dead", "Lease", "Leased", "Reserve", "Retry", "Spool", "SpoolFacts", "TickCommit",
           "open_failure", "parse_body", "spool_lock"]

log = structlog.get_logger("agent.spool")

# Outcomes apply to rows this process leased, by seq: the id was read with the seq, and while a row
# is leased nothing else changes it (one writer holds the spool; purge deletes delivered rows only)
_DELIVERED = ("UPDATE record_states SET state = 'delivered', updated_at = ?, lease_until = NULL, attempts = attempts + 1, "
              "last_status = NULL, last_error = NULL WHERE state = 'leased' AND seq IN ({})")
_IN_CHUNK = 512  # seqs bound per statement: under the 999 variables older SQLite builds allow


class Spool(SpoolInspection):
    def __init__(self, path: str | Path, max_records: int = 1_000_000, clock: Clock | None = None,
                 create: bool = True, min_free_bytes: int = MIN_FREE_BYTES, reserve: Reserve | None = None,
                 free_space: Callable[[], int] | None = None, metrics: Metrics | None = None,
                 lock_held: bool = False):
        self.path = Path(path)
        self.max_records = max_records
        self._time = (clock or SystemClock()).time
        self._metrics = metrics or Metrics()
        self._lock = threading.RLock()
        self._lock_file: Any = None  # the single-writer lock, once upgrading the file or claim() took it
        self._claimed = False
        self._refusing = False  # a tick was refused; cleared by a committed tick, or a settle below the cap
        self._disk_low = False  # the last tick was refused for disk space
        self._write_error: str | None = None
        self.min_free_bytes = min_free_bytes
        self.reserve = reserve or Reserve(self.path.with_name(self.path.name + ".reserve"))
        self._free_space = free_space or (lambda: free_bytes(self.path.parent))
        # outcomes a write could not record: record id -> None (delivered) | Retry | Dead
        self._held: dict[str, Retry | Dead | None] = {}
        self._seq: dict[str, int] = {}  # record id -> seq of rows this spool leased: outcomes update by seq
        self._db, self._lock_file = open_database(self.path, create, self._free_space, lock_held)

    @classmethod
    def open_existing(cls, path: str | Path, max_records: int = 1_000_000,
                      clock: Clock | None = None) -> Spool:
        """A spool that must exist already (inspection, repair): a mistyped path is an error, never a new spool."""
        return cls(path, max_records, clock, create=False)

    # -- facts ---------------------------------------------------------------------------

    def facts(self) -> SpoolFacts:
        with self._lock:
            return SpoolFacts(self.path, self.max_records, self._refusing, self._write_error, self.unsent(),
                              self.oldest_unsent_age(), self._disk_low, len(self._held))

    # -- ownership ---------------------------------------------------------------------

    def claim(self) -> None:
        """Take the single-writer lock and release leases left by a previous process."""
        if self._claimed:
            return
        if self._lock_file is None:
            self._lock_file = acquire_lock(self.path)
        self._claimed = True
        self._release_leases()
        if not self.reserve.restore():
            log.warning("no room for the disk reserve kept for delivery outcomes; new ticks wait until there is",
                        reserve=str(self.reserve.path), reserve_bytes=self.reserve.size)

    def _release_leases(self) -> None:
        with self._write(durable=False) as db:  # not durable: a crash leaves leases the next claim releases
            db.execute("UPDATE record_states SET state = 'pending', lease_until = NULL WHERE state = 'leased'")
        self._seq.clear()

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
            if self._claimed:  # nothing is in flight any more: what is still leased was not sent (a deadline)
                try:
                    self._release_leases()
                except SpoolError as exc:
                    log.warning("leases could not be released at exit; the next start releases them", error=str(exc))
            self._db.close()
            if self._lock_file is not None:
                self._lock_file.close()
                self._lock_file = None
                self._claimed = False

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
                    self._write_error = None
            except sqlite3.Error as exc:
                self._metrics.spool_write_errors.inc()
                self._write_error = str(exc)
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise SpoolError(f"spool {self.path}: write failed: {exc}") from exc
            finally:
                if not durable:
                    self._db.execute("PRAGMA synchronous=FULL")

    def _refuse(self, disk_low: bool) -> None:
        self._refusing, self._disk_low = True, disk_low
        self._metrics.spool_full.set(1)

    # -- sampling side -----------------------------------------------------------------

    def commit_tick(
        self, measurement: str, tick: datetime, records: Sequence[UsageRecord], state: dict[str, Any] | None = None
    ) -> TickCommit:
        """Spool a tick's records and advance the measurement's sampler state, atomically."""
        now = self._time()
        tick_text = format_timestamp(tick)
        low = self._disk_room()
        if low is not None:
            self._refuse(disk_low=True)
            raise SpoolDiskLowError(f"spool {self.path}: {low}. Tick {tick_text} of {measurement} is refused; "
                                    f"delivery outcomes keep the room")
        rows = [(r.record_id, body["timestamp"], measurement, tick_text, dump_json(body), now)
                for r in records for body in (r.to_json(),)]
        with self._write() as db:
            most_unsent = self._unsent_at_most(db)
            row = db.execute("SELECT last_tick FROM sampler_state WHERE measurement = ?", (measurement,)).fetchone()
            previous = row[0] if row else None
            before, last = db.total_changes, self._last_seq(db)
            # ids whose time the upgrade or salvage could not read are spooled already (almost never any)
            values = ("SELECT ?1, ?2, ?3, ?4, ?5, ?6 WHERE NOT EXISTS (SELECT 1 FROM untimed_ids WHERE id = ?1)"
                      if has_untimed_ids(db) else "VALUES (?, ?, ?, ?, ?, ?)")
            db.executemany(f"INSERT OR IGNORE INTO record_bodies (id, at, measurement, tick, body, created_at) {values}",
                           rows)
            inserted = db.total_changes - before
            # ids already spooled (a re-run tick) do not count; the exact count is only needed near the cap
            unsent = self.unsent() if most_unsent + inserted > self.max_records else most_unsent
            if unsent + inserted > self.max_records:
                self._refuse(disk_low=False)
                raise SpoolFullError(
                    f"spool {self.path} holds {unsent} unsent records; adding {inserted} would pass "
                    f"spool.max_records={self.max_records}. Tick {tick_text} of {measurement} is refused."
                )
            db.execute("INSERT INTO record_states (seq, updated_at) SELECT seq, ? FROM record_bodies WHERE seq > ?",
                       (now, last))
            db.execute(
                "INSERT INTO sampler_state (measurement, last_tick, state) VALUES (?, ?, ?) "
                "ON CONFLICT (measurement) DO UPDATE SET "
                "state = CASE WHEN excluded.last_tick >= last_tick THEN excluded.state ELSE state END, "
                "last_tick = max(last_tick, excluded.last_tick)",
                (measurement, tick_text, json.dumps(state or {})),
            )
        self._refusing = self._disk_low = False
        self._metrics.spool_full.set(0)
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
        if self._claimed and not self.reserve.restore():
            return (f"the {self.reserve.size}-byte disk reserve for delivery outcomes ({self.reserve.path}) "
                    f"was used and there is no room to put it back")
        return None

    @staticmethod
    def _last_seq(db: sqlite3.Connection) -> int:
        return db.execute("SELECT max(seq) FROM record_bodies").fetchone()[0] or 0

    @classmethod
    def _unsent_at_most(cls, db: sqlite3.Connection) -> int:
        """An upper bound of the unsent records from three index lookups: every one of them lies
        between the oldest unsent row and the newest row. Counting them walks the whole backlog."""
        oldest = [db.execute("SELECT min(seq) FROM record_states WHERE state = ?", (state,)).fetchone()[0]
                  for state in ("pending", "leased")]
        oldest = [seq for seq in oldest if seq is not None]
        if not oldest:
            return 0
        return cls._last_seq(db) - min(oldest) + 1

    def checkpoint(self) -> None:
        """Copy committed transactions from the -wal into the main file (without waiting on readers)."""
        with self._lock:
            try:
                self._db.execute("PRAGMA wal_checkpoint(PASSIVE)")
            except sqlite3.Error as exc:  # the data is safe in the -wal; the next checkpoint retries
                log.warning("spool checkpoint failed", error=str(exc))

    def sampler_state(self, measurement: str) -> dict[str, Any]:
        """The sampler state committed with the measurement's latest tick ({} if none)."""
        text = self._state_text(measurement)
        try:
            state = json.loads(text) if text else {}
        except ValueError:  # written by json.dumps in commit_tick: only damage gets here
            state = None
        return state if isinstance(state, dict) else {}

    def keep(self, key: str, value: str) -> None:
        """A value a restart needs (Paigo's dimensions): a sampler_state row no measurement name can take."""
        with self._write() as db:
            db.execute("INSERT OR REPLACE INTO sampler_state VALUES (?, '', ?)", (f"kept:{key}", value))

    def kept(self, key: str) -> str | None:
        return self._state_text(f"kept:{key}")

    def _state_text(self, name: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT state FROM sampler_state WHERE measurement = ?", (name,)).fetchone()
        return row[0] if row else None

    def last_tick(self, measurement: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT last_tick FROM sampler_state WHERE measurement = ?", (measurement,)).fetchone()
        return row[0] if row else None

    # -- forwarding side ---------------------------------------------------------------

    def lease_batch(self, limit: int, lease_seconds: float) -> Lease:
        """Lease up to ``limit`` records that are due, oldest first; damaged rows among them are
        dead-lettered instead (``Lease.damaged``).

        Not durable: a lease a crash loses leaves the records pending, as the next start's
        ``claim`` would have; a damaged row it loses is dead-lettered again at the next lease.
        """
        now = self._time()
        with self._write(durable=False) as db:
            db.execute(
                "UPDATE record_states SET state = 'pending', lease_until = NULL WHERE state = 'leased' AND lease_until <= ?",
                (now,),
            )
            rows = db.execute(
                "SELECT s.seq, CAST(b.id AS BLOB), CAST(b.body AS BLOB), s.attempts FROM record_states s "
                "JOIN record_bodies b ON b.seq = s.seq WHERE s.state = 'pending' AND s.not_before <= ? ORDER BY s.seq LIMIT ?",
                (now, limit),
            ).fetchall()
            leased: list[Leased] = []
            seqs: dict[str, int] = {}
            damaged: list[tuple[int, Dead]] = []
            for seq, rid, body, attempts in rows:
                record_id = rid.decode("utf-8", "replace")
                try:
                    record = parse_body(record_id, body)
                except ValueError as exc:
                    damaged.append((seq, Dead(record_id, None, f"damaged in spool: {exc}")))
                    continue
                leased.append(Leased(record, attempts))
                seqs[record_id] = seq
            # a row the disk garbled cannot be sent: dead-letter it with the reason instead of
            # failing every lease after it
            db.executemany(
                "UPDATE record_states SET state = 'dead', last_status = NULL, last_error = ?, updated_at = ? WHERE seq = ?",
                [(d.error, now, seq) for seq, d in damaged],
            )
            if leased:  # the rows selected above, in one statement: the damaged ones are dead now
                db.execute(
                    "UPDATE record_states SET state = 'leased', lease_until = ?, updated_at = ? "
                    "WHERE state = 'pending' AND not_before <= ? AND seq <= ?",
                    (now + lease_seconds, now, now, max(seqs.values())),
                )
        self._seq.update(seqs)
        for seq, d in damaged:
            log.error("spooled record is damaged; dead-lettered", seq=seq, error=d.error)
        return Lease(leased, (d for _, d in damaged))

    def settle(self, delivered: Iterable[str] = (), retries: Iterable[Retry] = (), dead: Iterable[Dead] = ()) -> None:
        """Record the outcome of sends for leased records, in one transaction.

        Outcomes come first for disk space: when the write fails, the disk reserve is released and
        the write tried again. Outcomes that still cannot be written are held, and written before
        any later ones (or by ``close``), so a record the backend accepted is not sent again.
        """
        held = self._held  # an id in several lists: the first one wins
        for rid in delivered:
            held.setdefault(rid, None)
        for retry in retries:
            held.setdefault(retry.record_id, retry)
        for gone in dead:
            held.setdefault(gone.record_id, gone)
        with self._lock:
            self._write_held()
        if self._refusing and not self._disk_low and self.unsent() < self.max_records:  # room: take the next tick
            self._refusing = False
            self._metrics.spool_full.set(0)

    def _write_held(self) -> None:
        try:
            self._write_outcomes()
        except SpoolError:
            if not self._claimed or not self.reserve.release():
                raise
            log.error("spool write failed; the disk reserve is released so delivery outcomes can be written",
                      reserve=str(self.reserve.path), reserve_bytes=self.reserve.size, outcomes=len(self._held))
            self._write_outcomes()

    def _write_outcomes(self) -> None:
        now = self._time()
        with self._write() as db:
            delivered: list[int | None] = []
            retried: list[tuple[float, float, int | None, str, int | None]] = []
            dead: list[tuple[float, int | None, str, int | None]] = []
            for rid, outcome in self._held.items():
                seq = self._seq.get(rid) or self._seq_of(db, rid)
                if outcome is None:
                    delivered.append(seq)
                elif isinstance(outcome, Retry):
                    retried.append((now, outcome.not_before, outcome.status, outcome.error, seq))
                else:
                    dead.append((now, outcome.status, outcome.error, seq))
            # the usual outcome, by statements of many rows: a statement per row costs twice as much
            for start in range(0, len(delivered), _IN_CHUNK):
                chunk = delivered[start:start + _IN_CHUNK]
                db.execute(_DELIVERED.format(",".join("?" * len(chunk))), (now, *chunk))
            db.executemany(
                "UPDATE record_states SET state = 'pending', updated_at = ?, lease_until = NULL, attempts = attempts + 1, "
                "not_before = ?, last_status = ?, last_error = ? WHERE seq = ? AND state = 'leased'", retried)
            db.executemany(
                "UPDATE record_states SET state = 'dead', updated_at = ?, lease_until = NULL, attempts = attempts + 1, "
                "last_status = ?, last_error = ? WHERE seq = ? AND state = 'leased'", dead)
        for rid in self._held:
            self._seq.pop(rid, None)
        self._held.clear()

    @staticmethod
    def _seq_of(db: sqlite3.Connection, record_id: str) -> int | None:
        """The seq of a leased record by its id (outcomes apply to leased rows only): the leases, not the table, are searched."""
        row = db.execute("SELECT s.seq FROM record_states s JOIN record_bodies b ON b.seq = s.seq "
                         "WHERE s.state = 'leased' AND b.id = ?", (record_id,)).fetchone()
        return row[0] if row else None

    def next_due(self) -> float | None:
        """When the earliest unsent record may be sent (a leased one: when its lease ends); None if none is unsent."""
        with self._lock:
            return self._db.execute("SELECT min(CASE state WHEN 'pending' THEN not_before ELSE lease_until END) "
                                    "FROM record_states WHERE state IN ('pending', 'leased')").fetchone()[0]
