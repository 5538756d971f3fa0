"""A model-based (stateful Hypothesis) test of the durable spool.

A real ``Spool`` on a file in a temp dir, driven by a fake clock, is run side by side with a
plain Python model of every record (state, attempts, not_before, lease_until, timestamps, last
outcome, body) and of the sampler state per measurement. After every step the two must agree.

SPOOL_MODEL_EXAMPLES=N runs N test cases instead of 60 (about 3 s).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from agent.records import UsageRecord, format_timestamp
from agent.errors import SpoolFullError
from agent.spool import STATES, Dead, Retry, Spool
from tests.support import FakeClock
from tests.support import make_record as record

UTC = timezone.utc
START = 1_700_000_000.0
MEASUREMENTS = ("ebs-storage", "ebs-iops")
CUSTOMERS = ("acme", "globex", "initech", "umbrella")
TICKS = tuple(datetime(2024, 3, 1, 10, 0, tzinfo=UTC) + timedelta(hours=h) for h in range(3))
VALUES = ("1.75", "0", "100", "0.583333333", "123456789012345678901.000000001")
STATUSES = (None, 400, 422, 429, 500, 503)
DAMAGED = "damaged in spool: "  # last_error prefix of a record dead-lettered because its body is unreadable

# Durations mostly from a few round values so that boundaries (lease_until == now,
# not_before == now, updated_at == before) are hit often; some arbitrary ones for good measure.
SECONDS = st.sampled_from([0.0, 1.0, 5.0, 30.0, 60.0]) | st.integers(0, 120).map(float) | st.just(0.5)
# A 0 s lease has lease_until == now: it is expired at once, by the very next lease_batch.
LEASE_SECONDS = st.sampled_from([0.0, 1.0, 5.0, 30.0, 60.0]) | st.just(0.5)
# Retry delays; a retry time already in the past (a backoff computed on another clock) is due at once.
DELAYS = SECONDS | st.just(-5.0)


make_record = lambda measurement, customer, tick, value: record(  # noqa: E731
    customer, tick, value, measurement=measurement, dimension=f"dim-{measurement}", unit="GiB-hours",
    metadata={"environment": "prod", "customer": customer})


# One sampler tick: 0-5 records of one measurement (same customer twice in a tick happens too).
TICK = {
    "measurement": st.sampled_from(MEASUREMENTS),
    "tick": st.sampled_from(TICKS),
    "picks": st.lists(st.tuples(st.sampled_from(CUSTOMERS), st.sampled_from(VALUES)), max_size=5),
    "with_state": st.booleans(),
}

# Every id the machine can ever produce: 2 measurements x 4 customers x 3 ticks = 24.
ID_POOL = sorted(make_record(m, c, t, "0").record_id for m in MEASUREMENTS for c in CUSTOMERS for t in TICKS)


@dataclass
class ModelRecord:
    seq: int  # insertion order (the spool's seq may be reused after a purge; the order is what counts)
    record: UsageRecord
    measurement: str
    tick: str
    state: str = "pending"
    attempts: int = 0
    not_before: float = 0.0
    lease_until: float | None = None
    created_at: float = 0.0
    updated_at: float = 0.0
    last_status: int | None = None
    last_error: str | None = None
    garbled: tuple[bytes, Any] | None = None  # (raw body written over the row, what rows() must show)


class SpoolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="spool-model-"))
        self.path = self.dir / "spool.db"
        self.clock = FakeClock(START)
        self.spool: Spool | None = None
        self.max_records = 0
        # the model
        self.records: dict[str, ModelRecord] = {}
        self.sampler: dict[str, tuple[str, Any]] = {}  # measurement -> (last_tick, state json value)
        self.next_seq = 0
        self.state_counter = 0
        self.purged: set[str] = set()  # ids removed by purge_delivered (and not re-spooled since)
        # what the spool itself held after the previous step (id -> state), independent of the model
        self.seen: dict[str, str] = {}
        self.purge_ran = False

    # -- setup / teardown -----------------------------------------------------------------

    @initialize(
        max_records=st.integers(2, 12),
        first_ticks=st.lists(st.fixed_dictionaries(TICK), min_size=1, max_size=3),
    )
    def open_spool(self, max_records: int, first_ticks: list[dict[str, Any]]) -> None:
        self.max_records = max_records
        self.spool = Spool(self.path, max_records=max_records, clock=self.clock)
        self.spool.claim()
        # Hypothesis switches random subsets of rules off per test case (swarm testing); seeding a
        # few ticks here keeps the cases where enqueue_tick is off from running on an empty spool.
        for tick in first_ticks:
            self._commit_tick(**tick)

    def teardown(self) -> None:
        try:
            if self.spool is not None:
                self.spool.close()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    # -- model helpers --------------------------------------------------------------------

    def ids_in(self, state: str) -> list[str]:
        found = [(r.seq, rid) for rid, r in self.records.items() if r.state == state]
        return [rid for _, rid in sorted(found)]

    def unsent(self) -> int:
        return sum(1 for r in self.records.values() if r.state in ("pending", "leased"))

    # -- sampling side --------------------------------------------------------------------

    @rule(**TICK)
    def enqueue_tick(self, measurement: str, tick: datetime, picks: list[tuple[str, str]], with_state: bool) -> None:
        self._commit_tick(measurement, tick, picks, with_state)

    def _commit_tick(self, measurement: str, tick: datetime, picks: list[tuple[str, str]], with_state: bool) -> None:
        records = [make_record(measurement, customer, tick, value) for customer, value in picks]
        tick_text = format_timestamp(tick)
        self.state_counter += 1
        state = {"tick": tick_text, "n": self.state_counter} if with_state else None

        # model: INSERT OR IGNORE, first occurrence of an id wins (also within one tick)
        new: dict[str, UsageRecord] = {}
        for r in records:
            if r.record_id not in self.records and r.record_id not in new:
                new[r.record_id] = r
        previous = self.sampler.get(measurement, (None, None))[0]

        if self.unsent() + len(new) > self.max_records:
            with pytest.raises(SpoolFullError):
                self.spool.commit_tick(measurement, tick, records, state)
            event("commit_tick refused: spool full")
            return  # refused: records and sampler state unchanged (the invariants check it)

        commit = self.spool.commit_tick(measurement, tick, records, state)
        assert commit.inserted == len(new)
        if len(new) < len(records):
            event("commit_tick re-spooled an existing id")
        assert commit.previous_tick == previous

        now = self.clock.time()
        for rid, r in new.items():
            self.records[rid] = ModelRecord(
                seq=self.next_seq, record=r, measurement=measurement, tick=tick_text, created_at=now, updated_at=now
            )
            self.next_seq += 1
            self.purged.discard(rid)
        state_value = state or {}
        if previous is None:
            self.sampler[measurement] = (tick_text, state_value)
        else:
            old_tick, old_state = self.sampler[measurement]
            self.sampler[measurement] = (
                max(old_tick, tick_text),
                state_value if tick_text >= old_tick else old_state,
            )

    # -- forwarding side ------------------------------------------------------------------

    @rule(limit=st.integers(1, 10), lease_seconds=LEASE_SECONDS)
    def lease(self, limit: int, lease_seconds: float) -> None:
        now = self.clock.time()
        got = self.spool.lease_batch(limit, lease_seconds)

        for r in self.records.values():  # expired leases first go back to pending
            if r.state == "leased" and r.lease_until <= now:
                if r.lease_until == now:
                    event("lease_batch at the exact moment a lease expired")
                r.state, r.lease_until = "pending", None
        due = [rid for rid in self.ids_in("pending") if self.records[rid].not_before <= now][:limit]
        expected = []
        for rid in due:
            r = self.records[rid]
            if r.garbled is not None:  # takes its place in the batch, then is dead-lettered, not sent
                r.state, r.updated_at, r.last_error = "dead", now, DAMAGED
                r.last_status = None  # no backend answered: a stale 503 must not make `replay --status 503` pick it
                event("lease_batch dead-lettered a damaged record")
                continue
            expected.append((r.record, r.attempts))
            r.state, r.lease_until, r.updated_at = "leased", now + lease_seconds, now

        assert [(item.record, item.attempts) for item in got] == expected
        if any(attempts for _, attempts in expected):
            event("lease_batch re-leased a record sent before")

    def _settle_targets(self, data: st.DataObject, label: str) -> list[str]:
        """A subset of the leased ids, sometimes with ids that are not leased (settle must ignore them)."""
        leased = self.ids_in("leased")
        chosen = data.draw(st.lists(st.sampled_from(leased), min_size=1, unique=True), label=label) if leased else []
        others = [rid for rid in self.records if rid not in leased] + ID_POOL  # spooled but not leased, or unknown
        strays = data.draw(st.lists(st.sampled_from(others), max_size=2), label=f"{label} (not leased)")
        return data.draw(st.permutations(chosen + strays), label=f"{label} order")

    def _settle_one(self, rid: str, new_state: str, now: float, **fields: Any) -> None:
        r = self.records.get(rid)
        if r is None or r.state != "leased":
            return  # settle only touches leased records
        r.state, r.lease_until, r.updated_at = new_state, None, now
        r.attempts += 1
        for name, value in fields.items():
            setattr(r, name, value)

    @precondition(lambda self: self.ids_in("leased"))
    @rule(data=st.data())
    def ack(self, data: st.DataObject) -> None:
        targets = self._settle_targets(data, "delivered")
        now = self.clock.time()
        self.spool.settle(delivered=targets)
        for rid in targets:
            self._settle_one(rid, "delivered", now, last_status=None, last_error=None)

    @precondition(lambda self: self.ids_in("leased"))
    @rule(data=st.data())
    def nack(self, data: st.DataObject) -> None:
        targets = self._settle_targets(data, "retry")
        now = self.clock.time()
        retries = [
            Retry(
                rid,
                not_before=now + data.draw(DELAYS, label="delay"),
                status=data.draw(st.sampled_from(STATUSES), label="status"),
                error=data.draw(st.sampled_from(["timeout", "service unavailable", ""]), label="error"),
            )
            for rid in targets
        ]
        self.spool.settle(retries=retries)
        for r in retries:
            self._settle_one(
                r.record_id, "pending", now, not_before=r.not_before, last_status=r.status, last_error=r.error
            )

    @precondition(lambda self: self.ids_in("leased"))
    @rule(data=st.data())
    def dead_letter(self, data: st.DataObject) -> None:
        targets = self._settle_targets(data, "dead")
        now = self.clock.time()
        dead = [
            Dead(
                rid,
                status=data.draw(st.sampled_from(STATUSES), label="status"),
                error=data.draw(st.sampled_from(['{"message": "unknown dimensionId"}', "rejected", ""]), label="body"),
            )
            for rid in targets
        ]
        self.spool.settle(dead=dead)
        for d in dead:
            self._settle_one(d.record_id, "dead", now, last_status=d.status, last_error=d.error)

    @precondition(lambda self: self.ids_in("leased"))
    @rule(data=st.data())
    def settle_mixed(self, data: st.DataObject) -> None:
        """One settle call with all three outcomes; an id may appear in several lists (first list wins)."""
        now = self.clock.time()
        delivered = self._settle_targets(data, "delivered")
        retry_ids = self._settle_targets(data, "retry")
        dead_ids = self._settle_targets(data, "dead")
        retries = [Retry(rid, now + data.draw(DELAYS, label="delay"), 503, "busy") for rid in retry_ids]
        dead = [Dead(rid, 400, "bad") for rid in dead_ids]
        self.spool.settle(delivered=delivered, retries=retries, dead=dead)
        for rid in delivered:
            self._settle_one(rid, "delivered", now, last_status=None, last_error=None)
        for r in retries:
            self._settle_one(r.record_id, "pending", now, not_before=r.not_before, last_status=503, last_error="busy")
        for d in dead:
            self._settle_one(d.record_id, "dead", now, last_status=400, last_error="bad")

    # -- time, crashes, repair ------------------------------------------------------------

    @rule(seconds=SECONDS, to_next_due=st.booleans())
    def advance_clock(self, seconds: float, to_next_due: bool) -> None:
        """Move the clock on by ``seconds``, or exactly onto the next lease expiry / retry time
        (the boundary where ``lease_until <= now`` and ``not_before <= now`` matter)."""
        due = [r.not_before for r in self.records.values() if r.state == "pending"]
        due += [r.lease_until for r in self.records.values() if r.state == "leased"]
        future = [t for t in due if t > self.clock.time()]
        if to_next_due and future:
            self.clock.advance_to(min(future))
        else:
            self.clock.advance(seconds)

    @precondition(lambda self: self.ids_in("leased"))  # the interesting crash: leases left behind
    @rule()
    def crash_and_reopen(self) -> None:
        self.spool.close()  # no settle: the leases are left behind, as by a killed process
        self.spool = Spool(self.path, max_records=self.max_records, clock=self.clock)
        self.spool.claim()
        for r in self.records.values():
            if r.state == "leased":  # claim() does not touch updated_at
                r.state, r.lease_until = "pending", None

    @precondition(lambda self: self.ids_in("dead"))
    @rule(data=st.data())
    def replay(self, data: st.DataObject) -> None:
        dead_ids = self.ids_in("dead")
        ids = data.draw(st.lists(st.sampled_from(dead_ids + ID_POOL), max_size=3), label="ids (empty: all)")
        status = data.draw(st.sampled_from(STATUSES), label="status filter")
        now = self.clock.time()
        replayed = self.spool.replay(ids, status)
        expected = 0
        for rid in dead_ids:
            r = self.records[rid]
            if (not ids or rid in ids) and (status is None or r.last_status == status):
                if r.not_before:
                    event("replay of a record that had a retry time")
                r.state, r.not_before, r.updated_at = "pending", 0.0, now
                expected += 1
        assert replayed == expected
        if expected:
            event("replay moved dead records back")

    @precondition(lambda self: self.ids_in("delivered"))
    @rule(data=st.data())
    def purge_delivered(self, data: st.DataObject) -> None:
        delivered_at = sorted({r.updated_at for r in self.records.values() if r.state == "delivered"})
        before = data.draw(
            st.sampled_from(delivered_at)  # exactly on a delivery time: that one must stay
            | st.integers(-150, 150).map(lambda offset: self.clock.time() + offset),
            label="before",
        )
        purged = self.spool.purge_delivered(before)
        self.purge_ran = True
        gone = [rid for rid, r in self.records.items() if r.state == "delivered" and r.updated_at < before]
        for rid in gone:
            del self.records[rid]
        self.purged.update(gone)
        assert purged == len(gone)
        if gone:
            event("purge_delivered deleted records")

    # -- a row garbled on disk ----------------------------------------------------------

    GARBAGE = st.sampled_from(["not json", "truncated", "other id", "missing fields", "not utf-8"])

    def _garble(self, rid: str, kind: str) -> None:
        """Overwrite a row's body behind the spool's back, as a bad disk sector would."""
        body = self.records[rid].record.to_json()
        others = [r.record.to_json() for other_id, r in self.records.items() if other_id != rid]
        other = others[0] if others else dict(body, id="0" * 32)
        raw, shown = {
            "not json": (b"not json", "not json"),
            "truncated": (json.dumps(body).encode()[:25], json.dumps(body)[:25]),
            "other id": (json.dumps(other).encode(), other),  # valid, but some other record's body
            "missing fields": (json.dumps({"id": rid}).encode(), {"id": rid}),
            "not utf-8": (b'{"id":"\xff\xfe', '{"id":"\ufffd\ufffd'),
        }[kind]
        self.spool._db.execute("UPDATE record_bodies SET body = ? WHERE id = ?", (raw, rid))
        self.records[rid].garbled = (raw, shown)

    @precondition(lambda self: [r for r in self.records.values() if r.garbled is None])
    @rule(data=st.data(), kind=GARBAGE)
    def garble_body(self, data: st.DataObject, kind: str) -> None:
        """Any row, in any state: a leased one may still be nacked (with a status) before it is
        leased again and found damaged; its dead-letter must then not keep that status."""
        candidates = [rid for rid, r in self.records.items() if r.garbled is None]
        self._garble(data.draw(st.sampled_from(candidates), label="record"), kind)

    # -- invariants -----------------------------------------------------------------------

    @invariant()
    def counts_match(self) -> None:
        expected = {state: len(self.ids_in(state)) for state in STATES}
        assert self.spool.counts() == expected

    @invariant()
    def ids_per_state_match_in_seq_order(self) -> None:
        for state in STATES:
            rows = self.spool.rows(state, limit=10**6)
            assert [row["id"] for row in rows] == self.ids_in(state), state
            for row in rows:
                r = self.records[row["id"]]
                assert row["measurement"] == r.measurement
                assert row["tick"] == r.tick
                assert row["attempts"] == r.attempts
                assert row["last_status"] == r.last_status
                if r.last_error == DAMAGED:
                    assert row["last_error"].startswith(DAMAGED), row["last_error"]
                else:
                    assert row["last_error"] == r.last_error
                if r.garbled is None:
                    assert row["body"] == r.record.to_json()  # the first spooled body wins
                else:
                    assert row["body"] == r.garbled[1]

    @invariant()
    def timestamps_match(self) -> None:
        """not_before, lease_until, created_at, updated_at per record (not exposed by rows())."""
        got = {
            rid: (not_before, lease_until, created_at, updated_at)
            for rid, not_before, lease_until, created_at, updated_at in self.spool._db.execute(
                "SELECT id, not_before, lease_until, created_at, updated_at FROM records"
            )
        }
        expected = {
            rid: (r.not_before, r.lease_until, r.created_at, r.updated_at) for rid, r in self.records.items()
        }
        assert got == expected

    @invariant()
    def next_due_matches(self) -> None:
        due = [r.not_before for r in self.records.values() if r.state == "pending"]
        due += [r.lease_until for r in self.records.values() if r.state == "leased"]
        assert self.spool.next_due() == (min(due) if due else None)

    @invariant()
    def nothing_disappears_except_purged_deliveries(self) -> None:
        """Checked against the spool's own previous contents, not only against the model."""
        present = {row["id"]: state for state in STATES for row in self.spool.rows(state, limit=10**6)}
        for rid, state in self.seen.items():
            if rid not in present:
                assert self.purge_ran and state == "delivered", f"{rid} ({state}) vanished"
        assert set(present) == set(self.records)
        assert not (set(present) & self.purged)
        self.seen, self.purge_ran = present, False

    @invariant()
    def sampler_state_matches(self) -> None:
        for measurement in MEASUREMENTS:
            last_tick, state = self.sampler.get(measurement, (None, None))
            assert self.spool.last_tick(measurement) == last_tick
            row = self.spool._db.execute(
                "SELECT state FROM sampler_state WHERE measurement = ?", (measurement,)
            ).fetchone()
            assert (json.loads(row[0]) if row else None) == state


SpoolMachine.TestCase.settings = settings(
    # ~3 s with the defaults; SPOOL_MODEL_EXAMPLES=1000 for a deeper run
    max_examples=int(os.environ.get("SPOOL_MODEL_EXAMPLES", "60")),
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestSpoolModel = SpoolMachine.TestCase
