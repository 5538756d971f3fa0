"""Rendering, classifying and the delivery policy, through the transport seam
(``httpx.MockTransport``): no sockets, no servers, no waits."""

from __future__ import annotations

import errno
import hashlib
import hmac
import json
import threading
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from agent.config import parse_backend
from agent.delivery import Delivery
from agent.metrics import Metrics
from agent.sinks.base import Delivered, Rejected, RetryLater
from agent.sinks.file import FileSink, Written
from agent.sinks.http import HttpSink
from agent.sinks.openmeter import OpenMeterSink
from agent.sinks.paigo import PaigoSink
from agent.sinks.transport import http_client
from tests.support import FakeClock, make_records

Handler = Callable[[httpx.Request], httpx.Response]
PAIGO = {"type": "paigo", "url": "https://api.paigo.test", "token_url": "https://auth.paigo.test/oauth/token",
         "client_id": "client-abc", "client_secret": "s3cr3t"}


def settings_of(**fields: Any) -> Any:
    """A backend section as the config reads it."""
    return parse_backend(fields)


class Peer:
    """A scripted peer behind MockTransport; keeps every request it was sent."""

    def __init__(self, handler: Handler):
        self.requests: list[httpx.Request] = []
        self._handler = handler
        self._lock = threading.Lock()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        request.read()
        with self._lock:
            self.requests.append(request)
        return self._handler(request)

    def paths(self) -> list[str]:
        return [r.url.path for r in self.requests]


def paigo_answers(usage: Handler, tokens: list[str] | None = None) -> Handler:
    issued = iter(tokens or [f"token-{i}" for i in range(100)])

    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/oauth/token":
            return httpx.Response(200, json={"access_token": next(issued), "expires_in": 3600})
        return usage(request)
    return answer


def delivery_over(sink: Any, backend: Peer, metrics: Metrics | None = None) -> Delivery:
    return Delivery(sink, http_client(5.0, 8, httpx.MockTransport(backend)), metrics or Metrics())


def paigo(backend: Peer, metrics: Metrics | None = None, **overrides: Any) -> tuple[PaigoSink, Delivery]:
    metrics = metrics or Metrics()
    client = http_client(5.0, 8, httpx.MockTransport(backend))
    sink = PaigoSink(parse_backend({**PAIGO, **overrides}), client, metrics, FakeClock())
    return sink, Delivery(sink, client, metrics)


def outcomes(delivery: Delivery, records: list, stop: threading.Event | None = None) -> dict[str, Any]:
    return {record.record_id: outcome for record, outcome in delivery.deliver(records, stop)}


def test_openmeter_renders_one_batch_request_with_the_agents_headers() -> None:
    backend = Peer(lambda request: httpx.Response(204))
    sink = OpenMeterSink(settings_of(type="openmeter", url="https://om.test", token="om-token", batch_size=3))
    records = make_records(4)
    got = outcomes(delivery_over(sink, backend), records)
    assert set(got.values()) == {Delivered(204)}
    first, second = backend.requests
    assert (first.method, str(first.url)) == ("POST", "https://om.test/api/v1/events")
    assert first.headers["Content-Type"] == "application/cloudevents-batch+json"
    assert first.headers["Authorization"] == "Bearer om-token"
    assert first.headers["Accept-Encoding"] == "identity" and first.headers["User-Agent"].startswith("usage-agent/")
    assert [e["id"] for e in json.loads(first.content)] == [r.record_id for r in records[:3]]
    assert len(json.loads(second.content)) == 1  # max_batch 3: the fourth record goes alone


def test_a_poison_record_is_found_by_halving_a_batch_the_backend_rejects_whole() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        events = json.loads(request.content)
        if any(e["subject"] == "poison" for e in events):
            return httpx.Response(400, json={"title": "invalid event"})
        return httpx.Response(204)

    backend = Peer(answer)
    sink = OpenMeterSink(settings_of(type="openmeter", url="https://om.test"))
    good = make_records(15)
    poison = make_records(1, customer="poison")[0]
    got = outcomes(delivery_over(sink, backend), good[:9] + [poison] + good[9:])
    assert isinstance(got[poison.record_id], Rejected) and got[poison.record_id].status == 400
    assert all(got[r.record_id] == Delivered(204) for r in good)
    assert len(backend.requests) <= 1 + 2 * 4  # 16 records: two halves per level, four levels
    delivered = [e["id"] for r in backend.requests if r.url.path.endswith("events")
                 for e in json.loads(r.content) if not any(x["subject"] == "poison" for x in json.loads(r.content))]
    assert sorted(delivered) == sorted(r.record_id for r in good)  # each good record accepted exactly once


