"""Backends that misbehave: trickled headers, huge answers, redirects, captive portals,
malformed tokens, an API that refuses every token, and records that cannot be rendered.
Real servers on 127.0.0.1 (the contract servers with scripted faults); the process-level
ones drive real `usage-agent` processes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from agent.config import parse_backend
from agent.delivery import Delivery, bodies
from agent.metrics import Metrics
from agent.sinks.base import Delivered, Rejected, RetryLater, Sink, classify
from agent.sinks.file import FileSink
from agent.sinks.http import HttpSink
from agent.sinks.openmeter import OpenMeterSink
from agent.spool import Spool
from agent.telemetry import redact_secrets
from tests.http_server import HttpContractServer
from tests.openmeter_server import OpenMeterContractServer
from agent.testing.paigo_server import PaigoContractServer
from agent.testing.server import Answer as ServerAnswer
from agent.testing.server import Fault, LoopbackServer
from tests.conftest import CLIENT_ID, CLIENT_SECRET, Aws, agent_command, measurement, write_config
from tests.support import FakeClock, make_records
from tests.test_delivery import Pipeline, backend

OM_TOKEN = "om-hostile"
PAD = "x" * 400
HALF_SECOND = timedelta(seconds=0.5)  # a header line long enough that trickling it outlasts every timeout here


def trickled(seconds: float = 0.05) -> Fault:
    """A 200 whose status line and headers arrive a byte every ``seconds``: minutes in all."""
    return Fault(answer=ServerAnswer(200, {"message": "ok"}, headers={"X-Pad": PAD}), trickle=seconds)


@dataclass
class Backend:
    kind: str
    server: LoopbackServer
    pipeline: Pipeline
    path: str  # where the sink posts records


@pytest.fixture(params=["paigo", "openmeter", "http"])
def hostile(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """Each HTTP backend's sink over its contract server, 0.5 s of total deadline per request."""
    kind = request.param
    spool = tmp_path / "spool.db"
    if kind == "paigo":
        server: LoopbackServer = PaigoContractServer(client_id=CLIENT_ID, client_secret=CLIENT_SECRET).start()
        pipeline = Pipeline.paigo(backend(server, timeout=HALF_SECOND), spool)
        path = "/usage"
    elif kind == "openmeter":
        server = OpenMeterContractServer(token=OM_TOKEN).start()
        pipeline = Pipeline.over(OpenMeterSink(parse_backend(
            {"type": "openmeter", "url": server.url, "token": OM_TOKEN, "timeout": HALF_SECOND})), spool)
        path = "/api/v1/events"
    else:
        server = HttpContractServer().start()
        sink: Sink = HttpSink(parse_backend({"type": "http", "url": server.usage_url, "timeout": HALF_SECOND}))
        pipeline = Pipeline.over(sink, spool)
        path = "/usage"
    found = Backend(kind, server, pipeline, path)
    yield found
    found.pipeline.close()
    server.stop()


# -- total deadline ------------------------------------------------------------------------

def test_trickled_headers_end_at_the_total_deadline(hostile: Backend) -> None:
    pipeline = hostile.pipeline
    hostile.server.script(hostile.path, *[trickled() for _ in range(20)])
    pipeline.enqueue(make_records(3))
    started = time.monotonic()
    pipeline.forwarder.drain()
    elapsed = time.monotonic() - started
    assert elapsed < 3.0, f"a 0.5 s deadline took {elapsed:.1f}s"  # the headers alone take 20 s
    assert pipeline.spool.counts() == {"pending": 3, "leased": 0, "delivered": 0, "dead": 0}
    assert "timeout" in pipeline.spool.rows("pending")[0]["last_error"]


