"""What tests share besides fixtures: a fake clock, a record factory, a deadline-bound wait."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any, TypeVar

from agent.clock import SystemClock
from agent.records import UsageRecord, record_id
from tests.conftest import DIMENSION

START = 1_800_000_000.0  # 2027-01-15T08:00:00Z
RECORDS_FROM = datetime(2026, 11, 21, 10, 0, tzinfo=timezone.utc)  # the first made record's tick

T = TypeVar("T")


class FakeClock:
    """agent.clock.Clock that moves only when told: by ``sleep`` (at once, no real wait) or by hand."""

    def __init__(self, start: float = START):
        self._t = start

    def now(self) -> datetime:
        return datetime.fromtimestamp(self._t, timezone.utc)

    def time(self) -> float:
        return self._t

    def monotonic(self) -> float:
        return self._t

    def sleep(self, seconds: float) -> None:
        self.advance(max(0.0, seconds))

    def advance(self, seconds: float) -> None:
        self._t += seconds

    def advance_to(self, epoch: float) -> None:
        """Jump to ``epoch`` (a retry's due time); a steady clock never goes back."""
        self._t = max(self._t, epoch)



class Monotonic(SystemClock):
    """The system clock, with ``monotonic()`` read from ``reading`` (a test's own stepping counter):
    wall time stays real (moto's credential expiry is on it) while durations are scripted."""

    def __init__(self, reading: Callable[[], float]):
        super().__init__()
        self._reading = reading

    def monotonic(self) -> float:
        return self._reading()


def make_record(customer: str = "acme", tick: datetime = RECORDS_FROM, value: Decimal | str = "1.75", *,
                measurement: str = "ebs-storage", dimension: str = DIMENSION, resource: str = "aggregate",
                unit: str = "GiB", metadata: Mapping[str, str] | None = None) -> UsageRecord:
    """A record whose id is derived as the converter derives it: the same inputs, the same id."""
    return UsageRecord(
        record_id=record_id(measurement, dimension, customer, resource, tick),
        measurement=measurement, event_type=measurement, dimension_id=dimension, customer_id=customer,
        timestamp=tick, value=Decimal(value), unit=unit, resource=resource,
        metadata=dict(metadata) if metadata is not None else {"region": "us-east-1"},
    )


def make_records(count: int, customer: str = "acme", start: datetime = RECORDS_FROM, **fields: object) -> list[UsageRecord]:
    """``count`` records of one customer on consecutive 15-minute ticks, valued 1.75, 2.75, ..."""
    return [make_record(customer, start + timedelta(minutes=15 * i), Decimal("1.75") + i, **fields)  # type: ignore[arg-type]
            for i in range(count)]


def wait_for(predicate: Callable[[], T], timeout: float = 30.0, what: str = "condition") -> T:
    """Poll ``predicate`` (something another process or thread changes) until it is truthy; its value."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout:g} s")
        time.sleep(0.05)
    return value


def drain_on(forwarder: Any, spool: Any, clock: FakeClock, rounds: int) -> None:
    """Drain, jumping the fake clock over every backoff, until nothing is left to send."""
    for _ in range(rounds):
        forwarder.drain()
        due = spool.next_due()
        if due is None:
            return
        clock.advance_to(due)
    raise AssertionError(f"not drained: {spool.counts()}")
