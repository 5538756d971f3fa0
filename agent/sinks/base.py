"""The sink protocol and what a send can come to."""

from __future__ import annotations

import email.utils
import json
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import httpx

from agent.convert import UsageRecord
from agent.telemetry import BACKEND_RESPONSES

RETRY_AFTER_MAX = 3600.0  # a backend asking for more than an hour is clamped to an hour


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
    status: int
    body: str


Outcome = Delivered | RetryLater | Rejected


class Sink(Protocol):
    name: str
    batch_size: int  # records the forwarder leases at a time

    def render(self, record: UsageRecord) -> Any:
        """The JSON the backend receives for a record: a whole body, or its element of a batch."""

    def bodies(self, records: Sequence[UsageRecord]) -> list[bytes]:
        """The exact bytes ``deliver`` sends for these records on a first try: one entry per
        request body (file sink: per line, without the newline)."""

    def deliver(
        self, records: Sequence[UsageRecord], stop: threading.Event | None = None
    ) -> Iterator[tuple[UsageRecord, Outcome]]:
        """Send records, yielding each outcome as it is known. Never raises for I/O failures.

        Once ``stop`` is set, sends not yet started are skipped (no outcome is yielded for
        them; they stay leased and go out again after the lease ends or the next start).
        """

    def close(self) -> None: ...


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


def count_response(response: httpx.Response) -> None:
    """httpx response hook: every answer the backend gives, by status."""
    BACKEND_RESPONSES.labels(str(response.status_code)).inc()


RESPONSE_HOOKS = {"response": [count_response]}  # event_hooks for every sink's httpx client


def classify(response: httpx.Response) -> Outcome:
    """2xx delivered; 408/429/5xx retry; 401/403/404/405/415 retry and alert; other 4xx reject."""
    status = response.status_code
    if 200 <= status < 300:
        return Delivered(status)
    retry_after = parse_retry_after(response.headers.get("Retry-After"))
    if status in (408, 429) or status >= 500:
        return RetryLater(f"backend answered {status}", status=status, retry_after=retry_after)
    if status in _NOT_THE_RECORDS_FAULT:
        reason = f"backend {_NOT_THE_RECORDS_FAULT[status]} ({status} from {response.request.url})"
        return RetryLater(reason, status=status, retry_after=retry_after, alert=True)
    return Rejected(status=status, body=response.text[:4000])


def transport_failure(exc: httpx.HTTPError) -> RetryLater:
    kind = "timeout" if isinstance(exc, httpx.TimeoutException) else "connection error"
    BACKEND_RESPONSES.labels(kind.replace(" ", "_")).inc()
    return RetryLater(f"{kind}: {type(exc).__name__}: {exc}")


def json_bytes(value: Any) -> bytes:
    """The one serialisation of every body: compact, UTF-8, key order as built."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


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
    a time; subclasses say how a record renders and how a body is posted."""

    name: str
    batch_size: int
    _client: httpx.Client

    @abstractmethod
    def render(self, record: UsageRecord) -> Any: ...

    @abstractmethod
    def _post(self, body: bytes) -> httpx.Response: ...

    def _body(self, records: Sequence[UsageRecord]) -> bytes:
        return json_bytes([self.render(record) for record in records])

    def _batches(self, records: Sequence[UsageRecord]) -> list[Sequence[UsageRecord]]:
        return [records[i:i + self.batch_size] for i in range(0, len(records), self.batch_size)]

    def bodies(self, records: Sequence[UsageRecord]) -> list[bytes]:
        return [self._body(batch) for batch in self._batches(records)]

    def _send(self, batch: Sequence[UsageRecord]) -> Outcome:
        try:
            response = self._post(self._body(batch))
        except httpx.HTTPError as exc:
            return transport_failure(exc)
        return classify(response)

    def deliver(
        self, records: Sequence[UsageRecord], stop: threading.Event | None = None
    ) -> Iterator[tuple[UsageRecord, Outcome]]:
        for batch in self._batches(records):
            yield from deliver_halving(batch, self._send, stop)

    def close(self) -> None:
        self._client.close()
