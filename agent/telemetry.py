"""Logging: structlog to stderr, JSON lines unless stderr is a terminal, secrets redacted."""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge

_SECRET_KEYS = re.compile(r"(secret|token|password|authorization|credential|api_key)", re.IGNORECASE)
_BEARER = re.compile(r"(Bearer\s+)[A-Za-z0-9._~+/=-]+")
REDACTED = "[redacted]"


def redact_secrets(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Blank values under secret-looking keys and bearer tokens inside strings."""
    for key, value in list(event.items()):
        if _SECRET_KEYS.search(key) and key != "event":
            event[key] = REDACTED
        elif isinstance(value, str):
            event[key] = _BEARER.sub(r"\1" + REDACTED, value)
    return event


def configure_logging(level: str | None = None, json_output: bool | None = None) -> None:
    """structlog for our own logs; the standard library's (APScheduler, botocore) rendered alike."""
    level_name = (level or os.environ.get("LOG_LEVEL") or "info").upper()
    numeric = logging.getLevelName(level_name)
    if not isinstance(numeric, int):
        numeric = logging.INFO
    if json_output is None:
        json_output = not sys.stderr.isatty()
    renderer: Any = structlog.processors.JSONRenderer() if json_output else structlog.dev.ConsoleRenderer(colors=False)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        redact_secrets,  # after format_exc_info, so tracebacks are scrubbed too
    ]
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    ))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # libraries speak up from WARNING on, unless we were asked for more
    root.setLevel(max(numeric, logging.WARNING) if numeric > logging.DEBUG else logging.DEBUG)


# -- metrics -------------------------------------------------------------------------------
# One registry for the process. Counters only ever go up.

REGISTRY = CollectorRegistry()

RECORDS_SPOOLED = Counter("usage_agent_records_spooled", "Records newly written to the spool.",
                          ["measurement"], registry=REGISTRY)
RECORDS_DELIVERED = Counter("usage_agent_records_delivered", "Records the backend accepted.", registry=REGISTRY)
RECORDS_DEAD = Counter("usage_agent_records_dead_lettered", "Records the backend rejected.", registry=REGISTRY)
RECORDS_DROPPED = Counter("usage_agent_records_dropped",
                          "Records lost without delivery or dead-letter. Nothing increments this: it stays 0.",
                          registry=REGISTRY)
RESOURCES_SKIPPED = Counter("usage_agent_resources_skipped", "Resources left out of a tick, by reason.",
                            ["measurement", "reason"], registry=REGISTRY)
TICKS_FAILED = Counter("usage_agent_ticks_failed", "Measurement ticks that produced no records, by reason.",
                       ["measurement", "reason"], registry=REGISTRY)
TARGETS_FAILED = Counter("usage_agent_targets_failed",
                         "Targets (measurement x account x region) whose sampling failed in a tick; they emit nothing.",
                         ["measurement", "account", "region", "reason"], registry=REGISTRY)
TICKS_SKIPPED = Counter("usage_agent_ticks_skipped",
                        "Ticks not started because the previous tick of the measurement was still running.",
                        ["measurement"], registry=REGISTRY)
TICKS_MISSED = Counter("usage_agent_ticks_missed", "Tick windows not sampled (downtime); never invented.",
                       ["measurement"], registry=REGISTRY)
SPOOL_WRITE_ERRORS = Counter("usage_agent_spool_write_errors", "Spool transactions that failed.", registry=REGISTRY)
OLDEST_UNSENT_AGE = Gauge("usage_agent_oldest_unsent_age_seconds", "Age of the oldest record not yet delivered.",
                          registry=REGISTRY)
SPOOL_FULL = Gauge("usage_agent_spool_full", "1 while the spool refuses new ticks (spool.max_records).",
                   registry=REGISTRY)
AUDIT_WRITE_ERRORS = Counter("usage_agent_audit_write_errors", "Writes to the audit copy that failed.",
                             registry=REGISTRY)
