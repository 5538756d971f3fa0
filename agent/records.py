"""The usage record: the agent's own shape of one billable amount, and how its times, values
and ids are written. It depends on nothing else of the agent, so the spool, the sinks and the
forwarder handle records without knowing the configuration that made them."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import ROUND_HALF_EVEN, Context, Decimal
from functools import lru_cache
from typing import Any

WIDE = Context(prec=100, rounding=ROUND_HALF_EVEN)  # exact for any sum a tick makes

_TIMESTAMP = "%Y-%m-%dT%H:%M:%SZ"
_TIMESTAMP_SHAPE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z")


def format_timestamp(at: datetime) -> str:
    """RFC 3339, UTC, ``Z`` suffix, whole seconds."""
    return _format_utc(at.astimezone(timezone.utc).replace(microsecond=0))


@lru_cache(maxsize=1024)  # a tick's records share their time: strftime once per tick, not per record
def _format_utc(at: datetime) -> str:
    """Keyed by the UTC instant only: equal datetimes of other zones or folds never share an entry."""
    return at.strftime(_TIMESTAMP)


@lru_cache(maxsize=1024)
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
    return format(value.normalize(WIDE), "f")


def record_id(measurement: str, dimension_id: str, customer_id: str, resource: str, tick: datetime) -> str:
    """A stable hash of what the record is about: the same tick sampled twice has the same id."""
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
        """The inverse of ``to_json``, from what a JSON parser made: the tags' dict becomes the record's."""
        record = cls(data["id"], data["measurement"], data["event_type"], data["dimension_id"], data["customer_id"],
                     parse_timestamp(data["timestamp"]), Decimal(data["value"]), data["unit"], data["resource"],
                     data["metadata"])
        if not isinstance(record.metadata, dict):
            raise TypeError(f"metadata is {type(record.metadata).__name__}, not an object")
        return record
