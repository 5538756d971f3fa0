"""Spool inspection and repair as an operator runs it: `usage-agent spool stats|list|replay|purge|salvage`
as real processes against a spool of a few thousand records, including damaged and WAL-less files."""

from __future__ import annotations

import json
import os
import random
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from agent import salvage as salvage_module
from agent.records import UsageRecord
from agent.spool import Dead, Spool
from agent.testing.paigo_server import PaigoContractServer
from tests.conftest import agent_command, write_config
from tests.support import FakeClock, cli
from tests.support import make_record as record

UTC = timezone.utc
T0 = datetime(2024, 3, 1, tzinfo=UTC)
START = 1_700_000_000.0  # the spool's clock while it is built: created_at / updated_at are known
TICKS, CUSTOMERS = 30, 100  # 3000 records, 900 s of clock per tick
FIRST_SETTLE, SECOND_SETTLE = START + 30_000, START + 40_000
SEED = 4711  # its 20 flips hit page structure too, so the open check sees them (cf. the xfail below)


make_record = lambda customer, tick: record(  # noqa: E731
    f"cust-{customer:03d}", tick, f"{customer}.75", dimension="dim-storage", unit="GiB",
    metadata={"environment": "prod", "resource_count": "2"})


def tick_at(n: int) -> datetime:
    return T0 + timedelta(minutes=15 * n)


def build_spool(path: Path) -> None:
    """1300 delivered (800 early, 500 late), 200 dead (400/422 alternating), 100 leased, 1400 pending."""
    clock = FakeClock(START)
    spool = Spool(path, clock=clock)
    for n in range(TICKS):
        clock.advance_to(START + 900 * n)
        spool.commit_tick("ebs-storage", tick_at(n), [make_record(c, tick_at(n)) for c in range(CUSTOMERS)])
    clock.advance_to(FIRST_SETTLE)
    batch = [item.record.record_id for item in spool.lease_batch(1000, 60)]
    spool.settle(delivered=batch[:800], dead=[Dead(rid, 400 if i % 2 else 422, f"rejected #{i}") for i, rid in
                                              enumerate(batch[800:])])
    clock.advance_to(SECOND_SETTLE)
    spool.settle(delivered=[item.record.record_id for item in spool.lease_batch(500, 60)])
    spool.lease_batch(100, 60)  # left leased, as by an agent that died
    spool.close()


def snapshot(path: Path) -> dict[str, tuple[int, str, str]]:
    """id -> (seq, state, body), read with plain sqlite3."""
    db = sqlite3.connect(path)
    try:
        return {rid: (seq, state, body) for rid, seq, state, body in db.execute("SELECT id, seq, state, body FROM records")}
    finally:
        db.close()


def ids_in(rows: dict[str, tuple[int, str, str]], *states: str) -> set[str]:
    return {rid for rid, (_, state, _) in rows.items() if state in states}


def usage_agent(*args: str) -> subprocess.CompletedProcess[str]:
    """The CLI as a process of its own: for what another process (this one) must not be."""
    return subprocess.run([*agent_command(), *args], capture_output=True, text=True, timeout=120, env=dict(os.environ))


@dataclass
class Setup:
    db: Path
    config: Path

    def spool(self, *command: str) -> subprocess.CompletedProcess[str]:
        return cli("spool", *command, "-c", str(self.config))


@pytest.fixture
def setup(paigo: PaigoContractServer, tmp_path: Path) -> Setup:
    config = write_config(paigo, tmp_path)
    build_spool(tmp_path / "spool.db")
    return Setup(tmp_path / "spool.db", config)


# -- stats and list -------------------------------------------------------------------------


def test_stats_prints_counts_age_and_size(setup: Setup) -> None:
    done = setup.spool("stats")
    assert done.returncode == 0, done.stderr
    stats = json.loads(done.stdout)
    assert stats["path"] == str(setup.db)
    assert stats["counts"] == {"pending": 1400, "leased": 100, "delivered": 1300, "dead": 200}
    oldest = START + 900 * 15  # the leased records (seq 1501-1600) came with tick 15
    assert abs(stats["oldest_unsent_age_seconds"] - (time.time() - oldest)) < 60
    assert stats["file_bytes"] >= setup.db.stat().st_size > 1_000_000


