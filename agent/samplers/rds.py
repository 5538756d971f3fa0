"""RDS DB instances: allocated storage, instance count and vCPUs of the instance class.

What is billed depends on the instance status (AWS's "DB instance status" table): storage
is billed in every status except those below in ``_NOT_BILLED``; the instance itself (so
``count`` and ``vcpus``) is not billed while it is stopped, stopping or starting either.
A metric that is not billed is left out of the sample, which drops the instance from that
metric's records rather than counting it as zero.
"""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from typing import Any

from agent.settings import Measurement
from agent.samplers.base import ClientFor, MetricSpec, Sample, SamplerSpec, Skipped, Target, quantity
from agent.samplers.instance_types import lookup

PAGE_SIZE = 100
DEFAULT_METRIC = "allocated_storage_gib"
_NOT_BILLED = frozenset({
    "creating", "delete-precheck", "deleting", "failed", "inaccessible-encryption-credentials",
    "incompatible-network", "incompatible-restore", "insufficient-capacity",
})
_STORAGE_ONLY = frozenset({"stopped", "stopping", "starting", "inaccessible-encryption-credentials-recoverable"})
# Engines whose storage is a cluster volume: the instance reports AllocatedStorage 1, which is not what is billed.
_CLUSTER_STORAGE = ("aurora", "docdb", "neptune")
_ONE = Decimal(1)


def _ec2_type(instance_class: str) -> str:
    return instance_class.removeprefix("db.")


def _tags(db: dict[str, Any]) -> dict[str, str]:
    return {tag["Key"]: tag.get("Value", "") for tag in db.get("TagList") or ()}


def _values(db: dict[str, Any], vcpus: Decimal | None) -> dict[str, Decimal]:
    values: dict[str, Decimal] = {}
    if not db.get("Engine", "").startswith(_CLUSTER_STORAGE):
        values["allocated_storage_gib"] = quantity(db.get("AllocatedStorage"))
    if db.get("DBInstanceStatus") not in _STORAGE_ONLY:
        values["count"] = _ONE
        if vcpus is not None:
            values["vcpus"] = vcpus
    return values


def sample_instances(clients: ClientFor, target: Target) -> Iterator[Sample | Skipped]:
    filters = target.measurement.filters
    measured = target.measurement.metric
    pages = target.pages(clients("rds"), "describe_db_instances", "DBInstances", PAGE_SIZE)
    instances = [
        db
        for page in pages
        for db in page
        if db.get("DBInstanceStatus") not in _NOT_BILLED
        # DescribeDBInstances filters on neither tags nor instance class
        and filters.matches_tags(_tags(db))
        and (not filters.instance_types or db.get("DBInstanceClass") in filters.instance_types)
    ]
    compute_billed = {
        _ec2_type(db.get("DBInstanceClass", ""))
        for db in instances
        if db.get("DBInstanceClass") and db.get("DBInstanceStatus") not in _STORAGE_ONLY
    }
    # only vcpus needs EC2: storage and count must not fail with an EC2 endpoint or permission
    types = lookup(target, clients("ec2"), compute_billed) if measured == "vcpus" and compute_billed else {}
    for db in instances:
        db_id = db.get("DBInstanceIdentifier") or "<no DBInstanceIdentifier>"
        instance_class = db.get("DBInstanceClass", "")
        spec = types.get(_ec2_type(instance_class))
        try:
            values = _values(db, spec.vcpus if spec else None)
        except ValueError as exc:
            yield Skipped(db_id, f"allocated storage {exc}")
            continue
        if measured == "vcpus" and "count" in values and "vcpus" not in values:
            yield Skipped(db_id, f"instance class {instance_class!r} has no EC2 instance type to read vCPUs from")
            continue
        yield target.sample(
            resource_id=db_id,
            values=values,
            tags=_tags(db),
            facts={
                "instance_class": instance_class,
                "engine": db.get("Engine", ""),
                "status": db.get("DBInstanceStatus", ""),
                "multi_az": str(bool(db.get("MultiAZ"))).lower(),
                "storage_type": db.get("StorageType", ""),
            },
        )


def _type_actions(measurement: Measurement) -> tuple[str, ...]:
    return ("ec2:DescribeInstanceTypes",) if measurement.metric == "vcpus" else ()


SPEC = SamplerSpec(
    resource_type="rds",
    metrics={
        DEFAULT_METRIC: MetricSpec("GiB", "allocated storage (not for Aurora, DocumentDB or Neptune: cluster storage)"),
        "count": MetricSpec("instances", "DB instances billed for instance hours (not stopped)"),
        "vcpus": MetricSpec("vCPUs", "default vCPUs of the instance class (not stopped)"),
    },
    default_metric=DEFAULT_METRIC,
    iam_actions=("rds:DescribeDBInstances",),
    filters=("tags", "instance_types"),
    sample=sample_instances,
    id_scope="account-region",  # DBInstanceIdentifier is the customer's name: prod-db repeats across regions
    identity="arn:{partition}:rds:{region}:{account}:db:{id}",
    description="RDS DB instances in every status AWS bills; stopped instances count for storage only",
    extra_actions=_type_actions,
)
