"""Nothing lost: backend faults, poison input, a full disk and AWS throttling.

The equation every scenario must satisfy: the ids the backend accepted equal the ids
committed to the spool minus the dead-lettered ones; re-sends reuse the id (counted as
duplicates); the dropped-records counter stays 0.
"""

from __future__ import annotations

import socket
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.stub import Stubber

from agent.config import Measurement
from agent.samplers.base import Sample, Skipped, Target
from agent.samplers.ebs import sample_volumes
from agent.sinks.paigo import PaigoSink
from agent.spool import Spool
from agent.metrics import Metrics
from agent.testing.paigo_server import Fault, PaigoContractServer
from tests.conftest import (
    ACCOUNT,
    CLIENT_ID,
    CLIENT_SECRET,
    TICK,
    Aws,
    AwsProxy,
    aws_error,
    make_config,
    measurement,
    only,
)
from tests.test_delivery import FakeClock, Pipeline, make_records
from tests.test_runtime import new_agent

REPORT: list[tuple[str, int, int, int, int, int]] = []


def run_with(url: str, token_url: str, tmp_path: Path, **sink: Any) -> tuple[Pipeline, PaigoSink]:
    clock = FakeClock()
    paigo_sink = PaigoSink(backend_for(url, token_url, **sink), monotonic=clock)  # token times on the same fake clock
    return Pipeline.over(paigo_sink, tmp_path / "spool.db", clock, batch_size=64), paigo_sink


def backend_for(url: str, token_url: str, **overrides: Any):
    from agent.config import PaigoBackend

    return PaigoBackend.model_validate({"type": "paigo", "url": url, "token_url": token_url, "client_id": CLIENT_ID,
                                        "client_secret": CLIENT_SECRET, "timeout": "1s", **overrides})


def check_nothing_lost(name: str, run: Pipeline, server: PaigoContractServer, generated: set[str]) -> None:
    dead = {row["id"] for row in run.spool.rows("dead", 10**6)}
    accepted = server.accepted_ids()
    assert accepted == generated - dead, name
    assert run.spool.counts()["pending"] == run.spool.counts()["leased"] == 0
    REPORT.append((name, len(generated), len(accepted), server.duplicates(), len(dead),
                   len(generated - accepted - dead)))


