"""Logs (redaction, context), metrics and the health endpoints, read over 127.0.0.1."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest
import structlog
from prometheus_client.parser import text_string_to_metric_families

from agent import __version__
from agent.clock import SystemClock
from agent.credentials import SessionFactory
from agent.daemon import Daemon
from agent.forwarder import Forwarder
from agent.metrics import Metrics
from agent.sinks import build_backend
from agent.spool import Spool
from agent.telemetry import REDACTED, configure_logging, redact_secrets, redact_text
from agent.testing.paigo_server import Fault, PaigoContractServer
from tests.conftest import ACCOUNT, EXTERNAL_ID, ROLE_ARN, Aws, agent_command, make_config, measurement, write_config
from tests.support import FakeClock, wait_for
from tests.test_runtime import new_agent


def test_secret_keys_and_bearer_tokens_are_redacted() -> None:
    event = redact_secrets(None, "info", {
        "event": "request",
        "client_secret": "s3cr3t",
        "token": "abc",
        "header": "Authorization: Bearer eyJhbGciOi.payload.sig",
        "region": "us-east-1",
    })
    assert event["client_secret"] == REDACTED and event["token"] == REDACTED
    assert event["header"] == f"Authorization: {REDACTED}"
    assert event["region"] == "us-east-1" and event["event"] == "request"


def test_library_logs_are_rendered_as_json_and_redacted(monkeypatch) -> None:
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    configure_logging("info", json_output=True)
    try:
        logging.getLogger("apscheduler.scheduler").warning("job missed; Bearer abc.def.ghi")
        structlog.get_logger("agent").info("tick", client_secret="hunter2")
    finally:
        logging.getLogger().handlers.clear()
        structlog.reset_defaults()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert lines[0]["logger"] == "apscheduler.scheduler" and lines[0]["level"] == "warning"
    assert "abc.def.ghi" not in lines[0]["event"] and REDACTED in lines[0]["event"]
    assert lines[1]["client_secret"] == REDACTED
    assert "hunter2" not in stream.getvalue()


def test_debug_logs_of_aws_calls_keep_the_session_credentials_out(aws: Aws, monkeypatch) -> None:
    """botocore at debug dumps the AssumeRole answer and the signed headers; the secrets are scrubbed."""
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    configure_logging("debug", json_output=True)
    try:
        sessions = SessionFactory(metrics=Metrics(), clock=SystemClock())
        sessions.client("ec2", "us-east-1", ROLE_ARN, EXTERNAL_ID).describe_volumes()
        frozen = sessions.credentials(ROLE_ARN, EXTERNAL_ID).get_frozen_credentials()
    finally:
        logging.getLogger().handlers.clear()
        logging.getLogger().setLevel(logging.WARNING)
        structlog.reset_defaults()
    text = stream.getvalue()
    assert "<SessionToken>" in text and "x-amz-security-token" in text.lower()  # the lines were logged
    assert frozen.token not in text and frozen.secret_key not in text


@pytest.mark.parametrize("text, redacted", [
    ("{'X-Amz-Security-Token': b'FQoG+/=', 'Content-Type': b'text/xml'}",
     "{'X-Amz-Security-Token': b'[redacted]', 'Content-Type': b'text/xml'}"),
    ("<SecretAccessKey>abc/+</SecretAccessKey><Expiration>2026</Expiration>",
     "<SecretAccessKey>[redacted]</SecretAccessKey><Expiration>2026</Expiration>"),
    ('{"access_token": "eyJ.x.y", "expires_in": 3600}', '{"access_token": "[redacted]", "expires_in": 3600}'),
    ("https://s3/x?X-Amz-Security-Token=abc%2F&X-Amz-Date=1", "https://s3/x?X-Amz-Security-Token=[redacted]&X-Amz-Date=1"),
    ("host:127.0.0.1\nx-amz-security-token:FQoG==\nx-amz-date:1", "host:127.0.0.1\nx-amz-security-token:[redacted]\nx-amz-date:1"),
    ("tick spooled for acme in us-east-1", "tick spooled for acme in us-east-1"),
])
def test_secrets_inside_text_are_redacted(text: str, redacted: str) -> None:
    assert redact_text(text) == redacted


# -- /metrics, /healthz, /readyz -----------------------------------------------------------


def scrape(base: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """/metrics as {(sample name, sorted labels): value}."""
    response = httpx.get(f"{base}/metrics", timeout=10)
    assert response.status_code == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def test_a_running_agent_serves_metrics_health_and_readiness(
    aws: Aws, paigo: PaigoContractServer, tmp_path: Path
) -> None:
    aws.volume("us-east-1", 12, tags={"customer-id": "acme"})
    aws.volume("us-east-1", 3)  # untagged: skipped
    paigo.script("/usage", Fault(status=503, retry_after="0"))  # one refusal, then accepted
    config = write_config(paigo, tmp_path, measurement(interval="2s", mode="time_weighted", per="second"))
    daemon = subprocess.Popen([*agent_command(), "run", "-c", str(config)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(daemon.stderr), daemon=True)  # type: ignore[arg-type]
    reader.start()
    try:
        wait_for(lambda: any('"agent started"' in line for line in lines))
        started = json.loads(next(line for line in lines if '"agent started"' in line))
        host, port = started["listen"].rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) > 0
        base = f"http://127.0.0.1:{port}"

        assert httpx.get(f"{base}/healthz").json() == {"status": "ok"}
        wait_for(lambda: len(paigo.accepted) >= 1)
        ready = httpx.get(f"{base}/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json()["status"] == "ready" and ready.json()["failed"] == []
        assert [c["name"] for c in ready.json()["checks"]] == ["config", "spool_writable", "spool_not_full",
                                                               "delivery", "tick:ebs-storage"]

        metrics = scrape(base)
        m = (("measurement", "ebs-storage"),)
        ticks = metrics[("usage_agent_tick_duration_seconds_count", m)]
        assert ticks >= 1
        # two volumes sampled per tick (the untagged one is skipped after sampling); a tick may be under way
        assert 2 * ticks <= metrics[("usage_agent_samples_total", m)] <= 2 * (ticks + 1)
        assert ticks <= metrics[("usage_agent_resources_skipped_total", m + (("reason", "untagged"),))] <= ticks + 1
        assert ticks <= metrics[("usage_agent_records_spooled_total", m)] <= ticks + 1
        assert metrics[("usage_agent_records_delivered_total", ())] >= 1
        assert metrics[("usage_agent_backend_responses_total", (("status", "503"),))] == 1
        assert metrics[("usage_agent_backend_responses_total", (("status", "200"),))] >= 2  # token + a record
        assert metrics[("usage_agent_token_refreshes_total", (("kind", "aws_role"),))] == 1
        assert metrics[("usage_agent_token_refreshes_total", (("kind", "backend"),))] == 1
        assert ("usage_agent_spool_depth", ()) in metrics and ("usage_agent_oldest_unsent_age_seconds", ()) in metrics
        assert metrics[("usage_agent_spool_full", ())] == 0
        build = [k for k in metrics if k[0] == "usage_agent_build_info"]
        assert len(build) == 1 and ("version", __version__) in build[0][1]
        assert httpx.get(f"{base}/nope").status_code == 404
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=30)
        finally:
            daemon.kill()
    reader.join(timeout=10)
    assert daemon.returncode == 0, "".join(lines)
    events = [json.loads(line) for line in lines if line.startswith("{")]
    tick_lines = [e for e in events if "tick" in e]
    assert {"tick spooled", "resource has no customer tag; skipped"} <= {e["event"] for e in tick_lines}
    for event in tick_lines:  # every line of a tick says what, where and in which account
        assert event["measurement"] == "ebs-storage", event
        assert event["account"] == ACCOUNT and event["region"] == "us-east-1", event


@pytest.fixture
def in_process(aws: Aws, paigo: PaigoContractServer, tmp_path: Path):
    """A daemon with an injected clock, its endpoints served on 127.0.0.1; the scheduler is not started."""
    clock = FakeClock(datetime(2026, 11, 21, 10, 0, 30, tzinfo=timezone.utc).timestamp())
    bulky = {f"k{i}": "x" * 200 for i in range(40)}  # records that need new pages in the spool
    cfg = make_config(paigo, tmp_path, measurement(name="five", interval="5m", metadata=bulky))
    spool = Spool(cfg.spool.path, max_records=2)
    spool.claim()
    agent = new_agent(cfg, spool, clock=clock)
    sink = build_backend(cfg.backend, agent.metrics, clock)
    daemon = Daemon(agent, Forwarder(spool, sink.sink, sink.client, metrics=agent.metrics, clock=clock), sink,
                    metrics=agent.metrics, clock=clock)
    host, port = daemon.server.start()
    yield daemon, clock, f"http://{host}:{port}"
    daemon.server.stop()
    sink.close()
    spool.close()


def readyz(base: str) -> tuple[int, dict]:
    response = httpx.get(f"{base}/readyz")
    return response.status_code, response.json()


def test_not_ready_when_a_measurement_has_not_ticked_for_two_intervals(aws: Aws, in_process) -> None:
    daemon, clock, base = in_process
    aws.volume("us-east-1", 4, tags={"customer-id": "acme"})
    m = daemon.agent.cfg.measurements[0]
    assert readyz(base)[0] == 200  # just started: the first tick is not due yet

    clock.advance(timedelta(minutes=10).total_seconds())  # exactly two intervals without a tick: still ready
    assert readyz(base)[0] == 200
    clock.advance(timedelta(seconds=1).total_seconds())
    status, body = readyz(base)
    assert status == 503 and body["status"] == "not ready" and body["failed"] == ["tick:five"]
    (tick,) = [c for c in body["checks"] if c["name"] == "tick:five"]
    assert tick["detail"] == "no tick since the start at 2026-11-21T10:00:30Z, 601s ago; the limit is two intervals (600s)"

    assert daemon.agent.sample_tick(m, clock.now()).ok  # tick 10:10
    assert readyz(base)[0] == 200
    clock.advance(timedelta(minutes=9).total_seconds())  # 10:19:31: the 10:10 tick is 571 s old
    assert readyz(base)[0] == 200
    clock.advance(timedelta(minutes=1).total_seconds())
    assert readyz(base)[1]["failed"] == ["tick:five"]


def test_not_ready_while_the_spool_is_full_until_it_drains(aws: Aws, in_process) -> None:
    daemon, clock, base = in_process
    for customer in ("acme", "globex"):
        aws.volume("us-east-1", 4, tags={"customer-id": customer})
    m = daemon.agent.cfg.measurements[0]
    assert daemon.agent.sample_tick(m, clock.now()).ok  # two records: the spool's cap
    refused = daemon.agent.sample_tick(m, clock.now() + timedelta(minutes=5))
    assert not refused.ok and "max_records" in (refused.error or "")
    status, body = readyz(base)
    assert status == 503 and body["failed"] == ["spool_not_full"]
    assert scrape(base)[("usage_agent_spool_depth", ())] == 2

    assert daemon.forwarder.drain().delivered == 2
    assert readyz(base)[0] == 200
    metrics = scrape(base)
    assert metrics[("usage_agent_spool_full", ())] == 0 and metrics[("usage_agent_spool_depth", ())] == 0


def test_not_ready_while_the_spool_cannot_be_written(aws: Aws, in_process) -> None:
    daemon, clock, base = in_process
    aws.volume("us-east-1", 4, tags={"customer-id": "acme"})
    spool = daemon.agent.spool
    m = daemon.agent.cfg.measurements[0]
    pages = spool._db.execute("PRAGMA page_count").fetchone()[0]
    spool._db.execute(f"PRAGMA max_page_count={pages}")  # as if the disk had no room left
    assert not daemon.agent.sample_tick(m, clock.now()).ok
    status, body = readyz(base)
    assert status == 503 and body["failed"] == ["spool_writable"]
    (check,) = [c for c in body["checks"] if c["name"] == "spool_writable"]
    assert "full" in check["detail"]

    spool._db.execute("PRAGMA max_page_count=1073741823")  # room again
    assert daemon.agent.sample_tick(m, clock.now()).ok
    assert readyz(base)[0] == 200


def test_a_tick_that_overruns_skips_the_next_one_and_counts_it(aws: Aws, paigo: PaigoContractServer,
                                                               tmp_path: Path) -> None:
    """The real scheduler, with its runs made due by hand rather than by waiting for them."""
    aws.volume("us-east-1", 4, tags={"customer-id": "acme"})
    cfg = make_config(paigo, tmp_path, measurement(name="hourly", interval="1h"))
    spool = Spool(cfg.spool.path)
    spool.claim()
    agent = new_agent(cfg, spool)
    sink = build_backend(cfg.backend, agent.metrics, agent.clock)
    daemon = Daemon(agent, Forwarder(spool, sink.sink, sink.client, metrics=agent.metrics, clock=agent.clock), sink,
                    metrics=agent.metrics, clock=agent.clock)
    labels = {"measurement": "hourly", "reason": "overran"}
    before = agent.metrics.value("usage_agent_ticks_skipped_total", labels)
    blocker = sqlite3.connect(cfg.spool.path, isolation_level=None, check_same_thread=False)
    blocker.execute("BEGIN IMMEDIATE")  # the tick's commit waits on this writer: the tick overruns
    due_now = {"next_run_time": datetime.now(timezone.utc)}
    daemon.scheduler.modify_job("sample:hourly", **due_now)  # the first tick runs as the scheduler starts
    seen: list[bool] = []

    def watch() -> None:
        try:
            wait_for(lambda: agent.metrics.value("usage_agent_samples_total", {"measurement": "hourly"}) == 1)
            daemon.scheduler.modify_job("sample:hourly", **due_now)  # the next one is due while it still runs
            wait_for(lambda: agent.metrics.value("usage_agent_ticks_skipped_total", labels) > before)
            seen.append(True)
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
            daemon.request_stop()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        daemon.run()  # signal handlers need the main thread; the watcher stops it
        watcher.join(timeout=60)
        assert seen == [True]
        assert agent.metrics.value("usage_agent_ticks_skipped_total", labels) == before + 1
        assert spool.last_tick("hourly") is not None  # the overrunning tick itself was committed once unblocked
    finally:
        agent.close()
        sink.close()
        spool.close()


def test_the_listen_address_in_use_is_a_clear_startup_error(aws: Aws, paigo: PaigoContractServer,
                                                            tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(paigo, tmp_path)
        text = config.read_text().replace("127.0.0.1:0", f"127.0.0.1:{port}")
        config.write_text(text)
        done = subprocess.run([*agent_command(), "run", "-c", str(config)], capture_output=True, text=True,
                              timeout=60, env=dict(os.environ))
    assert done.returncode == 1
    assert f"cannot serve /metrics, /healthz, /readyz on server.listen=127.0.0.1:{port}" in done.stderr
    assert "Address already in use" in done.stderr
