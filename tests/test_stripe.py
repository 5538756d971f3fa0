"""Stripe sink: render and classify over httpx.MockTransport; delivery, faults and the CLI
against the Stripe-contract server on 127.0.0.1 with moto-sampled volumes."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import httpx
import pytest
from structlog.testing import capture_logs

from agent.config import parse_backend, parse_config
from agent.convert import tick_floor
from agent.delivery import bodies
from agent.errors import ConfigError
from agent.records import record_id
from agent.sinks.base import Delivered, Rejected, RetryLater
from agent.sinks.stripe import STRIPE_VERSION, StripeSink
from agent.spool import Spool
from agent.testing.server import Fault
from tests.conftest import ACCOUNT, DIMENSION, Aws, backend_config, write_yaml
from tests.stripe_server import API_KEY, EVENTS_PATH, StripeContractServer
from tests.support import FakeClock, cli, make_record, make_records
from tests.test_delivery import Pipeline
from tests.test_openmeter import MEASUREMENTS, seed
from agent.delivery import Delivery
from agent.metrics import Metrics
from agent.sinks.transport import http_client
from tests.test_sink_seam import Peer, outcomes

CLOCK_START = FakeClock().now()
RECENT = tick_floor(CLOCK_START - timedelta(hours=2), 900)  # ticks the fake clock's Stripe still takes
STRIPE = {"type": "stripe", "url": "https://api.stripe.test", "api_key": API_KEY}


def delivery_over(sink: StripeSink, backend: Peer, clock: FakeClock | None = None) -> Delivery:
    """The delivery over MockTransport, on the fake clock the records' ticks are near."""
    return Delivery(sink, http_client(5.0, 8, httpx.MockTransport(backend)), Metrics(), clock or FakeClock())


def sink_of(**overrides: Any) -> StripeSink:
    return StripeSink(parse_backend({**STRIPE, **overrides}))


def stripe_error(status: int, message: str, should_retry: str | None = None, **headers: str) -> httpx.Response:
    if should_retry is not None:
        headers["Stripe-Should-Retry"] = should_retry
    return httpx.Response(status, json={"error": {"type": "invalid_request_error", "message": message}},
                          headers=headers)


def created(request: httpx.Request) -> httpx.Response:
    fields = dict(parse_qsl(request.content.decode()))
    return httpx.Response(200, json={"object": "billing.meter_event", "identifier": fields["identifier"]})


# --------------------------------------------------------------------------- render and classify

def test_one_form_encoded_meter_event_per_request_with_the_pinned_version() -> None:
    backend = Peer(created)
    sink = sink_of(customer_key="customer", value_key="gib")
    records = make_records(3, customer="cus_Acme 1", start=RECENT)
    got = outcomes(delivery_over(sink, backend), records)
    assert set(got.values()) == {Delivered(200)}
    assert len(backend.requests) == 3
    first = min(backend.requests, key=lambda r: r.content)
    assert (first.method, str(first.url)) == ("POST", "https://api.stripe.test/v1/billing/meter_events")
    assert first.headers["Authorization"] == f"Bearer {API_KEY}"
    assert first.headers["Stripe-Version"] == STRIPE_VERSION
    assert first.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert "Idempotency-Key" not in first.headers
    sent = {r.content for r in backend.requests}
    expected = {(f"event_name=ebs-storage&identifier={r.record_id}&timestamp={int(r.timestamp.timestamp())}"
                 f"&payload%5Bcustomer%5D=cus_Acme+1&payload%5Bgib%5D={r.value}").encode() for r in records}
    assert sent == expected
    assert set(bodies(sink, records, FakeClock())) == expected  # what --dry-run prints is what is sent


def test_a_duplicate_identifier_is_delivered_and_should_retry_is_honoured() -> None:
    answers = {
        "dup": stripe_error(400, "An event already exists with identifier dup.", "false"),
        "retry": stripe_error(409, "Lock timeout", "true", **{"Retry-After": "3"}),
        "stop": stripe_error(500, "Unrecoverable", "false"),
        "bad": stripe_error(400, "No such customer: 'bad'", "false"),
        "limit": stripe_error(429, "Too many requests", None, **{"Retry-After": "9"}),
        "down": stripe_error(503, "Service unavailable"),
        "key": stripe_error(401, "Invalid API Key provided", "false"),
        "portal": httpx.Response(200, text="<html>wifi</html>", headers={"Content-Type": "text/html"}),
    }
    backend = Peer(lambda request: answers[dict(parse_qsl(request.content.decode()))["payload[stripe_customer_id]"]])
    by_customer = {name: make_records(1, customer=name, start=RECENT)[0] for name in answers}
    got = outcomes(delivery_over(sink_of(), backend), list(by_customer.values()))
    outcome = {name: got[record.record_id] for name, record in by_customer.items()}
    assert outcome["dup"] == Delivered(400)
    assert isinstance(outcome["retry"], RetryLater) and outcome["retry"].retry_after == 3.0
    assert "Stripe-Should-Retry: true: Lock timeout" in outcome["retry"].reason
    assert isinstance(outcome["stop"], Rejected) and outcome["stop"].status == 500
    assert isinstance(outcome["bad"], Rejected) and "No such customer" in outcome["bad"].body
    assert (outcome["limit"].status, outcome["limit"].retry_after) == (429, 9.0)
    assert isinstance(outcome["down"], RetryLater) and not outcome["down"].alert
    assert isinstance(outcome["key"], RetryLater) and outcome["key"].alert  # not the record's fault: kept
    assert isinstance(outcome["portal"], RetryLater) and "billing.meter_event" in outcome["portal"].reason


