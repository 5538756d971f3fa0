"""The sink protocol, what a send can come to, and the one bounded way to send a request.

Every request a sink makes goes through ``send``: it is held to a total deadline (connect,
write, headers and body together), whatever the peer does, and at most ``ANSWER_CAP`` bytes
of the answer are read before the connection is closed. Redirects are never followed.
"""

from __future__ import annotations

import email.utils
import json
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Protocol

import httpcore
import httpx
import structlog
from httpx._utils import get_environment_proxies  # the rules httpx itself applies to HTTPS_PROXY, NO_PROXY

from agent import __version__
from agent.convert import UsageRecord
from agent.errors import excerpt
from agent.telemetry import BACKEND_RESPONSES

log = structlog.get_logger("agent.sinks")

RETRY_AFTER_MAX = 3600.0  # a backend asking for more than an hour is clamped to an hour
ANSWER_CAP = 16 * 1024  # bytes of an answer read: success bodies are tiny, errors are only excerpted
REJECTED_BODY = 4000  # characters of a rejecting answer kept with the dead-lettered record
# what rendering a record can raise for a value it cannot express (a Decimal out of range, a
# string that is not UTF-8): that record is dead-lettered, the others go on
RENDER_ERRORS = (ValueError, ArithmeticError, TypeError, LookupError)


@dataclass(frozen=True)
class Delivered:
    status: int | None = None  # the HTTP status; None for the file sink


@dataclass(frozen=True)
class RetryLater:
    reason: str
    status: int | None = None
    retry_after: float | None = None  # seconds, from the backend's Retry-After
    alert: bool = False  # not the record's fault (credentials, wrong endpoint): an operator must look


@dataclass(frozen=True)
class Rejected:
    status: int | None  # None: the agent itself could not render the record
    body: str


Outcome = Delivered | RetryLater | Rejected


class Sink(Protocol):
    name: str
    batch_size: int  # records the forwarder leases at a time

    def render(self, record: UsageRecord) -> Any:
        """The JSON the backend receives for a record: a whole body, or its element of a batch."""

    def bodies(self, records: Sequence[UsageRecord]) -> list[bytes]:
        """The exact bytes ``deliver`` sends for these records on a first try: one entry per
        request body (file sink: per line, without the newline). Records that cannot be
        rendered are left out (and logged): ``deliver`` dead-letters them."""

    def deliver(
        self, records: Sequence[UsageRecord], stop: threading.Event | None = None
    ) -> Iterator[tuple[UsageRecord, Outcome]]:
        """Send records, yielding each outcome as it is known. Never raises for I/O failures
        or for a record that cannot be rendered.

        Once ``stop`` is set, sends not yet started are skipped (no outcome is yielded for
        them; they stay leased and go out again after the lease ends or the next start).
        """

    def close(self) -> None: ...


def json_bytes(value: Any) -> bytes:
    """The one serialisation of every body: compact, UTF-8, key order as built."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def encode(render: Callable[[UsageRecord], Any], records: Sequence[UsageRecord]
           ) -> tuple[list[tuple[UsageRecord, bytes]], list[tuple[UsageRecord, Rejected]]]:
    """Each record as its JSON bytes; a record whose render raises is set apart, rejected
    with the reason, so it cannot hold back the others."""
    encoded: list[tuple[UsageRecord, bytes]] = []
    failed: list[tuple[UsageRecord, Rejected]] = []
    for record in records:
        try:
            encoded.append((record, json_bytes(render(record))))
        except RENDER_ERRORS as exc:
            reason = f"cannot render the record for the backend: {type(exc).__name__}: {excerpt(str(exc))}"
            failed.append((record, Rejected(status=None, body=reason)))
    return encoded, failed


def renderable(render: Callable[[UsageRecord], Any], records: Sequence[UsageRecord]) -> list[tuple[UsageRecord, bytes]]:
    """``encode`` for ``bodies`` (dry runs): the records that cannot be rendered are logged."""
    encoded, failed = encode(render, records)
    for record, rejected in failed:
        log.error("record left out: it would be dead-lettered", record_id=record.record_id,
                  measurement=record.measurement, reason=rejected.body)
    return encoded


# -- the bounded exchange ----------------------------------------------------------------

_DEADLINE: ContextVar[float | None] = ContextVar("request_deadline", default=None)  # monotonic


def _within(timeout: float | None, expired: type[Exception]) -> float | None:
    """A socket operation's timeout, cut to what is left of the request's total deadline."""
    deadline = _DEADLINE.get()
    if deadline is None:
        return timeout
    left = deadline - time.monotonic()
    if left <= 0:
        raise expired("the request's total deadline passed")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    """Every read and write waits at most until the deadline of the request it serves, so a
    peer that trickles bytes cannot stretch a request past it."""

    _WRITE_SLICE = 64 * 1024  # each slice gets what is left of the deadline, not the whole timeout

    def __init__(self, inner: httpcore.NetworkStream):
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, _within(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        for start in range(0, len(buffer), self._WRITE_SLICE):
            self._inner.write(buffer[start:start + self._WRITE_SLICE], _within(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context: Any, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        return _DeadlineStream(self._inner.start_tls(ssl_context, server_hostname,
                                                     _within(timeout, httpcore.ConnectTimeout)))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _DeadlineBackend(httpcore.NetworkBackend):
    def __init__(self) -> None:
        self._inner = httpcore.SyncBackend()

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: Any = None) -> httpcore.NetworkStream:
        return _DeadlineStream(self._inner.connect_tcp(host, port, _within(timeout, httpcore.ConnectTimeout),
                                                       local_address, socket_options))

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: Any = None) -> httpcore.NetworkStream:
        return _DeadlineStream(self._inner.connect_unix_socket(path, _within(timeout, httpcore.ConnectTimeout),
                                                               socket_options))

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


class _DeadlineTransport(httpx.HTTPTransport):
    """httpx's own transport (its proxies, exception mapping and streams) over sockets that
    honour each request's total deadline."""

    def __init__(self, limits: httpx.Limits, proxy: str | None = None):
        super().__init__(limits=limits, proxy=proxy)
        # httpx takes no network backend yet (encode/httpx#3749): the pool it built gets ours
        self._pool._network_backend = _DeadlineBackend()  # type: ignore[union-attr]


