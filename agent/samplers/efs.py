"""EFS file systems: metered size, one sample per file system."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal

from agent.samplers.base import ClientFor, MetricSpec, Sample, SamplerSpec, Skipped, Target, quantity, tags_of

PAGE_SIZE = 100
# File systems in these states hold no billed storage.
_NOT_BILLED = frozenset({"deleting", "deleted", "error"})
_ONE = Decimal(1)


def sample_file_systems(clients: ClientFor, target: Target) -> Iterator[Sample | Skipped]:
    filters = target.measurement.filters
    for page in target.pages(clients("efs"), "describe_file_systems", "FileSystems", PAGE_SIZE):
        for fs in page:
            if fs.get("LifeCycleState") in _NOT_BILLED:
                continue
            tags = tags_of(fs)
            if not filters.matches_tags(tags):  # DescribeFileSystems cannot filter on tags
                continue
            fs_id = fs.get("FileSystemId") or "<no FileSystemId>"
            try:
                size = quantity((fs.get("SizeInBytes") or {}).get("Value"))
            except ValueError as exc:
                yield Skipped(fs_id, f"file system size {exc}")
                continue
            yield target.sample(
                resource_id=fs_id,
                values={"size_bytes": size, "count": _ONE},
                tags=tags,
                facts={
                    "performance_mode": fs.get("PerformanceMode", ""),
                    "throughput_mode": fs.get("ThroughputMode", ""),
                },
            )


SPEC = SamplerSpec(
    resource_type="efs",
    metrics={
        "size_bytes": MetricSpec("bytes", "metered size (SizeInBytes.Value, all storage classes)"),
        "count": MetricSpec("filesystems", "number of file systems"),
    },
    default_metric="size_bytes",
    iam_actions=("elasticfilesystem:DescribeFileSystems",),
    filters=("tags",),
    sample=sample_file_systems,
    id_scope="account-region",
    identity="arn:{partition}:elasticfilesystem:{region}:{account}:file-system/{id}",
    description="EFS file systems not being deleted; the size is the one EFS last metered",
)
