"""Delivery: the agent's forwarder (lease -> concurrent sends -> settle) against a naive
sequential httpx loop, both sending to the same contract server on 127.0.0.1 that takes
``LATENCY`` seconds per request; and, for reference, against the same httpx client sending
with the forwarder's concurrency but no spool at all. The server runs in its own process: the
CPU measured is the client's alone.

Each backend is one ``DeliveryCase``: its server process, how the agent's sink is built for
it, and what one naive request is. A new sink gets a case in ``CASES``.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx

from agent.records import UsageRecord, format_decimal, format_timestamp
from bench.common import Timing, interleave, timed
from bench.records import BASE_TICK, ticks

LATENCY = 0.005
PER_TICK = 1000


@dataclass(frozen=True)
class DeliveryCase:
    name: str
    server: tuple[str, ...]  # python -m ... : prints {"url", ...} when ready, its counts when stdin closes
    build_sink: Callable[[dict[str, Any]], Any]  # server info -> the agent's sink and client (``sinks.Backend``)
    in_flight: int  # the sink's concurrent requests with that configuration
    naive_session: Callable[[httpx.Client, dict[str, Any]], dict[str, str]]  # -> headers for every request
    naive_request: Callable[[dict[str, Any], UsageRecord], tuple[str, Any]]  # -> (url, JSON body) of one record


def _backend(backend: Any) -> Any:
    """The sink and its client as the composition root builds them."""
    from agent.clock import SystemClock
    from agent.metrics import Metrics
    from agent.sinks import build_backend

    return build_backend(backend, Metrics(), SystemClock())


def _paigo_sink(server: dict[str, Any]) -> Any:
    from agent.config import parse_backend
    from bench.paigo_process import CLIENT_ID, CLIENT_SECRET

    return _backend(parse_backend({"type": "paigo", "url": server["url"], "token_url": server["token_url"],
                                   "audience": "https://qnonyh1pc7.execute-api.us-east-1.amazonaws.com",
                                   "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}))


def _paigo_token(client: httpx.Client, server: dict[str, Any]) -> dict[str, str]:
    from bench.paigo_process import CLIENT_ID, CLIENT_SECRET

    answer = client.post(server["token_url"], json={
        "audience": "https://qnonyh1pc7.execute-api.us-east-1.amazonaws.com", "grant_type": "client_credentials",
        "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET})
    answer.raise_for_status()
    return {"Authorization": f"Bearer {answer.json()['access_token']}"}


def _paigo_body(server: dict[str, Any], record: UsageRecord) -> tuple[str, Any]:
    return f"{server['url']}/usage", {
        "dimensionId": record.dimension_id,
        "customerId": record.customer_id,
        "timestamp": format_timestamp(record.timestamp),
        "recordValue": format_decimal(record.value),
        "metadata": {**record.metadata, "recordId": record.record_id},
    }


def _paigo_in_flight() -> int:
    from agent.config.backends import PaigoBackend

    return PaigoBackend.model_fields["max_in_flight"].default


PAIGO = DeliveryCase("paigo", ("bench.paigo_process", str(LATENCY)), _paigo_sink, _paigo_in_flight(), _paigo_token,
                     _paigo_body)


def _openmeter_backend(server: dict[str, Any]) -> Any:
    from agent.config import parse_backend
    from bench.openmeter_process import TOKEN

    return parse_backend({"type": "openmeter", "url": server["url"], "token": TOKEN})  # batch_size: the default, 100


def _openmeter_sink(server: dict[str, Any]) -> Any:
    return _backend(_openmeter_backend(server))


def _openmeter_session(client: httpx.Client, server: dict[str, Any]) -> dict[str, str]:
    from bench.openmeter_process import TOKEN

    return {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/cloudevents+json"}


_renderers: dict[str, Any] = {}


def _openmeter_event(server: dict[str, Any], record: UsageRecord) -> tuple[str, Any]:
    """One CloudEvent per request: what an integration that does not batch sends."""
    if server["url"] not in _renderers:
        from agent.sinks.openmeter import OpenMeterSink

        _renderers[server["url"]] = OpenMeterSink(_openmeter_backend(server)).element
    return f"{server['url']}/api/v1/events", _renderers[server["url"]](record)


OPENMETER = DeliveryCase("openmeter", ("bench.openmeter_process", str(LATENCY)), _openmeter_sink, 1,
                         _openmeter_session, _openmeter_event)
CASES = (PAIGO, OPENMETER)


def agent_forwarder(case: DeliveryCase, server: dict[str, Any], batches: list[list[UsageRecord]]) -> Timing:
    """Spool the records (not timed), then time the forwarder draining the spool."""
    from agent.forwarder import Forwarder
    from agent.spool import Spool

    total = sum(map(len, batches))
    with tempfile.TemporaryDirectory(prefix="bench-delivery-") as tmp:
        spool = Spool(Path(tmp) / "spool.db", max_records=10_000_000)
        for i, records in enumerate(batches):
            spool.commit_tick("ebs-gib-hours", BASE_TICK + timedelta(minutes=15 * i), records)
        backend = case.build_sink(server)
        if hasattr(backend.sink, "token"):
            backend.sink.token.get()  # the naive loop fetches its token before its clock starts too
        forwarder = Forwarder(spool, backend.sink, backend.client)
        timing, pumped = timed(forwarder.drain)
        backend.close()
        delivered = spool.counts()["delivered"]
        spool.close()
    if pumped.delivered != total or delivered != total:
        raise RuntimeError(f"the forwarder delivered {pumped.delivered} of {total} records ({pumped})")
    return timing


def naive_loop(case: DeliveryCase, server: dict[str, Any], records: list[UsageRecord]) -> Timing:
    """One request after the other over one keep-alive connection; no spool, no retries."""
    with httpx.Client(timeout=10) as client:
        headers = case.naive_session(client, server)

        def run() -> None:
            for record in records:
                url, body = case.naive_request(server, record)
                client.post(url, json=body, headers=headers).raise_for_status()

        timing, _ = timed(run)
    if timing.wall < len(records) * LATENCY:
        raise RuntimeError("the server answered faster than its latency: the latency was not applied")
    return timing


def threaded_loop(case: DeliveryCase, server: dict[str, Any], records: list[UsageRecord]) -> Timing:
    """The HTTP client alone at the forwarder's concurrency: what the agent's spool and
    bookkeeping cost on top of it is the difference."""
    limits = httpx.Limits(max_connections=case.in_flight, max_keepalive_connections=case.in_flight)
    with httpx.Client(timeout=10, limits=limits) as client, ThreadPoolExecutor(case.in_flight) as pool:
        headers = case.naive_session(client, server)

        def send(record: UsageRecord) -> None:
            url, body = case.naive_request(server, record)
            client.post(url, json=body, headers=headers).raise_for_status()

        def run() -> None:
            for done in as_completed([pool.submit(send, record) for record in records]):
                done.result()

        timing, _ = timed(run)
    return timing


def run(case: DeliveryCase, records: int, naive_records: int, threaded_records: int, repeats: int) -> dict[str, Any]:
    from bench.common import helper_process

    def other(count: int, first: int) -> list[UsageRecord]:
        # each contender sends records of its own: the server counts no duplicates
        return [r for batch in ticks(PER_TICK, -(-count // PER_TICK), first) for r in batch][:count]

    if case.in_flight == 1:  # a sink that sends one request at a time: the threaded reference is the naive loop
        threaded_records = 0
    batches = ticks(PER_TICK, records // PER_TICK)
    naive = other(naive_records, len(batches))
    threaded = other(threaded_records, len(batches) + 1 + naive_records // PER_TICK)
    contenders = {"naive": lambda: naive_loop(case, server, naive),
                  "agent": lambda: agent_forwarder(case, server, batches)}
    if threaded_records:
        contenders["httpx_threads"] = lambda: threaded_loop(case, server, threaded)
    with helper_process(*case.server) as (server, received):
        series = interleave(repeats, contenders)
    distinct = records + naive_records + threaded_records  # every repeat sends the same records again
    if received.get("accepted") != distinct or received.get("rejected"):
        raise RuntimeError(f"the server did not accept exactly the {distinct} records sent: {received}")
    return {"records": records, "naive_records": naive_records, "threaded_records": threaded_records,
            "series": series, "server": received}