def count_response(response: httpx.Response) -> None:
    """httpx response hook: every answer the backend gives, by status."""
    BACKEND_RESPONSES.labels(str(response.status_code)).inc()


def http_client(timeout: float, headers: dict[str, str] | None = None, connections: int = 8) -> httpx.Client:
    """The client a sink sends with: redirects not followed, answers not compressed (a
    capped read of a compressed answer could inflate far past the cap)."""
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    # the environment's proxies (HTTPS_PROXY, NO_PROXY …), mounted as httpx mounts them for its own transport
    proxies = {pattern: _DeadlineTransport(limits, proxy) if proxy else None
               for pattern, proxy in get_environment_proxies().items()}
    return httpx.Client(
        timeout=httpx.Timeout(timeout),
        transport=_DeadlineTransport(limits),
        mounts=proxies,
        headers={"User-Agent": f"usage-agent/{__version__}", "Accept-Encoding": "identity", **(headers or {})},
        event_hooks={"response": [count_response]},
        follow_redirects=False,
    )


@dataclass(frozen=True)
class Answer:
    """What a peer answered, read no further than ``ANSWER_CAP`` bytes."""

    status: int
    headers: httpx.Headers
    body: bytes
    complete: bool  # False: the body went on past the cap and was not read
    url: str

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def describe(self) -> str:
        """The body as a log line or a reason may show it: its type and a capped excerpt."""
        if not self.body:
            return "an empty body"
        kind = self.headers.get("Content-Type", "no Content-Type")
        more = "" if self.complete else f", more than {ANSWER_CAP} bytes"
        return f"{excerpt(kind, 80)}{more}: {excerpt(self.text)!r}"


def send(client: httpx.Client, request: httpx.Request, timeout: float) -> Answer:
    """Send ``request`` and read its answer, all within ``timeout`` seconds in total.

    Raises httpx.HTTPError when no answer came in time or the connection failed.
    """
    token = _DEADLINE.set(time.monotonic() + timeout)
    try:
        response = client.send(request, stream=True)
        try:
            body = bytearray()
            complete = True
            for chunk in response.iter_raw():
                body += chunk
                if len(body) > ANSWER_CAP:
                    complete = False  # closing before the end drops the connection: it is not reused
                    break
            return Answer(response.status_code, response.headers, bytes(body[:ANSWER_CAP]), complete,
                          str(request.url))
        finally:
            response.close()
    finally:
        _DEADLINE.reset(token)


# -- classification ------------------------------------------------------------------------

def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds from now: delta-seconds or an HTTP-date, clamped to [0, 1h]."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        seconds = float(value)
    else:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when is None or when.tzinfo is None:
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    return min(max(seconds, 0.0), RETRY_AFTER_MAX)


# Statuses that say the request never reached a usage endpoint that could judge the record:
# refused credentials, a wrong URL or method, a body type the endpoint does not take.
_NOT_THE_RECORDS_FAULT = {401: "refused the credentials", 403: "refused the credentials",
                          404: "has no such endpoint", 405: "does not allow this method",
                          415: "does not accept JSON"}

# A 2xx answer's check: None when it is the backend's documented success answer, else how it differs.
SuccessCheck = Callable[[Answer], str | None]


