"""The spool's disk: outcomes before ticks when space runs out, held outcomes at exit, a paused
forwarder that backs off, and open failures that say what is wrong (not "run salvage" for all).

SQLite's ``max_page_count`` stands in for a full volume: past it SQLite really answers
SQLITE_FULL. The reserve is the spool's own ballast interface; its fake gives pages back.
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from agent.config import parse_backend
from agent.errors import SpoolDiskLowError, SpoolError
from agent.forwarder import MAX_PAUSE, Forwarder
from agent.metrics import Metrics
from agent.sinks.file import FileSink
from agent.spool import Dead, Reserve, Spool, open_failure
from agent.testing.paigo_server import PaigoContractServer
from tests.conftest import Aws, make_config
from tests.support import FakeClock, make_records
from tests.test_delivery import TICK
from tests.test_runtime import new_agent

MiB = 2**20
UNLIMITED = 1073741823


def limit_pages(spool: Spool, extra: int = 0) -> None:
    """As if the volume had room for ``extra`` more pages only."""
    pages = spool._db.execute("PRAGMA page_count").fetchone()[0]
    spool._db.execute(f"PRAGMA max_page_count={pages + extra}")


class PagesReserve(Reserve):
    """The reserve over the stand-in volume: releasing it gives the volume room again."""

    def __init__(self, path: Path):
        super().__init__(path, size=1)
        self.spool: Spool | None = None
        self.holding = False
        self.room_to_restore = True
        self.released = 0

    @property
    def held(self) -> bool:
        return self.holding

    def restore(self) -> bool:
        self.holding = self.holding or self.room_to_restore
        return self.holding

    def release(self) -> bool:
        if not self.holding:
            return False
        self.holding = False
        self.released += 1
        assert self.spool is not None
        self.spool._db.execute(f"PRAGMA max_page_count={UNLIMITED}")
        return True


def leased_spool(tmp_path: Path, reserve: Reserve | None = None, count: int = 32) -> tuple[Spool, list[str], FakeClock]:
    clock = FakeClock()
    spool = Spool(tmp_path / "spool.db", clock=clock, reserve=reserve)
    spool.claim()
    spool.commit_tick("ebs-storage", TICK, make_records(count))
    ids = [item.record.record_id for item in spool.lease_batch(count, 900)]
    return spool, ids, clock


def outcomes_that_need_pages(ids: list[str]) -> dict[str, object]:
    """Half delivered, half dead-lettered with a long response: the write needs new pages."""
    half = len(ids) // 2
    return {"delivered": ids[:half], "dead": [Dead(rid, 400, "x" * 3000) for rid in ids[half:]]}


# -- outcomes before ticks ------------------------------------------------------------------


def test_a_tick_is_refused_below_the_free_space_floor_and_outcomes_are_still_written(
        aws: Aws, paigo: PaigoContractServer, tmp_path: Path) -> None:
    aws.volume("us-east-1", 5, tags={"customer-id": "acme"})
    cfg = make_config(paigo, tmp_path)
    free = [10 * 1024 * MiB]
    metrics = Metrics()
    spool = Spool(cfg.spool.path, min_free_bytes=64 * MiB, free_space=lambda: free[0], metrics=metrics)
    spool.claim()
    agent = new_agent(cfg, spool)
    t0 = datetime(2026, 11, 21, 10, tzinfo=timezone.utc)
    assert agent.sample_all(t0)[0].ok
    leased = [item.record.record_id for item in spool.lease_batch(10, 900)]
    labels = {"measurement": "ebs-storage", "reason": "disk_low"}
    before = agent.metrics.value("usage_agent_ticks_failed_total", labels)

    free[0] = 40 * MiB  # something else on the volume took the space
    with capture_logs() as logs:
        refused = agent.sample_all(t0 + timedelta(minutes=15))[0]
    assert not refused.ok and f"{40 * MiB} bytes free on its disk, below the {64 * MiB}" in (refused.error or "")
    assert any(e["event"] == "tick not spooled; the sampler state stays where it was" for e in logs)
    assert agent.metrics.value("usage_agent_ticks_failed_total", labels) == before + 1
    assert metrics.value("usage_agent_spool_full") == 1 and spool.facts().full and spool.facts().disk_low
    assert spool.last_tick("ebs-storage") == "2026-11-21T10:00:00Z"

    spool.settle(delivered=leased)  # outcomes are not refused
    assert spool.counts()["delivered"] == 1
    assert spool.facts().full  # still low: the next tick is refused too

    free[0] = 10 * 1024 * MiB
    assert agent.sample_all(t0 + timedelta(minutes=30))[0].ok
    assert not spool.facts().full and metrics.value("usage_agent_spool_full") == 0
    agent.close()
    spool.close()


def test_a_full_disk_releases_the_reserve_for_outcomes_and_ticks_wait_for_it(tmp_path: Path) -> None:
    reserve = PagesReserve(tmp_path / "spool.db.reserve")
    spool, ids, _ = leased_spool(tmp_path, reserve)
    reserve.spool = spool
    assert reserve.held  # taken when the spool was claimed
    limit_pages(spool)  # the volume is full

    with capture_logs() as logs:
        spool.settle(**outcomes_that_need_pages(ids))  # fails once for real, then goes into the reserve
    assert reserve.released == 1
    assert any(e["event"].startswith("spool write failed; the disk reserve is released") for e in logs)
    assert spool.counts() == {"pending": 0, "leased": 0, "delivered": 16, "dead": 16}
    assert spool.facts().held_outcomes == 0

    reserve.room_to_restore = False  # the space went to outcomes; a tick may not take it
    with pytest.raises(SpoolDiskLowError, match="disk reserve for delivery outcomes .* was used"):
        spool.commit_tick("ebs-storage", TICK + timedelta(hours=1), make_records(1))
    reserve.room_to_restore = True
    assert spool.commit_tick("ebs-storage", TICK + timedelta(hours=1), make_records(40)[39:]).inserted == 1
    assert reserve.held
    spool.close()


def test_outcomes_a_full_disk_held_are_written_at_a_clean_exit(tmp_path: Path) -> None:
    reserve = PagesReserve(tmp_path / "spool.db.reserve")
    spool, ids, clock = leased_spool(tmp_path, reserve)
    reserve.spool = spool
    reserve.holding = False  # spent already: nothing left to release
    limit_pages(spool)
    with pytest.raises(SpoolError, match="full"):
        spool.settle(**outcomes_that_need_pages(ids))
    assert spool.facts().held_outcomes == 32 and spool.counts()["leased"] == 32

    spool._db.execute(f"PRAGMA max_page_count={UNLIMITED}")  # room again before the stop, no settle since
    spool.close()

    reopened = Spool(tmp_path / "spool.db", clock=clock)
    reopened.claim()  # a restart: whatever is still leased would be sent again
    try:
        assert reopened.counts() == {"pending": 0, "leased": 0, "delivered": 16, "dead": 16}
    finally:
        reopened.close()


def test_a_paused_forwarder_backs_off_instead_of_spinning(tmp_path: Path) -> None:
    clock = FakeClock()
    spool = Spool(tmp_path / "spool.db", clock=clock)
    spool.claim()
    spool.commit_tick("ebs-storage", TICK, make_records(20))
    spool._db.execute("PRAGMA query_only=1")  # no write succeeds: not a lease, not an outcome
    sink = FileSink(parse_backend({"type": "file", "path": str(tmp_path / "out.jsonl")}))
    forwarder = Forwarder(spool, sink, clock=clock)
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) > 100:
            raise AssertionError(f"busy loop: {sleeps[:10]} …")
        clock.advance(max(seconds, 0.001))

    start = clock.time()
    with capture_logs() as logs:
        forwarder.drain_until(start + 5, sleep=sleep)
    paused = [e for e in logs if e["event"] == "spool unavailable; delivery paused until it can be written again"]
    assert [e["retry_in_seconds"] for e in paused] == [1.0, 2.0, 4.0]  # tries at +0, +1 and +3 s
    assert sleeps == [1.0, 2.0]
    assert forwarder.drain().leased == 0 and len(logs) == len(paused) + 0  # still paused: returns at once

    for _ in range(10):  # the pause doubles up to its cap
        clock.advance_to(forwarder.paused_until)
        forwarder.drain()
    assert forwarder.paused_until - clock.time() == MAX_PAUSE

    spool._db.execute("PRAGMA query_only=0")
    clock.advance_to(forwarder.paused_until)
    assert forwarder.drain().delivered == 20 and forwarder.paused_until is None
    sink.close()
    spool.close()


# -- open failures say what is wrong --------------------------------------------------------


def test_a_directory_as_the_spool_path_says_so(tmp_path: Path) -> None:
    with pytest.raises(SpoolError) as caught:
        Spool(tmp_path)
    message = str(caught.value)
    assert message.startswith(f"spool {tmp_path} is a directory, not a spool file")
    assert "spool salvage" not in message


def open_in(directory: Path) -> str:
    """The error opening a spool in ``directory`` gives, in a child process that is not root
    (root may write anywhere)."""
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through the pipe
        message = "opened"
        try:
            if os.geteuid() == 0:
                os.setuid(65534)
            Spool(directory / "spool.db").claim()
        except SpoolError as exc:
            message = str(exc)
        except BaseException as exc:
            message = f"unexpected {type(exc).__name__}: {exc}"
        os.write(write, message.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        message = pipe.read().decode()
    os.waitpid(child, 0)
    return message


def test_a_read_only_directory_says_which_and_what_to_do() -> None:
    with tempfile.TemporaryDirectory() as top:
        os.chmod(top, 0o755)
        directory = Path(top) / "spool"
        directory.mkdir(mode=0o555)
        message = open_in(directory)
        directory.chmod(0o755)
    assert message.startswith(f"spool {directory / 'spool.db'} cannot be opened for writing: "
                              f"its directory {directory} is not writable by this process")
    assert "fix the permissions or mount a writable volume" in message and "spool salvage" not in message


def test_a_full_disk_at_open_is_not_called_damage(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "full.db")
    db.execute("CREATE TABLE t (x)")
    db.execute(f"PRAGMA max_page_count={db.execute('PRAGMA page_count').fetchone()[0]}")
    with pytest.raises(sqlite3.OperationalError) as caught:
        db.execute("INSERT INTO t VALUES (zeroblob(100000))")  # SQLITE_FULL, from SQLite itself
    db.close()
    message = open_failure(tmp_path / "spool.db", caught.value)
    assert message.startswith(f"spool {tmp_path / 'spool.db'} cannot be written: the disk is full (")
    assert f"bytes free on {tmp_path}" in message and "spool salvage" not in message


def test_an_io_error_at_open_on_a_full_volume_is_called_full_not_damage(tmp_path: Path) -> None:
    """SQLite answers "disk I/O error" when a full volume cannot take the -shm; that is no damage."""
    error = sqlite3.OperationalError("disk I/O error")
    error.sqlite_errorcode = sqlite3.SQLITE_IOERR  # what SQLite sets when growing the -shm fails
    full = open_failure(tmp_path / "spool.db", error, lambda: 0)
    assert full.startswith(f"spool {tmp_path / 'spool.db'} cannot be written: the disk is full (0 bytes free on ")
    assert "spool salvage" not in full
    roomy = open_failure(tmp_path / "spool.db", error, lambda: 10 * 2**30)
    assert "the disk returned an I/O error" in roomy and "spool salvage" in roomy


def test_a_damaged_file_still_points_to_salvage(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    path.write_bytes(b"not a database at all, " * 400)
    with pytest.raises(SpoolError, match="damaged or not a spool .*usage-agent spool salvage"):
        Spool(path)


# -- inspecting without creating ------------------------------------------------------------


def test_open_existing_does_not_create_a_spool_at_a_mistyped_path(tmp_path: Path) -> None:
    missing = tmp_path / "typo" / "spool.db"
    with pytest.raises(SpoolError) as caught:
        Spool.open_existing(missing)
    assert str(caught.value).startswith(f"no spool at {missing}: the file does not exist")
    assert list(tmp_path.iterdir()) == []  # not even the directory

    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.close()
    with pytest.raises(SpoolError, match="is not a usage-agent spool"):
        Spool.open_existing(other)

    Spool(tmp_path / "spool.db").close()
    spool = Spool.open_existing(tmp_path / "spool.db", max_records=5)
    assert spool.counts()["pending"] == 0 and spool.max_records == 5
    spool.close()
