"""EC2 sampler: moto server for instances and instance types; Stubber for paging and unknown types."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.stub import Stubber

from agent.config import Measurement
from agent.samplers import instance_types
from agent.samplers.base import Sample, Skipped, Target
from agent.samplers.ec2 import SPEC, sample_instances
from agent.testing.paigo_server import PaigoContractServer
from tests.conftest import ACCOUNT, TICK, Aws, make_config, measurement, only
from tests.test_runtime import new_agent


@pytest.fixture(autouse=True)
def _fresh_instance_types() -> Iterator[None]:
    instance_types.forget()
    yield
    instance_types.forget()


def ec2_measurement(**overrides: Any) -> dict[str, Any]:
    return measurement(**({"name": "ec2-runtime", "resource_type": "ec2", "metric": "count"} | overrides))


def _target(**overrides: Any) -> Target:
    return Target(Measurement.model_validate(ec2_measurement(**overrides)), ACCOUNT, "us-east-1", TICK)


def run(aws: Aws, instance_type: str, count: int, customer: str | None, region: str = "us-east-1") -> list[str]:
    kwargs: dict[str, Any] = {"ImageId": "ami-12c6146b", "InstanceType": instance_type, "MinCount": count, "MaxCount": count}
    if customer:
        kwargs["TagSpecifications"] = [{"ResourceType": "instance", "Tags": [{"Key": "customer-id", "Value": customer}]}]
    reservation = boto3.client("ec2", region_name=region, endpoint_url=aws.endpoint).run_instances(**kwargs)
    return [i["InstanceId"] for i in reservation["Instances"]]


def test_running_instances_with_type_specs(aws: Aws) -> None:
    small = run(aws, "t3.micro", 2, "acme")
    large = run(aws, "m5.large", 1, "globex")
    stopped = run(aws, "m5.large", 1, "acme")
    aws.ec2().stop_instances(InstanceIds=stopped)

    samples = {s.resource_id: s for s in sample_instances(only(aws.ec2()), _target(metric="vcpus"))}

    assert set(samples) == {*small, *large}  # stopped instances bill no compute
    assert samples[small[0]].values == {"count": 1, "vcpus": 2, "memory_gib": 1}
    assert samples[large[0]].values == {"count": 1, "vcpus": 2, "memory_gib": 8}
    assert samples[large[0]].tags == {"customer-id": "globex"}
    assert samples[large[0]].facts == {"instance_type": "m5.large", "availability_zone": "us-east-1a",
                                       "lifecycle": "on-demand"}
    with_stopped = _target(filters={"states": ["running", "stopped"], "instance_types": ["m5.large"]})
    assert {s.resource_id for s in sample_instances(only(aws.ec2()), with_stopped)} == {*large, *stopped}


def test_runtime_in_instance_minutes_and_vcpu_hours(aws: Aws, paigo: PaigoContractServer, tmp_path: Path) -> None:
    run(aws, "t3.micro", 3, "acme")
    run(aws, "m5.xlarge", 1, "globex")  # 4 vCPUs, 16 GiB
    cfg = make_config(
        paigo, tmp_path,
        ec2_measurement(mode="time_weighted", per="minute", interval="15m"),
        ec2_measurement(name="ec2-vcpu-hours", metric="vcpus", mode="time_weighted", per="hour", interval="15m"),
        ec2_measurement(name="ec2-memory", metric="memory_gib", group_by="resource"),
    )
    agent = new_agent(cfg)
    at = datetime(2026, 11, 21, 10, 7, tzinfo=timezone.utc)
    minutes, vcpu_hours, memory = (agent.collect(m, at) for m in cfg.measurements)
    agent.close()

    assert {r.customer_id: (r.value, r.unit) for r in minutes.records} == {
        "acme": (Decimal(45), "instances-minutes"), "globex": (Decimal(15), "instances-minutes")}
    assert {r.customer_id: r.value for r in vcpu_hours.records} == {"acme": Decimal("1.5"), "globex": Decimal(1)}
    assert sorted((r.customer_id, r.value) for r in memory.records) == [
        ("acme", 1), ("acme", 1), ("acme", 1), ("globex", 16)]
    assert all(r.timestamp == datetime(2026, 11, 21, 10, tzinfo=timezone.utc) for r in minutes.records)


def _instance(instance_id: str, kind: str) -> dict[str, Any]:
    return {"InstanceId": instance_id, "InstanceType": kind, "Placement": {"AvailabilityZone": "us-east-1b"},
            "InstanceLifecycle": "spot", "Tags": [{"Key": "customer-id", "Value": "acme"}]}


def _type(kind: str, vcpus: int, mib: int) -> dict[str, Any]:
    return {"InstanceType": kind, "VCpuInfo": {"DefaultVCpus": vcpus}, "MemoryInfo": {"SizeInMiB": mib}}


def test_pages_and_an_instance_type_aws_does_not_describe() -> None:
    # moto ignores MaxResults and knows every type; Stubber answers as AWS does: in pages,
    # and with InvalidInstanceType for the whole call when one name is unknown
    ec2 = boto3.client("ec2", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
    stubber = Stubber(ec2)
    stubber.add_response("describe_instances", {"Reservations": [{"Instances": [_instance("i-1", "c7g.large")]}],
                                                "NextToken": "page-2"})
    stubber.add_response("describe_instances", {"Reservations": [{"Instances": [_instance("i-2", "x9.future")]}]})
    stubber.add_client_error("describe_instance_types", "InvalidInstanceType", "x9.future does not exist")
    stubber.add_response("describe_instance_types", {"InstanceTypes": [_type("c7g.large", 2, 4096)]},
                         {"InstanceTypes": ["c7g.large"]})
    stubber.add_client_error("describe_instance_types", "InvalidInstanceType", "x9.future does not exist",
                             expected_params={"InstanceTypes": ["x9.future"]})
    stubber.add_response("describe_instances", {"Reservations": [{"Instances": [_instance("i-1", "c7g.large"),
                                                                                _instance("i-2", "x9.future")]}]})
    with stubber:
        by_vcpu = list(sample_instances(only(ec2), _target(metric="vcpus")))
        by_count = list(sample_instances(only(ec2), _target(metric="count")))  # count needs no instance types
    stubber.assert_no_pending_responses()

    assert [(s.resource_id, s.values["vcpus"], s.facts["lifecycle"]) for s in by_vcpu if isinstance(s, Sample)] == [
        ("i-1", 2, "spot")]
    assert [(s.resource_id, s.reason) for s in by_vcpu if isinstance(s, Skipped)] == [
        ("i-2", "instance type 'x9.future' is unknown to DescribeInstanceTypes")]
    assert [(s.resource_id, dict(s.values)) for s in by_count] == [  # counted even without a known type
        ("i-1", {"count": 1}), ("i-2", {"count": 1})]


def test_count_neither_describes_instance_types_nor_needs_the_permission() -> None:
    ec2 = boto3.client("ec2", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
    stubber = Stubber(ec2)  # an unexpected DescribeInstanceTypes would fail the stubbed call
    stubber.add_response("describe_instances", {"Reservations": [{"Instances": [_instance("i-9", "m9.new")]}]})
    with stubber:
        samples = list(sample_instances(only(ec2), _target(metric="count")))
    stubber.assert_no_pending_responses()
    assert [(s.resource_id, dict(s.values)) for s in samples] == [("i-9", {"count": 1})]
    assert "ec2:DescribeInstanceTypes" not in SPEC.actions_for(_target(metric="count").measurement)
    assert "ec2:DescribeInstanceTypes" in SPEC.actions_for(_target(metric="memory_gib").measurement)