def redirected(answer: Answer, setting: str = "backend.url") -> RetryLater:
    """A 3xx is a configuration problem: never followed (credentials would go to another
    host), never the records' fault."""
    location = answer.headers.get("Location")
    where = f"to {excerpt(location, 200)}" if location else "without a Location"
    return RetryLater(f"{answer.url} answered {answer.status}, redirecting {where}; redirects are not "
                      f"followed: set {setting} to the address the backend moved to",
                      status=answer.status, alert=True)


def classify(answer: Answer, success: SuccessCheck | None = None) -> Outcome:
    """2xx delivered (if ``success`` finds it the documented answer); 3xx, 401/403/404/405/415
    and an undocumented 2xx retry and alert; 408/429/5xx retry; other 4xx reject."""
    status = answer.status
    if 200 <= status < 300:
        problem = success(answer) if success is not None else None
        if problem is None:
            return Delivered(status)
        return RetryLater(f"{answer.url} answered {status} {problem}: not the backend's documented success "
                          f"answer, so the records are kept (is something else answering at this address?)",
                          status=status, alert=True)
    if 300 <= status < 400:
        return redirected(answer)
    retry_after = parse_retry_after(answer.headers.get("Retry-After"))
    if status in (408, 429) or status >= 500:
        return RetryLater(f"backend answered {status}", status=status, retry_after=retry_after)
    if status in _NOT_THE_RECORDS_FAULT:
        reason = f"backend {_NOT_THE_RECORDS_FAULT[status]} ({status} from {answer.url})"
        return RetryLater(reason, status=status, retry_after=retry_after, alert=True)
    if status < 200:
        return RetryLater(f"backend answered {status}, which is not a final answer", status=status, alert=True)
    return Rejected(status=status, body=answer.text[:REJECTED_BODY])


def transport_failure(exc: httpx.HTTPError, timeout: float | None = None) -> RetryLater:
    kind = "timeout" if isinstance(exc, httpx.TimeoutException) else "connection error"
    BACKEND_RESPONSES.labels(kind.replace(" ", "_")).inc()
    within = f" (no whole answer within {timeout:g}s)" if timeout is not None and kind == "timeout" else ""
    return RetryLater(f"{kind}{within}: {type(exc).__name__}: {excerpt(str(exc))}")


def deliver_halving(
    records: Sequence[UsageRecord],
    send: Callable[[Sequence[UsageRecord]], Outcome],
    stop: threading.Event | None = None,
) -> Iterator[tuple[UsageRecord, Outcome]]:
    """Send a batch as one request; when the backend rejects it (4xx), send each half again,
    down to single records, so only the records at fault are dead-lettered.

    A rejected batch of n records with one bad record costs about 2·log2(n) more requests.
    Retryable outcomes hold the (sub-)batch they answered; the rest go on.
    """
    waiting = [records] if records else []
    while waiting:
        if stop is not None and stop.is_set():
            return  # not sent: left leased, sent again later
        batch = waiting.pop()
        outcome = send(batch)
        if isinstance(outcome, Rejected) and len(batch) > 1:
            middle = len(batch) // 2
            waiting += [batch[middle:], batch[:middle]]  # first half next: outcomes keep lease order
            continue
        for record in batch:
            yield record, outcome


class JsonArraySink(ABC):
    """A backend that takes a JSON array of rendered records per request, ``batch_size`` at
    a time; subclasses say how a record renders, how a body is posted and (if the backend
    documents one) what its success answer is."""

    name: str
    batch_size: int
    _client: httpx.Client
    _timeout: float
    success: SuccessCheck | None = None

    @abstractmethod
    def render(self, record: UsageRecord) -> Any: ...

    @abstractmethod
    def _request(self, body: bytes) -> httpx.Request: ...

    def _batches(self, items: Sequence[Any]) -> list[Sequence[Any]]:
        return [items[i:i + self.batch_size] for i in range(0, len(items), self.batch_size)]

    @staticmethod
    def _array(elements: Sequence[bytes]) -> bytes:
        return b"[" + b",".join(elements) + b"]"  # the bytes json_bytes gives for the list

    def bodies(self, records: Sequence[UsageRecord]) -> list[bytes]:
        encoded = renderable(self.render, records)
        return [self._array([body for _, body in batch]) for batch in self._batches(encoded)]

    def deliver(
        self, records: Sequence[UsageRecord], stop: threading.Event | None = None
    ) -> Iterator[tuple[UsageRecord, Outcome]]:
        encoded, failed = encode(self.render, records)
        yield from failed
        element = {record.record_id: body for record, body in encoded}

        def send_batch(batch: Sequence[UsageRecord]) -> Outcome:
            try:
                answer = send(self._client, self._request(self._array([element[r.record_id] for r in batch])),
                              self._timeout)
            except httpx.HTTPError as exc:
                return transport_failure(exc, self._timeout)
            return classify(answer, self.success)

        for batch in self._batches([record for record, _ in encoded]):
            yield from deliver_halving(batch, send_batch, stop)

    def close(self) -> None:
        self._client.close()
