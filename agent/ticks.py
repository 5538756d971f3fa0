"""The tick commit: a measurement's collected records and its sampler state written in one
spool transaction, so a tick is spooled whole or not at all, and the windows missed since
the last committed tick are counted and logged, never invented."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import structlog

from agent.clock import Clock
from agent.collect import Collector, TickResult
from agent.settings import AgentConfig, Measurement
from agent.convert import tick_floor
from agent.credentials import SessionFactory
from agent.errors import SpoolDiskLowError, SpoolError, SpoolFullError
from agent.metrics import Metrics
from agent.records import parse_timestamp
from agent.shard import EVERYTHING, Shard
from agent.spool import Spool

log = structlog.get_logger("agent.ticks")


class Agent(Collector):
    """The sampling side of the agent: collects a measurement's tick and commits it to the spool."""

    def __init__(self, cfg: AgentConfig, sessions: SessionFactory, spool: Spool | None = None, *,
                 metrics: Metrics, clock: Clock, shard: Shard = EVERYTHING):
        super().__init__(cfg, sessions, metrics=metrics, clock=clock, shard=shard)
        self.spool = spool  # None: collect only (``once --dry-run``)
        self.last_spooled: dict[str, datetime] = {}  # measurement -> its last tick committed by this process

    def stored_state(self, m: Measurement) -> dict[str, Any]:
        return self.spool.sampler_state(m.name) if self.spool is not None else {}

    def sample_tick(self, m: Measurement, at: datetime) -> TickResult:
        """Collect, then commit the records and the sampler state in one transaction."""
        started = self.clock.monotonic()
        tick = tick_floor(at, m.interval_seconds)
        with self.tick_context(m, tick):
            result = self._collect(m, tick)
            if result.error is None:
                self._commit(m, result)
        self.metrics.tick_duration.labels(m.name).observe(self.clock.monotonic() - started)
        return result

    def _commit(self, m: Measurement, result: TickResult) -> None:
        assert self.spool is not None
        try:
            commit = self.spool.commit_tick(m.name, result.tick, result.records, result.state)
        except SpoolError as exc:
            result.error = str(exc)
            reason = ("disk_low" if isinstance(exc, SpoolDiskLowError) else
                      "spool_full" if isinstance(exc, SpoolFullError) else "spool_write")
            self.metrics.ticks_failed.labels(m.name, reason).inc()
            log.error("tick not spooled; the sampler state stays where it was", error=result.error)
            return
        result.inserted = commit.inserted
        self.last_spooled[m.name] = max(result.tick, self.last_spooled.get(m.name, result.tick))
        self.metrics.records_spooled.labels(m.name).inc(commit.inserted)
        if commit.previous_tick is not None:
            missed = int((result.tick - parse_timestamp(commit.previous_tick)) / m.interval) - 1
            if missed > 0:
                self.metrics.ticks_missed.labels(m.name).inc(missed)
                log.warning("ticks missed since the last sample; their windows are not invented",
                            missed_windows=missed, last_tick=commit.previous_tick)
        log.info("tick spooled", sampled=result.sampled, records=len(result.records), new=result.inserted)

    def sample_all(self, at: datetime | None = None) -> list[TickResult]:
        """One tick of every measurement: the tick containing ``at``, by default the latest
        tick whose data is due (now minus the measurement's delay)."""
        return [self.sample_tick(m, at or self.clock.now() - m.delay) for m in self.measurements]
