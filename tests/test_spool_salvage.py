"""Salvage around real damage (random bytes written into the file), and rows that no longer render.

A range query over a damaged b-tree can return a short result without an error; salvage must
still hold every row SQLite can read by primary key, and its ``lost_at_most`` must be true.
"""

from __future__ import annotations

import json
import random
import shutil
import sqlite3
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import pytest

from agent.config import parse_backend
from agent.forwarder import Forwarder
from agent.salvage import salvage
from agent.sinks.file import FileSink, read_jsonl
from agent.spool import Dead, Spool
from tests.support import FakeClock
from tests.support import make_record as record

UTC = timezone.utc
T0 = datetime(2024, 3, 1, tzinfo=UTC)
PAGE = 4096
START = 1_700_000_000.0


make_record = lambda n, value=None: record(  # noqa: E731
    f"cust-{n % 10:03d}", T0 + timedelta(minutes=15 * (n // 10)), Decimal(f"{n}.25") if value is None else value,
    dimension="dim-storage", unit="GiB", metadata={"environment": "prod", "resource_count": "2"})


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """300 records in ticks of 10: 80 delivered, 20 dead, 200 pending; closed cleanly (no -wal)."""
    path = tmp_path_factory.mktemp("built") / "spool.db"
    spool = Spool(path, clock=FakeClock(START))
    for t in range(30):
        spool.commit_tick("ebs-storage", T0 + timedelta(minutes=15 * t), [make_record(10 * t + c) for c in range(10)])
    batch = [item.record.record_id for item in spool.lease_batch(100, 60)]
    spool.settle(delivered=batch[:80], dead=[Dead(rid, 400, "rejected") for rid in batch[80:]])
    spool.close()
    return path


def rows_of(path: Path) -> dict[int, tuple[str, str]]:
    db = sqlite3.connect(path)
    try:
        return {seq: (rid, state) for seq, rid, state in db.execute("SELECT seq, id, state FROM records")}
    finally:
        db.close()


def readable_by_key(path: Path, seqs: range) -> dict[int, str]:
    """What SQLite still returns row by row (``WHERE seq = ?``) from the damaged file: seq -> id."""
    db = sqlite3.connect(path)
    found: dict[int, str] = {}
    try:
        for seq in seqs:
            try:
                row = db.execute("SELECT CAST(id AS BLOB), CAST(body AS BLOB) FROM record_bodies WHERE seq = ?",
                                 (seq,)).fetchone()
            except sqlite3.DatabaseError:
                continue
            if row is not None and row[1].startswith(b'{"id":"' + row[0]):
                found[seq] = row[0].decode()
    finally:
        db.close()
    return found


def overwrite(path: Path, offset: int, rnd: random.Random) -> None:
    data = bytearray(path.read_bytes())
    data[offset : offset + PAGE] = rnd.randbytes(PAGE)
    path.write_bytes(bytes(data))


def page_offset(path: Path, table: str, which: str) -> int:
    """The file offset of one page of ``table``'s b-tree: its root, a middle leaf or its rightmost leaf."""
    db = sqlite3.connect(path)
    try:
        pages = [page for page, kind in db.execute("SELECT pageno, pagetype FROM dbstat WHERE name = ? ORDER BY path",
                                                   (table,)) if kind == "leaf" or which == "root"]
    finally:
        db.close()
    page = {"root": pages[0], "leaf": pages[len(pages) // 2], "rightmost-leaf": pages[-1]}[which]
    return (page - 1) * PAGE


# 4 KiB of random bytes over: a leaf of the bodies' table, its rightmost leaf (max(seq) fails), its
# root page (no row reachable through the table); and three spots across two pages: two body
# leaves, a body leaf and a leaf of the state index, a leaf of the id index and a body leaf
@pytest.mark.parametrize(("target", "seed"), [("leaf", 0), ("rightmost-leaf", 5), ("root", 31), (None, 3), (None, 6),
                                              (None, 8)],
                         ids=["leaf", "rightmost-leaf", "table-root", "two-body-leaves", "body-and-state-index",
                              "id-index-and-body"])
def test_salvage_holds_every_row_sqlite_can_read_and_a_true_loss_bound(
        built: Path, tmp_path: Path, target: str | None, seed: int) -> None:
    path = tmp_path / "spool.db"
    shutil.copyfile(built, path)
    original = rows_of(path)
    rnd = random.Random(seed)
    if target is None:
        offset = rnd.randrange(PAGE, path.stat().st_size - PAGE)
    else:
        offset = page_offset(path, "record_bodies", target)
    overwrite(path, offset, rnd)
    readable = readable_by_key(path, range(1, len(original) + 1))
    assert len(readable) < len(original)  # the damage cost rows

    report = salvage(path).as_dict()

    after = rows_of(path)
    assert {seq: rid for seq, (rid, _) in after.items() if seq in readable} == readable  # nothing readable is left out
    assert all(original[seq][0] == rid for seq, (rid, _) in after.items())  # nothing invented
    lost = set(original) - set(after)
    assert report["lost_at_most"] is not None and len(lost) <= report["lost_at_most"]
    # an index read whole is a witness of every row: the loss is then exact, and named
    assert report["complete_witness"] is not None and report["lost_at_most"] == len(lost)
    assert {row["seq"] for row in report["lost"]} == lost
    assert all(row.get("id", original[row["seq"]][0]) == original[row["seq"]][0] for row in report["lost"])
    assert report["recovered_total"] == len(after)
    print(f"\n[seed {seed}, {target or 'unaligned'} at {offset}] original={len(original)} "
          f"readable_by_key={len(readable)} salvaged={len(after)} lost={len(lost)} "
          f"lost_at_most={report['lost_at_most']}")


@pytest.mark.parametrize("target", ["leaf", "root"])
def test_damage_to_the_states_costs_no_record_the_state_index_knows_them(
        built: Path, tmp_path: Path, target: str) -> None:
    path = tmp_path / "spool.db"
    shutil.copyfile(built, path)
    original = rows_of(path)
    overwrite(path, page_offset(path, "record_states", target), random.Random(7))
    assert readable_by_key(path, range(1, len(original) + 1)) == {seq: rid for seq, (rid, _) in original.items()}

    report = salvage(path).as_dict()

    assert report["quarantined"] is not None
    assert rows_of(path) == original  # every record, in its state
    assert (report["lost_at_most"], report["damaged_dead_lettered"]) == (0, 0)


def test_salvage_of_a_sound_spool_leaves_it_in_place(built: Path, tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    shutil.copyfile(built, path)
    before = path.read_bytes()
    report = salvage(path).as_dict()
    assert (report["healthy"], report["quarantined"], report["lost_at_most"]) == (True, None, 0)
    assert report["recovered"] == {"pending": 200, "delivered": 80, "dead": 20}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spool.db", "spool.db.lock"]  # nothing quarantined
    assert path.read_bytes() == before


def test_salvage_refuses_a_sound_file_that_is_not_a_spool(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    sqlite3.connect(path).execute("CREATE TABLE t (x)").connection.close()
    before = path.read_bytes()
    with pytest.raises(Exception, match="not a spool"):
        salvage(path)
    assert path.read_bytes() == before


# -- a row whose value no longer renders ---------------------------------------------------

UNRENDERABLE = b'"value":"1e99999999950"'


def poison_value(path: Path, rid: str) -> None:
    """Rewrite one spooled body's value as an older agent (or a hand edit) might have left it."""
    db = sqlite3.connect(path)
    body = json.loads(db.execute("SELECT body FROM records WHERE id = ?", (rid,)).fetchone()[0])
    body["value"] = "1e99999999950"
    db.execute("UPDATE record_bodies SET body = ? WHERE id = ?", (json.dumps(body, separators=(",", ":")), rid))
    db.commit()
    db.close()


def test_one_row_that_does_not_render_is_dead_lettered_and_the_others_are_delivered(tmp_path: Path) -> None:
    clock = FakeClock(START)
    spool = Spool(tmp_path / "spool.db", clock=clock)
    spool.claim()
    records = [make_record(n) for n in range(40)]
    spool.commit_tick("ebs-storage", T0, records)
    poisoned = records[24].record_id
    poison_value(spool.path, poisoned)
    sink = FileSink(parse_backend({"type": "file", "path": str(tmp_path / "out.jsonl")}))
    try:
        Forwarder(spool, sink, batch_size=16, clock=clock).drain()
        dead = spool.rows("dead")
        counts = spool.counts()
    finally:
        sink.close()
        spool.close()
    assert counts == {"pending": 0, "leased": 0, "delivered": 39, "dead": 1}
    assert [r["id"] for r in dead] == [poisoned]
    assert dead[0]["last_error"] == (
        "damaged in spool: value 1E+99999999950 cannot be rendered as a plain decimal (Overflow)")
    sent = [line["id"] for line in read_jsonl(tmp_path / "out.jsonl").objects]
    assert sent == [r.record_id for r in records if r.record_id != poisoned]


def test_rows_dead_lettered_at_lease_are_counted_and_do_not_stop_the_drain(tmp_path: Path) -> None:
    """What ``once`` reports and exits by: a row dead-lettered as damaged counts as dead, and a
    batch made only of such rows does not end the drain while records are pending after it."""
    clock = FakeClock(START)
    spool = Spool(tmp_path / "spool.db", clock=clock)
    spool.claim()
    records = [make_record(n) for n in range(40)]
    spool.commit_tick("ebs-storage", T0, records)
    for record in records[:16]:  # the whole first batch
        poison_value(spool.path, record.record_id)
    sink = FileSink(parse_backend({"type": "file", "path": str(tmp_path / "out.jsonl")}))
    try:
        sent = Forwarder(spool, sink, batch_size=16, clock=clock).drain()
        counts = spool.counts()
    finally:
        sink.close()
        spool.close()
    assert counts == {"pending": 0, "leased": 0, "delivered": 24, "dead": 16}
    assert (sent.delivered, sent.dead) == (24, 16)


def test_salvage_copies_a_row_that_does_not_render_as_dead_letter(built: Path, tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    shutil.copyfile(built, path)
    original = rows_of(path)
    poisoned = original[150][0]  # pending
    poison_value(path, poisoned)
    overwrite(path, 26 * PAGE, random.Random(1))  # and damage elsewhere: a rebuild, not a repair in place
    report = salvage(path).as_dict()
    assert report["quarantined"] is not None and report["damaged_dead_lettered"] == 1
    spool = Spool(path)
    try:
        dead = {row["id"]: row for row in spool.rows("dead", 1000)}
        leased = {item.record.record_id for item in spool.lease_batch(1000, 60)}
    finally:
        spool.close()
    assert "cannot be rendered as a plain decimal" in dead[poisoned]["last_error"]
    assert poisoned not in leased
    assert dead[poisoned]["body"]["value"] == "1e99999999950"  # kept as found, for people to read


# three 4 KiB regions over 3000 records, both indexes damaged too (no witness is whole): some
# lost rows are named by a witness, others only counted as possibly lost
@pytest.mark.parametrize("seed", [8, 90])
def test_salvage_bound_stays_true_when_no_index_is_whole(tmp_path: Path, seed: int) -> None:
    from tests.test_spool_repair import build_spool

    path = tmp_path / "spool.db"
    build_spool(path)
    original = rows_of(path)
    rnd = random.Random(seed)
    for _ in range(3):
        overwrite(path, rnd.randrange(PAGE, path.stat().st_size - PAGE), rnd)
    readable = readable_by_key(path, range(1, len(original) + 1))

    report = salvage(path).as_dict()

    after = rows_of(path)
    assert {seq: rid for seq, (rid, _) in after.items() if seq in readable} == readable
    assert all(original[seq][0] == rid for seq, (rid, _) in after.items())  # no row under a garbled id
    lost = set(original) - set(after)
    assert report["complete_witness"] is None and len(lost) <= report["lost_at_most"]
    print(f"\n[seed {seed}] original={len(original)} salvaged={len(after)} lost={len(lost)} "
          f"lost_at_most={report['lost_at_most']} (known {report['lost_known']}, possibly {report['possibly_lost']})")
