"""A spool written by an agent of schema 1 (one records table) opens, migrated in one transaction:
every record keeps its seq, id, body and state, and the sampler state and kept values stay."""

from __future__ import annotations

import json
import sqlite3
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from agent.errors import SpoolError
from agent.salvage import salvage
from agent.spool import Dead, Spool
from agent.spool_files import acquire_lock, set_up
from tests.support import FakeClock, make_record

UTC = timezone.utc
T0 = datetime(2024, 3, 1, 10, 0, tzinfo=UTC)
START = 1_700_000_000.0
_encode = json.JSONEncoder(separators=(",", ":")).encode

# what agent/spool_files.py created at schema version 1
SCHEMA_1 = """
CREATE TABLE records (
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
CREATE INDEX records_by_state ON records (state, seq);
CREATE TABLE sampler_state (
    measurement TEXT PRIMARY KEY,
    last_tick TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT '{}'
);
PRAGMA user_version=1;
"""
COLUMNS = ("seq, id, measurement, tick, body, state, attempts, created_at, updated_at, not_before, lease_until, "
           "last_status, last_error")
RECORDS = [make_record(f"cust-{n}", T0 + timedelta(minutes=15 * (n // 3))) for n in range(9)]
# (state, attempts, not_before, lease_until, last_status, last_error) per record, as schema 1 held them
STATES = [
    ("delivered", 1, 0, None, None, None),
    ("delivered", 2, 0, None, None, None),
    ("dead", 1, 0, None, 400, "rejected: unknown customer"),
    ("pending", 3, START + 600, None, 503, "backend answered 503"),  # waiting for its retry
    ("leased", 0, 0, START + 60, None, None),  # by an agent that died
    ("pending", 0, 0, None, None, None),
    ("pending", 0, 0, None, None, None),
    ("dead", 0, 0, None, None, "damaged in spool: JSONDecodeError"),
    ("pending", 0, 0, None, None, None),
]


def old_spool(path: Path) -> list[tuple[object, ...]]:
    """A schema-1 spool with a record in every state, one body that is no JSON, and sampler state."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(SCHEMA_1)
    for n, (record, (state, attempts, not_before, lease_until, status, error)) in enumerate(zip(RECORDS, STATES)):
        body = f'{{"id":"{record.record_id}","value":' if n == 7 else _encode(record.to_json())  # cut short
        db.execute(f"INSERT INTO records ({COLUMNS}) VALUES (NULL, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                   (record.record_id, record.measurement, record.to_json()["timestamp"], body, state, attempts,
                    START - 900 + n, START + n, not_before, lease_until, status, error))
    db.execute("INSERT INTO sampler_state VALUES ('ebs-storage', '2024-03-01T10:30:00Z', '{\"volumes\": 9}')")
    db.execute("INSERT INTO sampler_state VALUES ('kept:paigo-dimensions', '', '[\"dim-storage\"]')")
    rows = db.execute(f"SELECT {COLUMNS} FROM records ORDER BY seq").fetchall()
    db.close()
    return rows


def test_a_schema_1_spool_keeps_every_record_and_state_and_works_as_before(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    before = old_spool(path)
    clock = FakeClock(START)
    spool = Spool(path, clock=clock)
    try:
        assert spool._db.execute("PRAGMA user_version").fetchone()[0] == 2
        tables = dict(spool._db.execute("SELECT name, type FROM sqlite_master WHERE name LIKE 'record%'"))
        assert tables["records"] == "view" and tables["record_bodies"] == tables["record_states"] == "table"
        assert spool._db.execute(f"SELECT {COLUMNS} FROM records ORDER BY seq").fetchall() == before
        assert spool.counts() == {"pending": 4, "leased": 1, "delivered": 2, "dead": 2}
        assert spool.sampler_state("ebs-storage") == {"volumes": 9}
        assert spool.kept("paigo-dimensions") == '["dim-storage"]'
        assert [(r["id"], r["last_status"], r["last_error"]) for r in spool.rows("dead")] == [
            (RECORDS[2].record_id, 400, "rejected: unknown customer"),
            (RECORDS[7].record_id, None, "damaged in spool: JSONDecodeError")]

        spool.claim()  # the dead agent's lease is released
        # every id is spooled already, in every state, and most under another tick than this one
        again = spool.commit_tick("ebs-storage", T0, RECORDS)
        assert again.inserted == 0
        new = make_record("cust-new", T0)
        assert spool.commit_tick("ebs-storage", T0, [new]).inserted == 1
        leased = [item.record.record_id for item in spool.lease_batch(100, 3600)]
        assert leased == [RECORDS[n].record_id for n in (4, 5, 6, 8)] + [new.record_id]  # oldest first
        spool.settle(delivered=leased[:2], dead=[Dead(leased[2], 422, "rejected")])
        clock.advance_to(START + 600)  # the retry is due
        assert [item.record.record_id for item in spool.lease_batch(100, 60)] == [RECORDS[3].record_id]
        assert spool.counts() == {"pending": 0, "leased": 3, "delivered": 4, "dead": 3}
    finally:
        spool.close()


def test_a_schema_1_spool_is_read_by_salvage_as_it_is(tmp_path: Path) -> None:
    """A damaged spool of schema 1 is salvaged from its own layout into a fresh spool of schema 2."""
    path = tmp_path / "spool.db"
    before = old_spool(path)
    db = sqlite3.connect(path)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    (page,) = db.execute("SELECT pageno FROM dbstat WHERE name = 'records_by_state'").fetchone()
    db.close()
    data = bytearray(path.read_bytes())
    data[(page - 1) * 4096:page * 4096] = bytes(4096)  # the state index is gone: integrity_check fails
    path.write_bytes(bytes(data))
    report = salvage(path).as_dict()
    assert report["quarantined"] is not None and report["lost_at_most"] == 0
    spool = Spool(path, clock=FakeClock(START))
    try:
        after = spool._db.execute("SELECT seq, id, body FROM records ORDER BY seq").fetchall()
        counts = spool.counts()
        version = spool._db.execute("PRAGMA user_version").fetchone()[0]
    finally:
        spool.close()
    assert version == 2  # the fresh spool is of this agent's schema
    assert after == [row[:2] + row[4:5] for row in before]
    assert counts == {"pending": 5, "leased": 0, "delivered": 2, "dead": 2}  # leased: pending again


def test_a_schema_1_spool_another_process_has_locked_is_left_as_it_is(tmp_path: Path) -> None:
    """An older agent still running holds the lock: upgrading under it would break its writes."""
    path = tmp_path / "spool.db"
    before = old_spool(path)
    holder = acquire_lock(path)  # another open file description: flock treats it as another process
    try:
        with pytest.raises(SpoolError, match=r"in use by another usage-agent process .*spool.db.lock is locked.*"
                                             r"schema 1.*Stop the usage-agent"):
            Spool.open_existing(path)
        with pytest.raises(SpoolError, match="in use by another usage-agent process"):
            Spool(path)
    finally:
        holder.close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == 1
    assert db.execute(f"SELECT {COLUMNS} FROM records ORDER BY seq").fetchall() == before
    db.close()
    spool = Spool.open_existing(path)  # nobody holds it now: upgraded, and the lock kept for claim
    try:
        assert spool._db.execute("PRAGMA user_version").fetchone()[0] == 2
        with pytest.raises(SpoolError, match="in use by another usage-agent process"):
            acquire_lock(path)
        spool.claim()
        assert spool.counts()["leased"] == 0 and spool.reserve.held
    finally:
        spool.close()
    acquire_lock(path).close()  # released at close


def test_a_full_disk_during_the_upgrade_names_it_and_the_room_it_needs(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    before = old_spool(path)
    db = sqlite3.connect(path, isolation_level=None)
    db.execute(f"PRAGMA max_page_count={db.execute('PRAGMA page_count').fetchone()[0]}")  # SQLite's own SQLITE_FULL
    with pytest.raises(SpoolError) as caught:
        set_up(db, path, lambda: 4096)
    assert db.execute("PRAGMA user_version").fetchone()[0] == 1
    assert db.execute(f"SELECT {COLUMNS} FROM records ORDER BY seq").fetchall() == before
    db.close()
    message = str(caught.value)
    assert message.startswith(f"spool {path} cannot be upgraded from schema 1 to schema 2: the disk is full "
                              f"(4096 bytes free on {tmp_path}; ")
    assert f"another copy of the records' size free (the spool file is {path.stat().st_size} bytes)" in message
    assert "left as it was (schema 1)" in message


def _garble(path: Path, record: object, body: str, state: str) -> None:
    db = sqlite3.connect(path)
    db.execute(f"UPDATE {'records' if state else 'record_bodies'} SET tick = ?, body = ? WHERE id = ?",
               (b"\xff\xfe", body, getattr(record, "record_id")))
    db.commit()
    db.close()


def test_an_upgraded_row_whose_time_is_unreadable_keeps_its_id_unique(tmp_path: Path) -> None:
    """A delivered row of schema 1 with its tick and body garbled: a re-run tick must not spool it again."""
    path = tmp_path / "spool.db"
    old_spool(path)
    _garble(path, RECORDS[0], f'{{"id":"{RECORDS[0].record_id}","val\x00', state="records")
    spool = Spool(path, clock=FakeClock(START))
    try:
        assert spool._db.execute("SELECT at FROM record_bodies WHERE id = ?", (RECORDS[0].record_id,)).fetchall() == [
            ("?",)]
        assert spool.commit_tick("ebs-storage", T0, RECORDS[:3]).inserted == 0
        assert spool._db.execute("SELECT state FROM records WHERE id = ?",
                                 (RECORDS[0].record_id,)).fetchall() == [("delivered",)]
        assert spool.commit_tick("ebs-storage", T0, [make_record("cust-new", T0)]).inserted == 1
        assert spool.purge_delivered(START + 10**6) == 2  # its row gone, its id is free again, as any purged id
        assert spool._db.execute("SELECT count(*) FROM untimed_ids").fetchone()[0] == 0
    finally:
        spool.close()


def test_a_salvaged_row_whose_tick_is_garbled_takes_its_time_from_the_index(tmp_path: Path) -> None:
    """A delivered row with its tick and the tail of its body garbled, salvaged: a re-run tick must not
    spool a second, pending copy of it (an overcharge)."""
    path = tmp_path / "spool.db"
    spool = Spool(path, clock=FakeClock(START))
    spool.claim()
    records = [make_record(f"cust-{n}", T0) for n in range(30)]
    spool.commit_tick("ebs-storage", T0, records)
    spool.settle(delivered=[item.record.record_id for item in spool.lease_batch(100, 60)])
    spool.close()
    target = records[0]
    _garble(path, target, f'{{"id":"{target.record_id}","measurement":"ebs\x00garbage', state="")
    db = sqlite3.connect(path)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    (page,) = db.execute("SELECT pageno FROM dbstat WHERE name = 'record_states_by_state'").fetchone()
    db.close()
    data = bytearray(path.read_bytes())
    data[(page - 1) * 4096:page * 4096] = bytes(4096)  # damage elsewhere: salvage rebuilds the file
    path.write_bytes(bytes(data))
    assert salvage(path).as_dict()["quarantined"] is not None
    spool = Spool(path, clock=FakeClock(START))
    try:
        spool.claim()
        assert spool._db.execute("SELECT state, at FROM records JOIN record_bodies USING (seq) WHERE records.id = ?",
                                 (target.record_id,)).fetchall() == [("delivered", "2024-03-01T10:00:00Z")]
        assert spool.commit_tick("ebs-storage", T0, records).inserted == 0
        assert spool._db.execute("SELECT count(*) FROM records WHERE id = ?", (target.record_id,)).fetchone()[0] == 1
    finally:
        spool.close()


def test_a_salvaged_row_whose_time_nothing_tells_keeps_its_id_unique(tmp_path: Path) -> None:
    """Schema 1 has no (at, id) index: a delivered row with its tick and body garbled is copied at no
    time, and its id is guarded instead."""
    path = tmp_path / "spool.db"
    old_spool(path)
    _garble(path, RECORDS[0], f'{{"id":"{RECORDS[0].record_id}","val\x00', state="records")
    db = sqlite3.connect(path)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    (page,) = db.execute("SELECT pageno FROM dbstat WHERE name = 'records_by_state'").fetchone()
    db.close()
    data = bytearray(path.read_bytes())
    data[(page - 1) * 4096:page * 4096] = bytes(4096)
    path.write_bytes(bytes(data))
    assert salvage(path).as_dict()["quarantined"] is not None
    spool = Spool(path, clock=FakeClock(START))
    try:
        assert spool._db.execute("SELECT state, at FROM records JOIN record_bodies USING (seq) WHERE records.id = ?",
                                 (RECORDS[0].record_id,)).fetchall() == [("delivered", "?")]
        assert spool.commit_tick("ebs-storage", T0, RECORDS[:3]).inserted == 0
        assert spool._db.execute("SELECT count(*) FROM records WHERE id = ?", (RECORDS[0].record_id,)).fetchone()[0] == 1
    finally:
        spool.close()
