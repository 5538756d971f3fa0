"""Paigo sink and forwarder against the Paigo-contract server on 127.0.0.1, with faults."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import jsonschema
import pytest

import httpx

from agent.config import parse_backend
from agent.settings import PaigoBackend
from agent.records import UsageRecord
from agent.delivery import Delivery
from agent.forwarder import Forwarder
from agent.metrics import Metrics
from agent.sinks.base import Sink, parse_retry_after
from agent.sinks.file import AuditLog, FileSink
from agent.sinks.paigo import ClientCredentialsToken, PaigoSink
from agent.sinks.transport import http_client
from agent.spool import Spool
from agent.testing.paigo_server import Fault, PaigoContractServer, usage_record_schema
from tests.conftest import CLIENT_ID, CLIENT_SECRET, DIMENSION
from tests.support import FakeClock, drain_on, make_records

TICK = datetime(2026, 11, 21, 10, 0, tzinfo=timezone.utc)


def backend(server: PaigoContractServer, **overrides: Any) -> PaigoBackend:
    return parse_backend({
        "type": "paigo", "url": server.url, "token_url": server.token_url,
        "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET, **overrides,
    })


def client_for(sink_timeout: float = 10.0, transport: httpx.BaseTransport | None = None) -> httpx.Client:
    """The agent's client, as the composition root builds it."""
    return http_client(sink_timeout, 8, transport)


@dataclass
class Pipeline:
    """A spool, a sink, the client and a forwarder on one fake clock: delivery without real waits."""

    spool: Spool
    sink: Sink
    forwarder: Forwarder
    clock: FakeClock
    audit: AuditLog | None = None
    client: httpx.Client | None = None
    metrics: Metrics | None = None

    @classmethod
    def over(cls, sink: Sink, path: Path, clock: FakeClock | None = None, audit: AuditLog | None = None,
             client: httpx.Client | None = None, metrics: Metrics | None = None, **forwarder: Any) -> Pipeline:
        clock = clock or FakeClock()
        metrics = metrics or Metrics()
        spool = Spool(path, clock=clock)
        spool.claim()
        if client is None and not isinstance(sink, FileSink):
            client = client_for(sink.timeout)
        return cls(spool, sink, Forwarder(spool, sink, client, metrics=metrics, clock=clock, audit=audit, **forwarder),
                   clock, audit, client, metrics)

    def close(self) -> None:
        if self.audit is not None:
            self.audit.close()
        self.sink.close()
        if self.client is not None:
            self.client.close()
        self.spool.close()

    @classmethod
    def paigo(cls, cfg: PaigoBackend, path: Path, clock: FakeClock | None = None, **forwarder: Any) -> Pipeline:
        """The Paigo sink over the pipeline's client, its token timed on the pipeline's clock."""
        clock, metrics = clock or FakeClock(), Metrics()
        client = client_for(cfg.timeout.total_seconds())
        return cls.over(PaigoSink(cfg, client, metrics, clock), path, clock, client=client, metrics=metrics, **forwarder)

    def deliver(self, records: list[UsageRecord]) -> list[tuple[UsageRecord, Any]]:
        """The records through the pipeline's sink and client, without the spool."""
        return list(Delivery(self.sink, self.client, self.metrics or Metrics()).deliver(records))

    def enqueue(self, records: list[UsageRecord]) -> None:
        self.spool.commit_tick("ebs-storage", TICK, records)

    def run_until_drained(self, rounds: int = 50) -> None:
        """Pump, jumping the fake clock over every backoff, until nothing is left to send."""
        drain_on(self.forwarder, self.spool, self.clock, rounds)


@pytest.fixture
def pipeline(paigo: PaigoContractServer, tmp_path: Path) -> Iterator[Pipeline]:
    p = Pipeline.paigo(backend(paigo, timeout="1s"), tmp_path / "spool.db", batch_size=32)
    yield p
    p.close()


