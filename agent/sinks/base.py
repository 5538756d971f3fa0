"""What a sink is: a declaration of what it takes, ``render`` and ``classify``; and what a send
can come to (``Delivered`` / ``RetryLater`` / ``Rejected``).

A sink turns records into one request and an answer into an outcome per record. It does not
batch, pool, thread, split or back off: ``agent.delivery`` does that for every sink, driven by
``max_batch``, ``array_body`` and ``max_in_flight``, and by ``Halve`` (a batch refused as a whole
without naming the records at fault is sent again in halves). A sink that knows records
its backend will not take (a time outside the window it accepts) says why in ``refuse``; such a
record is dead-lettered with that reason before anything is sent. ``dedup_window`` says how long
the backend deduplicates on the record id: a record older than that still pending is logged.
"""

from __future__ import annotations

import email.utils
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

import httpx

from agent.records import UsageRecord, format_timestamp
from agent.errors import excerpt

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


@dataclass(frozen=True)
class SendAgain:
    """A classification meaning: the credentials were renewed, send the same records once more now."""


@dataclass(frozen=True)
class Halve:
    """A classification meaning: the backend refused the request as a whole without naming the
    records at fault (too large, an answer that cannot be attributed): send each half; a record
    sent alone gets ``rejected``. For sinks whose backend otherwise names the records it refuses."""

    rejected: Rejected


class NotSendable(Exception):
    """``render`` cannot make a request now (no token): every record of the batch gets ``outcome``."""

    def __init__(self, outcome: RetryLater):
        super().__init__(outcome.reason)
        self.outcome = outcome


@dataclass(frozen=True)
class Answer:
    """What a peer answered to ``request``, read no further than ``ANSWER_CAP`` bytes."""

    status: int
    headers: httpx.Headers
    body: bytes
    complete: bool  # False: the body went on past the cap and was not read
    url: str
    request: httpx.Request | None = None

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


class Sink(Protocol):
    name: str
    max_batch: int  # the most records one request (or write) carries
    array_body: bool  # one request's body is a JSON array of many records (else: one record per body or line)
    max_in_flight: int  # requests the delivery may have open at once
    timeout: float  # seconds each request may take in total
    dedup_window: timedelta | None  # how long the backend deduplicates on the record id; None: it does not

    def refuse(self, record: UsageRecord, now: datetime) -> str | None:
        """Why the backend would not take this record at ``now`` (its time outside the window the
        backend accepts), or None: a reason dead-letters the record before it is sent."""

    def element(self, record: UsageRecord) -> Any:
        """The JSON the backend receives for a record: a whole body, or its element of a batch."""

    def body(self, elements: Sequence[bytes]) -> bytes:
        """The exact bytes of the request body carrying these encoded elements (what
        ``once --dry-run`` prints)."""

    def render(self, elements: Sequence[bytes]) -> Any:
        """One request carrying these encoded elements (an ``httpx.Request``; the file sink: its
        write). May raise ``NotSendable``."""

    def classify(self, answer: Any, records: Sequence[UsageRecord]) -> list[Outcome | SendAgain | Halve]:
        """The outcome of each record the request carried."""

    def close(self) -> None: ...


class SinkDefaults:
    """What a sink declares when its backend does not deduplicate, refuses no record by its time,
    and takes its elements as JSON (one per body, or an array)."""

    array_body: bool
    dedup_window: timedelta | None = None

    def refuse(self, record: UsageRecord, now: datetime) -> str | None:
        return None

    def body(self, elements: Sequence[bytes]) -> bytes:
        if self.array_body:
            return json_array(elements)
        (element,) = elements
        return element

    def close(self) -> None:
        """Nothing to release: the client is the composition root's."""


def outside_window(record: UsageRecord, now: datetime, max_age: timedelta, max_ahead: timedelta,
                   backend: str) -> str | None:
    """The reason a backend that takes only times within [now - max_age, now + max_ahead] refuses
    ``record``, or None when its time T is within."""
    if record.timestamp < now - max_age:
        age = now - record.timestamp
        return (f"T {format_timestamp(record.timestamp)} is {_span(age)} before {format_timestamp(now)}: "
                f"{backend} takes events from the past {_span(max_age)} only, so it is not sent")
    if record.timestamp > now + max_ahead:
        return (f"T {format_timestamp(record.timestamp)} is {_span(record.timestamp - now)} after "
                f"{format_timestamp(now)}: {backend} takes events at most {_span(max_ahead)} ahead, so it is not sent")
    return None


