"""EBS snapshot sampler against moto server; paging and AWS-only fields with botocore's Stubber."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from botocore.stub import Stubber

from agent.config import parse_measurement
from agent.samplers.base import Sample, Skipped, Target
from agent.samplers.ebs_snapshot import SNAPSHOTS
from tests.conftest import ACCOUNT, TICK, Aws, measurement, offline_client, only

PAGE_SIZE, sample_snapshots = SNAPSHOTS.page_size, SNAPSHOTS.sample


def _target(**overrides: Any) -> Target:
    return Target(parse_measurement(measurement(resource_type="ebs_snapshot", **overrides)), ACCOUNT, "us-east-1", TICK)


def _snapshot(aws: Aws, region: str, size: int, tags: dict[str, str]) -> str:
    ec2 = aws.ec2(region)
    volume = aws.volume(region, size)
    return ec2.create_snapshot(
        VolumeId=volume,
        TagSpecifications=[{"ResourceType": "snapshot", "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}],
    )["SnapshotId"]


def test_one_sample_per_owned_snapshot(aws: Aws) -> None:
    big = _snapshot(aws, "us-east-1", 100, {"customer-id": "acme", "env": "prod"})
    small = _snapshot(aws, "us-east-1", 40, {"customer-id": "globex"})
    _snapshot(aws, "eu-west-1", 999, {"customer-id": "acme"})  # another region: not listed here

    # moto also lists the snapshots behind its public AMIs, owned by another account: not ours
    samples = {s.resource_id: s for s in sample_snapshots(only(aws.ec2()), _target())}

    assert set(samples) == {big, small}
    first = samples[big]
    assert first.values == {"size_gib": Decimal(100), "count": Decimal(1)}  # moto reports no full size
    assert first.tags == {"customer-id": "acme", "env": "prod"}
    assert first.facts["storage_tier"] == "standard"
    assert first.facts["state"] == "completed"
    assert first.facts["volume_id"].startswith("vol-")
    assert (first.region, first.account) == ("us-east-1", ACCOUNT)
    assert samples[small].values["size_gib"] == Decimal(40)


def test_tag_filter_is_applied_by_aws(aws: Aws) -> None:
    wanted = _snapshot(aws, "us-east-1", 10, {"env": "prod", "customer-id": "a"})
    _snapshot(aws, "us-east-1", 20, {"env": "dev", "customer-id": "a"})
    _snapshot(aws, "us-east-1", 30, {"customer-id": "a"})

    target = _target(filters={"tags": {"env": "prod"}})
    assert [s.resource_id for s in sample_snapshots(only(aws.ec2()), target)] == [wanted]


def _aws_snapshot(n: int, **fields: Any) -> dict[str, Any]:
    return {
        "SnapshotId": f"snap-{n:017x}",
        "VolumeId": f"vol-{n:017x}",
        "VolumeSize": n,
        "State": "completed",
        "StorageTier": "standard",
        "OwnerId": ACCOUNT,
        "Progress": "100%",
        "Tags": [{"Key": "customer-id", "Value": f"c{n % 2}"}],
        **fields,
    }


def test_pages_states_and_full_size() -> None:
    # moto ignores MaxResults, never reports FullSnapshotSizeInBytes and creates every snapshot
    # completed; responses shaped like AWS's DescribeSnapshots cover those.
    ec2 = offline_client("ec2")
    stubber = Stubber(ec2)
    first_page = [_aws_snapshot(n) for n in range(1, 1001)]
    first_page[0] |= {"FullSnapshotSizeInBytes": 5_368_709_120}
    first_page[1] |= {"State": "pending", "Progress": "40%"}  # pending: billed as its data accrues
    first_page[2] |= {"State": "error"}  # failed: holds nothing
    first_page[3] |= {"OwnerId": "999999999999"}  # not ours, even if a server lists it
    first_page[4] |= {"VolumeSize": -5}  # garbage from the API
    second_page = [_aws_snapshot(1001, StorageTier="archive", FullSnapshotSizeInBytes=123_456_789_012)]
    base = {"OwnerIds": ["self"], "Filters": [{"Name": "tag:env", "Values": ["prod"]}], "MaxResults": PAGE_SIZE}
    stubber.add_response("describe_snapshots", {"Snapshots": first_page, "NextToken": "page-2"}, base)
    stubber.add_response("describe_snapshots", {"Snapshots": second_page}, base | {"NextToken": "page-2"})

    with stubber:
        items = list(sample_snapshots(only(ec2), _target(filters={"tags": {"env": "prod"}})))
    stubber.assert_no_pending_responses()

    samples = {s.resource_id: s for s in items if isinstance(s, Sample)}
    skipped = [s for s in items if isinstance(s, Skipped)]
    assert skipped == [Skipped("snap-00000000000000005", "snapshot volume size or full size absurd value: -5")]
    assert len(samples) == 1001 - 3
    assert "snap-00000000000000003" not in samples and "snap-00000000000000004" not in samples
    assert sum(s.values["size_gib"] for s in samples.values()) == Decimal(1001 * 1002 // 2 - 3 - 4 - 5)
    assert samples["snap-00000000000000002"].facts["state"] == "pending"
    assert samples["snap-00000000000000001"].values["full_size_bytes"] == Decimal(5_368_709_120)
    assert "full_size_bytes" not in samples["snap-00000000000000006"].values  # not reported: not zero
    archived = samples[f"snap-{1001:017x}"]
    assert archived.values == {"size_gib": Decimal(1001), "count": Decimal(1), "full_size_bytes": Decimal(123_456_789_012)}
    assert archived.facts["storage_tier"] == "archive"
    assert sum(s.values.get("full_size_bytes", Decimal(0)) for s in samples.values()) == Decimal(128_825_498_132)
