"""Samples at tick T -> usage records (DESIGN section 3).

- Ticks are aligned: T is a wall-clock multiple of the interval (UTC), the end of the
  usage window (T - interval, T].
- ``gauge``: the value at T. ``time_weighted``: value x interval, in units of ``per``.
- Values are Decimals end to end, summed exactly, rounded once (half-even, ``decimals``
  places), and serialised as plain strings without exponent or trailing zeros.
- A record id is a stable hash of (measurement, dimension, customer, resource, T), where a
  resource is its identity (the registry's: an ARN, with its account and region where the
  type's ids need them), so same-named resources in two regions or accounts stay apart.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

from agent.records import WIDE, UsageRecord, record_id
from agent.settings import PER_SECONDS, Customer, Measurement
from agent.samplers import REGISTRY

AGGREGATE = "aggregate"
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def tick_floor(at: datetime, interval_seconds: int) -> datetime:
    """The aligned tick T with T <= at < T + interval."""
    if at.tzinfo is None:
        raise ValueError("tick_floor needs a timezone-aware datetime")
    elapsed = int((at - _EPOCH).total_seconds() // 1)
    return _EPOCH + timedelta(seconds=elapsed - elapsed % interval_seconds)


@dataclass(frozen=True)
class Conversion:
    records: list[UsageRecord]
    untagged: list[str]  # resources (identities) skipped for lack of the customer tag
    sampled: int  # resources that carried the measured metric
    invalid_customer: list[tuple[str, str]] = field(default_factory=list)  # (resource identity, tag value)


def valid_customer_id(value: str) -> bool:
    """Printable, no surrounding whitespace, at most 256 characters."""
    return 0 < len(value) <= 256 and value == value.strip() and value.isprintable()


def record_unit(measurement: Measurement, metric_unit: str) -> str:
    if measurement.mode == "time_weighted":
        return f"{metric_unit}-{measurement.per}s"
    return metric_unit


@dataclass(slots=True)
class _Group:
    """The samples of one record: their sum and what its metadata needs of them."""

    first: Any  # a per-resource record's facts come from its sample
    total: Decimal = Decimal(0)
    count: int = 0
    regions: set[str] | None = None  # an aggregate's (a per-resource record has its sample's)
    accounts: set[str] | None = None


class Tally:
    """One measurement's samples, attributed and summed per record as they arrive, so a tick
    holds one entry per record it makes rather than every resource it lists (a list of 100k
    EBS samples took 150 MB and kept the garbage collector busy)."""

    def __init__(self, measurement: Measurement, metric: str, customers: Mapping[str, Customer] | None = None):
        self.measurement = measurement
        self.metric = metric
        self.customers = customers or {}
        self._resource = REGISTRY[measurement.resource_type].resource
        self.groups: dict[tuple[str, str], _Group] = {}
        self.untagged: list[str] = []
        self.invalid: list[tuple[str, str]] = []
        self.sampled = 0
        self._valid: set[str] = set()  # customer ids already checked: a tick sees each thousands of times

    def add(self, sample: Any) -> None:
        value = sample.values.get(self.metric)
        if value is None:
            return
        self.sampled += 1
        customer = self.customers.get(sample.account) or self.measurement.customer
        assert customer is not None, "config validation requires a customer for every account"
        customer_id = customer.id or sample.tags.get(customer.tag or "") or customer.fallback_id
        if not customer_id:
            self.untagged.append(self._resource(sample.region, sample.account, sample.resource_id))
            return
        if customer_id not in self._valid and not valid_customer_id(customer_id):
            self.invalid.append((self._resource(sample.region, sample.account, sample.resource_id), customer_id))
            return
        self._valid.add(customer_id)
        per_resource = self.measurement.group_by == "resource"
        key = (customer_id, self._resource(sample.region, sample.account, sample.resource_id) if per_resource
               else AGGREGATE)
        group = self.groups.get(key)
        if group is None:
            group = self.groups[key] = _Group(sample) if per_resource else _Group(sample, regions=set(), accounts=set())
        group.total = WIDE.add(group.total, value)  # exact, whichever thread's decimal context runs this
        group.count += 1
        if group.regions is not None and group.accounts is not None:
            group.regions.add(sample.region)
            group.accounts.add(sample.account)

    def merge(self, other: Tally) -> None:
        """Add another target's tally of the same measurement (``other`` is not used afterwards)."""
        for key, theirs in other.groups.items():
            group = self.groups.setdefault(key, theirs)
            if group is not theirs:
                group.total = WIDE.add(group.total, theirs.total)
                group.count += theirs.count
                if group.regions is not None and group.accounts is not None:
                    group.regions |= theirs.regions or set()
                    group.accounts |= theirs.accounts or set()
        self.untagged += other.untagged
        self.invalid += other.invalid
        self.sampled += other.sampled

    def convert(self, metric_unit: str, tick: datetime) -> Conversion:
        """The records for tick T: each group's sum, scaled and rounded once."""
        measurement, metric = self.measurement, self.metric
        if measurement.mode == "time_weighted":  # a value held at T for the interval, or already x seconds held
            weighed = REGISTRY[measurement.resource_type].weighs_time
            numerator, denominator = 1 if weighed else measurement.interval_seconds, PER_SECONDS[measurement.per]
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
        for (customer_id, resource), group in sorted(self.groups.items(), key=lambda item: item[0]):
            value = WIDE.divide(WIDE.multiply(group.total, Decimal(numerator)), Decimal(denominator))
            value = value.quantize(quantum, rounding=ROUND_HALF_EVEN, context=WIDE)
            if resource == AGGREGATE:
                facts = {
                    "regions": ",".join(sorted(group.regions or ())),
                    "accounts": ",".join(sorted(group.accounts or ())),
                    "resource_count": str(group.count),
                }
            else:
                only = group.first
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
        return Conversion(records=records, untagged=self.untagged, sampled=self.sampled, invalid_customer=self.invalid)


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
    tally = Tally(measurement, metric, customers)
    for sample in samples:
        tally.add(sample)
    return tally.convert(metric_unit, tick)
