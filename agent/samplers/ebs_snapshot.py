"""EBS snapshots owned by the account: volume size and, where AWS reports it, full snapshot size."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from typing import Any

from agent.samplers.base import ClientFor, MetricSpec, Sample, SamplerSpec, Skipped, Target, quantity, tags_of

PAGE_SIZE = 1000
# A snapshot that failed holds no data and is not billed; pending ones already store the
# blocks copied so far (and cannot be deleted), so they are counted like completed ones.
_NOT_BILLED = frozenset({"error"})
_ONE = Decimal(1)


def _values(snapshot: dict[str, Any]) -> dict[str, Decimal]:
    values = {"size_gib": quantity(snapshot.get("VolumeSize")), "count": _ONE}
    if snapshot.get("FullSnapshotSizeInBytes") is not None:  # absent: AWS has not computed it
        values["full_size_bytes"] = quantity(snapshot["FullSnapshotSizeInBytes"])
    return values


def sample_snapshots(clients: ClientFor, target: Target) -> Iterator[Sample | Skipped]:
    pages = target.pages(clients("ec2"), "describe_snapshots", "Snapshots", PAGE_SIZE,
                         OwnerIds=["self"], Filters=target.measurement.filters.tag_filters())
    for page in pages:
        for snapshot in page:
            if snapshot.get("State") in _NOT_BILLED:
                continue
            owner = snapshot.get("OwnerId")
            if owner and owner != target.account:  # OwnerIds=self already; servers that ignore it list others'
                continue
            snapshot_id = snapshot.get("SnapshotId") or "<no SnapshotId>"
            try:
                values = _values(snapshot)
            except ValueError as exc:
                yield Skipped(snapshot_id, f"snapshot volume size or full size {exc}")
                continue
            yield target.sample(
                resource_id=snapshot_id,
                values=values,
                tags=tags_of(snapshot),
                facts={
                    "volume_id": snapshot.get("VolumeId", ""),
                    "storage_tier": snapshot.get("StorageTier", ""),
                    "state": snapshot.get("State", ""),
                },
            )


SPEC = SamplerSpec(
    resource_type="ebs_snapshot",
    metrics={
        "size_gib": MetricSpec("GiB", "size of the volume the snapshot was taken from"),
        "full_size_bytes": MetricSpec("bytes", "full snapshot size (snapshots AWS reports it for)"),
        "count": MetricSpec("snapshots", "number of snapshots"),
    },
    default_metric="size_gib",
    iam_actions=("ec2:DescribeSnapshots",),
    filters=("tags",),
    sample=sample_snapshots,
    id_scope="region",  # a snapshot's ARN has no account: its id is unique in the region (snapshots are shared)
    identity="arn:{partition}:ec2:{region}::snapshot/{id}",
    description="EBS snapshots owned by the account, pending or completed (not error)",
)