SCENARIOS: dict[str, list[Fault]] = {
    "5xx bursts": [Fault(status=code) for code in (500, 502, 503, 504) for _ in range(5)],
    "429 Retry-After seconds": [Fault(status=429, retry_after="3") for _ in range(6)],
    "429 Retry-After date": [Fault(status=429, retry_after=format_datetime(
        datetime(2030, 1, 1, tzinfo=timezone.utc), usegmt=True)) for _ in range(3)],
    "timeouts": [Fault(delay=1.3) for _ in range(4)],
    "commits then hangs": [Fault(after_commit=True, delay=1.3) for _ in range(4)],
    "dropped mid-response": [Fault(drop=True) for _ in range(3)] + [Fault(after_commit=True, drop=True) for _ in range(3)],
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_backend_faults_lose_nothing(name: str, paigo: PaigoContractServer, tmp_path: Path) -> None:
    run, sink = run_with(paigo.url, paigo.token_url, tmp_path)
    records = make_records(60)
    run.spool.commit_tick("ebs-storage", records[0].timestamp, records)
    paigo.script("/usage", *SCENARIOS[name])
    run.run_until_drained(200)
    check_nothing_lost(name, run, paigo, {r.record_id for r in records})
    if "hangs" not in name and "mid-response" not in name:
        assert paigo.duplicates() == 0  # nothing was accepted twice when no answer was lost
    sink.close()


def test_401_after_token_revocation_inside_a_stream(paigo: PaigoContractServer, tmp_path: Path) -> None:
    run, sink = run_with(paigo.url, paigo.token_url, tmp_path)
    records = make_records(200)
    run.spool.commit_tick("ebs-storage", records[0].timestamp, records)
    for _ in range(2):  # the token is revoked between batches of 64, while records are streaming
        assert run.forwarder.pump().delivered == 64
        paigo.revoke_tokens()
    run.run_until_drained(200)
    check_nothing_lost("401 after token revocation", run, paigo, {r.record_id for r in records})
    assert paigo.token_requests == 3  # refreshed once per revocation, not once per record
    sink.close()


def test_one_poison_record_in_a_busy_stream(paigo: PaigoContractServer, tmp_path: Path) -> None:
    run, sink = run_with(paigo.url, paigo.token_url, tmp_path, max_in_flight=8)
    records = make_records(150) + make_records(1, customer="poison") + make_records(150, customer="beta")
    paigo.reject = lambda body: body["customerId"] == "poison"
    run.spool.commit_tick("ebs-storage", records[0].timestamp, records)
    run.run_until_drained(200)
    check_nothing_lost("400 for one record in a busy stream", run, paigo, {r.record_id for r in records})
    (dead,) = run.spool.rows("dead")
    assert dead["last_status"] == 400 and "Customer not found" in dead["last_error"]
    sink.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_connection_refused_until_the_backend_comes_up(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    run, sink = run_with(url, f"{url}/oauth/token", tmp_path)
    records = make_records(40)
    run.spool.commit_tick("ebs-storage", records[0].timestamp, records)
    for _ in range(3):  # nobody listens: every attempt is refused
        run.forwarder.drain()
        run.clock.advance(400)
    assert run.spool.counts()["pending"] == 40
    with PaigoContractServer(client_id=CLIENT_ID, client_secret=CLIENT_SECRET, port=port) as server:
        run.run_until_drained(200)
        check_nothing_lost("connection refused", run, server, {r.record_id for r in records})
    sink.close()


def test_report(capsys: pytest.CaptureFixture[str]) -> None:
    """Prints the table of the scenarios above (run with -s to see it)."""
    with capsys.disabled():
        print("\nscenario                               generated delivered duplicates dead lost")
        for row in REPORT:
            print(f"{row[0]:<38} {row[1]:>9} {row[2]:>9} {row[3]:>10} {row[4]:>4} {row[5]:>4}")
    assert all(row[5] == 0 for row in REPORT)


# -- poison input from AWS ------------------------------------------------------------------


def test_absurd_volumes_are_skipped_with_a_reason_and_the_rest_sampled() -> None:
    # moto will not store a negative or missing size; the Stubber answers as AWS would if it did
    ec2 = boto3.client("ec2", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
    volumes = [
        {"VolumeId": "vol-good", "Size": 10, "VolumeType": "gp3", "State": "available", "Tags": []},
        {"VolumeId": "vol-negative", "Size": -5, "VolumeType": "gp3", "State": "available"},
        {"VolumeId": "vol-nosize", "VolumeType": "gp3", "State": "available"},
        {"VolumeId": "vol-badiops", "Size": 1, "Iops": -1, "VolumeType": "io1", "State": "available"},
    ]
    stubber = Stubber(ec2)
    stubber.add_response("describe_volumes", {"Volumes": volumes})
    target = Target(Measurement.model_validate(measurement()), ACCOUNT, "us-east-1", TICK)
    with stubber:
        out = list(sample_volumes(only(ec2), target))
    assert [s.resource_id for s in out if isinstance(s, Sample)] == ["vol-good"]
    reasons = {s.resource_id: s.reason for s in out if isinstance(s, Skipped)}
    assert set(reasons) == {"vol-negative", "vol-nosize", "vol-badiops"}
    assert "absurd value: -5" in reasons["vol-negative"] and "missing" in reasons["vol-nosize"]


def test_an_unusable_customer_tag_is_skipped_and_counted(aws: Aws, paigo: PaigoContractServer, tmp_path: Path) -> None:
    aws.volume("us-east-1", 10, tags={"customer-id": "acme"})
    bad = aws.volume("us-east-1", 20, tags={"customer-id": " acme "})
    cfg = make_config(paigo, tmp_path, measurement(name="poison-tags"))
    spool = Spool(cfg.spool.path)
    metrics = Metrics()
    before = metrics.value("usage_agent_resources_skipped_total",
                           {"measurement": "poison-tags", "reason": "invalid_customer"})
    (result,) = new_agent(cfg, spool, metrics=metrics).sample_all(datetime(2026, 11, 21, 10, tzinfo=timezone.utc))
    assert result.ok and [(r.customer_id, r.value) for r in result.records] == [("acme", 10)]
    after = metrics.value("usage_agent_resources_skipped_total",
                          {"measurement": "poison-tags", "reason": "invalid_customer"})
    assert after == before + 1 and bad
    spool.close()


# -- a full disk ---------------------------------------------------------------------------


def test_a_full_disk_fails_the_tick_keeps_the_state_and_recovers(aws: Aws, paigo: PaigoContractServer, tmp_path: Path) -> None:
    aws.volume("us-east-1", 5, tags={"customer-id": "acme"})
    cfg = make_config(paigo, tmp_path)
    spool = Spool(cfg.spool.path)
    agent = new_agent(cfg, spool)
    t0 = datetime(2026, 11, 21, 10, tzinfo=timezone.utc)
    assert agent.sample_all(t0)[0].ok

    pages = spool._db.execute("PRAGMA page_count").fetchone()[0]
    spool._db.execute(f"PRAGMA max_page_count={pages}")  # as if the disk had no room left
    fat = measurement(metadata={f"k{i}": "x" * 200 for i in range(40)})  # records that need new pages
    agent_full = new_agent(make_config(paigo, tmp_path, fat), spool)
    failed = agent_full.sample_all(t0 + timedelta(minutes=15))[0]
    assert not failed.ok and "full" in (failed.error or "")
    assert spool.last_tick("ebs-storage") == "2026-11-21T10:00:00Z"  # state did not advance
    assert spool.counts()["pending"] == 1

    spool._db.execute("PRAGMA max_page_count=1073741823")  # space is back
    assert agent_full.sample_all(t0 + timedelta(minutes=30))[0].ok
    assert spool.last_tick("ebs-storage") == "2026-11-21T10:30:00Z"
    assert spool.counts()["pending"] == 2
    spool.close()


# -- AWS throttling ------------------------------------------------------------------------

def test_throttling_is_retried_and_the_tick_completes(aws: Aws, aws_proxy: AwsProxy,
                                                     paigo: PaigoContractServer, tmp_path: Path) -> None:
    aws.volume("us-east-1", 33, tags={"customer-id": "acme"})
    throttle = [3]

    def throttled(action: str, region: str) -> tuple[int, bytes] | None:
        if action == "DescribeVolumes" and throttle[0] > 0:
            throttle[0] -= 1
            return aws_error("RequestLimitExceeded", "Request limit exceeded.", 503)
        return None

    aws_proxy.rules.append(throttled)
    cfg = make_config(paigo, tmp_path)
    spool = Spool(cfg.spool.path)
    throttled = {"service": "ec2", "operation": "DescribeVolumes", "code": "RequestLimitExceeded"}
    metrics = Metrics()
    before = metrics.value("usage_agent_aws_api_errors_total", throttled)
    (result,) = new_agent(cfg, spool, metrics=metrics).sample_all(datetime(2026, 11, 21, 10, tzinfo=timezone.utc))
    assert aws_proxy.calls.count(("DescribeVolumes", "us-east-1")) == 4  # 3 throttled, then answered
    assert result.ok and [r.value for r in result.records] == [33]
    # each throttled attempt is counted, though botocore retried it and the tick succeeded
    assert metrics.value("usage_agent_aws_api_errors_total", throttled) == before + 3
    spool.close()
