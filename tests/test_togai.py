"""Togai: render and classify over httpx.MockTransport; the sink, the forwarder and the CLI
against the Togai-contract server on 127.0.0.1."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from structlog.testing import capture_logs

from agent.config import parse_backend, parse_config
from agent.delivery import bodies
from agent.errors import ConfigError
from agent.records import record_id
from agent.sinks.base import Delivered, Rejected, RetryLater
from agent.sinks.togai import TogaiSink
from agent.testing.server import Fault
from tests.batch_apis import AT_TEXT, MEASUREMENTS, sample_and_forward, seed, spool_text, usage_agent
from tests.conftest import ACCOUNT, DIMENSION, Aws, backend_config, write_yaml
from tests.support import make_record, make_records
from tests.test_delivery import TICK, Pipeline
from tests.test_sink_seam import Peer, delivery_over, outcomes
from tests.togai_server import INGEST_PATH, TogaiContractServer, batch_validator

TOKEN = "togai-9f2c41d7"


def sink_for(url: str = "https://api.togai.test", **overrides: Any) -> TogaiSink:
    return TogaiSink(parse_backend({"type": "togai", "url": url, "token": TOKEN, **overrides}))


def events_of(request: httpx.Request) -> list[dict[str, Any]]:
    return json.loads(request.content)["events"]  # type: ignore[no-any-return]


# --------------------------------------------------------------------------- render and classify


def test_a_batch_is_one_documented_request() -> None:
    peer = Peer(lambda request: httpx.Response(202, json={"errors": []}))
    record = make_record(metadata={"region": "us-east-1", "empty": "", "regions": "x" * 250})
    assert all(isinstance(o, Delivered) for o in outcomes(delivery_over(sink_for(), peer), [record]).values())
    (request,) = peer.requests
    assert (request.method, str(request.url)) == ("POST", "https://api.togai.test/ingestBatch")
    assert request.headers["Authorization"] == f"Bearer {TOKEN}"
    assert request.headers["Content-Type"] == "application/json"
    body = json.loads(request.content)
    assert body == {"events": [{
        "schemaName": "ebs-storage", "id": record.record_id, "timestamp": "2026-11-21T10:00:00Z", "accountId": "acme",
        "attributes": [{"name": "value", "value": "1.75", "unit": "GiB"}],
        "dimensions": {"region": "us-east-1", "regions": "x" * 200},  # empty left out, long cut to Togai's 200
    }]}
    assert batch_validator().is_valid(body)


def test_a_207_is_judged_event_by_event() -> None:
    records = make_records(5)
    named = {records[1].record_id: "Event schema travelCompletedEvent is not defined",
             records[2].record_id: "Event with id already exists",
             records[3].record_id: "Request throttled, try again"}

    def answer(request: httpx.Request) -> httpx.Response:
        errors = [{"message": named[e["id"]], "eventPayload": e} for e in events_of(request) if e["id"] in named]
        return httpx.Response(207, json={"errors": errors})

    got = outcomes(delivery_over(sink_for(), Peer(answer)), records)
    assert [type(got[r.record_id]).__name__ for r in records] == [
        "Delivered", "Rejected", "Delivered", "RetryLater", "Delivered"]  # the duplicate counts as delivered
    dead = got[records[1].record_id]
    assert isinstance(dead, Rejected) and dead.status == 207
    assert json.loads(dead.body)["message"] == "Event schema travelCompletedEvent is not defined"
    assert "throttled" in got[records[3].record_id].reason  # type: ignore[union-attr]


def test_a_207_that_names_no_event_of_the_batch_is_halved_down_to_single_events() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        if len(events_of(request)) > 1:
            return httpx.Response(207, json={"errors": [{"message": "failed"}]})  # no eventPayload: no event to hold
        return httpx.Response(202, json={"errors": []})

    peer = Peer(answer)
    got = outcomes(delivery_over(sink_for(), peer), make_records(4))
    assert all(isinstance(o, Delivered) for o in got.values())
    assert [len(events_of(r)) for r in peer.requests] == [4, 2, 1, 1, 2, 1, 1]


def test_a_payload_too_large_is_sent_in_smaller_batches_and_a_lone_event_too_large_is_dead() -> None:
    too_big = make_records(1, customer="x" * 400)[0]

    def answer(request: httpx.Request) -> httpx.Response:
        if len(request.content) > 600:
            return httpx.Response(422, json={"message": "payload above the supported limit"})
        return httpx.Response(202, json={"errors": []})

    peer = Peer(answer)
    records = make_records(6) + [too_big]
    got = outcomes(delivery_over(sink_for(), peer), records)
    assert all(isinstance(got[r.record_id], Delivered) for r in records[:6])
    dead = got[too_big.record_id]
    assert isinstance(dead, Rejected) and dead.status == 422 and "above the supported limit" in dead.body
    assert max(len(events_of(r)) for r in peer.requests if len(r.content) <= 600) <= 2


@pytest.mark.parametrize(("status", "alert"), [(200, True), (401, True), (429, False), (503, False)])
def test_other_answers_keep_the_batch(status: int, alert: bool) -> None:
    peer = Peer(lambda request: httpx.Response(status, json={"message": "no"}, headers={"Retry-After": "3"}))
    got = outcomes(delivery_over(sink_for(), peer), make_records(3))
    assert {type(o) for o in got.values()} == {RetryLater}
    assert {o.alert for o in got.values()} == {alert}  # type: ignore[union-attr]
    assert len(peer.requests) == 1


def test_an_event_type_togai_cannot_name_is_dead_lettered_before_sending() -> None:
    peer = Peer(lambda request: httpx.Response(202, json={"errors": []}))
    long = replace(make_record(), event_type="e" * 51)
    got = outcomes(delivery_over(sink_for(), peer), [long, *make_records(2, customer="globex")])
    assert isinstance(got[long.record_id], Rejected) and "schemaName of 1 to 50" in got[long.record_id].body
    assert [len(events_of(r)) for r in peer.requests] == [2]


# --------------------------------------------------------------------------- against the contract server


@pytest.fixture
def togai() -> Iterator[TogaiContractServer]:
    with TogaiContractServer(token=TOKEN) as server:
        yield server


def togai_backend(server: TogaiContractServer, **overrides: Any) -> dict[str, Any]:
    return {"type": "togai", "url": server.url, "token": TOKEN, **overrides}


@pytest.fixture
def pipeline(togai: TogaiContractServer, tmp_path: Path) -> Iterator[Pipeline]:
    p = Pipeline.over(TogaiSink(parse_backend(togai_backend(togai, timeout="1s"))), tmp_path / "spool.db")
    yield p
    p.close()


def test_exact_events_for_known_volumes(aws: Aws, togai: TogaiContractServer, tmp_path: Path) -> None:
    volumes = seed(aws)
    _, counts = sample_and_forward(togai_backend(togai), tmp_path)
    assert counts == {"pending": 0, "leased": 0, "delivered": 4, "dead": 0}

    def event(event_id: str, schema: str, account: str, value: str, unit: str, dimensions: dict[str, str]) -> dict[str, Any]:
        return {"schemaName": schema, "id": event_id, "timestamp": "2026-11-21T10:00:00Z", "accountId": account,
                "attributes": [{"name": "value", "value": value, "unit": unit}], "dimensions": dimensions}

    gauge = {"environment": "prod", "measurement": "ebs-storage", "resource_type": "ebs", "metric": "size_gib",
             "unit": "GiB", "accounts": ACCOUNT}
    expected = {
        "b1c76ccf68f6f2576b8509538b4c56b3": event("b1c76ccf68f6f2576b8509538b4c56b3", "ebs_storage_gib", "acme", "107",
                                                  "GiB", {**gauge, "regions": "us-east-1", "resource_count": "2"}),
        "cf64ccad60362e9178c6b552246865e5": event("cf64ccad60362e9178c6b552246865e5", "ebs_storage_gib", "globex", "500",
                                                  "GiB", {**gauge, "regions": "eu-west-1", "resource_count": "1"}),
    }
    for key, value, volume_type in (("acme-100", "25", "gp3"), ("acme-7", "1.75", "gp2")):
        arn = f"arn:aws:ec2:us-east-1:{ACCOUNT}:volume/{volumes[key]}"
        rid = record_id("ebs-gib-hours", "dim-hours", "acme", arn, TICK)
        expected[rid] = event(rid, "ebs-gib-hours", "acme", value, "GiB-hours", {
            "measurement": "ebs-gib-hours", "resource_type": "ebs", "metric": "size_gib", "unit": "GiB-hours",
            "region": "us-east-1", "account": ACCOUNT, "resource_id": volumes[key], "availability_zone": "us-east-1a",
            "volume_type": volume_type})
    assert togai.events == expected
    assert togai.batch_sizes == [4] and DIMENSION not in json.dumps(togai.events)


@pytest.mark.parametrize("duplicates_207", [False, True], ids=["202", "207-already-ingested"])
def test_a_tick_sampled_again_into_a_fresh_spool_sends_the_same_ids_and_ends_delivered(
    aws: Aws, togai: TogaiContractServer, tmp_path: Path, duplicates_207: bool
) -> None:
    seed(aws)
    togai.answer_duplicates_207 = duplicates_207
    first, _ = sample_and_forward(togai_backend(togai), tmp_path, "first.db")
    stored = dict(togai.events)
    second, counts = sample_and_forward(togai_backend(togai), tmp_path, "second.db")
    assert [r.record_id for r in second] == [r.record_id for r in first]
    sink = TogaiSink(parse_backend(togai_backend(togai)))
    assert bodies(sink, second) == bodies(sink, first)  # byte for byte
    assert counts == {"pending": 0, "leased": 0, "delivered": 4, "dead": 0}
    assert togai.events == stored and togai.duplicates() == 4
    assert togai.statuses == [202, 207 if duplicates_207 else 202]


def test_a_poison_event_is_dead_lettered_and_the_rest_of_its_batch_delivered(
    togai: TogaiContractServer, pipeline: Pipeline
) -> None:
    togai.reject = lambda event: "Account poison does not exist" if event["accountId"] == "poison" else None
    good = make_records(99)
    poison = make_records(1, customer="poison")[0]
    pipeline.enqueue(good[:42] + [poison] + good[42:])
    pipeline.run_until_drained()

    assert togai.accepted_ids() == {r.record_id for r in good}
    assert togai.requests == 1 and togai.duplicates() == 0  # the 207 named it: no halving, no re-send
    assert pipeline.spool.counts() == {"pending": 0, "leased": 0, "delivered": 99, "dead": 1}
    (dead,) = pipeline.spool.rows("dead")
    assert dead["id"] == poison.record_id and dead["last_status"] == 207
    assert json.loads(dead["last_error"])["message"] == "Account poison does not exist"


def test_nothing_is_lost_or_counted_twice_under_faults(togai: TogaiContractServer, pipeline: Pipeline) -> None:
    togai.script(INGEST_PATH, Fault(status=429, retry_after="7"), Fault(status=503), Fault(drop=True),
                 Fault(after_commit=True, drop=True), Fault(delay=1.5))
    records = make_records(30)
    pipeline.enqueue(records)
    pipeline.forwarder.drain()
    assert pipeline.spool.next_due() == pipeline.clock.time() + 7  # Togai's Retry-After
    pipeline.run_until_drained()
    assert togai.accepted_ids() == {r.record_id for r in records}
    assert pipeline.spool.counts()["delivered"] == 30 and not pipeline.spool.rows("dead")
    assert togai.duplicates() == 30  # the batch whose 202 was lost went again; Togai kept one of each


def test_a_payload_over_togais_limit_is_sent_in_smaller_batches(togai: TogaiContractServer, pipeline: Pipeline) -> None:
    togai.max_bytes = 20_000
    records = make_records(200)
    pipeline.enqueue(records)
    pipeline.run_until_drained()
    assert togai.accepted_ids() == {r.record_id for r in records} and togai.duplicates() == 0
    assert 422 in togai.statuses and max(togai.batch_sizes) < 200


def test_once_dry_run_prints_the_bodies_and_once_delivers_without_showing_the_token(
    aws: Aws, togai: TogaiContractServer, tmp_path: Path
) -> None:
    seed(aws)
    token_file = tmp_path / "togai-token"
    token_file.write_text(f"{TOKEN}\n")
    config = write_yaml(tmp_path / "agent.yaml", backend_config(
        {"type": "togai", "url": togai.url, "token_file": str(token_file), "attribute": "gib", "batch_size": 3},
        tmp_path, *MEASUREMENTS))
    dry = usage_agent("once", "-c", str(config), "--at", AT_TEXT, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert togai.requests == 0
    printed = [json.loads(line) for line in dry.stdout.splitlines()]
    assert [len(body["events"]) for body in printed] == [3, 1] and all(batch_validator().is_valid(b) for b in printed)

    done = usage_agent("once", "-c", str(config), "--at", AT_TEXT)
    assert done.returncode == 0, done.stderr
    assert {e["id"]: e for body in printed for e in body["events"]} == togai.events
    assert {a["name"] for e in togai.events.values() for a in e["attributes"]} == {"gib"}

    fresh = write_yaml(tmp_path / "fresh.yaml", {**yaml.safe_load(config.read_text()),
                                                 "spool": {"path": str(tmp_path / "fresh.db")}})
    again = usage_agent("once", "-c", str(fresh), "--at", AT_TEXT)  # the same tick from a fresh spool
    assert again.returncode == 0, again.stderr
    assert togai.duplicates() == 4 and len(togai.events) == 4
    assert TOKEN not in dry.stderr + done.stderr + again.stderr + dry.stdout + done.stdout + again.stdout
    assert TOKEN not in spool_text(tmp_path / "spool.db") + spool_text(tmp_path / "fresh.db")


# --------------------------------------------------------------------------- config


def togai_problems(backend: dict[str, Any], tmp_path: Path) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        parse_config(backend_config(backend, tmp_path), "<test>", {}, base_dir=tmp_path)
    return info.value.problems


def test_config_defaults_and_errors(tmp_path: Path) -> None:
    cfg = parse_backend({"type": "togai", "token": TOKEN})
    assert (cfg.url, cfg.attribute, cfg.batch_size, cfg.timeout.total_seconds()) == ("https://api.togai.com", "value", 500, 10)
    assert TOKEN not in repr(cfg)
    (tmp_path / "token").write_text("t")
    assert togai_problems({"type": "togai"}, tmp_path) == [("backend", "set exactly one of token or token_file")]
    assert togai_problems({"type": "togai", "token": "a", "token_file": "token"}, tmp_path) == [
        ("backend", "set exactly one of token or token_file")]
    assert togai_problems({"type": "togai", "token": "a", "batch_size": 501, "attribute": ""}, tmp_path) == [
        ("backend.attribute", "String should have at least 1 character"),
        ("backend.batch_size", "Input should be less than or equal to 500")]


def test_a_record_pending_past_togais_45_days_is_logged_once(togai: TogaiContractServer, pipeline: Pipeline) -> None:
    togai.script(INGEST_PATH, Fault(status=503))
    now = pipeline.clock.now()
    old, recent = make_record(tick=now - timedelta(days=46)), make_record(tick=now - timedelta(days=44), customer="globex")
    pipeline.enqueue([old, recent])
    with capture_logs() as logs:
        pipeline.run_until_drained()
    warned = [e for e in logs if e["event"].startswith("record pending past the backend's deduplication window")]
    assert [e["record_id"] for e in warned] == [old.record_id]  # once, though it was leased twice
    assert togai.accepted_ids() == {old.record_id, recent.record_id}