def test_a_record_outside_stripes_window_is_dead_lettered_unsent(tmp_path: Path) -> None:
    clock = FakeClock()
    backend = Peer(created)
    old = make_records(1, customer="old", start=CLOCK_START - timedelta(days=35, minutes=15))[0]
    ahead = make_records(1, customer="ahead", start=CLOCK_START + timedelta(minutes=15))[0]
    good = make_records(2, start=RECENT)
    delivery = delivery_over(sink_of(), backend, clock)
    got = {r.record_id: o for r, o in delivery.deliver([old, *good, ahead])}
    assert [got[r.record_id] for r in good] == [Delivered(200)] * 2
    assert got[old.record_id] == Rejected(None, (
        "T 2026-12-11T07:45:00Z is 35 days 15 minutes before 2027-01-15T08:00:00Z: Stripe takes events from the past "
        "35 days only, so it is not sent"))
    assert got[ahead.record_id] == Rejected(None, (
        "T 2027-01-15T08:15:00Z is 15 minutes after 2027-01-15T08:00:00Z: Stripe takes events at most "
        "5 minutes ahead, so it is not sent"))
    assert len(backend.requests) == 2
    with capture_logs() as logs:
        shown = bodies(sink_of(), [old, *good], clock)
    assert len(shown) == 2 and [e["record_id"] for e in logs] == [old.record_id]


def test_config_defaults_and_errors(tmp_path: Path) -> None:
    cfg = parse_backend({"type": "stripe", "api_key": "sk_x"})
    assert (cfg.url, cfg.customer_key, cfg.value_key, cfg.max_in_flight, cfg.timeout) == (
        "https://api.stripe.com", "stripe_customer_id", "value", 8, timedelta(seconds=10))
    assert "sk_x" not in repr(cfg)
    (tmp_path / "key").write_text("sk_from_file\n")

    def problems(**backend: Any) -> list[tuple[str, str]]:
        with pytest.raises(ConfigError) as info:
            parse_config(backend_config({"type": "stripe", **backend}, tmp_path), "<test>", {}, base_dir=tmp_path)
        return info.value.problems

    assert problems() == [("backend", "set exactly one of api_key or api_key_file")]
    assert problems(api_key="a", api_key_file="key") == [("backend", "set exactly one of api_key or api_key_file")]
    assert problems(api_key="a", customer_key="value") == [
        ("backend", "customer_key and value_key must differ (both are 'value')")]
    assert problems(api_key="a", value_key="v[1]")[0][0] == "backend.value_key"
    assert problems(api_key="a", max_in_flight=0, batch_size=5) == [
        ("backend.batch_size", "unknown key"), ("backend.max_in_flight", "Input should be greater than or equal to 1")]
    from_file = parse_config(backend_config({"type": "stripe", "api_key_file": "key"}, tmp_path), "<test>", {},
                             base_dir=tmp_path)
    assert from_file.backend.api_key.get_secret_value() == "sk_from_file"


# --------------------------------------------------------------------------- delivery and faults

@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def stripe(clock: FakeClock) -> Iterator[StripeContractServer]:
    with StripeContractServer(clock=clock.time) as server:
        yield server


@pytest.fixture
def pipeline(stripe: StripeContractServer, clock: FakeClock, tmp_path: Path) -> Iterator[Pipeline]:
    p = Pipeline.over(StripeSink(parse_backend({**STRIPE, "url": stripe.url, "timeout": "1s"})),
                      tmp_path / "spool.db", clock)
    yield p
    p.close()


