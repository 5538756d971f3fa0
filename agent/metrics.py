"""The agent's metrics: one object per process, built by the composition root and passed to
each stage, so a stage (and a test) counts into the registry it was given, not a global."""

from __future__ import annotations

import platform

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from agent import __version__


class Metrics:
    """Every family the agent exports, in its own registry. Counters only ever go up."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.records_spooled = Counter("usage_agent_records_spooled", "Records newly written to the spool.",
                                       ["measurement"], registry=r)
        self.records_delivered = Counter("usage_agent_records_delivered", "Records the backend accepted.", registry=r)
        self.records_dead = Counter("usage_agent_records_dead_lettered", "Records the backend rejected.", registry=r)
        self.records_past_dedup_window = Counter(
            "usage_agent_records_past_dedup_window",
            "Records found pending with their time older than the backend's deduplication window (each once): "
            "a re-send of one the backend already took would be counted again.", registry=r)
        self.resources_skipped = Counter("usage_agent_resources_skipped", "Resources left out of a tick, by reason.",
                                         ["measurement", "reason"], registry=r)
        self.ticks_failed = Counter("usage_agent_ticks_failed", "Measurement ticks that produced no records, by reason.",
                                    ["measurement", "reason"], registry=r)
        self.targets_failed = Counter(
            "usage_agent_targets_failed",
            "Targets (measurement x account x region) whose sampling failed in a tick; they emit nothing.",
            ["measurement", "account", "region", "reason"], registry=r)
        self.ticks_missed = Counter("usage_agent_ticks_missed", "Tick windows not sampled (downtime); never invented.",
                                    ["measurement"], registry=r)
        self.spool_write_errors = Counter("usage_agent_spool_write_errors", "Spool transactions that failed.",
                                          registry=r)
        self.oldest_unsent_age = Gauge("usage_agent_oldest_unsent_age_seconds",
                                       "Age of the oldest record not yet delivered.", registry=r)
        self.spool_full = Gauge("usage_agent_spool_full",
                                "1 from a tick refused for spool.max_records until the unsent records fall below it.",
                                registry=r)
        self.audit_write_errors = Counter("usage_agent_audit_write_errors", "Writes to the audit copy that failed.",
                                          registry=r)
        self.spool_depth = Gauge("usage_agent_spool_depth",
                                 "Records not yet delivered or dead-lettered (pending + leased).", registry=r)
        self.samples = Counter("usage_agent_samples", "Resources sampled, one per resource per tick.", ["measurement"],
                               registry=r)
        self.tick_duration = Histogram("usage_agent_tick_duration_seconds",
                                       "Sampling, converting and spooling one tick.", ["measurement"],
                                       buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600), registry=r)
        self.ticks_skipped = Counter("usage_agent_ticks_skipped",
                                     "Ticks not started: the previous tick was still running (overran) or the "
                                     "scheduler woke too late (late).", ["measurement", "reason"], registry=r)
        self.aws_api_errors = Counter("usage_agent_aws_api_errors",
                                      "Failed AWS API attempts (retried ones included), by error code.",
                                      ["service", "operation", "code"], registry=r)
        self.aws_api_calls = Counter("usage_agent_aws_api_calls",
                                     "AWS API requests sent (each attempt, retries included), by service and operation.",
                                     ["service", "operation"], registry=r)
        self.aws_clients_built = Counter("usage_agent_aws_clients_built",
                                         "AWS clients built: one per service and region, shared by every account.",
                                         ["service"], registry=r)
        self.backend_responses = Counter("usage_agent_backend_responses",
                                         "Backend answers (token requests included) by HTTP status, or timeout / "
                                         "connection_error when none came.", ["status"], registry=r)
        self.assume_role_failures = Counter("usage_agent_assume_role_failures", "sts:AssumeRole calls that failed.",
                                            ["role_arn"], registry=r)
        self.token_refreshes = Counter(
            "usage_agent_token_refreshes",
            "Credentials obtained: AWS role sessions (kind=aws_role) and backend tokens (kind=backend).",
            ["kind"], registry=r)
        self.paigo_dimensions_skipped = Counter(
            "usage_agent_paigo_dimensions_skipped",
            "Paigo dimensions not metered at a refresh (paigo_sync), by reason.", ["reason"], registry=r)
        self.paigo_sync_failures = Counter("usage_agent_paigo_sync_failures",
                                           "Refreshes that could not read Paigo's dimensions (the last set stays).",
                                           registry=r)
        Info("usage_agent_build", "The running agent.", registry=r).info(
            {"version": __version__, "python": platform.python_version()})

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """A sample's current value (0 when it was never set): what tests and ``once`` read."""
        return self.registry.get_sample_value(name, labels or {}) or 0.0
