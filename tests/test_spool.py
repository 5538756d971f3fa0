"""The durable spool: one SQLite file, atomic ticks, leases, retries and dead letters."""

from __future__ import annotations

import random
import sqlite3
from datetime import datetime, timedelta, timezone

import pytest

from agent.records import format_timestamp
from agent.errors import SpoolError, SpoolFullError
from agent.metrics import Metrics
from agent.spool import Dead, Retry, Spool, SpoolFacts
from tests.support import FakeClock
from tests.support import make_record as record

UTC = timezone.utc
T1 = datetime(2024, 3, 1, 10, 0, tzinfo=UTC)
T2 = T1 + timedelta(hours=1)
T3 = T2 + timedelta(hours=1)
START = 1_700_000_000.0


SPOOL_FIELDS = {"dimension": "dim-storage", "unit": "GiB-hours", "metadata": {"environment": "prod", "resource_count": "2"}}
make_record = lambda customer, tick=T1, value="1.75": record(customer, tick, value, **SPOOL_FIELDS)  # noqa: E731


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(START)


@pytest.fixture
def open_spool(tmp_path, clock):
    opened: list[Spool] = []

    def _open(max_records: int = 1_000_000, path=None) -> Spool:
        spool = Spool(path or tmp_path / "spool.db", max_records=max_records, clock=clock)
        opened.append(spool)
        return spool

    yield _open
    for spool in opened:
        spool.close()


@pytest.fixture
def spool(open_spool) -> Spool:
    return open_spool()


def ids(leased) -> list[str]:
    return [item.record.record_id for item in leased]


# -- committing ticks ---------------------------------------------------------------------


def test_commit_tick_stores_records_as_pending(spool):
    records = [make_record(c) for c in ("acme", "globex", "initech")]
    commit = spool.commit_tick("ebs-storage", T1, records)
    assert (commit.inserted, commit.previous_tick) == (3, None)
    assert spool.counts() == {"pending": 3, "leased": 0, "delivered": 0, "dead": 0}
    assert spool.last_tick("ebs-storage") == "2024-03-01T10:00:00Z"
    assert spool.last_tick("other-measurement") is None
    assert [row["id"] for row in spool.rows("pending")] == [r.record_id for r in records]
    assert spool.rows("pending")[0]["tick"] == "2024-03-01T10:00:00Z"


def test_recommitting_a_tick_inserts_nothing_new(spool):
    records = [make_record(c) for c in ("acme", "globex")]
    spool.commit_tick("ebs-storage", T1, records)
    again = spool.commit_tick("ebs-storage", T1, records)
    assert (again.inserted, again.previous_tick) == (0, "2024-03-01T10:00:00Z")
    partly_new = spool.commit_tick("ebs-storage", T1, [*records, make_record("initech")])
    assert partly_new.inserted == 1
    assert spool.counts()["pending"] == 3


def test_last_tick_never_moves_backwards(spool):
    spool.commit_tick("ebs-storage", T2, [make_record("acme", T2)])
    older = spool.commit_tick("ebs-storage", T1, [make_record("acme", T1)])
    assert older.previous_tick == format_timestamp(T2)
    assert older.inserted == 1
    assert spool.last_tick("ebs-storage") == format_timestamp(T2)
    newer = spool.commit_tick("ebs-storage", T3, [])
    assert newer.previous_tick == format_timestamp(T2)
    assert spool.last_tick("ebs-storage") == format_timestamp(T3)


def test_a_refused_tick_changes_neither_records_nor_sampler_state(open_spool):
    spool = open_spool(max_records=3)
    spool.commit_tick("ebs-storage", T1, [make_record("acme"), make_record("globex")])
    with pytest.raises(SpoolFullError, match="max_records=3"):
        spool.commit_tick("ebs-storage", T2, [make_record("acme", T2), make_record("globex", T2)])
    assert spool.counts()["pending"] == 2
    assert {row["tick"] for row in spool.rows("pending")} == {format_timestamp(T1)}
    assert spool.last_tick("ebs-storage") == format_timestamp(T1)


