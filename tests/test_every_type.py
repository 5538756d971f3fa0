"""Every resource type end to end through ``usage-agent once --dry-run``: resources in moto
server across two accounts and two regions, each record compared with a hand-computed value."""

from __future__ import annotations

import json
import os
import subprocess
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import boto3
import yaml

from agent.testing.paigo_server import PaigoContractServer
from tests.conftest import ACCOUNT, ROLE_ARN, Aws, agent_command, config_dict, measurement

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

    admin = boto3.client("sts", region_name="us-east-1", endpoint_url=aws.endpoint).assume_role(
        RoleArn=f"arn:aws:iam::{OTHER}:role/admin", RoleSessionName="setup")["Credentials"]
    other = {"aws_access_key_id": admin["AccessKeyId"], "aws_secret_access_key": admin["SecretAccessKey"],
             "aws_session_token": admin["SessionToken"], "endpoint_url": aws.endpoint}
    boto3.client("ec2", region_name="eu-west-1", **other).create_volume(Size=30, AvailabilityZone="eu-west-1a")
    boto3.client("ec2", region_name="us-east-1", **other).run_instances(
        ImageId="ami-12c6146b", InstanceType="m5.large", MinCount=3, MaxCount=3)


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
    ]
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(config_dict(paigo, tmp_path, *measurements)))
    out = subprocess.run([*agent_command(), "once", "-c", str(path), "--at", "2026-11-21T10:00:00Z", "--dry-run"],
                         capture_output=True, text=True, timeout=120, env=dict(os.environ))
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
    }
    assert {b["timestamp"] for b in bodies} == {"2026-11-21T10:00:00Z"}
    by_name = {(b["metadata"]["measurement"], b["customerId"]): b["metadata"] for b in bodies}
    assert by_name[("ebs-gib", "globex")]["accounts"] == OTHER
    assert by_name[("ebs-gib", "acme")]["accounts"] == ACCOUNT