def test_list_dead_prints_json_lines_oldest_first(setup: Setup) -> None:
    done = setup.spool("list", "--state", "dead", "--limit", "25")
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    truth = snapshot(setup.db)
    dead = sorted(ids_in(truth, "dead"), key=lambda rid: truth[rid][0])
    assert [row["id"] for row in rows] == dead[:25]
    for i, row in enumerate(rows):
        assert (row["last_status"], row["last_error"]) == (400 if i % 2 else 422, f"rejected #{i}")
        assert row["body"] == json.loads(truth[row["id"]][2]) and row["body"]["id"] == row["id"]


# -- replay and purge -----------------------------------------------------------------------


def test_replay_by_id_then_by_status_then_all(setup: Setup) -> None:
    truth = snapshot(setup.db)
    dead = sorted(ids_in(truth, "dead"), key=lambda rid: truth[rid][0])
    one = dead[0]  # status 422

    def replay(*args: str) -> int:
        done = setup.spool("replay", *args)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)["replayed"]

    assert replay("--id", one) == 1
    assert ids_in(snapshot(setup.db), "dead") == set(dead) - {one}
    assert replay("--id", one) == 0  # no longer dead
    assert replay("--status", "400") == 100
    left = setup.spool("list", "--state", "dead", "--limit", "1000").stdout.splitlines()
    assert {json.loads(line)["last_status"] for line in left} == {422} and len(left) == 99
    assert replay() == 99
    after = snapshot(setup.db)
    assert ids_in(after, "dead") == set()
    assert ids_in(after, "delivered") == ids_in(truth, "delivered")

    spool = Spool(setup.db)  # the real clock: every lease from the build has long expired
    try:
        leased = {item.record.record_id for item in spool.lease_batch(10_000, 60)}
    finally:
        spool.close()
    assert leased == ids_in(truth, "pending", "leased", "dead")


def test_purge_deletes_only_delivered_rows_settled_before_the_time(setup: Setup) -> None:
    truth = snapshot(setup.db)
    cut = datetime.fromtimestamp((FIRST_SETTLE + SECOND_SETTLE) / 2, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    done = setup.spool("purge", "--delivered-before", cut)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"purged": 800}
    after = snapshot(setup.db)
    assert len(after) == 2200
    for state in ("pending", "leased", "dead"):
        assert ids_in(after, state) == ids_in(truth, state)
    assert all(truth[rid][0] > 1000 for rid in ids_in(after, "delivered"))  # only the late 500 are left
    assert len(ids_in(after, "delivered")) == 500


# -- damaged files --------------------------------------------------------------------------


def flip_bytes(data: bytes, rnd: random.Random) -> bytes:
    damaged = bytearray(data)
    for _ in range(20):
        damaged[rnd.randrange(4096, len(data))] ^= rnd.randrange(1, 256)
    return bytes(damaged)