def test_a_tick_failing_after_its_inserts_is_rolled_back(spool):
    spool.commit_tick("ebs-storage", T1, [make_record("acme")])
    with pytest.raises(TypeError):  # the sampler state is not JSON: fails after the records went in
        spool.commit_tick("ebs-storage", T2, [make_record("acme", T2)], state={"bad": object()})
    assert spool.counts()["pending"] == 1
    assert spool.last_tick("ebs-storage") == format_timestamp(T1)
    # the spool is still usable: the same tick commits afterwards
    assert spool.commit_tick("ebs-storage", T2, [make_record("acme", T2)]).inserted == 1


def test_the_cap_counts_only_unsent_records(open_spool):
    spool = open_spool(max_records=2)
    spool.commit_tick("ebs-storage", T1, [make_record("acme"), make_record("globex")])
    with pytest.raises(SpoolFullError):
        spool.commit_tick("ebs-storage", T2, [make_record("acme", T2)])
    leased = spool.lease_batch(10, 60)
    spool.settle(delivered=ids(leased))
    assert spool.commit_tick("ebs-storage", T2, [make_record("acme", T2)]).inserted == 1


def test_the_cap_is_exact_when_delivered_records_lie_between_unsent_ones(open_spool, clock):
    spool = open_spool(max_records=4)
    spool.commit_tick("ebs-storage", T1, [make_record(c) for c in ("acme", "globex", "initech", "umbrella")])
    first = spool.lease_batch(1, 60)  # acme fails and waits; the two after it are delivered
    spool.settle(retries=[Retry(ids(first)[0], clock.time() + 30, 503, "backend answered 503")])
    middle = spool.lease_batch(2, 60)
    spool.settle(delivered=ids(middle))
    # unsent: acme and umbrella, four rows apart; two more fit, three do not
    assert spool.commit_tick("ebs-storage", T2, [make_record("acme", T2), make_record("globex", T2)]).inserted == 2
    with pytest.raises(SpoolFullError, match="holds 4 unsent records; adding 1"):
        spool.commit_tick("ebs-storage", T3, [make_record("acme", T3)])
    assert spool.counts() == {"pending": 4, "leased": 0, "delivered": 2, "dead": 0}


def test_leases_commit_without_fsync_and_acknowledgements_with_it(spool):
    """A lease a crash loses changes nothing (the next start releases leases anyway); an
    acknowledgement a crash loses would send a delivered record again."""
    spool.commit_tick("ebs-storage", T1, [make_record("acme"), make_record("globex")])
    statements: list[str] = []
    spool._db.set_trace_callback(statements.append)
    leased = spool.lease_batch(10, 60)
    assert len(leased) == 2
    lease_statements = statements[:]
    statements.clear()
    spool.settle(delivered=ids(leased))
    spool._db.set_trace_callback(None)
    assert lease_statements[:2] == ["PRAGMA synchronous=NORMAL", "BEGIN IMMEDIATE"]
    assert lease_statements[-2:] == ["COMMIT", "PRAGMA synchronous=FULL"]
    assert statements[0] == "BEGIN IMMEDIATE" and statements[-1] == "COMMIT"
    assert not any(s.startswith("PRAGMA") for s in statements)
    full = 2  # PRAGMA synchronous: FULL
    assert spool._db.execute("PRAGMA synchronous").fetchone()[0] == full
    spool.commit_tick("ebs-storage", T2, [make_record("acme", T2)])
    spool._db.execute("PRAGMA query_only=ON")  # the next lease fails inside its transaction
    with pytest.raises(SpoolError):
        spool.lease_batch(10, 60)
    spool._db.execute("PRAGMA query_only=OFF")
    assert spool._db.execute("PRAGMA synchronous").fetchone()[0] == full