def test_a_trickling_token_endpoint_ends_at_the_deadline_too(paigo: PaigoContractServer, tmp_path: Path) -> None:
    paigo.script("/oauth/token", *[Fault(answer=ServerAnswer(200, {"access_token": "t"}, headers={"X-Pad": PAD}),
                                         trickle=0.05) for _ in range(5)])
    pipeline = Pipeline.paigo(backend(paigo, timeout=HALF_SECOND), tmp_path / "spool.db")
    pipeline.enqueue(make_records(20))
    started = time.monotonic()
    pipeline.forwarder.drain()
    assert time.monotonic() - started < 3.0
    assert pipeline.spool.counts()["pending"] == 20
    assert "token endpoint 127.0.0.1" in pipeline.spool.rows("pending")[0]["last_error"]
    pipeline.close()


def test_once_timeout_holds_against_trickled_headers(aws: Aws, paigo: PaigoContractServer, tmp_path: Path) -> None:
    aws.volume("us-east-1", 10, tags={"customer-id": "acme"})
    config = write_config(paigo, tmp_path, measurement(), timeout="1s")
    paigo.script("/usage", *[trickled() for _ in range(1000)])
    started = time.monotonic()
    done = subprocess.run([*agent_command(), "once", "-c", str(config), "--timeout", "2s"],
                          capture_output=True, text=True, timeout=120, env=dict(os.environ))
    elapsed = time.monotonic() - started
    print(f"\nonce --timeout 2s against trickled headers (backend.timeout 1s): {elapsed:.1f}s")
    assert elapsed < 15, f"once --timeout 2s ran {elapsed:.0f}s"  # each trickled answer takes 20 s
    assert done.returncode == 1, done.stderr[-2000:]
    spool = Spool(tmp_path / "spool.db")
    assert spool.counts()["pending"] == 1 and spool.counts()["leased"] == 0
    spool.close()


def _listen_address(log: Path) -> str:
    for line in log.read_text().splitlines():
        if '"agent started"' in line:
            return json.loads(line)["listen"]
    raise AssertionError("the daemon did not start")


def _readyz(address: str) -> int | None:
    try:
        with urllib.request.urlopen(f"http://{address}/readyz", timeout=2) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:  # the server is already closed
        return None


def test_sigterm_holds_against_trickled_headers(aws: Aws, paigo: PaigoContractServer, tmp_path: Path) -> None:
    aws.volume("us-east-1", 10, tags={"customer-id": "acme"})
    config = write_config(paigo, tmp_path, measurement(interval="1s"), timeout="3s")
    paigo.script("/usage", *[trickled() for _ in range(1000)])
    log = tmp_path / "agent.log"
    with open(log, "ab") as out:
        agent = subprocess.Popen([*agent_command(), "run", "-c", str(config)], stdout=out, stderr=out,
                                 env=dict(os.environ))
    try:
        deadline = time.monotonic() + 30
        while paigo.in_flight == 0:
            assert time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.05)
        address = _listen_address(log)
        agent.send_signal(signal.SIGTERM)
        stopping = time.monotonic()
        while '"stopping"' not in log.read_text() and agent.poll() is None:  # the signal is handled
            time.sleep(0.01)
        statuses = set()
        while agent.poll() is None and time.monotonic() - stopping < 20:
            statuses.add(_readyz(address))
            time.sleep(0.1)
        assert agent.wait(timeout=30) == 0, log.read_text()[-2000:]
        waited = time.monotonic() - stopping
    finally:
        agent.kill()
    print(f"\nSIGTERM to exit with a trickled send in flight (backend.timeout 3s): {waited:.1f}s")
    assert waited < 8, f"SIGTERM took {waited:.1f}s with a 3 s request deadline"  # a trickled answer: 20 s
    assert 503 in statuses and 200 not in statuses  # not ready while stopping
    spool = Spool(tmp_path / "spool.db")
    counts = spool.counts()
    spool.close()
    assert counts["leased"] == 0 and counts["pending"] >= 1 and counts["delivered"] == 0


class ForwardProxy(LoopbackServer):
    """An HTTP forward proxy that answers for every origin itself: 204, as OpenMeter does."""

    def answer(self, path: str, headers: dict[str, str], raw: bytes) -> ServerAnswer:
        return ServerAnswer(204)


