"""What the Togai, Lago and Orb tests share: moto volumes with known sizes, the measurements
over them, one sampling-and-delivery run into a spool, and the CLI."""

from __future__ import annotations

import os
import sqlite3
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from agent.config import parse_config
from agent.forwarder import Forwarder
from agent.records import UsageRecord
from agent.sinks import build_backend
from agent.spool import Spool
from tests.conftest import Aws, backend_config, measurement
from tests.support import FakeClock, cli
from tests.test_runtime import new_agent

AT = datetime(2026, 11, 21, 10, 7, 30, tzinfo=timezone.utc)  # inside the 15-minute tick 10:00
AT_TEXT = "2026-11-21T10:07:30Z"

MEASUREMENTS = (
    measurement(name="ebs-storage", regions=["us-east-1", "eu-west-1"], event_type="ebs_storage_gib",
                metadata={"environment": "prod"}),
    measurement(name="ebs-gib-hours", mode="time_weighted", per="hour", dimension_id="dim-hours",
                group_by="resource", regions=["us-east-1"]),
)


def seed(aws: Aws) -> dict[str, str]:
    """acme: 100 + 7 GiB in us-east-1; globex: 500 GiB in eu-west-1; one untagged volume."""
    return {
        "acme-100": aws.volume("us-east-1", 100, "gp3", {"customer-id": "acme"}),
        "acme-7": aws.volume("us-east-1", 7, "gp2", {"customer-id": "acme"}),
        "globex-500": aws.volume("eu-west-1", 500, "gp3", {"customer-id": "globex"}),
        "untagged": aws.volume("eu-west-1", 30, "gp2"),
    }


def sample_and_forward(backend: dict[str, Any], tmp_path: Path, spool_name: str = "spool.db") -> tuple[list[UsageRecord], dict[str, int]]:
    """Sample tick 10:00 of ``MEASUREMENTS`` into a spool of its own and drain it to ``backend``:
    the records made, and the spool's counts after."""
    cfg = parse_config(backend_config(backend, tmp_path, *MEASUREMENTS, spool={"path": str(tmp_path / spool_name)}),
                       "<test>", {})
    clock = FakeClock()
    spool = Spool(cfg.spool.path, clock=clock)
    spool.claim()
    agent = new_agent(cfg, spool)
    sink = build_backend(cfg.backend, agent.metrics, clock)
    try:
        results = agent.sample_all(AT)
        forwarder = Forwarder(spool, sink.sink, sink.client, clock=clock)
        for _ in range(20):  # a batch sent again at once (Lago's atomic refusals) takes another round
            forwarder.drain()
            if spool.next_due() is None:
                break
        return [record for r in results for record in r.records], spool.counts()
    finally:
        agent.close()
        sink.close()
        spool.close()


def usage_agent(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`usage-agent *args` in-process, with ``env`` added to this process's environment."""
    return cli(*args, env={**os.environ, **(env or {})})


def spool_text(path: Path) -> str:
    """Every value of every row of the spool, as text: what a secret must never be part of."""
    with sqlite3.connect(path) as db:
        tables = [name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return "\n".join(str(row) for table in tables for row in db.execute(f"SELECT * FROM {table}"))
