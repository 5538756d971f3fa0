"""Composition root and scheduler wiring.

``Agent`` samples one measurement for one tick (every region, through the assumed-role
session), converts, and commits the records with the sampler state. ``run_daemon`` puts
one APScheduler job per measurement on aligned ticks and the forwarder on its own job.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import structlog
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.base import STATE_STOPPED
from apscheduler.schedulers.blocking import BlockingScheduler
from apscheduler.triggers.interval import IntervalTrigger
from botocore.exceptions import BotoCoreError, ClientError

from agent.config import AgentConfig, Measurement
from agent.convert import UsageRecord, convert, format_timestamp, parse_timestamp, tick_floor
from agent.credentials import SessionFactory, describe_aws_error, utc_now
from agent.errors import AssumeRoleError, SamplingError, SpoolError, SpoolFullError
from agent.forwarder import Forwarder
from agent.samplers import REGISTRY, Sample, Skipped, Target
from agent.sinks.base import Sink
from agent.spool import Spool
from agent.telemetry import OLDEST_UNSENT_AGE, RECORDS_SPOOLED, RESOURCES_SKIPPED, TICKS_FAILED, TICKS_MISSED

log = structlog.get_logger("agent.runtime")

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


@dataclass
class TickResult:
    measurement: str
    tick: datetime
    sampled: int = 0
    records: list[UsageRecord] = field(default_factory=list)
    inserted: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class Agent:
    def __init__(self, cfg: AgentConfig, sessions: SessionFactory, spool: Spool | None = None):
        self.cfg = cfg
        self.sessions = sessions
        self.spool = spool
        self._reported: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def _samples(self, m: Measurement, tick: datetime) -> tuple[list[Sample], list[Skipped]]:
        spec = REGISTRY[m.resource_type]
        samples: list[Sample] = []
        skipped: list[Skipped] = []
        account = self.sessions.account_id(m.iam_role_arn, m.external_id)
        for region in m.regions:
            try:
                def clients(service: str, region: str = region) -> Any:
                    return self.sessions.client(service, region, m.iam_role_arn, m.external_id)

                for item in spec.sample(clients, Target(m, account, region, tick)):
                    (skipped if isinstance(item, Skipped) else samples).append(item)
            except (ClientError, BotoCoreError) as exc:
                raise SamplingError(f"{m.resource_type} in {account}/{region}: {describe_aws_error(exc)}") from exc
        return samples, skipped

    def _first_time(self, m: Measurement, resources: list[str]) -> list[str]:
        """The resources not yet reported for this measurement: each is logged once, not every tick."""
        with self._lock:
            fresh = [r for r in resources if (m.name, r) not in self._reported]
            self._reported.update((m.name, r) for r in fresh)
        return fresh

    def collect(self, m: Measurement, at: datetime) -> TickResult:
        """Sample and convert one measurement for the tick containing ``at``; writes nothing."""
        tick = tick_floor(at, m.interval_seconds)
        result = TickResult(m.name, tick)
        bound = log.bind(measurement=m.name, tick=format_timestamp(tick), account=m.account_id, regions=m.regions)
        try:
            samples, skipped = self._samples(m, tick)
        except SamplingError as exc:
            result.error = str(exc)
            reason = "assume_role" if isinstance(exc, AssumeRoleError) else "aws"
            TICKS_FAILED.labels(m.name, reason).inc()
            bound.error("sampling failed; no records for this tick", error=result.error)
            return result
        spec = REGISTRY[m.resource_type]
        metric = m.metric or spec.default_metric
        conversion = convert(m, metric, spec.metrics[metric].unit, samples, tick)
        result.sampled = conversion.sampled
        result.records = conversion.records
        reasons = {s.resource_id: s.reason for s in skipped}
        for resource in self._first_time(m, list(reasons)):
            bound.warning("resource skipped", resource_id=resource, reason=reasons[resource])
        for resource in self._first_time(m, conversion.untagged):
            bound.warning("resource has no customer tag; skipped", resource_id=resource, tag=m.customer.tag)
        invalid = dict(conversion.invalid_customer)
        for resource in self._first_time(m, list(invalid)):
            bound.warning("resource skipped: its customer tag is not a usable customer id",
                          resource_id=resource, tag=m.customer.tag, value=invalid[resource][:300])
        for reason, count in (("unreadable", len(skipped)), ("untagged", len(conversion.untagged)),
                              ("invalid_customer", len(invalid))):
            if count:
                RESOURCES_SKIPPED.labels(m.name, reason).inc(count)
        return result

    def sample_tick(self, m: Measurement, at: datetime) -> TickResult:
        """Collect, then commit the records and the sampler state in one transaction."""
        assert self.spool is not None
        result = self.collect(m, at)
        if not result.ok:
            return result
        bound = log.bind(measurement=m.name, tick=format_timestamp(result.tick))
        try:
            commit = self.spool.commit_tick(m.name, result.tick, result.records)
        except SpoolError as exc:
            result.error = str(exc)
            TICKS_FAILED.labels(m.name, "spool_full" if isinstance(exc, SpoolFullError) else "spool_write").inc()
            bound.error("tick not spooled; the sampler state stays where it was", error=result.error)
            return result
        result.inserted = commit.inserted
        RECORDS_SPOOLED.labels(m.name).inc(commit.inserted)
        if commit.previous_tick is not None:
            previous = parse_timestamp(commit.previous_tick)
            missed = int((result.tick - previous) / m.interval) - 1
            if missed > 0:
                TICKS_MISSED.labels(m.name).inc(missed)
                bound.warning("ticks missed since the last sample; their windows are not invented",
                              missed_windows=missed, last_tick=commit.previous_tick)
        bound.info("tick spooled", sampled=result.sampled, records=len(result.records), new=result.inserted)
        return result

    def sample_all(self, at: datetime) -> list[TickResult]:
        return [self.sample_tick(m, at) for m in self.cfg.measurements]


class Daemon:
    """The long-running agent: aligned sampling jobs plus the forwarder job."""

    def __init__(self, agent: Agent, forwarder: Forwarder, sink: Sink, clock: Callable[[], datetime] = utc_now,
                 forward_every: timedelta = timedelta(seconds=1), stop_requested: threading.Event | None = None):
        self.agent = agent
        self.forwarder = forwarder
        self.sink = sink
        self.clock = clock
        self._early_stop = stop_requested or threading.Event()  # set by a signal caught before run()
        self._stop_requested = threading.Event()
        self._finished = threading.Event()
        self._shutdown_thread: threading.Thread | None = None
        measurements = agent.cfg.measurements
        self.scheduler = BlockingScheduler(
            timezone=timezone.utc,
            executors={"default": ThreadPoolExecutor(max_workers=len(measurements) + 2)},
        )
        for m in measurements:
            self.scheduler.add_job(
                self._sample_job,
                IntervalTrigger(seconds=m.interval_seconds, start_date=_EPOCH, timezone=timezone.utc),
                args=[m],
                id=f"sample:{m.name}",
                max_instances=1,
                coalesce=True,
                misfire_grace_time=max(1, m.interval_seconds // 2),
            )
        self.scheduler.add_job(self.watch_backlog, IntervalTrigger(seconds=60, timezone=timezone.utc),
                               id="watch-backlog", max_instances=1, coalesce=True)
        self.scheduler.add_job(self.prune, IntervalTrigger(hours=1, timezone=timezone.utc), id="prune",
                               max_instances=1, coalesce=True, next_run_time=clock())
        self.scheduler.add_job(
            self.forwarder.drain,
            IntervalTrigger(seconds=forward_every.total_seconds(), timezone=timezone.utc),
            id="forwarder",
            max_instances=1,
            coalesce=True,
            next_run_time=clock(),
        )

    def watch_backlog(self) -> None:
        """Publish the oldest unsent record's age; alert when it passes spool.alert_after."""
        assert self.agent.spool is not None
        age = self.agent.spool.oldest_unsent_age() or 0.0
        OLDEST_UNSENT_AGE.set(age)
        limit = self.agent.cfg.spool.alert_after.total_seconds()
        if age > limit:
            log.error("records are waiting for delivery longer than spool.alert_after; they are kept and retried",
                      oldest_unsent_age_seconds=round(age), alert_after_seconds=limit,
                      unsent=sum(v for k, v in self.agent.spool.counts().items() if k in ("pending", "leased")))

    def prune(self) -> None:
        """Delete delivered records older than spool.retention, so the file does not grow forever."""
        assert self.agent.spool is not None
        cutoff = self.clock().timestamp() - self.agent.cfg.spool.retention.total_seconds()
        try:
            purged = self.agent.spool.purge_delivered(cutoff)
        except SpoolError as exc:
            log.error("pruning delivered records failed", error=str(exc))
            return
        if purged:
            log.info("pruned delivered records", purged=purged)

    def _sample_job(self, m: Measurement) -> None:
        # the job runs at (or just after) its aligned time: take the nearest tick, so a
        # wake-up a few milliseconds early does not land in the previous window
        at = self.clock() + timedelta(seconds=m.interval_seconds / 2)
        try:
            self.agent.sample_tick(m, at)
        except Exception:  # a bug in one tick must not take the scheduler down
            log.exception("tick crashed", measurement=m.name)

    def request_stop(self, signum: int | None = None, _frame: Any = None) -> None:
        """Signal handler: only flags the stop; the shutdown itself runs on its own thread,
        because APScheduler's shutdown takes locks the interrupted main thread may hold."""
        if self._stop_requested.is_set():
            return
        log.info("stopping", signal=signal.Signals(signum).name if signum else None)
        self._stop_requested.set()
        self.forwarder.stopping.set()
        self._shutdown_thread = threading.Thread(target=self._shutdown, name="shutdown", daemon=True)
        self._shutdown_thread.start()

    def _shutdown(self) -> None:
        # a signal that arrives while the scheduler is still starting waits for it to run
        while self.scheduler.state == STATE_STOPPED and not self._finished.is_set():
            time.sleep(0.01)
        if self.scheduler.state != STATE_STOPPED:
            self.scheduler.shutdown(wait=True)  # running jobs (a tick, an in-flight send) finish first

    def run(self) -> None:
        previous = {signum: signal.signal(signum, self.request_stop) for signum in (signal.SIGTERM, signal.SIGINT)}
        if self._early_stop.is_set():
            self.request_stop(signal.SIGTERM)
        log.info("agent started", measurements=[m.name for m in self.agent.cfg.measurements],
                 backend=self.sink.name, spool=str(self.agent.spool.path if self.agent.spool else None))
        try:
            self.scheduler.start()
        finally:
            self._finished.set()
            if self._shutdown_thread is not None:
                self._shutdown_thread.join()  # start() can return before running jobs are done
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        log.info("agent stopped")
