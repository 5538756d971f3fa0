"""Sampler registry: adding a resource type is one module with a ``SPEC`` and one line here."""

from __future__ import annotations

from agent.settings import Measurement
from agent.samplers import cloudwatch, dynamodb, ebs, ebs_snapshot, ec2, efs, eip, elb, kubernetes_pod, rds, s3
from agent.samplers.base import MetricSpec, Sample, SamplerSpec, Skipped, Target

REGISTRY: dict[str, SamplerSpec] = {
    spec.resource_type: spec
    for spec in (
        ebs.SPEC,
        ebs_snapshot.SPEC,
        ec2.SPEC,
        s3.SPEC,
        rds.SPEC,
        efs.SPEC,
        dynamodb.SPEC,
        cloudwatch.SPEC,
        eip.SPEC,
        elb.SPEC,
        kubernetes_pod.SPEC,
    )
}


def required_actions(measurement: Measurement) -> tuple[str, ...]:
    """The IAM actions sampling this measurement calls in each account."""
    actions = set(REGISTRY[measurement.resource_type].actions_for(measurement))
    if measurement.all_regions:
        actions.add("ec2:DescribeRegions")
    return tuple(sorted(actions))


__all__ = ["REGISTRY", "required_actions", "MetricSpec", "Sample", "SamplerSpec", "Skipped", "Target"]
