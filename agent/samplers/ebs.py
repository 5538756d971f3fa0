"""EBS volumes: provisioned size, IOPS and throughput, one sample per volume."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from agent.samplers.base import MetricSpec, quantity
from agent.samplers.engine import ONE, Listing


def _values(volume: dict[str, Any], _: None) -> dict[str, Decimal]:
    values = {"size_gib": quantity(volume.get("Size")), "count": ONE}
    for field, metric in (("Iops", "iops"), ("Throughput", "throughput_mibps")):
        if volume.get(field) is not None:  # absent: not provisioned for this volume type
            values[metric] = quantity(volume[field])
    return values


def _facts(volume: dict[str, Any]) -> dict[str, str]:
    return {"volume_type": volume.get("VolumeType", ""), "availability_zone": volume.get("AvailabilityZone", "")}


VOLUMES = Listing(
    "ec2", "DescribeVolumes", "Volumes", "VolumeId", _values, _facts, "volume size, IOPS or throughput",
    page_size=500, state_key="State", not_billed=frozenset({"deleting", "deleted", "error"}),  # no longer billed
    server_filters={"tags": "tag:<key>", "volume_types": "volume-type"})

# EC2 documents its resource ids as regional, and the volume ARN names the account
SPEC = VOLUMES.spec("ebs", "EBS volumes in every state AWS bills (not deleting, deleted or error)", metrics={
    "size_gib": MetricSpec("GiB", "provisioned volume size"),
    "iops": MetricSpec("IOPS", "provisioned IOPS (volumes that report it)"),
    "throughput_mibps": MetricSpec("MiB/s", "provisioned throughput (gp3)"),
    "count": MetricSpec("volumes", "number of volumes"),
}, default_metric="size_gib", identity="arn:{partition}:ec2:{region}:{account}:volume/{id}")
