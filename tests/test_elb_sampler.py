"""ELB (v2) sampler against moto server; paging, failed load balancers and tag batches with botocore's Stubber."""

from __future__ import annotations

from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

from botocore.stub import Stubber

from agent.config import parse_measurement
from agent.samplers.base import Sample, Target
from agent.samplers.elb import LOAD_BALANCERS, SPEC
from tests.conftest import ACCOUNT, TICK, Aws, measurement, offline_client, only

sample_load_balancers = LOAD_BALANCERS.sample


def _target(**overrides: Any) -> Target:
    m = measurement(resource_type="elb", metric="count", **overrides)
    return Target(parse_measurement(m), ACCOUNT, "us-east-1", TICK)


def _subnets(aws: Aws, region: str) -> list[str]:
    return [s["SubnetId"] for s in aws.ec2(region).describe_subnets()["Subnets"]][:2]


def load_balancer(aws: Aws, name: str, kind: str = "application", tags: dict[str, str] | None = None,
                  region: str = "us-east-1") -> str:
    """A load balancer in moto's default VPC; its ARN."""
    created = aws.client("elbv2", region).create_load_balancer(
        Name=name, Subnets=_subnets(aws, region), Type=kind, Scheme="internal", Tags=[{"Key": k, "Value": v} for k, v in (tags or {}).items()])
    return created["LoadBalancers"][0]["LoadBalancerArn"]


def _id(arn: str) -> str:
    return arn.split(":loadbalancer/")[1]


def test_one_sample_per_load_balancer_with_its_tags(aws: Aws) -> None:
    web = load_balancer(aws, "web", tags={"customer-id": "acme", "env": "prod"})
    edge = load_balancer(aws, "edge", "network", {"customer-id": "globex"})
    load_balancer(aws, "elsewhere", tags={"customer-id": "acme"}, region="eu-west-1")  # another region: not listed

    samples = {s.resource_id: s for s in sample_load_balancers(only(aws.client("elbv2")), _target())}

    assert set(samples) == {_id(web), _id(edge)}
    assert samples[_id(web)].values == {"count": Decimal(1)}
    assert samples[_id(web)].tags == {"customer-id": "acme", "env": "prod"}
    assert samples[_id(web)].facts == {"type": "application", "scheme": "internal", "state": "active"}
    assert samples[_id(edge)].facts["type"] == "network"
    assert sum(s.values["count"] for s in samples.values()) == Decimal(2)
    assert SPEC.resource("us-east-1", ACCOUNT, _id(web)) == web  # the identity is the load balancer's ARN


def test_type_and_tag_filters(aws: Aws) -> None:
    load_balancer(aws, "web", tags={"customer-id": "a", "env": "prod"})
    edge = load_balancer(aws, "edge", "network", {"customer-id": "a", "env": "prod"})
    load_balancer(aws, "dev-edge", "network", {"customer-id": "a", "env": "dev"})

    network = _target(filters={"load_balancer_types": ["network"], "tags": {"env": "prod"}})
    assert [s.resource_id for s in sample_load_balancers(only(aws.client("elbv2")), network)] == [_id(edge)]
    both = _target(filters={"load_balancer_types": ["network", "application"]})
    assert sum(s.values["count"] for s in sample_load_balancers(only(aws.client("elbv2")), both)) == Decimal(3)


def _arn(n: int) -> str:
    return f"arn:aws:elasticloadbalancing:us-east-1:{ACCOUNT}:loadbalancer/app/lb-{n:02d}/{n:016x}"


def _aws_load_balancer(n: int, state: str = "active") -> dict[str, Any]:
    return {"LoadBalancerArn": _arn(n), "LoadBalancerName": f"lb-{n:02d}", "Scheme": "internal",
            "Type": "gateway" if n % 5 == 0 else "application", "State": {"Code": state},
            "CreatedTime": datetime(2026, 1, 1, tzinfo=timezone.utc)}


def _tag_descriptions(numbers: list[int]) -> dict[str, Any]:
    return {"TagDescriptions": [{"ResourceArn": _arn(n), "Tags": [{"Key": "customer-id", "Value": f"c{n % 2}"}]}
                                for n in numbers]}


def test_pages_failed_load_balancers_and_tags_in_batches_of_20() -> None:
    # moto pages by 50 and never fails a load balancer; AWS-shaped answers cover the page size,
    # failed ones, 20 ARNs per DescribeTags and a load balancer deleted while its batch is read
    elbv2 = offline_client("elbv2")
    stubber = Stubber(elbv2)
    first = [_aws_load_balancer(n) for n in range(1, 24)]
    first[2] = _aws_load_balancer(3, "failed")  # not billed
    first[3] = _aws_load_balancer(4, "active_impaired")  # still running: billed
    second = [_aws_load_balancer(24, "provisioning"), _aws_load_balancer(25)]
    stubber.add_response("describe_load_balancers", {"LoadBalancers": first, "NextMarker": "m2"}, {"PageSize": 400})
    stubber.add_response("describe_load_balancers", {"LoadBalancers": second}, {"PageSize": 400, "Marker": "m2"})
    billed = [n for n in range(1, 26) if n != 3]
    stubber.add_response("describe_tags", _tag_descriptions(billed[:20]), {"ResourceArns": [_arn(n) for n in billed[:20]]})
    # lb-24 is deleted before its batch is read: the batch fails, then each is asked for alone
    rest = billed[20:]
    stubber.add_client_error("describe_tags", "LoadBalancerNotFound", "not found", 400,
                             expected_params={"ResourceArns": [_arn(n) for n in rest]})
    for n in rest:
        if n == 24:
            stubber.add_client_error("describe_tags", "LoadBalancerNotFound", "not found", 400,
                                     expected_params={"ResourceArns": [_arn(n)]})
        else:
            stubber.add_response("describe_tags", _tag_descriptions([n]), {"ResourceArns": [_arn(n)]})

    with stubber:
        items = list(sample_load_balancers(only(elbv2), _target()))
    stubber.assert_no_pending_responses()

    assert all(isinstance(s, Sample) for s in items)
    samples = {s.resource_id: s for s in items}
    assert len(samples) == 23 and "app/lb-03/0000000000000003" not in samples and "app/lb-24/0000000000000018" not in samples
    assert samples["app/lb-04/0000000000000004"].facts["state"] == "active_impaired"
    assert samples["app/lb-25/0000000000000019"].tags == {"customer-id": "c1"}
    by_customer: dict[str, Decimal] = {}
    for s in samples.values():
        by_customer[s.tags["customer-id"]] = by_customer.get(s.tags["customer-id"], Decimal(0)) + s.values["count"]
    assert by_customer == {"c0": Decimal(11), "c1": Decimal(12)}
    assert sum(1 for s in samples.values() if s.facts["type"] == "gateway") == 5  # 5, 10, 15, 20, 25


def test_declares_elb() -> None:
    assert SPEC.actions_for(_target().measurement) == (
        "elasticloadbalancing:DescribeLoadBalancers", "elasticloadbalancing:DescribeTags")
    assert SPEC.filters == ("tags", "load_balancer_types")
    assert SPEC.identity == "arn:{partition}:elasticloadbalancing:{region}:{account}:loadbalancer/{id}"


def test_iam_policy_grants_what_eip_and_elb_call() -> None:
    from agent.iam import sampler_actions

    measurements = [parse_measurement(measurement(name=t, resource_type=t, metric="count")) for t in ("eip", "elb")]
    assert sampler_actions(measurements) == ["ec2:DescribeAddresses", "elasticloadbalancing:DescribeLoadBalancers",
                                             "elasticloadbalancing:DescribeTags"]
