"""The sampling fan-out: one measurement's tick over every target (account x region) its shard
owns, concurrently through the assumed-role sessions, tallied and converted into records.

A target that fails is data (``TargetFailure``), not an exception: the other targets go on,
and a customer total the failed target may hold part of is withheld rather than sent short.
Nothing here writes: ``agent.ticks`` commits what this collects.
"""

from __future__ import annotations

import re
import threading
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import structlog
from botocore.exceptions import BotoCoreError, ClientError
from botocore.parsers import ResponseParserError

from agent.clock import Clock
from agent.convert import Tally, tick_floor
from agent.credentials import SessionFactory, describe_aws_error
from agent.errors import AssumeRoleError, SamplingError, excerpt
from agent.metrics import Metrics
from agent.records import UsageRecord, format_timestamp
from agent.samplers import REGISTRY, Skipped, Target
from agent.samplers.base import CLUSTER_REGION, TargetMemory
from agent.settings import AgentConfig, Customer, Measurement, Role
from agent.shard import EVERYTHING, Shard

log = structlog.get_logger("agent.collect")

REGIONS_TTL = timedelta(hours=1)
MAX_ACCOUNTS_LOGGED = 10
MAX_REGIONS = 64  # AWS has fewer than 40; more is not an answer to trust
_REGION_NAME = re.compile(r"[a-z]{2}(-[a-z0-9]+)+-[0-9]{1,2}")


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
    state: dict[str, Any] | None = None  # a stateful sampler's memory of each target, committed with the tick

    @property
    def ok(self) -> bool:
        return self.error is None and not self.failed_targets


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


class Collector:
    """Samples measurements: every target (account x region) of a tick concurrently, in a
    bounded pool, with at most ``sampling.per_account_region`` calls in flight per account
    and region (EC2 throttles Describe calls per account and region)."""

    def __init__(self, cfg: AgentConfig, sessions: SessionFactory, *, metrics: Metrics, clock: Clock,
                 shard: Shard = EVERYTHING):
        self.cfg = cfg
        self.sessions = sessions
        self.metrics = metrics
        self.clock = clock  # monotonic(): a tick's deadline, its targets finish inside one interval
        self.shard = shard
        self._reported: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=cfg.sampling.workers, thread_name_prefix="sample")
        self._limits: dict[tuple[str, str], threading.BoundedSemaphore] = {}
        self._regions: dict[tuple[str | None, str | None], tuple[datetime, list[str]]] = {}
        self._listing: dict[tuple[str | None, str | None], threading.Lock] = {}
        self._memories: dict[tuple[str, str], TargetMemory] = {}  # (measurement, account/region) -> memory
        self._loading = threading.Lock()  # one target reads a measurement's stored state; the others wait
        self._loaded: set[str] = set()  # measurements whose stored state is in _memories
        self.watch_between_ticks = False  # the daemon: stateful samplers keep watching between ticks

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        with self._lock:
            memories, self._memories = list(self._memories.values()), {}
            self._loaded.clear()
        for memory in memories:
            memory.close()

    def stored_state(self, m: Measurement) -> dict[str, Any]:
        """The sampler state last committed for ``m`` (the Agent reads it from the spool)."""
        return {}

    def _memory(self, m: Measurement, account: str, region: str) -> TargetMemory | None:
        if not REGISTRY[m.resource_type].stateful:
            return None
        with self._loading:
            if m.name not in self._loaded:  # first tick of this measurement in this process: what the spool remembers
                stored = self.stored_state(m)
                with self._lock:
                    for target, state in stored.items():
                        if isinstance(state, dict):
                            self._memories.setdefault((m.name, target), TargetMemory(state, self.watch_between_ticks, self.clock.now))
                    self._loaded.add(m.name)
        with self._lock:
            return self._memories.setdefault((m.name, f"{account}/{region}"),
                                             TargetMemory({}, self.watch_between_ticks, self.clock.now))

    def _state(self, m: Measurement) -> dict[str, Any] | None:
        if not REGISTRY[m.resource_type].stateful:
            return None
        with self._lock:
            return {target: memory.state for (name, target), memory in self._memories.items() if name == m.name}

    @property
    def measurements(self) -> list[Measurement]:
        """The measurements with targets in this replica's shard (with ``regions: all``, the
        targets are known once the regions are listed: such a measurement is kept)."""
        return [m for m in self.cfg.measurements if m.all_regions or any(
            self.shard.owns(m, role.arn, region) for role in m.roles() for region in m.regions or (CLUSTER_REGION,))]

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
            now = self.clock.now()
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
                target = Target(m, account, region, tick, deadline, self.clock.monotonic, self._memory(m, account, region))
                for item in spec.sample(clients, target):
                    if isinstance(item, Skipped):  # logged and counted by its identity, like its record
                        skipped.append(Skipped(spec.resource(region, account, item.resource_id), item.reason))
                    else:
                        tally.add(item)
                        samples += 1
            except (ClientError, BotoCoreError, ResponseParserError, KeyError, TypeError, ValueError) as exc:
                # an answer of a shape no sampler expects fails its target, not the tick
                raise SamplingError(f"{m.resource_type} in {account}/{region}: "
                                    f"{excerpt(describe_aws_error(exc))}") from exc
        self.metrics.samples.labels(m.name).inc(samples)
        return tally, skipped

    def _account(self, m: Measurement, role: Role) -> tuple[str, list[str]]:
        """A role's account and the regions of it this replica samples: assumes the role (a role
        we cannot assume fails once, here) and, for ``regions: all``, lists its regions."""
        place = REGISTRY[m.resource_type].place
        where = place(m) if place is not None else None
        if where is not None:  # not an AWS account (a Kubernetes cluster): no role to assume
            return where[0], [where[1]] if self.shard.owns(m, role.arn, where[1]) else []
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
        deadline = self.clock.monotonic() + m.interval_seconds  # a target still listing then fails; the tick completes
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
            self.metrics.targets_failed.labels(m.name, failure.account, failure.region, failure.reason).inc()
            log.error("sampling failed; this target emits no records for this tick",
                      account=failure.account, region=failure.region, error=failure.error)
        result.failed_targets = failures
        result.state = self._state(m)
        if failures and len(failures) == targets:
            result.error = "; ".join(f.error for f in failures)
            reason = "assume_role" if all(f.reason == "assume_role" for f in failures) else "aws"
            self.metrics.ticks_failed.labels(m.name, reason).inc()
            return result
        unit = m.cloudwatch.unit if m.cloudwatch else REGISTRY[m.resource_type].metrics[m.metric].unit
        conversion = tally.convert(unit, tick)
        result.sampled = conversion.sampled
        result.records = _without_partial_totals(m, conversion.records, failures)
        result.withheld = len(conversion.records) - len(result.records)
        if result.withheld:
            log.warning("customer totals withheld: a failed target may hold part of them, and a partial "
                        "total would be billed under the tick's final id", withheld=result.withheld)
        tag = ",".join(m.customer_tags)
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
                self.metrics.resources_skipped.labels(m.name, reason).inc(count)
        return result


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