def test_requests_through_a_proxy_from_the_environment_keep_the_deadline(monkeypatch: pytest.MonkeyPatch,
                                                                         tmp_path: Path) -> None:
    with ForwardProxy() as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        monkeypatch.setenv("NO_PROXY", "")
        sink = OpenMeterSink(parse_backend(
            {"type": "openmeter", "url": "http://openmeter.invalid", "timeout": HALF_SECOND}))
        pipeline = Pipeline.over(sink, tmp_path / "spool.db")
        pipeline.enqueue(make_records(2))
        pipeline.forwarder.drain()
        target = "http://openmeter.invalid/api/v1/events"
        assert pipeline.spool.counts()["delivered"] == 2 and proxy.requests_by_path[target] == 1

        proxy.script(target, Fault(answer=ServerAnswer(204, headers={"X-Pad": PAD}), trickle=0.05))
        pipeline.enqueue(make_records(3)[2:])
        started = time.monotonic()
        pipeline.forwarder.drain()
        assert time.monotonic() - started < 3.0  # the proxy's trickle ends at the deadline too
        assert pipeline.spool.counts()["pending"] == 1
        pipeline.close()


# -- capped reads --------------------------------------------------------------------------

FORWARD_ONCE = """
import sys
from agent.config import parse_backend
from agent.forwarder import Forwarder
from agent.metrics import Metrics
from agent.sinks.paigo import PaigoSink
from agent.sinks.transport import http_client
from agent.spool import Spool
from agent.telemetry import configure_logging
configure_logging()
url, token_url, path = sys.argv[1:4]
client = http_client(10.0, 4)
sink = PaigoSink(parse_backend({"type": "paigo", "url": url, "token_url": token_url, "client_id": "%s",
                               "client_secret": "%s", "max_in_flight": 4}), client, Metrics())
spool = Spool(path)
spool.claim()
Forwarder(spool, sink, client).drain()
client.close()
spool.close()
# this process's peak RSS since its exec (ru_maxrss would count the forking parent's pages)
print(next(line for line in open("/proc/self/status") if line.startswith("VmHWM:")), file=sys.stderr)
""" % (CLIENT_ID, CLIENT_SECRET)


