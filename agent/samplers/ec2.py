"""EC2 instances: how many run, with how many vCPUs and how much memory.

With ``mode: time_weighted`` and ``per: minute``, ``count`` is EC2 runtime in
instance-minutes and ``vcpus`` is vCPU-minutes.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from agent.settings import Measurement
from agent.samplers import instance_types
from agent.samplers.base import ClientFor, MetricSpec, Target
from agent.samplers.engine import ONE, Listing, Skip

_SPEC_METRICS = ("vcpus", "memory_gib")


def _type_specs(clients: ClientFor, target: Target, instances: list[Any]) -> dict[str, Any] | None:
    """The specs of the listed types, or None: count must not depend on ec2:DescribeInstanceTypes."""
    if target.measurement.metric not in _SPEC_METRICS:
        return None
    kinds = {i["InstanceType"] for i in instances if i.get("InstanceType")}
    return instance_types.lookup(target, clients("ec2"), kinds)


def _values(instance: dict[str, Any], specs: dict[str, Any] | None) -> dict[str, Decimal]:
    if specs is None:
        return {"count": ONE}
    kind = instance.get("InstanceType", "")
    spec = specs.get(kind)
    if spec is None:
        raise Skip(f"instance type {kind!r} is unknown to DescribeInstanceTypes")
    return {"count": ONE, "vcpus": spec.vcpus, "memory_gib": spec.memory_gib}


def _facts(instance: dict[str, Any]) -> dict[str, str]:
    return {"instance_type": instance.get("InstanceType", ""),
            "availability_zone": instance.get("Placement", {}).get("AvailabilityZone", ""),
            "lifecycle": instance.get("InstanceLifecycle", "on-demand")}


def _type_actions(measurement: Measurement) -> tuple[str, ...]:
    return ("ec2:DescribeInstanceTypes",) if measurement.metric in _SPEC_METRICS else ()


INSTANCES = Listing(
    "ec2", "DescribeInstances", "Reservations", "InstanceId", _values, _facts, nested_key="Instances",
    page_size=1000, server_filters={"tags": "tag:<key>", "instance_types": "instance-type",
                                    "states": "instance-state-name"},
    # stopped instances bill their volumes (metered by ebs), not compute
    default_filters={"states": ("running",)}, prepare=_type_specs, extra_actions=_type_actions)

# EC2 documents its resource ids as regional, and the instance ARN names the account
SPEC = INSTANCES.spec("ec2", "EC2 instances, running by default (filters.states selects others)", metrics={
    "count": MetricSpec("instances", "instances in the selected states (default: running)"),
    "vcpus": MetricSpec("vCPUs", "default vCPUs of the instance type"),
    "memory_gib": MetricSpec("GiB", "memory of the instance type"),
}, default_metric="count", identity="arn:{partition}:ec2:{region}:{account}:instance/{id}")