def test_facts_and_metrics_go_where_the_spool_is_told(tmp_path, clock):
    """The spool counts into the Metrics it is given and reports facts; it decides no readiness."""
    metrics = Metrics()
    spool = Spool(tmp_path / "spool.db", max_records=2, clock=clock, metrics=metrics)
    spool.commit_tick("ebs-storage", T1, [make_record("acme"), make_record("globex")])
    clock.advance(30)
    with pytest.raises(SpoolFullError):
        spool.commit_tick("ebs-storage", T2, [make_record("acme", T2)])
    assert spool.facts() == SpoolFacts(path=tmp_path / "spool.db", max_records=2, full=True, write_error=None, unsent=2,
                                       oldest_unsent_age=30.0, disk_low=False, held_outcomes=0)
    assert metrics.value("usage_agent_spool_full") == 1
    spool._db.execute("PRAGMA query_only=ON")
    with pytest.raises(SpoolError):
        spool.lease_batch(10, 60)
    spool._db.execute("PRAGMA query_only=OFF")
    assert metrics.value("usage_agent_spool_write_errors_total") == 1
    assert "readonly" in (spool.facts().write_error or "")
    spool.settle(delivered=ids(spool.lease_batch(10, 60)))
    facts = spool.facts()
    assert (facts.full, facts.write_error, facts.unsent, facts.oldest_unsent_age) == (False, None, 0, None)
    assert metrics.value("usage_agent_spool_full") == 0
    spool.close()


# -- leasing ------------------------------------------------------------------------------


def test_tags_the_fast_json_codec_refuses_are_spooled_and_leased_back_unchanged(spool):
    """msgspec writes UTF-8 as it is but refuses a lone surrogate (a peer's "\\ud800" in a tag):
    such a body is written by json, and read back whichever wrote it."""
    tick = datetime(2024, 1, 1, tzinfo=timezone.utc)
    records = [record("utf8", tick, metadata={"name": "café ☕ 東京"}),
               record("surrogate", tick, metadata={"name": "half \ud800 of a pair"})]
    spool.commit_tick("ebs-storage", tick, records)
    bodies = dict(spool._db.execute("SELECT id, body FROM record_bodies").fetchall())
    assert "café ☕ 東京" in bodies[records[0].record_id]  # written as UTF-8, not \u escapes
    assert "half \\ud800 of a pair" in bodies[records[1].record_id]  # escaped: SQLite keeps valid UTF-8
    lease = spool.lease_batch(10, 60)
    assert [item.record for item in lease] == records and lease.damaged == ()


def test_a_lease_returns_the_rows_it_dead_lettered_as_damaged(spool):
    records = [make_record(c) for c in ("acme", "globex", "initech")]
    spool.commit_tick("ebs-storage", T1, records)
    spool._db.execute("UPDATE record_bodies SET body = '{\"id\": 1}' WHERE id = ?", (records[1].record_id,))
    lease = spool.lease_batch(10, 60)
    assert [item.record for item in lease] == [records[0], records[2]]
    assert lease.damaged == (Dead(records[1].record_id, None, "damaged in spool: KeyError: 'measurement'"),)
    assert spool.counts() == {"pending": 0, "leased": 2, "delivered": 0, "dead": 1}
    assert spool.lease_batch(10, 60).damaged == ()  # dead-lettered once, not at every lease


def test_a_body_nested_too_deep_to_parse_is_dead_lettered_not_a_lease_that_fails_forever(spool):
    records = [make_record(c) for c in ("acme", "globex")]
    spool.commit_tick("ebs-storage", T1, records)
    spool._db.execute("UPDATE record_bodies SET body = ? WHERE id = ?", ("[" * 100_000 + "]" * 100_000, records[0].record_id))
    lease = spool.lease_batch(10, 60)
    assert [item.record for item in lease] == [records[1]]
    assert [d.record_id for d in lease.damaged] == [records[0].record_id]
    assert "RecursionError" in lease.damaged[0].error


def test_outcomes_for_more_records_than_one_statement_binds_all_settle(spool):
    records = [make_record(f"c{n}") for n in range(1300)]
    spool.commit_tick("ebs-storage", T1, records)
    leased = spool.lease_batch(2000, 60)
    spool.settle(delivered=ids(leased)[:1100], dead=[Dead(rid, 400, "bad") for rid in ids(leased)[1100:]])
    assert spool.counts() == {"pending": 0, "leased": 0, "delivered": 1100, "dead": 200}


