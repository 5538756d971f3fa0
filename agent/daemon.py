"""The long-running agent: one APScheduler job per measurement on aligned ticks, the forwarder
on its own job, backlog and pruning jobs, SIGTERM/SIGINT, and /metrics, /healthz, /readyz
served on ``server.listen``."""

from __future__ import annotations

import signal
import threading
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

import structlog
from apscheduler.events import EVENT_JOB_MAX_INSTANCES, EVENT_JOB_MISSED, EVENT_SCHEDULER_START, JobEvent
from apscheduler.executors.pool import ThreadPoolExecutor as JobExecutor
from apscheduler.schedulers.base import STATE_STOPPED
from apscheduler.schedulers.blocking import BlockingScheduler
from apscheduler.triggers.interval import IntervalTrigger

from agent.clock import Clock
from agent.settings import Measurement
from agent.convert import tick_floor
from agent.errors import SpoolError
from agent.forwarder import Forwarder
from agent.health import Health
from agent.metrics import Metrics
from agent.paigo_dimensions import MAX_MEASUREMENTS
from agent.sinks.base import Sink
from agent.endpoints import MetricsServer
from agent.ticks import Agent

if TYPE_CHECKING:
    from agent.paigo_sync import PaigoMeasurements

log = structlog.get_logger("agent.daemon")

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


