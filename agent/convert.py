"""Samples at tick T -> usage records (DESIGN section 3).

- Ticks are aligned: T is a wall-clock multiple of the interval (UTC), the end of the
  usage window (T - interval, T].
- ``gauge``: the value at T. ``time_weighted``: value x interval, in units of ``per``.
- Values are Decimals end to end, summed exactly, rounded once (half-even, ``decimals``
  places), and serialised as plain strings without exponent or trailing zeros.
- A record id is a stable hash of (measurement, dimension, customer, resource, T).
"""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import ROUND_HALF_EVEN, Context, Decimal
from typing import Any

from agent.config import PER_SECONDS, Customer, Measurement

AGGREGATE = "aggregate"
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_WIDE = Context(prec=100, rounding=ROUND_HALF_EVEN)


def tick_floor(at: datetime, interval_seconds: int) -> datetime:
    """The aligned tick T with T <= at < T + interval."""
    if at.tzinfo is None:
        raise ValueError("tick_floor needs a timezone-aware datetime")
    elapsed = int((at - _EPOCH).total_seconds() // 1)
    return _EPOCH + timedelta(seconds=elapsed - elapsed % interval_seconds)


_TIMESTAMP = "%Y-%m-%dT%H:%M:%SZ"
_TIMESTAMP_SHAPE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z")


def format_timestamp(at: datetime) -> str:
    """RFC 3339, UTC, ``Z`` suffix, whole seconds."""
    return at.astimezone(timezone.utc).strftime(_TIMESTAMP)


def parse_timestamp(text: str) -> datetime:
    """The inverse of ``format_timestamp``. Every leased record passes here: the shape is checked
    first, then fromisoformat parses it (strptime took a sixth of the spool's CPU)."""
    if _TIMESTAMP_SHAPE.fullmatch(text) is None:
        raise ValueError(f"time data {text!r} does not match format {_TIMESTAMP!r}")
    return datetime.fromisoformat(text)


def format_decimal(value: Decimal) -> str:
    """Plain decimal string: ``1.75``, ``100``, ``0``; never ``1.75E+0`` or ``-0``."""
    if value.is_zero():
        return "0"
    return format(value.normalize(_WIDE), "f")


def record_id(measurement: str, dimension_id: str, customer_id: str, resource: str, tick: datetime) -> str:
    key = "\x1f".join(("v1", measurement, dimension_id, customer_id, resource, format_timestamp(tick)))
    return hashlib.sha256(key.encode()).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """One billable amount for one customer and one window, in the agent's own shape."""

    record_id: str
    measurement: str
    event_type: str
    dimension_id: str
    customer_id: str
    timestamp: datetime
    value: Decimal
    unit: str
    resource: str
    metadata: Mapping[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.record_id,
            "measurement": self.measurement,
            "event_type": self.event_type,
            "dimension_id": self.dimension_id,
            "customer_id": self.customer_id,
            "timestamp": format_timestamp(self.timestamp),
            "value": format_decimal(self.value),
            "unit": self.unit,
            "resource": self.resource,
            "metadata": dict(self.metadata),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> UsageRecord:
        return cls(
            record_id=data["id"],
            measurement=data["measurement"],
            event_type=data["event_type"],
            dimension_id=data["dimension_id"],
            customer_id=data["customer_id"],
            timestamp=parse_timestamp(data["timestamp"]),
            value=Decimal(data["value"]),
            unit=data["unit"],
            resource=data["resource"],
            metadata=dict(data["metadata"]),
        )


@dataclass(frozen=True)
class Conversion:
    records: list[UsageRecord]
    untagged: list[str]  # resources skipped for lack of the customer tag
    sampled: int  # resources that carried the measured metric
    invalid_customer: list[tuple[str, str]] = field(default_factory=list)  # (resource, tag value)


def valid_customer_id(value: str) -> bool:
    """Printable, no surrounding whitespace, at most 256 characters."""
    return 0 < len(value) <= 256 and value == value.strip() and value.isprintable()


def record_unit(measurement: Measurement, metric_unit: str) -> str:
    if measurement.mode == "time_weighted":
        return f"{metric_unit}-{measurement.per}s"
    return metric_unit


def convert(
    measurement: Measurement,
    metric: str,
    metric_unit: str,
    samples: Iterable[Any],
    tick: datetime,
    customers: Mapping[str, Customer] | None = None,
) -> Conversion:
    """Attribute, aggregate and scale the samples of one measurement for tick T.

    ``customers`` maps an account to its customer attribution (``accounts[].customer``);
    accounts not in it use the measurement's ``customer``.
    """
    customers = customers or {}
    groups: dict[tuple[str, str], list[Any]] = defaultdict(list)
    untagged: list[str] = []
    invalid: list[tuple[str, str]] = []
    sampled = 0
    for sample in samples:
        if metric not in sample.values:
            continue
        sampled += 1
        customer = customers.get(sample.account) or measurement.customer
        assert customer is not None, "config validation requires a customer for every account"
        customer_id = customer.id or sample.tags.get(customer.tag or "") or customer.fallback_id
        if not customer_id:
            untagged.append(sample.resource_id)
            continue
        if not valid_customer_id(customer_id):
            invalid.append((sample.resource_id, customer_id))
            continue
        resource = sample.resource_id if measurement.group_by == "resource" else AGGREGATE
        groups[(customer_id, resource)].append(sample)

    if measurement.mode == "time_weighted":
        numerator, denominator = measurement.interval_seconds, PER_SECONDS[measurement.per]
    else:
        numerator, denominator = 1, 1
    quantum = Decimal(1).scaleb(-measurement.decimals)
    unit = record_unit(measurement, metric_unit)
    base_metadata = {
        **measurement.metadata,
        "measurement": measurement.name,
        "resource_type": measurement.resource_type,
        "metric": metric,
        "unit": unit,
    }

    records = []
    for (customer_id, resource), members in sorted(groups.items()):
        total = sum((s.values[metric] for s in members), Decimal(0))
        value = _WIDE.divide(_WIDE.multiply(total, Decimal(numerator)), Decimal(denominator))
        value = value.quantize(quantum, rounding=ROUND_HALF_EVEN, context=_WIDE)
        if resource == AGGREGATE:
            facts = {
                "regions": ",".join(sorted({s.region for s in members})),
                "accounts": ",".join(sorted({s.account for s in members})),
                "resource_count": str(len(members)),
            }
        else:
            only = members[0]
            facts = {"region": only.region, "account": only.account, "resource_id": only.resource_id, **only.facts}
        records.append(
            UsageRecord(
                record_id=record_id(measurement.name, measurement.dimension_id, customer_id, resource, tick),
                measurement=measurement.name,
                event_type=measurement.event_type or measurement.name,
                dimension_id=measurement.dimension_id,
                customer_id=customer_id,
                timestamp=tick,
                value=value,
                unit=unit,
                resource=resource,
                metadata={**base_metadata, **facts},
            )
        )
    return Conversion(records=records, untagged=untagged, sampled=sampled, invalid_customer=invalid)