def test_lease_batch_is_oldest_first_and_respects_the_limit(spool, clock):
    first = [make_record(c, T1) for c in ("acme", "globex", "initech")]
    second = [make_record(c, T2) for c in ("acme", "globex")]
    spool.commit_tick("ebs-storage", T1, first)
    spool.commit_tick("ebs-storage", T2, second)
    expected = [r.record_id for r in first + second]

    batch = spool.lease_batch(2, lease_seconds=60)
    assert ids(batch) == expected[:2]
    assert [item.attempts for item in batch] == [0, 0]
    assert spool.counts()["leased"] == 2
    assert ids(spool.lease_batch(10, lease_seconds=60)) == expected[2:]
    assert spool.lease_batch(10, lease_seconds=60) == []

    clock.advance(59.9)
    assert spool.lease_batch(10, lease_seconds=60) == []
    clock.advance(0.1)  # the leases have expired: a crashed sender's records are sent again
    assert ids(spool.lease_batch(10, lease_seconds=60)) == expected


def test_leased_records_are_the_committed_records(spool):
    records = [make_record("acme", value="0.583333333"), make_record("globex", value="100")]
    spool.commit_tick("ebs-storage", T1, records)
    assert [item.record for item in spool.lease_batch(10, 60)] == records


# -- settling -----------------------------------------------------------------------------


def test_settle_delivered(spool, clock):
    spool.commit_tick("ebs-storage", T1, [make_record("acme"), make_record("globex")])
    acme, globex = ids(spool.lease_batch(10, 60))
    spool.settle(delivered=[acme])
    assert spool.counts() == {"pending": 0, "leased": 1, "delivered": 1, "dead": 0}
    assert spool.rows("delivered")[0]["attempts"] == 1
    clock.advance(3600)
    assert ids(spool.lease_batch(10, 60)) == [globex]


def test_settle_ignores_records_that_are_not_leased(spool):
    spool.commit_tick("ebs-storage", T1, [make_record("acme")])
    spool.settle(delivered=[make_record("acme").record_id])
    assert spool.counts()["pending"] == 1


def test_settle_retry_waits_until_not_before(spool, clock):
    spool.commit_tick("ebs-storage", T1, [make_record("acme")])
    (rid,) = ids(spool.lease_batch(10, 60))
    spool.settle(retries=[Retry(rid, not_before=clock.time() + 30, status=503, error="service unavailable")])

    assert spool.counts()["pending"] == 1
    (row,) = spool.rows("pending")
    assert (row["attempts"], row["last_status"], row["last_error"]) == (1, 503, "service unavailable")
    assert spool.next_due() == clock.time() + 30

    clock.advance(29)
    assert spool.lease_batch(10, 60) == []
    clock.advance(1)
    (again,) = spool.lease_batch(10, 60)
    assert (again.record.record_id, again.attempts) == (rid, 1)


def test_settle_dead_letters_with_status_and_reason(spool, clock):
    record = make_record("acme")
    spool.commit_tick("ebs-storage", T1, [record, make_record("globex")])
    spool.lease_batch(1, 60)
    spool.settle(dead=[Dead(record.record_id, status=400, error='{"message": "unknown dimensionId"}')])

    assert spool.counts() == {"pending": 1, "leased": 0, "delivered": 0, "dead": 1}
    (row,) = spool.rows("dead")
    assert row["id"] == record.record_id
    assert (row["last_status"], row["last_error"], row["attempts"]) == (400, '{"message": "unknown dimensionId"}', 1)
    assert row["body"] == record.to_json()
    clock.advance(3600)
    assert ids(spool.lease_batch(10, 60)) == [make_record("globex").record_id]


# -- ownership ----------------------------------------------------------------------------


def test_only_one_spool_can_claim_a_file(open_spool, tmp_path):
    first, second = open_spool(), open_spool()
    first.claim()
    with pytest.raises(SpoolError, match="in use") as caught:
        second.claim()
    assert str(tmp_path / "spool.db") in str(caught.value)
    first.close()
    second.claim()  # the lock went with the first process


