"""EFS file systems: metered size, one sample per file system."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from agent.samplers.base import MetricSpec, quantity
from agent.samplers.engine import ONE, Listing


def _values(fs: dict[str, Any], _: None) -> dict[str, Decimal]:
    return {"size_bytes": quantity((fs.get("SizeInBytes") or {}).get("Value")), "count": ONE}


def _facts(fs: dict[str, Any]) -> dict[str, str]:
    return {"performance_mode": fs.get("PerformanceMode", ""), "throughput_mode": fs.get("ThroughputMode", "")}


# DescribeFileSystems cannot filter on tags: the engine matches them
FILE_SYSTEMS = Listing(
    "efs", "DescribeFileSystems", "FileSystems", "FileSystemId", _values, _facts, "file system size",
    page_size=100, state_key="LifeCycleState", not_billed=frozenset({"deleting", "deleted", "error"}))

SPEC = FILE_SYSTEMS.spec("efs", "EFS file systems not being deleted; the size is the one EFS last metered", metrics={
    "size_bytes": MetricSpec("bytes", "metered size (SizeInBytes.Value, all storage classes)"),
    "count": MetricSpec("filesystems", "number of file systems"),
}, default_metric="size_bytes", identity="arn:{partition}:elasticfilesystem:{region}:{account}:file-system/{id}")
