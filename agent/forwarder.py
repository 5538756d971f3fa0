"""Lease -> deliver (``agent.delivery``) -> settle. Records leave the spool only as delivered (2xx) or dead (rejected).

Retryable failures (timeouts, connection errors, 408/429/5xx, refused credentials) go back
to pending with a capped exponential backoff with jitter, or the backend's Retry-After.
There is no retry limit: a record stays pending until the backend takes it or rejects it.
With an audit copy, each delivered record is appended to it before its outcome is written
to the spool: a crash in between writes the line again (same id) rather than not at all.
A record still pending when its time T is further back than the backend's deduplication
window is logged once (and counted): if an earlier send of it reached the backend, the
next one would be counted again.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

import httpx
import structlog

from agent.clock import Clock, SystemClock
from agent.records import UsageRecord, format_timestamp
from agent.delivery import Delivery
from agent.errors import AuditError, SpoolError
from agent.metrics import Metrics
from agent.sinks.base import Delivered, Outcome, Rejected, RetryLater, Sink
from agent.sinks.file import AuditLog
from agent.spool import Dead, Retry, Spool
from agent.telemetry import Check

log = structlog.get_logger("agent.forwarder")

MAX_PAUSE = 60.0  # a paused forwarder (spool or audit copy not writable) tries again at least this often
# records leased per request slot when each request carries one: a lease is a pause with nothing in
# flight, so it comes once per 64 rounds of requests, not 16
SETTLE_ROUNDS = 64
WARNED_MAX = 100_000  # record ids remembered as logged past the dedup window; then forgotten, and logged again


@dataclass
class Pumped:
    leased: int = 0
    delivered: int = 0
    retried: int = 0
    dead: int = 0

    def add(self, other: Pumped) -> None:
        self.leased += other.leased
        self.delivered += other.delivered
        self.retried += other.retried
        self.dead += other.dead


class Forwarder:
    def __init__(
        self,
        spool: Spool,
        sink: Sink,
        client: httpx.Client | None = None,
        *,
        metrics: Metrics | None = None,
        clock: Clock | None = None,
        batch_size: int | None = None,
        settle_every: int = 16,
        lease_seconds: float = 900.0,
        base_backoff: float = 1.0,
        max_backoff: float = 300.0,
        rng: random.Random | None = None,
        audit: AuditLog | None = None,
    ):
        self._spool = spool
        self._metrics = metrics or Metrics()
        self._clock = clock or SystemClock()
        self._delivery = Delivery(sink, client, self._metrics, self._clock)
        self._dedup_window = sink.dedup_window
        self._refuse = sink.refuse
        self._past_window: set[str] = set()  # ids already logged as pending past the dedup window
        # one-record requests: several per request slot in a lease, their outcomes settled as they arrive
        per_slot = sink.max_batch if sink.max_batch > 1 else SETTLE_ROUNDS
        self._batch_size = batch_size or per_slot * sink.max_in_flight
        self._settle_every = settle_every
        self._lease_seconds = lease_seconds
        self._base_backoff = base_backoff
        self._max_backoff = max_backoff
        self._rng = rng or random.Random()
        self.stopping = threading.Event()
        self._attempts: dict[str, int] = {}  # leased record id -> sends tried before this lease
        self._unwritten: list[tuple[UsageRecord, Outcome]] = []
        self._audit = audit
        self._audited: set[str] = set()  # in the audit copy, outcome not yet in the spool
        self._waits: dict[tuple[RetryLater, int], float] = {}  # this pump's backoffs
        self._alerting: tuple[float, str] | None = None  # since when, and why, no send got past an alert
        self.paused_until: float | None = None  # delivery paused (a write failed) until then
        self._pauses = 0  # failed attempts in a row: the pause doubles with each, up to MAX_PAUSE

    def backoff(self, attempts: int) -> float:
        """Exponential in the attempts made, capped, with the upper half jittered."""
        ceiling = min(self._max_backoff, self._base_backoff * 2 ** min(attempts, 32))
        return ceiling / 2 + self._rng.uniform(0, ceiling / 2)

    def _wait(self, outcome: RetryLater, attempts: int) -> float:
        """Records that failed alike in one pump (a batch) wait alike, so they go out together again."""
        key = (outcome, attempts)
        if key not in self._waits:
            self._waits[key] = self.backoff(attempts)
        return self._waits[key]

    def pump(self) -> Pumped:
        """One batch: lease what is due, send it, settle outcomes as they arrive.

        Outcomes are written in groups of ``settle_every`` while the rest of the batch is
        still in flight, so a crash re-sends only what was in flight or not yet written.
        """
        result = Pumped()
        self._waits.clear()
        if self._unwritten:  # outcomes a failed spool write could not record: record them first
            self._settle([], result)
        leased = self._spool.lease_batch(self._batch_size, self._lease_seconds)
        # rows dead-lettered as damaged count as taken and dead: a batch of only those does not end a drain
        self._metrics.records_dead.inc(len(leased.damaged))
        result.dead += len(leased.damaged)
        result.leased = len(leased) + len(leased.damaged)
        if not leased:
            return result
        self._attempts.update({item.record.record_id: item.attempts for item in leased})
        self._warn_past_dedup_window([item.record for item in leased])
        settled: list[tuple[UsageRecord, Outcome]] = []
        try:
            for record, outcome in self._delivery.deliver([item.record for item in leased], self.stopping):
                self._watch(outcome)
                settled.append((record, outcome))
                if len(settled) >= self._settle_every:
                    group, settled = settled, []
                    self._settle(group, result)
        finally:  # whatever interrupted delivery, the outcomes known are written: those records are not sent again
            if settled:
                self._settle(settled, result)
        return result

    def _warn_past_dedup_window(self, records: list[UsageRecord]) -> None:
        """Log (once per record) each record whose T is older than the backend deduplicates for
        (not one the sink refuses to send for its age: that one is dead-lettered unsent)."""
        if self._dedup_window is None:
            return
        now = self._clock.now()
        oldest = now - self._dedup_window
        for record in records:
            if (record.timestamp < oldest and record.record_id not in self._past_window
                    and self._refuse(record, now) is None):
                if len(self._past_window) >= WARNED_MAX:
                    self._past_window.clear()
                self._past_window.add(record.record_id)
                self._metrics.records_past_dedup_window.inc()
                log.warning("record pending past the backend's deduplication window: if an earlier send of it "
                            "reached the backend, a re-send is no longer deduplicated and is counted again",
                            record_id=record.record_id, measurement=record.measurement,
                            timestamp=format_timestamp(record.timestamp),
                            dedup_window_seconds=self._dedup_window.total_seconds())

    def _watch(self, outcome: Outcome) -> None:
        """Track an alert (a configuration problem: redirect, refused credentials) until a record gets through."""
        if isinstance(outcome, RetryLater) and outcome.alert:
            if self._alerting is None:
                self._alerting = (self._clock.time(), outcome.reason)
        elif isinstance(outcome, Delivered) or (isinstance(outcome, Rejected) and outcome.status is not None):
            self._alerting = None  # the backend judged a record: the configuration works

    def delivery_check(self, alert_after: float) -> Check:
        """Readiness: not ready once an alert has held every send back for longer than ``alert_after``."""
        if self._alerting is None:
            return Check("delivery", True, "no configuration problem seen since the last delivery")
        since, reason = self._alerting
        age = self._clock.time() - since
        return Check("delivery", age <= alert_after,
                     f"for {age:.0f}s (spool.alert_after={alert_after:.0f}s): {reason}")

    def _settle(self, done: list[tuple[UsageRecord, Outcome]], result: Pumped) -> None:
        """Write outcomes; if the spool (or the audit copy) cannot take the write (disk full),
        keep them in memory and write them before anything else is sent, so an accepted record
        is not sent again."""
        done = self._unwritten + done
        self._unwritten = []
        if not done:
            return
        now = self._clock.time()
        delivered: list[str] = []
        retries: list[Retry] = []
        dead: list[Dead] = []
        first_retry: RetryLater | None = None
        for record, outcome in done:
            rid = record.record_id
            if isinstance(outcome, Delivered):
                delivered.append(rid)
            elif isinstance(outcome, Rejected):
                dead.append(Dead(rid, outcome.status, outcome.body))
                log.error("record dead-lettered", record_id=rid, measurement=record.measurement,
                          status=outcome.status, response=outcome.body[:500])
            else:
                wait = outcome.retry_after if outcome.retry_after is not None else self._wait(outcome, self._attempts[rid])
                retries.append(Retry(rid, now + wait, outcome.status, outcome.reason))
                first_retry = first_retry or outcome
        self._write_audit([r for r, o in done if isinstance(o, Delivered) and r.record_id not in self._audited], now, done)
        try:
            self._spool.settle(delivered, retries, dead)
        except SpoolError:
            self._unwritten = done
            raise
        self._audited.clear()
        for record, _ in done:
            self._attempts.pop(record.record_id, None)
        self._metrics.records_delivered.inc(len(delivered))
        self._metrics.records_dead.inc(len(dead))
        result.delivered += len(delivered)
        result.retried += len(retries)
        result.dead += len(dead)
        if first_retry is not None:
            level = log.error if first_retry.alert else log.warning
            level("delivery will be retried", records=len(retries), reason=first_retry.reason,
                  status=first_retry.status, alert=first_retry.alert)

    def _write_audit(self, records: list[UsageRecord], now: float, done: list[tuple[UsageRecord, Outcome]]) -> None:
        if self._audit is None or not records:
            return
        try:
            self._audit.append(records, datetime.fromtimestamp(now, timezone.utc))
        except OSError as exc:
            self._unwritten = done
            self._metrics.audit_write_errors.inc()
            raise AuditError(f"cannot write the audit copy {self._audit.path}: {exc.strerror or exc}") from exc
        self._audited.update(r.record_id for r in records)

    def drain(self) -> Pumped:
        """Send until nothing is due (or stop is requested); the daemon's forwarder job.

        While paused (the spool or the audit copy could not be written), it returns at once
        until the pause ends; each failure doubles the pause, up to ``MAX_PAUSE``.
        """
        total = Pumped()
        if self.paused_until is not None and self._clock.time() < self.paused_until:
            return total
        while not self.stopping.is_set():
            try:
                step = self.pump()
            except (SpoolError, AuditError) as exc:
                self._pause(exc)
                break
            self.paused_until, self._pauses = None, 0
            total.add(step)
            if step.leased == 0 or step.delivered + step.dead == 0:
                break  # nothing due, or the backend is failing: wait for the next run
        if total.leased:
            self._spool.checkpoint()  # outcomes into the main file: a lost -wal would re-send them
            log.info("forwarded", delivered=total.delivered, retried=total.retried, dead=total.dead)
        return total

    def _pause(self, exc: SpoolError | AuditError) -> None:
        wait = min(MAX_PAUSE, self._base_backoff * 2 ** min(self._pauses, 32))
        self._pauses += 1
        self.paused_until = self._clock.time() + wait
        what = "audit copy" if isinstance(exc, AuditError) else "spool"
        log.error(f"{what} unavailable; delivery paused until it can be written again",
                  error=str(exc), outcomes_held=len(self._unwritten), retry_in_seconds=round(wait, 3))

    def drain_until(self, deadline: float, sleep: Callable[[float], None] | None = None) -> Pumped:
        """Send, waiting out backoffs (and pauses), until the spool holds nothing pending or ``deadline`` passes.

        At the deadline the forwarder stops for good (``stopping``): sends not started are
        not made, and those in flight end within their own total deadline.
        """
        total = Pumped()
        sleep = sleep or self._clock.sleep
        timer = threading.Timer(max(0.0, deadline - self._clock.time()), self.stopping.set)
        timer.daemon = True
        timer.start()
        try:
            while not self.stopping.is_set():
                total.add(self.drain())
                due = self._spool.next_due()
                if due is not None and self.paused_until is not None:
                    due = max(due, self.paused_until)
                now = self._clock.time()
                if due is None or due > deadline or now >= deadline:
                    return total
                sleep(max(0.0, due - now))
            return total
        finally:
            timer.cancel()
