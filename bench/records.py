"""The payload of the spool and delivery benchmarks: per-volume records as a real tick makes them."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal

from agent.config import parse_measurement
from agent.convert import convert
from agent.records import UsageRecord
from agent.samplers import Sample
from agent.settings import Measurement

BASE_TICK = datetime(2026, 1, 1, tzinfo=timezone.utc)


def _measurement() -> Measurement:
    return parse_measurement({
        "name": "ebs-gib-hours",
        "dimension_id": "8a7b5f91-3b85-4cf4-8585-dcdf17f49004",
        "resource_type": "ebs",
        "metric": "size_gib",
        "mode": "time_weighted",
        "per": "hour",
        "interval": "15m",
        "iam_role_arn": "arn:aws:iam::214826386939:role/usage-scraper",
        "external_id": "bench-external-id",
        "regions": ["us-east-1"],
        "customer": {"tag": "customer-id"},
        "group_by": "resource",
        "metadata": {"environment": "prod"},
    })


def ticks(per_tick: int, count: int, first: int = 0) -> list[list[UsageRecord]]:
    """``count`` consecutive ticks from tick number ``first``, ``per_tick`` per-volume records
    each (every id distinct)."""
    m = _measurement()
    samples = [
        Sample(
            resource_id=f"vol-{i:017x}",
            region="us-east-1",
            account="214826386939",
            values={"size_gib": Decimal(1 + i % 1000)},
            tags={"customer-id": f"cust-{i % 1000:04d}"},
            facts={"volume_type": "gp3", "availability_zone": "us-east-1a"},
        )
        for i in range(per_tick)
    ]
    return [
        convert(m, "size_gib", "GiB", samples, BASE_TICK + timedelta(minutes=15 * t)).records
        for t in range(first, first + count)
    ]
