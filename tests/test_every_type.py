"""Every resource type end to end through ``usage-agent once --dry-run``: resources in moto
server across two accounts and two regions, each record compared with a hand-computed value."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import boto3
import yaml

from agent.testing.paigo_server import PaigoContractServer
from tests.conftest import ACCOUNT, ROLE_ARN, Aws, backend_config, config_dict, measurement, write_yaml
from tests.support import cli

T = datetime(2026, 11, 21, 10, 0, tzinfo=timezone.utc)
OTHER = "222222222222"
OTHER_ROLE = f"arn:aws:iam::{OTHER}:role/usage-scraper"
TAG = {"customer-id": "acme"}


def _tags(kind: str) -> list[dict[str, Any]]:
    return [{"ResourceType": kind, "Tags": [{"Key": "customer-id", "Value": "acme"}]}]


def _seed(aws: Aws) -> None:
    """acme lives in 123456789012 (attributed by tag; untagged root volumes are skipped),
    globex owns all of 222222222222."""
    east, west = (aws.client("ec2", r) for r in ("us-east-1", "eu-west-1"))
    aws.volume("us-east-1", 100, tags=TAG)
    aws.volume("eu-west-1", 50, tags=TAG)
    volume = aws.volume("us-east-1", 8, tags=TAG)
    east.create_snapshot(VolumeId=volume, TagSpecifications=_tags("snapshot"))
    acme_instances = east.run_instances(ImageId="ami-12c6146b", InstanceType="t3.micro", MinCount=2, MaxCount=2,
                                        TagSpecifications=_tags("instance"))["Instances"]
    west.run_instances(ImageId="ami-12c6146b", InstanceType="m5.xlarge", MinCount=1, MaxCount=1,
                       TagSpecifications=_tags("instance"))
    s3 = aws.client("s3")
    s3.create_bucket(Bucket="acme-data")
    s3.put_bucket_tagging(Bucket="acme-data", Tagging={"TagSet": [{"Key": "customer-id", "Value": "acme"}]})
    day = T.replace(hour=0) - timedelta(days=1)  # the latest complete day at T
    cw = aws.client("cloudwatch")
    cw.put_metric_data(Namespace="AWS/S3", MetricData=[
        {"MetricName": "BucketSizeBytes", "Timestamp": day, "Value": 3 * 2**30, "Unit": "Bytes",
         "Dimensions": [{"Name": "BucketName", "Value": "acme-data"}, {"Name": "StorageType", "Value": "StandardStorage"}]},
        {"MetricName": "NumberOfObjects", "Timestamp": day, "Value": 1200, "Unit": "Count",
         "Dimensions": [{"Name": "BucketName", "Value": "acme-data"}, {"Name": "StorageType", "Value": "AllStorageTypes"}]},
    ])
    aws.client("rds").create_db_instance(DBInstanceIdentifier="acme-db", DBInstanceClass="db.m5.large", Engine="postgres",
                                         AllocatedStorage=200, MasterUsername="admin", MasterUserPassword="password123",
                                         Tags=[{"Key": "customer-id", "Value": "acme"}])
    aws.client("efs").create_file_system(CreationToken="acme-fs", Tags=[{"Key": "customer-id", "Value": "acme"}])
    dynamodb = aws.client("dynamodb")
    dynamodb.create_table(TableName="acme-orders", BillingMode="PAY_PER_REQUEST",
                          KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
                          AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
                          Tags=[{"Key": "customer-id", "Value": "acme"}])
    for n in range(3):
        dynamodb.put_item(TableName="acme-orders", Item={"id": {"S": f"order-{n}"}})
    for instance, sent in zip(acme_instances, (1000.5, 24.5)):
        cw.put_metric_data(Namespace="AWS/EC2", MetricData=[
            {"MetricName": "NetworkOut", "Timestamp": T - timedelta(minutes=10), "Value": sent, "Unit": "Bytes",
             "Dimensions": [{"Name": "InstanceId", "Value": instance["InstanceId"]}]}])

    for region, tagged in (("us-east-1", 2), ("eu-west-1", 1)):  # and one untagged address: skipped
        for tags in [TAG] * tagged + [{}] * (region == "us-east-1"):
            _address(aws.ec2(region), tags)
    _load_balancer(aws.client("ec2"), aws.client("elbv2"), "acme-web", TAG)
    _load_balancer(aws.client("ec2"), aws.client("elbv2"), "acme-edge", TAG, "network")
    _load_balancer(aws.client("ec2", "eu-west-1"), aws.client("elbv2", "eu-west-1"), "acme-eu", TAG)
    _load_balancer(aws.client("ec2"), aws.client("elbv2"), "untagged", {})

    admin = boto3.client("sts", region_name="us-east-1", endpoint_url=aws.endpoint).assume_role(
        RoleArn=f"arn:aws:iam::{OTHER}:role/admin", RoleSessionName="setup")["Credentials"]
    other = {"aws_access_key_id": admin["AccessKeyId"], "aws_secret_access_key": admin["SecretAccessKey"],
             "aws_session_token": admin["SessionToken"], "endpoint_url": aws.endpoint}
    boto3.client("ec2", region_name="eu-west-1", **other).create_volume(Size=30, AvailabilityZone="eu-west-1a")
    boto3.client("ec2", region_name="us-east-1", **other).run_instances(
        ImageId="ami-12c6146b", InstanceType="m5.large", MinCount=3, MaxCount=3)
    _address(boto3.client("ec2", region_name="eu-west-1", **other), {})
    _load_balancer(boto3.client("ec2", region_name="us-east-1", **other),
                   boto3.client("elbv2", region_name="us-east-1", **other), "globex-web", {})


def _address(ec2: Any, tags: dict[str, str]) -> str:
    specs = [{"ResourceType": "elastic-ip", "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}]
    return ec2.allocate_address(Domain="vpc", **({"TagSpecifications": specs} if tags else {}))["AllocationId"]


def _load_balancer(ec2: Any, elbv2: Any, name: str, tags: dict[str, str], kind: str = "application") -> str:
    subnets = [s["SubnetId"] for s in ec2.describe_subnets()["Subnets"]][:2]
    labels = {"Tags": [{"Key": k, "Value": v} for k, v in tags.items()]} if tags else {}
    created = elbv2.create_load_balancer(Name=name, Subnets=subnets, Type=kind, **labels)
    return created["LoadBalancers"][0]["LoadBalancerArn"]


def _both_accounts(**fields: Any) -> dict[str, Any]:
    raw = measurement(regions=["us-east-1", "eu-west-1"], accounts=[
        {"iam_role_arn": ROLE_ARN, "customer": {"tag": "customer-id"}},
        {"iam_role_arn": OTHER_ROLE, "customer": {"id": "globex"}},
    ], **fields)
    del raw["iam_role_arn"], raw["external_id"], raw["customer"]
    return raw


def test_every_resource_type(aws: Aws, paigo: PaigoContractServer, tmp_path: Path) -> None:
    _seed(aws)
    hourly = {"mode": "time_weighted", "per": "hour", "interval": "1h"}
    measurements = [
        _both_accounts(name="ebs-gib", resource_type="ebs", metric="size_gib"),
        _both_accounts(name="ec2-minutes", resource_type="ec2", metric="count", mode="time_weighted", per="minute",
                       interval="15m"),
        _both_accounts(name="ec2-vcpu-hours", resource_type="ec2", metric="vcpus", **hourly),
        measurement(name="snapshot-gib", resource_type="ebs_snapshot", metric="size_gib"),
        measurement(name="s3-bytes", resource_type="s3", metric="size_bytes"),
        measurement(name="s3-objects", resource_type="s3", metric="object_count"),
        measurement(name="rds-gib-hours", resource_type="rds", metric="allocated_storage_gib", **hourly),
        measurement(name="rds-vcpus", resource_type="rds", metric="vcpus"),
        measurement(name="efs-count", resource_type="efs", metric="count"),
        measurement(name="dynamodb-items", resource_type="dynamodb", metric="item_count"),
        measurement(name="ec2-egress", resource_type="cloudwatch", metric="value", interval="1h", cloudwatch={
            "namespace": "AWS/EC2", "metric_name": "NetworkOut", "dimensions": {"InstanceId": "*"}, "unit": "Bytes"}),
        _both_accounts(name="eip-hours", resource_type="eip", metric="count", **hourly),
        _both_accounts(name="elb-count", resource_type="elb", metric="count"),
        _both_accounts(name="nlb-count", resource_type="elb", metric="count", filters={"load_balancer_types": ["network"]}),
    ]
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(config_dict(paigo, tmp_path, *measurements)))
    out = cli("once", "-c", str(path), "--at", "2026-11-21T10:00:00Z", "--dry-run")
    assert out.returncode == 0, out.stderr
    bodies = [json.loads(line) for line in out.stdout.splitlines()]
    got = {(b["metadata"]["measurement"], b["customerId"]): Decimal(b["recordValue"]) for b in bodies}

    assert got == {
        ("ebs-gib", "acme"): Decimal(158),  # 100 + 50 + 8, two regions
        ("ebs-gib", "globex"): Decimal(54),  # 30 + the three 8 GiB root volumes of its instances
        ("ec2-minutes", "acme"): Decimal(45),  # 3 running instances x 15 minutes
        ("ec2-minutes", "globex"): Decimal(45),
        ("ec2-vcpu-hours", "acme"): Decimal(8),  # 2 x t3.micro (2) + m5.xlarge (4), one hour
        ("ec2-vcpu-hours", "globex"): Decimal(6),  # 3 x m5.large (2)
        ("snapshot-gib", "acme"): Decimal(8),
        ("s3-bytes", "acme"): Decimal(3 * 2**30),
        ("s3-objects", "acme"): Decimal(1200),
        ("rds-gib-hours", "acme"): Decimal(200),
        ("rds-vcpus", "acme"): Decimal(2),
        ("efs-count", "acme"): Decimal(1),
        ("dynamodb-items", "acme"): Decimal(3),
        ("ec2-egress", "acme"): Decimal(1025),
        ("eip-hours", "acme"): Decimal(3),  # 2 + 1 tagged addresses, two regions, one hour each
        ("eip-hours", "globex"): Decimal(1),
        ("elb-count", "acme"): Decimal(3),  # web and edge in us-east-1, one in eu-west-1
        ("elb-count", "globex"): Decimal(1),
        ("nlb-count", "acme"): Decimal(1),  # edge only; globex has no network load balancer: no record
    }
    assert {b["timestamp"] for b in bodies} == {"2026-11-21T10:00:00Z"}
    by_name = {(b["metadata"]["measurement"], b["customerId"]): b["metadata"] for b in bodies}
    assert by_name[("ebs-gib", "globex")]["accounts"] == OTHER
    assert by_name[("ebs-gib", "acme")]["accounts"] == ACCOUNT


# -- one resource, one record (issue: same-named resources in two regions or accounts) ------------

REGIONS = ("us-east-1", "eu-west-1")


def _client(aws: Aws, service: str, region: str, account: str) -> Any:
    if account == ACCOUNT:
        return aws.client(service, region)
    creds = boto3.client("sts", region_name="us-east-1", endpoint_url=aws.endpoint).assume_role(
        RoleArn=f"arn:aws:iam::{account}:role/admin", RoleSessionName="setup")["Credentials"]
    return boto3.client(service, region_name=region, endpoint_url=aws.endpoint, aws_access_key_id=creds["AccessKeyId"],
                        aws_secret_access_key=creds["SecretAccessKey"], aws_session_token=creds["SessionToken"])


def _seed_twins(aws: Aws) -> dict[str, list[tuple[str, str, str, Decimal]]]:
    """For one customer (acme, by tag): resources of every type in both regions of 123456789012 and
    in eu-west-1 of 222222222222, named alike wherever AWS lets a customer name them. Returns, per
    resource type, the (account, region, resource id, value) a per-resource record must carry."""
    want: dict[str, list[tuple[str, str, str, Decimal]]] = {t: [] for t in
                                                             ("ebs", "ebs_snapshot", "ec2", "s3", "rds", "efs", "dynamodb", "cloudwatch",
                                                              "eip", "elb")}
    day = T.replace(hour=0) - timedelta(days=1)
    places = [(ACCOUNT, "us-east-1", 20), (ACCOUNT, "eu-west-1", 50), (OTHER, "eu-west-1", 7)]
    for account, region, size in places:
        ec2 = _client(aws, "ec2", region, account)
        volume = ec2.create_volume(Size=size, AvailabilityZone=f"{region}a", TagSpecifications=_tags("volume"))["VolumeId"]
        want["ebs"].append((account, region, volume, Decimal(size)))
        snapshot = ec2.create_snapshot(VolumeId=volume, TagSpecifications=_tags("snapshot"))["SnapshotId"]
        want["ebs_snapshot"].append((account, region, snapshot, Decimal(size)))
        (instance,) = ec2.run_instances(ImageId="ami-12c6146b", InstanceType="t3.micro", MinCount=1, MaxCount=1,
                                        TagSpecifications=_tags("instance"))["Instances"]
        want["ec2"].append((account, region, instance["InstanceId"], Decimal(1)))
        _client(aws, "rds", region, account).create_db_instance(
            DBInstanceIdentifier="prod-db", DBInstanceClass="db.m5.large", Engine="postgres", AllocatedStorage=size,
            MasterUsername="admin", MasterUserPassword="password123", Tags=[{"Key": "customer-id", "Value": "acme"}])
        want["rds"].append((account, region, "prod-db", Decimal(size)))
        fs = _client(aws, "efs", region, account).create_file_system(
            CreationToken=f"acme-{region}", Tags=[{"Key": "customer-id", "Value": "acme"}])["FileSystemId"]
        want["efs"].append((account, region, fs, Decimal(1)))
        dynamodb = _client(aws, "dynamodb", region, account)
        dynamodb.create_table(TableName="orders", BillingMode="PAY_PER_REQUEST",
                              KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
                              AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
                              Tags=[{"Key": "customer-id", "Value": "acme"}])
        for n in range(size):
            dynamodb.put_item(TableName="orders", Item={"id": {"S": f"order-{n}"}})
        want["dynamodb"].append((account, region, "orders", Decimal(size)))
        cw = _client(aws, "cloudwatch", region, account)
        cw.put_metric_data(Namespace="Acme/Orders", MetricData=[
            {"MetricName": "Placed", "Timestamp": T - timedelta(minutes=10), "Value": size, "Unit": "Count",
             "Dimensions": [{"Name": "TableName", "Value": "orders"}]}])
        want["cloudwatch"].append((account, region, "TableName=orders", Decimal(size)))
        # bucket names are unique across accounts and regions: one per place
        bucket = f"acme-{account}-{region}"
        s3 = _client(aws, "s3", region, account)
        s3.create_bucket(Bucket=bucket, **({} if region == "us-east-1" else
                                          {"CreateBucketConfiguration": {"LocationConstraint": region}}))
        s3.put_bucket_tagging(Bucket=bucket, Tagging={"TagSet": [{"Key": "customer-id", "Value": "acme"}]})
        cw.put_metric_data(Namespace="AWS/S3", MetricData=[
            {"MetricName": "NumberOfObjects", "Timestamp": day, "Value": size, "Unit": "Count",
             "Dimensions": [{"Name": "BucketName", "Value": bucket}, {"Name": "StorageType", "Value": "AllStorageTypes"}]}])
        want["s3"].append((account, region, bucket, Decimal(size)))
        want["eip"].append((account, region, _address(ec2, TAG), Decimal(1)))
        arn = _load_balancer(ec2, _client(aws, "elbv2", region, account), "web", TAG)  # the same name everywhere
        want["elb"].append((account, region, arn.split(":loadbalancer/")[1], Decimal(1)))
    return want


ARNS = {
    "ebs": "arn:aws:ec2:{region}:{account}:volume/{id}",
    "ebs_snapshot": "arn:aws:ec2:{region}::snapshot/{id}",
    "ec2": "arn:aws:ec2:{region}:{account}:instance/{id}",
    "s3": "arn:aws:s3:::{id}",
    "rds": "arn:aws:rds:{region}:{account}:db:{id}",
    "efs": "arn:aws:elasticfilesystem:{region}:{account}:file-system/{id}",
    "dynamodb": "arn:aws:dynamodb:{region}:{account}:table/{id}",
    "cloudwatch": "{account}:{region}:{id}",
    "eip": "arn:aws:ec2:{region}:{account}:elastic-ip/{id}",
    "elb": "arn:aws:elasticloadbalancing:{region}:{account}:loadbalancer/{id}",
}
METRICS = {"ebs": "size_gib", "ebs_snapshot": "size_gib", "ec2": "count", "s3": "object_count",
           "rds": "allocated_storage_gib", "efs": "count", "dynamodb": "item_count", "cloudwatch": "value",
           "eip": "count", "elb": "count"}


def _per_type(group_by: str) -> list[dict[str, Any]]:
    measurements = []
    for resource_type, metric in METRICS.items():
        extra: dict[str, Any] = {}
        if resource_type == "cloudwatch":
            extra = {"interval": "1h", "cloudwatch": {"namespace": "Acme/Orders", "metric_name": "Placed",
                                                      "dimensions": {"TableName": "*"}, "unit": "Count"}}
        raw = _both_accounts(name=f"{resource_type.replace('_', '-')}-{group_by}", resource_type=resource_type,
                             metric=metric, group_by=group_by, **extra)
        raw["accounts"][1]["customer"] = {"tag": "customer-id"}  # acme in both accounts
        measurements.append(raw)
    return measurements


def _once(tmp_path: Path, measurements: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records ``once --dry-run`` would write to a file backend (the agent's own record shape)."""
    path = write_yaml(tmp_path / "agent.yaml", backend_config({"type": "file", "path": str(tmp_path / "usage.jsonl")},
                                                              tmp_path, *measurements))
    out = cli("once", "-c", str(path), "--at", "2026-11-21T10:00:00Z", "--dry-run")
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