def test_claim_releases_leases_left_by_a_previous_process(open_spool, clock, tmp_path):
    crashed = open_spool()
    crashed.claim()
    crashed.commit_tick("ebs-storage", T1, [make_record("acme"), make_record("globex")])
    assert len(crashed.lease_batch(10, lease_seconds=600)) == 2
    # the file as a process killed now leaves it: leases held, never closed
    with sqlite3.connect(tmp_path / "spool.db") as live, sqlite3.connect(tmp_path / "killed.db") as copy:
        live.backup(copy)

    restarted = open_spool(path=tmp_path / "killed.db")
    assert restarted.counts()["leased"] == 2
    restarted.claim()
    assert restarted.counts() == {"pending": 2, "leased": 0, "delivered": 0, "dead": 0}
    assert len(restarted.lease_batch(10, 600)) == 2  # long before the old leases would expire


def test_close_gives_back_the_leases_nothing_sent(open_spool):
    # a deadline (once --timeout) ends delivery between a lease and its sends: those records are pending again
    spool = open_spool()
    spool.claim()
    spool.commit_tick("ebs-storage", T1, [make_record("acme"), make_record("globex")])
    leased = spool.lease_batch(10, lease_seconds=600)
    spool.settle(delivered=[leased[0].record.record_id])
    spool.close()

    reopened = open_spool()  # not claimed: it reads the file as the last process left it
    assert reopened.counts() == {"pending": 1, "leased": 0, "delivered": 1, "dead": 0}


# -- inspection ---------------------------------------------------------------------------


def test_counts_and_stats(spool, clock, tmp_path):
    empty = spool.stats()
    assert empty["counts"] == {"pending": 0, "leased": 0, "delivered": 0, "dead": 0}
    assert empty["oldest_unsent_age_seconds"] is None

    records = [make_record(c) for c in ("acme", "globex", "initech", "umbrella")]
    spool.commit_tick("ebs-storage", T1, records)
    clock.advance(12.5)
    spool.lease_batch(3, 60)
    spool.settle(delivered=[records[0].record_id], dead=[Dead(records[1].record_id, 422, "rejected")])

    counts = {"pending": 1, "leased": 1, "delivered": 1, "dead": 1}
    assert spool.counts() == counts
    stats = spool.stats()
    assert stats["path"] == str(tmp_path / "spool.db")
    assert stats["counts"] == counts
    assert stats["oldest_unsent_age_seconds"] == 12.5
    assert stats["file_bytes"] > 0


def test_next_due(spool, clock):
    assert spool.next_due() is None
    spool.commit_tick("ebs-storage", T1, [make_record("acme")])
    assert spool.next_due() == 0  # pending and never retried: due now
    (rid,) = ids(spool.lease_batch(10, 60))
    assert spool.next_due() == START + 60  # a leased record is due again when its lease ends
    spool.settle(retries=[Retry(rid, not_before=START + 90, status=None, error="timeout")])
    assert spool.next_due() == START + 90


# -- durability and the file ----------------------------------------------------------------


def test_records_survive_close_and_reopen(open_spool):
    records = [make_record("acme", T1, "1.75"), make_record("globex", T1, "123456789012345678901.000000001")]
    before = open_spool()
    before.commit_tick("ebs-storage", T1, records)
    counts, bodies = before.counts(), before.rows("pending")
    before.close()

    after = open_spool()
    assert after.counts() == counts
    assert after.rows("pending") == bodies
    assert after.last_tick("ebs-storage") == format_timestamp(T1)
    assert [item.record for item in after.lease_batch(10, 60)] == records


def test_a_corrupt_file_is_a_clear_error_and_left_untouched(tmp_path, clock):
    path = tmp_path / "spool.db"
    garbage = random.Random(1234).randbytes(8192)
    path.write_bytes(garbage)
    with pytest.raises(SpoolError) as caught:
        Spool(path, clock=clock)
    assert str(path) in str(caught.value)
    assert "usage-agent spool salvage" in str(caught.value)
    assert path.read_bytes() == garbage


def test_a_newer_schema_is_refused(tmp_path, clock):
    path = tmp_path / "spool.db"
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version=99")
    db.close()
    with pytest.raises(SpoolError, match="schema version 99") as caught:
        Spool(path, clock=clock)
    assert str(path) in str(caught.value)


def test_wal_mode_and_full_sync(spool, tmp_path):
    spool.commit_tick("ebs-storage", T1, [make_record("acme")])
    other = sqlite3.connect(tmp_path / "spool.db")
    try:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        other.close()
    assert spool._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
