"""The spool's files beside its SQLite database: the single-writer lock, the disk reserve kept
for delivery outcomes, and what an open failure means for the operator (which file, what to do)."""

from __future__ import annotations

import fcntl
import os
import shutil
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from agent.errors import SpoolError

MIN_FREE_BYTES = 64 * 2**20  # below this much free disk, new ticks are refused: outcomes keep the room
RESERVE_BYTES = 8 * 2**20  # the ballast beside the spool that only delivery outcomes may use
FULL_BELOW = 2**20  # free bytes under which an I/O error at open is taken for a full volume
SCHEMA_VERSION = 2
STATES = ("pending", "leased", "delivered", "dead")
CACHE_KIB = 64 * 1024  # page cache: a large backlog's indexes stay in memory (SQLite's default is 2 MiB)

# A record's body is written once (record_bodies); its state changes rewrite only its narrow
# record_states row. Ids are unique per record timestamp (``at``): an id is a hash of that
# time (records.record_id), and the index stays in time order, so a tick's ids go in
# side by side instead of touching a page of a random-ordered index per record. A row whose
# time could not be read (the upgrade, salvage) is stored at UNTIMED, its id in untimed_ids: a
# tick never spools that id again.
UNTIMED = "?"
UNTIMED_IDS = "CREATE TABLE IF NOT EXISTS untimed_ids (id TEXT PRIMARY KEY) WITHOUT ROWID"  # made when needed
_TIME = "'[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9]Z'"  # format_timestamp's shape
SCHEMA = """
CREATE TABLE IF NOT EXISTS record_bodies (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL,
    at TEXT NOT NULL,
    measurement TEXT NOT NULL,
    tick TEXT NOT NULL,
    body TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS record_states (
    seq INTEGER PRIMARY KEY,
    state TEXT NOT NULL DEFAULT 'pending'
        CHECK (state IN ('pending', 'leased', 'delivered', 'dead')),
    attempts INTEGER NOT NULL DEFAULT 0,
    updated_at REAL NOT NULL,
    not_before REAL NOT NULL DEFAULT 0,
    lease_until REAL,
    last_status INTEGER,
    last_error TEXT
);
CREATE TABLE IF NOT EXISTS sampler_state (
    measurement TEXT PRIMARY KEY,
    last_tick TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT '{}'
);
"""
INDEXES = """
CREATE UNIQUE INDEX IF NOT EXISTS record_bodies_by_id ON record_bodies (at, id);
CREATE INDEX IF NOT EXISTS record_states_by_state ON record_states (state, seq);
CREATE VIEW IF NOT EXISTS records AS
    SELECT b.seq, b.id, b.measurement, b.tick, b.body, s.state, s.attempts, b.created_at, s.updated_at,
           s.not_before, s.lease_until, s.last_status, s.last_error
    FROM record_bodies b JOIN record_states s ON s.seq = b.seq;
"""
# schema 1: one records table (a UNIQUE id column, an index by state); each row's body and
# state copied over as they are; ``at`` read from the body, else the tick, else UNTIMED
MIGRATE_1 = (
    "INSERT INTO record_bodies (seq, id, at, measurement, tick, body, created_at) "
    f"SELECT seq, id, CASE WHEN json_valid(body) AND json_extract(body, '$.timestamp') GLOB {_TIME} "
    f"THEN json_extract(body, '$.timestamp') WHEN tick GLOB {_TIME} THEN tick ELSE '{UNTIMED}' END, "
    "measurement, tick, body, created_at FROM records",
    UNTIMED_IDS,
    f"INSERT INTO untimed_ids SELECT id FROM record_bodies WHERE at = '{UNTIMED}'",
    "INSERT INTO record_states (seq, state, attempts, updated_at, not_before, lease_until, last_status, last_error) "
    "SELECT seq, state, attempts, updated_at, not_before, lease_until, last_status, last_error FROM records",
    "DROP TABLE records",
)


def acquire_lock(path: Path) -> Any:
    """The single-writer lock beside a spool (``<path>.lock``, flock); released when the process dies."""
    lock_path = path.with_name(path.name + ".lock")
    try:
        handle = open(lock_path, "a+")
    except OSError as exc:
        raise SpoolError(f"spool {path}: cannot create its lock file {lock_path}: {access_problem(path)} "
                         f"({exc.strerror or exc}). {FIX_ACCESS}") from None
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


