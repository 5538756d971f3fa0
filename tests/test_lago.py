"""Lago: render and classify over httpx.MockTransport; the sink, the forwarder and the CLI
against the Lago-contract server on 127.0.0.1."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from agent.config import parse_backend, parse_config
from agent.delivery import bodies
from agent.errors import ConfigError
from agent.records import record_id
from agent.sinks.base import Delivered, Rejected, RetryLater
from agent.sinks.lago import LagoSink
from agent.testing.server import Fault
from tests.batch_apis import AT_TEXT, MEASUREMENTS, sample_and_forward, seed, spool_text, usage_agent
from tests.conftest import ACCOUNT, Aws, backend_config, write_yaml
from tests.lago_server import BATCH_PATH, LagoContractServer
from tests.support import make_record, make_records
from tests.test_delivery import TICK, Pipeline
from tests.test_sink_seam import Peer, delivery_over, outcomes

API_KEY = "lago-3e8d7a51"


def sink_for(url: str = "https://api.lago.test", **overrides: Any) -> LagoSink:
    return LagoSink(parse_backend({"type": "lago", "url": url, "api_key": API_KEY, **overrides}))


def events_of(request: httpx.Request) -> list[dict[str, Any]]:
    return json.loads(request.content)["events"]  # type: ignore[no-any-return]


def refusal(details: dict[str, Any]) -> httpx.Response:
    return httpx.Response(422, json={"status": 422, "error": "Unprocessable Entity", "code": "validation_errors",
                                     "error_details": details})


# --------------------------------------------------------------------------- render and classify


def test_a_batch_is_one_documented_request() -> None:
    peer = Peer(lambda request: httpx.Response(200, json={"events": []}))
    record = make_record(value="0.000001", metadata={"region": "us-east-1"})
    got = outcomes(delivery_over(sink_for(value_property="gib"), peer), [record])
    assert got == {record.record_id: Delivered(200)}
    (request,) = peer.requests
    assert (request.method, str(request.url)) == ("POST", "https://api.lago.test/api/v1/events/batch")
    assert request.headers["Authorization"] == f"Bearer {API_KEY}"
    assert json.loads(request.content) == {"events": [{
        "transaction_id": record.record_id, "external_subscription_id": "acme", "code": "ebs-storage",
        "timestamp": 1795255200,  # 2026-11-21T10:00:00Z in Unix seconds
        "properties": {"region": "us-east-1", "gib": "0.000001"},  # a decimal string: exact, never 1e-06
    }]}


def test_a_422_names_events_by_index_the_duplicates_are_delivered_the_rest_sent_again() -> None:
    records = make_records(5)
    peer = Peer(lambda request: refusal({"1": {"code": ["value_is_mandatory"]},
                                         "3": {"transaction_id": ["value_already_exist"]}}))
    got = outcomes(delivery_over(sink_for(), peer), records)
    dead = got[records[1].record_id]
    assert isinstance(dead, Rejected) and dead.status == 422
    assert json.loads(dead.body) == {"index": 1, "errors": {"code": ["value_is_mandatory"]}}
    assert got[records[3].record_id] == Delivered(422)  # Lago already has it
    again = [got[r.record_id] for r in (records[0], records[2], records[4])]
    assert all(isinstance(o, RetryLater) and o.retry_after == 0.0 for o in again)  # at once, without the others
    assert len(peer.requests) == 1


def test_a_422_that_names_no_event_halves_the_batch() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        if len(events_of(request)) > 2:  # a self-hosted Lago with LAGO_EVENTS_BATCH_MAX_LENGTH=2
            return refusal({"events": ["too_many_events"]})
        return httpx.Response(200, json={"events": []})

    peer = Peer(answer)
    got = outcomes(delivery_over(sink_for(), peer), make_records(5))
    assert set(got.values()) == {Delivered(200)}
    assert [len(events_of(r)) for r in peer.requests] == [5, 2, 3, 1, 2]


@pytest.mark.parametrize(("status", "alert"), [(201, True), (401, True), (429, False), (500, False)])
def test_other_answers_keep_the_batch(status: int, alert: bool) -> None:
    peer = Peer(lambda request: httpx.Response(status, json={"status": status, "error": "x"}))
    got = outcomes(delivery_over(sink_for(), peer), make_records(3))
    assert {type(o) for o in got.values()} == {RetryLater}
    assert {o.alert for o in got.values()} == {alert}  # type: ignore[union-attr]


# --------------------------------------------------------------------------- against the contract server


@pytest.fixture
def lago() -> Iterator[LagoContractServer]:
    with LagoContractServer(api_key=API_KEY) as server:
        yield server


def lago_backend(server: LagoContractServer, **overrides: Any) -> dict[str, Any]:
    return {"type": "lago", "url": server.url, "api_key": API_KEY, **overrides}


@pytest.fixture
def pipeline(lago: LagoContractServer, tmp_path: Path) -> Iterator[Pipeline]:
    p = Pipeline.over(LagoSink(parse_backend(lago_backend(lago, timeout="1s"))), tmp_path / "spool.db")
    yield p
    p.close()


def test_exact_events_for_known_volumes(aws: Aws, lago: LagoContractServer, tmp_path: Path) -> None:
    volumes = seed(aws)
    _, counts = sample_and_forward(lago_backend(lago), tmp_path)
    assert counts == {"pending": 0, "leased": 0, "delivered": 4, "dead": 0}
    gauge = {"environment": "prod", "measurement": "ebs-storage", "resource_type": "ebs", "metric": "size_gib",
             "unit": "GiB", "accounts": ACCOUNT}

    def event(tid: str, code: str, customer: str, properties: dict[str, str]) -> dict[str, Any]:
        return {"transaction_id": tid, "external_subscription_id": customer, "code": code, "timestamp": 1795255200,
                "properties": properties}

    expected = {
        "b1c76ccf68f6f2576b8509538b4c56b3": event("b1c76ccf68f6f2576b8509538b4c56b3", "ebs_storage_gib", "acme", {
            **gauge, "regions": "us-east-1", "resource_count": "2", "value": "107"}),
        "cf64ccad60362e9178c6b552246865e5": event("cf64ccad60362e9178c6b552246865e5", "ebs_storage_gib", "globex", {
            **gauge, "regions": "eu-west-1", "resource_count": "1", "value": "500"}),
    }
    for key, value, volume_type in (("acme-100", "25", "gp3"), ("acme-7", "1.75", "gp2")):
        arn = f"arn:aws:ec2:us-east-1:{ACCOUNT}:volume/{volumes[key]}"
        tid = record_id("ebs-gib-hours", "dim-hours", "acme", arn, TICK)
        expected[tid] = event(tid, "ebs-gib-hours", "acme", {
            "measurement": "ebs-gib-hours", "resource_type": "ebs", "metric": "size_gib", "unit": "GiB-hours",
            "region": "us-east-1", "account": ACCOUNT, "resource_id": volumes[key], "availability_zone": "us-east-1a",
            "volume_type": volume_type, "value": value})
    assert lago.events == expected
    assert lago.batch_sizes == [4]


def test_a_tick_sampled_again_into_a_fresh_spool_is_answered_value_already_exist_and_ends_delivered(
    aws: Aws, lago: LagoContractServer, tmp_path: Path
) -> None:
    seed(aws)
    first, _ = sample_and_forward(lago_backend(lago), tmp_path, "first.db")
    stored = dict(lago.events)
    second, counts = sample_and_forward(lago_backend(lago), tmp_path, "second.db")
    assert [r.record_id for r in second] == [r.record_id for r in first]
    sink = LagoSink(parse_backend(lago_backend(lago)))
    assert bodies(sink, second) == bodies(sink, first)  # byte for byte
    assert counts == {"pending": 0, "leased": 0, "delivered": 4, "dead": 0}
    assert lago.events == stored and lago.requests == 2
    (refused,) = lago.refusals  # the second batch: every event named, each one value_already_exist
    assert refused["error_details"] == {str(i): {"transaction_id": ["value_already_exist"]} for i in range(4)}


def test_a_replay_of_a_half_delivered_batch_delivers_the_rest(lago: LagoContractServer, pipeline: Pipeline,
                                                              tmp_path: Path) -> None:
    records = make_records(10)
    pipeline.enqueue(records[:4])
    pipeline.run_until_drained()
    replay = Pipeline.over(pipeline.sink, tmp_path / "replay.db")  # a crash lost the spool: all ten again
    replay.enqueue(records)
    replay.run_until_drained()
    assert replay.spool.counts() == {"pending": 0, "leased": 0, "delivered": 10, "dead": 0}
    assert lago.accepted_ids() == {r.record_id for r in records}
    assert lago.batch_sizes == [4, 6] and lago.requests == 3
    replay.spool.close()


def test_a_poison_event_is_dead_lettered_and_the_rest_of_its_batch_delivered(
    lago: LagoContractServer, pipeline: Pipeline
) -> None:
    lago.reject = lambda event: {"code": ["billable_metric_not_found"]} if event["external_subscription_id"] == "poison" else None
    good = make_records(99)
    poison = make_records(1, customer="poison")[0]
    pipeline.enqueue(good[:42] + [poison] + good[42:])
    pipeline.run_until_drained()

    assert lago.accepted_ids() == {r.record_id for r in good}
    assert lago.batch_sizes == [99] and lago.requests == 2  # refused atomically once, then the 99 without it
    assert pipeline.spool.counts() == {"pending": 0, "leased": 0, "delivered": 99, "dead": 1}
    (dead,) = pipeline.spool.rows("dead")
    assert dead["id"] == poison.record_id and dead["last_status"] == 422
    assert json.loads(dead["last_error"]) == {"index": 42, "errors": {"code": ["billable_metric_not_found"]}}


def test_nothing_is_lost_or_counted_twice_under_faults(lago: LagoContractServer, pipeline: Pipeline) -> None:
    lago.script(BATCH_PATH, Fault(status=429, retry_after="5"), Fault(status=503), Fault(drop=True),
                Fault(after_commit=True, drop=True), Fault(delay=1.5))
    records = make_records(100)
    pipeline.enqueue(records)
    pipeline.forwarder.drain()
    assert pipeline.spool.next_due() == pipeline.clock.time() + 5  # Lago's Retry-After
    pipeline.run_until_drained()
    assert lago.accepted_ids() == {r.record_id for r in records}
    assert pipeline.spool.counts() == {"pending": 0, "leased": 0, "delivered": 100, "dead": 0}
    # the batch whose 200 was lost went again: refused value_already_exist, so delivered, and stored once
    assert lago.batch_sizes == [100] and lago.refusals[0]["error_details"]["99"] == {
        "transaction_id": ["value_already_exist"]}


def test_once_dry_run_prints_the_bodies_and_once_delivers_without_showing_the_key(
    aws: Aws, lago: LagoContractServer, tmp_path: Path
) -> None:
    seed(aws)
    config = write_yaml(tmp_path / "agent.yaml", backend_config(
        {"type": "lago", "url": lago.url, "api_key": "${LAGO_API_KEY}", "customer_field": "external_subscription_id",
         "value_property": "value", "batch_size": 3}, tmp_path, *MEASUREMENTS))
    env = {"LAGO_API_KEY": API_KEY}
    dry = usage_agent("once", "-c", str(config), "--at", AT_TEXT, "--dry-run", env=env)
    assert dry.returncode == 0, dry.stderr
    printed = [json.loads(line) for line in dry.stdout.splitlines()]
    assert [len(body["events"]) for body in printed] == [3, 1] and lago.requests == 0

    done = usage_agent("once", "-c", str(config), "--at", AT_TEXT, env=env)
    assert done.returncode == 0, done.stderr
    assert {e["transaction_id"]: e for body in printed for e in body["events"]} == lago.events
    assert not lago.refusals

    fresh = write_yaml(tmp_path / "fresh.yaml", {**yaml.safe_load(config.read_text()),
                                                 "spool": {"path": str(tmp_path / "fresh.db")}})
    again = usage_agent("once", "-c", str(fresh), "--at", AT_TEXT, env=env)  # the same tick from a fresh spool
    assert again.returncode == 0, again.stderr  # refused value_already_exist: delivered, nothing dead-lettered
    assert len(lago.refusals) == 2 and len(lago.events) == 4
    assert API_KEY not in dry.stderr + done.stderr + again.stderr + dry.stdout + done.stdout + again.stdout
    assert API_KEY not in spool_text(tmp_path / "spool.db") + spool_text(tmp_path / "fresh.db")


# --------------------------------------------------------------------------- config


def lago_problems(backend: dict[str, Any], tmp_path: Path) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        parse_config(backend_config(backend, tmp_path), "<test>", {}, base_dir=tmp_path)
    return info.value.problems


def test_config_defaults_and_errors(tmp_path: Path) -> None:
    (tmp_path / "key").write_text(f"{API_KEY}\n")
    cfg = parse_backend({"type": "lago", "api_key_file": str(tmp_path / "key")})
    assert (cfg.url, cfg.customer_field, cfg.value_property, cfg.batch_size) == (
        "https://api.getlago.com", "external_subscription_id", "value", 100)
    assert cfg.api_key.get_secret_value() == API_KEY and API_KEY not in repr(cfg)
    assert lago_problems({"type": "lago"}, tmp_path) == [("backend", "set exactly one of api_key or api_key_file")]
    (problem,) = lago_problems({"type": "lago", "api_key": "k", "customer_field": "external_customer_id"}, tmp_path)
    assert problem[0] == "backend.customer_field" and "Lago ignores external_customer_id on events" in problem[1]
    assert lago_problems({"type": "lago", "api_key": "k", "batch_size": 101}, tmp_path) == [
        ("backend.batch_size", "Input should be less than or equal to 100")]
