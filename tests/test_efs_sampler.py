"""EFS sampler against moto server; sizes and paging with botocore's Stubber."""

from __future__ import annotations

from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

from botocore.stub import Stubber

from agent.config import parse_measurement
from agent.samplers.base import Sample, Skipped, Target
from agent.samplers.efs import FILE_SYSTEMS
from tests.conftest import ACCOUNT, TICK, Aws, measurement, offline_client, only

PAGE_SIZE, sample_file_systems = FILE_SYSTEMS.page_size, FILE_SYSTEMS.sample


def _target(**overrides: Any) -> Target:
    return Target(parse_measurement(measurement(resource_type="efs", metric="size_bytes", **overrides)), ACCOUNT, "us-east-1", TICK)


def _file_system(aws: Aws, region: str, token: str, tags: dict[str, str]) -> str:
    efs = aws.client("efs", region)
    return efs.create_file_system(
        CreationToken=token, Tags=[{"Key": k, "Value": v} for k, v in tags.items()]
    )["FileSystemId"]


def test_one_sample_per_file_system(aws: Aws) -> None:
    acme = _file_system(aws, "us-east-1", "a", {"customer-id": "acme", "env": "prod"})
    globex = _file_system(aws, "us-east-1", "b", {"customer-id": "globex"})
    _file_system(aws, "eu-west-1", "c", {"customer-id": "acme"})  # another region: not listed here

    samples = {s.resource_id: s for s in sample_file_systems(only(aws.client("efs")), _target())}

    assert set(samples) == {acme, globex}
    # moto meters every file system at 0 bytes; non-zero sizes are covered with the Stubber below
    assert samples[acme].values == {"size_bytes": Decimal(0), "count": Decimal(1)}
    assert samples[acme].tags == {"customer-id": "acme", "env": "prod"}
    assert samples[acme].facts == {"performance_mode": "generalPurpose", "throughput_mode": "bursting"}
    assert (samples[globex].region, samples[globex].account) == ("us-east-1", ACCOUNT)


def test_tag_filter(aws: Aws) -> None:
    wanted = _file_system(aws, "us-east-1", "a", {"customer-id": "a", "env": "prod"})
    _file_system(aws, "us-east-1", "b", {"customer-id": "a", "env": "dev"})
    _file_system(aws, "us-east-1", "c", {"customer-id": "a"})

    target = _target(filters={"tags": {"env": "prod"}})
    assert [s.resource_id for s in sample_file_systems(only(aws.client("efs")), target)] == [wanted]


def _aws_file_system(n: int, size: int, state: str = "available") -> dict[str, Any]:
    fs: dict[str, Any] = {
        "OwnerId": ACCOUNT,
        "CreationToken": f"token-{n}",
        "FileSystemId": f"fs-{n:08x}",
        "CreationTime": datetime(2026, 1, 1, tzinfo=timezone.utc),
        "LifeCycleState": state,
        "NumberOfMountTargets": 1,
        "PerformanceMode": "generalPurpose",
        "ThroughputMode": "elastic",
        "Tags": [{"Key": "customer-id", "Value": f"c{n % 2}"}],
    }
    fs["SizeInBytes"] = {
        "Value": size,
        "Timestamp": datetime(2026, 3, 1, 11, tzinfo=timezone.utc),
        "ValueInIA": max(size // 4, 0),
        "ValueInStandard": max(size - size // 4, 0),
    }
    return fs


def test_pages_sizes_and_states() -> None:
    # moto ignores MaxItems and meters every file system at 0 bytes; responses shaped like
    # AWS's DescribeFileSystems cover paging and real sizes.
    efs = offline_client("efs")
    stubber = Stubber(efs)
    first = [_aws_file_system(n, n * 1_000_000_007) for n in range(1, 101)]
    first[1] = _aws_file_system(2, 5_000, state="deleting")
    second = [_aws_file_system(101, 6_442_450_944)]
    stubber.add_response("describe_file_systems", {"FileSystems": first, "NextMarker": "m2"}, {"MaxItems": PAGE_SIZE})
    stubber.add_response("describe_file_systems", {"FileSystems": second, "Marker": "m2"}, {"MaxItems": PAGE_SIZE, "Marker": "m2"})

    with stubber:
        items = list(sample_file_systems(only(efs), _target()))
    stubber.assert_no_pending_responses()

    samples = {s.resource_id: s for s in items if isinstance(s, Sample)}
    assert not [s for s in items if isinstance(s, Skipped)]
    assert "fs-00000002" not in samples  # deleting
    assert len(samples) == 100
    assert samples["fs-00000065"].values == {"size_bytes": Decimal(6_442_450_944), "count": Decimal(1)}
    expected = sum(n * 1_000_000_007 for n in range(1, 101) if n != 2) + 6_442_450_944
    assert sum(s.values["size_bytes"] for s in samples.values()) == Decimal(expected)
    assert expected == 5_054_442_486_280
    assert samples["fs-00000001"].facts["throughput_mode"] == "elastic"
