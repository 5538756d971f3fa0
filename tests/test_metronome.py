"""Metronome sink: render and classify over httpx.MockTransport; delivery, faults and the CLI
against the Metronome-contract server on 127.0.0.1 with moto-sampled volumes."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.config import parse_backend, parse_config
from agent.convert import tick_floor
from agent.delivery import Delivery, bodies
from agent.errors import ConfigError
from agent.metrics import Metrics
from agent.records import record_id
from agent.sinks.base import Delivered, Rejected, RetryLater
from agent.sinks.metronome import MetronomeSink
from agent.sinks.transport import http_client
from agent.spool import Spool
from agent.testing.server import Fault
from tests.conftest import ACCOUNT, DIMENSION, Aws, backend_config, write_yaml
from tests.metronome_server import API_KEY, INGEST_PATH, MetronomeContractServer
from tests.support import FakeClock, cli, make_records
from tests.test_delivery import Pipeline
from tests.test_openmeter import MEASUREMENTS, seed
from tests.test_sink_seam import Peer

CLOCK_START = FakeClock().now()
RECENT = tick_floor(CLOCK_START - timedelta(days=3), 900)
METRONOME = {"type": "metronome", "url": "https://api.metronome.test", "api_key": API_KEY}


def sink_of(**overrides: Any) -> MetronomeSink:
    return MetronomeSink(parse_backend({**METRONOME, **overrides}))


def deliver(backend: Peer, records: list, clock: FakeClock | None = None) -> dict[str, Any]:
    delivery = Delivery(sink_of(), http_client(5.0, 8, httpx.MockTransport(backend)), Metrics(), clock or FakeClock())
    return {r.record_id: o for r, o in delivery.deliver(records)}


# --------------------------------------------------------------------------- render and classify

def test_events_go_out_100_per_request_as_metronome_documents_them() -> None:
    backend = Peer(lambda request: httpx.Response(200))
    records = make_records(150, start=RECENT, metadata={"region": "us-east-1", "value": "not the value"})
    got = deliver(backend, records)
    assert set(got.values()) == {Delivered(200)}
    first, second = backend.requests
    assert (first.method, str(first.url)) == ("POST", "https://api.metronome.test/v1/ingest")
    assert first.headers["Authorization"] == f"Bearer {API_KEY}"
    assert first.headers["Content-Type"] == "application/json"
    events = json.loads(first.content)
    assert (len(events), len(json.loads(second.content))) == (100, 50)
    assert events[0] == {"transaction_id": records[0].record_id, "customer_id": "acme", "event_type": "ebs-storage",
                         "timestamp": "2027-01-12T08:00:00Z", "properties": {"value": "1.75", "region": "us-east-1"}}
    assert bodies(sink_of(), records, FakeClock()) == [first.content, second.content]  # the dry run's lines


def test_a_rejected_batch_is_halved_and_retryable_answers_retried() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        events = json.loads(request.content)
        if any(e["customer_id"] == "poison" for e in events):
            return httpx.Response(400, json={"message": "[0] customer_id is unknown"})
        return httpx.Response(200)

    good = make_records(20, start=RECENT)
    poison = make_records(1, customer="poison", start=RECENT)[0]
    got = deliver(Peer(answer), good[:7] + [poison] + good[7:])
    assert isinstance(got[poison.record_id], Rejected) and "customer_id is unknown" in got[poison.record_id].body
    assert [got[r.record_id] for r in good] == [Delivered(200)] * 20
    statuses = iter([429, 503, 401])
    got = deliver(Peer(lambda request: httpx.Response(next(statuses), headers={"Retry-After": "4"})),
                  make_records(300, start=RECENT))
    assert {(o.status, o.retry_after, o.alert) for o in got.values() if isinstance(o, RetryLater)} == {
        (429, 4.0, False), (503, 4.0, False), (401, 4.0, True)}


def test_a_record_past_the_34_day_window_is_dead_lettered_unsent() -> None:
    backend = Peer(lambda request: httpx.Response(200))
    old = make_records(1, customer="old", start=CLOCK_START - timedelta(days=34, hours=1))[0]
    good = make_records(3, start=RECENT)
    got = deliver(backend, [old, *good])
    assert got[old.record_id] == Rejected(None, (
        "T 2026-12-12T07:00:00Z is 34 days 1 hour before 2027-01-15T08:00:00Z: Metronome takes events from the past "
        "34 days only, so it is not sent"))
    (request,) = backend.requests
    assert [e["transaction_id"] for e in json.loads(request.content)] == [r.record_id for r in good]


def test_config_defaults_and_errors(tmp_path: Path) -> None:
    cfg = parse_backend({"type": "metronome", "api_key": "m-key"})
    assert (cfg.url, cfg.timeout) == ("https://api.metronome.com", timedelta(seconds=10))
    for backend, problem in (({}, ("backend", "set exactly one of api_key or api_key_file")),
                             ({"api_key": "k", "batch_size": 10}, ("backend.batch_size", "unknown key")),
                             ({"api_key": "k\u00e9"}, ("backend", "the api_key must be printable ASCII, without line "
                                                                  "breaks or control characters"))):
        with pytest.raises(ConfigError) as info:
            parse_config(backend_config({"type": "metronome", **backend}, tmp_path), "<test>", {})
        assert info.value.problems == [problem]


# --------------------------------------------------------------------------- delivery and faults

@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def metronome(clock: FakeClock) -> Iterator[MetronomeContractServer]:
    with MetronomeContractServer(clock=clock.time) as server:
        yield server


@pytest.fixture
def pipeline(metronome: MetronomeContractServer, clock: FakeClock, tmp_path: Path) -> Iterator[Pipeline]:
    p = Pipeline.over(MetronomeSink(parse_backend({**METRONOME, "url": metronome.url, "timeout": "1s"})),
                      tmp_path / "spool.db", clock)
    yield p
    p.close()


def test_nothing_is_lost_under_faults(metronome: MetronomeContractServer, pipeline: Pipeline) -> None:
    metronome.script(INGEST_PATH, Fault(status=500), Fault(status=429, retry_after="30"), Fault(drop=True),
                     Fault(after_commit=True, drop=True), Fault(delay=1.5), Fault(status=503))
    records = make_records(250, start=RECENT)
    pipeline.enqueue(records)
    pipeline.run_until_drained()
    assert metronome.accepted_ids() == {r.record_id for r in records}
    assert pipeline.spool.counts() == {"pending": 0, "leased": 0, "delivered": 250, "dead": 0}
    assert metronome.duplicates() >= 1 and max(metronome.batch_sizes) == 100  # a lost answer's batch, ignored again


def test_a_poison_event_is_dead_lettered_and_its_batch_delivered(metronome: MetronomeContractServer,
                                                                 pipeline: Pipeline) -> None:
    metronome.reject = lambda event: "customer_id is unknown" if event["customer_id"] == "gone" else None
    good = make_records(99, start=RECENT)
    poison = make_records(1, customer="gone", start=RECENT)[0]
    unknown_field = replace(make_records(1, customer="x", start=RECENT)[0], customer_id="", record_id="e" * 32)
    pipeline.enqueue(good[:40] + [poison] + good[40:] + [unknown_field])
    pipeline.run_until_drained()
    assert metronome.accepted_ids() == {r.record_id for r in good}
    dead = {row["id"]: row for row in pipeline.spool.rows("dead")}
    assert dead.keys() == {poison.record_id, "e" * 32}
    assert json.loads(dead[poison.record_id]["last_error"]) == {"message": "[0] customer_id is unknown"}
    assert "customer_id is required" in dead["e" * 32]["last_error"]


# --------------------------------------------------------------------------- the CLI, over moto

AT = datetime.now(timezone.utc) - timedelta(hours=1)
TICK = tick_floor(AT, 900)


def usage_agent(*args: str) -> subprocess.CompletedProcess[str]:
    return cli(*args, env={**os.environ, "METRONOME_API_KEY": API_KEY})


def metronome_config(server: MetronomeContractServer, tmp_path: Path, spool: str = "spool.db") -> Path:
    return write_yaml(tmp_path / f"{spool}.yaml", backend_config(
        {"type": "metronome", "url": server.url, "api_key": "${METRONOME_API_KEY}"}, tmp_path, *MEASUREMENTS,
        spool={"path": str(tmp_path / spool)}))


def expected_events(volumes: dict[str, str]) -> dict[str, dict[str, Any]]:
    at = TICK.strftime("%Y-%m-%dT%H:%M:%SZ")
    gauge = {"environment": "prod", "measurement": "ebs-storage", "resource_type": "ebs", "metric": "size_gib",
             "unit": "GiB", "accounts": ACCOUNT}
    events = {}
    for customer, value, regions, count in (("acme", "107", "us-east-1", "2"), ("globex", "500", "eu-west-1", "1")):
        rid = record_id("ebs-storage", DIMENSION, customer, "aggregate", TICK)
        events[rid] = {"transaction_id": rid, "customer_id": customer, "event_type": "ebs_storage_gib", "timestamp": at,
                       "properties": {"value": value, **gauge, "regions": regions, "resource_count": count}}
    for key, value, volume_type in (("acme-100", "25", "gp3"), ("acme-7", "1.75", "gp2")):
        arn = f"arn:aws:ec2:us-east-1:{ACCOUNT}:volume/{volumes[key]}"
        rid = record_id("ebs-gib-hours", "dim-hours", "acme", arn, TICK)
        events[rid] = {"transaction_id": rid, "customer_id": "acme", "event_type": "ebs-gib-hours", "timestamp": at,
                       "properties": {"value": value, "measurement": "ebs-gib-hours", "resource_type": "ebs",
                                      "metric": "size_gib", "unit": "GiB-hours", "region": "us-east-1",
                                      "account": ACCOUNT, "resource_id": volumes[key], "volume_type": volume_type,
                                      "availability_zone": "us-east-1a"}}
    return events


def test_once_sends_exact_events_and_a_fresh_spool_ends_delivered(aws: Aws, tmp_path: Path) -> None:
    volumes = seed(aws)
    with MetronomeContractServer() as server:
        dry = usage_agent("once", "-c", str(metronome_config(server, tmp_path)), "--at", AT.isoformat(), "--dry-run")
        assert dry.returncode == 0, dry.stderr
        assert server.requests == 0
        done = usage_agent("once", "-c", str(metronome_config(server, tmp_path)), "--at", AT.isoformat())
        assert done.returncode == 0, done.stderr
        assert server.events == expected_events(volumes)
        assert [e for line in dry.stdout.splitlines() for e in json.loads(line)] == list(server.events.values())
        again = usage_agent("once", "-c", str(metronome_config(server, tmp_path, "fresh.db")), "--at", AT.isoformat())
        assert again.returncode == 0, again.stderr
        assert server.duplicates() == 4 and server.events == expected_events(volumes)
    spool = Spool.open_existing(tmp_path / "fresh.db", 1000)
    assert spool.counts() == {"pending": 0, "leased": 0, "delivered": 4, "dead": 0}
    spool.close()
    for output in (dry.stderr, dry.stdout, done.stderr, again.stderr):
        assert API_KEY not in output
    for path in tmp_path.glob("*.db*"):
        assert API_KEY.encode() not in path.read_bytes()


def test_once_dead_letters_a_poison_event_and_delivers_the_rest(aws: Aws, tmp_path: Path) -> None:
    volumes = seed(aws)
    reject = lambda event: "customer_id is unknown" if event["customer_id"] == "globex" else None  # noqa: E731
    with MetronomeContractServer(reject=reject) as server:
        done = usage_agent("once", "-c", str(metronome_config(server, tmp_path)), "--at", AT.isoformat())
    assert done.returncode == 1, done.stderr
    globex = record_id("ebs-storage", DIMENSION, "globex", "aggregate", TICK)
    assert server.events == {rid: e for rid, e in expected_events(volumes).items() if rid != globex}
    spool = Spool.open_existing(tmp_path / "spool.db", 1000)
    (dead,) = spool.rows("dead")
    spool.close()
    assert (dead["id"], dead["last_status"]) == (globex, 400) and "customer_id is unknown" in dead["last_error"]


def test_the_server_refuses_what_metronome_refuses(metronome: MetronomeContractServer) -> None:
    def post(events: Any) -> httpx.Response:
        return httpx.post(f"{metronome.url}{INGEST_PATH}", json=events, timeout=5,
                          headers={"Authorization": f"Bearer {API_KEY}"})

    event = {"transaction_id": "t1", "customer_id": "c", "event_type": "e", "timestamp": "2027-01-15T07:00:00Z",
             "properties": {"value": "1"}}
    assert post([event]).status_code == 200
    assert post([event]).status_code == 200 and metronome.duplicates() == 1  # a repeat is ignored, answered alike
    assert "unknown field(s) value" in post([{**event, "value": "1"}]).json()["message"]
    assert post([{**event, "timestamp": "2026-12-01T00:00:00Z"}]).status_code == 400  # past the 34 days
    assert post([event] * 101).status_code == 400 and post([]).status_code == 400
    assert metronome.accepted_ids() == {"t1"}
