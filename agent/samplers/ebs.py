"""EBS volumes: provisioned size, IOPS and throughput, one sample per volume."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from typing import Any

from agent.samplers.base import ClientFor, MetricSpec, Sample, SamplerSpec, Skipped, Target, quantity, tags_of

PAGE_SIZE = 500
# Volumes in these states are no longer billed by AWS.
_NOT_BILLED = frozenset({"deleting", "deleted", "error"})
_ONE = Decimal(1)


def _values(volume: dict[str, Any]) -> dict[str, Decimal]:
    values = {"size_gib": quantity(volume.get("Size")), "count": _ONE}
    for field, metric in (("Iops", "iops"), ("Throughput", "throughput_mibps")):
        if volume.get(field) is not None:  # absent: not provisioned for this volume type
            values[metric] = quantity(volume[field])
    return values


def sample_volumes(clients: ClientFor, target: Target) -> Iterator[Sample | Skipped]:
    filters = target.measurement.filters
    aws_filters = filters.tag_filters()
    if filters.volume_types:
        aws_filters.append({"Name": "volume-type", "Values": list(filters.volume_types)})
    for page in target.pages(clients("ec2"), "describe_volumes", "Volumes", PAGE_SIZE, Filters=aws_filters):
        for volume in page:
            if volume.get("State") in _NOT_BILLED:
                continue
            volume_id = volume.get("VolumeId") or "<no VolumeId>"
            try:
                values = _values(volume)
            except ValueError as exc:
                yield Skipped(volume_id, f"volume size, IOPS or throughput {exc}")
                continue
            yield target.sample(
                resource_id=volume_id,
                values=values,
                tags=tags_of(volume),
                facts={
                    "volume_type": volume.get("VolumeType", ""),
                    "availability_zone": volume.get("AvailabilityZone", ""),
                },
            )


SPEC = SamplerSpec(
    resource_type="ebs",
    metrics={
        "size_gib": MetricSpec("GiB", "provisioned volume size"),
        "iops": MetricSpec("IOPS", "provisioned IOPS (volumes that report it)"),
        "throughput_mibps": MetricSpec("MiB/s", "provisioned throughput (gp3)"),
        "count": MetricSpec("volumes", "number of volumes"),
    },
    default_metric="size_gib",
    iam_actions=("ec2:DescribeVolumes",),
    filters=("tags", "volume_types"),
    sample=sample_volumes,
    id_scope="account-region",  # EC2 documents its resource ids as regional, and the volume ARN names the account
    identity="arn:{partition}:ec2:{region}:{account}:volume/{id}",
    description="EBS volumes in every state AWS bills (not deleting, deleted or error)",
)