def test_same_named_resources_in_two_regions_and_accounts_are_records_of_their_own(aws: Aws, tmp_path: Path) -> None:
    want = _seed_twins(aws)
    bodies = _once(tmp_path, _per_type("resource") + _per_type("customer"))
    by_measurement: dict[str, list[dict[str, Any]]] = {}
    for body in bodies:
        by_measurement.setdefault(body["metadata"]["measurement"], []).append(body)

    for resource_type, expected in want.items():
        name = resource_type.replace("_", "-")
        records = by_measurement[f"{name}-resource"]
        got = sorted((r["metadata"]["account"], r["metadata"]["region"], r["metadata"]["resource_id"],
                      Decimal(r["value"]), r["resource"]) for r in records)
        assert got == sorted((account, region, rid, value, ARNS[resource_type].format(region=region, account=account,
                                                                                        id=rid))
                             for account, region, rid, value in expected), resource_type
        assert len({r["id"] for r in records}) == 3, resource_type
        assert {r["customer_id"] for r in records} == {"acme"}
        # the customer total is the sum, as it always was
        (total,) = by_measurement[f"{name}-customer"]
        assert (Decimal(total["value"]), total["resource"]) == (sum(v for *_, v in expected), "aggregate"), resource_type
        assert total["metadata"]["resource_count"] == "3"
    rds = sorted((r["metadata"]["region"], r["value"]) for r in by_measurement["rds-resource"]
                 if r["metadata"]["account"] == ACCOUNT)
    assert rds == [("eu-west-1", "50"), ("us-east-1", "20")]
