"""Scheduler wiring: aligned triggers, job options, nearest-tick sampling, stop before start."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest
from apscheduler.schedulers.base import STATE_STOPPED

from agent.clock import SystemClock
from agent.credentials import SessionFactory
from agent.daemon import Daemon
from agent.forwarder import Forwarder
from agent.metrics import Metrics
from agent.sinks import Backend, build_backend
from agent.spool import Spool
from agent.testing.paigo_server import PaigoContractServer
from agent.ticks import Agent
from tests.conftest import Aws, make_config, measurement
from tests.support import FakeClock

UTC = timezone.utc


def new_agent(cfg, spool: Spool | None = None, *, metrics: Metrics | None = None, clock=None,
              sessions: SessionFactory | None = None, **options) -> Agent:
    """An agent (and its sessions) counting into a ``Metrics()`` of its own unless given one, on the
    system clock unless given another."""
    metrics, clock = metrics or Metrics(), clock or SystemClock()
    sessions = sessions or SessionFactory(metrics=metrics, clock=clock)
    return Agent(cfg, sessions, spool, metrics=metrics, clock=clock, **options)


@pytest.fixture
def daemon_parts(aws: Aws, paigo: PaigoContractServer, tmp_path: Path) -> Iterator[tuple[Agent, Forwarder, Backend]]:
    cfg = make_config(paigo, tmp_path, measurement(name="five", interval="5m"), measurement(name="hourly", interval="1h"))
    spool = Spool(cfg.spool.path)
    spool.claim()
    agent = new_agent(cfg, spool)
    sink = build_backend(cfg.backend, agent.metrics, agent.clock)
    yield agent, Forwarder(spool, sink.sink, sink.client, metrics=agent.metrics, clock=agent.clock), sink
    sink.close()
    spool.close()


def daemon_of(agent: Agent, forwarder: Forwarder, sink: Backend, clock=None, **options) -> Daemon:
    return Daemon(agent, forwarder, sink, metrics=agent.metrics, clock=clock or agent.clock, **options)


def test_one_aligned_job_per_measurement_plus_the_forwarder(daemon_parts) -> None:
    agent, forwarder, sink = daemon_parts
    daemon = daemon_of(agent, forwarder, sink)
    jobs = {job.id: job for job in daemon.scheduler.get_jobs()}
    assert set(jobs) == {"sample:five", "sample:hourly", "forwarder", "watch-backlog", "prune"}

    now = datetime(2026, 11, 21, 10, 7, 13, tzinfo=UTC)
    assert jobs["sample:five"].trigger.get_next_fire_time(None, now) == datetime(2026, 11, 21, 10, 10, tzinfo=UTC)
    assert jobs["sample:hourly"].trigger.get_next_fire_time(None, now) == datetime(2026, 11, 21, 11, 0, tzinfo=UTC)
    for job_id in ("sample:five", "sample:hourly", "forwarder"):
        assert jobs[job_id].max_instances == 1 and jobs[job_id].coalesce is True
    assert jobs["sample:five"].misfire_grace_time == 150


def test_a_job_woken_a_little_early_samples_the_tick_it_was_scheduled_for(aws: Aws, daemon_parts) -> None:
    aws.volume("us-east-1", 9, tags={"customer-id": "acme"})
    agent, forwarder, sink = daemon_parts
    early = datetime(2026, 11, 21, 9, 59, 59, 990000, tzinfo=UTC)
    daemon = daemon_of(agent, forwarder, sink, clock=FakeClock(early.timestamp()))
    daemon._sample_job(agent.cfg.measurements[0])
    assert agent.spool.last_tick("five") == "2026-11-21T10:00:00Z"


def test_a_stop_requested_before_start_is_honoured(daemon_parts) -> None:
    agent, forwarder, sink = daemon_parts
    requested = threading.Event()
    requested.set()
    daemon = daemon_of(agent, forwarder, sink, stop_requested=requested)
    started = time.monotonic()
    daemon.run()
    assert time.monotonic() - started < 5
    assert daemon.scheduler.state == STATE_STOPPED
    assert forwarder.stopping.is_set()


def test_each_agent_counts_into_the_metrics_it_is_given(aws: Aws, paigo: PaigoContractServer, tmp_path: Path) -> None:
    aws.volume("us-east-1", 9, tags={"customer-id": "acme"})
    cfg = make_config(paigo, tmp_path, measurement(name="five", interval="5m"))
    counted, idle = Metrics(), Metrics()
    busy, quiet = new_agent(cfg, metrics=counted), new_agent(cfg, metrics=idle)
    try:
        assert busy.collect(cfg.measurements[0], datetime(2026, 11, 21, 10, 7, tzinfo=UTC)).ok
    finally:
        busy.close()
        quiet.close()
    calls = {"service": "ec2", "operation": "DescribeVolumes"}
    assert counted.value("usage_agent_samples_total", {"measurement": "five"}) == 1
    assert counted.value("usage_agent_aws_api_calls_total", calls) == 1
    assert counted.value("usage_agent_token_refreshes_total", {"kind": "aws_role"}) == 1
    assert idle.value("usage_agent_samples_total", {"measurement": "five"}) == 0
    assert idle.value("usage_agent_aws_api_calls_total", calls) == 0
