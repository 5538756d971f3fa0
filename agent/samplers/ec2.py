"""EC2 instances: how many run, with how many vCPUs and how much memory.

With ``mode: time_weighted`` and ``per: minute``, ``count`` is EC2 runtime in
instance-minutes and ``vcpus`` is vCPU-minutes.
"""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal

from agent.settings import Measurement
from agent.samplers import instance_types
from agent.samplers.base import ClientFor, MetricSpec, Sample, SamplerSpec, Skipped, Target, tags_of

PAGE_SIZE = 1000
DEFAULT_STATES = ("running",)  # stopped instances bill their volumes (metered by ebs), not compute
_ONE = Decimal(1)
_SPEC_METRICS = ("vcpus", "memory_gib")


def _type_actions(measurement: Measurement) -> tuple[str, ...]:
    return ("ec2:DescribeInstanceTypes",) if measurement.metric in _SPEC_METRICS else ()


def sample_instances(clients: ClientFor, target: Target) -> Iterator[Sample | Skipped]:
    filters = target.measurement.filters
    aws_filters = filters.tag_filters()
    aws_filters.append({"Name": "instance-state-name", "Values": list(filters.states or DEFAULT_STATES)})
    if filters.instance_types:
        aws_filters.append({"Name": "instance-type", "Values": list(filters.instance_types)})
    ec2 = clients("ec2")
    pages = target.pages(ec2, "describe_instances", "Reservations", PAGE_SIZE, Filters=aws_filters)
    instances = [i for page in pages for reservation in page for i in reservation.get("Instances") or ()]
    needs_spec = target.measurement.metric in _SPEC_METRICS
    # only vcpus and memory need the type specs: count must not depend on ec2:DescribeInstanceTypes
    specs = instance_types.lookup(target, ec2, {i["InstanceType"] for i in instances if i.get("InstanceType")}) \
        if needs_spec else {}
    for instance in instances:
        instance_id = instance.get("InstanceId") or "<no InstanceId>"
        kind = instance.get("InstanceType", "")
        values = {"count": _ONE}
        spec = specs.get(kind)
        if spec is not None:
            values.update(vcpus=spec.vcpus, memory_gib=spec.memory_gib)
        elif needs_spec:
            yield Skipped(instance_id, f"instance type {kind!r} is unknown to DescribeInstanceTypes")
            continue
        yield target.sample(
            resource_id=instance_id,
            values=values,
            tags=tags_of(instance),
            facts={
                "instance_type": kind,
                "availability_zone": instance.get("Placement", {}).get("AvailabilityZone", ""),
                "lifecycle": instance.get("InstanceLifecycle", "on-demand"),
            },
        )


SPEC = SamplerSpec(
    resource_type="ec2",
    metrics={
        "count": MetricSpec("instances", "instances in the selected states (default: running)"),
        "vcpus": MetricSpec("vCPUs", "default vCPUs of the instance type"),
        "memory_gib": MetricSpec("GiB", "memory of the instance type"),
    },
    default_metric="count",
    iam_actions=("ec2:DescribeInstances",),
    extra_actions=_type_actions,
    filters=("tags", "instance_types", "states"),
    sample=sample_instances,
    id_scope="account-region",  # EC2 documents its resource ids as regional, and the instance ARN names the account
    identity="arn:{partition}:ec2:{region}:{account}:instance/{id}",
    description="EC2 instances, running by default (filters.states selects others)",
)
