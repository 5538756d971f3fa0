"""Scheduler wiring: aligned triggers, job options, nearest-tick sampling, stop before start."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest
from apscheduler.schedulers.base import STATE_STOPPED

from agent.credentials import SessionFactory
from agent.forwarder import Forwarder
from agent.runtime import Agent, Daemon
from agent.clock import SystemClock
from agent.metrics import Metrics
from agent.sinks import Backend, build_backend
from agent.spool import Spool
from agent.testing.paigo_server import PaigoContractServer
from tests.conftest import Aws, make_config, measurement

UTC = timezone.utc


@pytest.fixture
def daemon_parts(aws: Aws, paigo: PaigoContractServer, tmp_path: Path) -> Iterator[tuple[Agent, Forwarder, Backend]]:
    cfg = make_config(paigo, tmp_path, measurement(name="five", interval="5m"), measurement(name="hourly", interval="1h"))
    spool = Spool(cfg.spool.path)
    spool.claim()
    sink = build_backend(cfg.backend, Metrics(), SystemClock())
    yield Agent(cfg, SessionFactory(), spool), Forwarder(spool, sink.sink, sink.client), sink
    sink.close()
    spool.close()


def test_one_aligned_job_per_measurement_plus_the_forwarder(daemon_parts) -> None:
    agent, forwarder, sink = daemon_parts
    daemon = Daemon(agent, forwarder, sink)
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
    daemon = Daemon(agent, forwarder, sink, clock=lambda: early)
    daemon._sample_job(agent.cfg.measurements[0])
    assert agent.spool.last_tick("five") == "2026-11-21T10:00:00Z"


def test_a_stop_requested_before_start_is_honoured(daemon_parts) -> None:
    agent, forwarder, sink = daemon_parts
    requested = threading.Event()
    requested.set()
    daemon = Daemon(agent, forwarder, sink, stop_requested=requested)
    started = time.monotonic()
    daemon.run()
    assert time.monotonic() - started < 5
    assert daemon.scheduler.state == STATE_STOPPED
    assert forwarder.stopping.is_set()