FIX_ACCESS = ("The agent reads and writes the spool file and creates <file>-wal, <file>-shm and <file>.lock beside "
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


def open_failure(path: Path, exc: sqlite3.Error, free_space: Callable[[], int] | None = None,
                 upgrade: bool = False) -> str:
    """Why a spool cannot be opened (``upgrade``: migrated from schema 1), and what to do about it:
    salvage only for a damaged file."""
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
        if upgrade:
            return (f"spool {path} cannot be upgraded from schema 1 to schema {SCHEMA_VERSION}: the disk is full "
                    f"({room}; {cause}). The upgrade writes every record once more before it drops the old "
                    f"copy, so it needs about another copy of the records' size free (the spool file is "
                    f"{_size(path)} bytes). Free space on that volume or grow it, then start again. The spool "
                    f"is left as it was (schema 1) and is not damaged; salvage cannot help.")
        return (f"spool {path} cannot be written: the disk is full ({room}; {cause}). Free space on that volume or "
                f"grow it, then start again. The spool is not damaged; salvage cannot help.")
    if code in (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PERM, sqlite3.SQLITE_AUTH):
        return f"spool {path} cannot be opened for writing: {access_problem(path)} ({cause}). {FIX_ACCESS}"
    if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        return (f"spool {path} is locked by another process ({cause}): stop whatever else has it open "
                f"(another agent, an sqlite3 shell) and start again.")
    if code == sqlite3.SQLITE_IOERR:
        return (f"spool {path}: the disk returned an I/O error ({cause}). Check the device and the volume "
                f"(kernel log); if they are sound and the error stays, stop the agent and run "
                f"`usage-agent spool salvage -c CONFIG`.")
    return f"spool {path} cannot be opened: {cause}"


def _size(path: Path) -> int | str:
    try:
        return path.stat().st_size
    except OSError:
        return "an unknown number of"


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


def open_database(path: Path, create: bool, free_space: Callable[[], int],
                  lock_held: bool = False) -> tuple[sqlite3.Connection, Any]:
    """The spool's connection (WAL, synchronous=FULL), checked before anything is written to it,
    and the single-writer lock if upgrading the file took it (None otherwise; ``lock_held``: the
    caller has it already)."""
    lock: Any = None
    if path.is_dir():
        raise SpoolError(f"spool {path} is a directory, not a spool file: spool.path must name the file "
                         f"(for example {path / 'spool.db'})")
    if not create and not path.exists():
        raise SpoolError(f"no spool at {path}: the file does not exist. Check spool.path in the config "
                         f"(`usage-agent run` and `once` create the spool; inspecting it does not)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SpoolError(f"spool {path}: cannot create its directory {path.parent}: "
                         f"{exc.strerror or exc}. {FIX_ACCESS}") from exc
    try:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    except sqlite3.Error as exc:
        raise SpoolError(open_failure(path, exc, free_space)) from exc
    try:
        for pragma in ("journal_mode=WAL", "synchronous=FULL", "busy_timeout=30000", f"cache_size=-{CACHE_KIB}"):
            db.execute(f"PRAGMA {pragma}")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise SpoolError(f"spool {path} has schema version {version}; this agent understands up to {SCHEMA_VERSION}")
        problems = [row[0] for row in db.execute("PRAGMA quick_check(5)")]
        if problems != ["ok"]:
            raise SpoolError(damaged_message(path, "; ".join(problems)))
        found = layout(db)
        if not create and found is None:
            raise SpoolError(f"{path} is not a usage-agent spool (it holds no records table): "
                             f"check spool.path in the config")
        if found == 1 and not lock_held:  # an agent of schema 1 may be writing it: upgrade only under its lock
            lock = upgrade_lock(path)
        set_up(db, path, free_space)
    except BaseException as exc:
        db.close()
        if lock is not None:
            lock.close()
        if isinstance(exc, sqlite3.Error):
            raise SpoolError(open_failure(path, exc, free_space)) from exc
        raise
    return db, lock


def upgrade_lock(path: Path) -> Any:
    """The single-writer lock, taken to upgrade a spool of schema 1: refused while another process has it."""
    try:
        return acquire_lock(path)
    except SpoolError as exc:
        raise SpoolError(f"{exc}: it is a spool of schema 1, and this version upgrades it to schema "
                         f"{SCHEMA_VERSION} only while no other process uses it. Stop the usage-agent that has it "
                         f"(an older version still running?), then start this one again; the spool is left "
                         f"as it is.") from None


def has_untimed_ids(db: sqlite3.Connection) -> bool:
    """Whether any id is kept in untimed_ids (a table only the upgrade and salvage make)."""
    if db.execute("SELECT 1 FROM sqlite_master WHERE name = 'untimed_ids'").fetchone() is None:
        return False
    return db.execute("SELECT 1 FROM untimed_ids LIMIT 1").fetchone() is not None


def layout(db: sqlite3.Connection) -> int | None:
    """Which schema the file's tables are in: 2, 1 (one records table) or None (no spool tables)."""
    kinds = dict(db.execute("SELECT name, type FROM sqlite_master WHERE name IN ('records', 'record_bodies')"))
    if "record_bodies" in kinds:
        return 2
    return 1 if kinds.get("records") == "table" else None


def set_up(db: sqlite3.Connection, path: Path, free_space: Callable[[], int]) -> None:
    """Create the tables, or migrate a schema-1 spool, in one transaction (a crash leaves schema 1)."""
    db.execute("BEGIN IMMEDIATE")
    old = False
    try:
        old = layout(db) == 1  # read in the transaction: another process may have migrated it just now
        for statement in (*SCHEMA.split(";"), *(MIGRATE_1 if old else ()), *INDEXES.split(";")):
            if statement.strip():
                db.execute(statement)
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        db.execute("COMMIT")
    except BaseException as exc:
        if db.in_transaction:
            db.execute("ROLLBACK")
        if old and isinstance(exc, sqlite3.Error):
            raise SpoolError(open_failure(path, exc, free_space, upgrade=True)) from exc
        raise