def test_huge_answers_keep_memory_bounded(paigo: PaigoContractServer, tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.db")
    spool.commit_tick("ebs-storage", make_records(1)[0].timestamp, make_records(8))
    spool.close()
    paigo.script("/usage", *[Fault(padding=400 * 2**20) for _ in range(8)])  # valid JSON, 400 MB of it
    log = tmp_path / "forward.log"
    with open(log, "wb") as out:  # the forwarder in a process of its own, to measure its peak RSS
        child = subprocess.Popen([sys.executable, "-c", FORWARD_ONCE, paigo.url, paigo.token_url,
                                  str(tmp_path / "spool.db")], stdout=out, stderr=out)
    assert child.wait(timeout=120) == 0, log.read_text()[-2000:]
    text = log.read_text()
    peak_mib = int(re.search(r"VmHWM:\s+(\d+) kB", text).group(1)) / 1024
    print(f"\nforwarder, 8 answers of 400 MB, 4 in flight: peak RSS {peak_mib:.0f} MiB")
    assert peak_mib < 150, f"peak RSS {peak_mib:.0f} MiB"  # the process alone: about 60 MiB
    assert "more than 16384 bytes" in text and '"alert": true' in text
    assert max(map(len, text.splitlines())) < 4000  # the answer is excerpted, not logged
    spool = Spool(tmp_path / "spool.db")
    assert spool.counts()["pending"] == 8  # a 400 MB answer is not Paigo's success answer
    spool.close()


def test_a_huge_answer_is_read_only_as_far_as_it_is_useful(hostile: Backend) -> None:
    pipeline = hostile.pipeline
    hostile.server.script(hostile.path, Fault(answer=ServerAnswer(400, raw=b"e" * 2**20, content_type="text/plain"),
                                              padding=256 * 2**20))
    pipeline.enqueue(make_records(1))
    with capture_logs() as logs:
        pipeline.forwarder.drain()
    (dead,) = pipeline.spool.rows("dead")
    assert dead["last_status"] == 400 and len(dead["last_error"]) == 4000
    assert all(len(str(value)) <= 4000 for entry in logs for value in entry.values())
    deadline = time.monotonic() + 10
    while not hostile.server.answer_bytes and time.monotonic() < deadline:  # the server notices the hang-up
        time.sleep(0.01)
    assert hostile.server.answer_bytes[-1] < 32 * 2**20  # of 257 MiB: the agent hung up after the excerpt


# -- redirects -----------------------------------------------------------------------------

@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_a_redirect_is_not_followed_and_keeps_records_pending(hostile: Backend, status: int) -> None:
    pipeline = hostile.pipeline
    with HttpContractServer() as elsewhere:
        hostile.server.script(hostile.path, *[Fault(answer=ServerAnswer(status, headers={"Location": elsewhere.usage_url}))
                                              for _ in range(5)])
        pipeline.enqueue(make_records(4))
        with capture_logs() as logs:
            pipeline.forwarder.drain()
        assert elsewhere.requests == 0  # never followed: credentials stay with the configured host
    assert pipeline.spool.counts() == {"pending": 4, "leased": 0, "delivered": 0, "dead": 0}
    assert {row["last_status"] for row in pipeline.spool.rows("pending")} == {status}
    (alert,) = [e for e in logs if e["event"] == "delivery will be retried"]
    assert alert["log_level"] == "error" and alert["alert"] is True
    assert elsewhere.usage_url in alert["reason"]  # the log names the Location


def test_a_redirect_fails_readiness_after_alert_after(paigo: PaigoContractServer, tmp_path: Path) -> None:
    paigo.script("/usage", *[Fault(answer=ServerAnswer(307, headers={"Location": "https://moved.example/usage"}))
                             for _ in range(10)])
    clock = FakeClock()
    pipeline = Pipeline.paigo(backend(paigo), tmp_path / "spool.db", clock)
    pipeline.enqueue(make_records(2))
    pipeline.forwarder.drain()
    assert pipeline.forwarder.delivery_check(3600).ok  # an alert, not yet for an hour
    clock.advance(3601)
    check = pipeline.forwarder.delivery_check(3600)
    assert not check.ok and "https://moved.example/usage" in check.detail
    paigo.clear_faults()  # the URL is fixed (here: the backend stops redirecting)
    clock.advance(3600)
    pipeline.forwarder.drain()
    assert pipeline.spool.counts()["delivered"] == 2 and pipeline.forwarder.delivery_check(3600).ok
    pipeline.close()


def test_a_redirecting_token_endpoint_keeps_records_pending(paigo: PaigoContractServer, tmp_path: Path) -> None:
    paigo.script("/oauth/token", Fault(answer=ServerAnswer(302, headers={"Location": "https://sso.example/login"})))
    pipeline = Pipeline.paigo(backend(paigo), tmp_path / "spool.db")
    pipeline.enqueue(make_records(3))
    pipeline.forwarder.drain()
    assert pipeline.spool.counts()["pending"] == 3 and paigo.usage_requests == 0
    error = pipeline.spool.rows("pending")[0]["last_error"]
    assert "https://sso.example/login" in error and "backend.token_url" in error
    pipeline.close()


# -- success bodies ------------------------------------------------------------------------

PORTAL = ServerAnswer(200, raw=b"<html><body>Please log in to the guest Wi-Fi</body></html>", content_type="text/html")


@pytest.mark.parametrize("hostile", ["paigo", "openmeter"], indirect=True)  # http: any 2xx is delivery
def test_a_captive_portal_200_is_not_delivery(hostile: Backend) -> None:
    pipeline = hostile.pipeline
    hostile.server.script(hostile.path, *[Fault(answer=replace(PORTAL)) for _ in range(10)])
    pipeline.enqueue(make_records(3))
    with capture_logs() as logs:
        pipeline.forwarder.drain()
    assert pipeline.spool.counts() == {"pending": 3, "leased": 0, "delivered": 0, "dead": 0}
    (alert,) = [e for e in logs if e["event"] == "delivery will be retried"]
    assert alert["alert"] is True and "text/html" in alert["reason"] and "guest Wi-Fi" in alert["reason"]


def test_documented_success_answers_are_delivery() -> None:
    import httpx

    from agent.sinks.base import ANSWER_CAP, Answer

    def answer(status: int, body: bytes = b"", content_type: str = "application/json") -> Answer:
        return Answer(status, httpx.Headers({"Content-Type": content_type}), body, True, "http://127.0.0.1/x")

    from agent.sinks.openmeter import ingested
    from agent.sinks.paigo import documented_success

    assert classify(answer(200, b'{"message": "Usage record created"}'), documented_success) == Delivered(200)
    assert isinstance(classify(answer(200, b'{"data": []}'), documented_success), RetryLater)
    assert isinstance(classify(answer(200, b'{"message": 7}'), documented_success), RetryLater)
    truncated = replace(answer(200, b'{"message": "ok"}' + b" " * ANSWER_CAP), complete=False)
    assert isinstance(classify(truncated, documented_success), RetryLater)
    assert classify(answer(204), ingested) == Delivered(204)
    assert classify(answer(202), ingested) == Delivered(202)
    assert isinstance(classify(answer(200, b"{}"), ingested), RetryLater)
    assert classify(answer(200, b"<html>"), None) == Delivered(200)  # no documented body: any 2xx
    assert isinstance(classify(answer(400, b"bad")), Rejected)


# -- tokens --------------------------------------------------------------------------------

MALFORMED_TOKENS = {
    "access_token null": ({"access_token": None}, "access_token null"),
    "access_token missing": ({"token_type": "Bearer"}, "without access_token"),
    "access_token a number": ({"access_token": 12345}, "access_token a number"),
    "access_token empty": ({"access_token": ""}, "access_token an empty string"),
    "access_token with a line break": ({"access_token": "a\r\nX-Evil: 1"}, "not a bearer token"),
    "expires_in 0": ({"access_token": "t", "expires_in": 0}, "expires_in 0"),
    "expires_in negative": ({"access_token": "t", "expires_in": -5}, "expires_in -5"),
    "expires_in text": ({"access_token": "t", "expires_in": "soon"}, 'expires_in "soon"'),
    "expires_in absurd": ({"access_token": "t", "expires_in": 10**12}, "expires_in 1000000000000"),
    "expires_in a boolean": ({"access_token": "t", "expires_in": True}, "expires_in true"),
    "not an object": (["t"], "not a JSON object"),
    "nested past the parser": (None, "not a JSON object"),
}


@pytest.mark.parametrize("name", MALFORMED_TOKENS)
def test_a_malformed_token_answer_keeps_records_pending_and_names_the_peer(
    name: str, paigo: PaigoContractServer, tmp_path: Path
) -> None:
    payload, problem = MALFORMED_TOKENS[name]
    answer = ServerAnswer(200, payload) if payload is not None else ServerAnswer(200, raw=b"[" * 10_000)
    paigo.script("/oauth/token", *[Fault(answer=answer) for _ in range(50)])
    pipeline = Pipeline.paigo(backend(paigo), tmp_path / "spool.db")
    pipeline.enqueue(make_records(50))
    pipeline.forwarder.drain()
    assert pipeline.spool.counts() == {"pending": 50, "leased": 0, "delivered": 0, "dead": 0}
    assert paigo.requests_by_path["/oauth/token"] == 1 and paigo.usage_requests == 0
    error = pipeline.spool.rows("pending")[0]["last_error"]
    assert "token endpoint 127.0.0.1 answered 200" in error and problem in error, error
    pipeline.close()


def test_an_api_refusing_every_token_costs_one_refresh_per_burst(paigo: PaigoContractServer, tmp_path: Path) -> None:
    clock = FakeClock()
    pipeline = Pipeline.paigo(backend(paigo), tmp_path / "spool.db", clock, batch_size=250)
    paigo.script("/usage", *[Fault(status=401) for _ in range(10_000)])
    pipeline.enqueue(make_records(250))
    pipeline.forwarder.drain()
    assert paigo.token_requests == 2  # the first token, and one replacement for the burst of 401s
    assert paigo.usage_requests <= 2 * 8  # at most the sends in flight, twice
    assert pipeline.spool.counts()["pending"] == 250
    first_wait = pipeline.spool.next_due() - clock.time()
    assert first_wait >= 5  # held back, not retried at once

    for _ in range(3):  # each later burst: one token request, and a longer wait
        clock.advance_to(pipeline.spool.next_due())
        before = paigo.token_requests
        pipeline.forwarder.drain()
        assert paigo.token_requests - before <= 1
    assert pipeline.spool.next_due() - clock.time() > first_wait
    assert pipeline.spool.counts()["pending"] == 250

    paigo.clear_faults()  # the API takes tokens again
    clock.advance_to(pipeline.spool.next_due())
    pipeline.run_until_drained()
    assert pipeline.spool.counts()["delivered"] == 250
    pipeline.close()


def test_token_url_is_logged_but_secrets_are_not() -> None:
    event = redact_secrets(None, "info", {"token_url": "https://auth.paigo.tech/oauth/token",
                                          "client_secret": "s3cr3t", "reason": '{"access_token": "eyJ.x"}'})
    assert event["token_url"] == "https://auth.paigo.tech/oauth/token"
    assert event["client_secret"] == "[redacted]" and "eyJ" not in event["reason"]


# -- records that cannot be rendered -------------------------------------------------------

def unrenderable(records: list) -> list:
    """The third record carries a lone surrogate, which the spool keeps (as a JSON escape)
    but no UTF-8 body can hold."""
    return records[:2] + [replace(records[2], metadata={"team": "\udcff"})] + records[3:]


def test_a_record_that_cannot_be_rendered_is_dead_lettered_alone(hostile: Backend) -> None:
    pipeline = hostile.pipeline
    records = unrenderable(make_records(6))
    pipeline.enqueue(records)
    pipeline.run_until_drained()
    assert pipeline.spool.counts() == {"pending": 0, "leased": 0, "delivered": 5, "dead": 1}
    (dead,) = pipeline.spool.rows("dead")
    assert dead["id"] == records[2].record_id and dead["last_status"] is None
    assert dead["last_error"].startswith("cannot render the record for the backend: UnicodeEncodeError")
    with capture_logs() as logs:
        shown = bodies(pipeline.sink, records)  # a dry run leaves it out (and says so) instead of failing
    assert b"udcff" not in b"".join(shown) and len(b"".join(shown)) > 0
    assert [e["record_id"] for e in logs if e["event"] == "record left out: it would be dead-lettered"] == [records[2].record_id]


def test_a_value_that_cannot_be_written_rejects_only_its_record(hostile: Backend) -> None:
    records = make_records(4)
    records[1] = replace(records[1], value=Decimal("1E+999999999"))  # past any plain decimal string
    outcomes = {r.record_id: o for r, o in hostile.pipeline.deliver(records)}
    assert isinstance(outcomes[records[1].record_id], Rejected)
    assert "Overflow" in outcomes[records[1].record_id].body
    assert sum(isinstance(o, Delivered) for o in outcomes.values()) == 3


def test_the_file_sink_dead_letters_an_unrenderable_record_alone(tmp_path: Path) -> None:
    sink = FileSink(parse_backend({"type": "file", "path": str(tmp_path / "usage.jsonl")}))
    records = make_records(4)
    records[1] = replace(records[1], metadata={"bad": "\udcff"})  # a lone surrogate has no UTF-8
    outcomes = dict((r.record_id, o) for r, o in Delivery(sink, None, Metrics()).deliver(records))
    sink.close()
    assert isinstance(outcomes[records[1].record_id], Rejected)
    assert "UnicodeEncodeError" in outcomes[records[1].record_id].body
    assert sum(isinstance(o, Delivered) for o in outcomes.values()) == 3
    assert len((tmp_path / "usage.jsonl").read_bytes().splitlines()) == 3
