"""Orb: render and classify over httpx.MockTransport; the sink, the forwarder and the CLI
against the Orb-contract server on 127.0.0.1."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from decimal import Decimal
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
from agent.sinks.orb import OrbSink, json_number
from agent.testing.server import Fault
from tests.batch_apis import AT_TEXT, MEASUREMENTS, sample_and_forward, seed, spool_text, usage_agent
from tests.conftest import ACCOUNT, Aws, backend_config, write_yaml
from tests.orb_server import INGEST_PATH, OrbContractServer
from tests.support import RECORDS_FROM, make_record, make_records
from tests.test_delivery import TICK, Pipeline
from tests.test_sink_seam import Peer, delivery_over, outcomes

API_KEY = "orb-c0ffee42"


def sink_for(url: str = "https://api.orb.test", **overrides: Any) -> OrbSink:
    return OrbSink(parse_backend({"type": "orb", "url": url, "api_key": API_KEY, **overrides}))


def keys_of(request: httpx.Request) -> list[str]:
    return [e["idempotency_key"] for e in json.loads(request.content)["events"]]


# --------------------------------------------------------------------------- render and classify


def test_a_batch_is_one_documented_request() -> None:
    peer = Peer(lambda request: httpx.Response(200, json={"validation_failed": []}))
    record = make_record(value="107.25", metadata={"region": "us-east-1"})
    got = outcomes(delivery_over(sink_for(customer_field="customer_id"), peer), [record])
    assert got == {record.record_id: Delivered(200)}
    (request,) = peer.requests
    assert (request.method, str(request.url)) == ("POST", "https://api.orb.test/v1/ingest?debug=true")
    assert request.headers["Authorization"] == f"Bearer {API_KEY}"
    assert request.content == (  # the value a JSON number: Orb aggregates numbers
        b'{"events":[{"idempotency_key":"' + record.record_id.encode() + b'","event_name":"ebs-storage",'
        b'"customer_id":"acme","timestamp":"2026-11-21T10:00:00Z","properties":{"region":"us-east-1","value":107.25}}]}')


def test_values_are_exact_json_numbers_or_not_sent() -> None:
    assert json_number(Decimal("500")) == 500 and isinstance(json_number(Decimal("500.000")), int)
    assert json_number(Decimal("0.000001")) == 1e-06 and json_number(Decimal("-2.5")) == -2.5
    assert json_number(Decimal("123456789.123456")) == 123456789.123456
    with pytest.raises(ValueError):
        json_number(Decimal("0.12345678901234567890"))  # a double would round it
    peer = Peer(lambda request: httpx.Response(200, json={"validation_failed": []}))
    precise = make_record(value="1.00000000000000000001")
    got = outcomes(delivery_over(sink_for(), peer), [precise, *make_records(2, customer="globex")])
    assert isinstance(got[precise.record_id], Rejected) and "significant digits" in got[precise.record_id].body
    assert [len(keys_of(r)) for r in peer.requests] == [2]


def test_duplicates_are_delivered_validation_failures_dead_and_the_rest_confirmed_or_sent_again() -> None:
    records = make_records(4)
    keys = [r.record_id for r in records]
    failed = [{"idempotency_key": keys[1], "validation_errors": ["Timestamp is older than the grace period"]}]
    peer = Peer(lambda request: httpx.Response(400, json={
        "validation_failed": failed, "debug": {"duplicate": [keys[2]], "ingested": [keys[0]]}}))
    got = outcomes(delivery_over(sink_for(), peer), records)
    assert got[keys[0]] == Delivered(400) and got[keys[2]] == Delivered(400)  # ingested / a duplicate: both kept
    dead = got[keys[1]]
    assert isinstance(dead, Rejected) and dead.status == 400 and dead.body == "Orb: Timestamp is older than the grace period"
    unconfirmed = got[keys[3]]  # neither ingested nor duplicate in the answer: sent again at once
    assert isinstance(unconfirmed, RetryLater) and unconfirmed.retry_after == 0.0


def test_a_200_delivers_every_event_even_when_debug_is_gone_or_cut() -> None:
    for body in ({"validation_failed": []}, {"validation_failed": [], "debug": {"duplicate": [], "ingested": []}}):
        peer = Peer(lambda request, body=body: httpx.Response(200, json=body))
        assert set(outcomes(delivery_over(sink_for(), peer), make_records(3)).values()) == {Delivered(200)}
    huge = Peer(lambda request: httpx.Response(200, content=b'{"validation_failed":[],"debug":{"ingested":["'
                                                             + b"k" * 40_000 + b'"]}}'))
    assert set(outcomes(delivery_over(sink_for(), huge), make_records(3)).values()) == {Delivered(200)}


def test_a_refusal_naming_no_event_is_halved_down_to_the_one_at_fault() -> None:
    bad = make_records(1, customer="bad")[0]

    def answer(request: httpx.Request) -> httpx.Response:
        if bad.record_id in keys_of(request):
            return httpx.Response(400, json={"status": 400, "title": "Request validation error"})
        return httpx.Response(200, json={"validation_failed": []})

    peer = Peer(answer)
    records = make_records(3) + [bad]
    got = outcomes(delivery_over(sink_for(), peer), records)
    assert [type(got[r.record_id]).__name__ for r in records] == ["Delivered"] * 3 + ["Rejected"]
    assert [len(keys_of(r)) for r in peer.requests] == [4, 2, 2, 1, 1]


# --------------------------------------------------------------------------- against the contract server


@pytest.fixture
def orb() -> Iterator[OrbContractServer]:
    with OrbContractServer(api_key=API_KEY) as server:
        yield server


def orb_backend(server: OrbContractServer, **overrides: Any) -> dict[str, Any]:
    return {"type": "orb", "url": server.url, "api_key": API_KEY, **overrides}


@pytest.fixture
def pipeline(orb: OrbContractServer, tmp_path: Path) -> Iterator[Pipeline]:
    p = Pipeline.over(OrbSink(parse_backend(orb_backend(orb, timeout="1s"))), tmp_path / "spool.db")
    yield p
    p.close()


def test_exact_events_for_known_volumes(aws: Aws, orb: OrbContractServer, tmp_path: Path) -> None:
    volumes = seed(aws)
    _, counts = sample_and_forward(orb_backend(orb), tmp_path)
    assert counts == {"pending": 0, "leased": 0, "delivered": 4, "dead": 0}
    gauge = {"environment": "prod", "measurement": "ebs-storage", "resource_type": "ebs", "metric": "size_gib",
             "unit": "GiB", "accounts": ACCOUNT}

    def event(key: str, name: str, customer: str, properties: dict[str, Any]) -> dict[str, Any]:
        return {"idempotency_key": key, "event_name": name, "external_customer_id": customer,
                "timestamp": "2026-11-21T10:00:00Z", "properties": properties}

    expected = {
        "b1c76ccf68f6f2576b8509538b4c56b3": event("b1c76ccf68f6f2576b8509538b4c56b3", "ebs_storage_gib", "acme", {
            **gauge, "regions": "us-east-1", "resource_count": "2", "value": 107}),
        "cf64ccad60362e9178c6b552246865e5": event("cf64ccad60362e9178c6b552246865e5", "ebs_storage_gib", "globex", {
            **gauge, "regions": "eu-west-1", "resource_count": "1", "value": 500}),
    }
    for key, value, volume_type in (("acme-100", 25, "gp3"), ("acme-7", 1.75, "gp2")):
        arn = f"arn:aws:ec2:us-east-1:{ACCOUNT}:volume/{volumes[key]}"
        rid = record_id("ebs-gib-hours", "dim-hours", "acme", arn, TICK)
        expected[rid] = event(rid, "ebs-gib-hours", "acme", {
            "measurement": "ebs-gib-hours", "resource_type": "ebs", "metric": "size_gib", "unit": "GiB-hours",
            "region": "us-east-1", "account": ACCOUNT, "resource_id": volumes[key], "availability_zone": "us-east-1a",
            "volume_type": volume_type, "value": value})
    assert orb.events == expected
    assert orb.batch_sizes == [4]


@pytest.mark.parametrize("debug", [True, False], ids=["debug", "no-debug"])
def test_a_tick_sampled_again_into_a_fresh_spool_is_answered_duplicate_and_ends_delivered(
    aws: Aws, orb: OrbContractServer, tmp_path: Path, debug: bool
) -> None:
    seed(aws)
    orb.debug_answers = debug
    first, _ = sample_and_forward(orb_backend(orb), tmp_path, "first.db")
    stored = dict(orb.events)
    second, counts = sample_and_forward(orb_backend(orb), tmp_path, "second.db")
    assert [r.record_id for r in second] == [r.record_id for r in first]
    sink = OrbSink(parse_backend(orb_backend(orb)))
    assert bodies(sink, second) == bodies(sink, first)  # byte for byte
    assert counts == {"pending": 0, "leased": 0, "delivered": 4, "dead": 0}
    assert orb.events == stored and orb.duplicates() == 4
    if debug:
        assert sorted(orb.answers[-1][1]["debug"]["duplicate"]) == sorted(r.record_id for r in first)


@pytest.mark.parametrize("debug", [True, False], ids=["debug", "no-debug"])
def test_a_poison_event_is_dead_lettered_with_its_message_and_the_rest_delivered(
    orb: OrbContractServer, pipeline: Pipeline, debug: bool
) -> None:
    orb.debug_answers = debug
    good = make_records(99)
    poison = make_records(1, customer="poison")[0]
    orb.reject = lambda event: "Customer poison is archived" if event["external_customer_id"] == "poison" else None
    pipeline.enqueue(good[:42] + [poison] + good[42:])
    pipeline.run_until_drained()

    assert orb.accepted_ids() == {r.record_id for r in good}
    # with debug the 400 confirms the 99; without it they are sent once more and come back as duplicates
    assert (orb.requests, orb.duplicates()) == ((1, 0) if debug else (2, 99))
    assert pipeline.spool.counts() == {"pending": 0, "leased": 0, "delivered": 99, "dead": 1}
    (dead,) = pipeline.spool.rows("dead")
    assert dead["id"] == poison.record_id and dead["last_status"] == 400
    assert dead["last_error"] == "Orb: Customer poison is archived"


def test_events_past_the_grace_period_or_for_an_unknown_customer_are_dead_lettered(
    orb: OrbContractServer, tmp_path: Path
) -> None:
    orb.now = lambda: RECORDS_FROM + timedelta(hours=12, minutes=30)
    orb.grace_period = timedelta(hours=12)
    orb.customers = {"acme"}
    p = Pipeline.over(OrbSink(parse_backend(orb_backend(orb, customer_field="customer_id"))), tmp_path / "spool.db")
    records = make_records(8) + make_records(1, customer="nobody", start=RECORDS_FROM + timedelta(hours=6))
    p.enqueue(records)
    p.run_until_drained()
    dead = {row["id"]: row["last_error"] for row in p.spool.rows("dead")}
    assert dead == {
        records[0].record_id: "Orb: Timestamp is older than the grace period",  # 10:00 and 10:15: over 12 h before 22:30
        records[1].record_id: "Orb: Timestamp is older than the grace period",
        records[8].record_id: "Orb: Customer with id nobody does not exist",
    }
    assert orb.accepted_ids() == {r.record_id for r in records[2:8]}
    p.close()


def test_nothing_is_lost_or_counted_twice_under_faults(orb: OrbContractServer, pipeline: Pipeline) -> None:
    orb.script(INGEST_PATH, Fault(status=429, retry_after="9"), Fault(status=502), Fault(drop=True),
               Fault(after_commit=True, drop=True), Fault(delay=1.5))
    records = make_records(60)
    pipeline.enqueue(records)
    pipeline.forwarder.drain()
    assert pipeline.spool.next_due() == pipeline.clock.time() + 9  # Orb's Retry-After
    pipeline.run_until_drained()
    assert orb.accepted_ids() == {r.record_id for r in records}
    assert pipeline.spool.counts() == {"pending": 0, "leased": 0, "delivered": 60, "dead": 0}
    assert orb.duplicates() == 60  # the batch whose answer was lost went again: each key ingested once


def test_once_dry_run_prints_the_bodies_and_once_delivers_without_showing_the_key(
    aws: Aws, orb: OrbContractServer, tmp_path: Path
) -> None:
    seed(aws)
    key_file = tmp_path / "orb-key"
    key_file.write_text(API_KEY)
    config = write_yaml(tmp_path / "agent.yaml", backend_config(
        {"type": "orb", "url": orb.url, "api_key_file": str(key_file), "customer_field": "external_customer_id",
         "batch_size": 3}, tmp_path, *MEASUREMENTS))
    dry = usage_agent("once", "-c", str(config), "--at", AT_TEXT, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    printed = [json.loads(line) for line in dry.stdout.splitlines()]
    assert [len(body["events"]) for body in printed] == [3, 1] and orb.requests == 0

    done = usage_agent("once", "-c", str(config), "--at", AT_TEXT)
    assert done.returncode == 0, done.stderr
    assert {e["idempotency_key"]: e for body in printed for e in body["events"]} == orb.events
    fresh = write_yaml(tmp_path / "fresh.yaml", {**yaml.safe_load(config.read_text()),
                                                 "spool": {"path": str(tmp_path / "fresh.db")}})
    again = usage_agent("once", "-c", str(fresh), "--at", AT_TEXT)  # the same tick from a fresh spool
    assert again.returncode == 0, again.stderr
    assert orb.duplicates() == 4 and len(orb.events) == 4
    assert API_KEY not in dry.stderr + done.stderr + again.stderr + dry.stdout + done.stdout + again.stdout
    assert API_KEY not in spool_text(tmp_path / "spool.db") + spool_text(tmp_path / "fresh.db")


# --------------------------------------------------------------------------- config


def orb_problems(backend: dict[str, Any], tmp_path: Path) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        parse_config(backend_config(backend, tmp_path), "<test>", {}, base_dir=tmp_path)
    return info.value.problems


def test_config_defaults_and_errors(tmp_path: Path) -> None:
    cfg = parse_backend({"type": "orb", "api_key": API_KEY})
    assert (cfg.url, cfg.customer_field, cfg.batch_size) == ("https://api.withorb.com", "external_customer_id", 500)
    assert API_KEY not in repr(cfg)
    assert orb_problems({"type": "orb"}, tmp_path) == [("backend", "set exactly one of api_key or api_key_file")]
    assert orb_problems({"type": "orb", "api_key": "a\nb"}, tmp_path) == [
        ("backend", "the api_key must be printable ASCII, without line breaks or control characters")]
    (field, message), = orb_problems({"type": "orb", "api_key": "k", "customer_field": "subject"}, tmp_path)
    assert field == "backend.customer_field" and "external_customer_id" in message and "customer_id" in message


def test_the_server_refuses_what_orb_refuses(orb: OrbContractServer) -> None:
    base = {"event_name": "e", "idempotency_key": "k1", "timestamp": "2026-11-21T10:00:00Z", "properties": {"v": 1}}
    problems = orb._problems  # noqa: SLF001 - the contract's own judgement, without a request
    assert problems({**base, "external_customer_id": "acme"}) == []
    assert problems(base) == ["Exactly one of customer_id and external_customer_id should be specified"]
    assert problems({**base, "external_customer_id": "a", "properties": {"n": {"x": 1}}}) == [
        "properties values must be numeric, boolean, or strings; nested values are disallowed"]
    assert problems({**base, "external_customer_id": "a", "timestamp": "2026-11-21T10:00:00+02:00"}) == [
        "Timestamp '2026-11-21T10:00:00+02:00' must be ISO 8601 in UTC"]
    ahead = (datetime.now(timezone.utc) + timedelta(minutes=6)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert problems({**base, "external_customer_id": "a", "timestamp": ahead}) == [
        "Timestamp is more than 5 minutes in the future"]
