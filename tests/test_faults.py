"""Nothing lost: backend faults, poison input, a full disk and AWS throttling.

The equation every scenario must satisfy: the ids the backend accepted equal the ids
committed to the spool minus the dead-lettered ones; re-sends reuse the id (counted as
duplicates). Backoff and Retry-After waits pass on a fake clock, not in real time.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.stub import Stubber

from agent.config import parse_backend, parse_measurement
from agent.credentials import SessionFactory
from agent.forwarder import Forwarder
from agent.metrics import Metrics
from agent.samplers.base import Sample, Skipped, Target
from agent.samplers.ebs import VOLUMES
from agent.sinks import Backend, build_backend
from agent.spool import Spool
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
from tests.support import FakeClock, drain_on, make_records
from tests.test_runtime import new_agent

@dataclass
class Delivery:
    """A spool, a Paigo sink and a forwarder on one fake clock: only the backend's own delays are real."""

    spool: Spool
    sink: Backend
    forwarder: Forwarder
    clock: FakeClock

    def enqueue(self, records: list[Any]) -> set[str]:
        self.spool.commit_tick("ebs-storage", records[0].timestamp, records)
        return {r.record_id for r in records}

    def run_until_drained(self, rounds: int = 200) -> None:
        """Drain, jumping the fake clock over every backoff, until nothing is left to send."""
        drain_on(self.forwarder, self.spool, self.clock, rounds)

    def close(self) -> None:
        self.sink.close()
        self.spool.close()


@pytest.fixture
def deliver(tmp_path: Path) -> Any:
    """``deliver(url, token_url, **backend)``: a Delivery to that backend, closed after the test."""
    opened: list[Delivery] = []

    def build(url: str, token_url: str, **backend: Any) -> Delivery:
        cfg = parse_backend({"type": "paigo", "url": url, "token_url": token_url, "client_id": CLIENT_ID,
                             "client_secret": CLIENT_SECRET, "timeout": "1s", **backend})
        clock = FakeClock()
        spool = Spool(tmp_path / "spool.db", clock=clock)
        spool.claim()
        sink = build_backend(cfg, Metrics(), clock)  # token lifetimes on the same fake clock
        forwarder = Forwarder(spool, sink.sink, sink.client, metrics=Metrics(), clock=clock, batch_size=64)
        opened.append(Delivery(spool, sink, forwarder, clock))
        return opened[-1]

    yield build
    for delivery in opened:
        delivery.close()


def assert_nothing_lost(run: Delivery, server: PaigoContractServer, generated: set[str]) -> set[str]:
    """Accepted == generated - dead, nothing left in flight; the dead ids."""
    dead = {row["id"] for row in run.spool.rows("dead", 10**6)}
    assert server.accepted_ids() == generated - dead
    assert run.spool.counts()["pending"] == run.spool.counts()["leased"] == 0
    return dead