DAMAGE: dict[str, Callable[[bytes, random.Random], bytes]] = {
    "truncated": lambda data, _rnd: data[: len(data) * 2 // 3],
    "flipped": flip_bytes,
    "random": lambda data, rnd: rnd.randbytes(len(data)),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_a_damaged_spool_is_refused_then_salvaged(setup: Setup, case: str) -> None:
    original = snapshot(setup.db)
    assert not Path(f"{setup.db}-wal").exists()  # closed cleanly: everything is in the main file
    damaged = DAMAGE[case](setup.db.read_bytes(), random.Random(SEED))
    setup.db.write_bytes(damaged)

    refused = setup.spool("stats")
    assert refused.returncode == 1, refused.stdout
    assert str(setup.db) in refused.stderr and "spool salvage" in refused.stderr

    done = setup.spool("salvage")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    (quarantined,) = [p for p in setup.db.parent.glob("spool.db.corrupt-*") if not p.name.endswith(("-wal", "-shm"))]
    assert report["quarantined"] == str(quarantined)
    assert quarantined.read_bytes() == damaged  # kept exactly as it was found
    assert not list(setup.db.parent.glob("spool.db.reading-*")) + list(setup.db.parent.glob("spool.db.salvage-*"))

    recovered = snapshot(setup.db)
    assert set(recovered) <= set(original)  # nothing invented
    dead_now = {row["id"]: row for row in map(json.loads, setup.spool("list", "--state", "dead", "--limit", "9999")
                                                .stdout.splitlines())}
    for rid, (seq, state, body) in recovered.items():
        assert seq == original[rid][0]
        was = {"leased": "pending"}.get(original[rid][1], original[rid][1])
        # an unsent row that is no longer a record is kept, dead-lettered with the reason
        assert state == was or (was == "pending" and state == "dead"
                                and dead_now[rid]["last_error"].startswith("damaged in spool: "))
    after_seq = report["unreadable_after_seq"]
    beyond = {rid for rid, (seq, _, _) in original.items() if after_seq is not None and seq > after_seq}
    lost = set(original) - set(recovered)
    assert report["recovered_total"] == len(recovered)
    if report["lost_at_most"] is None:  # the table's end is gone: only what precedes it is bounded
        assert after_seq is not None and len(lost - beyond) <= report["lost_known"] + report["possibly_lost"]
    else:
        assert after_seq is None and len(lost) <= report["lost_at_most"]
    by_seq = {seq: rid for rid, (seq, _, _) in original.items()}
    assert all(by_seq[row["seq"]] == row.get("id", by_seq[row["seq"]]) for row in report["lost"])  # witnesses are right
    print(f"\n[{case}] original={len(original)} recovered={len(recovered)} lost={len(lost)} "
          f"lost_at_most={report['lost_at_most']} lost_known={report['lost_known']} unreadable_after_seq={after_seq} "
          f"beyond={len(beyond)} damaged_dead_lettered={report['damaged_dead_lettered']}")

    restarted = Spool(setup.db)  # as `usage-agent run` opens it
    try:
        restarted.claim()
        assert restarted.counts() == {"pending": 0, "leased": 0, "delivered": 0, "dead": 0} | report["recovered"]
        assert restarted.commit_tick("ebs-storage", tick_at(TICKS), [make_record(1, tick_at(TICKS))]).inserted == 1
    finally:
        restarted.close()
    assert setup.spool("stats").returncode == 0


def sendable(body: str) -> bool:
    try:
        UsageRecord.from_json(json.loads(body))
    except (ValueError, KeyError, TypeError):
        return False
    return True


def damage_body(db: Path, rid: str, old: bytes, new: bytes) -> None:
    """Overwrite bytes inside one record's body in place: no page structure is touched."""
    data = bytearray(db.read_bytes())
    at = data.index(old, data.index(b'{"id":"' + rid.encode()))
    data[at : at + len(old)] = new
    db.write_bytes(bytes(data))


def first_pending(db: Path) -> str:
    rows = snapshot(db)
    return min(ids_in(rows, "pending"), key=lambda rid: rows[rid][0])


def test_a_record_damaged_inside_is_dead_lettered_and_holds_back_nothing(setup: Setup) -> None:
    # quick_check sees page structure, not cell contents: a garbled body is found when it is leased
    damaged = first_pending(setup.db)
    damage_body(setup.db, damaged, b'"value":"', b'"value":\xff')  # no longer UTF-8
    with pytest.raises(sqlite3.OperationalError, match="UTF-8"):
        snapshot(setup.db)  # the live row is damaged, not a stale copy
    spool = Spool(setup.db)
    try:
        counts = spool.counts()
        unsent_before = counts["pending"] + counts["leased"]  # leases from the fixture's fake past have expired
        leased = spool.lease_batch(10_000, 60)
        dead = {row["id"]: row for row in spool.rows("dead", 10_000)}
    finally:
        spool.close()
    assert damaged not in {item.record.record_id for item in leased}
    assert len(leased) == unsent_before - 1  # every other unsent record still goes out
    assert "damaged in spool" in dead[damaged]["last_error"]


def test_salvage_does_not_keep_a_body_that_is_no_longer_a_record(setup: Setup) -> None:
    poisoned = first_pending(setup.db)
    damage_body(setup.db, poisoned, b'"customer_id"', b'"customer_iX"')  # still JSON; the file itself is sound
    done = setup.spool("salvage")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    spool = Spool(setup.db)
    try:
        leased = spool.lease_batch(10_000, 60)  # today: KeyError 'customer_id', on every attempt
        dead = {row["id"]: row for row in spool.rows("dead", 10_000)}
    finally:
        spool.close()
    assert poisoned not in {item.record.record_id for item in leased}
    assert dead[poisoned]["last_error"] == "damaged in spool: KeyError: 'customer_id'"  # kept, with the reason
    assert (report["healthy"], report["quarantined"], report["damaged_dead_lettered"], report["lost_at_most"]) == (
        True, None, 1, 0)
    assert not list(setup.db.parent.glob("spool.db.corrupt-*"))  # a sound file is repaired in place


def test_a_second_salvage_in_the_same_second_keeps_the_first_damaged_file(setup: Setup) -> None:
    frozen = FakeClock(datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC).timestamp())  # both salvages read the same instant
    damaged = setup.db.read_bytes()[: setup.db.stat().st_size // 2]
    setup.db.write_bytes(damaged)
    salvage_module.salvage(setup.db, clock=frozen)
    salvage_module.salvage(setup.db, clock=frozen)  # e.g. an operator re-running the command
    kept = [p.read_bytes() for p in setup.db.parent.glob("spool.db.corrupt-*") if not p.name.endswith(("-wal", "-shm"))]
    assert damaged in kept


# -- lost -wal / -shm -----------------------------------------------------------------------


def test_deleting_wal_and_shm_after_a_clean_close_loses_nothing(tmp_path: Path) -> None:
    db = tmp_path / "spool.db"
    build_spool(db)  # its last writes (settle, lease) are not followed by a checkpointing commit_tick
    for suffix in ("-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    spool = Spool(db)
    try:
        assert spool.counts() == {"pending": 1400, "leased": 100, "delivered": 1300, "dead": 200}
    finally:
        spool.close()


def test_committed_ticks_survive_a_crash_that_loses_the_wal(tmp_path: Path) -> None:
    clock = FakeClock(START)
    live = Spool(tmp_path / "live" / "spool.db", clock=clock)
    try:
        for n in range(5):
            live.commit_tick("ebs-storage", tick_at(n), [make_record(c, tick_at(n)) for c in range(CUSTOMERS)])
        live.settle(delivered=[item.record.record_id for item in live.lease_batch(200, 60)])
        live.commit_tick("ebs-storage", tick_at(5), [make_record(c, tick_at(5)) for c in range(CUSTOMERS)])
        live.settle(delivered=[item.record.record_id for item in live.lease_batch(100, 60)])  # in the WAL only
        before = live.counts()
        # the crash: the process is gone (never closed) and only the main file is left
        (tmp_path / "after").mkdir()
        shutil.copyfile(live.path, tmp_path / "after" / "spool.db")
    finally:
        live.close()

    reopened = Spool(tmp_path / "after" / "spool.db")
    try:
        reopened.claim()
        after = reopened.counts()
        assert sum(after.values()) == 6 * CUSTOMERS  # every committed tick survived
        assert reopened.last_tick("ebs-storage") == "2024-03-01T01:15:00Z"
        # the first 200 were settled before the last tick and checkpointed with it; the last settle
        # lived only in the WAL: those 100 are pending again and will be sent again (same ids)
        assert after == {"pending": 400, "leased": 0, "delivered": 200, "dead": 0}
    finally:
        reopened.close()
    print(f"\n[crash, -wal lost] before={before} after={after}")


# -- locking --------------------------------------------------------------------------------


def test_salvage_refuses_while_another_process_holds_the_spool(setup: Setup) -> None:
    holder = Spool(setup.db)
    holder.claim()  # releases the build's leases
    truth = snapshot(setup.db)
    try:
        done = usage_agent("spool", "salvage", "-c", str(setup.config))
    finally:
        holder.close()
    assert done.returncode == 1, done.stdout
    assert "in use by another usage-agent process" in done.stderr and str(setup.db) in done.stderr
    assert done.stdout == ""
    assert not list(setup.db.parent.glob("spool.db.*-*"))  # nothing quarantined, copied or rebuilt
    assert snapshot(setup.db) == truth
