"""Composition root and scheduler wiring.

``Agent`` samples one measurement for one tick (every account and region its shard owns,
concurrently, through the assumed-role sessions), converts, and commits the records with
the sampler state. ``Daemon``
puts one APScheduler job per measurement on aligned ticks and the forwarder on its own job,
and serves metrics and health on ``server.listen``.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import structlog
from apscheduler.events import EVENT_JOB_MAX_INSTANCES, EVENT_JOB_MISSED, JobEvent
from apscheduler.executors.pool import ThreadPoolExecutor as JobExecutor
from apscheduler.schedulers.base import STATE_STOPPED
from apscheduler.schedulers.blocking import BlockingScheduler
from apscheduler.triggers.interval import IntervalTrigger
from botocore.exceptions import BotoCoreError, ClientError
from botocore.parsers import ResponseParserError

from agent.settings import AgentConfig, Customer, Measurement, Role
from agent.convert import Tally, UsageRecord, format_timestamp, parse_timestamp, tick_floor
from agent.credentials import SessionFactory, describe_aws_error, utc_now
from agent.errors import AssumeRoleError, SamplingError, SpoolDiskLowError, SpoolError, SpoolFullError, excerpt
from agent.forwarder import Forwarder
from agent.samplers import REGISTRY, Skipped, Target
from agent.shard import EVERYTHING, Shard
from agent.sinks.base import Sink
from agent.spool import Spool
from agent.telemetry import (
    OLDEST_UNSENT_AGE,
    RECORDS_SPOOLED,
    RESOURCES_SKIPPED,
    SAMPLES,
    SPOOL_DEPTH,
    TARGETS_FAILED,
    TICK_DURATION,
    TICKS_FAILED,
    TICKS_MISSED,
    TICKS_SKIPPED,
    Check,
    MetricsServer,
)

log = structlog.get_logger("agent.runtime")

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


@dataclass(frozen=True)
class TargetFailure:
    account: str  # "?" when the account itself could not be determined
    region: str  # "*" when the failure came before any region (assume role, region listing)
    reason: str  # assume_role | aws
    error: str
    customer: Customer | None  # the attribution of the failed account


@dataclass
class TickResult:
    measurement: str
    tick: datetime
    sampled: int = 0
    records: list[UsageRecord] = field(default_factory=list)
    inserted: int = 0
    error: str | None = None  # the whole tick failed: nothing was (or will be) spooled
    failed_targets: list[TargetFailure] = field(default_factory=list)
    withheld: int = 0  # customer totals left out because a target they may include failed

    @property
    def ok(self) -> bool:
        return self.error is None and not self.failed_targets


REGIONS_TTL = timedelta(hours=1)
MAX_ACCOUNTS_LOGGED = 10
MAX_REGIONS = 64  # AWS has fewer than 40; more is not an answer to trust
_REGION_NAME = re.compile(r"[a-z]{2}(-[a-z0-9]+)+-[0-9]{1,2}")


def enabled_regions(answer: Any) -> list[str]:
    """The regions of a DescribeRegions answer that the account has enabled; SamplingError,
    naming what was wrong, for an answer that is not one (a region name goes into endpoint URLs)."""
    listed = answer.get("Regions") if isinstance(answer, dict) else None
    if not isinstance(listed, list) or not listed or len(listed) > MAX_REGIONS:
        raise SamplingError(f"ec2 DescribeRegions gave no usable region list "
                            f"({type(listed).__name__}, {len(listed) if isinstance(listed, list) else 0} entries)")
    regions = set()
    for entry in listed:
        name = entry.get("RegionName") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not _REGION_NAME.fullmatch(name):
            raise SamplingError(f"ec2 DescribeRegions named a region that is not one: {str(name)[:80]!r}")
        if entry.get("OptInStatus") != "not-opted-in":
            regions.add(name)
    return sorted(regions)


class Agent:
    """Samples measurements: every target (account x region) of a tick concurrently, in a
    bounded pool, with at most ``sampling.per_account_region`` calls in flight per account
    and region (EC2 throttles Describe calls per account and region)."""

    def __init__(self, cfg: AgentConfig, sessions: SessionFactory, spool: Spool | None = None,
                 clock: Callable[[], datetime] = utc_now, shard: Shard = EVERYTHING,
                 monotonic: Callable[[], float] = time.monotonic):
        self.cfg = cfg
        self.sessions = sessions
        self.spool = spool
        self.clock = clock
        self.monotonic = monotonic  # measures a tick's deadline: its targets finish inside one interval
        self.shard = shard
        self.last_spooled: dict[str, datetime] = {}  # measurement -> its last tick committed by this process
        self._reported: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=cfg.sampling.workers, thread_name_prefix="sample")
        self._limits: dict[tuple[str, str], threading.BoundedSemaphore] = {}
        self._regions: dict[tuple[str | None, str | None], tuple[datetime, list[str]]] = {}
        self._listing: dict[tuple[str | None, str | None], threading.Lock] = {}

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    @property
    def measurements(self) -> list[Measurement]:
        """The measurements with targets in this replica's shard (with ``regions: all``, the
        targets are known once the regions are listed: such a measurement is kept)."""
        return [m for m in self.cfg.measurements if m.all_regions or any(
            self.shard.owns(m, role.arn, region) for role in m.roles() for region in m.regions)]

    def tick_context(self, m: Measurement, tick: datetime) -> Any:
        """Log context for every line of a tick; each target's thread narrows account and region."""
        ids = [r.arn.split(":")[4] if r.arn else "self" for r in m.roles()]
        # a thousand accounts would make every line of the tick 13 KB long: past a few, the count
        accounts = ",".join(ids) if len(ids) <= MAX_ACCOUNTS_LOGGED else f"{len(ids)} accounts"
        return structlog.contextvars.bound_contextvars(
            measurement=m.name, tick=format_timestamp(tick), account=accounts, region=",".join(m.regions))

    def _limit(self, account: str, region: str) -> threading.BoundedSemaphore:
        with self._lock:
            return self._limits.setdefault(
                (account, region), threading.BoundedSemaphore(self.cfg.sampling.per_account_region))

    def regions(self, m: Measurement, role: Role) -> list[str]:
        """The measurement's regions; for ``regions: all`` the regions enabled in the account."""
        if not m.all_regions:
            return list(m.regions)
        key = (role.arn, role.external_id)
        with self._lock:
            listing = self._listing.setdefault(key, threading.Lock())
        with listing:  # measurements sampling the same account at once list its regions once
            now = self.clock()
            with self._lock:
                cached = self._regions.get(key)
            if cached is not None and cached[0] > now:
                return cached[1]
            ec2 = self.sessions.client("ec2", self.sessions.home_region, role.arn, role.external_id)
            try:
                answer = ec2.describe_regions()  # without AllRegions: the regions enabled in the account
            except (ClientError, BotoCoreError, ResponseParserError) as exc:
                raise SamplingError(f"cannot list the account's regions: {describe_aws_error(exc)}") from exc
            regions = enabled_regions(answer)
            with self._lock:
                self._regions[key] = (now + REGIONS_TTL, regions)
            return regions

    def _sample_target(self, m: Measurement, role: Role, account: str, region: str,
                       tick: datetime, deadline: float) -> tuple[Tally, list[Skipped]]:
        spec = REGISTRY[m.resource_type]

        def clients(service: str) -> Any:
            return self.sessions.client(service, region, role.arn, role.external_id)

        # samples are tallied as they arrive, not kept: a failed target's tally is dropped whole
        tally = Tally(m, m.metric, {account: role.customer} if role.customer else None)
        samples = 0
        skipped: list[Skipped] = []
        context = structlog.contextvars.bound_contextvars(
            measurement=m.name, tick=format_timestamp(tick), account=account, region=region)
        with context, self._limit(account, region):
            try:
                for item in spec.sample(clients, Target(m, account, region, tick, deadline, self.monotonic)):
                    if isinstance(item, Skipped):  # logged and counted by its identity, like its record
                        skipped.append(Skipped(spec.resource(region, account, item.resource_id), item.reason))
                    else:
                        tally.add(item)
                        samples += 1
            except (ClientError, BotoCoreError, ResponseParserError, KeyError, TypeError, ValueError) as exc:
                # an answer of a shape no sampler expects fails its target, not the tick
                raise SamplingError(f"{m.resource_type} in {account}/{region}: "
                                    f"{excerpt(describe_aws_error(exc))}") from exc
        SAMPLES.labels(m.name).inc(samples)
        return tally, skipped

    def _account(self, m: Measurement, role: Role) -> tuple[str, list[str]]:
        """A role's account and the regions of it this replica samples: assumes the role (a role
        we cannot assume fails once, here) and, for ``regions: all``, lists its regions."""
        self.sessions.credentials(role.arn, role.external_id)
        account = self.sessions.account_id(role.arn, role.external_id)
        return account, [r for r in self.regions(m, role) if self.shard.owns(m, role.arn, r)]

    def _sample(self, m: Measurement, tick: datetime) -> tuple[Tally, list[Skipped], list[TargetFailure], int]:
        """Every target of the measurement; returns their tally, skips, failures, targets.

        Accounts are prepared in the pool too, then their targets are handed to it in turn,
        one account after another, and only a few workers' worth at a time: a throttled
        account backing off holds about one worker, never the whole pool."""
        tally = Tally(m, m.metric)
        skipped: list[Skipped] = []
        failures: list[TargetFailure] = []
        roles = deque(m.roles())
        ready: deque[tuple[Role, str, deque[str]]] = deque()  # accounts with targets left, served in turn
        in_flight: dict[Future[Any], tuple[Role, str | None, str]] = {}  # -> (role, account or None, region)
        window = 2 * self.cfg.sampling.workers
        targets = 0
        deadline = self.monotonic() + m.interval_seconds  # a target still listing then fails; the tick completes
        while roles or ready or in_flight:
            while len(in_flight) < window and (roles or ready):
                if roles:  # accounts first: the more of them are ready, the more their targets interleave
                    role = roles.popleft()
                    in_flight[self._pool.submit(self._account, m, role)] = (role, None, "*")
                    continue
                role, account, regions = ready.popleft()
                region = regions.popleft()
                if regions:
                    ready.append((role, account, regions))
                in_flight[self._pool.submit(self._sample_target, m, role, account, region, tick,
                                            deadline)] = (role, account, region)
                targets += 1
            done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
            for future in done:
                role, account, region = in_flight.pop(future)
                try:
                    if account is None:
                        account_id, regions = future.result()
                        if regions:
                            ready.append((role, account_id, deque(regions)))
                    else:
                        got, skips = future.result()
                        tally.merge(got)
                        skipped += skips
                except SamplingError as exc:
                    where = account or (role.arn.split(":")[4] if role.arn else "?")
                    failures.append(_failure(role, where, region, exc))
        return tally, skipped, failures, targets + sum(f.region == "*" for f in failures)

    def _first_time(self, m: Measurement, resources: list[str]) -> list[str]:
        """The resources not yet reported for this measurement: each is logged once, not every tick."""
        with self._lock:
            fresh = [r for r in resources if (m.name, r) not in self._reported]
            self._reported.update((m.name, r) for r in fresh)
        return fresh

    def collect(self, m: Measurement, at: datetime) -> TickResult:
        """Sample and convert one measurement for the tick containing ``at``; writes nothing."""
        tick = tick_floor(at, m.interval_seconds)
        with self.tick_context(m, tick):
            return self._collect(m, tick)

    def _collect(self, m: Measurement, tick: datetime) -> TickResult:
        result = TickResult(m.name, tick)
        tally, skipped, failures, targets = self._sample(m, tick)
        for failure in failures:
            TARGETS_FAILED.labels(m.name, failure.account, failure.region, failure.reason).inc()
            log.error("sampling failed; this target emits no records for this tick",
                      account=failure.account, region=failure.region, error=failure.error)
        result.failed_targets = failures
        if failures and len(failures) == targets:
            result.error = "; ".join(f.error for f in failures)
            reason = "assume_role" if all(f.reason == "assume_role" for f in failures) else "aws"
            TICKS_FAILED.labels(m.name, reason).inc()
            return result
        unit = m.cloudwatch.unit if m.cloudwatch else REGISTRY[m.resource_type].metrics[m.metric].unit
        conversion = tally.convert(unit, tick)
        result.sampled = conversion.sampled
        result.records = _without_partial_totals(m, conversion.records, failures)
        result.withheld = len(conversion.records) - len(result.records)
        if result.withheld:
            log.warning("customer totals withheld: a failed target may hold part of them, and a partial "
                        "total would be billed under the tick's final id", withheld=result.withheld)
        tag = ",".join(sorted({r.customer.tag for r in m.roles() if r.customer and r.customer.tag}))
        reasons = {s.resource_id: s.reason for s in skipped}
        for resource in self._first_time(m, list(reasons)):
            log.warning("resource skipped", resource=resource, reason=reasons[resource])
        for resource in self._first_time(m, conversion.untagged):
            log.warning("resource has no customer tag; skipped", resource=resource, tag=tag)
        invalid = dict(conversion.invalid_customer)
        for resource in self._first_time(m, list(invalid)):
            log.warning("resource skipped: its customer tag is not a usable customer id",
                        resource=resource, tag=tag, value=invalid[resource][:300])
        for reason, count in (("unreadable", len(skipped)), ("untagged", len(conversion.untagged)),
                              ("invalid_customer", len(invalid))):
            if count:
                RESOURCES_SKIPPED.labels(m.name, reason).inc(count)
        return result

    def sample_tick(self, m: Measurement, at: datetime) -> TickResult:
        """Collect, then commit the records and the sampler state in one transaction."""
        started = time.monotonic()
        tick = tick_floor(at, m.interval_seconds)
        with self.tick_context(m, tick):
            result = self._sample_tick(m, tick)
        TICK_DURATION.labels(m.name).observe(time.monotonic() - started)
        return result

    def _sample_tick(self, m: Measurement, tick: datetime) -> TickResult:
        assert self.spool is not None
        result = self._collect(m, tick)
        if result.error is not None:
            return result
        try:
            commit = self.spool.commit_tick(m.name, result.tick, result.records)
        except SpoolError as exc:
            result.error = str(exc)
            reason = ("disk_low" if isinstance(exc, SpoolDiskLowError) else
                      "spool_full" if isinstance(exc, SpoolFullError) else "spool_write")
            TICKS_FAILED.labels(m.name, reason).inc()
            log.error("tick not spooled; the sampler state stays where it was", error=result.error)
            return result
        result.inserted = commit.inserted
        self.last_spooled[m.name] = max(result.tick, self.last_spooled.get(m.name, result.tick))
        RECORDS_SPOOLED.labels(m.name).inc(commit.inserted)
        if commit.previous_tick is not None:
            previous = parse_timestamp(commit.previous_tick)
            missed = int((result.tick - previous) / m.interval) - 1
            if missed > 0:
                TICKS_MISSED.labels(m.name).inc(missed)
                log.warning("ticks missed since the last sample; their windows are not invented",
                            missed_windows=missed, last_tick=commit.previous_tick)
        log.info("tick spooled", sampled=result.sampled, records=len(result.records), new=result.inserted)
        return result

    def sample_all(self, at: datetime | None = None) -> list[TickResult]:
        """One tick of every measurement: the tick containing ``at``, by default the latest
        tick whose data is due (now minus the measurement's delay)."""
        return [self.sample_tick(m, at or self.clock() - m.delay) for m in self.measurements]