class Daemon:
    """Aligned sampling jobs, the forwarder job, metrics and health, until a stop is requested."""

    def __init__(self, agent: Agent, forwarder: Forwarder, sink: Sink, *, metrics: Metrics, clock: Clock,
                 forward_every: timedelta = timedelta(seconds=1), stop_requested: threading.Event | None = None,
                 sync: PaigoMeasurements | None = None):
        assert agent.spool is not None, "the daemon commits ticks: its agent needs a spool"
        self.agent = agent
        agent.watch_between_ticks = True  # stateful samplers (kubernetes_pod) watch their targets between ticks
        self.spool = agent.spool
        self.forwarder = forwarder
        self.sink = sink
        self.metrics = metrics
        self.clock = clock
        self._early_stop = stop_requested or threading.Event()  # set by a signal caught before run()
        self._started = threading.Event()  # the scheduler runs, or run() is over: a stop can proceed
        self._shutdown_thread: threading.Thread | None = None
        self.sync = sync  # paigo_sync: the measurements change at each refresh
        self.health = Health(agent, self.spool, forwarder, metrics=metrics, clock=clock, sync=sync)
        self.server = MetricsServer(agent.cfg.server.listen, metrics.registry, self.health.readiness,
                                    refresh=self.health.refresh_gauges)
        measurements = agent.measurements
        self._by_job: dict[str, Measurement] = {}
        synced = MAX_MEASUREMENTS + 1 if sync is not None else 0  # room for every measurement Paigo may add
        self.scheduler = BlockingScheduler(
            timezone=timezone.utc,
            executors={"default": JobExecutor(max_workers=len(measurements) + 2 + synced)},
        )
        self.scheduler.add_listener(self._tick_skipped, EVENT_JOB_MAX_INSTANCES | EVENT_JOB_MISSED)
        self.scheduler.add_listener(lambda _event: self._started.set(), EVENT_SCHEDULER_START)
        for m in measurements:
            self._add_sample_job(m)
        if sync is not None:
            self.scheduler.add_job(self.refresh_measurements, IntervalTrigger(
                seconds=sync.refresh_seconds, timezone=timezone.utc), id="paigo-sync",
                max_instances=1, coalesce=True)
        self.scheduler.add_job(self.watch_backlog, IntervalTrigger(seconds=60, timezone=timezone.utc),
                               id="watch-backlog", max_instances=1, coalesce=True)
        self.scheduler.add_job(self.prune, IntervalTrigger(hours=1, timezone=timezone.utc), id="prune",
                               max_instances=1, coalesce=True, next_run_time=clock.now())
        self.scheduler.add_job(
            self.forwarder.drain,
            IntervalTrigger(seconds=forward_every.total_seconds(), timezone=timezone.utc),
            id="forwarder",
            max_instances=1,
            coalesce=True,
            next_run_time=clock.now(),
        )

    def _add_sample_job(self, m: Measurement) -> None:
        self._by_job[f"sample:{m.name}"] = m
        self.scheduler.add_job(
            self._sample_job,
            IntervalTrigger(seconds=m.interval_seconds, start_date=_EPOCH + m.delay, timezone=timezone.utc),
            args=[m],
            id=f"sample:{m.name}",
            max_instances=1,
            coalesce=True,
            misfire_grace_time=max(1, m.interval_seconds // 2),
        )

    def refresh_measurements(self) -> None:
        """paigo_sync: read the dimensions again; from the next tick on, the measurements sampled
        are those they give (a removed one's spooled records still go out)."""
        assert self.sync is not None
        self.sync.refresh()
        self.agent.cfg = self.sync.config(self.agent.cfg)
        wanted = {f"sample:{m.name}": m for m in self.agent.measurements}
        for job_id, m in list(self._by_job.items()):
            if wanted.get(job_id) != m:  # removed, or changed in Paigo (its interval, role, region)
                self.scheduler.remove_job(job_id)
                del self._by_job[job_id]
                self.health.first_seen.pop(m.name, None)
        for job_id, m in wanted.items():
            if job_id not in self._by_job:
                self._add_sample_job(m)
                self.health.first_seen.setdefault(m.name, self.clock.now())

    def _tick_skipped(self, event: JobEvent) -> None:
        m = self._by_job.get(event.job_id)
        if m is None:
            return
        overran = event.code == EVENT_JOB_MAX_INSTANCES
        reason = "overran" if overran else "late"
        self.metrics.ticks_skipped.labels(m.name, reason).inc()
        with self.agent.tick_context(m, tick_floor(self.clock.now(), m.interval_seconds)):
            log.warning("tick skipped: the previous tick is still running" if overran
                        else "tick skipped: the scheduler woke too late for it", reason=reason)

    def watch_backlog(self) -> None:
        """Publish the spool gauges; alert when the oldest unsent record passes spool.alert_after."""
        facts = self.health.refresh_gauges()
        age = facts.oldest_unsent_age or 0.0
        limit = self.agent.cfg.spool.alert_after.total_seconds()
        if age > limit:
            log.error("records are waiting for delivery longer than spool.alert_after; they are kept and retried",
                      oldest_unsent_age_seconds=round(age), alert_after_seconds=limit, unsent=facts.unsent)

    def prune(self) -> None:
        """Delete delivered records older than spool.retention, so the file does not grow forever."""
        cutoff = self.clock.time() - self.agent.cfg.spool.retention.total_seconds()
        try:
            purged = self.spool.purge_delivered(cutoff)
        except SpoolError as exc:
            log.error("pruning delivered records failed", error=str(exc))
            return
        if purged:
            log.info("pruned delivered records", purged=purged)

    def _sample_job(self, m: Measurement) -> None:
        # the job runs at (or just after) tick + delay: take the nearest tick, so a
        # wake-up a few milliseconds early does not land in the previous window
        at = self.clock.now() - m.delay + timedelta(seconds=m.interval_seconds / 2)
        try:
            self.agent.sample_tick(m, at)
        except Exception:  # a bug in one tick must not take the scheduler down
            log.exception("tick crashed", measurement=m.name)

    def request_stop(self, signum: int | None = None, _frame: Any = None) -> None:
        """Signal handler: only flags the stop; the shutdown itself runs on its own thread,
        because APScheduler's shutdown takes locks the interrupted main thread may hold."""
        if self.health.stopping.is_set():
            return
        self.health.stopping.set()
        self.forwarder.stopping.set()
        log.info("stopping", signal=signal.Signals(signum).name if signum else None)  # once /readyz says so
        self._shutdown_thread = threading.Thread(target=self._shutdown, name="shutdown", daemon=True)
        self._shutdown_thread.start()

    def _shutdown(self) -> None:
        self._started.wait()  # a signal that arrives while the scheduler is still starting waits for it to run
        if self.scheduler.state != STATE_STOPPED:
            self.scheduler.shutdown(wait=True)  # running jobs (a tick, an in-flight send) finish first

    def run(self) -> None:
        previous = {signum: signal.signal(signum, self.request_stop) for signum in (signal.SIGTERM, signal.SIGINT)}
        if self._early_stop.is_set():
            self.request_stop(signal.SIGTERM)
        try:
            host, port = self.server.start()
            log.info("agent started", measurements=[m.name for m in self.agent.measurements], shard=str(self.agent.shard),
                     backend=self.sink.name, spool=str(self.spool.path), listen=f"{host}:{port}")
            if not self.agent.measurements:
                log.warning("this shard owns no measurement; it only forwards what its spool holds", shard=str(self.agent.shard))
            self.scheduler.start()
        finally:
            self._started.set()
            if self._shutdown_thread is not None:
                self._shutdown_thread.join()  # start() can return before running jobs are done
            self.server.stop()
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        log.info("agent stopped")