def test_paigo_sends_one_record_per_request_with_a_token_fetched_through_the_same_client() -> None:
    metrics = Metrics()
    backend = Peer(paigo_answers(lambda request: httpx.Response(201, json={"message": "Usage record created"})))
    _, delivery = paigo(backend, metrics)
    records = make_records(3)
    assert set(outcomes(delivery, records).values()) == {Delivered(201)}
    assert backend.paths().count("/oauth/token") == 1 and backend.paths().count("/usage") == 3
    token_request = backend.requests[0]
    assert json.loads(token_request.content) == {
        "audience": "https://qnonyh1pc7.execute-api.us-east-1.amazonaws.com", "grant_type": "client_credentials",
        "client_id": "client-abc", "client_secret": "s3cr3t"}
    usage = [r for r in backend.requests if r.url.path == "/usage"]
    assert {r.headers["Authorization"] for r in usage} == {"Bearer token-0"}
    assert {json.loads(r.content)["metadata"]["recordId"] for r in usage} == {r.record_id for r in records}
    assert metrics.value("usage_agent_backend_responses_total", {"status": "201"}) == 3
    assert metrics.value("usage_agent_backend_responses_total", {"status": "200"}) == 1  # the token answer
    assert metrics.value("usage_agent_token_refreshes_total", {"kind": "backend"}) == 1


def test_a_401_renews_the_token_and_sends_once_more() -> None:
    def usage(request: httpx.Request) -> httpx.Response:
        if request.headers["Authorization"] == "Bearer token-0":
            return httpx.Response(401, json={"message": "Unauthorized"})
        return httpx.Response(200, json={"message": "ok"})

    backend = Peer(paigo_answers(usage))
    _, delivery = paigo(backend)
    (record,) = make_records(1)
    assert outcomes(delivery, [record]) == {record.record_id: Delivered(200)}
    assert backend.paths() == ["/oauth/token", "/usage", "/oauth/token", "/usage"]


def test_a_401_to_the_renewed_token_too_is_held_back_with_an_alert() -> None:
    backend = Peer(paigo_answers(lambda request: httpx.Response(401)))
    _, delivery = paigo(backend, max_in_flight=1)
    got = outcomes(delivery, make_records(5))
    assert backend.paths() == ["/oauth/token", "/usage", "/oauth/token", "/usage"]  # held: not one per record
    assert all(isinstance(o, RetryLater) and o.alert and o.retry_after and o.retry_after >= 5 for o in got.values())
    assert "check backend.client_id" in next(iter(got.values())).reason


def test_no_token_means_no_usage_request() -> None:
    backend = Peer(lambda request: httpx.Response(503, headers={"Retry-After": "30"}))
    _, delivery = paigo(backend)
    got = outcomes(delivery, make_records(4))
    assert backend.paths() == ["/oauth/token"]
    assert {o.retry_after for o in got.values()} == {30.0}
    assert all("token endpoint auth.paigo.test answered 503" in o.reason for o in got.values())


def test_an_undocumented_2xx_and_a_redirect_are_not_delivery_and_not_followed() -> None:
    answers = iter([httpx.Response(200, text="<html>portal</html>", headers={"Content-Type": "text/html"}),
                    httpx.Response(302, headers={"Location": "https://elsewhere.test/usage"})])
    backend = Peer(paigo_answers(lambda request: next(answers)))
    _, delivery = paigo(backend, max_in_flight=1)
    first, second = outcomes(delivery, make_records(2)).values()
    assert isinstance(first, RetryLater) and first.alert and "text/html" in first.reason
    assert isinstance(second, RetryLater) and second.alert and "https://elsewhere.test/usage" in second.reason
    assert len(backend.requests) == 3  # the token and two sends; the Location is never requested


