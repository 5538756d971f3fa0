"""RDS DB instances: allocated storage, instance count and vCPUs of the instance class.

What is billed depends on the instance status (AWS's "DB instance status" table): storage
is billed in every status except the listing's ``not_billed``; the instance itself (so
``count`` and ``vcpus``) is not billed while it is stopped, stopping or starting either.
A metric that is not billed is left out of the sample, which drops the instance from that
metric's records rather than counting it as zero.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from agent.settings import Measurement
from agent.samplers.base import ClientFor, MetricSpec, Target, quantity
from agent.samplers.engine import ONE, Listing, Skip
from agent.samplers.instance_types import InstanceType, lookup

DEFAULT_METRIC = "allocated_storage_gib"
_STORAGE_ONLY = frozenset({"stopped", "stopping", "starting", "inaccessible-encryption-credentials-recoverable"})
# Engines whose storage is a cluster volume: the instance reports AllocatedStorage 1, which is not what is billed.
_CLUSTER_STORAGE = ("aurora", "docdb", "neptune")


def _ec2_type(instance_class: str) -> str:
    return instance_class.removeprefix("db.")


def _measures_vcpus(measurement: Measurement) -> bool:
    return measurement.metric == "vcpus"


def _types(clients: ClientFor, target: Target, instances: list[Any]) -> dict[str, InstanceType] | None:
    """The EC2 types of the classes billed for compute; None unless vcpus are measured (storage and
    count must not fail with an EC2 endpoint or permission)."""
    if not _measures_vcpus(target.measurement):
        return None
    billed = {_ec2_type(db["DBInstanceClass"]) for db in instances
              if db.get("DBInstanceClass") and db.get("DBInstanceStatus") not in _STORAGE_ONLY}
    return lookup(target, clients("ec2"), billed) if billed else {}


def _values(db: dict[str, Any], types: dict[str, InstanceType] | None) -> dict[str, Decimal]:
    values: dict[str, Decimal] = {}
    if not db.get("Engine", "").startswith(_CLUSTER_STORAGE):
        values["allocated_storage_gib"] = quantity(db.get("AllocatedStorage"))
    if db.get("DBInstanceStatus") not in _STORAGE_ONLY:
        values["count"] = ONE
        if types is not None:
            instance_class = db.get("DBInstanceClass", "")
            spec = types.get(_ec2_type(instance_class))
            if spec is None:
                raise Skip(f"instance class {instance_class!r} has no EC2 instance type to read vCPUs from")
            values["vcpus"] = spec.vcpus
    return values


def _facts(db: dict[str, Any]) -> dict[str, str]:
    return {"instance_class": db.get("DBInstanceClass", ""), "engine": db.get("Engine", ""),
            "status": db.get("DBInstanceStatus", ""), "multi_az": str(bool(db.get("MultiAZ"))).lower(),
            "storage_type": db.get("StorageType", "")}


def _type_actions(measurement: Measurement) -> tuple[str, ...]:
    return ("ec2:DescribeInstanceTypes",) if _measures_vcpus(measurement) else ()


# DescribeDBInstances filters on neither tags nor instance class: the engine does
INSTANCES = Listing(
    "rds", "DescribeDBInstances", "DBInstances", "DBInstanceIdentifier", _values, _facts, "allocated storage",
    page_size=100, state_key="DBInstanceStatus", not_billed=frozenset({
        "creating", "delete-precheck", "deleting", "failed", "inaccessible-encryption-credentials",
        "incompatible-network", "incompatible-restore", "insufficient-capacity"}),
    client_filters={"instance_types": "DBInstanceClass"}, tag_key="TagList", prepare=_types,
    extra_actions=_type_actions)

# DBInstanceIdentifier is the customer's name: prod-db repeats across regions
SPEC = INSTANCES.spec("rds", "RDS DB instances in every status AWS bills; stopped ones count for storage only", metrics={
    DEFAULT_METRIC: MetricSpec("GiB", "allocated storage (not for Aurora, DocumentDB or Neptune: cluster storage)"),
    "count": MetricSpec("instances", "DB instances billed for instance hours (not stopped)"),
    "vcpus": MetricSpec("vCPUs", "default vCPUs of the instance class (not stopped)"),
}, default_metric=DEFAULT_METRIC, identity="arn:{partition}:rds:{region}:{account}:db:{id}")