SCENARIOS: dict[str, list[Fault]] = {
    "5xx bursts": [Fault(status=code) for code in (500, 502, 503, 504) for _ in range(5)],
    "429 Retry-After seconds": [Fault(status=429, retry_after="3") for _ in range(6)],
    "429 Retry-After date": [Fault(status=429, retry_after=format_datetime(
        datetime(2030, 1, 1, tzinfo=timezone.utc), usegmt=True)) for _ in range(3)],
    # hung past the 1 s timeout and past the test's end: the test never waits for them, a late commit never lands
    "timeouts": [Fault(delay=10) for _ in range(4)],
    "commits then hangs": [Fault(after_commit=True, delay=10) for _ in range(4)],
    "dropped mid-response": [Fault(drop=True) for _ in range(3)] + [Fault(after_commit=True, drop=True) for _ in range(3)],
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_backend_faults_lose_nothing(name: str, paigo: PaigoContractServer, deliver: Any) -> None:
    run = deliver(paigo.url, paigo.token_url)
    generated = run.enqueue(make_records(60))
    paigo.script("/usage", *SCENARIOS[name])
    run.run_until_drained()
    assert assert_nothing_lost(run, paigo, generated) == set()
    assert paigo.usage_requests >= 60 + len(SCENARIOS[name])  # every scripted fault was met, then every record sent
    if "commits" in name or "mid-response" in name:
        assert paigo.duplicates() > 0  # an answer lost after the commit: the re-send reused the id
    else:
        assert paigo.duplicates() == 0  # nothing was accepted twice when no answer was lost


def test_401_after_token_revocation_inside_a_stream(paigo: PaigoContractServer, deliver: Any) -> None:
    run = deliver(paigo.url, paigo.token_url)
    generated = run.enqueue(make_records(200))
    for _ in range(2):  # the token is revoked between batches of 64, while records are streaming
        assert run.forwarder.pump().delivered == 64
        paigo.revoke_tokens()
    run.run_until_drained()
    assert assert_nothing_lost(run, paigo, generated) == set()
    assert paigo.token_requests == 3  # refreshed once per revocation, not once per record


def test_one_poison_record_in_a_busy_stream(paigo: PaigoContractServer, deliver: Any) -> None:
    run = deliver(paigo.url, paigo.token_url, max_in_flight=8)
    paigo.reject = lambda body: body["customerId"] == "poison"
    generated = run.enqueue(make_records(150) + make_records(1, customer="poison") + make_records(150, customer="beta"))
    run.run_until_drained()
    (poison,) = assert_nothing_lost(run, paigo, generated)
    (dead,) = run.spool.rows("dead")
    assert dead["id"] == poison and dead["last_status"] == 400 and "Customer not found" in dead["last_error"]
    assert len(paigo.accepted_ids()) == 300


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_connection_refused_until_the_backend_comes_up(deliver: Any) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    run = deliver(url, f"{url}/oauth/token")
    generated = run.enqueue(make_records(40))
    for _ in range(3):  # nobody listens: every attempt is refused
        run.forwarder.drain()
        run.clock.advance(400)
    assert run.spool.counts()["pending"] == 40
    with PaigoContractServer(client_id=CLIENT_ID, client_secret=CLIENT_SECRET, port=port) as server:
        run.run_until_drained()
        assert assert_nothing_lost(run, server, generated) == set()
        assert len(server.accepted_ids()) == 40


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
    target = Target(parse_measurement(measurement()), ACCOUNT, "us-east-1", TICK)
    with stubber:
        out = list(VOLUMES.sample(only(ec2), target))
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
    before = metrics.value("usage_agent_resources_skipped_total", {"measurement": "poison-tags", "reason": "invalid_customer"})
    (result,) = new_agent(cfg, spool, metrics=metrics).sample_all(datetime(2026, 11, 21, 10, tzinfo=timezone.utc))
    assert result.ok and [(r.customer_id, r.value) for r in result.records] == [("acme", 10)]
    after = metrics.value("usage_agent_resources_skipped_total", {"measurement": "poison-tags", "reason": "invalid_customer"})
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
    start = datetime.now(timezone.utc).timestamp()  # the role's credentials expire in real time
    metrics, clock = Metrics(), FakeClock(start)
    before = metrics.value("usage_agent_aws_api_errors_total", throttled)
    sessions = SessionFactory(metrics=metrics, clock=clock)  # botocore's backoff sleeps on the fake clock
    (result,) = new_agent(cfg, spool, metrics=metrics, sessions=sessions).sample_all(datetime(2026, 11, 21, 10, tzinfo=timezone.utc))
    assert aws_proxy.calls.count(("DescribeVolumes", "us-east-1")) == 4  # 3 throttled, then answered
    assert result.ok and [r.value for r in result.records] == [33]
    assert clock.time() > start  # the backoff waited, on the injected clock
    # each throttled attempt is counted, though botocore retried it and the tick succeeded
    assert metrics.value("usage_agent_aws_api_errors_total", throttled) == before + 3
    spool.close()