def test_bodies_match_the_documented_contract(pipeline: Pipeline, paigo: PaigoContractServer) -> None:
    records = make_records(3)
    pipeline.enqueue(records)
    pipeline.run_until_drained()

    validator = jsonschema.Draft7Validator(usage_record_schema())
    bodies = sorted(paigo.accepted, key=lambda b: b["timestamp"])
    for body in bodies:
        validator.validate(body)
    assert bodies[0] == {
        "dimensionId": DIMENSION,
        "customerId": "acme",
        "timestamp": "2026-11-21T10:00:00Z",
        "recordValue": "1.75",
        "metadata": {"region": "us-east-1", "recordId": records[0].record_id},
    }
    assert [b["recordValue"] for b in bodies] == ["1.75", "2.75", "3.75"]
    assert paigo.token_requests == 1  # one token for every request
    assert pipeline.spool.counts()["delivered"] == 3


def test_several_requests_in_flight_over_one_client(pipeline: Pipeline, paigo: PaigoContractServer) -> None:
    paigo.script("/usage", *[Fault(delay=0.2) for _ in range(8)])
    pipeline.enqueue(make_records(16))
    pipeline.run_until_drained()
    assert paigo.max_in_flight >= 4
    assert len(paigo.accepted_ids()) == 16


def test_token_is_cached_until_shortly_before_expiry(paigo: PaigoContractServer) -> None:
    paigo.expires_in = 3600
    clock = FakeClock(100.0)
    with client_for() as client:
        token = ClientCredentialsToken(backend(paigo), client, Metrics(), clock)
        first = token.get()
        clock.advance(3000)
        assert token.get() == first and paigo.token_requests == 1
        clock.advance(301)  # within five minutes of expires_in
        assert token.get() != first and paigo.token_requests == 2


def test_token_is_fetched_again_once_on_401(pipeline: Pipeline, paigo: PaigoContractServer) -> None:
    pipeline.enqueue(make_records(1))
    pipeline.run_until_drained()
    paigo.revoke_tokens()
    pipeline.enqueue(make_records(2)[1:])
    pipeline.forwarder.drain()
    assert paigo.token_requests == 2
    assert pipeline.spool.counts() == {"pending": 0, "leased": 0, "delivered": 2, "dead": 0}


def test_rejected_credentials_keep_records_pending(paigo: PaigoContractServer, tmp_path: Path) -> None:
    p = Pipeline.paigo(backend(paigo, client_secret="wrong"), tmp_path / "spool.db")
    p.spool.commit_tick("ebs-storage", TICK, make_records(40))
    p.forwarder.drain()
    assert p.spool.counts() == {"pending": 40, "leased": 0, "delivered": 0, "dead": 0}
    row = p.spool.rows("pending")[0]
    assert row["attempts"] == 1 and row["last_status"] == 401
    assert paigo.token_requests == 1  # one refusal holds the whole batch, not one request per record
    assert paigo.usage_requests == 0
    p.close()


def test_a_wrong_endpoint_keeps_records_pending(paigo: PaigoContractServer, tmp_path: Path) -> None:
    p = Pipeline.paigo(backend(paigo, url=f"{paigo.url}/v2"), tmp_path / "spool.db")  # answers 404
    p.spool.commit_tick("ebs-storage", TICK, make_records(3))
    p.forwarder.drain()
    assert p.spool.counts() == {"pending": 3, "leased": 0, "delivered": 0, "dead": 0}
    assert {row["last_status"] for row in p.spool.rows("pending")} == {404}  # not the records' fault
    p.close()


def test_retry_after_is_honoured(pipeline: Pipeline, paigo: PaigoContractServer) -> None:
    paigo.script("/usage", Fault(status=429, retry_after="7"))
    pipeline.enqueue(make_records(1))
    pipeline.forwarder.drain()
    assert pipeline.spool.next_due() == pipeline.clock.time() + 7
    pipeline.clock.advance(6.9)
    assert pipeline.forwarder.pump().leased == 0  # not before the backend said
    pipeline.clock.advance(0.1)
    assert pipeline.forwarder.pump().delivered == 1


