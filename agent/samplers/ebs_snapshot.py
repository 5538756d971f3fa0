"""EBS snapshots owned by the account: volume size and, where AWS reports it, full snapshot size."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from agent.samplers.base import MetricSpec, quantity
from agent.samplers.engine import ONE, Listing


def _values(snapshot: dict[str, Any], _: None) -> dict[str, Decimal]:
    values = {"size_gib": quantity(snapshot.get("VolumeSize")), "count": ONE}
    if snapshot.get("FullSnapshotSizeInBytes") is not None:  # absent: AWS has not computed it
        values["full_size_bytes"] = quantity(snapshot["FullSnapshotSizeInBytes"])
    return values


def _facts(snapshot: dict[str, Any]) -> dict[str, str]:
    return {"volume_id": snapshot.get("VolumeId", ""), "storage_tier": snapshot.get("StorageTier", ""),
            "state": snapshot.get("State", "")}


# A snapshot that failed holds no data and is not billed; pending ones already store the
# blocks copied so far (and cannot be deleted), so they are counted like completed ones.
SNAPSHOTS = Listing(
    "ec2", "DescribeSnapshots", "Snapshots", "SnapshotId", _values, _facts, "snapshot volume size or full size",
    page_size=1000, params={"OwnerIds": ["self"]}, state_key="State", not_billed=frozenset({"error"}),
    owner_key="OwnerId", server_filters={"tags": "tag:<key>"})

# a snapshot's ARN has no account: its id is unique in the region (snapshots are shared)
SPEC = SNAPSHOTS.spec("ebs_snapshot", "EBS snapshots owned by the account, pending or completed (not error)", metrics={
    "size_gib": MetricSpec("GiB", "size of the volume the snapshot was taken from"),
    "full_size_bytes": MetricSpec("bytes", "full snapshot size (snapshots AWS reports it for)"),
    "count": MetricSpec("snapshots", "number of snapshots"),
}, default_metric="size_gib", identity="arn:{partition}:ec2:{region}::snapshot/{id}")