def test_nothing_is_lost_under_faults(stripe: StripeContractServer, pipeline: Pipeline) -> None:
    stripe.script(EVENTS_PATH, Fault(status=503), Fault(status=429, retry_after="7"), Fault(drop=True),
                  Fault(after_commit=True, drop=True), Fault(delay=1.5),
                  Fault(answer=stripe.error(409, "Lock timeout", should_retry="true")),
                  Fault(answer=stripe.error(500, "Retry me", should_retry="true")))
    records = make_records(40, start=RECENT - timedelta(hours=9))
    pipeline.enqueue(records)
    pipeline.run_until_drained()
    assert stripe.accepted_ids() == {r.record_id for r in records}
    assert pipeline.spool.counts() == {"pending": 0, "leased": 0, "delivered": 40, "dead": 0}
    assert stripe.duplicates() >= 1  # the event whose answer was lost was sent again and answered as a duplicate
    assert stripe.max_in_flight_by_path[EVENTS_PATH] > 1  # one event per request, several at once


def test_a_poison_event_is_dead_lettered_and_the_rest_delivered(stripe: StripeContractServer, pipeline: Pipeline) -> None:
    stripe.reject = lambda event: "No such customer: 'cus_gone'" if event["payload"]["stripe_customer_id"] == "cus_gone" else None
    good = make_records(12, start=RECENT - timedelta(hours=3))
    poison = make_records(1, customer="cus_gone", start=RECENT)[0]
    pipeline.enqueue(good[:5] + [poison] + good[5:])
    pipeline.run_until_drained()
    assert stripe.accepted_ids() == {r.record_id for r in good}
    (dead,) = pipeline.spool.rows("dead")
    assert (dead["id"], dead["last_status"]) == (poison.record_id, 400)
    assert json.loads(dead["last_error"])["error"]["message"] == "No such customer: 'cus_gone'"
    assert pipeline.spool.counts()["delivered"] == 12


def test_a_record_pending_past_the_dedup_window_is_logged_once(stripe: StripeContractServer, pipeline: Pipeline) -> None:
    stripe.script(EVENTS_PATH, *[Fault(status=503)] * 6)
    old = make_records(3, start=CLOCK_START - timedelta(days=2))
    fresh = make_records(2, start=RECENT)
    pipeline.enqueue(old + fresh)
    with capture_logs() as logs:
        pipeline.forwarder.drain()  # every send answered 503
        pipeline.clock.advance_to(pipeline.spool.next_due())
        pipeline.forwarder.drain()  # sent again: not logged again
    warned = [e["record_id"] for e in logs if e["event"].startswith("record pending past the backend's deduplication window")]
    assert sorted(warned) == sorted(r.record_id for r in old)
    assert pipeline.metrics.value("usage_agent_records_past_dedup_window_total") == 3
    pipeline.run_until_drained()
    assert pipeline.spool.counts()["delivered"] == 5


# --------------------------------------------------------------------------- the CLI, over moto

NOW = datetime.now(timezone.utc)
AT = NOW - timedelta(hours=1)
TICK = tick_floor(AT, 900)


