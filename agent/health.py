"""Health: readiness and the spool gauges, computed from the facts the stages report (the
spool's own, the forwarder's delivery alert, the ticks the agent spooled, whether the daemon
is stopping), as ``/readyz`` and ``/metrics`` answer them."""

from __future__ import annotations

import os
import threading
from datetime import datetime
from typing import TYPE_CHECKING

from agent.clock import Clock
from agent.forwarder import Forwarder
from agent.metrics import Metrics
from agent.records import format_timestamp
from agent.spool import Spool, SpoolFacts
from agent.telemetry import Check
from agent.ticks import Agent

if TYPE_CHECKING:
    from agent.paigo_sync import PaigoMeasurements


class Health:
    """Ready: config loaded, spool writable and below its cap, no configuration problem holding
    delivery back past spool.alert_after, not stopping, every measurement of this shard ticking."""

    def __init__(self, agent: Agent, spool: Spool, forwarder: Forwarder, *, metrics: Metrics, clock: Clock,
                 sync: PaigoMeasurements | None = None):
        self.agent = agent
        self.sync = sync  # paigo_sync: its dimensions must be fresh
        self.first_seen: dict[str, datetime] = {}  # measurements added after the start (read from Paigo)
        self.spool = spool
        self.forwarder = forwarder
        self.metrics = metrics
        self.clock = clock
        self.started = clock.now()
        self.stopping = threading.Event()  # set by the daemon once a stop is requested

    def refresh_gauges(self) -> SpoolFacts:
        """Spool depth and the oldest unsent record's age, for a scrape; the facts they came from."""
        facts = self.spool.facts()
        self.metrics.oldest_unsent_age.set(facts.oldest_unsent_age or 0.0)
        self.metrics.spool_depth.set(facts.unsent)
        return facts

    def readiness(self) -> list[Check]:
        cfg, facts = self.agent.cfg, self.spool.facts()
        owned = [m.name for m in self.agent.measurements]
        checks = [Check("config", True, f"{len(cfg.measurements)} measurement(s); "
                                        f"shard {self.agent.shard} samples {', '.join(owned) or 'none'}")]
        problem = facts.write_error and f"the last write failed: {facts.write_error}"
        for path in (facts.path.parent, facts.path):
            if problem is None and not os.access(path, os.W_OK):
                problem = f"{path} is not writable"
        checks.append(Check("spool_writable", problem is None, problem or str(facts.path)))
        cap = f"spool.max_records={facts.max_records}"
        checks.append(Check("spool_not_full", not facts.full,
                            f"{cap}; new ticks are refused until records drain" if facts.full else cap))
        checks.append(self.forwarder.delivery_check(cfg.spool.alert_after.total_seconds()))
        if self.stopping.is_set():
            checks.append(Check("running", False, "stopping: finishing the sends in flight"))
        if self.sync is not None:
            checks.append(self.sync.check())
        now = self.clock.now()
        for m in self.agent.measurements:
            last = self.agent.last_spooled.get(m.name)
            start = self.first_seen.get(m.name, self.started)
            since = max(last, start) if last else start
            age = (now - since).total_seconds()
            limit = 2 * m.interval_seconds
            what = (f"last tick {format_timestamp(last)}" if last
                    else f"no tick since the start at {format_timestamp(self.started)}")
            checks.append(Check(f"tick:{m.name}", age <= limit,
                                f"{what}, {age:.0f}s ago; the limit is two intervals ({limit}s)"))
        return checks