def test_retry_after_forms() -> None:
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412480.0 - 30) == 30.0
    assert parse_retry_after("999999") == 3600.0  # clamped
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412480.0 + 30) == 0.0
    assert parse_retry_after("soon") is None


def test_transient_faults_are_retried_until_every_record_is_delivered_once(
    pipeline: Pipeline, paigo: PaigoContractServer
) -> None:
    paigo.script(
        "/usage",
        Fault(status=500), Fault(status=502), Fault(status=503), Fault(status=504),
        Fault(drop=True), Fault(delay=1.5),  # longer than the 1s client timeout
        Fault(after_commit=True, drop=True),  # accepted, then the answer is lost
    )
    records = make_records(10)
    pipeline.enqueue(records)
    pipeline.run_until_drained()

    assert paigo.accepted_ids() == {r.record_id for r in records}
    assert paigo.duplicates() <= 2  # only re-sends of the same id whose answer was lost
    assert pipeline.spool.counts() == {"pending": 0, "leased": 0, "delivered": 10, "dead": 0}


def test_a_rejected_record_is_dead_lettered_and_holds_back_nothing(paigo: PaigoContractServer, pipeline: Pipeline) -> None:
    paigo.reject = lambda body: body["customerId"] == "poison"
    good = make_records(5)
    poison = make_records(1, customer="poison")
    pipeline.enqueue(good[:2] + poison + good[2:])
    pipeline.run_until_drained()

    assert paigo.accepted_ids() == {r.record_id for r in good}
    (dead,) = pipeline.spool.rows("dead")
    assert dead["id"] == poison[0].record_id
    assert dead["last_status"] == 400
    assert json.loads(dead["last_error"]) == {"message": "Customer not found"}


def test_backoff_is_exponential_capped_and_jittered(tmp_path: Path, paigo: PaigoContractServer) -> None:
    import random

    p = Pipeline.paigo(backend(paigo), tmp_path / "spool.db", base_backoff=1.0, max_backoff=300.0, rng=random.Random(7))
    for attempts, ceiling in [(0, 1), (1, 2), (4, 16), (8, 256), (9, 300), (60, 300)]:
        waits = [p.forwarder.backoff(attempts) for _ in range(50)]
        assert all(ceiling / 2 <= w <= ceiling for w in waits)
        assert len(set(waits)) > 1  # jittered
    p.close()


class RenderFails(PaigoSink):
    """Paigo, with a bug (not an I/O failure) in building one record's request."""

    poison = ""

    def render(self, elements: Any) -> httpx.Request:
        if self.poison.encode() in elements[0]:
            raise RuntimeError("a bug rendering one request")
        return super().render(elements)


def test_a_bug_in_one_send_loses_no_outcome_of_the_others(paigo: PaigoContractServer, tmp_path: Path) -> None:
    cfg = backend(paigo, max_in_flight=4)
    clock, metrics = FakeClock(), Metrics()
    client = client_for(cfg.timeout.total_seconds())
    sink = RenderFails(cfg, client, metrics, clock)
    p = Pipeline.over(sink, tmp_path / "spool.db", clock, client=client, metrics=metrics)
    records = make_records(8)
    sink.poison = records[0].record_id
    paigo.script("/usage", *[Fault(delay=0.1) for _ in range(7)])  # the others still in flight when the bug raises
    p.enqueue(records)
    with pytest.raises(RuntimeError, match="a bug rendering"):
        p.forwarder.pump()
    assert p.spool.counts() == {"pending": 0, "leased": 1, "delivered": 7, "dead": 0}
    assert p.forwarder.pump().leased == 0  # the 7 the backend took are not sent again
    assert paigo.accepted_ids() == {r.record_id for r in records[1:]} and paigo.usage_requests == 7
    p.close()
