"""Elastic IP sampler against moto server; BYOIP addresses and the request with botocore's Stubber."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from botocore.stub import Stubber

from agent.config import parse_measurement
from agent.samplers.base import Target
from agent.samplers.eip import ADDRESSES, SPEC
from tests.conftest import ACCOUNT, TICK, Aws, measurement, offline_client, only

sample_addresses = ADDRESSES.sample


def _target(**overrides: Any) -> Target:
    m = measurement(resource_type="eip", metric="count", **overrides)
    return Target(parse_measurement(m), ACCOUNT, "us-east-1", TICK)


def address(aws: Aws, tags: dict[str, str] | None = None, region: str = "us-east-1") -> str:
    """An Elastic IP address allocated in the region; its allocation id."""
    kwargs: dict[str, Any] = {"Domain": "vpc"}
    if tags:
        kwargs["TagSpecifications"] = [{"ResourceType": "elastic-ip", "Tags": [{"Key": k, "Value": v}
                                                                              for k, v in tags.items()]}]
    return aws.ec2(region).allocate_address(**kwargs)["AllocationId"]


def test_every_address_held_counts_associated_or_not(aws: Aws) -> None:
    idle = address(aws, {"customer-id": "acme", "env": "prod"})
    used = address(aws, {"customer-id": "acme"})
    other = address(aws, {"customer-id": "globex"})
    address(aws, {"customer-id": "acme"}, region="eu-west-1")  # another region: not listed here
    instance = aws.ec2().run_instances(ImageId="ami-12c6146b", InstanceType="t3.micro", MinCount=1, MaxCount=1)
    aws.ec2().associate_address(AllocationId=used, InstanceId=instance["Instances"][0]["InstanceId"])
    released = address(aws, {"customer-id": "acme"})
    aws.ec2().release_address(AllocationId=released)  # released: no longer held, no longer billed

    samples = {s.resource_id: s for s in sample_addresses(only(aws.ec2()), _target())}

    assert set(samples) == {idle, used, other}
    assert {s.resource_id: s.values for s in samples.values()} == {
        idle: {"count": Decimal(1)}, used: {"count": Decimal(1)}, other: {"count": Decimal(1)}}
    assert samples[idle].tags == {"customer-id": "acme", "env": "prod"}
    assert (samples[idle].facts["associated"], samples[used].facts["associated"]) == ("false", "true")
    assert samples[idle].facts["domain"] == "vpc" and samples[idle].facts["public_ip"].count(".") == 3
    assert SPEC.resource("us-east-1", ACCOUNT, idle) == f"arn:aws:ec2:us-east-1:{ACCOUNT}:elastic-ip/{idle}"


def test_tag_filter_is_applied_by_aws(aws: Aws) -> None:
    wanted = address(aws, {"customer-id": "a", "env": "prod"})
    address(aws, {"customer-id": "a", "env": "dev"})
    address(aws)

    target = _target(filters={"tags": {"env": "prod"}})
    assert [s.resource_id for s in sample_addresses(only(aws.ec2()), target)] == [wanted]


def _aws_address(n: int, pool: str = "amazon", **fields: Any) -> dict[str, Any]:
    return {"AllocationId": f"eipalloc-{n:017x}", "PublicIp": f"198.51.100.{n}", "Domain": "vpc",
            "PublicIpv4Pool": pool, "NetworkBorderGroup": "us-east-1",
            "Tags": [{"Key": "customer-id", "Value": f"c{n % 2}"}], **fields}


def test_one_call_and_byoip_addresses_carry_no_count() -> None:
    # moto reports no PublicIpv4Pool (and has no BYOIP); an AWS-shaped answer covers those
    ec2 = offline_client("ec2")
    stubber = Stubber(ec2)
    addresses = [_aws_address(n) for n in range(1, 8)]
    addresses[2] = _aws_address(3, "ipv4pool-ec2-0123456789abcdef0")  # brought by the customer: AWS charges nothing
    addresses[3] = _aws_address(4, AssociationId="eipassoc-1", InstanceId="i-1")
    # DescribeAddresses has no paging: one call, the tag filter done by AWS
    stubber.add_response("describe_addresses", {"Addresses": addresses},
                         {"Filters": [{"Name": "tag:env", "Values": ["prod", "staging"]}]})

    with stubber:
        samples = {s.resource_id: s for s in sample_addresses(only(ec2), _target(filters={"tags": {
            "env": ["prod", "staging"]}}))}
    stubber.assert_no_pending_responses()

    assert len(samples) == 7
    assert samples["eipalloc-00000000000000003"].values == {}  # listed, not billed: in no record
    assert samples["eipalloc-00000000000000003"].facts["pool"] == "ipv4pool-ec2-0123456789abcdef0"
    assert samples["eipalloc-00000000000000004"].facts["associated"] == "true"
    assert sum(s.values.get("count", Decimal(0)) for s in samples.values()) == Decimal(6)
    assert sum(s.values.get("count", Decimal(0)) for s in samples.values() if s.tags["customer-id"] == "c1") == Decimal(3)


def test_declares_eip() -> None:
    assert SPEC.actions_for(_target().measurement) == ("ec2:DescribeAddresses",)
    assert (SPEC.filters, SPEC.default_metric, SPEC.id_scope) == (("tags",), "count", "account-region")
