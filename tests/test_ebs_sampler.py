"""EBS sampler against moto server, plus multi-page listing with botocore's Stubber."""

from __future__ import annotations

from decimal import Decimal

import boto3
from botocore.stub import Stubber

from agent.config import parse_measurement
from agent.samplers import REGISTRY
from agent.samplers.base import Target
from agent.samplers.ebs import VOLUMES
from tests.conftest import ACCOUNT, TICK, only, Aws, measurement

PAGE_SIZE, sample_volumes = VOLUMES.page_size, VOLUMES.sample


def _target(**overrides: object) -> Target:
    return Target(parse_measurement(measurement(**overrides)), ACCOUNT, "us-east-1", TICK)


def test_one_sample_per_volume_with_every_fact(aws: Aws) -> None:
    gp3 = aws.volume("us-east-1", 100, "gp3", {"customer-id": "acme", "env": "prod"}, Iops=4000, Throughput=250)
    io1 = aws.volume("us-east-1", 40, "io1", {"customer-id": "globex"}, Iops=1200)
    aws.volume("eu-west-1", 999, "gp3", {"customer-id": "acme"})  # another region: not listed here

    samples = {s.resource_id: s for s in sample_volumes(only(aws.ec2("us-east-1")), _target())}

    assert set(samples) == {gp3, io1}
    first = samples[gp3]
    assert first.values == {
        "size_gib": Decimal(100),
        "count": Decimal(1),
        "iops": Decimal(4000),
        "throughput_mibps": Decimal(250),
    }
    assert first.tags == {"customer-id": "acme", "env": "prod"}
    assert first.facts == {"volume_type": "gp3", "availability_zone": "us-east-1a"}
    assert (first.region, first.account) == ("us-east-1", ACCOUNT)
    assert samples[io1].values["iops"] == Decimal(1200)
    assert "throughput_mibps" not in samples[io1].values  # io1 has no provisioned throughput


def test_filters_by_tags_and_volume_type(aws: Aws) -> None:
    wanted = aws.volume("us-east-1", 10, "gp3", {"env": "prod", "customer-id": "a"})
    aws.volume("us-east-1", 20, "gp3", {"env": "dev", "customer-id": "a"})
    aws.volume("us-east-1", 30, "gp2", {"env": "prod", "customer-id": "a"})
    aws.volume("us-east-1", 40, "gp3", {"customer-id": "a"})

    target = _target(filters={"tags": {"env": "prod"}, "volume_types": ["gp3"]})
    assert [s.resource_id for s in sample_volumes(only(aws.ec2()), target)] == [wanted]

    any_of = _target(filters={"tags": {"env": ["prod", "dev"]}})
    assert len(list(sample_volumes(only(aws.ec2()), any_of))) == 3


def test_deleted_volumes_are_not_sampled(aws: Aws) -> None:
    kept = aws.volume("us-east-1", 10)
    gone = aws.volume("us-east-1", 20)
    aws.ec2().delete_volume(VolumeId=gone)
    assert [s.resource_id for s in sample_volumes(only(aws.ec2()), _target())] == [kept]


def _volume(n: int) -> dict[str, object]:
    return {
        "VolumeId": f"vol-{n:017x}",
        "Size": n,
        "VolumeType": "gp3",
        "AvailabilityZone": "us-east-1b",
        "State": "in-use",
        "Iops": 3000,
        "Throughput": 125,
        "Tags": [{"Key": "customer-id", "Value": f"c{n % 3}"}],
    }


def test_multi_page_listing_follows_next_token() -> None:
    # moto ignores MaxResults and answers with one page; pagination is covered with the
    # Stubber and responses shaped like AWS's (Volumes + NextToken).
    ec2 = boto3.client("ec2", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
    stubber = Stubber(ec2)
    pages = [[_volume(n) for n in range(1, 501)], [_volume(n) for n in range(501, 1001)], [_volume(1001)]]
    tokens = [None, "token-2", "token-3"]
    for i, page in enumerate(pages):
        expected = {"Filters": [], "MaxResults": PAGE_SIZE}
        if tokens[i]:
            expected["NextToken"] = tokens[i]
        response = {"Volumes": page}
        if i + 1 < len(pages):
            response["NextToken"] = tokens[i + 1]
        stubber.add_response("describe_volumes", response, expected)

    with stubber:
        samples = list(sample_volumes(only(ec2), _target()))
    stubber.assert_no_pending_responses()

    assert len(samples) == 1001
    assert sum(s.values["size_gib"] for s in samples) == Decimal(1001 * 1002 // 2)
    assert samples[0].tags == {"customer-id": "c1"}


def test_registry_declares_ebs() -> None:
    spec = REGISTRY["ebs"]
    assert set(spec.metrics) == {"size_gib", "iops", "throughput_mibps", "count"}
    assert spec.metrics["size_gib"].unit == "GiB"
    assert spec.iam_actions == ("ec2:DescribeVolumes",)
    assert spec.default_metric == "size_gib"
