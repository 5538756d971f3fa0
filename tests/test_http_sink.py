"""The generic http sink against an in-house billing endpoint on 127.0.0.1."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from agent.config import parse_backend, parse_config
from agent.settings import HttpBackend
from agent.errors import ConfigError
from agent.delivery import bodies
from agent.sinks.http import HttpSink
from tests.http_server import HttpContractServer, verify_signature
from agent.testing.server import Fault
from tests.conftest import backend_config
from tests.support import FakeClock, make_records
from tests.test_delivery import TICK, Pipeline

SECRET = "hmac-9c1e7f"
NOW = 1_800_000_000.0


@pytest.fixture
def server() -> Iterator[HttpContractServer]:
    with HttpContractServer(headers={"X-Tenant": "acme", "Authorization": "Bearer in-house"},
                            hmac_secret=SECRET, clock=lambda: NOW) as s:
        yield s


def http_backend(server: HttpContractServer, tmp_path: Path, **overrides: Any) -> HttpBackend:
    auth = tmp_path / "authorization"
    auth.write_text("Bearer in-house\n")
    return parse_backend({
        "type": "http", "url": server.usage_url, "headers": {"X-Tenant": "acme"},
        "header_files": {"Authorization": str(auth)}, "hmac_secret": SECRET, "timeout": "1s", **overrides,
    })


def http_pipeline(server: HttpContractServer, tmp_path: Path, sink_clock: float = NOW, **backend: Any) -> Pipeline:
    return Pipeline.over(HttpSink(http_backend(server, tmp_path, **backend), clock=FakeClock(sink_clock)),
                         tmp_path / "spool.db")


@pytest.fixture
def pipeline(server: HttpContractServer, tmp_path: Path) -> Iterator[Pipeline]:
    p = http_pipeline(server, tmp_path)
    yield p
    p.close()


def test_a_batch_is_one_array_of_records_with_the_configured_headers(server: HttpContractServer, pipeline: Pipeline) -> None:
    records = make_records(3)
    pipeline.spool.commit_tick("ebs-storage", TICK, records)
    pipeline.forwarder.drain()

    assert server.batch_sizes == [3]
    assert server.records[records[0].record_id] == {
        "id": records[0].record_id, "measurement": "ebs-storage", "event_type": "ebs-storage",
        "dimension_id": records[0].dimension_id, "customer_id": "acme", "timestamp": "2026-11-21T10:00:00Z",
        "value": "1.75", "unit": "GiB", "resource": "aggregate", "metadata": {"region": "us-east-1"},
    }
    headers, body = server.last_request  # type: ignore[misc]
    assert headers["x-tenant"] == "acme" and headers["authorization"] == "Bearer in-house"
    assert headers["content-type"] == "application/json"
    assert body == bodies(pipeline.sink, records)[0]  # what --dry-run prints is what was sent
    assert pipeline.spool.counts()["delivered"] == 3


def test_the_signature_verifies_with_the_documented_algorithm(server: HttpContractServer, pipeline: Pipeline) -> None:
    pipeline.spool.commit_tick("ebs-storage", TICK, make_records(2))
    pipeline.forwarder.drain()
    headers, body = server.last_request  # type: ignore[misc]
    timestamp, signature = headers["x-usage-timestamp"], headers["x-usage-signature"]
    assert timestamp == str(int(NOW))

    # the README, step by step: HMAC-SHA256 over "<timestamp>.<body>", hex, prefixed "sha256="
    by_hand = "sha256=" + hmac.new(SECRET.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    assert signature == by_hand
    assert verify_signature(SECRET.encode(), timestamp, signature, body, now=NOW + 299) is None
    tampered = body.replace(b'"value":"1.75"', b'"value":"17.5"')
    assert tampered != body
    assert verify_signature(SECRET.encode(), timestamp, signature, tampered, now=NOW) == "X-Usage-Signature does not verify"
    assert verify_signature(SECRET.encode(), timestamp, signature, body, now=NOW + 301) == "stale X-Usage-Timestamp"
    assert verify_signature(b"another-secret", timestamp, signature, body, now=NOW) is not None


@pytest.mark.parametrize(("overrides", "sink_clock", "why"), [
    ({"hmac_secret": "wrong-secret"}, NOW, "X-Usage-Signature does not verify"),
    ({}, NOW - 600, "stale X-Usage-Timestamp"),  # the agent's clock is ten minutes behind
    ({"headers": {"X-Tenant": "globex"}}, NOW, "header x-tenant missing or wrong"),
], ids=["wrong-secret", "stale-clock", "wrong-header"])
def test_a_refused_signature_or_header_keeps_records_pending_and_alerts(
    server: HttpContractServer, tmp_path: Path, overrides: dict[str, Any], sink_clock: float, why: str
) -> None:
    pipeline = http_pipeline(server, tmp_path, sink_clock=sink_clock, **overrides)
    pipeline.spool.commit_tick("ebs-storage", TICK, make_records(5))
    with capture_logs() as logs:
        pipeline.forwarder.drain()
    assert pipeline.spool.counts() == {"pending": 5, "leased": 0, "delivered": 0, "dead": 0}
    assert server.refused == [(401, why)]
    assert any(e["event"] == "delivery will be retried" and e["alert"] is True for e in logs)
    pipeline.close()


def test_a_poison_record_in_a_batch_of_100_is_isolated(server: HttpContractServer, pipeline: Pipeline) -> None:
    server.reject = lambda record: "unknown customer" if record["customer_id"] == "poison" else None
    good = make_records(99)
    poison = make_records(1, customer="poison")[0]
    pipeline.spool.commit_tick("ebs-storage", TICK, good[:70] + [poison] + good[70:])
    pipeline.forwarder.drain()

    assert set(server.records) == {r.record_id for r in good}
    assert server.requests <= 1 + 2 * 7
    (dead,) = pipeline.spool.rows("dead")
    assert dead["id"] == poison.record_id and dead["last_status"] == 400
    assert json.loads(dead["last_error"]) == {"error": "[0]: unknown customer"}


def test_429_and_5xx_are_retried(server: HttpContractServer, pipeline: Pipeline) -> None:
    server.script("/usage", Fault(status=429, retry_after="3"), Fault(status=503), Fault(status=500))
    records = make_records(12)
    pipeline.spool.commit_tick("ebs-storage", TICK, records)
    pipeline.forwarder.drain()
    assert pipeline.spool.next_due() == pipeline.clock.time() + 3
    pipeline.run_until_drained()
    assert set(server.records) == {r.record_id for r in records}
    assert server.duplicates() == 0 and server.requests == 4


def config_problems(backend: dict[str, Any], tmp_path: Path) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        parse_config(backend_config(backend, tmp_path), "<test>", {}, base_dir=tmp_path)
    return info.value.problems


def test_config_errors_name_the_problem(tmp_path: Path) -> None:
    url = "http://127.0.0.1:9/usage"
    assert config_problems({"type": "http", "url": url, "headers": {"Content-Type": "text/plain"}}, tmp_path) == [
        ("backend", "header Content-Type is set by the agent and cannot be configured")]
    assert config_problems({"type": "http", "url": url, "headers": {"Bad Name": "x"}}, tmp_path) == [
        ("backend", "'Bad Name' is not a valid HTTP header name")]
    assert config_problems({"type": "http", "url": url, "headers": {"X-A": "a\nb"}}, tmp_path) == [
        ("backend", "header X-A: a value must not contain line breaks")]
    (tmp_path / "key").write_text("k")
    assert config_problems({"type": "http", "url": url, "hmac_secret": "a", "hmac_secret_file": "key"}, tmp_path) == [
        ("backend", "set at most one of hmac_secret or hmac_secret_file")]
    assert config_problems({"type": "http", "url": url, "header_files": {"X-Key": "missing"}}, tmp_path) == [
        ("backend.header_files", f"header X-Key: cannot read secret file {str(tmp_path / 'missing')!r}: No such file or directory")]
    assert config_problems({"type": "http"}, tmp_path) == [("backend.url", "required key is missing")]