def _span(span: timedelta) -> str:
    """A duration as a reason shows it: ``35 days``, ``2 days 3 hours 15 minutes``, ``5 minutes``."""
    seconds, parts = int(span.total_seconds()), []
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1)):
        count, seconds = divmod(seconds, size)
        if count:
            parts.append(f"{count} {unit}{'s' if count > 1 else ''}")
    return " ".join(parts) or "0 seconds"


def json_bytes(value: Any) -> bytes:
    """The one serialisation of every body: compact, UTF-8, key order as built."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def json_array(elements: Sequence[bytes]) -> bytes:
    return b"[" + b",".join(elements) + b"]"  # the bytes json_bytes gives for the list


def events_body(elements: Sequence[bytes]) -> bytes:
    """``{"events": [...]}``: the body of the usage APIs that wrap their batch (Togai, Lago, Orb)."""
    return b'{"events":' + json_array(elements) + b"}"


def encode(element: Callable[[UsageRecord], Any], records: Sequence[UsageRecord]
           ) -> tuple[list[tuple[UsageRecord, bytes]], list[tuple[UsageRecord, Rejected]]]:
    """Each record as its JSON bytes; a record whose rendering raises is set apart, rejected
    with the reason, so it cannot hold back the others."""
    encoded: list[tuple[UsageRecord, bytes]] = []
    failed: list[tuple[UsageRecord, Rejected]] = []
    for record in records:
        try:
            encoded.append((record, json_bytes(element(record))))
        except RENDER_ERRORS as exc:
            reason = f"cannot render the record for the backend: {type(exc).__name__}: {excerpt(str(exc))}"
            failed.append((record, Rejected(status=None, body=reason)))
    return encoded, failed


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
NOT_THE_RECORDS_FAULT = {401: "refused the credentials", 403: "refused the credentials",
                          404: "has no such endpoint", 405: "does not allow this method",
                          415: "does not accept JSON"}

def json_object(answer: Answer) -> dict[str, Any] | None:
    """The answer's body as a JSON object, or None (not whole, not JSON, not an object)."""
    if not answer.complete:
        return None
    try:
        payload = json.loads(answer.body)
    except (ValueError, RecursionError):  # 16 KiB of "[" nests too deep for the parser
        return None
    return payload if isinstance(payload, dict) else None


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
    if status in NOT_THE_RECORDS_FAULT:
        reason = f"backend {NOT_THE_RECORDS_FAULT[status]} ({status} from {answer.url})"
        return RetryLater(reason, status=status, retry_after=retry_after, alert=True)
    if status < 200:
        return RetryLater(f"backend answered {status}, which is not a final answer", status=status, alert=True)
    return Rejected(status=status, body=answer.text[:REJECTED_BODY])


def transport_failure(exc: httpx.HTTPError, timeout: float | None = None) -> RetryLater:
    kind = "timeout" if isinstance(exc, httpx.TimeoutException) else "connection error"
    within = f" (no whole answer within {timeout:g}s)" if timeout is not None and kind == "timeout" else ""
    return RetryLater(f"{kind}{within}: {type(exc).__name__}: {excerpt(str(exc))}")


class BatchSink(SinkDefaults):
    """A backend that takes a JSON array of records per request and judges the batch as a whole
    (2xx takes all of it, a 4xx rejects all of it); subclasses say how a record renders, how a
    body is posted and (if the backend documents one) what its success answer is."""

    name: str
    max_batch: int
    array_body = True
    max_in_flight = 1  # batches go out one after the other, in lease order
    timeout: float
    success: SuccessCheck | None = None

    def classify(self, answer: Answer, records: Sequence[UsageRecord]) -> list[Outcome | SendAgain | Halve]:
        outcome = classify(answer, self.success)
        # a 4xx rejects the whole batch without naming the bad records: halve it to find them
        return [Halve(outcome) if isinstance(outcome, Rejected) else outcome] * len(records)
