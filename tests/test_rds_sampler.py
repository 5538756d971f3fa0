"""RDS sampler against moto server; paging and every billing status with botocore's Stubber."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
from botocore.stub import Stubber

from agent.config import parse_measurement
from agent.samplers import instance_types
from agent.samplers.base import Sample, Skipped, Target
from agent.samplers.rds import INSTANCES, SPEC
from tests.conftest import ACCOUNT, TICK, Aws, measurement, offline_client

PAGE_SIZE, sample_instances = INSTANCES.page_size, INSTANCES.sample


@pytest.fixture(autouse=True)
def _fresh_instance_type_cache() -> Iterator[None]:
    instance_types.forget()
    yield
    instance_types.forget()


def _target(metric: str = "allocated_storage_gib", **overrides: Any) -> Target:
    m = measurement(resource_type="rds", metric=metric, **overrides)
    return Target(parse_measurement(m), ACCOUNT, "us-east-1", TICK)


def _moto_clients(aws: Aws) -> Any:
    return lambda service: aws.client(service)


def _instance(aws: Aws, name: str, instance_class: str, storage: int, tags: dict[str, str], region: str = "us-east-1") -> None:
    aws.client("rds", region).create_db_instance(
        DBInstanceIdentifier=name,
        DBInstanceClass=instance_class,
        Engine="postgres",
        AllocatedStorage=storage,
        MasterUsername="admin",
        MasterUserPassword="password123",
        Tags=[{"Key": k, "Value": v} for k, v in tags.items()],
    )


def _aurora_serverless(aws: Aws, name: str, tags: dict[str, str]) -> None:
    rds = aws.client("rds")
    rds.create_db_cluster(
        DBClusterIdentifier=f"{name}-cluster", Engine="aurora-postgresql", MasterUsername="admin", MasterUserPassword="password123"
    )
    rds.create_db_instance(
        DBInstanceIdentifier=name,
        DBInstanceClass="db.serverless",
        Engine="aurora-postgresql",
        DBClusterIdentifier=f"{name}-cluster",
        Tags=[{"Key": k, "Value": v} for k, v in tags.items()],
    )


def _setup(aws: Aws) -> None:
    _instance(aws, "orders", "db.m5.large", 100, {"customer-id": "acme", "env": "prod"})
    _instance(aws, "reports", "db.r5.xlarge", 500, {"customer-id": "globex"})
    _instance(aws, "paused", "db.m5.large", 40, {"customer-id": "acme"})
    aws.client("rds").stop_db_instance(DBInstanceIdentifier="paused")
    _aurora_serverless(aws, "aurora", {"customer-id": "acme"})
    _instance(aws, "elsewhere", "db.m5.large", 999, {"customer-id": "acme"}, region="eu-west-1")


def test_storage_count_and_vcpus_per_instance(aws: Aws) -> None:
    _setup(aws)

    samples = {s.resource_id: s for s in sample_instances(_moto_clients(aws), _target())}

    assert set(samples) == {"orders", "reports", "paused", "aurora"}
    assert samples["orders"].values == {"allocated_storage_gib": Decimal(100), "count": Decimal(1)}
    assert samples["reports"].values == {"allocated_storage_gib": Decimal(500), "count": Decimal(1)}
    vcpus = {s.resource_id: s.values.get("vcpus") for s in sample_instances(_moto_clients(aws), _target("vcpus"))
             if isinstance(s, Sample)}
    assert vcpus == {"orders": Decimal(2), "reports": Decimal(4), "paused": None}
    # stopped: AWS bills its storage, not the instance
    assert samples["paused"].values == {"allocated_storage_gib": Decimal(40)}
    # Aurora storage is the cluster's volume, and db.serverless has no EC2 type: only the count applies
    assert samples["aurora"].values == {"count": Decimal(1)}
    assert samples["orders"].tags == {"customer-id": "acme", "env": "prod"}
    assert samples["orders"].facts == {
        "instance_class": "db.m5.large",
        "engine": "postgres",
        "status": "available",
        "multi_az": "false",
        "storage_type": "gp2",
    }
    assert samples["paused"].facts["status"] == "stopped"
    assert (samples["orders"].region, samples["orders"].account) == ("us-east-1", ACCOUNT)


def test_an_instance_class_without_vcpus_is_skipped_only_when_vcpus_are_measured(aws: Aws) -> None:
    _setup(aws)

    items = list(sample_instances(_moto_clients(aws), _target("vcpus")))

    samples = {s.resource_id: s for s in items if isinstance(s, Sample)}
    assert [s for s in items if isinstance(s, Skipped)] == [
        Skipped("aurora", "instance class 'db.serverless' has no EC2 instance type to read vCPUs from")
    ]
    assert sum(s.values.get("vcpus", Decimal(0)) for s in samples.values()) == Decimal(6)
    assert "vcpus" not in samples["paused"].values  # stopped: not skipped, just not billed


def test_tag_and_instance_class_filters(aws: Aws) -> None:
    _setup(aws)

    by_class = _target(filters={"instance_types": ["db.m5.large"]})
    assert sorted(s.resource_id for s in sample_instances(_moto_clients(aws), by_class)) == ["orders", "paused"]
    both = _target(filters={"instance_types": ["db.m5.large", "db.r5.xlarge"], "tags": {"env": "prod"}})
    assert [s.resource_id for s in sample_instances(_moto_clients(aws), both)] == ["orders"]


def _aws_instance(n: int, status: str = "available", instance_class: str = "db.m6g.2xlarge", **fields: Any) -> dict[str, Any]:
    return {
        "DBInstanceIdentifier": f"db-{n:04d}",
        "DBInstanceClass": instance_class,
        "Engine": "mysql",
        "DBInstanceStatus": status,
        "AllocatedStorage": n,
        "MultiAZ": n % 2 == 0,
        "StorageType": "gp3",
        "TagList": [{"Key": "customer-id", "Value": f"c{n % 3}"}],
        **fields,
    }


def _aws_instance_type(name: str, vcpus: int, mib: int) -> dict[str, Any]:
    return {
        "InstanceType": name,
        "CurrentGeneration": True,
        "VCpuInfo": {"DefaultVCpus": vcpus, "DefaultCores": vcpus // 2, "DefaultThreadsPerCore": 2},
        "MemoryInfo": {"SizeInMiB": mib},
    }


def test_pages_and_billing_statuses() -> None:
    # moto ignores MaxRecords and cannot put an instance in most statuses; responses shaped like
    # AWS's DescribeDBInstances and DescribeInstanceTypes cover paging and the status table.
    rds, ec2 = offline_client("rds"), offline_client("ec2")
    rds_stub, ec2_stub = Stubber(rds), Stubber(ec2)
    first = [_aws_instance(n) for n in range(1, 101)]
    first[0] = _aws_instance(1, "creating")  # not billed
    first[1] = _aws_instance(2, "deleting")  # not billed
    first[2] = _aws_instance(3, "failed")  # not billed
    first[3] = _aws_instance(4, "stopped")  # storage only
    first[4] = _aws_instance(5, "storage-full", "db.t4g.micro")  # billed
    first[5] = _aws_instance(6, "incompatible-parameters", "db.t4g.micro")  # billed
    first[6] = _aws_instance(7, "inaccessible-encryption-credentials-recoverable")  # storage only
    second = [_aws_instance(101, "backing-up", "db.t4g.micro", MultiAZ=True)]
    rds_stub.add_response("describe_db_instances", {"DBInstances": first, "Marker": "next"}, {"MaxRecords": PAGE_SIZE})
    rds_stub.add_response("describe_db_instances", {"DBInstances": second}, {"MaxRecords": PAGE_SIZE, "Marker": "next"})
    ec2_stub.add_response(
        "describe_instance_types",
        {"InstanceTypes": [_aws_instance_type("m6g.2xlarge", 8, 32768), _aws_instance_type("t4g.micro", 2, 1024)]},
        {"InstanceTypes": ["m6g.2xlarge", "t4g.micro"]},
    )
    clients = {"rds": rds, "ec2": ec2}

    with rds_stub, ec2_stub:
        items = list(sample_instances(clients.__getitem__, _target("vcpus")))
    rds_stub.assert_no_pending_responses()
    ec2_stub.assert_no_pending_responses()

    assert all(isinstance(s, Sample) for s in items)
    samples = {s.resource_id: s for s in items}
    assert len(samples) == 101 - 3
    assert {"db-0001", "db-0002", "db-0003"}.isdisjoint(samples)
    assert samples["db-0004"].values == {"allocated_storage_gib": Decimal(4)}
    assert samples["db-0007"].values == {"allocated_storage_gib": Decimal(7)}
    assert samples["db-0005"].values == {"allocated_storage_gib": Decimal(5), "count": Decimal(1), "vcpus": Decimal(2)}
    assert samples["db-0101"].facts["multi_az"] == "true"
    total = {metric: sum(s.values.get(metric, Decimal(0)) for s in samples.values()) for metric in ("allocated_storage_gib", "count", "vcpus")}
    assert total == {
        "allocated_storage_gib": Decimal(101 * 102 // 2 - 1 - 2 - 3),
        "count": Decimal(96),
        "vcpus": Decimal(93 * 8 + 3 * 2),
    }


@pytest.mark.parametrize("metric", ["allocated_storage_gib", "count"])
def test_instance_types_are_described_only_when_vcpus_are_measured(metric: str) -> None:
    # an EC2 endpoint that fails (or a role without ec2:DescribeInstanceTypes) must not fail RDS storage
    rds, ec2 = offline_client("rds"), offline_client("ec2")
    rds_stub, ec2_stub = Stubber(rds), Stubber(ec2)
    rds_stub.add_response("describe_db_instances", {"DBInstances": [_aws_instance(20)]}, {"MaxRecords": PAGE_SIZE})
    ec2_stub.add_client_error("describe_instance_types", "UnauthorizedOperation", http_status_code=403)
    clients = {"rds": rds, "ec2": ec2}

    with rds_stub, ec2_stub:
        items = list(sample_instances(clients.__getitem__, _target(metric)))

    assert [(s.resource_id, s.values) for s in items] == [("db-0020", {"allocated_storage_gib": Decimal(20), "count": Decimal(1)})]
    assert SPEC.actions_for(_target(metric).measurement) == ("rds:DescribeDBInstances",)
    assert SPEC.actions_for(_target("vcpus").measurement) == ("ec2:DescribeInstanceTypes", "rds:DescribeDBInstances")
