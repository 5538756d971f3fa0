"""The measurements of a process with ``paigo_sync``: the YAML's, and those derived from the
dimensions last read from Paigo. Each refresh reads them again; when Paigo cannot be read, the
last set read stays, persisted in the spool so a restart during the outage still meters it,
and readiness says so once that set is older than three refreshes."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any

import structlog

from agent.clock import Clock
from agent.errors import SpoolError
from agent.metrics import Metrics
from agent.paigo_dimensions import Derived, DimensionReader, DimensionsUnavailable, derive, kept
from agent.records import format_timestamp
from agent.settings import AgentConfig, Measurement, PaigoBackend
from agent.spool import Spool
from agent.telemetry import Check

log = structlog.get_logger("agent.paigo_sync")

KEPT = "paigo_sync.dimensions"  # the spool's kept value: the last dimensions read, and when
STALE_AFTER = 3  # refreshes: readiness fails once the dimensions in use are older


def reader_for(cfg: AgentConfig, backend: Any, metrics: Metrics) -> DimensionReader:
    """The reader over the Paigo backend's own client and token (``backend``: ``agent.sinks.Backend``)."""
    assert isinstance(cfg.backend, PaigoBackend), "config checks: paigo_sync needs backend.type paigo"
    return DimensionReader(cfg.backend, backend.client, backend.sink.token, metrics)


class PaigoMeasurements:
    """The YAML's measurements plus those the dimensions give, read again at each ``refresh``."""

    def __init__(self, cfg: AgentConfig, reader: DimensionReader, spool: Spool | None = None, *,
                 metrics: Metrics, clock: Clock):
        assert cfg.paigo_sync is not None
        self.sync = cfg.paigo_sync
        self.yaml = cfg.measurements
        self.reader = reader
        self.spool = spool  # None: nothing persisted (dry runs, `paigo-sync`, `iam-policy`)
        self.metrics = metrics
        self.clock = clock
        self.started = clock.now()
        self.read_at: datetime | None = None  # when the dimensions in use were read from Paigo
        self.failure: str | None = None  # why the last read failed; None once one succeeds
        self.derived = Derived()
        self._left_logged: set[str] = set()

    @property
    def refresh_seconds(self) -> float:
        return self.sync.refresh.total_seconds()

    @property
    def measurements(self) -> tuple[Measurement, ...]:
        return self.yaml + self.derived.measurements

    def refresh(self) -> tuple[Measurement, ...]:
        """Read the dimensions; on failure keep the last set read (or the one the spool kept)."""
        try:
            dimensions = self.reader.read()
        except DimensionsUnavailable as exc:
            self.failure = str(exc)
            self.metrics.paigo_sync_failures.inc()
            if self.read_at is None:
                self._restore()
            log.error("Paigo's dimensions could not be read; the last set read is metered",
                      error=self.failure, read_at=format_timestamp(self.read_at) if self.read_at else None,
                      measurements=len(self.derived.measurements))
            return self.measurements
        self.read_at, self.failure = self.clock.now(), None
        self._persist(dimensions)
        self._use(dimensions)
        return self.measurements

    def _use(self, dimensions: Sequence[Any]) -> None:
        self.derived = derive(dimensions, self.sync, self.yaml)
        for skip in self.derived.skipped:
            self.metrics.paigo_dimensions_skipped.labels(skip.kind).inc()
            log.warning("Paigo dimension not metered", dimension=skip.dimension, dimension_name=skip.name,
                        reason=skip.reason)
        for dimension, name in sorted(self.derived.left_to_yaml.items()):
            if dimension not in self._left_logged:
                self._left_logged.add(dimension)
                log.info("Paigo dimension metered by the YAML's measurement, which wins", dimension=dimension,
                         measurement=name)
        log.info("Paigo dimensions read", measurements=[m.name for m in self.derived.measurements],
                 skipped=len(self.derived.skipped))

    def _persist(self, dimensions: Sequence[Any]) -> None:
        if self.spool is None:
            return
        assert self.read_at is not None
        try:
            self.spool.keep(KEPT, json.dumps({"read_at": format_timestamp(self.read_at),
                                              "dimensions": kept(dimensions)}, separators=(",", ":")))
        except SpoolError as exc:  # metering goes on; only a restart during an outage would lack the set
            log.error("the dimensions read could not be kept in the spool", error=str(exc))

    def _restore(self) -> None:
        """The set the spool kept from an earlier process, when this one has read none."""
        value = self.spool.kept(KEPT) if self.spool is not None else None
        if value is None:
            log.error("no dimensions were ever read from Paigo: only the YAML's measurements are metered")
            return
        try:
            saved = json.loads(value)
            read_at = datetime.fromisoformat(saved["read_at"].replace("Z", "+00:00")).astimezone(timezone.utc)
            dimensions = saved["dimensions"]
            if not isinstance(dimensions, list):
                raise TypeError(f"dimensions is {type(dimensions).__name__}, not a list")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            log.error("the dimensions kept in the spool cannot be read", error=f"{type(exc).__name__}: {exc}")
            return
        self.read_at = read_at
        log.warning("metering the dimensions kept in the spool", read_at=saved["read_at"])
        self._use(dimensions)

    def check(self) -> Check:
        """Readiness: the dimensions in use were read within three refreshes."""
        limit = STALE_AFTER * self.sync.refresh.total_seconds()
        since = self.read_at or self.started
        age = (self.clock.now() - since).total_seconds()
        what = (f"dimensions read at {format_timestamp(self.read_at)}, {age:.0f}s ago" if self.read_at
                else f"no dimensions read since the start at {format_timestamp(self.started)}")
        failed = f"; the last read failed: {self.failure}" if self.failure else ""
        return Check("paigo_sync", age <= limit,
                     f"{what}: {len(self.derived.measurements)} measurement(s), {len(self.derived.skipped)} "
                     f"dimension(s) skipped; the limit is three refreshes ({limit:.0f}s){failed}")

    def config(self, cfg: AgentConfig) -> AgentConfig:
        """``cfg`` with the measurements in use."""
        return replace(cfg, measurements=self.measurements)