def test_an_answer_is_read_only_to_the_cap() -> None:
    backend = Peer(lambda request: httpx.Response(422, content=b"e" * (1 << 20)))
    sink = HttpSink(settings_of(type="http", url="https://billing.test/usage"))
    (outcome,) = outcomes(delivery_over(sink, backend), make_records(1)).values()
    assert isinstance(outcome, Rejected) and outcome.status == 422 and len(outcome.body) == 4000


def test_retry_after_and_retryable_statuses_are_classified() -> None:
    statuses = iter([429, 503, 408, 404])
    backend = Peer(lambda request: httpx.Response(next(statuses), headers={"Retry-After": "7"}))
    sink = HttpSink(settings_of(type="http", url="https://billing.test/usage", batch_size=1))
    got = list(outcomes(delivery_over(sink, backend), make_records(4)).values())
    assert [(o.status, o.retry_after, o.alert) for o in got] == [(429, 7.0, False), (503, 7.0, False),
                                                                 (408, 7.0, False), (404, 7.0, True)]


def test_the_http_sink_signs_the_exact_body_on_its_clock() -> None:
    backend = Peer(lambda request: httpx.Response(200))
    sink = HttpSink(settings_of(type="http", url="https://billing.test/usage", hmac_secret="k3y",
                                headers={"X-Tenant": "acme"}), FakeClock(1_800_000_123.9))
    outcomes(delivery_over(sink, backend), make_records(2))
    (request,) = backend.requests
    assert request.headers["X-Usage-Timestamp"] == "1800000123" and request.headers["X-Tenant"] == "acme"
    expected = hmac.new(b"k3y", b"1800000123." + request.content, hashlib.sha256).hexdigest()
    assert request.headers["X-Usage-Signature"] == f"sha256={expected}"


def test_a_transport_failure_is_retried_and_counted() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    metrics = Metrics()
    sink = OpenMeterSink(settings_of(type="openmeter", url="https://om.test"))
    got = outcomes(delivery_over(sink, Peer(refuse), metrics), make_records(3))
    assert all(isinstance(o, RetryLater) and o.reason.startswith("connection error") for o in got.values())
    assert metrics.value("usage_agent_backend_responses_total", {"status": "connection_error"}) == 1


def test_sends_run_up_to_max_in_flight_at_once() -> None:
    together = threading.Barrier(4, timeout=10)  # breaks (and the test fails) unless four sends wait at once
    backend = Peer(paigo_answers(lambda request: (together.wait(), httpx.Response(200, json={"message": "ok"}))[1]))
    _, delivery = paigo(backend, max_in_flight=4)
    assert set(outcomes(delivery, make_records(8)).values()) == {Delivered(200)}


def test_once_stopped_no_send_starts() -> None:
    stop = threading.Event()

    def answer(request: httpx.Request) -> httpx.Response:
        stop.set()  # the first send is in flight when the stop comes
        return httpx.Response(204)

    backend = Peer(answer)
    sink = OpenMeterSink(settings_of(type="openmeter", url="https://om.test", batch_size=2))
    got = outcomes(delivery_over(sink, backend), make_records(6), stop)
    assert len(backend.requests) == 1 and list(got.values()) == [Delivered(204)] * 2  # the rest stay leased


def test_the_file_sink_classifies_a_write_cut_short(tmp_path: Any) -> None:
    sink = FileSink(settings_of(type="file", path=str(tmp_path / "usage.jsonl")))  # opens nothing before a write
    got = sink.classify(Written(2, OSError(errno.ENOSPC, "No space left on device")), make_records(5))
    assert got[:2] == [Delivered(), Delivered()]
    assert all(isinstance(o, RetryLater) and o.alert and "No space left on device" in o.reason for o in got[2:])
    assert len(got) == 5


@pytest.mark.parametrize("status", [401, 403, 405, 415])
def test_statuses_that_are_not_the_records_fault_alert(status: int) -> None:
    backend = Peer(lambda request: httpx.Response(status))
    sink = OpenMeterSink(settings_of(type="openmeter", url="https://om.test"))
    got = outcomes(delivery_over(sink, backend), make_records(4))
    assert len(backend.requests) == 1  # not halved: the records are not at fault
    assert all(isinstance(o, RetryLater) and o.alert and o.status == status for o in got.values())