def _failure(role: Role, account: str, region: str, exc: SamplingError) -> TargetFailure:
    reason = "assume_role" if isinstance(exc, AssumeRoleError) else "aws"
    return TargetFailure(account, region, reason, str(exc), role.customer)


def _without_partial_totals(m: Measurement, records: list[UsageRecord],
                            failures: list[TargetFailure]) -> list[UsageRecord]:
    """Drop the per-customer totals a failed target may belong to: a partial sum is an
    undercharge that could never be corrected, because the full total has the same id."""
    if not failures or m.group_by != "customer":
        return records
    customers = [f.customer or m.customer for f in failures]
    if any(c is None or c.id is None for c in customers):  # tag attribution: any customer may be there
        return []
    tainted = {c.id for c in customers if c is not None}
    return [r for r in records if r.customer_id not in tainted]


class Daemon:
    """The long-running agent: aligned sampling jobs, the forwarder job, metrics and health."""

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
        self.started = clock()
        self.server = MetricsServer(agent.cfg.server.listen, self.readiness, refresh=self.refresh_gauges)
        measurements = agent.measurements
        self._by_job = {f"sample:{m.name}": m for m in measurements}
        self.scheduler = BlockingScheduler(
            timezone=timezone.utc,
            executors={"default": JobExecutor(max_workers=len(measurements) + 2)},
        )
        self.scheduler.add_listener(self._tick_skipped, EVENT_JOB_MAX_INSTANCES | EVENT_JOB_MISSED)
        for m in measurements:
            self.scheduler.add_job(
                self._sample_job,
                IntervalTrigger(seconds=m.interval_seconds, start_date=_EPOCH + m.delay, timezone=timezone.utc),
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

    def refresh_gauges(self) -> float:
        """Spool depth and the oldest unsent record's age, for a scrape; returns the age."""
        assert self.agent.spool is not None
        age = self.agent.spool.oldest_unsent_age() or 0.0
        OLDEST_UNSENT_AGE.set(age)
        SPOOL_DEPTH.set(self.agent.spool.unsent())
        return age

    def readiness(self) -> list[Check]:
        """Config loaded, spool writable and below its cap, no configuration problem holding
        delivery back past spool.alert_after, not stopping, every measurement of this shard ticking."""
        spool = self.agent.spool
        assert spool is not None
        owned = [m.name for m in self.agent.measurements]
        checks = [Check("config", True, f"{len(self.agent.cfg.measurements)} measurement(s); "
                                         f"shard {self.agent.shard} samples {', '.join(owned) or 'none'}")]
        problem = spool.write_error and f"the last write failed: {spool.write_error}"
        for path in (spool.path.parent, spool.path):
            if problem is None and not os.access(path, os.W_OK):
                problem = f"{path} is not writable"
        checks.append(Check("spool_writable", problem is None, problem or str(spool.path)))
        checks.append(Check("spool_not_full", not spool.full,
                            f"spool.max_records={spool.max_records}; new ticks are refused until records drain"
                            if spool.full else f"spool.max_records={spool.max_records}"))
        checks.append(self.forwarder.delivery_check(self.agent.cfg.spool.alert_after.total_seconds()))
        if self._stop_requested.is_set():
            checks.append(Check("running", False, "stopping: finishing the sends in flight"))
        now = self.clock()
        for m in self.agent.measurements:
            last = self.agent.last_spooled.get(m.name)
            since = max(last, self.started) if last else self.started
            age = (now - since).total_seconds()
            limit = 2 * m.interval_seconds
            what = f"last tick {format_timestamp(last)}" if last else f"no tick since the start at {format_timestamp(self.started)}"
            checks.append(Check(f"tick:{m.name}", age <= limit, f"{what}, {age:.0f}s ago; the limit is two intervals ({limit}s)"))
        return checks

    def _tick_skipped(self, event: JobEvent) -> None:
        m = self._by_job.get(event.job_id)
        if m is None:
            return
        overran = event.code == EVENT_JOB_MAX_INSTANCES
        reason = "overran" if overran else "late"
        TICKS_SKIPPED.labels(m.name, reason).inc()
        with self.agent.tick_context(m, tick_floor(self.clock(), m.interval_seconds)):
            log.warning("tick skipped: the previous tick is still running" if overran
                        else "tick skipped: the scheduler woke too late for it", reason=reason)

    def watch_backlog(self) -> None:
        """Publish the spool gauges; alert when the oldest unsent record passes spool.alert_after."""
        age = self.refresh_gauges()
        assert self.agent.spool is not None
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
        # the job runs at (or just after) tick + delay: take the nearest tick, so a
        # wake-up a few milliseconds early does not land in the previous window
        at = self.clock() - m.delay + timedelta(seconds=m.interval_seconds / 2)
        try:
            self.agent.sample_tick(m, at)
        except Exception:  # a bug in one tick must not take the scheduler down
            log.exception("tick crashed", measurement=m.name)

    def request_stop(self, signum: int | None = None, _frame: Any = None) -> None:
        """Signal handler: only flags the stop; the shutdown itself runs on its own thread,
        because APScheduler's shutdown takes locks the interrupted main thread may hold."""
        if self._stop_requested.is_set():
            return
        self._stop_requested.set()
        self.forwarder.stopping.set()
        log.info("stopping", signal=signal.Signals(signum).name if signum else None)  # once /readyz says so
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
        try:
            host, port = self.server.start()
            log.info("agent started", measurements=[m.name for m in self.agent.measurements], shard=str(self.agent.shard),
                     backend=self.sink.name, spool=str(self.agent.spool.path if self.agent.spool else None),
                     listen=f"{host}:{port}")
            if not self.agent.measurements:
                log.warning("this shard owns no measurement; it only forwards what its spool holds", shard=str(self.agent.shard))
            self.scheduler.start()
        finally:
            self._finished.set()
            if self._shutdown_thread is not None:
                self._shutdown_thread.join()  # start() can return before running jobs are done
            self.server.stop()
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        log.info("agent stopped")
