"""Spool throughput: records spooled in tick-sized transactions, then leased and acknowledged in
batches, every commit with synchronous=FULL; against persist-queue's SQLiteAckQueue (the
closest published durable-ack queue in Python) and raw batched INSERT/DELETE (the floor)."""

from __future__ import annotations

import gc
import sqlite3
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any

from agent.records import UsageRecord
from agent.spool_rows import load_json, dump_json  # the spool's encoder and decoder: the floor does the same JSON work
from bench.common import Timing, interleave, timed
from bench.records import BASE_TICK, ticks

PER_TICK = 1000
LEASE = 512  # what the forwarder leases for a one-record sink such as Paigo's: 64 per request slot x 8 in flight


def agent_spool(batches: list[list[UsageRecord]]) -> Timing:
    from agent.spool import Spool

    with tempfile.TemporaryDirectory(prefix="bench-spool-") as tmp:
        spool = Spool(Path(tmp) / "spool.db", max_records=10_000_000)

        def run() -> int:
            for i, records in enumerate(batches):
                spool.commit_tick("ebs-gib-hours", BASE_TICK + timedelta(minutes=15 * i), records)
            acked = 0
            while leased := spool.lease_batch(LEASE, 900.0):
                spool.settle(delivered=[item.record.record_id for item in leased])
                acked += len(leased)
            spool.checkpoint()
            return acked

        timing, acked = timed(run)
        spool.close()
    _check(acked, batches)
    return timing


def raw_sqlite(batches: list[list[UsageRecord]]) -> Timing:
    """The floor: the same bytes in and out of one SQLite table, nothing else."""
    with tempfile.TemporaryDirectory(prefix="bench-raw-") as tmp:
        db = sqlite3.connect(Path(tmp) / "raw.db", isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("CREATE TABLE queue (seq INTEGER PRIMARY KEY, body TEXT NOT NULL)")

        def run() -> int:
            for records in batches:
                db.execute("BEGIN")
                db.executemany("INSERT INTO queue (body) VALUES (?)",
                               [(dump_json(r.to_json()),) for r in records])
                db.execute("COMMIT")
            acked = 0
            while rows := db.execute("SELECT seq, body FROM queue ORDER BY seq LIMIT ?", (LEASE,)).fetchall():
                for _, body in rows:
                    load_json(body)
                db.execute("BEGIN")
                db.executemany("DELETE FROM queue WHERE seq = ?", [(seq,) for seq, _ in rows])
                db.execute("COMMIT")
                acked += len(rows)
            return acked

        timing, acked = timed(run)
        db.close()
    _check(acked, batches)
    return timing


def persist_queue(records: list[UsageRecord]) -> Timing:
    """SQLiteAckQueue: put, get, ack one item at a time (it has no batch operations)."""
    import persistqueue
    import persistqueue.serializers.json

    with tempfile.TemporaryDirectory(prefix="bench-pq-") as tmp:
        queue = persistqueue.SQLiteAckQueue(tmp, serializer=persistqueue.serializers.json, auto_commit=True)
        queue._putter.execute("PRAGMA synchronous=FULL")  # the same durability as the agent's spool
        queue._getter.execute("PRAGMA synchronous=FULL")

        def run() -> int:
            for record in records:
                queue.put(record.to_json())
            acked = 0
            while queue.qsize():
                item = queue.get(block=False, raw=True)
                queue.ack(item)
                acked += 1
            return acked

        timing, acked = timed(run)
        queue.close()
    if acked != len(records):
        raise RuntimeError(f"persist-queue acknowledged {acked} of {len(records)} records")
    return timing


def _check(acked: int, batches: list[list[UsageRecord]]) -> None:
    if acked != sum(map(len, batches)):
        raise RuntimeError(f"acknowledged {acked} of {sum(map(len, batches))} records")


def run(records: int, peer_records: int, repeats: int) -> dict[str, Any]:
    batches = ticks(PER_TICK, records // PER_TICK)
    peer = [r for batch in ticks(PER_TICK, -(-peer_records // PER_TICK)) for r in batch][:peer_records]
    # the inputs (100k records and their tags) are the harness's, not any contender's state: kept out
    # of the cyclic collector's passes, each contender pays only for the objects it makes itself
    gc.collect()
    gc.freeze()
    try:
        series = interleave(repeats, {
            "raw_sqlite": lambda: raw_sqlite(batches),
            "agent": lambda: agent_spool(batches),
            "persist_queue": lambda: persist_queue(peer),
        })
    finally:
        gc.unfreeze()
    return {"records": records, "persist_queue_records": peer_records, "series": series}
