"""OpenMeter sink and forwarder against the OpenMeter-contract server on 127.0.0.1."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from agent.config import SOURCE_PATTERN, parse_backend, parse_config
from agent.records import record_id
from agent.delivery import Delivery, bodies
from agent.forwarder import Forwarder
from agent.metrics import Metrics
from agent.sinks import build_backend
from agent.sinks.openmeter import OpenMeterSink
from agent.spool import Spool
from tests.openmeter_server import OpenMeterContractServer, event_validator
from agent.testing.server import Fault
from tests.conftest import ACCOUNT, DIMENSION, Aws, backend_config, measurement, write_yaml
from tests.support import FakeClock, cli, make_records
from tests.test_delivery import TICK, Pipeline
from tests.test_runtime import new_agent

TOKEN = "om-6f1c2b7e"
AT = datetime(2026, 11, 21, 10, 7, 30, tzinfo=timezone.utc)  # inside the 15-minute tick 10:00


@pytest.fixture
def openmeter() -> Iterator[OpenMeterContractServer]:
    with OpenMeterContractServer(token=TOKEN) as server:
        yield server


def om_backend(server: OpenMeterContractServer, **overrides: Any) -> dict[str, Any]:
    return {"type": "openmeter", "url": server.url, "token": TOKEN, **overrides}


def om_pipeline(server: OpenMeterContractServer, tmp_path: Path, name: str = "spool.db", **backend: Any) -> Pipeline:
    sink = OpenMeterSink(parse_backend(om_backend(server, timeout="1s", **backend)))
    return Pipeline.over(sink, tmp_path / name)


@pytest.fixture
def pipeline(openmeter: OpenMeterContractServer, tmp_path: Path) -> Iterator[Pipeline]:
    p = om_pipeline(openmeter, tmp_path)
    yield p
    p.close()


def seed(aws: Aws) -> dict[str, str]:
    return {
        "acme-100": aws.volume("us-east-1", 100, "gp3", {"customer-id": "acme"}),
        "acme-7": aws.volume("us-east-1", 7, "gp2", {"customer-id": "acme"}),
        "globex-500": aws.volume("eu-west-1", 500, "gp3", {"customer-id": "globex"}),
        "untagged": aws.volume("eu-west-1", 30, "gp2"),
    }


MEASUREMENTS = (
    measurement(name="ebs-storage", regions=["us-east-1", "eu-west-1"], event_type="ebs_storage_gib",
                metadata={"environment": "prod"}),
    measurement(name="ebs-gib-hours", mode="time_weighted", per="hour", dimension_id="dim-hours",
                group_by="resource", regions=["us-east-1"]),
)


def sample_and_forward(server: OpenMeterContractServer, tmp_path: Path, spool_name: str = "spool.db") -> list[Any]:
    cfg = parse_config(backend_config(om_backend(server), tmp_path, *MEASUREMENTS,
                                      spool={"path": str(tmp_path / spool_name)}), "<test>", {})
    spool = Spool(cfg.spool.path, clock=FakeClock())
    spool.claim()
    agent = new_agent(cfg, spool)
    sink = build_backend(cfg.backend, agent.metrics, FakeClock())
    try:
        results = agent.sample_all(AT)
        Forwarder(spool, sink.sink, sink.client, clock=FakeClock()).drain()
        assert spool.counts()["delivered"] == sum(len(r.records) for r in results)
        return [record for r in results for record in r.records]
    finally:
        agent.close()
        sink.close()
        spool.close()


def test_exact_events_for_known_volumes(aws: Aws, openmeter: OpenMeterContractServer, tmp_path: Path) -> None:
    volumes = seed(aws)
    sample_and_forward(openmeter, tmp_path)

    def event(event_id: str, event_type: str, subject: str, data: dict[str, str]) -> dict[str, Any]:
        return {"specversion": "1.0", "id": event_id, "source": "usage-agent", "type": event_type, "subject": subject,
                "time": "2026-11-21T10:00:00Z", "datacontenttype": "application/json", "data": data}

    gauge = {"environment": "prod", "measurement": "ebs-storage", "resource_type": "ebs", "metric": "size_gib",
             "unit": "GiB", "dimension_id": DIMENSION, "resource": "aggregate"}
    hours = {"measurement": "ebs-gib-hours", "resource_type": "ebs", "metric": "size_gib", "unit": "GiB-hours",
             "dimension_id": "dim-hours", "region": "us-east-1", "account": ACCOUNT, "availability_zone": "us-east-1a"}
    expected = {
        # per customer: the ids are pinned, so a change to the id scheme (and to OpenMeter's dedup) shows here
        "b1c76ccf68f6f2576b8509538b4c56b3": event(
            "b1c76ccf68f6f2576b8509538b4c56b3", "ebs_storage_gib", "acme",
            {**gauge, "value": "107", "regions": "us-east-1", "accounts": ACCOUNT, "resource_count": "2"}),
        "cf64ccad60362e9178c6b552246865e5": event(
            "cf64ccad60362e9178c6b552246865e5", "ebs_storage_gib", "globex",
            {**gauge, "value": "500", "regions": "eu-west-1", "accounts": ACCOUNT, "resource_count": "1"}),
    }
    for key, value, volume_type in (("acme-100", "25", "gp3"), ("acme-7", "1.75", "gp2")):
        arn = f"arn:aws:ec2:us-east-1:{ACCOUNT}:volume/{volumes[key]}"  # a per-resource record is keyed by its ARN
        rid = record_id("ebs-gib-hours", "dim-hours", "acme", arn, TICK)
        expected[rid] = event(rid, "ebs-gib-hours", "acme", {
            **hours, "value": value, "resource": arn, "resource_id": volumes[key], "volume_type": volume_type})

    got = {event_id: e for (_, event_id), e in openmeter.events.items()}
    assert got.keys() == expected.keys(), "ids differ"
    assert got == expected
    assert openmeter.content_types == ["application/cloudevents-batch+json"]  # all four in one batch
    assert openmeter.batch_sizes == [4]


def test_rerunning_a_tick_yields_identical_events_and_openmeter_keeps_one(
    aws: Aws, openmeter: OpenMeterContractServer, tmp_path: Path
) -> None:
    seed(aws)
    first = sample_and_forward(openmeter, tmp_path, "first.db")
    stored = dict(openmeter.events)
    second = sample_and_forward(openmeter, tmp_path, "second.db")  # a fresh spool: everything is sent again
    assert [r.record_id for r in second] == [r.record_id for r in first]
    sink = OpenMeterSink(parse_backend(om_backend(openmeter)))
    assert bodies(sink, second) == bodies(sink, first)  # byte for byte
    assert openmeter.events == stored
    assert openmeter.duplicates() == len(first) == 4


def test_a_poison_event_in_a_batch_of_100_is_isolated(openmeter: OpenMeterContractServer, pipeline: Pipeline) -> None:
    openmeter.reject = lambda event: "customer is archived" if event["subject"] == "poison" else None
    good = make_records(99)
    poison = make_records(1, customer="poison")[0]
    records = good[:42] + [poison] + good[42:]
    pipeline.spool.commit_tick("ebs-storage", TICK, records)

    pipeline.forwarder.drain()

    assert openmeter.accepted_ids() == {r.record_id for r in good}
    assert sum(openmeter.batch_sizes) == 99 and openmeter.duplicates() == 0
    assert openmeter.requests <= 1 + 2 * 7  # the whole batch, then two halves per level down to one
    assert pipeline.spool.counts() == {"pending": 0, "leased": 0, "delivered": 99, "dead": 1}
    (dead,) = pipeline.spool.rows("dead")
    assert dead["id"] == poison.record_id and dead["last_status"] == 400
    problem = json.loads(dead["last_error"])
    assert problem["status"] == 400
    assert problem["extensions"]["validationErrors"] == [{"field": "[0]", "code": "rejected", "message": "customer is archived"}]


def test_an_event_the_schema_refuses_is_dead_lettered_alone(openmeter: OpenMeterContractServer, pipeline: Pipeline) -> None:
    good = make_records(5)
    no_subject = replace(make_records(1, customer="x")[0], customer_id="", record_id="f" * 32)  # subject must not be empty
    pipeline.spool.commit_tick("ebs-storage", TICK, good[:3] + [no_subject] + good[3:])
    pipeline.forwarder.drain()

    assert openmeter.accepted_ids() == {r.record_id for r in good}
    (dead,) = pipeline.spool.rows("dead")
    assert dead["id"] == "f" * 32
    assert "subject" in json.loads(dead["last_error"])["extensions"]["validationErrors"][0]["field"]


def test_the_server_checks_formats() -> None:
    validator = event_validator()
    base = {"id": "1", "source": "usage-agent", "specversion": "1.0", "type": "t", "subject": "s",
            "time": "2026-11-21T10:00:00Z"}
    assert validator.is_valid(base)
    assert not validator.is_valid({**base, "time": "2026-11-21 10:00"})  # date-time is checked
    assert not validator.is_valid({**base, "source": "usage agent"})  # uri-reference is checked


def test_429_and_503_are_retried_and_retry_after_is_honoured(openmeter: OpenMeterContractServer, pipeline: Pipeline) -> None:
    openmeter.script("/api/v1/events", Fault(status=429, retry_after="7"), Fault(status=503))
    answered_429 = pipeline.metrics.value("usage_agent_backend_responses_total", {"status": "429"})
    records = make_records(20)
    pipeline.spool.commit_tick("ebs-storage", TICK, records)

    pipeline.forwarder.drain()
    assert pipeline.spool.counts()["pending"] == 20
    assert pipeline.spool.next_due() == pipeline.clock.time() + 7
    assert {row["last_status"] for row in pipeline.spool.rows("pending")} == {429}
    pipeline.clock.advance(6.9)
    assert pipeline.forwarder.pump().leased == 0  # not before OpenMeter said
    pipeline.clock.advance(0.1)
    assert pipeline.forwarder.pump().retried == 20  # the 503
    pipeline.run_until_drained()

    assert openmeter.accepted_ids() == {r.record_id for r in records}
    assert pipeline.spool.counts()["delivered"] == 20 and not openmeter.refused
    # counted like every backend answer
    assert pipeline.metrics.value("usage_agent_backend_responses_total", {"status": "429"}) == answered_429 + 1


def test_timeouts_and_lost_answers_are_retried_and_deduplicated(openmeter: OpenMeterContractServer, pipeline: Pipeline) -> None:
    openmeter.script("/api/v1/events", Fault(delay=1.5), Fault(after_commit=True, drop=True), Fault(drop=True))
    records = make_records(10)
    pipeline.spool.commit_tick("ebs-storage", TICK, records)
    pipeline.run_until_drained()

    assert openmeter.accepted_ids() == {r.record_id for r in records}
    assert openmeter.duplicates() == 10  # the batch whose answer was lost was sent again; stored once
    assert len(openmeter.events) == 10


@pytest.mark.parametrize("token", [None, "wrong-token"], ids=["missing", "wrong"])
def test_a_missing_or_wrong_token_keeps_records_pending_and_alerts(
    openmeter: OpenMeterContractServer, tmp_path: Path, token: str | None
) -> None:
    pipeline = om_pipeline(openmeter, tmp_path, token=token)
    pipeline.spool.commit_tick("ebs-storage", TICK, make_records(30))
    with capture_logs() as logs:
        pipeline.forwarder.drain()
    assert pipeline.spool.counts() == {"pending": 30, "leased": 0, "delivered": 0, "dead": 0}
    assert {row["last_status"] for row in pipeline.spool.rows("pending")} == {401}
    alert = next(e for e in logs if e["event"] == "delivery will be retried")
    assert alert["log_level"] == "error" and alert["alert"] is True
    assert openmeter.requests == 1 and not openmeter.events  # one refusal holds the batch, no halving
    pipeline.close()


def test_token_from_a_file(openmeter: OpenMeterContractServer, tmp_path: Path) -> None:
    token_file = tmp_path / "openmeter-token"
    token_file.write_text(f"{TOKEN}\n")
    cfg = parse_config(backend_config({"type": "openmeter", "url": openmeter.url, "token_file": str(token_file)},
                                      tmp_path), "<test>", {})
    sink = build_backend(cfg.backend, Metrics(), FakeClock())
    outcomes = list(Delivery(sink.sink, sink.client, Metrics()).deliver(make_records(2)))
    sink.close()
    assert [type(o).__name__ for _, o in outcomes] == ["Delivered", "Delivered"]


def test_batch_size_bounds_each_request(openmeter: OpenMeterContractServer, tmp_path: Path) -> None:
    pipeline = om_pipeline(openmeter, tmp_path, batch_size=8)
    pipeline.spool.commit_tick("ebs-storage", TICK, make_records(20))
    pipeline.run_until_drained()
    assert openmeter.batch_sizes == [8, 8, 4]
    pipeline.close()


# --------------------------------------------------------------------------- the CLI


def usage_agent(*args: str) -> subprocess.CompletedProcess[str]:
    return cli(*args)


def test_once_and_dry_run_through_the_cli(aws: Aws, openmeter: OpenMeterContractServer, tmp_path: Path) -> None:
    seed(aws)
    config = write_yaml(tmp_path / "agent.yaml", backend_config(
        {"type": "openmeter", "url": openmeter.url, "token": "${OM_TOKEN}", "source": "urn:acme:usage-agent",
         "batch_size": 3}, tmp_path, *MEASUREMENTS))
    os.environ["OM_TOKEN"] = TOKEN
    try:
        dry = usage_agent("once", "-c", str(config), "--at", "2026-11-21T10:07:30Z", "--dry-run")
        assert dry.returncode == 0, dry.stderr
        assert openmeter.requests == 0 and not (tmp_path / "spool.db").exists()
        bodies = [json.loads(line) for line in dry.stdout.splitlines()]
        assert [len(body) for body in bodies] == [3, 1]  # one request body per line, batch_size events each

        done = usage_agent("once", "-c", str(config), "--at", "2026-11-21T10:07:30Z")
        assert done.returncode == 0, done.stderr
    finally:
        del os.environ["OM_TOKEN"]
    sent = [e for body in bodies for e in body]
    assert {e["id"]: e for e in sent} == {event_id: e for (_, event_id), e in openmeter.events.items()}
    assert {source for source, _ in openmeter.events} == {"urn:acme:usage-agent"}
    assert TOKEN not in done.stderr + dry.stderr


# --------------------------------------------------------------------------- config


def om_problems(backend: dict[str, Any], tmp_path: Path) -> list[tuple[str, str]]:
    from agent.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        parse_config(backend_config(backend, tmp_path), "<test>", {}, base_dir=tmp_path)
    return info.value.problems


def test_config_defaults_and_errors(tmp_path: Path) -> None:
    cfg = parse_backend({"type": "openmeter"})
    assert (cfg.url, cfg.source, cfg.batch_size, cfg.token) == ("https://openmeter.cloud", "usage-agent", 100, None)
    (tmp_path / "token").write_text("t")
    assert om_problems({"type": "openmeter", "token": "a", "token_file": "token"}, tmp_path) == [
        ("backend", "set at most one of token or token_file")]
    assert om_problems({"type": "openmeter", "source": "usage agent"}, tmp_path) == [
        ("backend.source", "expected a URI reference such as usage-agent, urn:acme:agent or "
                           "https://agent.example.com, got 'usage agent'")]
    assert om_problems({"type": "openmeter", "tokn": "a", "batch_size": 0}, tmp_path) == [
        ("backend.batch_size", "Input should be greater than or equal to 1"), ("backend.tokn", "unknown key")]


@settings(max_examples=300, deadline=None)
@given(st.from_regex(SOURCE_PATTERN, fullmatch=True).filter(lambda s: len(s) <= 255))
def test_every_source_the_config_accepts_is_a_uri_reference(source: str) -> None:
    assert parse_backend({"type": "openmeter", "source": source}).source == source
    assert event_validator().is_valid({"id": "1", "source": source, "specversion": "1.0", "type": "t", "subject": "s"})