def usage_agent(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return cli(*args, env={**os.environ, **env})


def stripe_config(server: StripeContractServer, tmp_path: Path, spool: str = "spool.db") -> Path:
    return write_yaml(tmp_path / f"{spool}.yaml", backend_config(
        {"type": "stripe", "url": server.url, "api_key": "${STRIPE_API_KEY}", "customer_key": "stripe_customer_id",
         "value_key": "value"}, tmp_path, *MEASUREMENTS, spool={"path": str(tmp_path / spool)}))


def expected_events(volumes: dict[str, str]) -> dict[str, dict[str, Any]]:
    at = int(TICK.timestamp())

    def event(rid: str, name: str, customer: str, value: str) -> dict[str, Any]:
        return {"event_name": name, "identifier": rid, "timestamp": at,
                "payload": {"stripe_customer_id": customer, "value": value}}

    events = {rid: event(rid, "ebs_storage_gib", customer, value) for customer, value in (("acme", "107"), ("globex", "500"))
              if (rid := record_id("ebs-storage", DIMENSION, customer, "aggregate", TICK))}
    for key, value in (("acme-100", "25"), ("acme-7", "1.75")):
        arn = f"arn:aws:ec2:us-east-1:{ACCOUNT}:volume/{volumes[key]}"
        rid = record_id("ebs-gib-hours", "dim-hours", "acme", arn, TICK)
        events[rid] = event(rid, "ebs-gib-hours", "acme", value)
    return events


def test_once_sends_exact_meter_events_and_a_fresh_spool_ends_delivered(aws: Aws, tmp_path: Path) -> None:
    volumes = seed(aws)
    key = {"STRIPE_API_KEY": API_KEY}
    with StripeContractServer() as server:
        dry = usage_agent("once", "-c", str(stripe_config(server, tmp_path)), "--at", AT.isoformat(), "--dry-run", env=key)
        assert dry.returncode == 0, dry.stderr
        assert server.requests == 0
        done = usage_agent("once", "-c", str(stripe_config(server, tmp_path)), "--at", AT.isoformat(), env=key)
        assert done.returncode == 0, done.stderr
        assert server.events == expected_events(volumes)
        assert sorted(dry.stdout.encode().splitlines()) == sorted(server.bodies)  # the dry run printed each exact body
        assert set(server.versions) == {STRIPE_VERSION}

        again = usage_agent("once", "-c", str(stripe_config(server, tmp_path, "fresh.db")), "--at", AT.isoformat(), env=key)
        assert again.returncode == 0, again.stderr  # every event answered "already exists": delivered
        assert server.duplicates() == 4 and server.events == expected_events(volumes)
        assert sorted(server.bodies[4:]) == sorted(server.bodies[:4])  # the same ids, byte for byte
    spool = Spool.open_existing(tmp_path / "fresh.db", 1000)
    assert spool.counts() == {"pending": 0, "leased": 0, "delivered": 4, "dead": 0}
    spool.close()
    for output in (dry.stderr, dry.stdout, done.stderr, done.stdout, again.stderr):
        assert API_KEY not in output
    for path in tmp_path.glob("*.db*"):
        assert API_KEY.encode() not in path.read_bytes()


def test_once_dead_letters_a_poison_event_and_delivers_the_rest(aws: Aws, tmp_path: Path) -> None:
    volumes = seed(aws)
    reject = lambda event: "No such customer: 'globex'" if event["payload"]["stripe_customer_id"] == "globex" else None  # noqa: E731
    with StripeContractServer(reject=reject) as server:
        done = usage_agent("once", "-c", str(stripe_config(server, tmp_path)), "--at", AT.isoformat(),
                           env={"STRIPE_API_KEY": API_KEY})
    assert done.returncode == 1, done.stderr
    expected = expected_events(volumes)
    globex = record_id("ebs-storage", DIMENSION, "globex", "aggregate", TICK)
    assert server.events == {rid: e for rid, e in expected.items() if rid != globex}
    spool = Spool.open_existing(tmp_path / "spool.db", 1000)
    (dead,) = spool.rows("dead")
    spool.close()
    assert (dead["id"], dead["last_status"]) == (globex, 400) and "No such customer" in dead["last_error"]


def test_the_readme_shows_the_body_the_agent_sends() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    (shown,) = [line for line in readme.splitlines() if line.startswith("event_name=")]
    tick = datetime(2026, 11, 21, 10, tzinfo=timezone.utc)
    record = replace(make_record("cus_NciAYcXfLnqBoz", tick, "107", dimension="ebs-storage-gib"),
                     event_type="ebs_storage_gib")
    assert bodies(sink_of(), [record], FakeClock(tick.timestamp() + 3600)) == [shown.encode()]


def test_the_agents_client_keeps_a_connection_per_request_in_flight(clock: FakeClock) -> None:
    from agent.sinks import build_backend

    with StripeContractServer(clock=clock.time, latency=0.05) as server:
        backend = build_backend(parse_backend({**STRIPE, "url": server.url, "max_in_flight": 4}), Metrics(), clock)
        try:
            got = list(Delivery(backend.sink, backend.client, Metrics(), clock).deliver(make_records(16, start=RECENT - timedelta(hours=4))))
        finally:
            backend.close()
    assert {o for _, o in got} == {Delivered(200)}
    assert server.max_in_flight_by_path[EVENTS_PATH] == 4


def test_the_server_refuses_what_stripe_refuses(stripe: StripeContractServer) -> None:
    def post(body: str, **headers: str) -> httpx.Response:
        return httpx.post(f"{stripe.url}{EVENTS_PATH}", content=body, timeout=5, headers={
            "Authorization": f"Bearer {API_KEY}", "Content-Type": "application/x-www-form-urlencoded", **headers})

    at = int(stripe.clock())
    ok = f"event_name=e&identifier=i1&timestamp={at}&payload%5Bstripe_customer_id%5D=cus_1&payload%5Bvalue%5D=2.5"
    assert post(ok).status_code == 200
    unknown = post(ok.replace("i1", "i2") + "&customer=cus_1").json()["error"]
    assert (unknown["code"], unknown["param"]) == ("parameter_unknown", "customer")
    assert post(ok.replace(f"timestamp={at}", f"timestamp={at - 36 * 86400}")).json()["error"]["param"] == "timestamp"
    assert post(ok.replace("payload%5Bvalue%5D=2.5&", "")).status_code == 400
    assert post(ok, Authorization="Bearer sk_wrong").status_code == 401
    duplicate = post(ok)
    assert duplicate.status_code == 400 and duplicate.headers["Stripe-Should-Retry"] == "false"
    assert duplicate.json()["error"]["message"] == "An event already exists with identifier i1."
