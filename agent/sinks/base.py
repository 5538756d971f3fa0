"""The sink protocol and what a send can come to."""

from __future__ import annotations

import email.utils
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import httpx

from agent.convert import UsageRecord

RETRY_AFTER_MAX = 3600.0  # a backend asking for more than an hour is clamped to an hour


@dataclass(frozen=True)
class Delivered:
    status: int


@dataclass(frozen=True)
class RetryLater:
    reason: str
    status: int | None = None
    retry_after: float | None = None  # seconds, from the backend's Retry-After
    auth: bool = False  # the backend refused our credentials: an operator must look


@dataclass(frozen=True)
class Rejected:
    status: int
    body: str


Outcome = Delivered | RetryLater | Rejected


class Sink(Protocol):
    name: str

    def render(self, record: UsageRecord) -> Any:
        """The JSON body (or the part of a batch body) the backend receives for a record."""

    def deliver(self, records: Sequence[UsageRecord]) -> list[Outcome]:
        """Send records; one outcome per record, in order. Never raises for I/O failures."""

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


def classify(response: httpx.Response) -> Outcome:
    """Map a backend response to an outcome: 2xx delivered, 408/429/5xx retry, 401/403 auth, other 4xx reject."""
    status = response.status_code
    if 200 <= status < 300:
        return Delivered(status)
    retry_after = parse_retry_after(response.headers.get("Retry-After"))
    if status in (408, 429) or status >= 500:
        return RetryLater(f"backend answered {status}", status=status, retry_after=retry_after)
    if status in (401, 403):
        return RetryLater(f"backend refused the credentials ({status})", status=status, retry_after=retry_after, auth=True)
    return Rejected(status=status, body=response.text[:4000])


def transport_failure(exc: httpx.HTTPError) -> RetryLater:
    kind = "timeout" if isinstance(exc, httpx.TimeoutException) else "connection error"
    return RetryLater(f"{kind}: {type(exc).__name__}: {exc}")
